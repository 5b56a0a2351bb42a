"""Pass-1 scoring: tokens/s side by side with the official sliding evaluator, and val_bpb by mode.

python -m bench.score [--fineweb DIR] [--official train_gpt.py] [--repeats 3]

Model: bench/train.py's comparison model (demo shape 4 x 128, seed 1337, 300 steps on the shared
FineWeb sample; trained first if runs/bench/ lacks it), calibrated with params.yaml's quant
defaults and packed, as the pipeline would submit it.

Speed, each side as its users run it, in a fresh process of its own, alternating, on the first
262,144 validation targets of the same weights:
  ours      the score stage's path: the artifact through pgolf's loader, params.yaml's eval config
            (seq 256, stride 64, 256 windows per batch), float32 on CPU, freed memory kept mapped
            (as the stage does), records written to parquet;
  official  eval_val_sliding of a record's train_gpt.py (e.g. records/track_10min_16mb/
            2026-03-19_SlidingWindowEval/train_gpt.py of openai/parameter-golf) on its own GPT,
            built as its main() builds it (bf16 body, CastedLinear and control tensors float32) and
            loaded with the artifact's dequantized weights, at seq 256, stride 64 and its own
            default batch (EVAL_BATCH_SEQS, 32), glibc's allocator defaults.
Medians of --repeats runs each, and the median of the pairwise ratios.

val_bpb: all 450 validation documents, non-overlapping, sliding-64, and both doc-isolated.
Saves bench/results/score.json.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.common import FINEWEB, REPO, save
from bench.train import comparison_data, comparison_model
from pgolf import artifact, pack, params, quantize, runtime, shards, windows
from pgolf.bpb import ByteTables, position_bytes
from pgolf.runtime import CPU
from pgolf.loader import TokenStream
from pgolf.quantize import QuantParams
from pgolf.score import EvalParams, write_records

SPEED_TARGETS = 262_144


def artifact_blob(shards_dir: Path, tmp: Path) -> bytes:
    """The comparison model as the pipeline would submit it: GPTQ at the quant defaults, packed."""
    model = comparison_model(shards_dir, tmp)
    q = params.section(params.load(REPO / "params.yaml"), "quant", QuantParams)
    calib = TokenStream(shards.list_shards(shards_dir, "train")).take(q.calib_seqs * q.seq_len + 1)
    hessians = quantize.collect_hessians(model, calib[:-1].reshape(q.calib_seqs, -1), calib[1:].reshape(q.calib_seqs, -1))
    tensors, meta = quantize.quantize_model(model, hessians, q)
    return pack.pack_quantized(tensors, meta)[0]


def ours(model, tokens: np.ndarray, ev: EvalParams, tables: ByteTables, out: Path) -> tuple[float, float, int]:
    """(seconds, val_bpb, targets scored) of the score stage's path on `tokens`."""
    t = time.perf_counter()
    plan = windows.plan(tokens, ev.seq_len, ev.stride, ev.doc_isolated, bos_id=1)
    totals = write_records(model, tokens, plan, ev.batch, position_bytes(tokens, tables), 1, CPU, out)
    return time.perf_counter() - t, totals.val_bpb, totals.tokens


def official_model(module, model) -> torch.nn.Module:
    """The record's own GPT as its main() builds it, holding the artifact's dequantized weights."""
    p = model.p
    official = module.GPT(vocab_size=p.vocab_size, num_layers=p.layers, model_dim=p.dim, num_heads=p.heads, num_kv_heads=p.kv_heads,
                          mlp_mult=p.mlp_mult, tie_embeddings=p.tie_embeddings, tied_embed_init_std=p.tied_embed_init_std,
                          logit_softcap=p.logit_softcap, rope_base=p.rope_base, qk_gain_init=p.qk_gain_init).bfloat16()
    for m in official.modules():
        if isinstance(m, module.CastedLinear):
            m.float()
    module.restore_low_dim_params_to_fp32(official)
    official.load_state_dict(model.state_dict(), strict=True)
    return official


def child(args) -> None:
    """One timed run of one side, in this fresh process; prints its JSON."""
    tokens = np.load(args.tokens)
    tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model", 1024)
    ev = params.section(params.load(REPO / "params.yaml"), "eval", EvalParams)
    model = artifact.load_model(args.artifact).eval()
    if args.child == "ours":
        runtime.keep_freed_memory()  # as the score stage does on CPU
        batch = ev.batch
        with tempfile.TemporaryDirectory() as tmp:
            seconds, bpb, _ = ours(model, tokens, ev, tables, Path(tmp) / "records.parquet")
    else:
        spec = importlib.util.spec_from_file_location("official_train_gpt", args.official)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        official = official_model(module, model)
        luts = (torch.from_numpy(tables.base_bytes), torch.from_numpy(tables.leading_space), torch.from_numpy(tables.boundary))
        batch = module.Hyperparameters.eval_batch_seqs
        t = time.perf_counter()
        _, bpb = module.eval_val_sliding(SimpleNamespace(train_seq_len=ev.seq_len), official, 0, 1, torch.device("cpu"),
                                         torch.from_numpy(tokens.astype(np.int64)), *luts, stride=ev.stride, batch_seqs=batch)
        seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "val_bpb": bpb, "batch": batch}))


def timed(side: str, args, blob: Path, tokens: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.score", "--child", side, "--artifact", str(blob), "--tokens", str(tokens), "--fineweb", str(args.fineweb)]
    if side == "official":
        cmd += ["--official", str(args.official)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def official_scored(n_targets: int, seq_len: int = 256, stride: int = 64) -> int:
    """How many targets the official window rule scores: each window's last `stride`, every window starting before the end."""
    total = 0
    for ws in range(0, n_targets, stride):
        wlen = min(ws + seq_len, n_targets) - ws
        total += wlen - (0 if ws == 0 else max(wlen - stride, 0))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--official", type=Path, default=os.environ.get("PGOLF_OFFICIAL_TRAIN_GPT"),
                    help="a record's train_gpt.py with eval_val_sliding; without it only our figures are measured")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speed-only", action="store_true", help="skip the val_bpb of every mode")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "score.json")
    ap.add_argument("--child", choices=("ours", "official"), help=argparse.SUPPRESS)
    ap.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    ev = params.section(params.load(REPO / "params.yaml"), "eval", EvalParams)
    tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model", 1024)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards_dir = comparison_data(args.fineweb, tmp)
        blob = tmp / "model.pgolf"
        blob.write_bytes(artifact_blob(shards_dir, tmp))
        val = shards.split_tokens(shards_dir, "val")
        np.save(tmp / "head.npy", val[: SPEED_TARGETS + 1])

        sides = ("ours", "official") if args.official else ("ours",)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
                runs[side].append(timed(side, args, blob, tmp / "head.npy"))
            print(f"run {r + 1}: " + "; ".join(f"{side} {SPEED_TARGETS / runs[side][-1]['seconds']:,.0f} tokens/s" for side in sides), flush=True)
        speed = {"targets": SPEED_TARGETS, "eval": dataclasses.asdict(ev), "repeats": args.repeats}
        for side in sides:
            secs = [x["seconds"] for x in runs[side]]
            speed.update({f"{side}_seconds": [round(x, 2) for x in secs], f"{side}_tokens_per_s": round(SPEED_TARGETS / statistics.median(secs), 1),
                          f"{side}_val_bpb": round(runs[side][-1]["val_bpb"], 6), f"{side}_windows_per_batch": runs[side][-1]["batch"]})
        if args.official:
            ours_s, official_s = [x["seconds"] for x in runs["ours"]], [x["seconds"] for x in runs["official"]]
            speed.update({
                "official_extra_scored_targets": official_scored(SPEED_TARGETS) - SPEED_TARGETS,
                "ours_over_official_median": round(statistics.median(official_s) / statistics.median(ours_s), 3),
                "ours_over_official_pairwise_median": round(statistics.median(o / u for o, u in zip(official_s, ours_s)), 3),
            })
            print(f"median: ours {speed['ours_tokens_per_s']:,.0f} tokens/s, official {speed['official_tokens_per_s']:,.0f} tokens/s: "
                  f"ours at {speed['ours_over_official_median']:.2f}x the official's speed; val_bpb ours {speed['ours_val_bpb']:.4f}, "
                  f"official {speed['official_val_bpb']:.4f} (bf16; it scores {speed['official_extra_scored_targets']} tail targets twice)")

        modes = {}
        if not args.speed_only:
            runtime.keep_freed_memory()
            model = artifact.load_model(blob).eval()
            for stride in (ev.seq_len, 64):
                for isolated in (False, True):
                    mode = dataclasses.replace(ev, stride=stride, doc_isolated=isolated)
                    seconds, bpb, n = ours(model, val, mode, tables, tmp / "modes.parquet")
                    modes[mode.mode] = {"val_bpb": round(bpb, 6), "targets": n, "seconds": round(seconds, 2)}
                    print(f"{mode.mode:>28}: val_bpb {bpb:.4f} over {n:,} targets ({n / seconds:,.0f} tokens/s)")
    save({"machine": {"cores": os.cpu_count(), "torch": torch.__version__}, "speed": speed, "modes_450_docs": modes}, args.out)


if __name__ == "__main__":
    main()
