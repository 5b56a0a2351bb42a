"""Muon: momentum whose update is orthogonalised by a Newton-Schulz iteration (from modded-nanogpt).

Used for the 2-D matrices of the transformer blocks. With several processes each one
orthogonalises a share of the matrices and an all-reduce assembles the full update.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.runtime import ns_dtype


def zeropower_via_newtonschulz5(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """An approximately orthogonal matrix with g's singular vectors (quintic Newton-Schulz iteration)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(ns_dtype(g.device))
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            device = params[0].device
            updates = torch.zeros(sum(p.numel() for p in params), device=device, dtype=ns_dtype(device))
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    g = zeropower_via_newtonschulz5(g, steps=group["backend_steps"])
                    g = g * max(1, g.size(0) / g.size(1)) ** 0.5  # scale correction of the reference Muon
                    updates[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(updates[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
