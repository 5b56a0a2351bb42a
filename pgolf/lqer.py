"""LQER: a low-rank correction of the largest quantization errors, itself stored in a few bits.

After GPTQ, each quantized matrix leaves an error E = W - Ŵ. The top_k matrices by ‖E‖_F get the
truncated SVD E ≈ A B (A = U_r S_r [rows, r], B = V_rᵀ [r, cols]), and A and B are quantized too:
signed codes in [-2^(b-1), 2^(b-1) - 1] with scale max|x| / (2^(b-1) - 1/2) per group of values,
A with one scale for the whole factor and B with one per `group` values (PR #1855: rank 4, top 3,
A at 2 bits, B at 4 bits in groups of 64). The loader adds A B to the dequantized matrix
(pgolf/codes.weight); this module only computes the factors.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from pgolf.errors import InputError


@dataclasses.dataclass(frozen=True)
class LqerParams:
    rank: int  # rank of each correction; 0 = off
    top_k: int  # matrices corrected: those with the largest ‖W - Ŵ‖_F
    a_bits: int  # bits of A's codes (one scale for all of A)
    b_bits: int  # bits of B's codes (one scale per `group` values)
    group: int  # values of B per scale; a row of B that it does not divide gets one scale per row

    def __post_init__(self) -> None:
        if self.rank < 0 or self.top_k < 0 or self.group < 1:
            raise InputError("params.yaml: quant.lqer.rank and top_k must be >= 0 and quant.lqer.group >= 1")
        for key in ("a_bits", "b_bits"):
            if not 2 <= getattr(self, key) <= 8:
                raise InputError(f"params.yaml: quant.lqer.{key} is {getattr(self, key)}; use 2..8")


def quantize_groups(x: Tensor, bits: int, groups: int) -> tuple[Tensor, Tensor]:
    """x [rows, cols] as int8 codes of `bits` bits and float16 scales, one per `groups` equal runs of the
    flattened values (groups must divide x.numel())."""
    flat = x.double().reshape(groups, -1)
    half = 2 ** (bits - 1)
    scale = (flat.abs().amax(1) / (half - 0.5)).clamp_min(torch.finfo(torch.float16).tiny).half()
    codes = torch.clamp(torch.round(flat / scale.double()[:, None]), -half, half - 1)
    return codes.to(torch.int8).reshape(x.shape), scale


def factors(err: Tensor, p: LqerParams) -> dict[str, Tensor]:
    """The quantized rank-p.rank factors of err [rows, cols], as the artifact stores them."""
    U, S, Vh = torch.linalg.svd(err.double(), full_matrices=False)
    r = min(p.rank, S.numel())
    A, B = U[:, :r] * S[:r], Vh[:r]
    b_groups = B.numel() // p.group if B.size(1) % p.group == 0 else B.size(0)
    a_codes, a_scale = quantize_groups(A, p.a_bits, 1)
    b_codes, b_scale = quantize_groups(B, p.b_bits, b_groups)
    return {"lqer_a": a_codes, "lqer_a_scale": a_scale, "lqer_b": b_codes, "lqer_b_scale": b_scale}


def correct(weights: dict[str, Tensor], dequantized: dict[str, Tensor], p: LqerParams) -> dict[str, Tensor]:
    """Factors for the top_k matrices by error, named `{matrix}.lqer_a` etc. (empty when rank is 0)."""
    if p.rank == 0 or p.top_k == 0:
        return {}
    norms = {n: float((weights[n].double() - dequantized[n].double()).norm()) for n in dequantized}
    top = sorted(norms, key=lambda n: (-norms[n], n))[: p.top_k]
    out = {}
    for name in top:
        for part, t in factors(weights[name].double() - dequantized[name].double(), p).items():
            out[f"{name}.{part}"] = t
    return out

