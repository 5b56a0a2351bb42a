"""The tokenize stage end to end, on the real FineWeb sample and on bad input."""
import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from pgolf import shards
from pgolf.tokenizer import train_bpe
from conftest import default_params, read_jsonl_texts, run_stage, write_jsonl


def docs_params(docs, model=None, val_docs=450, **data):
    p = default_params()
    p["data"].update(source="docs", docs=docs, val_docs=val_docs, **data)
    p["tokenizer"]["model"] = None if model is None else str(model)
    return p


def shards_params(folder, model, val_docs=None):
    p = default_params()
    p["data"].update(source="shards", shards=str(folder), val_docs=val_docs)
    p["tokenizer"]["model"] = str(model)
    return p


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def failed(result, *fragments):
    """Exit 2 with one clear message (no traceback) that contains each fragment."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert ".tmp-" not in result.stderr and "INTERNAL" not in result.stderr  # the user's paths, pgolf's words
    for f in fragments:
        assert f in last, last
    return last


def metrics(cwd):
    return json.loads((cwd / "metrics" / "tokenize.json").read_text())


@pytest.fixture(scope="module")
def official(tmp_path_factory, fineweb, sp1024):
    """The stage run on the 450 official validation documents with the official tokenizer."""
    cwd = tmp_path_factory.mktemp("official")
    ok(run_stage("tokenize", cwd, docs_params(str(fineweb / "val_head_docs.jsonl"), sp1024)))
    return cwd


def test_validation_shard_is_the_official_one_byte_for_byte(official, fineweb):
    assert (official / "data/shards/fineweb_val_000000.bin").read_bytes() == (fineweb / "val_head_sp1024.bin").read_bytes()
    assert [p.name for p in (official / "data/shards").iterdir()] == ["fineweb_val_000000.bin"]
    m = metrics(official)
    assert (m["val_docs"], m["val_tokens"], m["val_bytes"], m["train_docs"]) == (450, 504_573, 1_209_539, 0)


def test_manifest_and_document_index_agree_with_the_shards(official, fineweb):
    manifest = json.loads((official / "data/manifest.json").read_text())
    (shard,) = manifest["splits"]["val"]["shards"]
    assert shard["tokens"] == 504_573
    index = pq.read_table(official / "data/docs.parquet")
    assert index.num_rows == 450
    assert sum(index.column("bytes").to_pylist()) == 1_209_539
    assert sum(index.column("tokens").to_pylist()) == 504_573
    assert manifest["tokenizer"]["vocab_size"] == 1024 and manifest["tokenizer"]["origin"].endswith("fineweb_1024_bpe.model")


def test_shards_source_loads_the_official_shards_unchanged(official, tmp_path, fineweb, sp1024):
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(fineweb / "val_head_sp1024.bin", folder / "fineweb_val_000000.bin")
    run = ok(run_stage("tokenize", tmp_path, shards_params(folder, sp1024)))
    got = tmp_path / "data/shards/fineweb_val_000000.bin"
    assert got.read_bytes() == (fineweb / "val_head_sp1024.bin").read_bytes()
    m = metrics(tmp_path)
    assert (m["val_docs"], m["val_tokens"], m["val_bytes"]) == (450, 504_573, 1_209_539)
    (shard,) = json.loads((tmp_path / "data/manifest.json").read_text())["splits"]["val"]["shards"]
    assert shard["sha256"] == hashlib.sha256(got.read_bytes()).hexdigest()
    # Both paths describe the same documents identically.
    assert pq.read_table(tmp_path / "data/docs.parquet").equals(pq.read_table(official / "data/docs.parquet")), run.stderr


def test_shards_source_follows_documents_across_shards(tmp_path, fineweb, sp1024):
    """Shards cut mid-document (as the official exporter does) give the same index as one shard."""
    tokens = shards.read_tokens(fineweb / "val_head_sp1024.bin")
    folder = tmp_path / "export"
    folder.mkdir()
    for i, start in enumerate(range(0, len(tokens), 100_000)):
        shards.write_shard(folder / shards.shard_name("val", i), tokens[start : start + 100_000])
    extra = spm.SentencePieceProcessor(model_file=str(sp1024))
    train = [[1] + extra.encode(t) for t in read_jsonl_texts(fineweb / "extra_docs.jsonl")]
    flat = np.array([t for d in train for t in d], dtype=np.uint16)
    shards.write_shard(folder / "fineweb_train_000000.bin", flat[:200_000])
    shards.write_shard(folder / "fineweb_train_000001.bin", flat[200_000:])
    ok(run_stage("tokenize", tmp_path, shards_params(folder, sp1024, val_docs=450)))
    m = metrics(tmp_path)
    assert (m["val_docs"], m["val_bytes"], m["train_docs"], m["train_tokens"]) == (450, 1_209_539, 200, len(flat))
    index = pq.read_table(tmp_path / "data/docs.parquet")
    tokens_per_doc = [r["tokens"] for r in index.to_pylist() if r["split"] == "train"]
    assert tokens_per_doc == [len(d) for d in train]
    assert m["val_docs_in_train"] == 0


def test_trained_tokenizer_never_sees_validation_unless_asked(tmp_path, fineweb):
    texts = read_jsonl_texts(fineweb / "extra_docs.jsonl")
    marker = "zqxvwj"
    val = [f"{marker} " * 200 for _ in range(20)]
    docs = write_jsonl(tmp_path / "d.jsonl", val + [t[:3000] for t in texts])
    for on_val in (False, True):
        cwd = tmp_path / f"on_val_{on_val}"
        cwd.mkdir()
        p = docs_params(str(docs), val_docs=20)
        p["tokenizer"].update(vocab_size=512, train_on_val=on_val)
        ok(run_stage("tokenize", cwd, p))
        sp = spm.SentencePieceProcessor(model_file=str(cwd / "data/tokenizer.model"))
        pieces = {sp.id_to_piece(i) for i in range(sp.vocab_size())}
        assert any(marker in piece for piece in pieces) == on_val
        assert sp.vocab_size() == 512 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.eos_id() == 2 and sp.unk_id() == 3


@pytest.fixture
def official_shard_folder(tmp_path, fineweb):
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(fineweb / "val_head_sp1024.bin", folder / "fineweb_val_000000.bin")
    return folder


def _corrupt(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda p: _corrupt(p, 0, np.int32(7).tobytes()), "magic 7"),
        (lambda p: _corrupt(p, 4, np.int32(3).tobytes()), "shard version 3"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "header says 504573 tokens"),
        (lambda p: _corrupt(p, 1024 + 2 * 10, np.uint16(4000).tobytes()), "token id 4000 is outside the vocabulary"),
    ],
)
def test_bad_shards_stop_the_stage(tmp_path, official_shard_folder, sp1024, mutate, fragment):
    shard = official_shard_folder / "fineweb_val_000000.bin"
    mutate(shard)
    failed(run_stage("tokenize", tmp_path, shards_params(official_shard_folder, sp1024)), str(shard), fragment)
    assert not (tmp_path / "data" / "shards").exists()
    assert not [p for p in (tmp_path / "data").iterdir()]


def test_tokenizer_that_did_not_make_the_shards(tmp_path, official_shard_folder, fineweb):
    other = tmp_path / "other.model"
    train_bpe(read_jsonl_texts(fineweb / "extra_docs.jsonl"), 2048, other)
    last = failed(run_stage("tokenize", tmp_path, shards_params(official_shard_folder, other)), "fineweb_val_000000.bin")
    assert "made with another tokenizer" in last and str(other) in last  # the user's tokenizer, not the stage's temporary copy


def test_training_a_tokenizer_on_bad_or_no_documents_says_so_in_one_line(tmp_path, fineweb):
    good = write_jsonl(tmp_path / "good.jsonl", read_jsonl_texts(fineweb / "extra_docs.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.read_bytes() + b'{"text": "caf\xe9"}\n')
    failed(run_stage("tokenize", tmp_path, docs_params(str(bad), val_docs=50)), f"{bad}:201", "not valid UTF-8")
    failed(run_stage("tokenize", tmp_path, docs_params(str(good), val_docs=500)), "data.val_docs", "no documents left to train the tokenizer")
    assert not (tmp_path / "data").exists() or not [p for p in (tmp_path / "data").iterdir()]


def test_shards_source_needs_a_tokenizer_and_the_right_val_count(tmp_path, official_shard_folder, sp1024):
    p = shards_params(official_shard_folder, sp1024)
    p["tokenizer"]["model"] = None
    failed(run_stage("tokenize", tmp_path, p), "tokenizer.model")
    failed(run_stage("tokenize", tmp_path, shards_params(official_shard_folder, sp1024, val_docs=50)), "data.val_docs is 50", "450")
    failed(run_stage("tokenize", tmp_path, shards_params(tmp_path / "nowhere", sp1024)), "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    failed(run_stage("tokenize", tmp_path, shards_params(empty, sp1024)), "empty", "no validation shards")


def test_bad_documents_stop_the_stage_and_keep_the_previous_outputs(tmp_path, fineweb, sp1024):
    texts = read_jsonl_texts(fineweb / "extra_docs.jsonl")
    good = write_jsonl(tmp_path / "good.jsonl", texts)
    ok(run_stage("tokenize", tmp_path, docs_params(str(good), sp1024, val_docs=50)))
    before = {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.read_bytes() + b'{"text": "caf\xe9"}\n')
    failed(run_stage("tokenize", tmp_path, docs_params(str(bad), sp1024, val_docs=50)), f"{bad}:201", "not valid UTF-8")
    after = {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()}
    assert after == before  # nothing lost, nothing half-written, no temporaries
    failed(run_stage("tokenize", tmp_path, docs_params(str(good), sp1024, val_docs=500)), "data.val_docs is 500", "200")
    failed(run_stage("tokenize", tmp_path, docs_params(str(tmp_path / "none.jsonl"), sp1024)), "none.jsonl")
    p = docs_params(str(good), sp1024)
    p["data"]["colour"] = "blue"
    failed(run_stage("tokenize", tmp_path, p), "data.colour")
    p = docs_params(str(good), tmp_path / "missing.model")
    failed(run_stage("tokenize", tmp_path, p), "missing.model")


def test_oversized_vocabulary_is_refused(monkeypatch, sp1024):
    from pgolf import tokenizer
    from pgolf.errors import InputError

    monkeypatch.setattr(tokenizer, "MAX_VOCAB", 1000)
    with pytest.raises(InputError, match="fineweb_1024_bpe.model: vocabulary of 1,024 tokens"):
        tokenizer.load(sp1024)


def test_trained_tokenizer_bytes_depend_only_on_the_texts(tmp_path, fineweb):
    texts = [t[:3000] for t in read_jsonl_texts(fineweb / "extra_docs.jsonl")]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        train_bpe(texts, 512, tmp_path / name / "tok.model")
    assert (tmp_path / "a/tok.model").read_bytes() == (tmp_path / "b/tok.model").read_bytes()
