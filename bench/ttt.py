"""Score-first test-time training and the token tilt on the comparison model, each with and without the cache.

python -m bench.ttt [--fineweb DIR] [--only NAME ...]

The model is bench/train.py's comparison model (seed 1337, 300 steps; trained first when runs/bench/ does
not hold it), float weights. Validation: the 450 shared FineWeb documents (sp1024), windows of 256 with
stride 64 (the demo's eval). Every method at params.yaml's ttt settings, with variants; doc_lora at
learning rate 0 is the control for its windows (each document alone, chunks of 48 read with up to 256
inputs of their own document), so its gain over that row is what the adapters learn. The token tilt
(order 3, threshold 2, boost 1) on pass 1 and on the methods; the cache at params.yaml's cache settings
on each method's records. Seconds are wall time on this machine, the cache's on top of the method's.
Saves bench/results/ttt.json.
"""
import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import FINEWEB, REPO, save
from bench.train import comparison_data, comparison_model
from pgolf import cache, params, shards, tokenizer, ttt, windows
from pgolf.bpb import ByteTables, bits_per_byte
from pgolf.cache import CacheParams
from pgolf.runtime import CPU
from pgolf.score import EvalParams, score_stream
from pgolf.ttt import TTTParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ttt.json")
    ap.add_argument("--only", nargs="*", default=[], help="run only the methods whose name contains one of these")
    args = ap.parse_args()
    p = params.load(REPO / "params.yaml")
    base_tp = dataclasses.replace(params.section(p, "ttt", TTTParams), method="chunk_sgd")
    cp = params.section(p, "cache", CacheParams)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = comparison_data(args.fineweb, Path(tmp))
        model = comparison_model(shards_dir, Path(tmp))
        tokens = shards.split_tokens(shards_dir, "val")
    sp = tokenizer.load(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model")
    tables = ByteTables.from_sentencepiece(sp)
    plan = windows.plan(tokens, 256, 64)
    nbytes = int(tables.target_bytes(tokens[:-1], tokens[1:]).sum())
    print(f"{len(tokens) - 1:,} targets, {nbytes:,} bytes, {len(plan):,} windows")

    def measure(name: str, scores, tp: TTTParams | None) -> None:
        t = time.perf_counter()
        out = np.concatenate([s for _, _, s in scores], axis=1)
        seconds = time.perf_counter() - t
        bpb = bits_per_byte(float(out[0].astype(np.float64).sum()), nbytes)
        t = time.perf_counter()
        mixed = cache.rescore(tokens, np.exp(-out[0].astype(np.float64)), out[1], model.p.vocab_size, cp)
        cache_s = time.perf_counter() - t
        row = {"method": name, "val_bpb": round(bpb, 5), "seconds": round(seconds, 1), "val_bpb_cache": round(bits_per_byte(float(mixed.nll.sum()), nbytes), 5),
               "cache_seconds": round(cache_s, 2), "ttt": dataclasses.asdict(tp) if tp else None}
        rows.append(row)
        print(f"{name:<40} val_bpb {row['val_bpb']:.4f} ({seconds:6.1f}s)  with the cache {row['val_bpb_cache']:.4f} (+{cache_s:.2f}s)", flush=True)

    ev = EvalParams(seq_len=256, stride=64, batch=256, doc_isolated=False)
    tilted = dataclasses.replace(ev, tilt_order=3, tilt_threshold=2, tilt_boost=1.0)
    measure("pass 1", score_stream(model, tokens, plan, 256, CPU), None)
    measure("pass 1 + tilt (order 3, threshold 2, boost 1)", score_stream(model, tokens, plan, 256, CPU, tilted.tilt(tokens)), None)
    lora = dataclasses.replace(params.section(p, "ttt", TTTParams), method="doc_lora")
    variants = [("chunk_sgd (params.yaml)", base_tp, ev), ("chunk_sgd lr 0.005", dataclasses.replace(base_tp, lr=0.005), ev),
                ("doc_lora lr 0 (its windows alone)", dataclasses.replace(lora, lora_lr=0.0), ev),
                ("doc_lora (params.yaml)", lora, ev), ("doc_lora lr 0.003", dataclasses.replace(lora, lora_lr=0.003), ev),
                ("doc_lora chunk 48", dataclasses.replace(lora, lora_chunk=48), ev),
                ("doc_lora chunk 48, lr 1e-4 (#1855's)", dataclasses.replace(lora, lora_chunk=48, lora_lr=1e-4), ev),
                ("phased (params.yaml, 3 phases over the first 300 documents)", dataclasses.replace(lora, method="phased", phase_docs=300), ev),
                ("chunk_sgd (params.yaml) + tilt", base_tp, tilted), ("doc_lora (params.yaml) + tilt", lora, tilted)]
    for name, tp, e in variants:
        if args.only and not any(o in name for o in args.only):
            continue
        measure(name, ttt.adapt(copy.deepcopy(model), tokens, e, tp, sp.bos_id(), torch.device("cpu"))[1], tp)
    base = rows[0]
    for r in rows:
        r["gain"] = round(base["val_bpb"] - r["val_bpb"], 5)
    save({"targets": len(tokens) - 1, "bytes": nbytes, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
