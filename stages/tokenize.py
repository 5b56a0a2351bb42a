"""Stage 1: documents (or existing challenge shards) -> shards, tokenizer, document index, manifest.

python -m stages.tokenize   (reads params.yaml: data, tokenizer)
"""
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pgolf import builtin_corpus, caseops, documents, params, shards, tokenizer
from pgolf.dataset import DataParams, export_docs, import_shards
from pgolf.doc_index import read_hashes
from pgolf.errors import InputError
from pgolf.files import sha256_file, staged, write_json
from pgolf.layout import DATA, DOC_INDEX, MANIFEST, METRICS, SHARDS, TOKENIZER
from pgolf.tokenizer import TokenizerParams
from pgolf.stage import run_stage


def from_shards(data: DataParams, tok: TokenizerParams, model: Path, shards_dir: Path, index: Path) -> tuple[dict, dict]:
    splits = import_shards(Path(data.shards), model, shards_dir, index, tok.transform)
    if data.val_docs is not None and data.val_docs != splits["val"]["docs"]:
        raise InputError(
            f"params.yaml: data.val_docs is {data.val_docs} but {data.shards} holds "
            f"{splits['val']['docs']} validation documents (set it to null or to that count)"
        )
    return splits, {"kind": "shards", "folder": data.shards}


def from_docs(data: DataParams, tok: TokenizerParams, model: Path, shards_dir: Path, index: Path) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory(dir=DATA) as scratch:
        if data.source == "builtin":
            corpus = Path(scratch) / "builtin.jsonl"
            source = {"kind": "builtin", "builtin": builtin_corpus.write_jsonl(corpus)}
            files = [documents.DocFile(corpus, "jsonl")]
        else:
            files = documents.resolve(data.docs, Path(data.download_dir))
            source = {"kind": "docs", "files": [str(f.path) for f in files]}
        reader = documents.DocReader(files)
        if tok.model is None:
            skip = 0 if tok.train_on_val else data.val_docs  # never the validation documents unless asked
            texts = itertools.islice(reader, skip, None if tok.train_docs is None else skip + tok.train_docs)
            caseops_on = tok.transform == "caseops"
            t = time.time()
            tokenizer.train_bpe(map(caseops.encode, texts) if caseops_on else texts, tok.vocab_size, model, caseops.OPERATORS if caseops_on else ())
            print(f"tokenizer: trained a {tok.vocab_size}-token BPE model{' on CaseOps text' if caseops_on else ''} in {time.time() - t:.1f}s")
        return export_docs(reader, model, shards_dir, index, data.val_docs, data.shard_tokens, data.workers, tok.transform), source


def main() -> None:
    p = params.load()
    data = params.section(p, "data", DataParams)
    tok = params.section(p, "tokenizer", TokenizerParams)
    t0 = time.time()
    # Every output replaces the last good one together, or none does.
    with staged(SHARDS, TOKENIZER, DOC_INDEX, MANIFEST, METRICS / "tokenize.json") as (shards_dir, model, index, manifest_path, metrics_json):
        if tok.model is not None:
            sp = tokenizer.load(tok.model)  # refuse a bad model before any work
            if tok.transform == "caseops":
                caseops.operator_ids(sp, tok.model)
            shutil.copyfile(tok.model, model)
        elif data.source == "shards":
            raise InputError("params.yaml: data.source is 'shards': set tokenizer.model to the tokenizer that made them")
        if data.source == "shards":
            splits, source = from_shards(data, tok, Path(tok.model), shards_dir, index)  # the user's file: messages name it
        else:
            splits, source = from_docs(data, tok, model, shards_dir, index)
        overlap = int(np.isin(read_hashes(index, "val"), read_hashes(index, "train")).sum())
        manifest = {
            "source": source,
            "format": {"magic": shards.MAGIC, "version": shards.VERSION, "shard_tokens": data.shard_tokens, "bos_first": True, "eos": False,
                       "transform": tok.transform, "byte_sidecar": bool(shards.list_shards(shards_dir, shards.SIDECAR))},
            "tokenizer": {
                "path": str(TOKENIZER),
                "origin": tok.model or "trained",
                "vocab_size": tokenizer.load(model).vocab_size(),
                "sha256": sha256_file(model),
            },
            "splits": splits,
            "doc_index": str(DOC_INDEX),
            "val_docs_in_train": overlap,
        }
        write_json(manifest_path, manifest)
        seconds = time.time() - t0
        val, train = splits["val"], splits["train"]
        write_json(metrics_json, {
            "train_docs": train["docs"],
            "val_docs": val["docs"],
            "train_tokens": train["tokens"],
            "val_tokens": val["tokens"],
            "val_bytes": val["bytes"],
            "train_bytes": train["bytes"],
            "vocab_size": manifest["tokenizer"]["vocab_size"],
            "val_docs_in_train": overlap,
            "seconds": round(seconds, 2),
        })
    if not train["docs"]:
        print("warning: the training split is empty; the train stage will need training documents")
    if overlap:
        print(f"warning: {overlap} validation documents also appear in training (by token hash); the report will fail")
    print(
        f"tokenize: {val['docs']:,} val docs ({val['tokens']:,} tokens, {val['bytes']:,} bytes), "
        f"{train['docs']:,} train docs ({train['tokens']:,} tokens) in {seconds:.1f}s"
    )


if __name__ == "__main__":
    run_stage(main, "tokenize")
