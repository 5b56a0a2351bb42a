"""Packing against the naive way: plain zstd of an int8 dump of the same codes and scales.

python -m bench.pack [--checkpoint artifacts/model.safetensors] [--bits 4 5 6 8] [--level 22]

Quantizes the float checkpoint (RTN: only the codes matter here, not their quality) at each bit width
for every matrix class, then compares our artifact's weight bytes (filters, header and checksum
included) with zstd at the same level over the tensors' raw bytes concatenated: int8 codes, float16
scales, float32 control tensors. Saves bench/results/pack.json.
"""
import argparse
import dataclasses
import time
from pathlib import Path

import zstandard

from bench.common import REPO, save
from pgolf import checkpoint, pack, params, quantize
from pgolf.quantize import QuantBits, QuantParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=REPO / "artifacts" / "model.safetensors")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6, 8])
    ap.add_argument("--level", type=int, default=22)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pack.json")
    args = ap.parse_args()
    model, _ = checkpoint.load_model(args.checkpoint)
    base = params.section(params.load(REPO / "params.yaml"), "quant", QuantParams)
    rows = []
    for bits in args.bits:
        q = dataclasses.replace(base, method="rtn", bits=QuantBits(bits, bits, bits))
        tensors, meta = quantize.quantize_model(model, {}, q)
        naive = len(zstandard.ZstdCompressor(level=args.level).compress(b"".join(tensors[k].contiguous().numpy().tobytes() for k in sorted(tensors))))
        t = time.perf_counter()
        blob, report = pack.pack(tensors, {f"{n}.codes": bits for n in meta["quantized"]}, {"model": meta["model"], "quantized": meta["quantized"]}, args.level)
        seconds = time.perf_counter() - t
        rows.append({"bits": bits, "ours_bytes": len(blob), "naive_zstd_bytes": naive, "ratio": round(len(blob) / naive, 4),
                     "layout": report["layout"], "layout_bytes": report["layout_bytes"], "pack_seconds": round(seconds, 2)})
        print(f"{bits} bits: ours {len(blob):,} B, naive zstd-{args.level} {naive:,} B ({len(blob) / naive:.3f}x); layout {report['layout']}; {seconds:.1f}s")
    checkpoint_name = str(args.checkpoint.relative_to(REPO) if args.checkpoint.is_relative_to(REPO) else args.checkpoint)
    save({"checkpoint": checkpoint_name, "level": args.level, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
