"""Per-document LoRA adapters for test-time training (PR #1855's BatchedTTTLoRA).

One adapter per document of a batch, added where the record adds them: to the query, key and value
projections (reading the block's normed input), beside the attention output and beside the MLP (each
reading its own normed input), and to the head's logits before the soft cap. Each run of a block gets its
own adapters, so depth recurrence adapts every pass separately, as the record's slots do.

Adapter b adds (x A_bᵀ) B_bᵀ · alpha/rank. B starts at zero, so a fresh adapter leaves the model exactly as
it is; A starts at one seeded draw shared by every document (the record draws one per batch slot), so what
a document's adapter does depends on that document alone, whatever batch it lands in.
"""
from __future__ import annotations

import collections
import math

import torch
from torch import Tensor, nn

from pgolf.model import GPT, layer_order

TARGETS = ("q", "k", "v", "o", "mlp", "head")


def adapters(model: GPT, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Each adapter's key and (inputs, outputs): one per target and run of a block (the head: one)."""
    p = model.p
    kv = p.kv_heads * (p.dim // p.heads)
    width = {"q": (p.dim, p.dim), "k": (p.dim, kv), "v": (p.dim, kv), "o": (p.dim, p.dim), "mlp": (p.dim, p.dim), "head": (p.dim, p.vocab_size)}
    runs = len(layer_order(p, model.looping))
    return {f"{name}{slot}": width[name] for name in targets for slot in range(1 if name == "head" else runs)}


def adapter_params(model: GPT, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of one document's adapters (A and B of every adapter), from the shapes alone."""
    return rank * sum(n_in + n_out for n_in, n_out in adapters(model, targets).values())


class DocLoRA(nn.Module):
    def __init__(self, model: GPT, docs: int, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0):
        super().__init__()
        self.targets, self.scale = tuple(targets), alpha / rank
        self.order = layer_order(model.p, model.looping)
        g = torch.Generator().manual_seed(seed)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for key, (n_in, n_out) in adapters(model, self.targets).items():
            bound = 1 / math.sqrt(n_in)
            a0 = torch.empty(rank, n_in).uniform_(-bound, bound, generator=g)
            self.A[key] = nn.Parameter(a0.expand(docs, rank, n_in).clone())
            self.B[key] = nn.Parameter(torch.zeros(docs, n_out, rank))

    def delta(self, key: str, x: Tensor) -> Tensor:
        """The adapters' addition for inputs x [docs, T, n_in], row i adapted by document slot i."""
        a, b = self.A[key].to(x.dtype), self.B[key].to(x.dtype)
        return (x @ a.transpose(1, 2)) @ b.transpose(1, 2) * self.scale

    def logits(self, model: GPT, idx: Tensor) -> Tensor:
        """Soft-capped logits [docs, T, vocab] of inputs idx [docs, T], slot i's adapters on row i."""
        runs = collections.Counter()
        slots = collections.defaultdict(list)  # block -> the slots of its runs, in order
        for slot, block in enumerate(self.order):
            slots[block].append(slot)

        def hook(block: int, name: str):
            def add(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
                slot = slots[block][runs[block, name]]
                runs[block, name] += 1
                return out + self.delta(f"{name}{slot}", args[0])
            return add

        handles = []
        for i, b in enumerate(model.blocks):
            for name, module in (("q", b.attn.c_q), ("k", b.attn.c_k), ("v", b.attn.c_v), ("o", b.attn), ("mlp", b.mlp)):
                if name in self.targets:
                    handles.append(module.register_forward_hook(hook(i, name)))
        try:
            h = model.hidden(idx)
        finally:
            for handle in handles:
                handle.remove()
        return model.head(h, self.delta("head0", h) if "head" in self.targets else None)
