"""The eval-time cache: the causal n-gram model mixed into the neural one with a context-only weight.

    p(y) = (1 − λ) p_model(y) + λ p_ngram(y)

Both parts are distributions over the vocabulary, so p is one for any λ in [0, 1]. λ never sees the
target; it comes from the rule `cache.mix`:

- fixed:  λ = cache.lam everywhere.
- online: one λ per bucket of context (the highest n-gram order whose context was seen × the model's
          entropy in whole nats, capped at cache.entropy_bins − 1), learned from tokens already scored
          by online EM: λ_b = (prior · cache.lam + Σ r) / (prior + n_b), r = λ p_ngram(y) / p(y) the
          posterior that the cache produced a scored token. The sums are folded in every
          cache.update_every tokens, so a token's λ depends only on tokens scored before its block.

`StreamingCache` is the reference: the full next-token distribution, then the score, then the update,
one token at a time. `rescore` computes the same numbers for a whole stream, exactly.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from pgolf import ngram
from pgolf.errors import InputError
from pgolf.params import Range


@dataclasses.dataclass(frozen=True)
class CacheParams:
    max_order: Annotated[int, Range(ge=1, le=16)]  # n-gram orders 1..max_order (context of max_order - 1 tokens)
    mix: str  # fixed | online: how λ is chosen (see pgolf/cache.py)
    lam: Annotated[float, Range(ge=0, le=1)]  # fixed: λ; online: the prior λ of every bucket
    entropy_bins: Annotated[int, Range(ge=1)]  # online: buckets of the model's entropy, one per nat
    prior: Annotated[float, Range(gt=0)]  # online: pseudo-count of the prior λ
    update_every: Annotated[int, Range(ge=1)]  # online: λ is re-estimated after every this many scored tokens
    max_state_bytes: Annotated[int, Range(ge=1)]  # cap on the cache's tables and λ state
    input: str = "score"  # the neural records the cache mixes with: score (pass 1) | adapt (after test-time training)

    def __post_init__(self) -> None:
        if self.input not in ("score", "adapt"):
            raise InputError(f"params.yaml: cache.input is {self.input!r}; use score or adapt")
        if self.mix not in ("fixed", "online"):
            raise InputError(f"params.yaml: cache.mix is {self.mix!r}; use fixed or online")


LAMBDA_BYTES = 16  # per online bucket: the running sum of r and the count, float64 each


def buckets(params: CacheParams) -> int:
    return (params.max_order + 1) * params.entropy_bins if params.mix == "online" else 0


def capacities(vocab: int, n_targets: int, params: CacheParams) -> list[int]:
    """n-grams each order may store: what the budget leaves after λ's state, split over the orders."""
    tables = params.max_state_bytes - buckets(params) * LAMBDA_BYTES
    if tables <= 0:
        raise InputError(f"params.yaml: cache.max_state_bytes ({params.max_state_bytes:,}) does not even hold the λ state "
                         f"({buckets(params) * LAMBDA_BYTES:,} bytes)")
    return ngram.capacities(params.max_order, vocab, n_targets, tables)


def bucket_of(order: np.ndarray, entropy: np.ndarray, params: CacheParams) -> np.ndarray:
    ebin = np.minimum(np.floor(entropy.astype(np.float64)), params.entropy_bins - 1).astype(np.int64)
    return order.astype(np.int64) * params.entropy_bins + ebin


@dataclass(frozen=True)
class Rescored:
    prob: np.ndarray  # float64 [N] the mixture's probability of each target
    lam: np.ndarray  # float64 [N] λ used
    ngram_prob: np.ndarray  # float64 [N] p_ngram(target)
    order: np.ndarray  # int8 [N] highest n-gram order whose context was seen
    state_bytes: int  # n-gram tables plus λ state after the last update

    @property
    def nll(self) -> np.ndarray:
        return -np.log(self.prob)


class StreamingCache:
    """One position at a time: distribution() and weight() before the target is known, update() after."""

    def __init__(self, vocab: int, n_targets: int, params: CacheParams):
        """n_targets: the stream's length, known before scoring (it sizes the tables, not its contents)."""
        self.params = params
        self.ngram = ngram.NgramState(vocab, params.max_order, capacities(vocab, n_targets, params))
        self.sums = np.zeros(buckets(params))
        self.counts = np.zeros(buckets(params))
        self.pending_sums = np.zeros(buckets(params))
        self.pending_counts = np.zeros(buckets(params))
        self.lams = np.full(buckets(params), params.lam)
        self.seen = 0
        self.bucket = -1

    def distribution(self) -> tuple[np.ndarray, int]:
        """The n-gram model's full distribution for the next token, and the highest order it used."""
        return self.ngram.distribution()

    def weight(self, order: int, entropy: float) -> float:
        """λ for the next token, from its context only (the model's entropy there and the n-gram order)."""
        if self.params.mix == "fixed":
            return self.params.lam
        self.bucket = int(bucket_of(np.array([order]), np.array([entropy]), self.params)[0])
        return float(self.lams[self.bucket])

    def update(self, token: int, lam: float, model_prob: float, ngram_prob: float) -> None:
        """After scoring: count the token, and fold its posterior into λ's statistics."""
        self.ngram.update(token)
        self.seen += 1
        if self.params.mix != "online":
            return
        self.pending_sums[self.bucket] += lam * ngram_prob / ((1 - lam) * model_prob + lam * ngram_prob)
        self.pending_counts[self.bucket] += 1
        if self.seen % self.params.update_every == 0:
            self._fold()

    def _fold(self) -> None:
        self.sums += self.pending_sums
        self.counts += self.pending_counts
        self.pending_sums[:] = 0
        self.pending_counts[:] = 0
        prior = self.params.prior
        self.lams = (prior * self.params.lam + self.sums) / (prior + self.counts)

    def state_bytes(self) -> int:
        return self.ngram.state_bytes() + len(self.lams) * LAMBDA_BYTES


class CacheScorer:
    """The cache under the audits' streaming interface (pgolf.audit.StreamScorer)."""

    def __init__(self, vocab: int, n_targets: int, params: CacheParams, first_token: int):
        self.cache = StreamingCache(vocab, n_targets, params)
        self.cache.ngram.history.append(first_token)  # context only, never a target
        self.pending: tuple[np.ndarray, float] | None = None

    def _prepare(self, entropy: float) -> tuple[np.ndarray, float]:
        dist, order = self.cache.distribution()
        return dist, self.cache.weight(order, entropy)

    def scores(self, model_dist: np.ndarray, entropy: float) -> np.ndarray:
        self.pending = dist, lam = self._prepare(entropy)
        return (1 - lam) * model_dist + lam * dist

    def update(self, token: int, model_prob: float, entropy: float) -> None:
        dist, lam = self.pending or self._prepare(entropy)
        self.pending = None
        self.cache.update(token, lam, model_prob, dist[token])


def rescore_reference(tokens: np.ndarray, model_prob: np.ndarray, entropy: np.ndarray, vocab: int, params: CacheParams) -> Rescored:
    """The definition: for each target in order, full distribution, weight, score, then update."""
    n = len(tokens) - 1
    cache = StreamingCache(vocab, n, params)
    prob, lam, ng, order = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int8)
    cache.ngram.history.append(int(tokens[0]))  # the stream's first token is context only, never a target
    for i in range(n):
        y = int(tokens[i + 1])
        dist, k = cache.distribution()
        w = cache.weight(k, entropy[i])
        mixed = (1 - w) * model_prob[i] + w * dist[y]
        prob[i], lam[i], ng[i], order[i] = mixed, w, dist[y], k
        cache.update(y, w, model_prob[i], dist[y])
    return Rescored(prob, lam, ng, order, cache.state_bytes())


def rescore(tokens: np.ndarray, model_prob: np.ndarray, entropy: np.ndarray, vocab: int, params: CacheParams, n_targets: int | None = None) -> Rescored:
    """rescore_reference's numbers for the whole stream at once. The tables are sized for n_targets (default:
    this stream's), so that a stream cut short can be scored as the first part of a longer one."""
    n_buckets = buckets(params)
    ng = ngram.ngram_probs(tokens, vocab, params.max_order, capacities(vocab, n_targets or len(tokens) - 1, params))
    if params.mix == "fixed":
        lam = np.full(len(ng.prob), params.lam)
    else:
        bucket = bucket_of(ng.order, entropy, params)
        lam = np.empty(len(ng.prob))
        sums, counts, lams = np.zeros(n_buckets), np.zeros(n_buckets), np.full(n_buckets, params.lam)
        for start in range(0, len(lam), params.update_every):
            end = min(start + params.update_every, len(lam))
            b = bucket[start:end]
            lam[start:end] = w = lams[b]
            pm, pn = model_prob[start:end], ng.prob[start:end]
            r = w * pn / ((1 - w) * pm + w * pn)
            if end - start == params.update_every:
                sums += np.bincount(b, weights=r, minlength=n_buckets)
                counts += np.bincount(b, minlength=n_buckets)
                lams = (params.prior * params.lam + sums) / (params.prior + counts)
    prob = (1 - lam) * model_prob + lam * ng.prob
    return Rescored(prob, lam, ng.prob, ng.order, ng.state_bytes + n_buckets * LAMBDA_BYTES)
