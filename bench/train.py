"""Training speed and learning, side by side with the official baseline's published CPU figures.

python -m bench.train [--fineweb DIR] [--seeds 1337 42] [--steps 300]

The issue's set-up: train on extra_docs.jsonl, validate on the 450 val_head documents (first
262,144 tokens), official sp1024 tokenizer, 4 layers x 128, 4 heads, 2 KV heads, MLP 2x, seq 256,
8,192 tokens/step, 300 steps with a 60-step warm-down. The official train_gpt.py, patched only to
run on CPU, reached val_bpb 2.444 (seed 1337) and 2.458 (seed 42) there. Prints ms/step, tokens/s
and val_bpb per seed next to those, and saves bench/results/train.json.
"""
# bench/tokenization.py would shadow the standard library's tokenize: the repository goes first instead.
import argparse
import dataclasses
import os
import platform
import tempfile
from pathlib import Path

import torch

from bench.common import FINEWEB, REPO, save
from pgolf import checkpoint, params, trainer
from pgolf.bpb import ByteTables, position_bytes
from pgolf.dataset import export_docs
from pgolf.runtime import CPU
from pgolf.documents import DocFile, DocReader
from pgolf.validation import evaluate, validation_tokens
from pgolf.model import ModelParams
from pgolf.trainer import TrainParams

OFFICIAL_CPU_VAL_BPB = {1337: 2.444, 42: 2.458}  # measured by the author with train_gpt.py on CPU
SHAPE = dict(layers=4, dim=128, heads=4, kv_heads=2, mlp_mult=2, vocab_size=1024, tie_embeddings=True)


CACHE = REPO / "runs" / "bench"  # untracked: the trained comparison model, reused by bench/quant.py


def comparison_params(steps: int) -> tuple[ModelParams, TrainParams]:
    p = params.load(REPO / "params.yaml")
    model_p = dataclasses.replace(params.section(p, "model", ModelParams), **SHAPE)
    train_p = dataclasses.replace(
        params.section(p, "train", TrainParams),
        seq_len=256, batch_tokens=8192, grad_accum=8, iterations=steps, warmdown_iters=60, max_seconds=0,
        warmup_steps=0, log_every=50, checkpoint_every=0, resume=False, val_tokens=262_144,
    )
    return model_p, train_p


def comparison_model(shards_dir: Path, scratch: Path) -> torch.nn.Module:
    """The comparison model (seed 1337, 300 steps), from runs/bench/ where this benchmark left it, else trained now
    on shards_dir (about 4 minutes on 2 cores) and left there."""
    cached = CACHE / "model_1337_300.safetensors"
    if cached.is_file():
        model, _ = checkpoint.load_model(cached)
    else:
        model_p, train_p = comparison_params(300)
        model = trainer.build(model_p, 1337, CPU.device)
        trainer.train(model, train_p, CPU, shards_dir, scratch / "run", 1337)
        checkpoint.save_model(cached, model)
    return model.eval()


def comparison_data(fineweb: Path, out: Path) -> Path:
    """Shards of the set-up: validation = the 450 val_head documents, training = extra_docs."""
    files = [DocFile(fineweb / "val_head_docs.jsonl", "jsonl"), DocFile(fineweb / "extra_docs.jsonl", "jsonl")]
    export_docs(DocReader(files), fineweb / "tokenizers" / "fineweb_1024_bpe.model", out / "shards", out / "docs.parquet", 450, 10**8, workers=1)
    return out / "shards"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = ap.parse_args()

    model_p, train_p = comparison_params(args.steps)
    model_file = args.fineweb / "tokenizers" / "fineweb_1024_bpe.model"
    d = CPU
    results = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
               "setup": {"model": SHAPE, "seq_len": 256, "batch_tokens": 8192, "steps": args.steps, "warmdown": 60}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = comparison_data(args.fineweb, Path(tmp))
        val = validation_tokens(shards_dir, 256, 262_144)
        tables = ByteTables.from_sentencepiece(model_file)
        for seed in args.seeds:
            model = trainer.build(model_p, seed, d.device)
            run = trainer.train(model, train_p, d, shards_dir, Path(tmp) / f"run{seed}", seed)
            val_loss, val_bpb = evaluate(model, val, 256, 64, position_bytes(val, tables), d)
            checkpoint.save_model(CACHE / f"model_{seed}_{args.steps}.safetensors", model, {"val_bpb": val_bpb})
            ms = run.train_ms / run.step
            row = {"seed": seed, "steps": run.step, "ms_per_step": round(ms, 1), "tokens_per_s": round(8192 / ms * 1000, 1),
                   "train_loss": round(run.train_loss, 4), "val_loss": round(val_loss, 4), "val_bpb": round(val_bpb, 4),
                   "official_val_bpb": OFFICIAL_CPU_VAL_BPB.get(seed)}
            results["runs"].append(row)
            official = row["official_val_bpb"]
            gap = f", ours - official = {val_bpb - official:+.4f}" if official else ""
            print(f"seed {seed}: {ms:.0f} ms/step, {row['tokens_per_s']:,.0f} tok/s; val_bpb ours {val_bpb:.4f}, official {official}{gap}")
    save(results, args.out)


if __name__ == "__main__":
    main()
