"""Score-first test-time training (pgolf/ttt.py) and the adapt stage, audited as a black box."""
import copy
import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pgolf import audit, params, ttt, windows
from pgolf.errors import InputError
from pgolf.model import GPT, ModelParams
from pgolf.ttt import TTTParams
from conftest import run_stage, run_stages, shards_params, tiny_params

V = 16
TP = TTTParams(method="chunk_sgd", chunk_tokens=48, epochs=2, lr=0.05, momentum=0.9, grad_clip=1.0, blocks=0, batch_seqs=2)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(params.section(tiny_params(), "model", ModelParams), vocab_size=V)).eval()


BASE = tiny_model()
STREAM = np.random.default_rng(0).integers(2, V, 200).astype(np.uint16)
STREAM[[0, 70, 140]] = 1


def adapted(stream: np.ndarray, tp: TTTParams = TP, passes: int = 1) -> np.ndarray:
    """What chunk_sgd records for every target of `stream`, from a fresh copy of the model."""
    model = copy.deepcopy(BASE)
    plan = windows.plan(stream, 16, 16)
    for _ in range(passes):  # passes > 1: the field's multi-epoch TTT that reports its last pass
        scores = [s[0] for _, _, s in ttt.chunk_sgd(model, stream, plan, 4, 16, tp, torch.device("cpu"))]
    return np.exp(-np.concatenate(scores).astype(np.float64))


def test_chunks_cover_the_windows_in_order():
    w = windows.plan(STREAM, 16, 8)
    spans = ttt.chunks(w, 40)
    assert spans[0][0] == 0 and spans[-1][1] == len(w) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(int(w.scored[i:j].sum()) >= 40 for i, j in spans[:-1])


def test_chunk_sgd_adapts_and_passes_the_black_box_audits():
    p = adapted(STREAM)
    frozen = adapted(STREAM, dataclasses.replace(TP, epochs=0))
    assert not np.array_equal(p[48:], frozen[48:]) and np.array_equal(p[:48], frozen[:48])  # chunk 0 is scored before any training
    positions = np.array([1, 48, 49, 97, 150, 199])  # the first target of each chunk after a training commit included
    assert audit.substitution(adapted, STREAM, positions, V).passed
    assert audit.causality_cuts("causality", adapted, STREAM, audit.cuts(len(STREAM), 4)).passed
    assert audit.in_range("in_range", p).passed


def test_reporting_a_later_pass_is_caught_by_causality():
    def last_pass(stream):
        return adapted(stream, passes=2)

    rule = audit.causality_cuts("causality", last_pass, STREAM, audit.cuts(len(STREAM), 4))
    assert not rule.passed and rule.figure > 0


def test_bad_ttt_params_name_their_key():
    with pytest.raises(InputError, match="ttt.method"):
        dataclasses.replace(TP, method="doc_lora")
    with pytest.raises(InputError, match="ttt.momentum"):
        dataclasses.replace(TP, momentum=1.0)


def test_the_stage_chain_with_ttt_and_the_cache_on_its_records(tmp_path, fineweb):
    root = tmp_path / "run"
    root.mkdir()
    p = tiny_params(shards_params(fineweb, tmp_path / "src", 3000, 20000))
    p["quant"].update(calib_seqs=4, seq_len=32)
    p["eval"].update(seq_len=32, stride=16)
    p["verify"].update(positions=8, audit_tokens=2000)
    run_stages(root, p, "tokenize", "train", "calibrate", "pack", "score", "adapt")
    assert (root / "eval/adapt.parquet").read_bytes() == (root / "eval/score.parquet").read_bytes()  # method none: pass 1's records
    m = json.loads((root / "metrics/adapt.json").read_text())
    assert m["method"] == "none" and m["gain"] == 0 and m["state_bytes"] == 0
    p["ttt"].update(method="chunk_sgd", chunk_tokens=512, epochs=1, lr=0.01)
    p["cache"]["input"] = "adapt"
    run_stages(root, p, "adapt", "rescore", "report")
    m = json.loads((root / "metrics/adapt.json").read_text())
    score = json.loads((root / "metrics/score.json").read_text())
    assert m["method"] == "chunk_sgd" and m["chunks"] > 1 and m["pass1_val_bpb"] == round(score["val_bpb"], 6)
    assert m["val_bpb"] != m["pass1_val_bpb"] and m["state_bytes"] == 8 * m["adapted_params"]
    adapted_records = pq.read_table(root / "eval/adapt.parquet")
    assert adapted_records.schema.equals(pq.read_table(root / "eval/score.parquet").schema, check_metadata=True)
    report = json.loads((root / "metrics/report.json").read_text())
    rules = json.loads((root / "reports/details/report.json").read_text())["rules"]
    assert report["passed"] and report["ttt_method"] == "chunk_sgd" and report["val_bpb_adapt"] == m["val_bpb"]
    assert rules["single_pass_adapt"]["passed"] and "chunk_sgd" in rules["single_pass_adapt"]["detail"]
    assert json.loads((root / "metrics/rescore.json").read_text())["input"] == "adapt"
    # Records altered after the fact are caught: the report reruns the method itself.
    table = adapted_records.to_pydict()
    table["nll"][5] *= 0.5
    pq.write_table(type(adapted_records).from_pydict(table, schema=adapted_records.schema), root / "eval/adapt.parquet")
    result = run_stage("report", root, p)
    assert result.returncode == 2 and "single_pass_adapt" in result.stderr
