"""Quantization penalty and artifact bytes: clip search vs the records' SD clip, LQER, embedding Hessians, calibration.

python -m bench.quant [--fineweb DIR] [--bits 4 5 6]

The model is bench/train.py's comparison model (seed 1337, 300 steps on the shared FineWeb sample),
taken from runs/bench/ when bench/train.py has left it there, else trained first (about 4 minutes on
2 cores). Every matrix class (attention, MLP, tied embedding) at the same width. Calibration: 64 x 256
train tokens unless said. The penalty is val_bpb after minus before on the first 262,144 validation
tokens (non-overlapping windows of 256); bytes are the zstd-22 artifact's weights (pack.compressor zstd),
so that clip methods are compared on the same coder. Four comparisons:
  clip     search vs sdclip at the records' k (13 / 11.5 / 14) and at smaller k, each without and with
           LQER (rank 4, top 3, A 2-bit, B 4-bit in groups of 64: PR #1855's)
  hessian  the tied embedding's per-row Hessians (head + lookup curvature) vs the records' shared one
  calib    train tokens vs self-generated ones (the float model's samples, temperature 1.0 and 0.8)
Saves bench/results/quant.json.
"""
import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from bench.common import FINEWEB, REPO, save
from bench.train import comparison_data, comparison_model
from pgolf import codes, lqer, pack, params, quantize, shards
from pgolf.bpb import ByteTables, position_bytes
from pgolf.loader import TokenStream
from pgolf.lqer import LqerParams
from pgolf.quantize import QuantBits, QuantParams, QuantSigmas
from pgolf.runtime import CPU
from pgolf.validation import evaluate, validation_tokens

RECORD_SIGMAS = QuantSigmas(13.0, 11.5, 14.0)
LQER = LqerParams(rank=4, top_k=3, a_bits=2, b_bits=4, group=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[4.0, 6.0, 8.0], help="uniform k tried beside the records' per-class k")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quant.json")
    args = ap.parse_args()
    d = CPU
    base = params.section(params.load(REPO / "params.yaml"), "quant", QuantParams)
    base = dataclasses.replace(base, method="gptq", clip="search", embed_hessian="per_row", calibration="train", calib_seqs=64, seq_len=256,
                               lqer=dataclasses.replace(LQER, rank=0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = comparison_data(args.fineweb, Path(tmp))
        model = comparison_model(shards_dir, Path(tmp))
        tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model")
        val = validation_tokens(shards_dir, 256, 262_144)
        _, float_bpb = evaluate(model, val, 256, 64, position_bytes(val, tables), d)
        print(f"float model val_bpb {float_bpb:.4f}")
        n, seq = base.calib_seqs, base.seq_len
        train_calib = TokenStream(shards.list_shards(shards_dir, "train")).take(n * seq + 1)
        calib = {"train": (train_calib[:-1].reshape(n, seq), train_calib[1:].reshape(n, seq))}
        for temperature in (1.0, 0.8):
            t = time.perf_counter()
            s = quantize.sample(model, n, seq, temperature, 1337)
            calib[f"self_generated T={temperature}"] = (s[:, :-1], s[:, 1:])
            print(f"sampled {n} x {seq} tokens at T={temperature} in {time.perf_counter() - t:.1f}s")
        hessians, done = {}, {}

        def hess(source: str, embed: str) -> dict:
            if (source, embed) not in hessians:
                hessians[source, embed] = quantize.collect_hessians(model, *calib[source], embed_hessian=embed)
            return hessians[source, embed]

        def run(study: str, label: str, q: QuantParams, source: str = "train") -> None:
            if (source, q) not in done:  # the same setting in two studies is quantized once
                t = time.perf_counter()
                done[source, q] = (*quantize.quantize_model(model, hess(source, q.embed_hessian), q), time.perf_counter() - t)
            tensors, meta, seconds = done[source, q]
            variants = [("", tensors, meta)]
            if study == "clip":  # the same codes with LQER's factors added
                names = meta["quantized"]
                state = {k: v.float() for k, v in model.state_dict().items()}
                fixed = dict(tensors) | lqer.correct(state, {k: codes.weight(tensors, k) for k in names}, LQER)
                lq_meta = {**meta, "tensors": {k: {**v, "lqer_rank": LQER.rank if f"{k}.lqer_a" in fixed else 0, "lqer_bits": [2, 4]}
                                               for k, v in meta["tensors"].items()}}
                variants.append((" +LQER", fixed, lq_meta))
            for suffix, tens, m in variants:
                _, bpb = evaluate(codes.model_from_tensors(tens, m), val, 256, 64, position_bytes(val, tables), d)
                blob, _ = pack.pack_quantized(tens, m, 22, "zstd")
                row = {"study": study, "bits": q.bits.attn, "setting": label + suffix, "val_bpb": round(bpb, 5),
                       "penalty": round(bpb - float_bpb, 5), "artifact_bytes": len(blob), "quantize_seconds": round(seconds, 2)}
                rows.append(row)
                print(f"{study:>7} {row['bits']} {row['setting']:<34} val_bpb {bpb:.4f} penalty {row['penalty']:+.5f} "
                      f"bytes {len(blob):>9,} ({seconds:.1f}s)", flush=True)

        for bits in args.bits:
            q = dataclasses.replace(base, bits=QuantBits(bits, bits, bits))
            run("clip", "search", q)
            run("clip", "sdclip k 13/11.5/14 (#1855)", dataclasses.replace(q, clip="sdclip", sigmas=RECORD_SIGMAS))
            for k in args.sigmas:
                run("clip", f"sdclip k {k:g}", dataclasses.replace(q, clip="sdclip", sigmas=QuantSigmas(k, k, k)))
            run("hessian", "shared (records)", dataclasses.replace(q, embed_hessian="shared"))
            run("hessian", "per_row", q)
            for source in calib:
                run("calib", source, q, source)
    save({"float_val_bpb": round(float_bpb, 5), "lqer": dataclasses.asdict(LQER), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
