"""Tokenize throughput: 1 process vs one per core, on the shared FineWeb documents.

python -m bench.tokenization [--fineweb DIR] [--copies 4] [--repeats 3]

Runs the whole exporter (read JSON lines, encode, write shards and the document index) with the
official sp1024 tokenizer, alternating the two settings so that both see the same machine noise,
and reports medians. Saves bench/results/tokenize.json.
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import FINEWEB, REPO, save
from pgolf.dataset import export_docs
from pgolf.documents import DocFile, DocReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--copies", type=int, default=16, help="repeat the 650 documents to lengthen the run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tokenize.json")
    args = ap.parse_args()

    model = args.fineweb / "tokenizers" / "fineweb_1024_bpe.model"
    raw = b"".join((args.fineweb / name).read_bytes() for name in ("val_head_docs.jsonl", "extra_docs.jsonl"))
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs.jsonl"
        src.write_bytes(raw * args.copies)
        docs = raw.count(b"\n") * args.copies
        text_mb = sum(len(json.loads(line)["text"].encode()) for line in src.open("rb")) / 1e6
        times: dict[int, list[float]] = {1: [], cores: []}
        for r in range(-1, args.repeats):  # run -1 warms the page cache and imports, and is not kept
            for workers in times:
                out = Path(tmp) / f"out_{workers}_{r}"
                t = time.perf_counter()
                export_docs(DocReader([DocFile(src, "jsonl")]), model, out, Path(tmp) / f"i_{workers}_{r}.parquet", 450, 10**8, workers)
                if r >= 0:
                    times[workers].append(time.perf_counter() - t)

    results = {
        "machine": {"cores": cores, "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "input": {"docs": docs, "text_mb": round(text_mb, 3), "copies": args.copies},
        "runs": {},
    }
    for workers, ts in times.items():
        med = statistics.median(ts)
        results["runs"][f"workers_{workers}"] = {
            "workers": workers,
            "seconds": [round(t, 3) for t in ts],
            "median_s": round(med, 3),
            "docs_per_s": round(docs / med, 1),
            "mb_per_s": round(text_mb / med, 3),
        }
    one, many = results["runs"]["workers_1"], results["runs"][f"workers_{cores}"]
    results["speedup"] = round(one["median_s"] / many["median_s"], 3)
    # Each pair ran back to back, so its ratio shares the machine's mood of the moment.
    results["speedup_pairwise_median"] = round(statistics.median(a / b for a, b in zip(times[1], times[cores])), 3)
    for key, run in results["runs"].items():
        print(f"{key:>10}: {run['docs_per_s']:8.1f} docs/s  {run['mb_per_s']:6.2f} MB/s  (median of {run['seconds']})")
    print(f"speedup {cores} workers vs 1: {results['speedup']:.2f}x (median of pairwise ratios {results['speedup_pairwise_median']:.2f}x)")
    save(results, args.out)


if __name__ == "__main__":
    main()
