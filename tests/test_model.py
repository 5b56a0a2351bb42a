import dataclasses

import torch

from pgolf import params, trainer
from pgolf.model import GPT, ModelParams
from conftest import TINY_MODEL, default_params

BASELINE = dict(layers=9, dim=512, heads=8, kv_heads=4, mlp_mult=2, vocab_size=1024, tie_embeddings=True)


def model_params(**overrides) -> ModelParams:
    return dataclasses.replace(params.section(default_params(), "model", ModelParams), **overrides)


def test_baseline_shape_has_the_official_parameter_count():
    assert sum(p.numel() for p in GPT(model_params(**BASELINE)).parameters()) == 17_059_912


def test_untied_head_adds_its_matrix():
    tied = sum(p.numel() for p in GPT(model_params(**TINY_MODEL)).parameters())
    untied = sum(p.numel() for p in GPT(model_params(**{**TINY_MODEL, "tie_embeddings": False})).parameters())
    assert untied - tied == 32 * 1024


def test_logits_are_causal_and_soft_capped():
    torch.manual_seed(0)
    model = GPT(model_params(**TINY_MODEL, logit_softcap=2.0))
    for p in model.parameters():  # zero-initialised projections would hide any leak
        torch.nn.init.normal_(p, std=0.5)
    idx = torch.randint(0, 1024, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 1024, (2, 7))
    with torch.no_grad():
        a, b = model.logits(idx), model.logits(changed)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.equal(a[:, 9:], b[:, 9:])
    assert a.abs().max() <= 2.0


def test_optimizer_groups_cover_every_parameter_once():
    model = GPT(model_params(**TINY_MODEL))
    groups = trainer.param_groups(model)
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups["matrix"]) and len(groups["matrix"]) == 6 * TINY_MODEL["layers"]
