"""Validation loss and bits per byte over non-overlapping windows, as the official trainer computes them."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from pgolf.bpb import ByteTables
from pgolf.distributed import Dist, all_reduce


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_seqs: int, tables: ByteTables, d: Dist) -> tuple[float, float]:
    """(val_loss in nats per token, val_bpb) of `tokens` cut into windows of seq_len; each process scores a slice."""
    n_seqs = (len(tokens) - 1) // seq_len
    first, last = n_seqs * d.rank // d.world, n_seqs * (d.rank + 1) // d.world
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # nll, tokens, bytes
    was_training = model.training
    model.eval()
    for start in range(first, last, batch_seqs):
        end = min(start + batch_seqs, last)
        chunk = tokens[start * seq_len : end * seq_len + 1].astype(np.int64)
        x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
        with autocast(d.device):
            loss = model(torch.from_numpy(x).to(d.device), torch.from_numpy(y).to(d.device))
        sums[0] += loss.double() * y.size
        sums[1] += y.size
        sums[2] += int(tables.target_bytes(x, y).sum(dtype=np.int64))
    model.train(was_training)
    nll, count, nbytes = all_reduce(sums).tolist()
    val_loss = nll / count
    return val_loss, val_loss / math.log(2) * count / nbytes
