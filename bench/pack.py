"""Bytes and seconds per compressor on the same codes: zstd-22 layouts (what pack did before), brotli-11,
the records' per-group lrzip, against a naive zstd-22 of the raw tensors.

python -m bench.pack [--checkpoint runs/bench/model_1337_300.safetensors] [--bits 4 5 6 8] [--level 22]

Quantizes the float checkpoint (RTN: only the codes' statistics matter here; bench/quant.py measures
their quality) with the clip search and with the SD clip at k = 13 / 11.5 / 14, every class at each
bit width, then packs the same tensors with each compressor: weight bytes (header and checksum
included), seconds to pack (every plan the compressor tries) and seconds to unpack. The default
checkpoint is bench/train.py's comparison model; the demo's artifacts/model.safetensors works too.
Saves bench/results/pack.json.
"""
import argparse
import dataclasses
import time
from pathlib import Path

import zstandard

from bench.common import REPO, save
from bench.train import CACHE
from pgolf import artifact, checkpoint, pack, params, quantize
from pgolf.quantize import QuantBits, QuantParams, QuantSigmas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=CACHE / "model_1337_300.safetensors")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6, 8])
    ap.add_argument("--level", type=int, default=22)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pack.json")
    args = ap.parse_args()
    model, _ = checkpoint.load_model(args.checkpoint)
    base = params.section(params.load(REPO / "params.yaml"), "quant", QuantParams)
    base = dataclasses.replace(base, method="rtn", lqer=dataclasses.replace(base.lqer, rank=0))
    rows = []
    for bits in args.bits:
        for clip in ("search", "sdclip"):
            q = dataclasses.replace(base, bits=QuantBits(bits, bits, bits), clip=clip, sigmas=QuantSigmas(13.0, 11.5, 14.0))
            tensors, meta = quantize.quantize_model(model, {}, q)
            naive = len(zstandard.ZstdCompressor(level=args.level).compress(b"".join(tensors[k].contiguous().numpy().tobytes() for k in sorted(tensors))))
            row = {"bits": bits, "clip": clip, "naive_zstd_bytes": naive}
            for compressor in pack.COMPRESSORS:
                t = time.perf_counter()
                blob, report = pack.pack_quantized(tensors, meta, args.level, compressor)
                packed = time.perf_counter() - t
                t = time.perf_counter()
                artifact.unpack(blob)
                row[compressor] = {"bytes": len(blob), "pack_seconds": round(packed, 2), "unpack_seconds": round(time.perf_counter() - t, 3),
                                   "layout": report["layout"], "layout_bytes": report["layout_bytes"]}
            best = min(pack.COMPRESSORS, key=lambda c: row[c]["bytes"])
            row["best"] = best
            rows.append(row)
            print(f"{bits} bits {clip:>6}: naive zstd {naive:>9,} | " + " | ".join(
                f"{c} {row[c]['bytes']:>9,} ({row[c]['bytes'] / row['zstd']['bytes']:.3f}x zstd, {row[c]['pack_seconds']:.1f}s, "
                f"unpack {row[c]['unpack_seconds']:.2f}s)" for c in pack.COMPRESSORS), flush=True)
    save({"checkpoint": str(args.checkpoint.relative_to(REPO)) if args.checkpoint.is_relative_to(REPO) else str(args.checkpoint),
          "level": args.level, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
