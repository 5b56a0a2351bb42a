"""Compliance audits. Each returns a Rule: passed or not, with the figure it was judged on.

The scorer audits work on anything with the streaming interface of `StreamScorer`, not only our
cache, so the tests can hand them the invalid designs the challenge saw and watch each one fail.

Normalization is checked by substitution, as DESIGN.md asks: at an audited position the scorer is
asked, for every candidate token v, what it would record if v were the next token, from the state it
had there. A scorer that renormalises around the true target, hashes the target into its key, lets
λ see the target or counts the target before scoring it gives candidates that do not sum to one.
"""
from __future__ import annotations

import dataclasses

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pgolf.errors import InputError
from pgolf.progress import Progress


@dataclasses.dataclass(frozen=True)
class VerifyParams:
    positions: int  # sampled positions whose full distribution is rebuilt and checked
    byte_limit: int  # artifact + code
    max_state_bytes: int  # eval-time auxiliary state
    max_overhead: float  # cache seconds over neural scoring seconds
    strict: bool  # fail the stage, after writing the report, when a rule is broken
    max_train_seconds: float = 0.0  # training + Hessian collection on training data (challenge: 600 on 8xH100); 0 = no budget
    max_eval_seconds: float = 0.0  # score + adapt + rescore (challenge: 600 on 8xH100); 0 = no budget
    val_docs: int = 0  # the validation documents the challenge scores (50,000); 0 = no requirement
    record_batches: int = 16  # pass-1 batches rescored bit for bit: one in each of this many spans of the stream, plus the first and last

    def __post_init__(self) -> None:
        if (self.positions < 1 or self.record_batches < 1 or self.byte_limit < 1 or self.max_state_bytes < 1 or self.max_overhead <= 0
                or self.max_train_seconds < 0 or self.max_eval_seconds < 0 or self.val_docs < 0):
            raise InputError("params.yaml: verify.positions, record_batches, byte_limit, max_state_bytes and max_overhead must be positive, "
                             "max_train_seconds, max_eval_seconds and val_docs >= 0")


SUM_TOLERANCE = 1e-6
TARGET_TOLERANCE = 1e-5  # relative: pass-1 NLLs are float32, rebuilt here one window at a time


@dataclass(frozen=True)
class Rule:
    name: str
    passed: bool
    figure: float  # what was measured
    limit: float  # what it was held to
    detail: str
    copied: bool = False  # judged on a figure a stage reported (its seconds) that the report cannot recompute: certifies nothing

    def as_dict(self) -> dict:
        return {"passed": bool(self.passed), "figure": float(self.figure), "limit": float(self.limit), "detail": self.detail, "copied": self.copied}


class StreamScorer(Protocol):
    def scores(self, model_dist: np.ndarray, entropy: float) -> np.ndarray:
        """For every candidate v, the probability it would record if the next token were v."""

    def update(self, token: int, model_prob: float, entropy: float) -> None:
        """The next token was `token` (scored already): take it into the state."""


def run_stream(scorer: StreamScorer, tokens: np.ndarray, model_dist: Callable[[int], np.ndarray], entropy: np.ndarray) -> np.ndarray:
    """The probability a streaming scorer records for every target t = 1..N, in one pass."""
    out = np.zeros(len(tokens) - 1)
    for t in range(1, len(tokens)):
        dist = model_dist(t)
        y = int(tokens[t])
        out[t - 1] = scorer.scores(dist, float(entropy[t - 1]))[y]
        scorer.update(y, float(dist[y]), float(entropy[t - 1]))
    return out


def normalization(
    scorer: StreamScorer,
    tokens: np.ndarray,
    positions: np.ndarray,
    model_dist: Callable[[int], np.ndarray],
    model_prob: np.ndarray,
    entropy: np.ndarray,
    recorded: np.ndarray,
    progress: Progress | None = None,
) -> Rule:
    """Walk the stream to the last audited target; at each, every candidate's probability must sum to 1
    and the target's must equal what was recorded. Between audited targets only update() is called,
    with the recorded pass-1 probability of the target."""
    audited = set(int(t) for t in positions)
    worst_sum, worst_target = 0.0, 0.0
    for t in range(1, max(audited) + 1):
        y = int(tokens[t])
        if t in audited:
            p = scorer.scores(model_dist(t), float(entropy[t - 1]))
            worst_sum = max(worst_sum, abs(float(np.sum(p, dtype=np.float64)) - 1.0))
            worst_target = max(worst_target, abs(float(p[y]) - recorded[t - 1]) / recorded[t - 1])
        scorer.update(y, float(model_prob[t - 1]), float(entropy[t - 1]))
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.done(f"{len(audited)} positions")
    passed = worst_sum <= SUM_TOLERANCE and worst_target <= TARGET_TOLERANCE
    return Rule(
        "normalization", passed, worst_sum, SUM_TOLERANCE,
        f"{len(audited)} positions: largest distance of a sum over the vocabulary from 1 = {worst_sum:.3g} (limit {SUM_TOLERANCE:g}); "
        f"max relative gap between the rebuilt and the recorded target probability = {worst_target:.3g} (limit {TARGET_TOLERANCE:g})",
    )


def causality(name: str, run: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, cut: int, seed: int = 0) -> Rule:
    """causality_cuts at one cut. run(tokens) gives the recorded probability of targets 1..N."""
    return causality_cuts(name, run, tokens, np.array([cut]), seed)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:.4g}"


def at_most(name: str, figure: float, limit: float, what: str) -> Rule:
    return Rule(name, figure <= limit, figure, limit, f"{what}: {_fmt(figure)} (limit {_fmt(limit)})")


def disjoint(name: str, val_hashes: np.ndarray, other_hashes: np.ndarray, what: str) -> Rule:
    shared = int(np.isin(val_hashes, other_hashes).sum())
    return Rule(name, shared == 0, shared, 0, f"{shared} validation documents also in {what}")


# Black-box audits: they call the method only as run(stream) -> the probability it records for every target
# 1..len(stream)-1 when it is handed `stream` alone, so the method never holds a token it should not see.


def substitution(run: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, positions: np.ndarray, vocab: int, name: str = "substitution",
                 batch: Callable[[np.ndarray], np.ndarray] | None = None, spot: int = 2, spot_at: int | None = None, seed: int = 0) -> Rule:
    """A full normalized distribution, measured without the method's cooperation.

    At every audited target t and for every candidate v: stream = tokens[:t] + [v], p_v = run(stream)[t-1].
    Passes when every p_v lies in [0, 1] and |Σ_v p_v − 1| <= SUM_TOLERANCE at every t. Nothing past the
    candidate exists, so no method can peek. `batch(prefix)`, where given, is a faster path giving all
    p_v at once (a state snapshot at t); it is trusted for nothing: `spot` random candidates per
    position (at `spot_at` seeded positions of them; None: at all) are run the plain way and must agree
    with it exactly.
    """
    rng = np.random.default_rng(seed)
    spotted = set(rng.choice(np.asarray(positions), min(len(positions), len(positions) if spot_at is None else spot_at), replace=False).tolist())
    worst_sum, outside, disagree, checked = 0.0, 0, 0, 0
    for t in (int(t) for t in positions):
        prefix = np.asarray(tokens[:t])
        if batch is None:
            p = np.array([run(np.append(prefix, v).astype(prefix.dtype))[t - 1] for v in range(vocab)], dtype=np.float64)
        else:
            p = np.asarray(batch(prefix), dtype=np.float64)
            for v in rng.choice(vocab, min(spot, vocab), replace=False) if t in spotted else ():
                checked += 1
                disagree += int(run(np.append(prefix, v).astype(prefix.dtype))[t - 1] != p[v])
        outside += int(np.count_nonzero(~((p >= 0) & (p <= 1))))
        worst_sum = max(worst_sum, abs(float(np.sum(p, dtype=np.float64)) - 1.0) if np.all(np.isfinite(p)) else float("inf"))
    passed = worst_sum <= SUM_TOLERANCE and outside == 0 and disagree == 0
    how = f"; the batched path disagreed with a plain run on {disagree} of {checked} spot candidates" if batch is not None else ""
    return Rule(name, passed, worst_sum, SUM_TOLERANCE,
                f"{len(positions)} positions x {vocab} candidates, each run on the stream cut after it: largest |sum - 1| = {worst_sum:.3g} "
                f"(limit {SUM_TOLERANCE:g}), {outside} probabilities outside [0, 1]{how}")


def cuts(n: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` cut points over targets 1..n-1: one in each of `count` equal spans, at a seeded random place."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(1, n, count + 1).astype(int)
    return np.unique([int(rng.integers(a, max(a + 1, b))) for a, b in zip(edges[:-1], edges[1:])])


def scrambled(tokens: np.ndarray, cut: int, rng: np.random.Generator, tail: int | None = None) -> np.ndarray:
    """A copy of the stream whose tokens after target `cut` are random (the same vocabulary range); `tail`: only
    that many of them, the rest removed."""
    changed = tokens[: len(tokens) if tail is None else cut + 1 + tail].copy()
    changed[cut + 1 :] = rng.integers(0, int(tokens.max()) + 1, len(changed) - cut - 1)
    return changed


def causality_cuts(name: str, run: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, at: np.ndarray, seed: int = 0,
                   tail: int | None = None) -> Rule:
    """Strict causality at several cuts across the stream: for each cut c, the tokens after target c are
    replaced by random ones and every probability of targets 1..c must be bit-identical. `tail`: only that many
    random tokens follow the cut (removing the rest changes them too), so a costly method runs to c + tail."""
    base = run(tokens)
    rng = np.random.default_rng(seed)
    moved, worst = 0, None
    for c in (int(c) for c in at):
        n = int(np.count_nonzero(run(scrambled(tokens, c, rng, tail))[:c] != base[:c]))
        moved += n
        worst = c if n and worst is None else worst
    where = ", ".join(f"{int(c):,}" for c in at)
    return Rule(name, moved == 0, moved, 0, f"cuts after targets {where} of {len(tokens) - 1:,}: {moved} probabilities before a cut changed "
                f"when the tokens after it did" + (f" (first at cut {worst})" if worst is not None else ""))


def doc_isolation(name: str, run: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, bos: int, docs: int = 4, seed: int = 0,
                  within: int | None = None) -> Rule:
    """A per-document method scores each document alone: with every other document's tokens replaced
    (BOS and lengths kept), and the stream cut after the document that follows it, a chosen document's
    probabilities must be bit-identical (the cut changes the later documents too, and saves a costly method
    the rest of the stream). `within`: documents are chosen among those that start at or before that target."""
    from pgolf.windows import doc_starts  # audit.py stays free of the scorer's modules otherwise

    starts = doc_starts(tokens, bos)
    ends = np.append(starts[1:], len(tokens))
    rng = np.random.default_rng(seed)
    eligible = len(starts) if within is None else max(1, int(np.searchsorted(starts, within, side="right")))
    chosen = rng.choice(eligible, min(docs, eligible), replace=False)
    base, moved = run(tokens), 0
    high = int(tokens.max()) + 1
    for d in chosen:
        changed = tokens[: min(len(tokens), int(ends[min(d + 1, len(ends) - 1)]) + 1)].copy()
        other = np.ones(len(tokens), dtype=bool)
        other[starts[d] : ends[d]] = False
        other, kept_tokens = other[: len(changed)], tokens[: len(changed)]
        noise = rng.integers(0, high, len(changed))
        noise[noise == bos] = (bos + 1) % high  # no new documents
        changed[other & (kept_tokens != bos)] = noise[other & (kept_tokens != bos)]
        lo, hi = int(starts[d]), int(ends[d]) - 1  # document d's targets starts[d]+1 .. ends[d]-1, at index t - 1
        moved += int(np.count_nonzero(run(changed)[lo:hi] != base[lo:hi]))
    return Rule(name, moved == 0, moved, 0,
                f"{len(chosen)} documents rescored with every other document's tokens replaced: {moved} of their probabilities changed")


def in_range(name: str, prob: np.ndarray) -> Rule:
    """Every recorded probability is a probability of something that happened: finite, in (0, 1]."""
    bad = int(np.count_nonzero(~((prob > 0) & (prob <= 1))))
    return Rule(name, bad == 0, bad, 0, f"{bad} of {len(prob):,} recorded probabilities outside (0, 1]")
