"""The token tilt (PR #1514): a hint token from the tokens already scored raises its own probability.

For target t the hint h is the token that has most often followed the last `order` tokens so far in the
stream (targets before t only), when it has done so at least `threshold` times. The scored distribution is

    p'(a) = p(a) · e^(β·[a = h]) / (1 + p(h)·(e^β − 1)),

which sums to 1 by construction. The tilt needs the model's whole distribution (p(h) as well as the
target's), which the records do not hold, so it is applied where that distribution exists: inside the
scoring pass (pgolf/score.py), for pass 1 and test-time training alike. Changing it reruns scoring, and
every audit that rebuilds a distribution rebuilds the tilted one from the hints it recomputes itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Tilt:
    hints: np.ndarray  # int64 [N + 1]: hints[t] is target t's hint token, -1 for none (hints[0] unused)
    boost: float  # β

    @classmethod
    def for_stream(cls, tokens: np.ndarray, order: int, threshold: int, boost: float) -> Tilt | None:
        return cls(hints(tokens, order, threshold), boost) if order > 0 else None


def hints(tokens: np.ndarray, order: int, threshold: int) -> np.ndarray:
    """hints[t] for every target t = 1..N, from tokens[:t] only (one causal pass; -1: no hint)."""
    out = np.full(len(tokens), -1, dtype=np.int64)
    seen: dict[tuple, dict[int, int]] = {}
    best: dict[tuple, tuple[int, int]] = {}  # context -> (count, token) of its most frequent follower so far
    toks = tokens.tolist()
    for t in range(order, len(toks)):
        ctx = tuple(toks[t - order : t])
        if ctx in best and best[ctx][0] >= threshold:
            out[t] = best[ctx][1]
        counts = seen.setdefault(ctx, {})
        c = counts[toks[t]] = counts.get(toks[t], 0) + 1
        if ctx not in best or c > best[ctx][0]:  # ties keep the earlier token
            best[ctx] = (c, toks[t])
    return out


def tilted(logp: torch.Tensor, hint: torch.Tensor, boost: float) -> torch.Tensor:
    """log p' for rows of log-probabilities [R, V] with hint tokens [R] (-1: row unchanged)."""
    has = hint >= 0
    h = hint.clamp_min(0)[:, None]
    log_ph = logp.gather(-1, h).squeeze(-1)
    norm = torch.log1p(torch.exp(log_ph) * float(np.expm1(boost)))
    out = logp - torch.where(has, norm, torch.zeros_like(norm))[:, None]
    return out.scatter_add(-1, h, torch.where(has, torch.full_like(norm, boost), torch.zeros_like(norm))[:, None])
