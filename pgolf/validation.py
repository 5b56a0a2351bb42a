"""The trainer's validation, as the official train_gpt.py computes it: the validation stream cut into
non-overlapping windows of the training length, loss and bits per byte. (The score stage's sliding
windows, which score every target once with more context, are pgolf/score.py.)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pgolf import shards
from pgolf.errors import InputError
from pgolf.runtime import Dist, all_reduce, autocast


def validation_tokens(shards_dir: Path, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """The validation stream cut to whole sequences (+1 for the last target); max_tokens > 0 keeps that many."""
    tokens = shards.split_tokens(shards_dir, "val")
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise InputError(f"{shards_dir}: the validation split is shorter than one sequence of {seq_len} tokens")
    return tokens[: usable + 1]


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_seqs: int, nbytes: np.ndarray, d: Dist) -> tuple[float, float]:
    """(val_loss in nats per token, val_bpb) of `tokens` cut into windows of seq_len, with the bytes of every
    target by position (pgolf.bpb.position_bytes); each process scores a slice."""
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
        sums[2] += int(nbytes[start * seq_len + 1 : end * seq_len + 1].sum(dtype=np.int64))
    model.train(was_training)
    nll, count, total_bytes = all_reduce(sums).tolist()
    val_loss = nll / count
    return val_loss, val_loss / math.log(2) * count / total_bytes
