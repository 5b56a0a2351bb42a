"""The train stage on a tiny model: distributed equivalence, determinism, resume, divergence, budget."""
import csv
import json
import math

import pytest
import torch

from pgolf import checkpoint, params, trainer
from pgolf.distributed import Dist
from pgolf.errors import TrainingDiverged
from pgolf.model import GPT
from pgolf.params import ModelParams, TrainParams
from conftest import make_data, run_stage, tiny_params


@pytest.fixture
def data(tmp_path, fineweb):
    return make_data(tmp_path, fineweb)


def curve(cwd):
    with open(cwd / "metrics/train_curve.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_stage_outputs(data):
    ok(run_stage("train", data, tiny_params()))
    m = json.loads((data / "metrics/train.json").read_text())
    assert {"params", "steps", "ms_per_step", "tokens_per_s", "val_loss", "val_bpb", "train_loss"} <= set(m)
    assert m["steps"] == 4 and m["val_tokens"] == 2048 and math.isfinite(m["val_bpb"])
    model, meta = checkpoint.load_model(data / "artifacts/model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == m["params"] and meta["step"] == 4
    assert len(curve(data)) == 4 and not list((data / "runs/train").glob("*"))


def test_two_processes_match_one_on_the_same_global_batch(tmp_path, fineweb):
    one, two = make_data(tmp_path / "one", fineweb), make_data(tmp_path / "two", fineweb)
    ok(run_stage("train", one, tiny_params()))
    result = ok(run_stage("train", two, tiny_params(), PGOLF_NPROC="2", OMP_NUM_THREADS="1"))
    assert "2 process(es)" in result.stdout
    assert curve(two) == pytest.approx(curve(one), rel=1e-5, abs=1e-5)
    m1, m2 = (json.loads((d / "metrics/train.json").read_text()) for d in (one, two))
    assert m2["val_bpb"] == pytest.approx(m1["val_bpb"], rel=1e-4)


def test_same_seed_same_checkpoint(tmp_path, fineweb):
    a, b = make_data(tmp_path / "a", fineweb), make_data(tmp_path / "b", fineweb)
    for d in (a, b):
        ok(run_stage("train", d, tiny_params()))
    assert (a / "artifacts/model.safetensors").read_bytes() == (b / "artifacts/model.safetensors").read_bytes()


def _setup(data, **train):
    p = tiny_params(**train)
    return params.section(p, "model", ModelParams), params.section(p, "train", TrainParams), Dist(0, 1, torch.device("cpu"))


def test_resume_continues_an_interrupted_run_exactly(data):
    model_p, t, d = _setup(data, iterations=6, checkpoint_every=2)
    full = trainer.build(model_p, 1, d.device)
    trainer.train(full, t, d, data / "data/shards", data / "runs/full")

    def interrupt(run):
        if run.step == 3:
            raise KeyboardInterrupt

    cut = trainer.build(model_p, 1, d.device)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cut, t, d, data / "data/shards", data / "runs/cut", on_step=interrupt)
    assert [p.name for p in trainer.checkpoints(data / "runs/cut")] == ["step_000002.safetensors"]
    resumed = trainer.build(model_p, 999, d.device)  # other init: everything must come from the checkpoint
    run = trainer.train(resumed, t.__class__(**{**t.__dict__, "resume": True}), d, data / "data/shards", data / "runs/cut")
    assert run.step == 6 and len(run.curve) == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(data, monkeypatch):
    model_p, t, d = _setup(data, iterations=6, checkpoint_every=2)
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets):
        calls["n"] += 1
        loss = forward(self, idx, targets)
        return loss * math.nan if calls["n"] > 3 * (t.grad_accum) else loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4; last good checkpoint: .*step_000002\.safetensors"):
        trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/x")
    assert [p.name for p in trainer.checkpoints(data / "runs/x")] == ["step_000002.safetensors"]


def test_wallclock_budget_stops_training(data):
    model_p, t, d = _setup(data, iterations=10_000, max_seconds=0.5)
    run = trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/t")
    assert run.stopped_by == "time" and 1 <= run.step < 10_000
    assert run.curve[-1][2] < 1.0  # the warm-down follows the clock


def test_lr_schedule_matches_the_baseline():
    _, t, _ = _setup(None, iterations=10, warmdown_iters=4)
    assert [trainer.lr_scale(t, s, 0.0) for s in range(11)] == [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25, 1]


def test_vocabulary_larger_than_the_model_is_refused(data):
    p = tiny_params()
    p["model"]["vocab_size"] = 512
    result = run_stage("train", data, p)
    assert result.returncode == 2 and "model.vocab_size is 512" in result.stderr
