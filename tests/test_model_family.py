"""The record family's features, each against a small plain reference."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf import params, trainer
from pgolf.errors import InputError
from pgolf.model import BOS_ID, GPT, ModelParams, Rotary, apply_rotary, document_mask, layer_order, remove_self_value, split
from conftest import REPO, default_params

# Every feature on, at a size a CPU trains in seconds.
ALL_ON = dict(layers=5, dim=64, heads=4, kv_heads=2, mlp_mult=3.0, vocab_size=256, mlp_activation="leaky_relu2", rope_dims=8,
              rope_scale_len=16, layer_norm_scale=True, xsa_last=3, skip_gates=True, parallel_start=3, loops=2, loop_start=1,
              loop_end=2, smear_gate=True, attn_gate=True, attn_gate_scale=0.5, gate_window=8, doc_attention=True, init="orthogonal")


def model_params(**overrides) -> ModelParams:
    return dataclasses.replace(params.section(default_params(), "model", ModelParams), **overrides)


def randomized(model: GPT, std: float = 0.3) -> GPT:
    """Zero-initialised projections and gates would hide every feature: give each tensor random values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def test_partial_rotary_matches_a_per_pair_loop():
    head_dim, dims, base, t = 16, 6, 500.0, 7
    x = torch.randn(2, t, 3, head_dim)
    got = apply_rotary(x, *Rotary(dims, base)(t, x.device, x.dtype))
    want = x.clone().double()
    for pos in range(t):
        for i in range(dims // 2):
            angle = pos * base ** (-2 * i / dims)
            a, b = x[:, pos, :, i].double(), x[:, pos, :, i + dims // 2].double()
            want[:, pos, :, i] = a * math.cos(angle) + b * math.sin(angle)
            want[:, pos, :, i + dims // 2] = b * math.cos(angle) - a * math.sin(angle)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.equal(got[..., dims:], x[..., dims:])  # the rest of each head is left alone


def test_rotary_base_is_ntk_scaled_only_beyond_its_length():
    r = Rotary(8, 10000.0, scale_len=16)
    cos_short, _ = r(16, torch.device("cpu"), torch.float32)
    assert torch.equal(cos_short, Rotary(8, 10000.0)(16, torch.device("cpu"), torch.float32)[0])
    cos_long, _ = r(64, torch.device("cpu"), torch.float32)
    scaled = Rotary(8, 10000.0 * 4.0 ** (8 / 6))(64, torch.device("cpu"), torch.float32)[0]
    assert torch.allclose(cos_long, scaled, atol=1e-6) and not torch.allclose(cos_long, Rotary(8, 10000.0)(64, torch.device("cpu"), torch.float32)[0])


def test_xsa_removes_each_heads_own_value_direction():
    y, v = torch.randn(2, 5, 4, 8, dtype=torch.float64), torch.randn(2, 5, 2, 8, dtype=torch.float64)
    got = remove_self_value(y, v)
    want = torch.empty_like(y)
    for b in range(2):
        for t in range(5):
            for h in range(4):
                u = v[b, t, h // 2] / v[b, t, h // 2].norm()  # heads 0,1 share kv head 0; 2,3 share 1
                want[b, t, h] = y[b, t, h] - (y[b, t, h] @ u) * u
    assert torch.allclose(got, want, atol=1e-12)
    assert (got.reshape(2, 5, 2, 2, 8) * v[:, :, :, None]).sum(-1).abs().max() < 1e-12


@pytest.mark.parametrize("layers,start,end,loops", [(11, 4, 5, 2), (11, 3, 5, 2), (6, 0, 0, 1), (5, 0, 4, 1), (7, 2, 6, 3), (9, 4, 4, 0)])
def test_layer_order_repeats_the_span(layers, start, end, loops):
    p = model_params(layers=layers, dim=32, heads=2, kv_heads=1, loops=loops, loop_start=start, loop_end=end)
    want = []
    for i in range(layers):  # plain: run each layer; after the span's last layer, run the span `loops` more times
        want.append(i)
        if loops and i == end:
            want += list(range(start, end + 1)) * loops
    assert layer_order(p) == want
    assert layer_order(p, looping=False) == list(range(layers))


def test_layer_orders_are_the_records_logged_ones():
    # train_seed42.log of each record: "layer_loop:enabled ... encoder:[...] decoder:[...]"
    p1394 = params.section(params.load(REPO / "profiles/record-1394.yaml"), "model", ModelParams)
    p1855 = params.section(params.load(REPO / "profiles/record-1855.yaml"), "model", ModelParams)
    assert split(layer_order(p1394)) == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])
    assert split(layer_order(p1855)) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])


def test_record_profiles_have_the_records_logged_parameter_counts():
    counts = {}
    for name in ("record-1394", "record-1855", "8xh100"):
        p = params.section(params.load(REPO / f"profiles/{name}.yaml"), "model", ModelParams)
        with torch.device("meta"):
            counts[name] = sum(t.numel() for t in GPT(p).parameters())
    assert counts == {"record-1394": 35_943_512, "record-1855": 35_945_671, "8xh100": 17_059_912}  # model_params: in the logs


def reference_hidden(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT.hidden written out plainly: the same submodules, every residual, skip and lane step spelled out."""
    p = model.p
    x = model.tok_emb(idx)
    if p.smear_gate:
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
        gate = model.smear.lam * torch.sigmoid(x[..., : p.gate_window] @ model.smear.gate.weight.T)
        x = x + gate * prev * (idx != BOS_ID)[..., None]
    x0 = x = F.rms_norm(x, (p.dim,))
    mask = document_mask(idx) if p.doc_attention else None

    def norm(h, i):
        return F.rms_norm(h, (p.dim,)) / (math.sqrt(i + 1) if p.layer_norm_scale else 1.0)

    def attn(i, h):
        return model.blocks[i].attn_scale * model.blocks[i].attn(norm(h, i), mask)

    def mlp(i, h):
        return model.blocks[i].mlp_scale * model.blocks[i].mlp(norm(h, i))

    def block(i, h):
        h = model.blocks[i].resid_mix[0] * h + model.blocks[i].resid_mix[1] * x0
        h = h + attn(i, h)
        return h + mlp(i, h)

    order = layer_order(p)
    encoder, decoder = order[: len(order) // 2], order[len(order) // 2 :]
    kept, lanes = [], False
    for i in encoder:
        x = block(i, x)
        kept.append(x)
    for j, i in enumerate(decoder):
        if p.parallel_start and i >= p.parallel_start and not lanes:
            lanes, attn_lane, mlp_lane = True, x, x
        if kept and j < model.skip_weights.size(0):
            s, into = model.skip_weights[j] * kept.pop(), attn_lane if lanes else x
            if p.skip_gates:
                g = torch.sigmoid(model.skip_gates[j])
                into = (1 - g) * s + g * into
            else:
                into = into + s
            if lanes:
                attn_lane = into
            else:
                x = into
        if lanes:
            mix = model.blocks[i].resid_mix
            a, m = attn(i, mix[0] * attn_lane + mix[1] * x0), mlp(i, mlp_lane)
            r, post = model.lane_resid[i], model.lane_post[i]
            attn_lane, mlp_lane = r[0] * attn_lane + post[0, 0] * a + post[1, 0] * m, r[1] * mlp_lane + post[0, 1] * a + post[1, 1] * m
        else:
            x = block(i, x)
    if lanes:
        x = (attn_lane + mlp_lane) / 2
    return F.rms_norm(x, (p.dim,))


@pytest.mark.parametrize("features", [
    dict(parallel_start=3, loops=2, loop_start=1, loop_end=2),
    dict(skip_gates=True, layer_norm_scale=True),
    ALL_ON,
])
def test_the_forward_matches_a_plain_reference(features):
    p = model_params(**{**dict(layers=5, dim=64, heads=4, kv_heads=2, vocab_size=256), **features})
    model = randomized(GPT(p))
    idx = torch.randint(2, 256, (2, 20))
    idx[:, 0], idx[0, 11] = BOS_ID, BOS_ID
    with torch.no_grad():
        assert torch.allclose(model.hidden(idx), reference_hidden(model, idx), atol=1e-5)


def test_leaky_relu_square_mlp_and_the_sparse_attention_gate_match_their_formulas():
    p = model_params(layers=1, dim=32, heads=2, kv_heads=1, mlp_mult=2.5, mlp_activation="leaky_relu2", leaky_slope=0.25,
                     attn_gate=True, attn_gate_scale=0.5, gate_window=4)
    block = randomized(GPT(p)).blocks[0]
    x = torch.randn(1, 6, 32)
    h = x @ block.mlp.fc.weight.T
    assert block.mlp.fc.weight.shape == (80, 32)  # int(2.5 * 32)
    with torch.no_grad():
        assert torch.allclose(block.mlp(x), torch.where(h > 0, h, 0.25 * h).square() @ block.mlp.proj.weight.T, atol=1e-5)
        ungated = dataclasses.replace(p, attn_gate=False)
        plain = GPT(ungated).blocks[0].attn
        plain.load_state_dict({k: v for k, v in block.attn.state_dict().items() if k != "gate"})
        gate = torch.sigmoid(0.5 * x[..., :4] @ block.attn.gate.T)  # [1, 6, heads]
        y_plain = (plain(x) @ torch.linalg.pinv(block.attn.proj.weight.T)).reshape(1, 6, 2, 16)  # undo the projection
        y_gated = (block.attn(x) @ torch.linalg.pinv(block.attn.proj.weight.T)).reshape(1, 6, 2, 16)
        assert torch.allclose(y_gated, y_plain * gate[..., None], atol=1e-4)


def test_smear_gives_a_bos_position_exactly_nothing_from_the_previous_document():
    model = randomized(GPT(model_params(**ALL_ON)))
    idx = torch.randint(2, 256, (1, 24))
    idx[0, 0], idx[0, 10] = BOS_ID, BOS_ID
    other = idx.clone()
    other[0, 1:10] = torch.randint(2, 256, (9,))  # a different previous document
    with torch.no_grad():
        x, y = model.tok_emb(idx), model.tok_emb(other)
        smeared_x, smeared_y = model.smear(x, idx), model.smear(y, other)
        assert torch.equal(smeared_x[0, 10], x[0, 10])  # the smear input at BOS is exactly zero
        assert torch.equal(smeared_x[0, 10:], smeared_y[0, 10:])
        assert not torch.equal(smeared_x[0, 1:10], x[0, 1:10])  # elsewhere it smears
        # with document attention too, the next document's logits do not depend on the previous one at all
        assert torch.equal(model.logits(idx)[0, 10:], model.logits(other)[0, 10:])


def test_document_mask_is_causal_within_documents():
    idx = torch.tensor([[BOS_ID, 5, 6, BOS_ID, 7, BOS_ID, 8, 9]])
    want = torch.zeros(8, 8, dtype=torch.bool)
    for q in range(8):
        for k in range(q + 1):
            want[q, k] = not any(idx[0, m] == BOS_ID for m in range(k + 1, q + 1))
    assert torch.equal(document_mask(idx)[0, 0], want)


def test_defaults_keep_the_baseline_and_looping_can_be_switched_off():
    assert ModelParams.__dataclass_fields__["mlp_activation"].default == "relu2"
    model = randomized(GPT(model_params(**{**ALL_ON, "doc_attention": False})))
    idx = torch.randint(2, 256, (1, 12))
    with torch.no_grad():
        looped = model.logits(idx)
        model.looping = False
        assert not torch.allclose(looped, model.logits(idx))


@pytest.mark.parametrize("bad,key", [
    (dict(mlp_activation="gelu"), "model.mlp_activation"), (dict(rope_dims=5), "model.rope_dims"), (dict(xsa_last=9), "model.xsa_last"),
    (dict(loops=1, loop_start=3, loop_end=2), "model.loops"), (dict(parallel_start=1), "model.parallel_start"),
    (dict(parallel_final="sum"), "model.parallel_final"), (dict(init="xavier"), "model.init"), (dict(mlp_mult=0.0), "model.mlp_mult"),
])
def test_bad_feature_params_name_their_key(bad, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        model_params(**{**ALL_ON, **bad})


def test_optimizer_groups_cover_every_feature_parameter_once():
    model = GPT(model_params(**ALL_ON))
    groups = trainer.param_groups(model)
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(groups["matrix"]) == 6 * ALL_ON["layers"]  # q, k, v, out, fc, proj: the gates go to Adam
    assert all(p.shape != (ALL_ON["heads"], ALL_ON["gate_window"]) for p in groups["matrix"])


def test_a_model_with_every_feature_learns_on_cpu():
    torch.manual_seed(0)
    model = GPT(model_params(**ALL_ON)).train()
    groups = trainer.param_groups(model)
    opt = torch.optim.Adam([p for g in groups.values() for p in g], lr=3e-3)
    seq = torch.arange(32) % 17 + 2  # a repeating pattern the model can learn
    idx = seq[None, :-1].repeat(4, 1)
    idx[:, 0] = BOS_ID
    losses = []
    for _ in range(30):
        loss = model(idx, seq[None, 1:].repeat(4, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torch_compile_on_cpu_gives_eager_loss_with_every_feature():
    torch.manual_seed(0)
    model = randomized(GPT(model_params(**ALL_ON)), std=0.1).train()
    idx = torch.randint(2, 256, (2, 24))
    idx[:, 0], idx[1, 13] = BOS_ID, BOS_ID
    eager = model(idx, idx)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, dynamic=False)(idx, idx)
    compiled.backward()
    # float32 on CPU: fused kernels reorder sums, so agreement is to rounding, not bitwise
    assert abs(compiled.item() - eager.item()) <= 1e-5 * abs(eager.item())
    assert all(torch.allclose(p.grad, grads[n], rtol=1e-3, atol=1e-5) for n, p in model.named_parameters())


def test_tokenizers_must_put_bos_where_the_model_masks(tmp_path):
    import io

    import sentencepiece as spm

    from pgolf import tokenizer

    assert tokenizer.CHALLENGE_SETTINGS["bos_id"] == BOS_ID
    model = io.BytesIO()
    text = ["the quick brown fox jumps over the lazy dog"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=30, minloglevel=2, bos_id=2, eos_id=1)
    (tmp_path / "bos2.model").write_bytes(model.getvalue())
    with pytest.raises(InputError, match="bos2.model: the tokenizer's BOS is id 2"):
        tokenizer.load(tmp_path / "bos2.model")
