"""The records' stack at CPU size against the baseline, same steps and tokens, on the shared FineWeb sample.

python -m bench.recipe [--seeds 1337 42] [--steps 300] [--record-steps N] [--ablate] [--setups NAME ...]

bench/train.py's set-up (train on extra_docs.jsonl, validate on the first 262,144 tokens of the 450
val_head documents, official sp1024 tokenizer, seq 256, 8,192 tokens per step) for two configurations:
the baseline demo shape with the baseline's recipe (4 x 128, MLP 2x, 60-step warm-down), and
profiles/record-cpu.yaml (PR #1855's model and recipe, every feature on, 6 x 128). Also the record stack
with one part reverted at a time (--ablate), to find what helps or hurts at this scale; --record-steps trains
the record setups for another number of steps (the same wall time as the baseline's, say). Prints and saves
val_bpb, ms/step and parameters per seed: bench/results/recipe.json (--out to keep another run apart).
"""
import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import FINEWEB, REPO, save
from bench.train import comparison_data, comparison_params
from pgolf import params, trainer
from pgolf.bpb import ByteTables, position_bytes
from pgolf.model import ModelParams
from pgolf.runtime import CPU
from pgolf.trainer import TrainParams
from pgolf.validation import evaluate, validation_tokens

# One part of the record stack back to the baseline's, for --ablate.
ABLATIONS = {
    "no recurrence": ({"loops": 0, "loop_start": 0, "loop_end": 0}, {}),
    "no EMA": ({}, {"ema_decay": 0.0}),
    "quintic Muon, no row norm, no decay": ({}, {"muon_ns": "quintic", "muon_row_normalize": False, "muon_wd": 0.0, "embed_wd": 0.0, "adam_wd": 0.0}),
    "baseline LRs and schedule": ({}, {"tied_embed_lr": 0.05, "matrix_lr": 0.04, "scalar_lr": 0.04, "muon_momentum": 0.95,
                                       "muon_momentum_warmup_start": 0.85, "beta2": 0.95, "grad_clip_norm": 0.0, "warmdown_frac": 0.0,
                                       "warmdown_iters": 60, "min_lr": 0.0}),
    "MLP 2x": ({"mlp_mult": 2.0}, {}),
    "4 layers": ({"layers": 4, "loop_start": 1, "loop_end": 2, "parallel_start": 3, "xsa_last": 4}, {}),
}


def record_cpu(steps: int) -> tuple[ModelParams, TrainParams]:
    p = params.load(REPO / "profiles" / "record-cpu.yaml")
    _, base_t = comparison_params(steps)  # the same data, batch and steps as the baseline
    t = params.section(p, "train", TrainParams)
    same = {k: getattr(base_t, k) for k in ("seq_len", "batch_tokens", "grad_accum", "iterations", "max_seconds", "warmup_steps",
                                            "log_every", "checkpoint_every", "resume", "val_tokens")}
    return params.section(p, "model", ModelParams), dataclasses.replace(t, **same)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--record-steps", type=int, default=None, help="steps of the record setups (default: --steps)")
    ap.add_argument("--ablate", action="store_true", help="also the record stack with one part reverted at a time (first seed)")
    ap.add_argument("--setups", nargs="+", default=None, help="run only these setups (names as printed)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recipe.json")
    args = ap.parse_args()
    setups = {"baseline": comparison_params(args.steps), "record-cpu": record_cpu(args.record_steps or args.steps)}
    runs = [(name, seed) for seed in args.seeds for name in setups]  # alternate: the machine's drift hits both alike
    if args.ablate:
        m, t = setups["record-cpu"]
        for name, (dm, dt) in ABLATIONS.items():
            setups[f"record-cpu, {name}"] = (dataclasses.replace(m, **dm), dataclasses.replace(t, **dt))
            runs.append((f"record-cpu, {name}", args.seeds[0]))
    if args.setups:
        runs = [r for r in runs if r[0] in args.setups]
        setups = {k: v for k, v in setups.items() if k in args.setups}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = comparison_data(args.fineweb, Path(tmp))
        val = validation_tokens(shards_dir, 256, 262_144)
        tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model")
        for name, seed in runs:
            model_p, train_p = setups[name]
            model = trainer.build(model_p, seed, CPU.device)
            run = trainer.train(model, train_p, CPU, shards_dir, Path(tmp) / f"run-{len(rows)}", seed)
            _, val_bpb = evaluate(model, val, 256, 64, position_bytes(val, tables), CPU)
            ms = run.train_ms / run.step
            rows.append({"setup": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()), "steps": run.step,
                         "ms_per_step": round(ms, 1), "train_loss": round(run.train_loss, 4), "val_bpb": round(val_bpb, 4)})
            print(f"{name}, seed {seed}: val_bpb {val_bpb:.4f}, {ms:.0f} ms/step, {rows[-1]['params']:,} params", flush=True)
    summary = {}
    for name in setups:
        mine = [r for r in rows if r["setup"] == name]
        summary[name] = {"val_bpb_mean": round(statistics.mean(r["val_bpb"] for r in mine), 4),
                         "ms_per_step_median": round(statistics.median(r["ms_per_step"] for r in mine), 1), "runs": len(mine)}
        print(f"{name}: mean val_bpb {summary[name]['val_bpb_mean']:.4f} over {len(mine)} run(s), {summary[name]['ms_per_step_median']:.0f} ms/step")
    save({"machine": {"cores": os.cpu_count(), "torch": torch.__version__}, "steps": args.steps, "tokens_per_step": 8192,
          "runs": rows, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
