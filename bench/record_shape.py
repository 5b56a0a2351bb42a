"""Calibrate, pack and unpack at the record shape (PR #1855: 11 x 512, MLP 4x, vocabulary 8192) on the CPU.

python -m bench.record_shape [--fineweb DIR] [--steps 6] [--calib-seqs 16]

Runs the real stages (tokenize, train, calibrate, pack, then a fresh process loading the artifact) in
a scratch folder with profiles/record-1855.yaml's model and quantization (SD clip, the shared embedding
Hessian, LQER) and pack.compressor auto, so every compressor's bytes and seconds land in
metrics/pack.json. Each stage runs in its own process, whose peak resident memory is read from the
kernel (getrusage) when it ends. The weights are short-trained, not the record's: the shared FineWeb
sample tokenized with the records' 8192-token (CaseOps) SentencePiece model on plain text, `--steps`
steps of the record's recipe at 4 x 512 tokens. Their compressed size says little about a trained
record's; the seconds and the memory are what this measures. Also shows the per-row embedding
Hessians refused at this shape. Saves bench/results/record_shape.json.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import FINEWEB, REPO, save

# Runs one stage as python -m would, then reports the process's own peak memory (KiB on Linux).
LAUNCH = ("import resource, runpy, sys; stage = sys.argv[1]; sys.argv = [stage]\n"
          "try:\n    runpy.run_module(stage, run_name='__main__')\n"
          "finally:\n    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def run(module: str, cwd: Path) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LAUNCH, module], cwd=cwd, capture_output=True, text=True, env={"PYTHONPATH": str(REPO),
                         "PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(cwd)})
    seconds = time.perf_counter() - t
    peak = [int(line.split()[1]) for line in out.stderr.splitlines() if line.startswith("peak_rss_kib")]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    print(f"{module}: exit {out.returncode}, {seconds:.1f}s, peak {peak[0] / 2**20:.2f} GiB" + (f"; {errors[0]}" if errors else ""), flush=True)
    if out.returncode not in (0, 2):
        print(out.stderr[-3000:])
    return {"exit": out.returncode, "seconds": round(seconds, 1), "peak_rss_gib": round(peak[0] / 2**20, 3), "error": errors[0] if errors else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "record_shape.json")
    args = ap.parse_args()
    p = yaml.safe_load((REPO / "profiles" / "record-1855.yaml").read_text())
    p["data"].update(source="docs", docs=[str(args.fineweb / "val_head_docs.jsonl"), str(args.fineweb / "extra_docs.jsonl")], val_docs=450,
                     shards=None, workers=1)
    p["tokenizer"].update(model=str(args.fineweb / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"))
    p["train"].update(iterations=args.steps, seq_len=512, batch_tokens=2048, grad_accum=1, max_seconds=0, warmup_steps=0, compile=False,
                      val_tokens=16384, val_batch_seqs=4, log_every=1, checkpoint_every=0, loop_at=0.5, warmdown_frac=0.5)
    p["quant"].update(calib_seqs=args.calib_seqs, seq_len=2048)
    p["pack"].update(compressor="auto")
    stages = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(p))
        for stage in ("tokenize", "train", "calibrate", "pack"):
            stages[stage] = run(f"stages.{stage}", root)
            if stages[stage]["exit"]:
                raise SystemExit(f"{stage} failed")
        (root / "load.py").write_text("from pgolf.artifact import load_model\nload_model('artifacts/model.pgolf')\n")
        stages["load artifact"] = run("load", root)
        pack_m = json.loads((root / "metrics" / "pack.json").read_text())
        quant_m = json.loads((root / "metrics" / "quant.json").read_text())
        quant_d = json.loads((root / "reports" / "details" / "quant.json").read_text())["tensors"]
        train_m = json.loads((root / "metrics" / "train.json").read_text())
        p["quant"]["embed_hessian"] = "per_row"
        (root / "params.yaml").write_text(yaml.safe_dump(p))
        stages["calibrate, per_row embedding Hessians"] = run("stages.calibrate", root)
    save({"model": {k: p["model"][k] for k in ("layers", "dim", "mlp_mult", "vocab_size", "loops")}, "params": train_m.get("params"),
          "train_steps": args.steps, "train_val_bpb": train_m.get("val_bpb"), "calib_seqs": args.calib_seqs, "stages": stages,
          "quant": quant_m, "lqer_tensors": sorted(n for n, t in quant_d.items() if t["lqer_rank"]), "pack": pack_m}, args.out)


if __name__ == "__main__":
    main()
