"""Quantize a trained GPT: Hessians from calibration tokens, GPTQ or RTN per matrix, a safe file of codes.

Block matrices and the token embedding become int8-stored codes of `quant.bits.<class>` bits with
float16 row scales; the small control tensors stay float32. The tied embedding is quantized with
the Hessian of the output head's input (the final hidden states), since that is where its rounding
error reaches the loss. An untied input embedding has no input Hessian and is rounded to nearest.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgolf import gptq
from pgolf.artifact import model_from_tensors
from pgolf.model import GPT, CastedLinear
from pgolf.params import QuantParams
from pgolf.progress import Progress


def tensor_class(name: str) -> str | None:
    """attn | mlp | embed for quantized tensors, None for tensors kept in float."""
    if name in ("tok_emb.weight", "lm_head.weight"):
        return "embed"
    if name.endswith(".weight") and ".attn." in name:
        return "attn"
    if name.endswith(".weight") and ".mlp." in name:
        return "mlp"
    return None


@torch.no_grad()
def collect_hessians(model: GPT, tokens: np.ndarray, batch_seqs: int = 8) -> dict[str, torch.Tensor]:
    """H = XᵀX (float64) of the input X of every quantized matrix, over calibration sequences [n, seq]."""
    hessians: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.size(-1)).double()
        h = x.T @ x
        hessians[name] = hessians[name] + h if name in hessians else h

    hooks = [
        module.register_forward_hook(lambda m, inputs, out, name=name: add(f"{name}.weight", inputs[0]))
        for name, module in model.named_modules()
        if isinstance(module, CastedLinear) and tensor_class(f"{name}.weight")
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(tokens), batch_seqs):
            idx = torch.from_numpy(tokens[start : start + batch_seqs].astype(np.int64)).to(device)
            add("lm_head.weight" if model.lm_head is not None else "tok_emb.weight", model.hidden(idx))
    finally:
        for hook in hooks:
            hook.remove()
    if dist.is_initialized():
        for h in hessians.values():
            dist.all_reduce(h)
    return hessians


def quantize_model(model: GPT, hessians: dict[str, torch.Tensor], q: QuantParams) -> tuple[dict[str, torch.Tensor], dict]:
    """Codes, scales and float tensors, plus per-tensor metadata (bits, method, H-weighted error).

    With several processes each quantizes every world-th matrix and broadcasts its result.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    names = [n for n in state if tensor_class(n)]
    tensors: dict[str, torch.Tensor] = {n: v for n, v in state.items() if not tensor_class(n)}
    info: dict[str, dict] = {}
    progress = Progress("calibrate", total=len(names), unit="tensors", every=10)
    for i, name in enumerate(names):
        w, cls = state[name], tensor_class(name)
        bits = getattr(q.bits, cls)
        H = hessians.get(name)
        H = None if H is None else H.cpu()
        method = q.method if H is not None else "rtn"
        t = time.perf_counter()
        codes = torch.zeros(w.shape, dtype=torch.int8)
        scale = torch.zeros(w.shape[0], dtype=torch.float16)
        if i % world == rank:
            if method == "gptq":
                codes, scale = gptq.gptq(w, H, bits, q.damp, q.block_size, q.act_order)
            else:
                codes, scale = gptq.rtn(w, bits, H)
        if world > 1:
            dist.broadcast(codes, src=i % world)
            dist.broadcast(scale, src=i % world)
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = codes, scale
        err = w.double() - gptq.dequantize(codes, scale).double()
        info[name] = {
            "class": cls,
            "bits": bits,
            "method": method,
            "shape": list(w.shape),
            # Error relative to the weight's own H-weighted energy (plain squared error without H).
            "h_error": float(gptq.h_error(err, H).sum() / gptq.h_error(w.double(), H).sum()),
            "seconds": round(time.perf_counter() - t, 3),
        }
        progress.update()
    progress.done(f"{q.method}, bits attn/mlp/embed = {q.bits.attn}/{q.bits.mlp}/{q.bits.embed}")
    return tensors, {"model": dataclasses.asdict(model.p), "quantized": names, "tensors": info}


def dequantized(tensors: dict[str, torch.Tensor], meta: dict) -> GPT:
    """The float model the codes stand for (the same function the artifact's loader uses)."""
    return model_from_tensors(tensors, meta)
