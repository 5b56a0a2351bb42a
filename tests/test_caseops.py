"""CaseOps (pgolf/caseops.py): the records' transform, its inverse, the byte sidecar, and the data rules it needs."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pgolf import caseops, shards, tokenizer
from pgolf.bpb import ByteTables, position_bytes
from pgolf.caseops import ALLCAPS, CAPNEXT, ESC, TITLE
from conftest import read_jsonl_texts, run_stage, run_stages, tiny_params, write_jsonl

# Outputs of the records' encode_lossless_caps_v2 (the caseops_v1 alias), PR #1855's lossless_caps.py.
VECTORS = {
    "The NASA Launch": f"{TITLE}the {ALLCAPS}nasa {TITLE}launch",
    "McDonald": f"{TITLE}mc{CAPNEXT}donald",
    "iPhone": f"i{CAPNEXT}phone",
    "A": f"{TITLE}a",
    f"x{TITLE}y": f"x{ESC}{TITLE}y",
    "ABC123def": f"{ALLCAPS}abc123def",
    "hello WORLD, Hi.": f"hello {ALLCAPS}world, {TITLE}hi.",
    f"eBay{ESC}": f"e{CAPNEXT}bay{ESC}{ESC}",
    "XYz aBC": f"{TITLE}x{CAPNEXT}yz a{CAPNEXT}b{CAPNEXT}c",
}
ALPHABET = list("aAbBzZ 1-é") + list(caseops.OPERATORS)


def random_strings(n: int, seed: int = 0, longest: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(ALPHABET, rng.integers(0, longest + 1))) for _ in range(n)]


def test_the_records_vectors_and_their_inverse():
    for text, transformed in VECTORS.items():
        assert caseops.encode(text) == transformed
        assert caseops.decode(transformed) == text


def test_decode_inverts_encode_on_every_string(fineweb):
    texts = read_jsonl_texts(fineweb / "val_head_docs.jsonl") + read_jsonl_texts(fineweb / "extra_docs.jsonl") + random_strings(20000)
    assert all(caseops.decode(caseops.encode(t)) == t for t in texts)


@pytest.mark.parametrize("bad", [TITLE, f"a{TITLE}b", f"{TITLE}{ALLCAPS}a", f"{CAPNEXT}{CAPNEXT}a", f"{TITLE} a", ESC, f"{ALLCAPS}1"])
def test_text_no_original_encodes_to_is_refused(bad):
    with pytest.raises(caseops.CaseOpsError):
        caseops.decode(bad)


def records_lossless_caps():
    root = os.environ.get("PGOLF_RECORDS")
    path = Path(root or "") / "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611" / "lossless_caps.py"
    if not root or not path.is_file():
        pytest.skip("the records' own code is not here: set PGOLF_RECORDS to a checkout of openai/parameter-golf's "
                    "records/track_10min_16mb (no data test: the code is not shared data)")
    spec = importlib.util.spec_from_file_location("lossless_caps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agrees_with_the_records_code(fineweb):
    rec = records_lossless_caps()
    texts = read_jsonl_texts(fineweb / "val_head_docs.jsonl") + random_strings(50000, seed=1)
    assert all(caseops.encode(t) == rec.encode_lossless_caps_v2(t) for t in texts)
    for t in random_strings(50000, seed=2, longest=8):  # any text: the same original, or both refuse it
        try:
            theirs = rec.decode_lossless_caps_v2(t)
        except rec.LosslessCapsError:
            theirs = None
        try:
            ours = caseops.decode(t)
        except caseops.CaseOpsError:
            ours = None
        assert ours == theirs, repr(t)


@pytest.fixture(scope="session")
def caseops_model(fineweb: Path) -> Path:
    return fineweb / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def test_token_bytes_are_the_original_text_bytes(fineweb, caseops_model):
    sp = tokenizer.load(caseops_model)
    ops, tables = caseops.operator_ids(sp, str(caseops_model)), ByteTables.from_sentencepiece(sp)
    assert ops.tolist() == [4, 5, 6, 7]  # the records' reserved layout
    texts = read_jsonl_texts(fineweb / "val_head_docs.jsonl") + [f"a{ESC}b {TITLE}X {ESC}{ESC}{ESC} Hello{CAPNEXT}"]
    for text in texts:
        ids = np.array([sp.bos_id(), *sp.encode(caseops.encode(text))])
        counts = caseops.position_bytes(ids, tables, ops)
        assert counts.sum() == len(text.encode("utf-8"))
        assert np.all(counts[np.isin(ids, ops)] <= 3) and counts[0] == 0
    plain = position_bytes(ids, tables)
    assert plain.sum() > counts.sum()  # the tables alone count every operator's 3 bytes


def test_a_tokenizer_without_the_operators_is_refused(sp1024):
    with pytest.raises(Exception, match="U\\+E001, U\\+E002, U\\+E003, U\\+E004"):
        caseops.operator_ids(tokenizer.load(sp1024), str(sp1024))


def test_a_trained_caseops_tokenizer_reserves_the_operators(tmp_path, fineweb):
    texts = [caseops.encode(t) for t in read_jsonl_texts(fineweb / "extra_docs.jsonl")]
    sp = tokenizer.train_bpe(texts, 512, tmp_path / "t.model", caseops.OPERATORS)
    assert caseops.operator_ids(sp, "t.model").tolist() == [4, 5, 6, 7]


def caseops_params(fineweb: Path, caseops_model: Path, root: Path, val_docs: int = 30, docs: int = 80) -> dict:
    texts = read_jsonl_texts(fineweb / "val_head_docs.jsonl")[:docs]
    p = tiny_params()
    p["data"].update(source="docs", docs=str(write_jsonl(root / "docs.jsonl", texts)), val_docs=val_docs, shard_tokens=4096, workers=1)
    p["tokenizer"].update(model=str(caseops_model), transform="caseops")
    p["model"]["vocab_size"] = 8192
    return p


def test_tokenize_writes_the_byte_sidecar_beside_the_val_shards(tmp_path, fineweb, caseops_model):
    root = tmp_path / "run"
    root.mkdir()
    p = caseops_params(fineweb, caseops_model, tmp_path)
    run_stages(root, p, "tokenize")
    folder = root / "data/shards"
    vals, sides = shards.list_shards(folder, "val"), shards.list_shards(folder, shards.SIDECAR)
    assert len(vals) == len(sides) > 1  # several shards: the edges must line up
    texts = read_jsonl_texts(fineweb / "val_head_docs.jsonl")[:30]
    sidecar = shards.read_sidecar(folder)
    assert int(sidecar.sum()) == sum(len(t.encode("utf-8")) for t in texts)
    m = json.loads((root / "metrics/tokenize.json").read_text())
    assert m["val_bytes"] == int(sidecar.sum())
    tokens = shards.split_tokens(folder, "val")
    sp = tokenizer.load(caseops_model)
    starts = np.flatnonzero(tokens == sp.bos_id())
    assert [caseops.decode(sp.decode(tokens[a + 1 : b].tolist())) for a, b in zip(starts, np.append(starts[1:], len(tokens)))] == texts

    # The same shards imported: accepted; then each kind of bad sidecar is refused, nothing replaced.
    src = tmp_path / "src"
    src.mkdir()
    for path in [*vals, *sides, *shards.list_shards(folder, "train")]:
        (src / path.name).write_bytes(path.read_bytes())
    p["data"].update(source="shards", shards=str(src), val_docs=None)
    run_stages(root, p, "tokenize")
    before = (root / "data/docs.parquet").read_bytes()

    def refused(match: str) -> None:
        result = run_stage("tokenize", root, p)
        assert result.returncode == 2 and match in result.stderr and result.stderr.count("error:") == 1, result.stderr
        assert (root / "data/docs.parquet").read_bytes() == before

    good = shards.read_tokens(sides[0]).copy()
    shards.write_shard(src / sides[0].name, good[:-1])
    refused("byte counts for the")
    bumped = good.copy()
    bumped[5] += 1
    shards.write_shard(src / sides[0].name, bumped)
    refused("the byte sidecar gives validation document 0")
    for path in sides:
        (src / path.name).unlink()
    refused("no validation byte sidecar")
    p["tokenizer"]["model"] = str(fineweb / "tokenizers" / "fineweb_1024_bpe.model")
    refused("has no piece for the operator(s)")


def test_the_report_holds_caseops_bytes_to_the_decoded_text_and_catches_the_2127_leak(tmp_path, fineweb, caseops_model):
    root = tmp_path / "run"
    root.mkdir()
    # The CaseOps preparation script's default: fewer validation documents than the challenge scores, the rest
    # of them in training (here 12 of 20; the challenge: 10,000 of 50,000).
    p = caseops_params(fineweb, caseops_model, tmp_path, val_docs=12, docs=60)
    p["quant"].update(calib_seqs=4, seq_len=32)
    p["eval"].update(seq_len=32, stride=32)
    p["verify"].update(positions=8, audit_tokens=2000)
    run_stages(root, p, "tokenize", "train", "calibrate", "pack", "score", "adapt", "rescore", "report")
    rules = json.loads((root / "reports/details/report.json").read_text())["rules"]
    assert all(rules[k]["passed"] for k in ("bytes_are_utf8", "transform_inverts", "val_starts_with_bos", "val_not_in_train")), rules
    score = json.loads((root / "metrics/score.json").read_text())
    assert score["bytes"] == sum(len(t.encode("utf-8")) for t in read_jsonl_texts(fineweb / "val_head_docs.jsonl")[:12])
    p["verify"]["val_docs"] = 20
    result = run_stage("report", root, p)
    assert result.returncode == 2 and "val_not_in_train" in result.stderr
    rule = json.loads((root / "reports/details/report.json").read_text())["rules"]["val_not_in_train"]
    assert rule["figure"] == 8 and "first 8 training documents are validation documents" in rule["detail"]
