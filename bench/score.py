"""Pass-1 scoring: tokens/s side by side with the official sliding evaluator, and val_bpb by mode.

python bench/score.py [--fineweb DIR] [--official train_gpt.py] [--repeats 3]

Model: bench/train.py's comparison model (demo shape 4 x 128, seed 1337, 300 steps on the shared
FineWeb sample; trained first if runs/bench/ lacks it), calibrated with params.yaml's quant
defaults, packed, and loaded back through the artifact loader, as the score stage does.

Speed: our scorer at params.yaml's eval config on the first 262,144 validation targets, records
written to parquet included, alternating with the official evaluator on the same tokens and model:
eval_val_sliding from a record's train_gpt.py (e.g. records/track_10min_16mb/
2026-03-19_SlidingWindowEval/train_gpt.py of openai/parameter-golf), at seq 256, stride 64, 256
windows per batch, given our model's logits as its forward. Medians of --repeats runs each. Both run
with freed memory kept mapped, as the score stage does on CPU (--plain-allocator: glibc's defaults).

val_bpb: all 450 validation documents, non-overlapping, sliding-64, and both doc-isolated.
Saves bench/results/score.json.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # bench/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import FINEWEB, save  # noqa: E402
from bench.train import CACHE, comparison_data, comparison_params  # noqa: E402
from pgolf import allocator, artifact, checkpoint, params, quantize, shards, trainer, windows  # noqa: E402
from pgolf.bpb import ByteTables  # noqa: E402
from pgolf.distributed import Dist  # noqa: E402
from pgolf.loader import TokenStream  # noqa: E402
from pgolf.params import EvalParams, QuantParams  # noqa: E402
from pgolf.score import write_records  # noqa: E402

SPEED_TARGETS = 262_144


def artifact_model(shards_dir: Path, tmp: Path) -> torch.nn.Module:
    """The comparison model as the pipeline would submit it: GPTQ at the quant defaults, packed, loaded back."""
    cached = CACHE / "model_1337_300.safetensors"
    d = Dist(0, 1, torch.device("cpu"))
    if cached.is_file():
        model, _ = checkpoint.load_model(cached)
    else:
        model_p, train_p = comparison_params(300)
        model = trainer.build(model_p, 1337, d.device)
        trainer.train(model, train_p, d, shards_dir, tmp / "run")
        checkpoint.save_model(cached, model)
    q = params.section(params.load(REPO / "params.yaml"), "quant", QuantParams)
    calib = TokenStream(shards.list_shards(shards_dir, "train")).take(q.calib_seqs * q.seq_len + 1)
    hessians = quantize.collect_hessians(model, calib[:-1].reshape(q.calib_seqs, -1), calib[1:].reshape(q.calib_seqs, -1))
    tensors, meta = quantize.quantize_model(model, hessians, q)
    blob, _ = artifact.pack_quantized(tensors, meta)
    return artifact.model_from_tensors(*artifact.unpack(blob))


def ours(model, tokens: np.ndarray, ev: EvalParams, tables: ByteTables, out: Path) -> tuple[float, float, int]:
    """(seconds, val_bpb, targets scored) of the score stage's path on `tokens`."""
    t = time.perf_counter()
    plan = windows.plan(tokens, ev.seq_len, ev.stride, ev.doc_isolated, bos_id=1)
    totals = write_records(model, tokens, plan, ev.batch, tables, 1, Dist(0, 1, torch.device("cpu")), out)
    return time.perf_counter() - t, totals.val_bpb, totals.tokens


def load_official(path: Path):
    spec = importlib.util.spec_from_file_location("official_train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.eval_val_sliding


class OfficialView(torch.nn.Module):
    """Our model under the interface the official evaluator calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


def official(evaluate, model, tokens: np.ndarray, tables: ByteTables) -> tuple[float, float]:
    """(seconds, val_bpb) of the official sliding evaluator at seq 256 / stride 64 / 256 windows per batch."""
    luts = (torch.from_numpy(tables.base_bytes), torch.from_numpy(tables.leading_space), torch.from_numpy(tables.boundary))
    t = time.perf_counter()
    _, bpb = evaluate(SimpleNamespace(train_seq_len=256), OfficialView(model), 0, 1, torch.device("cpu"),
                      torch.from_numpy(tokens.astype(np.int64)), *luts, stride=64, batch_seqs=256)
    return time.perf_counter() - t, bpb


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
                    help="a train_gpt.py with eval_val_sliding; without it only our figures are measured")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain-allocator", action="store_true", help="leave glibc's defaults (the stage keeps freed memory mapped)")
    ap.add_argument("--speed-only", action="store_true", help="skip the val_bpb of every mode")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "score.json")
    args = ap.parse_args()
    ev = params.section(params.load(REPO / "params.yaml"), "eval", EvalParams)
    tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model", 1024)
    if not args.plain_allocator:
        allocator.keep_freed_memory()  # as the score stage does on CPU; the official evaluator runs under it too
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards_dir = comparison_data(args.fineweb, tmp)
        model = artifact_model(shards_dir, tmp).eval()
        val = np.concatenate([shards.read_tokens(p) for p in shards.list_shards(shards_dir, "val")])
        head = val[: SPEED_TARGETS + 1]

        evaluate = load_official(args.official) if args.official else None
        runs = {"ours": [], "official": []}
        for r in range(args.repeats):
            seconds, bpb_ours, n = ours(model, head, ev, tables, tmp / "speed.parquet")
            runs["ours"].append(seconds)
            print(f"run {r + 1}: ours {n / seconds:,.0f} tokens/s ({seconds:.1f}s)", end="", flush=True)
            if evaluate:
                seconds, bpb_official = official(evaluate, model, head, tables)
                runs["official"].append(seconds)
                print(f"; official {SPEED_TARGETS / seconds:,.0f} tokens/s ({seconds:.1f}s)", end="")
            print()
        speed = {
            "targets": SPEED_TARGETS, "eval": dataclasses.asdict(ev), "repeats": args.repeats,
            "ours_seconds": [round(s, 2) for s in runs["ours"]],
            "ours_tokens_per_s": round(SPEED_TARGETS / statistics.median(runs["ours"]), 1),
            "ours_val_bpb": round(bpb_ours, 6),
        }
        if evaluate:
            extra = official_scored(SPEED_TARGETS) - SPEED_TARGETS
            speed.update({
                "official_seconds": [round(s, 2) for s in runs["official"]],
                "official_tokens_per_s": round(SPEED_TARGETS / statistics.median(runs["official"]), 1),
                "official_val_bpb": round(bpb_official, 6),
                "official_extra_scored_targets": extra,
                "speedup_median": round(statistics.median(runs["official"]) / statistics.median(runs["ours"]), 3),
                "speedup_pairwise_median": round(statistics.median(o / u for o, u in zip(runs["official"], runs["ours"])), 3),
            })
            print(f"median: ours {speed['ours_tokens_per_s']:,.0f} tokens/s, official {speed['official_tokens_per_s']:,.0f} tokens/s, "
                  f"speed-up {speed['speedup_median']:.2f}x; val_bpb ours {bpb_ours:.4f}, official {bpb_official:.4f} "
                  f"(it scores {extra} tail targets twice)")

        modes = {}
        for stride in () if args.speed_only else (ev.seq_len, 64):
            for isolated in (False, True):
                mode = dataclasses.replace(ev, stride=stride, doc_isolated=isolated)
                seconds, bpb, n = ours(model, val, mode, tables, tmp / "modes.parquet")
                modes[mode.mode] = {"val_bpb": round(bpb, 6), "targets": n, "seconds": round(seconds, 2)}
                print(f"{mode.mode:>28}: val_bpb {bpb:.4f} over {n:,} targets ({n / seconds:,.0f} tokens/s)")
    save({"machine": {"cores": os.cpu_count(), "torch": torch.__version__}, "allocator": "glibc defaults" if args.plain_allocator else "keep freed memory", "speed": speed, "modes_450_docs": modes}, args.out)


if __name__ == "__main__":
    main()
