"""CaseOps (pgolf/caseops.py): the records' transform, its inverse, the byte sidecar, and the data rules it needs."""
import importlib.util
import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgolf import caseops, rules, shards, tokenizer
from pgolf.audit import Rule
from pgolf.bpb import ByteTables, position_bytes
from pgolf.caseops import ALLCAPS, CAPNEXT, ESC, TITLE
from pgolf.doc_records import hash_text
from pgolf.encode import encode_batch
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
    assert set(pq.read_table(root / "data/docs.parquet", columns=["norm_hash", "normalised"]).to_pydict()["norm_hash"]) == {None}  # no texts

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
    p["verify"].update(positions=8)
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


# SentencePiece's nmt_nfkc normalises after the transform. Originals whose transform NFKC changes, each with
# what the tokens decode to (the transform, normalised) and the original as the tokenizer normalises it.
NORMALISED = {
    "Apple™": (f"{TITLE}appleTM", "AppleTM"),  # unmarked capitals: no transform writes them
    "𝕏 ＩＰＨＯＮＥ Ⅻ": ("X IPHONE XII", "X IPHONE XII"),
    "ｃAB": (f"c{ALLCAPS}ab", "cAB"),  # a letter before the operator
    "ºTitle": (f"o{TITLE}title", "oTitle"),  # the one such document among the shared FineWeb ones
    "E\u0301cole": (f"{TITLE}école", "École"),  # the lowered capital composed with its accent
    "A\u0301NGEL iE\u0301": (f"{TITLE}á{ALLCAPS}ngel i{CAPNEXT}é", "ÁNGEL iÉ"),
    "AE\u0301": (f"{ALLCAPS}aé", "AÉ"),  # an ALLCAPS word of two letters, the second composed
}


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def strict_original(text: str) -> str | None:
    try:
        original = caseops.decode(text)
    except caseops.CaseOpsError:
        return None
    return original if caseops.encode(original) == text else None


def counted(decoded: str) -> int:
    """The bytes caseops.position_bytes gives decoded text: an operator 0, one an ESC makes literal its own."""
    n, escaped = 0, False
    for ch in decoded:
        if escaped or ch not in caseops.OPERATORS:
            n, escaped = n + len(ch.encode("utf-8")), False
        elif ch == ESC:
            escaped = True
    return n


def test_normalised_caseops_text_inverts_to_the_normalised_original():
    for original, (decoded, normalised) in NORMALISED.items():
        assert nfkc(caseops.encode(original)) == decoded and nfkc(original) == normalised
        assert strict_original(decoded) is None  # no CaseOps text: the inverse the report had refused it
        assert caseops.decode(decoded, normalised=True) == normalised
    # Where NFKC merges two originals no inverse can tell them apart: the literal reading wins.
    assert nfkc(caseops.encode("ABｃ")) == caseops.encode("ABC") and nfkc(caseops.encode("CAFE\u0301")) == caseops.encode("CAFé")


# Originals normalisation merges with another (an ALLCAPS word that NFKC extends with letters or whose last letter
# composes with an accent): the only ones whose inverse is not their normalised original.
MERGED = re.compile("[A-Z]{2}(?:[™𝕏ＣⅫ]*ｃ|[™𝕏ＣⅫ]+[a-z]|[AZ]\u0301)")


def test_every_normalised_transform_inverts_with_the_bytes_it_counts():
    rng = np.random.default_rng(3)
    alphabet = list("aAbBzZ 1-é\u0301™𝕏Ｃｃ") + ["Ⅻ", *caseops.OPERATORS]
    for _ in range(20000):
        original = "".join(rng.choice(alphabet, rng.integers(0, 10)))
        decoded = nfkc(caseops.encode(original))
        inverse = caseops.decode(decoded, normalised=True)
        assert len(inverse.encode("utf-8")) == counted(decoded), (original, decoded)
        assert nfkc(inverse) == nfkc(original) or MERGED.search(original), (original, decoded, inverse)


def test_the_report_inverts_what_a_trained_tokenizer_normalised(tmp_path, fineweb):
    """transform_inverts and bytes_are_utf8 on the validation documents of a CaseOps tokenizer tokenize trains: its
    nmt_nfkc turns ™, 𝕏, fullwidth letters and Ⅻ into unmarked capitals and composes a lowered capital with its accent."""
    raw = [*NORMALISED, "Twitter is now 𝕏; Apple™ sells the ＩＰＨＯＮＥ.\n\nChapter Ⅻ:  É\u0301", "plain text"]
    sp = tokenizer.train_bpe(map(caseops.encode, read_jsonl_texts(fineweb / "extra_docs.jsonl") + raw), 512, tmp_path / "t.model", caseops.OPERATORS)
    ops = caseops.operator_ids(sp, "t.model")
    (tmp_path / "shards").mkdir()

    def check(docs: list[str], recorded: bool = True) -> dict[str, Rule]:
        enc = encode_batch(sp, ByteTables.from_sentencepiece(sp), docs, ops)  # what tokenize writes, sidecar bytes per document
        columns = {"split": ["val"] * len(docs), "hash": pa.array(enc.hashes, pa.uint64())}
        if recorded:  # tokenize read the documents as text (data.source docs or builtin); not: imported shards
            columns.update(norm_hash=pa.array(enc.norm_hashes, pa.uint64()), normalised=pa.array(enc.normalised))
        pq.write_table(pa.table(columns), tmp_path / "docs.parquet")
        n = len(enc.tokens) - 1
        r = rules.Records(enc.tokens, sp.bos_id(), np.ones(n), np.ones(n, np.float32), np.ones(n, np.int32), np.full(n, 0.5))
        got = rules.data_rules(tmp_path / "docs.parquet", {"calibration": {"split": "train", "first_tokens": 0}}, tmp_path / "shards", r,
                               sp.decode, "caseops", enc.nbytes, 0, caseops.normalizer(sp))
        return {x.name: x for x in got}

    got = check(raw, recorded=False)
    inverts, utf8 = got["transform_inverts"], got["bytes_are_utf8"]
    assert inverts.passed and f"{len(raw) - 1} carry the tokenizer's normalisation" in inverts.detail, inverts.detail
    assert "recorded no originals" in inverts.detail
    counted, decoded = re.search(r"in all: ([\d,]+) counted, ([\d,]+) decoded", utf8.detail).groups()
    assert utf8.passed and counted == decoded, utf8.detail  # every document compared: the totals agree with the verdict
    got = check(raw)["transform_inverts"]
    assert got.passed and f"changed {len(raw) - 1} of the originals" in got.detail, got.detail
    # An original that normalisation merges with another: only the original tells, and then the rule fails.
    assert check(raw + ["ABｃ"], recorded=False)["transform_inverts"].passed
    got = check(raw + ["ABｃ"])["transform_inverts"]
    assert not got.passed and got.figure == 1


def test_tokenize_records_the_normalised_originals_the_report_inverts_to(tmp_path, fineweb):
    """tokenize with a CaseOps tokenizer it trains, on documents its nmt_nfkc changes: the index records each one's
    normalised original by hash, and transform_inverts holds the decoded validation documents to those hashes."""
    root = tmp_path / "run"
    root.mkdir()
    raw = ["Apple™ and 𝕏", "ＩＰＨＯＮＥ Ⅻ", "E\u0301cole", "plain text, Title Case", *NORMALISED]
    p = tiny_params()
    docs = write_jsonl(tmp_path / "docs.jsonl", raw + read_jsonl_texts(fineweb / "extra_docs.jsonl")[:60])
    p["data"].update(source="docs", docs=str(docs), val_docs=len(raw), shard_tokens=1 << 16, workers=1)
    p["tokenizer"].update(model=None, vocab_size=512, train_on_val=True, transform="caseops")
    run_stages(root, p, "tokenize")
    index = pq.read_table(root / "data/docs.parquet").to_pydict()
    sp = tokenizer.load(root / "data/tokenizer.model")
    norm = caseops.normalizer(sp)
    val = [i for i, s in enumerate(index["split"]) if s == "val"]
    assert [index["norm_hash"][i] for i in val] == [hash_text(norm(t)) for t in raw]
    assert [index["normalised"][i] for i in val] == [norm(t) != t for t in raw]
    assert all(index["normalised"][i] for i in val[:3]) and all(h is not None for h in index["norm_hash"])

    tokens = shards.split_tokens(root / "data/shards", "val")
    n = len(tokens) - 1
    r = rules.Records(tokens, sp.bos_id(), np.ones(n), np.ones(n, np.float32), np.ones(n, np.int32), np.full(n, 0.5))
    doc_bytes = np.array(index["bytes"], dtype=np.int64)[val]

    def inverts(path: Path) -> Rule:
        got = rules.data_rules(path, {"calibration": {"split": "train", "first_tokens": 0}}, root / "data/shards", r, sp.decode,
                               "caseops", doc_bytes, 0, norm)
        return {x.name: x for x in got}["transform_inverts"]

    got = inverts(root / "data/docs.parquet")
    assert got.passed and f"({len(raw):,} originals recorded by tokenize)" in got.detail, got.detail
    table = pq.read_table(root / "data/docs.parquet")
    altered = table.column("norm_hash").to_pylist()
    altered[val[2]] ^= 1
    pq.write_table(table.set_column(table.schema.get_field_index("norm_hash"), "norm_hash", pa.array(altered, pa.uint64())), tmp_path / "bad.parquet")
    got = inverts(tmp_path / "bad.parquet")
    assert not got.passed and got.figure == 1, got.detail
