"""Token batches from challenge shards: the official trainer's sequential order, or the records' shuffled one.

sequential: the train shards as one stream that wraps around; each micro-step takes the next
(local + 1) * world tokens and hands process r the r-th span.
shuffled: every shard cut, from a random phase, into windows of seq_len + 1 tokens; each epoch puts all
windows of all shards in one seeded random order (as PR #1394's loader draws them: a shard with
probability proportional to what it has left, then one of its windows at random), and process r takes the
r-th share of each micro-batch. Either way the global batch and its order are the same for any number of
processes, and a resumed run continues exactly where it stopped.
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


class ShuffledSequences:
    def __init__(self, paths: list[Path], seq_len: int, seed: int):
        if not paths:
            raise InputError("no training shards (data/shards/fineweb_train_*.bin): tokenize some training documents")
        self.shards = [shards.read_tokens(p) for p in paths]  # memory-mapped
        self.seq_len, self.seed = seq_len, seed
        self.restore({"epoch": 0, "pos": 0})

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
        which, starts = [], []
        for i, tokens in enumerate(self.shards):
            max_phase = min(self.seq_len - 1, max(0, len(tokens) - self.seq_len - 1))
            phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
            count = max((len(tokens) - 1 - phase) // self.seq_len, 0)
            which.append(np.full(count, i, dtype=np.int32))
            starts.append(phase + np.arange(count, dtype=np.int64) * self.seq_len)
        order = rng.permutation(sum(len(w) for w in which))
        self.which, self.starts = np.concatenate(which)[order], np.concatenate(starts)[order]
        if not len(self.starts):
            raise InputError(f"the training shards hold no window of train.seq_len + 1 = {self.seq_len + 1} tokens")

    def take(self, n: int) -> np.ndarray:
        """The next n windows [n, seq_len + 1], starting a new epoch's order when this one runs out."""
        rows = []
        for _ in range(n):
            if self.pos == len(self.starts):
                self.restore({"epoch": self.epoch + 1, "pos": 0})
            start = self.starts[self.pos]
            rows.append(self.shards[self.which[self.pos]][start : start + self.seq_len + 1])
            self.pos += 1
        return np.stack(rows)


class TrainLoader:
    def __init__(self, shards_dir: Path, rank: int, world: int, device: torch.device, order: str = "sequential",
                 seq_len: int = 0, seed: int = 0):
        self.rank, self.world, self.device = rank, world, device
        paths = shards.list_shards(shards_dir, "train")
        self.stream = TokenStream(paths) if order == "sequential" else ShuffledSequences(paths, seq_len, seed)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.stream, ShuffledSequences):
            n = local_tokens // seq_len
            rows = torch.from_numpy(self.stream.take(n * self.world)[self.rank * n : (self.rank + 1) * n].astype(np.int64))
            x, y = rows[:, :-1], rows[:, 1:]
        else:
            span = local_tokens + 1  # one extra token so that targets are inputs shifted by one
            chunk = self.stream.take(span * self.world)[self.rank * span : (self.rank + 1) * span]
            local = torch.from_numpy(chunk.astype(np.int64))
            x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        return x.contiguous().to(self.device, non_blocking=True), y.contiguous().to(self.device, non_blocking=True)
