"""Quantization penalty: GPTQ against RTN at 4, 5 and 6 bits on the trained demo model.

python -m bench.quant [--fineweb DIR] [--bits 4 5 6]

The model is bench/train.py's comparison model (seed 1337, 300 steps on the shared FineWeb sample),
taken from runs/bench/ when bench/train.py has left it there, else trained first (about 4 minutes on
2 cores). Two settings per bit width: the block matrices (attn, mlp) at that width with the tied
embedding at 8 bits (the default split), and every class at that width. Calibration: 64 x 256 train
tokens; the penalty is val_bpb after minus before on the first 262,144 validation tokens
(non-overlapping windows). Saves bench/results/quant.json.
"""
import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


from bench.common import FINEWEB, REPO, save
from bench.train import CACHE, comparison_data, comparison_params
from pgolf import checkpoint, codes, params, quantize, shards, trainer
from pgolf.bpb import ByteTables
from pgolf.runtime import CPU
from pgolf.validation import evaluate, validation_tokens
from pgolf.loader import TokenStream
from pgolf.quantize import QuantBits, QuantParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quant.json")
    args = ap.parse_args()
    d = CPU
    cached = CACHE / "model_1337_300.safetensors"
    base_q = params.section(params.load(REPO / "params.yaml"), "quant", QuantParams)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = comparison_data(args.fineweb, Path(tmp))
        if cached.is_file():
            model, _ = checkpoint.load_model(cached)
        else:
            model_p, train_p = comparison_params(300)
            model = trainer.build(model_p, 1337, d.device)
            trainer.train(model, train_p, d, shards_dir, Path(tmp) / "run", 1337)
            checkpoint.save_model(cached, model)
        tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model")
        val = validation_tokens(shards_dir, 256, 262_144)
        _, float_bpb = evaluate(model, val, 256, 64, tables, d)
        n, seq = base_q.calib_seqs, base_q.seq_len
        calib = TokenStream(shards.list_shards(shards_dir, "train")).take(n * seq + 1)
        hessians = quantize.collect_hessians(model, calib[:-1].reshape(n, seq), calib[1:].reshape(n, seq))
        print(f"float model val_bpb {float_bpb:.4f}")
        for setting in ("embed 8", "all"):
            for bits in args.bits:
                for method in ("rtn", "gptq"):
                    q = dataclasses.replace(base_q, method=method, bits=QuantBits(bits, bits, 8 if setting == "embed 8" else bits))
                    t = time.perf_counter()
                    tensors, meta = quantize.quantize_model(model, hessians, q)
                    seconds = time.perf_counter() - t
                    _, bpb = evaluate(codes.model_from_tensors(tensors, meta), val, 256, 64, tables, d)
                    rows.append({"setting": setting, "bits": bits, "method": method, "val_bpb": round(bpb, 5),
                                 "penalty": round(bpb - float_bpb, 5), "seconds": round(seconds, 2)})
    print(f"{'setting':>8} {'bits':>4} {'method':>6} {'val_bpb':>8} {'penalty':>8} {'seconds':>7}")
    for r in rows:
        print(f"{r['setting']:>8} {r['bits']:>4} {r['method']:>6} {r['val_bpb']:>8.4f} {r['penalty']:>+8.4f} {r['seconds']:>7.2f}")
    ratios = {}
    for setting in ("embed 8", "all"):
        for bits in args.bits:
            pen = {r["method"]: r["penalty"] for r in rows if r["bits"] == bits and r["setting"] == setting}
            ratios[f"{setting}, {bits} bits"] = round(pen["gptq"] / pen["rtn"], 3) if pen["rtn"] > 0 else None
            print(f"{setting:>8}, {bits} bits: GPTQ penalty / RTN penalty = {ratios[f'{setting}, {bits} bits']}")
    save({"float_val_bpb": round(float_bpb, 5), "rows": rows, "gptq_over_rtn": ratios}, args.out)


if __name__ == "__main__":
    main()
