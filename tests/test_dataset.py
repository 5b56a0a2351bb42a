"""The fast exporter (worker processes, streaming shards) against the plain reference."""
import tracemalloc

import numpy as np
import pytest
import sentencepiece as spm

from pgolf import shards
from pgolf.dataset import export_docs, export_reference
from pgolf.documents import DocFile, DocReader
from pgolf.encode import batched, encode_batches
from conftest import read_jsonl_texts, write_jsonl


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("workers, val_docs, shard_tokens", [(2, 300, 50_000), (1, 17, 7_919), (2, 649, 10**8)])
def test_fast_export_equals_reference_byte_for_byte(tmp_path, fineweb, sp1024, workers, val_docs, shard_tokens):
    files = [DocFile(fineweb / "val_head_docs.jsonl", "jsonl"), DocFile(fineweb / "extra_docs.jsonl", "jsonl")]
    texts = [t for f in files for t in read_jsonl_texts(f.path)]
    fast, ref = tmp_path / "fast", tmp_path / "ref"
    ref.mkdir()
    splits = export_docs(DocReader(files), sp1024, fast, tmp_path / "docs.parquet", val_docs, shard_tokens, workers)
    export_reference(texts, spm.SentencePieceProcessor(model_file=str(sp1024)), ref, val_docs, shard_tokens)
    assert shard_bytes(fast) == shard_bytes(ref)
    assert splits["val"]["docs"] == val_docs and splits["train"]["docs"] == len(texts) - val_docs
    for split in shards.SPLITS:
        assert [s["name"] for s in splits[split]["shards"]] == [p.name for p in shards.list_shards(fast, split)]


def test_encoding_is_the_same_for_any_worker_count_and_batching(sp1024, fineweb):
    texts = read_jsonl_texts(fineweb / "extra_docs.jsonl")
    runs = [list(encode_batches(sp1024, batched(texts, max_docs=m), workers=w)) for w, m in ((1, 512), (2, 7), (3, 1))]
    joined = [
        tuple(np.concatenate([getattr(e, f) for e in run]).tobytes() for f in ("tokens", "lengths", "nbytes", "hashes"))
        for run in runs
    ]
    assert joined[0] == joined[1] == joined[2]


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, fineweb, sp1024):
    texts = read_jsonl_texts(fineweb / "extra_docs.jsonl")

    def peak(copies: int) -> int:
        src = write_jsonl(tmp_path / f"docs{copies}.jsonl", texts * copies)
        out = tmp_path / f"out{copies}"
        tracemalloc.start()
        export_docs(DocReader([DocFile(src, "jsonl")]), sp1024, out, tmp_path / f"i{copies}.parquet", 10, 50_000, 1)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1), peak(6)
    assert large < 1.3 * small, (small, large)
