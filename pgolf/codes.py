"""What an artifact's integer codes mean: codes times their row's scale, and the float network they make.

Shared by the loader (pgolf/artifact.py) and calibration (pgolf/quantize.py), so neither imports the other.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pgolf.model import GPT, ModelParams


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale.float()[:, None]


def model_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> GPT:
    """The float network the codes stand for: codes times row scales, in the network meta["model"] names."""
    state = {k: v for k, v in tensors.items() if not k.endswith((".codes", ".scale"))}
    for name in meta["quantized"]:
        state[name] = dequantize(tensors[f"{name}.codes"], tensors[f"{name}.scale"])
    model = GPT(ModelParams(**meta["model"]))
    model.load_state_dict(state, strict=True)
    return model
