"""Score-first test-time training and the token tilt on the comparison model, each with and without the cache.

python -m bench.ttt [--fineweb DIR]

The model is bench/train.py's comparison model (seed 1337, 300 steps; trained first when runs/bench/ does
not hold it), float weights. Validation: the 450 shared FineWeb documents (sp1024), windows of 256 with
stride 64 (the demo's eval). chunk_sgd at params.yaml's ttt settings and three variants; the token tilt
(order 3, threshold 2, boost 1) on pass 1 and on chunk_sgd; the cache at params.yaml's cache settings on
each method's records. Seconds are wall time on this machine, the
cache's on top of the method's. Saves bench/results/ttt.json.
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
from pgolf import cache, params, shards, ttt, windows
from pgolf.bpb import ByteTables, bits_per_byte
from pgolf.cache import CacheParams
from pgolf.runtime import CPU
from pgolf.score import score_stream
from pgolf.tilt import Tilt
from pgolf.ttt import TTTParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ttt.json")
    args = ap.parse_args()
    p = params.load(REPO / "params.yaml")
    base_tp = dataclasses.replace(params.section(p, "ttt", TTTParams), method="chunk_sgd")
    cp = params.section(p, "cache", CacheParams)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = comparison_data(args.fineweb, Path(tmp))
        model = comparison_model(shards_dir, Path(tmp))
        tokens = shards.split_tokens(shards_dir, "val")
    tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model")
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

    measure("pass 1", score_stream(model, tokens, plan, 256, CPU), None)
    t = time.perf_counter()
    tilted = Tilt.for_stream(tokens, 3, 2, 1.0)
    print(f"tilt hints for {len(tokens) - 1:,} targets in {time.perf_counter() - t:.1f}s")
    measure("pass 1 + tilt (order 3, threshold 2, boost 1)", score_stream(model, tokens, plan, 256, CPU, tilted), None)
    variants = [("chunk_sgd (params.yaml)", base_tp, None), ("chunk_sgd lr 0.005", dataclasses.replace(base_tp, lr=0.005), None),
                ("chunk_sgd 1 epoch", dataclasses.replace(base_tp, epochs=1), None), ("chunk_sgd last 2 blocks", dataclasses.replace(base_tp, blocks=2), None),
                ("chunk_sgd (params.yaml) + tilt", base_tp, tilted)]
    for name, tp, tl in variants:
        m = copy.deepcopy(model)
        measure(name, ttt.chunk_sgd(m, tokens, plan, 256, 256, tp, torch.device("cpu"), tilt=tl), tp)
    base = rows[0]
    for r in rows:
        r["gain"] = round(base["val_bpb"] - r["val_bpb"], 5)
    save({"targets": len(tokens) - 1, "bytes": nbytes, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
