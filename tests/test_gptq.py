import pytest
import torch

from pgolf import gptq
from pgolf.codes import dequantize


def correlated_layer(seed=0, n=2048, din=96, dout=48):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 12, generator=g) @ torch.randn(12, din, generator=g) + 0.05 * torch.randn(n, din, generator=g)
    W = 0.05 * torch.randn(dout, din, generator=g)
    return X, W, X.T.double() @ X.double()


def output_error(X, W, codes, scale):
    return (X @ W.T - X @ dequantize(codes, scale).T).norm().item()


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_gptq_output_error_is_well_below_rtn(bits):
    X, W, H = correlated_layer()
    g = output_error(X, W, *gptq.gptq(W, H, bits, block_size=32))
    r = output_error(X, W, *gptq.rtn(W, bits, H))
    assert g < 0.5 * r, (g, r)


@pytest.mark.parametrize("block_size, act_order", [(1, False), (7, True), (32, True), (1000, False)])
def test_blocked_gptq_gives_the_reference_codes(block_size, act_order):
    X, W, H = correlated_layer(seed=1)
    H[5, :] = H[:, 5] = 0  # a dead input
    fast = gptq.gptq(W, H, 4, damp=0.01, block_size=block_size, act_order=act_order)
    ref = gptq.gptq_reference(W, H, 4, damp=0.01, act_order=act_order)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert not fast[0][:, 5].any()  # the dead column's weights are dropped


def test_codes_and_scales_are_in_range():
    X, W, H = correlated_layer(seed=2)
    for bits in (2, 5, 8):
        codes, scale = gptq.gptq(W, H, bits)
        assert codes.dtype == torch.int8 and scale.dtype == torch.float16
        assert codes.abs().max() <= gptq.qmax(bits) and (scale > 0).all()


def test_clip_search_never_loses_to_no_clipping():
    X, W, H = correlated_layer(seed=3)
    W[0, 0] = 1.0  # an outlier makes clipping worth it
    best = gptq.rtn(W, 4, H)[1].double()  # the scales its clip search chose
    plain = (W.double().abs().amax(1) / gptq.qmax(4)).half().double()
    err = lambda s: gptq.h_error(W.double() - gptq.codes_for(W.double(), s, 4) * s[:, None], H)  # noqa: E731
    assert (err(best) <= err(plain) + 1e-12).all() and err(best).sum() < err(plain).sum()


def test_per_row_hessians_match_the_reference_row_by_row():
    X, W, H = correlated_layer(seed=4, dout=6)
    g = torch.Generator().manual_seed(5)
    Hs = torch.stack([H * (1 + i) + torch.diag(torch.rand(H.size(0), generator=g, dtype=torch.float64)) for i in range(6)])
    Hs[2, 3, :] = Hs[2, :, 3] = 0  # a dead input in one row only
    codes, scale = gptq.gptq_rows(W, Hs, 4)
    for r in range(6):
        c, s = gptq.gptq_reference(W[r : r + 1], Hs[r], 4, act_order=False)
        assert torch.equal(codes[r : r + 1], c) and torch.equal(scale[r : r + 1], s)
