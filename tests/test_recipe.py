"""The records' training recipe: Muon variants, weight decay, schedule, recurrence switch, EMA, shuffled order, budget."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from pgolf import loader, muon, params, shards, trainer
from pgolf.errors import InputError
from pgolf.model import GPT, ModelParams
from pgolf.runtime import CPU
from pgolf.trainer import TrainParams
from conftest import REPO, make_data, tiny_params

RECIPE = dict(muon_ns="polar_express", muon_row_normalize=True, muon_wd=0.1, embed_wd=0.05, adam_wd=0.02, warmdown_frac=0.5, min_lr=0.1,
              loop_at=0.5, ema_decay=0.9, order="shuffled")
FEATURES = dict(mlp_activation="leaky_relu2", rope_dims=8, layer_norm_scale=True, xsa_last=2, skip_gates=True, loops=1, loop_start=0,
                loop_end=0, smear_gate=True, attn_gate=True, gate_window=8, doc_attention=True, init="orthogonal")


@pytest.fixture
def data(tmp_path, fineweb):
    return make_data(tmp_path, fineweb)


def setup(**train):
    p = tiny_params(**train)
    p["model"].update(FEATURES)
    return params.section(p, "model", ModelParams), params.section(p, "train", TrainParams), CPU


def test_polar_express_steps_use_their_own_coefficients_and_orthogonalise():
    g = torch.randn(48, 32, dtype=torch.float64)
    x = g / g.norm()
    for a, b, c in muon.POLAR_EXPRESS:  # plain: 5 steps, one tuple each, on the wide orientation
        xt = x.T
        s = xt @ xt.T
        x = (a * xt + (b * s + c * s @ s) @ xt).T
    got = muon.zeropower_via_newtonschulz5(g.float(), steps=5, coefficients=muon.POLAR_EXPRESS)
    assert torch.allclose(got.double(), x, atol=1e-4)
    sv = torch.linalg.svdvals(got.double())
    assert sv.min() > 0.7 and sv.max() < 1.3  # near-orthogonal after 5 steps; the quintic needs more for this spread


def test_a_muon_step_with_row_norm_and_decay_matches_a_plain_reference():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 16))
    w0, grad = w.detach().clone(), torch.randn(8, 16)
    w.grad = grad.clone()
    opt = muon.Muon([w], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.2, row_normalize=True, ns="polar_express")
    opt.step()
    update = grad + 0.9 * grad  # nesterov on a fresh buffer: g + momentum * (0 * momentum + g)
    update = update / update.norm(dim=-1, keepdim=True)
    ortho = muon.zeropower_via_newtonschulz5(update, 5, coefficients=muon.POLAR_EXPRESS)
    want = w0 * (1 - 0.1 * 0.2) - 0.1 * ortho * max(1, 8 / 16) ** 0.5
    assert torch.allclose(w.detach(), want, atol=1e-6)


def test_warmdown_fraction_with_a_floor():
    _, t, _ = setup(iterations=10, warmdown_frac=0.4, min_lr=0.25)
    got = [trainer.lr_scale(t, s, 0.0) for s in range(10)]
    want = [1.0 if s / 10 < 0.6 else max((1 - s / 10) / 0.4, 0.25) for s in range(10)]
    assert got == pytest.approx(want) and got[-1] == 0.25
    _, timed, _ = setup(iterations=10_000, warmdown_frac=0.5, max_seconds=10, hessian_reserve_seconds=2)
    assert trainer.lr_scale(timed, 3, 6000.0) == pytest.approx((1 - 6 / 8) / 0.5)  # a fraction of the 8 s left for training


def test_recurrence_switches_on_at_its_fraction_and_the_checkpoint_holds_the_ema(data):
    model_p, t, d = setup(iterations=6, loop_at=0.5, ema_decay=0.8)
    model = trainer.build(model_p, 1, d.device)
    seen, weights = [], []

    def watch(run):
        seen.append(model.looping)
        weights.append({n: v.double().clone() for n, v in model.state_dict().items()})

    initial = {n: v.double().clone() for n, v in model.state_dict().items()}
    trainer.train(model, t, d, data / "data/shards", data / "runs/t", 1, on_step=watch)
    assert seen == [False, False, False, True, True, True] and model.looping
    ema = initial
    for w in weights:  # plain: the average of every step's weights, decay 0.8
        ema = {n: 0.8 * ema[n] + 0.2 * w[n] for n in ema}
    for name, v in model.state_dict().items():
        assert torch.allclose(v.double(), ema[name], atol=1e-6), name
    assert not torch.allclose(model.state_dict()["blocks.0.mlp.fc.weight"].double(), weights[-1]["blocks.0.mlp.fc.weight"])


def test_weight_decay_reaches_each_group():
    model = GPT(setup()[0])
    _, t, _ = setup(**RECIPE)
    opts = trainer.optimizers(model, t, torch.device("cpu"))
    decay = [g["weight_decay"] for o in opts for g in o.param_groups]
    assert decay == [0.05, 0.1, 0.02] and opts[1].param_groups[0]["ns"] == "polar_express"


def test_shuffled_order_is_a_seeded_permutation_the_same_for_any_process_count(tmp_path):
    tokens = np.arange(10_000, dtype=np.uint16) % 1000
    for i, n in enumerate((4000, 6000)):
        shards.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens[:n])
    one = loader.TrainLoader(tmp_path, 0, 1, torch.device("cpu"), "shuffled", 16, seed=3)
    two = [loader.TrainLoader(tmp_path, r, 2, torch.device("cpu"), "shuffled", 16, seed=3) for r in range(2)]
    for _ in range(5):
        x, y = one.next_batch(128, 16)
        halves = [ld.next_batch(64, 16) for ld in two]
        assert torch.equal(x, torch.cat([h[0] for h in halves])) and torch.equal(y, torch.cat([h[1] for h in halves]))
        assert torch.equal(x[:, 1:], y[:, :-1])
    seq = loader.ShuffledSequences(shards.list_shards(tmp_path, "train"), 16, seed=3)
    windows = seq.take(len(seq.starts))
    assert len({(int(w), int(s)) for w, s in zip(seq.which, seq.starts)}) == len(seq.starts)  # each window once an epoch
    assert (3999 - 15) // 16 + (5999 - 15) // 16 <= len(seq.starts) <= 3999 // 16 + 5999 // 16  # every whole window, any phase
    assert windows.shape == (len(seq.starts), 17)
    other = loader.ShuffledSequences(shards.list_shards(tmp_path, "train"), 16, seed=4)
    assert not np.array_equal(other.starts, loader.ShuffledSequences(shards.list_shards(tmp_path, "train"), 16, seed=3).starts)
    state = seq.state()  # a new epoch began on the next take; its state restores the same order
    after = seq.take(7)
    seq.restore(state)
    assert np.array_equal(seq.take(7), after)


def test_resume_with_the_whole_recipe_ends_bit_identical(data):
    model_p, t, d = setup(iterations=6, checkpoint_every=2, **RECIPE)
    full = trainer.build(model_p, 1, d.device)
    trainer.train(full, t, d, data / "data/shards", data / "runs/full", 1)

    def interrupt(run):
        if run.step == 5:
            raise KeyboardInterrupt  # as kill -9: the last checkpoint is step 4's

    cut = trainer.build(model_p, 1, d.device)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cut, t, d, data / "data/shards", data / "runs/cut", 1, on_step=interrupt)
    resumed = trainer.build(model_p, 999, d.device)
    trainer.train(resumed, replace(t, resume=True), d, data / "data/shards", data / "runs/cut", 1)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_stops_early_enough_for_the_hessians(data, monkeypatch):
    now = iter(range(10**6))
    monkeypatch.setattr(trainer, "clock", lambda: 0.05 * next(now))  # each step takes 100 ms of budget
    model_p, t, d = setup(iterations=10_000, max_seconds=1.0, hessian_reserve_seconds=0.3)
    run = trainer.train(trainer.build(model_p, 1, d.device), t, d, data / "data/shards", data / "runs/t", 1)
    assert run.stopped_by == "time" and run.step == 7  # 700 ms of the 1 s: 300 left for calibration


@pytest.mark.parametrize("bad,key", [(dict(muon_ns="cubic"), "train.muon_ns"), (dict(ema_decay=1.0), "train.ema_decay"),
                                     (dict(warmdown_frac=1.5), "train.warmdown_frac"), (dict(order="random"), "train.order"),
                                     (dict(max_seconds=10, hessian_reserve_seconds=10), "train.hessian_reserve_seconds")])
def test_bad_recipe_params_name_their_key(bad, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        setup(**bad)


def test_record_profiles_carry_the_records_logged_recipe():
    logged = {  # train_seed42.log of each record, "Hyperparameters:"
        "record-1394": dict(matrix_lr=0.02, scalar_lr=0.02, tied_embed_lr=0.03, muon_momentum=0.99, muon_momentum_warmup_start=0.92,
                            muon_momentum_warmup_steps=1500, beta2=0.95, grad_clip_norm=0.3, muon_wd=0.085, embed_wd=0.085, adam_wd=0.02,
                            warmdown_frac=0.667, min_lr=0.0, loop_at=0.5, ema_decay=0.997, muon_row_normalize=True, muon_ns="quintic",
                            seq_len=2048, batch_tokens=786432, hessian_reserve_seconds=12.0, max_seconds=600, embed_lr=0.6, head_lr=0.008,
                            warmup_steps=20, iterations=20000, adam_eps=1e-8, beta1=0.9, muon_backend_steps=5, order="shuffled"),
        "record-1855": dict(matrix_lr=0.026, scalar_lr=0.02, tied_embed_lr=0.03, muon_momentum=0.97, muon_momentum_warmup_start=0.92,
                            muon_momentum_warmup_steps=1500, beta2=0.99, grad_clip_norm=0.3, muon_wd=0.095, embed_wd=0.085, adam_wd=0.02,
                            warmdown_frac=0.85, min_lr=0.1, loop_at=0.35, ema_decay=0.9965, muon_row_normalize=True, muon_ns="polar_express",
                            seq_len=2048, batch_tokens=786432, hessian_reserve_seconds=0.5, max_seconds=600, embed_lr=0.6,
                            warmup_steps=20, iterations=20000, adam_eps=1e-8, beta1=0.9, muon_backend_steps=5, order="sequential"),
    }
    for name, want in logged.items():
        t = params.section(params.load(REPO / f"profiles/{name}.yaml"), "train", TrainParams)
        assert {k: getattr(t, k) for k in want} == want, name
