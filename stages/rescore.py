"""Stage 6: pass-1 (or adapted) records + val shards -> the causal n-gram cache's records and BPB.

python -m stages.rescore    (reads params.yaml: cache; cache.input says whose records: score or adapt)
One pass over the validation stream: each target's probability is fixed before its token is counted.
"""
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pgolf import cache, params, shards
from pgolf.bpb import bits_per_byte
from pgolf.errors import InputError
from pgolf.files import check_finite, staged, write_json
from pgolf.layout import ADAPTED, DETAILS, METRICS, RESCORES, SCORES, SHARDS
from pgolf.cache import CacheParams
from pgolf.stage import run_stage

SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("prob", pa.float64()),  # the mixture's probability of the target
        ("nll", pa.float64()),  # -ln prob, nats
        ("lam", pa.float64()),  # the cache's weight λ
        ("ngram_prob", pa.float64()),  # the n-gram model's probability of the target
        ("order", pa.int8()),  # highest n-gram order whose context had been seen (0: none)
    ]
)


def main() -> None:
    cp = params.section(params.load(), "cache", CacheParams)
    source = SCORES if cp.input == "score" else ADAPTED
    if not source.is_file():
        raise InputError(f"{source}: no neural records (run the {cp.input} stage)")
    rec = pq.read_table(source, columns=["position", "target", "nll", "entropy", "bytes"])
    vocab = int((rec.schema.metadata or {}).get(b"vocab_size", 0))
    tokens = shards.split_tokens(SHARDS, "val")
    position = rec.column("position").to_numpy()
    if len(position) != len(tokens) - 1 or not np.array_equal(position, np.arange(1, len(tokens))):
        raise InputError(f"{source}: records do not cover targets 1..{len(tokens) - 1} of {SHARDS} once each, in order")
    if not np.array_equal(rec.column("target").to_numpy(), tokens[1:]) or vocab <= int(tokens.max()):
        raise InputError(f"{source}: the records' targets or vocab_size do not match the validation shards in {SHARDS}")
    nll = rec.column("nll").to_numpy().astype(np.float64)
    check_finite(source, position, nll=nll, entropy=rec.column("entropy").to_numpy())
    n_bytes = int(rec.column("bytes").to_numpy().sum(dtype=np.int64))
    t = time.perf_counter()
    out = cache.rescore(tokens, np.exp(-nll), rec.column("entropy").to_numpy(), vocab, cp)
    seconds = time.perf_counter() - t
    neural, mixed = bits_per_byte(nll.sum(), n_bytes), bits_per_byte(out.nll.sum(), n_bytes)
    headline = {
        "val_bpb": round(mixed, 6),
        "val_bpb_neural": round(neural, 6),
        "gain": round(neural - mixed, 6),
        "val_loss": round(float(out.nll.mean()), 6),
        "state_bytes": out.state_bytes,
        "max_state_bytes": cp.max_state_bytes,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(len(nll) / seconds, 1),
        "tokens": len(nll),
        "input": cp.input,
        "mix": cp.mix,
        "max_order": cp.max_order,
        "mean_lam": round(float(out.lam.mean()), 6),
    }
    with staged(RESCORES, METRICS / "rescore.json", DETAILS / "rescore.json") as (path, rescore_json, details_json):
        check_finite(path, position, prob=out.prob, nll=out.nll)
        columns = [position, out.prob, out.nll, out.lam, out.ngram_prob, out.order]
        pq.write_table(pa.Table.from_arrays(columns, schema=SCHEMA), path, compression="zstd", row_group_size=1 << 20)
        write_json(rescore_json, headline)
        write_json(details_json, {"tokens_by_order": np.bincount(out.order, minlength=cp.max_order + 1).tolist()})
    print(
        f"rescore: val_bpb {mixed:.4f} (neural {neural:.4f}, gain {neural - mixed:+.4f}), {cp.mix} mix, orders 1..{cp.max_order}, "
        f"state {out.state_bytes:,} bytes, {len(nll) / seconds:,.0f} tokens/s -> {RESCORES}"
    )


if __name__ == "__main__":
    run_stage(main, "rescore")
