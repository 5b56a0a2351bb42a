"""Which context scores which target: the window plan of pass-1 scoring.

A stream x[0..N] has targets at positions 1..N; target t is predicted from inputs before it.
A window reads inputs x[begin:end] (end - begin <= seq_len) and scores the targets
score_from+1..end, the predictions at its last end - score_from inputs.

Within a segment of inputs [lo, hi) the first window is [lo, min(lo + seq_len, hi)) and scores all
its targets; each next window moves its end on by `stride` (the last one stops at hi) and scores
only the targets it added, with as much context as seq_len allows. So every target is scored
exactly once, the tail included, and always by the window ending at its block's end. The official
sliding evaluator instead scores the last `stride` targets of every window that starts before the
end, which counts some tail targets twice.

Without doc isolation the whole stream is one segment; with it each document is one: its BOS up to
the next BOS, which is its last target (predicting the document's end), so contexts never cross one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Windows:
    begin: np.ndarray  # int64 [W] first input position
    score_from: np.ndarray  # int64 [W] inputs before this only give context
    end: np.ndarray  # int64 [W] one past the last input; the last target scored is x[end]

    def __len__(self) -> int:
        return len(self.end)

    @property
    def scored(self) -> np.ndarray:
        """Targets each window scores."""
        return self.end - self.score_from

    def targets(self, i: int, j: int) -> np.ndarray:
        """Positions of the targets windows i..j-1 score, in order."""
        n = self.scored[i:j]
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return np.repeat(self.score_from[i:j], n) + 1 + within

    def contexts(self, i: int, j: int) -> np.ndarray:
        """For each target of windows i..j-1, how many inputs its prediction saw."""
        return self.targets(i, j) - np.repeat(self.begin[i:j], self.scored[i:j])


def doc_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """First input position of each document: 0 and every later BOS before the last token."""
    bos = np.flatnonzero(tokens[1:-1] == bos_id) + 1
    return np.concatenate([[0], bos]).astype(np.int64)


def doc_of(positions: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Document of each target: the one its previous token belongs to (a BOS target ends a document)."""
    return (np.searchsorted(starts, np.asarray(positions) - 1, side="right") - 1).astype(np.int32)


def plan(tokens: np.ndarray, seq_len: int, stride: int, doc_isolated: bool = False, bos_id: int = 1) -> Windows:
    """The windows that score every target of `tokens` once (see the module docstring)."""
    n = len(tokens) - 1
    if n < 1:
        raise ValueError("scoring needs at least two tokens")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride} must be 1..seq_len ({seq_len})")
    lo = doc_starts(tokens, bos_id) if doc_isolated else np.zeros(1, dtype=np.int64)
    hi = np.append(lo[1:], n)
    count = 1 + np.maximum(0, -(-(hi - lo - seq_len) // stride))  # windows per segment
    seg = np.repeat(np.arange(len(lo)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # index within the segment
    end = np.minimum(lo[seg] + seq_len + stride * k, hi[seg])
    score_from = np.where(k == 0, lo[seg], np.concatenate([[0], end[:-1]]))
    begin = np.maximum(lo[seg], end - seq_len)
    return Windows(begin.astype(np.int64), score_from.astype(np.int64), end.astype(np.int64))


def reference_context(t: int, n: int, seq_len: int, stride: int, lo: int = 0, hi: int | None = None) -> int:
    """How many inputs target t sees, walked window by window: the definition `plan` must agree with.

    [lo, hi) is t's segment of inputs (the whole stream, or t's document); window ends are lo + seq_len,
    then every stride further, the last one capped at hi; t is scored by the first end at or past it.
    """
    hi = n if hi is None else hi
    end = min(lo + seq_len, hi)
    while end < t:
        end = min(end + stride, hi)
    return t - max(lo, end - seq_len)
