"""Muon: momentum whose update is orthogonalised by a Newton-Schulz iteration (from modded-nanogpt), with the
records' variants: Polar Express coefficients, row-normalised updates, decoupled weight decay.

Used for the 2-D matrices of the transformer blocks. With several processes each one
orthogonalises a share of the matrices and an all-reduce assembles the full update.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.runtime import ns_dtype


# (a, b, c) of each quintic step x <- a x + (b s + c s^2) x, s = x x^T.
QUINTIC = ((3.4445, -4.7750, 2.0315),)  # modded-nanogpt's: one tuple for every step (the baseline)
# Polar Express (Amsel et al. 2025) as PR #1855 runs it: a tuple per step, tuned for 5 steps; later steps reuse the last.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_COEFFICIENTS = {"quintic": QUINTIC, "polar_express": POLAR_EXPRESS}


def zeropower_via_newtonschulz5(g: Tensor, steps: int, eps: float = 1e-7, coefficients: tuple = QUINTIC) -> Tensor:
    """An approximately orthogonal matrix with g's singular vectors (quintic Newton-Schulz iteration)."""
    x = g.to(ns_dtype(g.device))
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """row_normalize: each row of the momentum update scaled to unit norm before orthogonalising (MuonEq-R, the
    records'); weight_decay: decoupled, p <- p (1 - lr wd) before the update; ns: quintic | polar_express."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True,
                 weight_decay: float = 0.0, row_normalize: bool = False, ns: str = "quintic"):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      weight_decay=weight_decay, row_normalize=row_normalize, ns=ns))

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
                    if group["row_normalize"]:
                        g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype)
                    g = zeropower_via_newtonschulz5(g, steps=group["backend_steps"], coefficients=NS_COEFFICIENTS[group["ns"]])
                    g = g * max(1, g.size(0) / g.size(1)) ** 0.5  # scale correction of the reference Muon
                    updates[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(updates[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
