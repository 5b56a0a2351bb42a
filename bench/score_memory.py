"""Memory of pass-1 scoring over a long run of small batches: it must stay flat.

python -m bench.score_memory [--artifact artifacts/model.pgolf] [--targets 20000]

Scores the first --targets validation targets of data/shards with the artifact's model at stride 1 and
8 windows per batch (thousands of tiny batches, the worst case for the records' buffering), writing
the records as the score stage does, and samples the process's resident memory as it goes. Run it
after `dvc repro`. Saves bench/results/score_memory.json.
"""
import argparse
import tempfile
import time
from pathlib import Path


from bench.common import REPO, save
from pgolf import artifact, runtime, shards, windows
from pgolf.bpb import ByteTables, position_bytes
from pgolf.runtime import CPU
from pgolf.layout import SHARDS, TOKENIZER
from pgolf.score import write_records


def rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


class Sampler:
    """A progress hook that records (targets scored, seconds, resident MB) every `every` targets."""

    def __init__(self, every: int):
        self.every, self.count, self.start, self.samples = every, 0, time.perf_counter(), []

    def update(self, n: int) -> None:
        before, self.count = self.count, self.count + n
        if before // self.every != self.count // self.every:
            self.samples.append([self.count, round(time.perf_counter() - self.start, 1), round(rss_mb(), 1)])
            print(f"{self.count:,} targets, {self.samples[-1][1]}s: {self.samples[-1][2]:,.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "model.pgolf")
    ap.add_argument("--targets", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "score_memory.json")
    args = ap.parse_args()
    runtime.keep_freed_memory()  # as the score stage does on CPU
    model = artifact.load_model(args.artifact).eval()
    tokens = shards.split_tokens(REPO / SHARDS, "val")[: args.targets + 1]
    tables = ByteTables.from_sentencepiece(REPO / TOKENIZER, model.p.vocab_size)
    plan = windows.plan(tokens, 256, 1)
    sampler = Sampler(args.targets // 10)
    start = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        write_records(model, tokens, plan, 8, position_bytes(tokens, tables), 1, CPU, Path(tmp) / "r.parquet", sampler)
    first, last = sampler.samples[0], sampler.samples[-1]
    growth = (last[2] - first[2]) / max(last[1] - first[1], 1e-9)
    print(f"resident memory {start:,.0f} MB at start, {first[2]:,.0f} -> {last[2]:,.0f} MB from {first[0]:,} to {last[0]:,} targets: {growth:+.1f} MB/s")
    save({"targets": args.targets, "seq_len": 256, "stride": 1, "batch": 8, "start_mb": round(start, 1),
          "samples": sampler.samples, "growth_mb_per_s": round(growth, 2)}, args.out)


if __name__ == "__main__":
    main()
