"""Score-first test-time training (TTT): the model adapts to the validation stream it has already scored.

chunk_sgd (PR #549's chunked TTT): the pass-1 windows are grouped into chunks of about `chunk_tokens`
targets, in stream order. Each chunk is scored first, under inference mode, with the model as the
earlier chunks left it; then, unless it is the last, the model trains on that chunk's tokens for
`epochs` epochs of SGD with momentum (learning rate cosine-decayed over the chunks, gradients clipped),
only the last `blocks` blocks (0: every parameter). A target is therefore never scored by a model that
has seen it: score before update, one left-to-right pass.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from pgolf.errors import InputError
from pgolf.model import GPT
from pgolf.score import score_batch
from pgolf.tilt import Tilt
from pgolf.windows import Windows

METHODS = ("none", "chunk_sgd")


@dataclasses.dataclass(frozen=True)
class TTTParams:
    method: str  # none (the records are pass 1's) | chunk_sgd
    chunk_tokens: int  # targets per chunk (PR #549: 32,768)
    epochs: int  # passes over each chunk after it is scored
    lr: float  # SGD learning rate of the first chunk; cosine-decayed to 0 over the chunks
    momentum: float
    grad_clip: float  # max gradient norm; 0 = none
    blocks: int  # train the last N blocks only; 0 = every parameter
    batch_seqs: int  # training sequences of eval.seq_len per step

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"params.yaml: ttt.method is {self.method!r}; use {' or '.join(METHODS)}")
        if self.chunk_tokens < 1 or self.epochs < 0 or self.batch_seqs < 1 or self.blocks < 0:
            raise InputError("params.yaml: ttt.chunk_tokens and ttt.batch_seqs must be positive, ttt.epochs and ttt.blocks >= 0")
        if self.lr < 0 or not 0 <= self.momentum < 1 or self.grad_clip < 0:
            raise InputError("params.yaml: ttt.lr and ttt.grad_clip must be >= 0 and ttt.momentum in [0, 1)")


def chunks(w: Windows, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive runs of windows (i, j), each closed once it holds chunk_tokens scored targets or more."""
    out, start, count = [], 0, 0
    for k, n in enumerate(w.scored):
        count += int(n)
        if count >= chunk_tokens:
            out.append((start, k + 1))
            start, count = k + 1, 0
    if start < len(w):
        out.append((start, len(w)))
    return out


def trainable(model: GPT, blocks: int) -> list[torch.nn.Parameter]:
    """The parameters TTT updates: every one, or those of the last `blocks` blocks."""
    if blocks == 0:
        return list(model.parameters())
    return [p for b in model.blocks[-blocks:] for p in b.parameters()]


def chunk_sgd(model: GPT, tokens: np.ndarray, w: Windows, batch: int, seq_len: int, tp: TTTParams, device: torch.device,
              before_chunk: Callable[[int, int, GPT], None] | None = None, tilt: Tilt | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (i, j, [2, targets] NLL and entropy) for windows i..j-1 in stream order, each chunk scored
    before the model trains on it. The model is changed in place. before_chunk(i, j, model) sees the
    model that scores windows i..j-1 (the report's audits read its distributions there). `tilt`: the token
    tilt on every scored distribution (pgolf/tilt.py); training sees the plain model."""
    params = trainable(model, tp.blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=tp.lr, momentum=tp.momentum)
    spans = chunks(w, tp.chunk_tokens)
    for k, (i, j) in enumerate(spans):
        model.eval()
        if before_chunk is not None:
            before_chunk(i, j, model)
        for b in range(i, j, batch):
            yield b, min(b + batch, j), score_batch(model, tokens, w, b, min(b + batch, j), device, tilt).cpu().numpy()
        if k == len(spans) - 1 or tp.epochs == 0:
            continue
        targets = w.targets(i, j)
        span = tokens[int(targets[0]) - 1 : int(targets[-1]) + 1].astype(np.int64)  # the chunk's inputs and targets
        for group in opt.param_groups:
            group["lr"] = tp.lr * 0.5 * (1 + math.cos(math.pi * k / max(1, len(spans) - 1)))
        model.train()
        for _ in range(tp.epochs):
            for start in range(0, len(span) - 1, seq_len * tp.batch_seqs):
                piece = span[start : start + seq_len * tp.batch_seqs + 1]
                rows = (len(piece) - 1) // seq_len
                if rows == 0:  # the chunk's tail, shorter than one sequence
                    x, y = piece[None, :-1], piece[None, 1:]
                else:
                    x, y = piece[: rows * seq_len].reshape(rows, seq_len), piece[1 : rows * seq_len + 1].reshape(rows, seq_len)
                loss = model(torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(np.ascontiguousarray(y)).to(device))
                loss.backward()
                if tp.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, tp.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
    model.eval()


def state_bytes(model: GPT, tp: TTTParams) -> int:
    """What TTT holds beyond the artifact: its trained parameters and their momentum, float32."""
    if tp.method == "none":
        return 0
    return 2 * 4 * sum(p.numel() for p in trainable(model, tp.blocks))
