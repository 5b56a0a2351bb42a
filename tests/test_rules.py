"""The report's rule assembly and text, without running the stage."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pgolf import report, rules, shards
from pgolf.audit import Rule, VerifyParams
from pgolf.doc_records import hash_doc

VP = VerifyParams(positions=8, byte_limit=100, max_state_bytes=10, max_overhead=1.5, strict=True)


def records(tokens: np.ndarray) -> rules.Records:
    n = len(tokens) - 1
    return rules.Records(tokens, 1, np.ones(n), np.ones(n, np.float32), np.ones(n, np.int32), np.full(n, 0.5))


def test_audited_positions_cover_document_0_and_a_seeded_sample_of_the_whole_stream():
    tokens = np.array([1, 5, 6, 7, 1] + [9] * 995, dtype=np.uint16)
    positions = rules.audited(records(tokens), VP)
    assert set(range(1, 5)) <= set(positions) and len(positions) <= 4 + 8
    assert np.array_equal(positions, rules.audited(records(tokens), VP))  # the same sample every time
    # Drawn across all of validation, not a prefix: over many seeds' worth of streams the sample reaches the end.
    assert positions.max() > 500 and rules.blackbox_positions(records(tokens), []).max() == 999


def test_checked_batches_are_spread_over_the_stream_with_both_ends():
    assert np.array_equal(rules.checked_batches(9, 16), np.arange(9))  # fewer batches than spans: every one
    chosen = rules.checked_batches(1000, 16)
    assert chosen[0] == 0 and chosen[-1] == 999 and len(chosen) <= 18
    # One in each sixteenth: any stretch of two sixteenths of the batches holds a checked one.
    assert np.diff(chosen).max() < 2 * 1000 / 16


def test_budget_rules_hold_each_figure_to_its_limit():
    got = rules.budget_rules(100, 11, 1.0, 650.0, 900.0, VP)
    assert [r.passed for r in got] == [True, False, True, True, True]  # no time budgets set: the seconds are reported, not held
    assert [r.copied for r in got] == [False, False, True, True, True]  # the stages' seconds: not the report's to certify
    budgeted = dataclasses.replace(VP, max_train_seconds=600.0, max_eval_seconds=600.0)
    over, within = rules.budget_rules(100, 1, 1.0, 600.5, 600.5, budgeted), rules.budget_rules(100, 1, 1.0, 599.5, 599.5, budgeted)
    for k, name in ((3, "training_budget"), (4, "eval_budget")):
        assert over[k].name == name and not over[k].passed and within[k].passed and over[k].limit == 600.0


def test_data_rules_catch_validation_in_training_and_calibration(tmp_path):
    val_doc, train_doc = np.array([1, 5, 6], np.uint16), np.array([1, 7, 8, 9], np.uint16)
    index = pa.table({"split": ["val", "train", "train"], "hash": pa.array([hash_doc(val_doc), hash_doc(train_doc), hash_doc(val_doc)], pa.uint64())})
    pq.write_table(index, tmp_path / "docs.parquet")
    (tmp_path / "shards").mkdir()
    shards.write_shard(tmp_path / "shards/fineweb_train_000000.bin", np.concatenate([val_doc, train_doc, [1]]))
    tokens = np.concatenate([val_doc, [1]]).astype(np.uint16)
    meta = {"calibration": {"split": "train", "first_tokens": 8}}
    def check(val_docs: int = 0, doc_bytes: int = 2):
        return rules.data_rules(tmp_path / "docs.parquet", meta, tmp_path / "shards", records(tokens), lambda ids: "ab", "none",
                                np.array([doc_bytes]), val_docs)

    got = check()
    assert [r.name for r in got] == ["val_not_in_train", "val_not_in_calibration", "bytes_are_utf8", "val_starts_with_bos"]
    assert [r.passed for r in got] == [False, False, True, True] and got[0].figure == 1
    assert check(val_docs=3)[0].figure == 1 + 2  # #2127: two more validation documents stood where training starts
    assert not check(doc_bytes=3)[2].passed
    meta["calibration"]["split"] = "val"
    assert "not train" in check()[1].detail
    tokens = tokens[1:]  # an export that wrote no BOS
    assert not check()[3].passed


def test_headline_and_markdown_carry_every_rule():
    s = report.Scored("sliding-64", "none", "score", 2.0, 2.0, 1.7)
    checked = [Rule("a", True, 0.0, 1.0, "fine"), Rule("b", False, 2.0, 1.0, "broken"), Rule("c", True, 5.0, 9.0, "seconds", copied=True)]
    h = report.headline(2.1, 2.2, s, 900, 100, 5, 10, 30, checked)
    assert h["artifact_bytes"] == 1000 and h["rules_passed"] == 1 and not h["passed"] and round(h["quant_penalty"], 6) == 0.1
    assert h["rules"] == 2 and h["rules_copied"] == h["copied_within"] == 1 and h["cache_gain"] == 0.3  # a copied figure certifies nothing
    assert "1/2 rules pass; 1/1 on copied seconds within limits" in report.summary(h) and "adapted" not in report.summary(h)
    s = report.Scored("sliding-64", "doc_lora", "adapt", 2.0, 1.9, 1.7)
    h2 = report.headline(2.1, 2.2, s, 900, 100, 5, 10, 30, checked)
    assert "sliding-64, 1.9000 adapted (doc_lora), 1.7000 with the cache" in report.summary(h2) and h2["cache_gain"] == 0.2
    assert h2["adapt_gain"] == 0.1
    p = {"eval": {"seq_len": 8}, "cache": {"mix": "online", "max_order": 3}}
    text = report.markdown(h, checked, {"report": 1.0}, p, ["x.svg"])
    assert "| c | pass (copied) | seconds |" in text
    assert "| a | pass | fine |" in text and "| b | **FAIL** | broken |" in text and "![x](plots/x.svg)" in text


def test_metrics_match_fails_a_hand_edited_or_missing_figure():
    own = report.Scored("sliding-64", "doc_lora", "score", 2.0312345, 1.9371, 1.7165).claims()
    honest = {k: round(v, 6) for k, v in own.items()}
    assert rules.metrics_match(honest, own).passed
    for key, value in (("score.val_bpb", 1.1), ("adapt.val_bpb", 1.0), ("rescore.val_bpb", 0.9), ("rescore.gain", float("nan")), ("adapt.gain", None)):
        got = rules.metrics_match({**honest, key: value}, own)
        assert not got.passed and got.figure == 1 and key in got.detail


def test_bytes_are_utf8_compares_every_document_and_its_totals_agree_with_its_verdict():
    good = rules.utf8_bytes(["ab", "é"], np.array([2, 2]))
    assert good.passed and "in all: 4 counted, 4 decoded" in good.detail
    # A document with no decoded original (None) has nothing its count could equal: it differs, and decodes to 0 bytes.
    bad = rules.utf8_bytes(["ab", None], np.array([2, 5]))
    assert not bad.passed and bad.figure == 1 and "(1 decode to no original)" in bad.detail and "in all: 7 counted, 2 decoded" in bad.detail
