"""The default pipeline input: the built-in corpus, tokenized with a freshly trained tokenizer."""
import json

import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from pgolf import builtin_corpus, shards
from pgolf.bpb import ByteTables
from conftest import default_params, run_stage


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("builtin")
    result = run_stage("tokenize", cwd, default_params())
    assert result.returncode == 0, result.stderr
    return cwd


def test_default_run_outputs_agree(default_run):
    m = json.loads((default_run / "metrics/tokenize.json").read_text())
    manifest = json.loads((default_run / "data/manifest.json").read_text())
    assert m["val_docs"] == default_params()["data"]["val_docs"]
    assert m["train_tokens"] > 1_000_000 and m["val_docs_in_train"] == 0
    sp = spm.SentencePieceProcessor(model_file=str(default_run / "data/tokenizer.model"))
    assert sp.vocab_size() == 1024 and manifest["tokenizer"]["origin"] == "trained"
    val = shards.read_tokens(default_run / "data/shards/fineweb_val_000000.bin")
    assert len(val) == m["val_tokens"] and ByteTables.from_sentencepiece(sp).stream_bytes(val) == m["val_bytes"]
    index = pq.read_table(default_run / "data/docs.parquet").to_pylist()
    assert sum(r["bytes"] for r in index if r["split"] == "val") == m["val_bytes"]
    assert manifest["source"]["builtin"]["unique_documents"] == m["val_docs"] + m["train_docs"]


def test_corpus_is_deterministic_english_of_a_few_megabytes(default_run, tmp_path):
    recorded = json.loads((default_run / "data/manifest.json").read_text())["source"]["builtin"]
    again = builtin_corpus.write_jsonl(tmp_path / "again.jsonl")
    assert again["sha256"] == recorded["sha256"]
    text = "".join(json.loads(line)["text"] for line in (tmp_path / "again.jsonl").open())
    assert len(text.encode("utf-8")) > 3_000_000
    letters = sum(c.isascii() and (c.isalpha() or c == " ") for c in text)
    assert letters / len(text) > 0.75
    assert text.count(" the ") > 10_000
