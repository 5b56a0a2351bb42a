"""Pass-1 scoring: the window plan, the batched scorer against a one-target-at-a-time reference, the stage."""
import dataclasses
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TINY_MODEL, default_params, make_data, run_stage
from pgolf import artifact, pack, params, quantize, windows
from pgolf.bpb import ByteTables, position_bytes
from pgolf.runtime import CPU
from pgolf.validation import evaluate
from pgolf.model import GPT, ModelParams
from pgolf.quantize import QuantBits, QuantParams
from pgolf.errors import InputError, StageError
from pgolf.score import EvalParams, score_reference, score_stream, write_records

BOS = 1
# (seq_len, stride, targets): tails of every size, a stream shorter than a window, stride 1 and = seq_len
COMBOS = [(16, 4, 61), (16, 16, 61), (16, 16, 64), (20, 7, 45), (32, 5, 20), (8, 1, 30), (12, 5, 12), (12, 12, 13), (6, 4, 1)]


def small_model(vocab: int = 64, seed: int = 0) -> GPT:
    """A tiny GPT with every weight random (the baseline zero-initialises its output projections)."""
    torch.manual_seed(seed)
    p = dict(default_params()["model"], layers=2, dim=32, heads=4, kv_heads=2, vocab_size=vocab)
    model = GPT(ModelParams(**p))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model.eval()


def stream(n_targets: int, vocab: int = 64, docs: int = 0, seed: int = 0) -> np.ndarray:
    """Random tokens starting with BOS; `docs` - 1 more BOS at random places."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, n_targets + 1).astype(np.uint16)
    tokens[0] = BOS
    if docs > 1:
        tokens[rng.choice(np.arange(2, n_targets + 1), docs - 1, replace=False)] = BOS
    return tokens


def tables(vocab: int = 64, seed: int = 0) -> ByteTables:
    rng = np.random.default_rng(seed)
    boundary = np.zeros(vocab, dtype=bool)
    boundary[[0, BOS]] = True
    base = rng.integers(1, 5, vocab).astype(np.int16)
    base[boundary] = 0
    return ByteTables(base, rng.random(vocab) < 0.5, boundary)


def reference_contexts(tokens: np.ndarray, seq_len: int, stride: int, isolated: bool) -> np.ndarray:
    n = len(tokens) - 1
    starts = windows.doc_starts(tokens, BOS) if isolated else np.zeros(1, dtype=np.int64)
    out = []
    for t in range(1, n + 1):
        k = np.searchsorted(starts, t - 1, side="right") - 1
        lo, hi = int(starts[k]), int(starts[k + 1]) if k + 1 < len(starts) else n
        out.append(windows.reference_context(t, n, seq_len, stride, lo, hi))
    return np.array(out)


def scored(model, tokens, seq_len, stride, isolated=False, batch=3):
    plan = windows.plan(tokens, seq_len, stride, isolated, BOS)
    parts = list(score_stream(model, tokens, plan, batch, CPU))
    return plan, np.concatenate([p[2] for p in parts], axis=1)


@pytest.mark.parametrize("isolated", [False, True])
@pytest.mark.parametrize("seq_len,stride,n", COMBOS)
def test_plan_scores_every_target_once_with_its_reference_context(seq_len, stride, n, isolated):
    tokens = stream(n, docs=4 if n > 8 else 0, seed=n)
    plan = windows.plan(tokens, seq_len, stride, isolated, BOS)
    assert np.array_equal(plan.targets(0, len(plan)), np.arange(1, n + 1))  # each once, in order
    assert np.all(plan.end - plan.begin <= seq_len) and np.all(plan.begin <= plan.score_from)
    assert np.array_equal(plan.contexts(0, len(plan)), reference_contexts(tokens, seq_len, stride, isolated))


@pytest.mark.parametrize("isolated", [False, True])
@pytest.mark.parametrize("seq_len,stride,n", COMBOS)
def test_batched_scores_equal_one_target_at_a_time(seq_len, stride, n, isolated):
    model, tokens = small_model(), stream(n, docs=4 if n > 8 else 0, seed=n)
    _, fast = scored(model, tokens, seq_len, stride, isolated)
    slow = score_reference(model, tokens, reference_contexts(tokens, seq_len, stride, isolated))
    np.testing.assert_allclose(fast, slow, rtol=0, atol=2e-5)


def test_context_changes_the_scores():
    """Guards the tests above: with this model, the context a target gets does matter."""
    model, tokens = small_model(), stream(61)
    _, sliding = scored(model, tokens, 16, 4)
    _, blocks = scored(model, tokens, 16, 16)
    assert np.abs(sliding[0] - blocks[0]).max() > 0.1


def test_non_overlapping_mode_is_the_challenge_formula(tmp_path):
    model, tokens, tab, seq_len = small_model(), stream(8 * 16), tables(), 16
    plan = windows.plan(tokens, seq_len, seq_len)
    totals = write_records(model, tokens, plan, 3, position_bytes(tokens, tab), BOS, CPU, tmp_path / "r.parquet")
    rec = pq.read_table(tmp_path / "r.parquet")
    nll, nbytes = rec.column("nll").to_numpy().astype(np.float64), rec.column("bytes").to_numpy()
    assert np.array_equal(nbytes, tab.target_bytes(tokens[:-1], tokens[1:]))
    assert totals.tokens == len(tokens) - 1 and totals.bytes == nbytes.sum()
    assert totals.val_bpb == pytest.approx(nll.sum() / (math.log(2) * nbytes.sum()), rel=1e-12)
    val_loss, val_bpb = evaluate(model, tokens, seq_len, 4, position_bytes(tokens, tab), CPU)  # the official trainer's eval
    assert totals.val_loss == pytest.approx(val_loss, rel=1e-6) and totals.val_bpb == pytest.approx(val_bpb, rel=1e-6)


def test_row_groups_hold_exactly_the_records_of_every_batch(tmp_path, monkeypatch):
    """The preallocated row-group buffer writes what one table of all the batches' records would hold,
    in row groups of exactly ROW_GROUP rows (7 here: batches of 12 rows straddle every boundary)."""
    from pgolf import score

    monkeypatch.setattr(score, "ROW_GROUP", 7)
    model, tokens, tab = small_model(), stream(61), tables()
    plan = windows.plan(tokens, 16, 4)
    write_records(model, tokens, plan, 3, position_bytes(tokens, tab), BOS, CPU, tmp_path / "r.parquet")
    starts = windows.doc_starts(tokens, BOS)
    parts = [score.records(tokens, plan, i, j, s, position_bytes(tokens, tab), starts) for i, j, s in score_stream(model, tokens, plan, 3, CPU)]
    expected = [np.concatenate([part[k] for part in parts]) for k in range(len(score.SCHEMA))]
    written = pq.ParquetFile(tmp_path / "r.parquet")
    table = written.read()
    for k, field in enumerate(score.SCHEMA):
        assert np.array_equal(table.column(field.name).to_numpy(), expected[k]), field.name
    sizes = [written.metadata.row_group(g).num_rows for g in range(written.num_row_groups)]
    assert sizes == [7] * (61 // 7) + [61 % 7]


def test_doc_isolated_contexts_stay_inside_their_document(tmp_path):
    model, tokens = small_model(), stream(200, docs=7, seed=3)
    plan = windows.plan(tokens, 16, 4, True, BOS)
    write_records(model, tokens, plan, 4, position_bytes(tokens, tables()), BOS, CPU, tmp_path / "r.parquet")
    rec = pq.read_table(tmp_path / "r.parquet").to_pydict()
    starts = windows.doc_starts(tokens, BOS)
    for pos, ctx, doc in zip(rec["position"], rec["context"], rec["doc"]):
        seen = tokens[pos - ctx : pos]
        assert ctx >= 1 and BOS not in seen[1:] and pos - ctx >= starts[doc]
    # Each document scores as if it were the whole stream: its BOS to the next BOS, inclusive.
    nll = np.array(rec["nll"])
    bounds = list(starts) + [len(tokens) - 1]
    for k in range(len(starts)):
        alone = tokens[bounds[k] : bounds[k + 1] + 1]
        _, own = scored(model, alone, 16, 4)
        np.testing.assert_allclose(nll[bounds[k] : bounds[k + 1]], own[0], rtol=0, atol=2e-5)
    assert sorted(set(rec["doc"])) == list(range(len(starts)))


def test_eval_params_are_checked():
    with pytest.raises(Exception, match="eval.stride"):
        EvalParams(seq_len=16, stride=17, batch=1, doc_isolated=False)
    assert EvalParams(seq_len=16, stride=16, batch=1, doc_isolated=True).mode == "non-overlapping-doc-isolated"
    p = default_params()
    p["eval"]["tilt_order"] = -1
    with pytest.raises(InputError, match="eval.tilt_order is -1"):
        params.section(p, "eval", EvalParams)


def test_a_non_finite_record_stops_the_writer_naming_its_position(tmp_path):
    model, tokens = small_model(), stream(40)
    plan = windows.plan(tokens, 16, 16)

    def scores():
        for i, j, s in score_stream(model, tokens, plan, 1, CPU):
            if i == 1:
                s[0, 5] = np.nan  # window 1 scores targets 17..32: position 22
            yield i, j, s

    with pytest.raises(StageError, match=r"r\.parquet: the record of position 22 has nll nan; records must be finite"):
        write_records(model, tokens, plan, 1, position_bytes(tokens, tables()), BOS, CPU, tmp_path / "r.parquet", scores=scores())


# The stage, from a packed artifact and real validation tokens.


@pytest.fixture(scope="module")
def packed(tmp_path_factory, fineweb):
    """data/ from the FineWeb sample and an artifact of a random tiny model (RTN): no training needed."""
    root = make_data(tmp_path_factory.mktemp("score"), fineweb)
    p = default_params()
    p["model"].update(TINY_MODEL)
    model = GPT(ModelParams(**p["model"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    q = dataclasses.replace(params.section(p, "quant", QuantParams), method="rtn", bits=QuantBits(6, 6, 8))
    tensors, meta = quantize.quantize_model(model, {}, q)
    blob, _ = pack.pack_quantized(tensors, meta)
    (root / "artifacts").mkdir()
    (root / "artifacts/model.pgolf").write_bytes(blob)
    p["eval"].update(seq_len=64, stride=16, batch=8)
    return root, p


def test_stage_scores_the_artifact_once_per_target(packed):
    root, p = packed
    result = run_stage("score", root, p)
    assert result.returncode == 0, result.stderr
    m = json.loads((root / "metrics/score.json").read_text())
    rec = pq.read_table(root / "eval/score.parquet")
    tokens = np.fromfile(root / "data/shards/fineweb_val_000000.bin", dtype="<u2", offset=1024)
    assert rec.column("position").to_pylist() == list(range(1, len(tokens)))
    assert m["tokens"] == len(tokens) - 1 and m["mode"] == "sliding-16"
    nll = rec.column("nll").to_numpy().astype(np.float64)
    assert m["val_bpb"] == pytest.approx(nll.sum() / (math.log(2) * m["bytes"]), abs=1e-6)
    # What was scored is the artifact's model, as a fresh evaluator loads it.
    model = artifact.load_model(root / "artifacts/model.pgolf")
    _, own = scored(model, tokens, 64, 16, batch=8)
    np.testing.assert_array_equal(rec.column("nll").to_numpy(), own[0])


def test_two_processes_write_the_same_records(packed, tmp_path):
    root, p = packed
    assert run_stage("score", root, p).returncode == 0
    one = pq.read_table(root / "eval/score.parquet")
    result = run_stage("score", root, p, PGOLF_NPROC="2")
    assert result.returncode == 0, result.stderr
    assert json.loads((root / "metrics/score.json").read_text())["processes"] == 2
    assert pq.read_table(root / "eval/score.parquet").equals(one)


def test_a_tilt_boost_that_is_not_finite_stops_the_stage_and_keeps_the_last_records(packed):
    """eval.tilt_boost .nan once replaced the last good records with NaN, and metrics/score.json held NaN."""
    root, p = packed
    if not (root / "eval/score.parquet").is_file():
        assert run_stage("score", root, p).returncode == 0
    before = {f: (root / f).read_bytes() for f in ("eval/score.parquet", "metrics/score.json")}
    bad = json.loads(json.dumps(p))
    bad["eval"].update(tilt_order=2, tilt_boost=math.nan)
    result = run_stage("score", root, bad)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: params.yaml: eval.tilt_boost is nan; expected a finite float in [-16, 16]")
    assert {f: (root / f).read_bytes() for f in before} == before


def test_bad_input_names_the_file_or_key(packed):
    root, p = packed
    bad = json.loads(json.dumps(p))
    bad["eval"]["stride"] = 65
    result = run_stage("score", root, bad)
    assert result.returncode == 2 and "eval.stride" in result.stderr
    (root / "artifacts/model.pgolf").rename(root / "artifacts/away.pgolf")
    try:
        result = run_stage("score", root, p)
        assert result.returncode == 2 and "artifacts/model.pgolf" in result.stderr
    finally:
        (root / "artifacts/away.pgolf").rename(root / "artifacts/model.pgolf")
