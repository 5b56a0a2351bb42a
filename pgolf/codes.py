"""What an artifact's integer codes mean: codes times their row's scale, plus any LQER correction A B
(pgolf/lqer.py), and the float network they make.

Shared by the loader (pgolf/artifact.py) and calibration (pgolf/quantize.py), so neither imports the other.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pgolf.model import GPT, ModelParams


LQER_PARTS = ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale")  # a corrected matrix's factors: codes, scales
SUFFIXES = (".codes", ".scale") + tuple(f".{part}" for part in LQER_PARTS)  # tensors that are parts of a matrix


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale.float()[:, None]


def dequantize_groups(codes: Tensor, scale: Tensor) -> Tensor:
    """Codes times the scale of their group: scale.numel() equal runs of the flattened codes."""
    return (codes.float().reshape(scale.numel(), -1) * scale.float()[:, None]).reshape(codes.shape)


def weight(tensors: dict[str, Tensor], name: str) -> Tensor:
    """A quantized matrix: its codes times row scales, plus A B where LQER corrected it."""
    w = dequantize(tensors[f"{name}.codes"], tensors[f"{name}.scale"])
    if f"{name}.lqer_a" in tensors:
        a, a_scale, b, b_scale = (tensors[f"{name}.{part}"] for part in LQER_PARTS)
        w = w + dequantize_groups(a, a_scale) @ dequantize_groups(b, b_scale)
    return w


def model_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> GPT:
    """The float network the codes stand for, in the network meta["model"] names."""
    state = {k: v for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    for name in meta["quantized"]:
        state[name] = weight(tensors, name)
    model = GPT(ModelParams(**meta["model"]))
    model.load_state_dict(state, strict=True)
    return model
