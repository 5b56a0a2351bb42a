"""The train stage on a tiny model: distributed equivalence, determinism, resume, divergence, budget."""
import csv
import json
import math
from dataclasses import replace

import pytest
import torch

from pgolf import checkpoint, params, trainer
from pgolf.runtime import CPU
from pgolf.errors import InputError, TrainingDiverged
from pgolf.model import GPT, ModelParams
from pgolf.trainer import TrainParams
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
    return params.section(p, "model", ModelParams), params.section(p, "train", TrainParams), CPU


def test_resume_continues_an_interrupted_run_exactly(data):
    model_p, t, d = _setup(data, iterations=6, checkpoint_every=2)
    full = trainer.build(model_p, 1, d.device)
    trainer.train(full, t, d, data / "data/shards", data / "runs/full", 1)

    def interrupt(run):
        if run.step == 3:
            raise KeyboardInterrupt

    cut = trainer.build(model_p, 1, d.device)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cut, t, d, data / "data/shards", data / "runs/cut", 1, on_step=interrupt)
    assert [p.name for p in trainer.checkpoints(data / "runs/cut")] == ["step_000002.safetensors"]
    resumed = trainer.build(model_p, 999, d.device)  # other init: everything must come from the checkpoint
    run = trainer.train(resumed, replace(t, resume=True), d, data / "data/shards", data / "runs/cut", 1)
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
        trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/x", 1)
    assert [p.name for p in trainer.checkpoints(data / "runs/x")] == ["step_000002.safetensors"]


def all_finite(path):
    tensors, _ = checkpoint.read_safetensors(path)
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_an_update_that_makes_weights_non_finite_is_never_saved(data):
    """The loss of step 3 is finite, but its update poisons the weights: the step-3 checkpoint must not be
    written, and the checkpoint the message names must be finite (resuming it must not loop on NaN)."""
    model_p, t, d = _setup(data, iterations=6, checkpoint_every=1)
    model = trainer.build(model_p, 1, d.device)
    backward = {"n": 0}

    def poison(grad):
        backward["n"] += 1
        return grad * math.nan if backward["n"] > 2 * t.grad_accum else grad

    model.blocks[0].attn.c_q.weight.register_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"the update of step 3 made \d+ tensors non-finite .*last good checkpoint: .*step_000002\.safetensors"):
        trainer.train(model, t, d, data / "data/shards", data / "runs/x", 1)
    saved = trainer.checkpoints(data / "runs/x")
    assert [p.name for p in saved] == ["step_000001.safetensors", "step_000002.safetensors"]
    assert all(all_finite(p) for p in saved)
    resumed = trainer.train(trainer.build(model_p, 1, d.device), replace(t, resume=True), d, data / "data/shards", data / "runs/x", 1)
    assert resumed.step == 6 and all(math.isfinite(c[1]) for c in resumed.curve)


def test_a_non_finite_state_is_refused_as_a_resume_point(data, tmp_path):
    model_p, t, d = _setup(data)
    model = trainer.build(model_p, 1, d.device)
    opts = trainer.optimizers(model, t, d.device)
    with torch.no_grad():
        model.tok_emb.weight[0, 0] = math.inf
    checkpoint.save_state(tmp_path / "bad.safetensors", model, opts, {"run": {}})
    with pytest.raises(InputError, match=r"bad\.safetensors: 1 non-finite tensors \(model/tok_emb\.weight\)"):
        checkpoint.load_state(tmp_path / "bad.safetensors", model, opts)


@pytest.mark.parametrize("change", [{"seed": 2}, {"matrix_lr": 0.08}, {"model": {"mlp_mult": 3}}])
def test_resume_with_other_settings_starts_afresh(data, capsys, change):
    """train.resume left true (as `dvc exp run -S train.resume=true` leaves it) must not hand the old
    run's weights to a run with another seed, learning rate or model: that run starts afresh."""
    model_p, t, d = _setup(data, iterations=4, checkpoint_every=2)
    trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/r", 1)
    seed = change.get("seed", 1)
    t2 = replace(t, resume=True, **{k: v for k, v in change.items() if k not in ("seed", "model")})
    model_p2 = replace(model_p, **change.get("model", {}))
    capsys.readouterr()
    again = trainer.build(model_p2, seed, d.device)
    run = trainer.train(again, t2, d, data / "data/shards", data / "runs/r", seed)
    key = next(iter(change)) if "model" not in change else "model.mlp_mult"
    assert f"not resuming {data / 'runs/r/step_000004.safetensors'}: it was saved with other settings: " in capsys.readouterr().out
    fresh = trainer.build(model_p2, seed, d.device)
    trainer.train(fresh, replace(t2, resume=False), d, data / "data/shards", data / "runs/fresh", seed)
    assert run.step == 4 and len(run.curve) == 4, key
    for (name, a), b in zip(fresh.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_ignores_settings_that_do_not_change_the_weights(data, capsys):
    model_p, t, d = _setup(data, iterations=4, checkpoint_every=2)
    trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/r", 1)
    capsys.readouterr()
    run = trainer.train(trainer.build(model_p, 1, d.device), replace(t, resume=True, log_every=0, val_tokens=4096), d, data / "data/shards", data / "runs/r", 1)
    assert "resuming from" in capsys.readouterr().out and run.step == 4


def test_stage_with_resume_left_on_trains_the_new_seed(data):
    first = tiny_params(checkpoint_every=2, resume=True)
    ok(run_stage("train", data, first))
    old = (data / "artifacts/model.safetensors").read_bytes()
    second = {**first, "seed": 7}
    result = ok(run_stage("train", data, second))
    assert "not resuming" in result.stdout and "seed 1337 -> 7" in result.stdout
    m = json.loads((data / "metrics/train.json").read_text())
    assert m["steps"] == 4 and (data / "artifacts/model.safetensors").read_bytes() != old
    _, meta = checkpoint.load_model(data / "artifacts/model.safetensors")
    assert meta["seed"] == 7


def test_a_loss_stuck_at_the_uniform_value_is_reported(data, capsys):
    """Huge learning rates can park the model on a uniform prediction: loss exactly ln(vocab), no NaN."""
    model_p, t, d = _setup(data, iterations=20, log_every=0, matrix_lr=1e3, tied_embed_lr=1e3, scalar_lr=1e3)
    run = trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/u", 1)
    assert run.curve[-1][1] == pytest.approx(math.log(1024), abs=1e-3)
    out = capsys.readouterr().out
    assert "the loss has been 6.9315 = ln(vocab), a uniform prediction, for 10 steps" in out
    assert run.uniform_steps >= 10


def test_a_normal_run_has_no_uniform_warning(data, capsys):
    model_p, t, d = _setup(data, iterations=12)
    run = trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/n", 1)
    assert run.uniform_steps == 0 and "uniform prediction" not in capsys.readouterr().out


def test_wallclock_budget_stops_training(data, monkeypatch):
    """A fake clock that reads 50 ms later at every look: each step takes 100 ms of budget, whatever the machine."""
    now = iter(range(10**6))
    monkeypatch.setattr(trainer, "clock", lambda: 0.05 * next(now))
    model_p, t, d = _setup(data, iterations=10_000, max_seconds=0.5)
    run = trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/t", 1)
    assert run.stopped_by == "time" and run.step == 5
    # Warm-down over the last 2 steps' worth of time: at step 4, 150 ms left of 2 x 350/3 ms; at step 5, 50 of 2 x 450/4.
    assert [c[2] for c in run.curve] == pytest.approx([1.0, 1.0, 1.0, 150 / (2 * 350 / 3), 50 / (2 * 450 / 4)])


def test_lr_schedule_matches_the_baseline():
    _, t, _ = _setup(None, iterations=10, warmdown_iters=4)
    assert [trainer.lr_scale(t, s, 0.0) for s in range(11)] == [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25, 1]


def test_vocabulary_larger_than_the_model_is_refused(data):
    p = tiny_params()
    p["model"]["vocab_size"] = 512
    result = run_stage("train", data, p)
    assert result.returncode == 2 and "model.vocab_size is 512" in result.stderr
