"""A causal n-gram model over a token stream: interpolated Witten–Bell on exact counts.

Target t (1..N) is predicted from the tokens before it; the counts hold exactly the n-grams that end
at targets 1..t-1, i.e. the ones already scored. The stream is read as if preceded by max_order - 1
pad symbols, so every target has a context of every order.

Order k uses the k - 1 tokens before the target as context h. With c(h) the times h was seen, c(h, w)
the times w followed it and T(h) the distinct tokens that followed it:

    p_0(w) = 1 / V
    p_k(w) = (c(h, w) + T(h) p_{k-1}(w)) / (c(h) + T(h))    if c(h) > 0, else p_{k-1}(w)

Each p_k sums to 1 over the V tokens by construction (sum_w c(h, w) = c(h), sum_w p_{k-1}(w) = 1), so no
renormalisation is needed and none can hide a mistake. Witten–Bell needs no discount to tune, backs
off by how many kinds of continuation a context has seen, and its state is the counts themselves.

Bounded state: order k stores at most `caps[k-1]` distinct n-grams, the first ones to occur; an n-gram
that arrives when its order is full is never counted (its context keeps the counts it has). Contexts
are stored with their first n-gram. So the state is bounded by the caps, whatever the stream.

`NgramState` is the reference: a dict per order, updated token by token. `ngram_probs` computes the same
numbers for a whole stream at once from stable sorts (numpy's radix sort on 16-bit tokens), exactly.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

COUNT_BYTES = 4  # uint32 counters


def token_bytes(vocab: int) -> int:
    """Bytes per stored token id (the pad symbol is id `vocab`)."""
    return 2 if vocab < 65_535 else 4


def entry_bytes(order: int, vocab: int) -> int:
    """Bytes one stored n-gram of `order` may cost: its key and count, plus its context's key, count and types."""
    tb = token_bytes(vocab)
    return order * tb + COUNT_BYTES + (order - 1) * tb + 2 * COUNT_BYTES


def capacities(max_order: int, vocab: int, n_targets: int, max_state_bytes: int) -> list[int]:
    """Entries per order within the budget, worst case (one new context per n-gram).

    An order never needs more entries than it has distinct n-grams (at most n_targets and vocab^k), so
    orders are filled from the lowest up, each taking at most an even share of what is left.
    """
    caps, left = [], max_state_bytes
    for k in range(1, max_order + 1):
        share = left // (max_order - k + 1)
        cap = min(n_targets, vocab**k, share // entry_bytes(k, vocab))
        caps.append(cap)
        left -= cap * entry_bytes(k, vocab)
    return caps


@dataclass(frozen=True)
class NgramScores:
    prob: np.ndarray  # float64 [N] p_K(target)
    order: np.ndarray  # int8 [N] highest order whose context had been seen (0: none, uniform)
    state_bytes: int  # of the tables after the last update
    entries: list[int]  # stored n-grams per order at the end


class NgramState:
    """The reference: exact tables, one update per scored token."""

    def __init__(self, vocab: int, max_order: int, caps: list[int]):
        self.vocab, self.max_order, self.caps = vocab, max_order, caps
        self.history = [vocab] * (max_order - 1)  # pads
        self.pairs: list[dict[tuple, int]] = [{} for _ in range(max_order)]  # order k-1: (context..., w) -> count
        self.contexts: list[dict[tuple, list]] = [{} for _ in range(max_order)]  # context -> [count, types, {w: count}]

    def context(self, k: int) -> tuple:
        return tuple(self.history[len(self.history) - (k - 1) :]) if k > 1 else ()

    def distribution(self) -> tuple[np.ndarray, int]:
        """(p_K over the vocabulary for the next token, the highest order whose context was seen)."""
        p = np.full(self.vocab, 1.0 / self.vocab)
        order = 0
        for k in range(1, self.max_order + 1):
            entry = self.contexts[k - 1].get(self.context(k))
            if entry is None:
                continue
            c, types, follow = entry
            counts = np.zeros(self.vocab)
            counts[list(follow)] = list(follow.values())
            p = (counts + float(types) * p) / float(c + types)
            order = k
        return p, order

    def update(self, token: int) -> None:
        for k in range(1, self.max_order + 1):
            h = self.context(k)
            key = h + (token,)
            table = self.pairs[k - 1]
            if key in table:
                table[key] += 1
            elif len(table) < self.caps[k - 1]:
                table[key] = 1
                self.contexts[k - 1].setdefault(h, [0, 0, {}])[1] += 1
            else:
                continue
            entry = self.contexts[k - 1][h]
            entry[0] += 1
            entry[2][token] = table[key]
        self.history.append(token)

    def state_bytes(self) -> int:
        tb = token_bytes(self.vocab)
        return sum(
            len(self.pairs[k - 1]) * (k * tb + COUNT_BYTES) + len(self.contexts[k - 1]) * ((k - 1) * tb + 2 * COUNT_BYTES)
            for k in range(1, self.max_order + 1)
        )


@dataclass(frozen=True)
class _Level:
    """Keys of L tokens ending at positions 0..N. Only keys that occur twice or more are kept ("active"):
    a key seen once stays unique at every longer length, so it can never be matched again."""

    ends: np.ndarray  # int32 active end positions, sorted by key, then position
    start: np.ndarray  # int32 per sorted index: where its key's run starts
    gid: np.ndarray  # int32 [N+1] key id of each active end (ids follow key order; others undefined)
    occ: np.ndarray  # int32 [N+1] earlier ends with the same key (0 for inactive ends)
    active: np.ndarray  # bool [N+1]
    keys: int  # distinct keys among all ends 0..N


def _runs(change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(run id, run start index) of each element of a sorted array whose runs begin where `change` is set."""
    rid = np.cumsum(change, dtype=np.int32) - 1
    return rid, np.flatnonzero(change).astype(np.int32)[rid]  # rid is monotone: a cheap gather


def _first_level(n: int) -> _Level:
    ends = np.arange(n + 1, dtype=np.int32)
    return _Level(ends, np.zeros(n + 1, dtype=np.int32), np.zeros(n + 1, dtype=np.int32), ends.copy(), np.ones(n + 1, dtype=bool), 1)


def _extend(prev: _Level, lead: np.ndarray) -> _Level:
    """The level one token longer; lead[e] is the token that now leads the key ending at e."""
    n1 = len(prev.gid)
    ends = prev.ends[np.argsort(lead[prev.ends], kind="stable")]
    new, old = lead[ends], prev.gid[ends]
    change = np.empty(len(ends), dtype=bool)
    change[:1] = True
    np.not_equal(new[1:], new[:-1], out=change[1:])
    change[1:] |= old[1:] != old[:-1]
    rid, start = _runs(change)
    occ_sorted = np.arange(len(ends), dtype=np.int32) - start
    size = np.diff(np.append(np.flatnonzero(change), len(ends)))
    keep = size[rid] >= 2
    kept = ends[keep]
    gid, occ, active = np.zeros(n1, dtype=np.int32), np.zeros(n1, dtype=np.int32), np.zeros(n1, dtype=bool)
    gid[ends] = rid
    occ[ends] = occ_sorted
    active[kept] = True
    _, kept_start = _runs(change[keep])
    keys = int(rid[-1]) + 1 + (n1 - len(prev.ends)) if len(ends) else n1
    return _Level(kept, kept_start, gid, occ, active, keys)


def _group_count_before(level: _Level, flags: np.ndarray) -> np.ndarray:
    """For each active end (in level.ends order), how many earlier ends of its key have flags[end]."""
    f = flags[level.ends].astype(np.int32)
    cs = np.cumsum(f, dtype=np.int32) - f
    return cs - cs[level.start]


def ngram_probs(tokens: np.ndarray, vocab: int, max_order: int, caps: list[int]) -> NgramScores:
    """p_K(target) for every target t = 1..N of `tokens`, exactly as NgramState gives them in a stream.

    Level by level (keys one token longer each time) with stable radix sorts of 16-bit tokens; a level
    only sorts the keys that occurred at least twice one level down, so long orders cost little.
    """
    n = len(tokens) - 1
    pad = max_order - 1
    kind = np.uint16 if vocab < 65_535 else np.uint32
    padded = np.concatenate([np.full(pad, vocab, dtype=kind), tokens.astype(kind)])
    prob = np.full(n, 1.0 / vocab)
    used = np.zeros(n, dtype=np.int8)
    entries, state, tb = [], 0, token_bytes(vocab)
    lead = [padded[pad - (k - 1) :] for k in range(1, max_order + 1)]  # lead[k-1][e]: first token of the k-gram ending at e
    ctx = _first_level(n)  # level k-1: the context of target t is the key ending at t-1
    # The sort chain runs one level ahead in a second thread (numpy releases the GIL in sorts and
    # gathers); it only reads finished levels, so the numbers do not depend on the timing.
    with ThreadPoolExecutor(max_workers=1) as ahead:
        next_level = ahead.submit(_extend, ctx, lead[0])
        for k in range(1, max_order + 1):
            pairs = next_level.result()  # level k: (context, target) ends at target t
            if k < max_order:
                next_level = ahead.submit(_extend, pairs, lead[k])
            stored, nbytes = _count_level(k, ctx, pairs, caps[k - 1], prob, used, tb)
            entries.append(stored)
            state += nbytes
            ctx = pairs
    return NgramScores(prob, used, state, entries)


def _count_level(k: int, ctx: _Level, pairs: _Level, cap: int, prob: np.ndarray, used: np.ndarray, tb: int) -> tuple[int, int]:
    """Interpolate order k into prob and mark in `used` where it applied (both in place); returns the
    n-grams order k stores and the bytes they and their contexts take."""
    n = len(prob)
    # Pair occurrences among targets before t. End 0 is no target; it comes first in its key's run.
    occ = pairs.occ[1:] - (pairs.active[1:] & (pairs.gid[1:] == pairs.gid[0]) & pairs.active[0])
    first = occ == 0  # inactive ends are unique keys: first (and only) occurrences
    stored = None
    kept = first
    if int(np.count_nonzero(first)) > cap:  # only the first `cap` distinct n-grams to occur are stored
        rank = np.cumsum(first, dtype=np.int32) - 1
        first_rank = np.empty(int(pairs.gid.max()) + 1, dtype=np.int32)
        multi = first & pairs.active[1:]
        first_rank[pairs.gid[1:][multi]] = rank[multi]
        stored = np.where(pairs.active[1:], first_rank[pairs.gid[1:]], rank) < cap
        kept = first & stored
    # Contexts: only keys seen before can contribute, and those are active at level k-1.
    e = ctx.ends  # context end e = t - 1; end N has no target
    types = _group_count_before(ctx, np.append(kept, False))
    c_ctx = ctx.occ[e] if stored is None else _group_count_before(ctx, np.append(stored, False))
    seen = np.flatnonzero((c_ctx > 0) & (e < n))
    t = e[seen]  # target index t - 1
    c_pair = occ[t] if stored is None else np.where(stored[t], occ[t], 0)
    types, c_ctx = types[seen], c_ctx[seen]
    prob[t] = (c_pair + types * prob[t]) / (c_ctx + types)
    used[t] = k
    if stored is None:  # every context at ends 0..N-1 came with a target, so all are stored
        n_ctx = ctx.keys - int(not ctx.active[n])  # the key ending at N is no context unless it recurs
    else:
        marks = np.zeros(int(ctx.gid.max()) + 1, dtype=bool)
        marks[ctx.gid[:n][kept & ctx.active[:n]]] = True
        n_ctx = int(np.count_nonzero(kept & ~ctx.active[:n])) + int(np.count_nonzero(marks))
    n_pairs = int(np.count_nonzero(kept))
    return n_pairs, n_pairs * (k * tb + COUNT_BYTES) + n_ctx * ((k - 1) * tb + 2 * COUNT_BYTES)
