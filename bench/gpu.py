"""Training throughput on one GPU: the baseline and record profiles for a fixed number of steps, and a record's script.

python -m bench.gpu [--steps 30] [--profiles 8xh100 record-1855] [--record-script PATH --record-data DIR]

Each profile trains `--steps` optimizer steps with pgolf's trainer (its model, recipe and batch;
torch.compile, bf16 autocast) on shards of random tokens, so no data is needed, with one process doing
all of the profile's micro-batches. Reports ms/step after the compile-priming steps, tokens/s and peak
memory. With --record-script (a record's train_gpt.py) and --record-data (its data_dir, holding the
sp8192 shards and tokenizer) it also runs that script for the same steps under torchrun on this GPU and
reads its own train_time and tok/s lines. The records report about 120 ms/step on 8xH100 for 786,432
tokens; one GPU does 8 times the tokens of one of those ranks, so compare tokens/s.
Saves bench/results/gpu.json.
"""
import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, save
from pgolf import params, shards, trainer
from pgolf.model import ModelParams
from pgolf.runtime import Dist
from pgolf.trainer import TrainParams


def profile_run(name: str, steps: int, shards_dir: Path, run_dir: Path) -> dict:
    p = params.load(REPO / "profiles" / f"{name}.yaml")
    model_p = params.section(p, "model", ModelParams)
    t = dataclasses.replace(params.section(p, "train", TrainParams), iterations=steps, max_seconds=0, checkpoint_every=0, resume=False,
                            log_every=max(steps // 3, 1), import_from=None)
    d = Dist(0, 1, torch.device("cuda"))
    model = trainer.build(model_p, 0, d.device)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = trainer.train(model, t, d, shards_dir, run_dir, 0)
    ms = run.train_ms / run.step
    return {"setup": f"pgolf {name}", "params": sum(x.numel() for x in model.parameters()), "steps": run.step, "ms_per_step": round(ms, 1),
            "tokens_per_s": round(t.batch_tokens / ms * 1000), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "wall_s_with_compile": round(time.perf_counter() - t0, 1)}


def record_run(script: Path, data_dir: Path, steps: int) -> dict:
    env = dict(os.environ, ITERATIONS=str(steps), MAX_WALLCLOCK_SECONDS="0", DATA_DIR=str(data_dir), TRAIN_LOG_EVERY="1",
               VAL_LOSS_EVERY="0", RUN_ID="bench_gpu")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)],
                         env=env, capture_output=True, text=True, timeout=3600, cwd=script.parent)
    rates = [float(m) for m in re.findall(r"tok/s: (\d+)", out.stdout + out.stderr)]
    if not rates:
        return {"setup": f"record script {script.parent.name}", "error": (out.stderr or out.stdout)[-600:]}
    return {"setup": f"record script {script.parent.name}", "steps": len(rates), "tokens_per_s": round(rates[-1]),
            "ms_per_step": round(786_432 / rates[-1] * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profiles", nargs="+", default=["8xh100", "record-1855"])
    ap.add_argument("--record-script", type=Path)
    ap.add_argument("--record-data", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench.gpu needs a CUDA GPU")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(2):  # 2 x 50M random tokens below 1024 (fit every profile's vocabulary), a BOS now and then
            tokens = rng.integers(2, 1024, 50_000_000, dtype=np.uint16)
            tokens[:: 1500] = 1
            shards.write_shard(Path(tmp) / f"fineweb_train_{i:06d}.bin", tokens)
        for name in args.profiles:
            rows.append(profile_run(name, args.steps, Path(tmp), Path(tmp) / f"run-{name}"))
            print(rows[-1], flush=True)
    if args.record_script:
        rows.append(record_run(args.record_script, args.record_data, args.steps))
        print(rows[-1], flush=True)
    save({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
