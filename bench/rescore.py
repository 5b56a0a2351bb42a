"""The causal n-gram cache: tokens/s by order, and an ablation of order x mixing rule on real scores.

python -m bench.rescore [--fineweb DIR] [--repeats 5]

Pass-1 records: bench/score.py's artifact model (the demo shape trained on the shared FineWeb sample)
scored at params.yaml's eval config over all 450 validation documents (504,572 targets). Speed: the
fast path (pgolf.cache.rescore: n-gram counts, Witten–Bell, mixing) at cache.max_order 2..6 with
the other cache params as in params.yaml, single process, median of --repeats runs; beside it the
n-gram probabilities alone computed the straightforward exact sort-based way (np.unique ids and int64
argsorts; checked equal to ours with unbounded tables), and the streaming reference on 2,000 targets.
Ablation: val_bpb with the cache for orders 1..6 x mixing rules, against neural-only.
Saves bench/results/rescore.json.
"""
import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench.common import FINEWEB, REPO, save
from bench.score import artifact_blob, ours
from bench.train import comparison_data
from pgolf import artifact, cache, codes, ngram, params, runtime, shards
from pgolf.bpb import ByteTables, bits_per_byte
from pgolf.cache import CacheParams
from pgolf.score import EvalParams


def straightforward(tokens: np.ndarray, vocab: int, max_order: int) -> np.ndarray:
    """The plain exact sort-based way, for comparison: per order, dense ids by np.unique of (shorter id,
    token) and occurrence counts from a stable argsort of int64 keys. Unbounded tables."""
    n = len(tokens) - 1
    padded = np.concatenate([np.full(max_order - 1, vocab, dtype=np.int64), tokens.astype(np.int64)])
    prob = np.full(n, 1.0 / vocab)

    def occurrences(keys: np.ndarray) -> np.ndarray:
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        start = np.maximum.accumulate(np.where(np.r_[True, sk[1:] != sk[:-1]], np.arange(len(sk)), 0))
        out = np.empty(len(keys), dtype=np.int64)
        out[order] = np.arange(len(sk)) - start
        return out

    ids = np.zeros(n + 1, dtype=np.int64)  # key of length 0 ending at each position
    for k in range(1, max_order + 1):
        _, longer = np.unique(padded[max_order - k : max_order - k + n + 1] * (n + 2) + ids, return_inverse=True)
        c_ctx = occurrences(ids[:n])  # context of target t ends at t - 1
        occ_pair = occurrences(longer[1:])
        first = occ_pair == 0
        # distinct continuations: earlier first occurrences sharing the context
        order = np.argsort(ids[:n], kind="stable")
        f = first[order].astype(np.int64)
        cs = np.cumsum(f) - f
        sk = ids[:n][order]
        start = np.maximum.accumulate(np.where(np.r_[True, sk[1:] != sk[:-1]], np.arange(n), 0))
        types = np.empty(n, dtype=np.int64)
        types[order] = cs - cs[start]
        seen = c_ctx > 0
        prob = np.where(seen, (occ_pair + types * prob) / np.maximum(c_ctx + types, 1), prob)
        ids = longer.astype(np.int64)
    return prob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rescore.json")
    args = ap.parse_args()
    p = params.load(REPO / "params.yaml")
    ev, base = params.section(p, "eval", EvalParams), params.section(p, "cache", CacheParams)
    runtime.keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards_dir = comparison_data(args.fineweb, tmp)
        tokens = shards.split_tokens(shards_dir, "val")
        tables = ByteTables.from_sentencepiece(args.fineweb / "tokenizers" / "fineweb_1024_bpe.model", 1024)
        model = codes.model_from_tensors(*artifact.unpack(artifact_blob(shards_dir, tmp))).eval()
        ours(model, tokens, ev, tables, tmp / "score.parquet")
        rec = pq.read_table(tmp / "score.parquet")
    nll = rec.column("nll").to_numpy().astype(np.float64)
    entropy = rec.column("entropy").to_numpy()
    n_bytes = int(rec.column("bytes").to_numpy().sum())
    model_prob = np.exp(-nll)
    neural = bits_per_byte(nll.sum(), n_bytes)
    n = len(nll)
    print(f"pass 1 ({ev.mode}): {n:,} targets, neural-only val_bpb {neural:.4f}")

    speed = []
    for order in range(2, 7):
        cp = dataclasses.replace(base, max_order=order)
        cache.rescore(tokens, model_prob, entropy, 1024, cp)  # warm-up
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            cache.rescore(tokens, model_prob, entropy, 1024, cp)
            runs.append(time.perf_counter() - t)
        t = time.perf_counter()
        plain = straightforward(tokens, 1024, order)
        plain_s = time.perf_counter() - t
        unbounded = ngram.ngram_probs(tokens, 1024, order, [n] * order)
        assert np.array_equal(plain, unbounded.prob), "the straightforward counts disagree"
        ref_n = 2000
        t = time.perf_counter()
        cache.rescore_reference(tokens[: ref_n + 1], model_prob[:ref_n], entropy[:ref_n], 1024, cp)
        ref_s = time.perf_counter() - t
        speed.append({"max_order": order, "seconds": [round(s, 4) for s in runs], "tokens_per_s": round(n / statistics.median(runs)),
                      "straightforward_ngram_tokens_per_s": round(n / plain_s), "reference_tokens_per_s": round(ref_n / ref_s)})
        print(f"orders 1..{order}: {n / statistics.median(runs):,.0f} tokens/s (median of {args.repeats}); n-gram counts alone the "
              f"straightforward sort-based way {n / plain_s:,.0f} tokens/s; streaming reference {ref_n / ref_s:,.0f} tokens/s")

    ablation = []
    print(f"{'max_order':>9} {'mix':>7} {'val_bpb':>8} {'gain':>8} {'state bytes':>12}")
    for order in range(1, 7):
        for mix in ("fixed", "online"):
            cp = dataclasses.replace(base, max_order=order, mix=mix)
            out = cache.rescore(tokens, model_prob, entropy, 1024, cp)
            bpb = bits_per_byte(out.nll.sum(), n_bytes)
            ablation.append({"max_order": order, "mix": mix, "val_bpb": round(bpb, 6), "gain": round(neural - bpb, 6), "state_bytes": out.state_bytes})
            print(f"{order:>9} {mix:>7} {bpb:>8.4f} {neural - bpb:>+8.4f} {out.state_bytes:>12,}")
    save({"machine": {"cores": os.cpu_count()}, "targets": n, "eval": ev.mode, "cache": dataclasses.asdict(base),
          "val_bpb_neural": round(neural, 6), "speed": speed, "ablation": ablation}, args.out)


if __name__ == "__main__":
    main()
