"""The report's rule assembly and text, without running the stage."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pgolf import report, rules, shards
from pgolf.audit import Rule, VerifyParams
from pgolf.doc_records import hash_doc

VP = VerifyParams(positions=8, audit_tokens=40, byte_limit=100, max_state_bytes=10, max_overhead=1.5, strict=True)


def records(tokens: np.ndarray) -> rules.Records:
    n = len(tokens) - 1
    return rules.Records(tokens, 1, np.ones(n), np.ones(n, np.float32), np.ones(n, np.int32), np.full(n, 0.5))


def test_audited_positions_cover_document_0_and_a_seeded_sample():
    tokens = np.array([1, 5, 6, 7, 1] + [9] * 95, dtype=np.uint16)
    positions, cut = rules.audited(records(tokens), VP)
    assert set(range(1, 5)) <= set(positions) and positions.max() <= 40 and cut == 20
    assert np.array_equal(positions, rules.audited(records(tokens), VP)[0])  # the same sample every time


def test_budget_rules_hold_each_figure_to_its_limit():
    passed = [r.passed for r in rules.budget_rules(100, 11, 1.0, 650.0, 900.0, VP)]
    assert passed == [True, False, True, True, True]  # no time budgets set: the seconds are reported, not held
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
    m = {"score": {"val_bpb": 2.0, "mode": "sliding-64"}, "adapt": {"val_bpb": 2.0, "gain": 0.0, "method": "none"}, "rescore": {"val_bpb": 1.7, "gain": 0.3}}
    checked = [Rule("a", True, 0.0, 1.0, "fine"), Rule("b", False, 2.0, 1.0, "broken")]
    h = report.headline(2.1, 2.2, m, 900, 100, 5, 10, 30, checked)
    assert h["artifact_bytes"] == 1000 and h["rules_passed"] == 1 and not h["passed"] and round(h["quant_penalty"], 6) == 0.1
    assert "1/2 rules pass" in report.summary(h) and "adapted" not in report.summary(h)
    m["adapt"] = {"val_bpb": 1.9, "gain": 0.1, "method": "doc_lora"}
    assert "sliding-64, 1.9000 adapted (doc_lora), 1.7000 with the cache" in report.summary(report.headline(2.1, 2.2, m, 900, 100, 5, 10, 30, checked))
    p = {"eval": {"seq_len": 8}, "cache": {"mix": "online", "max_order": 3}}
    text = report.markdown(h, checked, {"report": 1.0}, p, ["x.svg"])
    assert "| a | pass | fine |" in text and "| b | **FAIL** | broken |" in text and "![x](plots/x.svg)" in text
