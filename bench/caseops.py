"""CaseOps against plain text: the comparison model trained both ways, and encoding speed with and without it.

python -m bench.caseops [--fineweb DIR] [--steps 300] [--repeats 3]

Two 1024-piece BPE tokenizers trained by pgolf with the challenge's settings on the 200 extra_docs, one on
plain text and one on CaseOps text (its four operators reserved at ids 4..7); each exports the shards of
bench/train.py's set-up (validation: the 450 val_head documents; training: extra_docs) and trains the
comparison model (4 x 128, seed 1337, the same steps). val_bpb on every validation document (windows
of 256 from the split's start; nearly the same text both ways), both on the original text's bytes, the
CaseOps run's through its byte sidecar. Encoding: tokenize's export of all 650 documents on one worker
with the records' 8192-piece CaseOps tokenizer, on the transformed text (transform, encode, sidecar) and
on the plain text, alternated, median of --repeats. Saves bench/results/caseops.json.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import FINEWEB, REPO, save
from bench.train import comparison_params
from pgolf import caseops, shards, tokenizer, trainer
from pgolf.bpb import ByteTables, val_position_bytes
from pgolf.dataset import export_docs
from pgolf.documents import DocFile, DocReader
from pgolf.runtime import CPU
from pgolf.validation import evaluate, validation_tokens

RECORDS_MODEL = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def export(fineweb: Path, model: Path, out: Path, transform: str) -> float:
    """Tokenize's export of the set-up's documents; seconds."""
    files = [DocFile(fineweb / "val_head_docs.jsonl", "jsonl"), DocFile(fineweb / "extra_docs.jsonl", "jsonl")]
    t = time.perf_counter()
    export_docs(DocReader(files), model, out / "shards", out / "docs.parquet", 450, 10**8, workers=1, transform=transform)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fineweb", type=Path, default=FINEWEB)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "caseops.json")
    args = ap.parse_args()
    texts = [t for t in DocReader([DocFile(args.fineweb / "extra_docs.jsonl", "jsonl")])]
    total_bytes = sum(f.stat().st_size for f in (args.fineweb / "val_head_docs.jsonl", args.fineweb / "extra_docs.jsonl"))
    result = {"steps": args.steps, "runs": [], "encode": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seconds = {"none": [], "caseops": []}
        for r in range(args.repeats):
            for transform in ("caseops", "none"):
                seconds[transform].append(export(args.fineweb, args.fineweb / "tokenizers" / RECORDS_MODEL, tmp / f"e{r}{transform}", transform))
        for transform, s in seconds.items():
            result["encode"][transform] = {"seconds": [round(x, 3) for x in s], "median_s": round(statistics.median(s), 3),
                                           "mb_per_s": round(total_bytes / 1e6 / statistics.median(s), 2)}
            print(f"encode ({transform}): median {statistics.median(s):.2f} s, {total_bytes / 1e6 / statistics.median(s):.2f} MB/s")
        for transform in ("none", "caseops"):
            model_file = tmp / f"{transform}.model"
            trained = map(caseops.encode, texts) if transform == "caseops" else texts
            sp = tokenizer.train_bpe(trained, 1024, model_file, caseops.OPERATORS if transform == "caseops" else ())
            out = tmp / f"data_{transform}"
            export(args.fineweb, model_file, out, transform)
            model_p, train_p = comparison_params(args.steps)
            model = trainer.build(model_p, 1337, CPU.device)
            run = trainer.train(model, train_p, CPU, out / "shards", tmp / f"run_{transform}", 1337)
            val = validation_tokens(out / "shards", 256)
            full = shards.split_tokens(out / "shards", "val")
            nbytes = val_position_bytes(out / "shards", full, ByteTables.from_sentencepiece(sp))[: len(val)]
            val_loss, val_bpb = evaluate(model, val, 256, 64, nbytes, CPU)
            row = {"transform": transform, "val_bpb": round(val_bpb, 4), "val_loss": round(val_loss, 4), "train_loss": round(run.train_loss, 4),
                   "val_tokens": len(val) - 1, "val_bytes": int(nbytes[1:].sum()), "val_split_tokens": len(full) - 1,
                   "bytes_per_token": round(int(nbytes[1:].sum()) / (len(val) - 1), 4)}
            result["runs"].append(row)
            print(f"{transform}: val_bpb {val_bpb:.4f} on {len(val) - 1:,} of {len(full) - 1:,} targets ({row['val_bytes']:,} bytes, "
                  f"{row['bytes_per_token']} per token)")
    save(result, args.out)


if __name__ == "__main__":
    main()
