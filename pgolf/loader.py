"""Token batches from challenge shards, in the official trainer's order.

Training reads the train shards as one stream that wraps around. Each micro-step takes the next
(local + 1) * world tokens and hands process r the r-th span, so the global batch and its order
are the same for any number of processes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf import shards
from pgolf.errors import InputError


class TokenStream:
    def __init__(self, paths: list[Path]):
        if not paths:
            raise InputError("no training shards (data/shards/fineweb_train_*.bin): tokenize some training documents")
        self.paths = paths
        self.restore({"file": 0, "pos": 0})

    def state(self) -> dict:
        return {"file": self.file, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.file, self.pos = state["file"], state["pos"]
        self.tokens = shards.read_tokens(self.paths[self.file])

    def take(self, n: int) -> np.ndarray:
        chunks = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.restore({"file": (self.file + 1) % len(self.paths), "pos": 0})
                continue
            k = min(n, len(self.tokens) - self.pos)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return np.concatenate(chunks)


class TrainLoader:
    def __init__(self, shards_dir: Path, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.stream = TokenStream(shards.list_shards(shards_dir, "train"))

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = local_tokens + 1  # one extra token so that targets are inputs shifted by one
        chunk = self.stream.take(span * self.world)[self.rank * span : (self.rank + 1) * span]
        local = torch.from_numpy(chunk.astype(np.int64))
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
