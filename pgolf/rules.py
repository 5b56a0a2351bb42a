"""The report's rules applied to one run's outputs: every audit of pgolf/audit.py, on rebuilt inputs.

Each rule is measured, not copied from the stage under audit: distributions are rebuilt from the
artifact's model, the cache is rerun, pass-1 windows are rescored, hashes are recomputed.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pgolf import audit, cache, caseops, shards, ttt, windows
from pgolf.audit import Rule, VerifyParams
from pgolf.cache import CacheParams
from pgolf.doc_records import hash_doc, hash_text
from pgolf.model import GPT
from pgolf.progress import Progress
from pgolf.runtime import CPU
from pgolf.score import EvalParams, score_batch, score_stream
from pgolf.tilt import Tilt, tilted
from pgolf.ttt import TTTParams


@dataclass(frozen=True)
class Records:
    """What pass 1 and the cache recorded for the validation stream (targets 1..N)."""

    tokens: np.ndarray
    bos: int
    nll: np.ndarray  # pass 1, nats (float64)
    entropy: np.ndarray
    context: np.ndarray
    prob: np.ndarray  # the cache mixture's probability of each target

    @property
    def n(self) -> int:
        return len(self.tokens) - 1


def audited(r: Records, vp: VerifyParams) -> np.ndarray:
    """Audited targets: a seeded sample of verify.positions across the whole stream, plus all of document 0."""
    starts = windows.doc_starts(r.tokens, r.bos)
    doc_end = int(starts[1]) if len(starts) > 1 else r.n  # document 0: targets 1..its closing BOS
    sample = np.random.default_rng(0).choice(np.arange(1, r.n + 1), min(vp.positions, r.n), replace=False)
    return np.union1d(sample, np.arange(1, doc_end + 1))


def model_dist(model: GPT, r: Records, tilt: Tilt | None = None):
    """The model's full next-token distribution at target t, from the context pass 1 used, tilted towards
    the hint where the token tilt is on (hints recomputed from the stream by the caller)."""

    @torch.inference_mode()
    def dist(t: int) -> np.ndarray:
        x = torch.from_numpy(r.tokens[t - r.context[t - 1] : t].astype(np.int64))[None]
        logp = F.log_softmax(model.logits(x)[0, -1:].double(), dim=-1)
        if tilt is not None:
            logp = tilted(logp, torch.tensor([int(tilt.hints[t])]), tilt.boost)
        return logp[0].exp().numpy()

    return dist


def segment_of(tokens: np.ndarray, bos: int, plan: windows.Windows, tp: TTTParams, t: int) -> int:
    """The segment of tp.method whose state scores target t (chunk_sgd: its chunk; phased: its phase)."""
    if tp.method == "chunk_sgd":
        wi = int(np.searchsorted(plan.end, t))
        return next(k for k, (i, j) in enumerate(ttt.chunks(plan, tp.chunk_tokens)) if i <= wi < j)
    d = int(windows.doc_of(np.array([t]), windows.doc_starts(tokens, bos))[0])
    return int(np.searchsorted(ttt.phase_ends(len(windows.doc_starts(tokens, bos)), tp), d, side="right"))


@dataclass
class AdaptRun:
    """The report's own run of the adaptation on the real stream, from the artifact's model."""

    plan: windows.Windows
    nll: np.ndarray  # every target's
    dists: dict[int, np.ndarray]  # the full distribution that scored each kept target
    snapshots: dict[int, dict]  # the model's state at the start of each segment asked for


def adapt_rerun(model: GPT, tokens: np.ndarray, bos: int, ev: EvalParams, tp: TTTParams, n: int, keep: np.ndarray, segments: set[int]) -> AdaptRun:
    snapshots: dict[int, dict] = {}

    def before(k: int, m: GPT) -> None:
        if k in segments:
            snapshots[k] = copy.deepcopy(m.state_dict())

    dists = {int(t): None for t in keep}
    plan, scores = ttt.adapt(model, tokens, ev, tp, bos, torch.device("cpu"), n, dists, before)
    return AdaptRun(plan, np.concatenate([s[0] for _, _, s in scores]), dists, snapshots)


class AdaptAudit:
    """ttt.method run as a black box, run(stream) -> its probability of every target, from a fresh copy of the
    artifact's model; and batch(prefix), the full distribution at the prefix's end from a snapshot (trusted
    for nothing: audit.substitution spot-checks it against run)."""

    def __init__(self, base: GPT, r: Records, ev: EvalParams, tp: TTTParams, rerun: AdaptRun):
        self.base, self.r, self.ev, self.tp, self.rerun = base, r, ev, tp, rerun

    def run(self, stream: np.ndarray) -> np.ndarray:
        if len(stream) == len(self.r.tokens) and np.array_equal(stream, self.r.tokens):
            return np.exp(-self.rerun.nll.astype(np.float64))  # the report's own run of this very stream
        _, scores = ttt.adapt(copy.deepcopy(self.base), stream, self.ev, self.tp, self.r.bos, torch.device("cpu"), self.r.n)
        return np.exp(-np.concatenate([s[0] for _, _, s in scores]).astype(np.float64))

    def batch(self, prefix: np.ndarray) -> np.ndarray:
        t = len(prefix)
        k = segment_of(self.r.tokens, self.r.bos, self.rerun.plan, self.tp, t)
        model = copy.deepcopy(self.base)
        if k in self.rerun.snapshots:
            model.load_state_dict(self.rerun.snapshots[k])
        stream, tp, start = np.append(prefix, 0).astype(prefix.dtype), self.tp, k
        if tp.method != "chunk_sgd" and not self.ev.tilt_order:  # documents are independent: t's batch of documents alone
            starts = windows.doc_starts(stream, self.r.bos)
            d0 = ([0, *ttt.phase_ends(len(windows.doc_starts(self.r.tokens, self.r.bos)), tp)])[k]  # the segment's first document
            a = int(starts[d0 + (len(starts) - 1 - d0) // tp.lora_docs * tp.lora_docs])  # t's batch starts here, t's slot kept
            stream, tp, start, t = stream[a:], dataclasses.replace(tp, method="doc_lora"), 0, t - a
        kept = {t: None}
        for _ in ttt.adapt(model, stream, self.ev, tp, self.r.bos, torch.device("cpu"), self.r.n, kept, start=start)[1]:
            pass
        return kept[t]


def adapt_rules(base: GPT, r: Records, adapted_nll: np.ndarray, pass1_nll: np.ndarray, ev: EvalParams, tp: TTTParams,
                positions: np.ndarray, done: Progress) -> tuple[list[Rule], Callable[[int], np.ndarray], np.ndarray]:
    """single_pass_adapt (the adapt stage's records equal the report's own score-first run from the artifact, bit
    for bit), in_range_adapt, and for a method that adapts: substitution_adapt, causality_adapt and, for
    doc_lora without the tilt, doc_isolation_adapt, all on the method as a black box at places drawn across the
    whole stream (each run of the method costs the stream up to where it looks). Also the distribution behind
    each audited adapted record, for the cache's audits, and the report's own NLL of every target."""
    if tp.method == "none":
        rerun, dist, rules = pass1_nll, model_dist(base, r, ev.tilt(r.tokens)), []
    else:
        plan = ttt.adapt(copy.deepcopy(base), r.tokens, ev, tp, r.bos, torch.device("cpu"), r.n)[0]  # the generator is not started
        probes = blackbox_positions(r, first_after_commit(r, plan, tp))
        segments = {segment_of(r.tokens, r.bos, plan, tp, int(t)) for t in probes}
        run = adapt_rerun(copy.deepcopy(base), r.tokens, r.bos, ev, tp, r.n, positions, segments)
        done.update(what="adapt rerun")
        rerun, dist, box = run.nll, run.dists.__getitem__, AdaptAudit(base, r, ev, tp, run)
        rules = [audit.substitution(box.run, r.tokens, probes, base.p.vocab_size, "substitution_adapt", batch=box.batch, spot=1, spot_at=SPOT_AT)]
        done.update(what="substitution_adapt")
        # Both compare with the report's own run of the whole stream, so neither pays a run of its own for that.
        rules.append(audit.causality_cuts("causality_adapt", box.run, r.tokens, audit.cuts(r.n + 1, CUTS, seed=5), tail=CAUSALITY_TAIL))
        done.update(what="causality_adapt")
        if doc_isolated(ev, tp):
            rules.append(audit.doc_isolation("doc_isolation_adapt", box.run, r.tokens, r.bos, docs=2))
            done.update(what="doc_isolation_adapt")
    differ = int(np.count_nonzero(rerun.astype(np.float32) != adapted_nll.astype(np.float32)))
    return [Rule("single_pass_adapt", differ == 0, float(differ), 0,
                 f"ttt.method {tp.method}: the adapt records equal the report's own score-first run from the artifact: {differ} of {len(rerun)} differ"),
            audit.in_range("in_range_adapt", np.exp(-adapted_nll)), *rules], dist, rerun


def adapt_steps(ev: EvalParams, tp: TTTParams) -> int:
    """The progress steps adapt_rules reports."""
    return 0 if tp.method == "none" else 4 if doc_isolated(ev, tp) else 3


def doc_isolated(ev: EvalParams, tp: TTTParams) -> bool:
    """Whether tp.method scores each document alone (doc_lora without the tilt, whose table reads earlier documents)."""
    return tp.method == "doc_lora" and not ev.tilt_order


def blackbox_positions(r: Records, commits: list[int]) -> np.ndarray:
    """Where the black-box substitution audits look: one seeded target in each of SUBSTITUTION_SPANS equal spans
    of the whole stream, the given first targets after state commits, and the last target."""
    found = np.concatenate([audit.cuts(r.n + 1, SUBSTITUTION_SPANS, seed=7), commits, [r.n]]).astype(np.int64)
    return np.unique(found[found <= r.n])


def first_after_commit(r: Records, plan: windows.Windows, tp: TTTParams) -> list[int]:
    """The first target scored after tp.method's first state commit: the second chunk's (chunk_sgd), the second
    chunk's of the first document that has one (doc_lora, phased)."""
    if tp.method == "chunk_sgd":
        spans = ttt.chunks(plan, tp.chunk_tokens)
        return [int(plan.score_from[spans[1][0]]) + 1] if len(spans) > 1 else []
    starts = windows.doc_starts(r.tokens, r.bos)
    long = np.flatnonzero(np.diff(np.append(starts, r.n)) > tp.lora_chunk)
    return [int(starts[long[0]]) + tp.lora_chunk + 1] if len(long) else []


def pass1_causality(model: GPT, tokens: np.ndarray, plan: windows.Windows, positions: np.ndarray, at: np.ndarray, seed: int,
                    ev: EvalParams) -> Rule:
    """At each cut, rescore (batched as pass 1 did) the windows of audited targets before it, with the tokens
    after it replaced: their scores must be bit-identical. Windows are the plan's, fixed by the real stream."""
    def run_cut(c: int):
        targets = positions[positions <= c]
        sel = np.unique(np.searchsorted(plan.end, targets))
        sub = windows.Windows(plan.begin[sel], plan.score_from[sel], plan.end[sel])
        before = sub.targets(0, len(sub)) <= c
        return lambda toks: score_batch(model, toks, sub, 0, len(sub), torch.device("cpu"), ev.tilt(toks))[0].numpy()[before], int(before.sum())

    moved, scores, rng = 0, 0, np.random.default_rng(seed)
    for c in (int(c) for c in at):
        run, n = run_cut(c)
        moved += int(np.count_nonzero(run(tokens) != run(audit.scrambled(tokens, c, rng))))
        scores += n
    return Rule("causality_pass1", moved == 0, moved, 0, f"{len(at)} cuts across the stream, {scores} pass-1 scores of audited targets "
                f"before them rescored with the tokens after the cut replaced: {moved} changed")


def scoring_rules(model: GPT, r: Records, pass1_nll: np.ndarray, dist: Callable[[int], np.ndarray], plan: windows.Windows, vp: VerifyParams,
                  cp: CacheParams, ev: EvalParams, done: Progress) -> tuple[list[Rule], cache.Rescored]:
    """normalization, substitution_cache, causality_cache, single_pass, causality_pass1, in_range_pass1,
    in_range_cache; and the cache's rerun on the real stream. r holds the neural records the cache mixed
    (pass 1's or the adapted ones) and dist(t) the full distribution behind each audited one."""
    positions = audited(r, vp)
    at = audit.cuts(r.n + 1, CUTS, seed=3)
    model_prob = np.exp(-r.nll)
    scorer = cache.CacheScorer(model.p.vocab_size, r.n, cp, int(r.tokens[0]))
    rules = [audit.normalization(scorer, r.tokens, positions, dist, model_prob, r.entropy, r.prob,
                                 Progress("report: normalization audit", int(positions.max()), "tokens"))]
    done.update(what="normalization")
    rules.append(cache_substitution(r, positions[:: max(1, len(positions) // SUBSTITUTION_POSITIONS)], dist, model.p.vocab_size, cp))
    done.update(what="substitution_cache")
    rng = np.random.default_rng(1)
    prob_noise, ent_noise = rng.uniform(1e-4, 1, r.n), rng.uniform(0, 6, r.n).astype(r.entropy.dtype)
    reruns: list[cache.Rescored] = []

    def rerun(toks: np.ndarray) -> np.ndarray:
        # From the first changed token on, a rerun of pass 1 would change the model's numbers too.
        changed = np.flatnonzero(toks != r.tokens)
        first = int(changed[0]) - 1 if len(changed) else r.n
        prob, ent = model_prob.copy(), r.entropy.copy()
        prob[first:], ent[first:] = prob_noise[first:], ent_noise[first:]
        out = cache.rescore(toks, prob, ent, model.p.vocab_size, cp)
        reruns.append(out)
        return out.prob

    rules.append(audit.causality_cuts("causality_cache", rerun, r.tokens, at))
    done.update(what="causality_cache")
    differ = int(np.count_nonzero(reruns[0].prob != r.prob))
    rules.append(Rule("single_pass", differ == 0, float(differ), 0, f"records equal one causal pass over the stream: {differ} of {r.n} differ"))
    rules.append(pass1_causality(model, r.tokens, plan, positions, at, 2, ev))
    rules += [audit.in_range("in_range_pass1", np.exp(-pass1_nll)), audit.in_range("in_range_cache", r.prob)]
    done.update(what="causality_pass1")
    return rules, reruns[0]


def pass1_run(model: GPT, ev: EvalParams, bos: int) -> Callable[[np.ndarray], np.ndarray]:
    """Pass 1 as a black box: the whole stream scored as the score stage does, its plan rebuilt from the stream."""
    def run(stream: np.ndarray) -> np.ndarray:
        plan = windows.plan(stream, ev.seq_len, ev.stride, ev.doc_isolated, bos)
        return np.exp(-np.concatenate([s[0] for _, _, s in score_stream(model, stream, plan, ev.batch, CPU, ev.tilt(stream))]).astype(np.float64))

    return run


def pass1_isolation(model: GPT, tokens: np.ndarray, ev: EvalParams, bos: int) -> Rule:
    """doc_isolation on pass 1 with eval.doc_isolated: two documents' records unchanged when every other document changes."""
    return audit.doc_isolation("doc_isolation_pass1", pass1_run(model, ev, bos), tokens, bos, docs=2)


def pass1_substitution(model: GPT, r: Records, ev: EvalParams) -> Rule:
    """audit.substitution on pass 1 as a black box. The batched path scores only the cut stream's last batch of
    windows (the one that holds the candidate), as a plain run batches it; spot candidates run the whole stream."""
    def batch(prefix: np.ndarray) -> np.ndarray:
        stream, t = np.append(prefix, 0).astype(prefix.dtype), len(prefix)
        plan = windows.plan(stream, ev.seq_len, ev.stride, ev.doc_isolated, r.bos)
        kept = {t: None}
        score_batch(model, stream, plan, (len(plan) - 1) // ev.batch * ev.batch, len(plan), CPU.device, ev.tilt(stream), kept)
        return kept[t]

    return audit.substitution(pass1_run(model, ev, r.bos), r.tokens, blackbox_positions(r, []),
                              model.p.vocab_size, "substitution_pass1", batch=batch, spot=1, spot_at=SPOT_AT)


def checked_batches(n: int, spans: int) -> np.ndarray:
    """Of n batches, one seeded in each of `spans` equal spans plus the first and the last (all when spans >= n)."""
    if spans >= n:
        return np.arange(n)
    return np.unique(np.concatenate([[0, n - 1], audit.cuts(n + 1, spans, seed=11) - 1]))


def pass1_records(model: GPT, table: pa.Table, tokens: np.ndarray, bos: int, pos_bytes: np.ndarray, plan: windows.Windows, ev: EvalParams,
                  spans: int) -> Rule:
    """records_pass1: pass 1's records checked over the whole stream, not a prefix. Every record's position, document,
    target, context and bytes must be the report's own; and of the score stage's batches of windows, one seeded in each of
    `spans` equal spans of the stream plus the first and the last are rescored exactly as pass 1 batched them (CPU
    kernels round by shape): every NLL and entropy they give must equal its record bit for bit. A forgery that touches
    a fraction f of the batches escapes with probability at most (1 - f)^spans; one in the first or last batch, or
    over a stretch of at least 2/spans of the stream (a whole span), cannot escape."""
    n = len(tokens) - 1
    pos = np.arange(1, n + 1)
    own = {"position": pos, "doc": windows.doc_of(pos, windows.doc_starts(tokens, bos)), "target": tokens[1:],
           "context": plan.contexts(0, len(plan)), "bytes": pos_bytes[1:]}
    wrong = {k: int(np.count_nonzero(table.column(k).to_numpy() != v)) for k, v in own.items()}
    recorded = np.stack([table.column("nll").to_numpy(), table.column("entropy").to_numpy()])
    total = -(-len(plan) // ev.batch)
    chosen, tilt, differ, rescored = checked_batches(total, spans), ev.tilt(tokens), 0, 0
    progress = Progress("report: pass-1 records, rescored", len(chosen), "batches")
    for b in chosen:
        i, j = int(b) * ev.batch, min((int(b) + 1) * ev.batch, len(plan))
        got = score_batch(model, tokens, plan, i, j, CPU.device, tilt).numpy()
        at = plan.targets(i, j) - 1
        differ += int(np.count_nonzero((got != recorded[:, at]).any(axis=0)))
        rescored += len(at)
        progress.update()
    progress.done(f"{differ} of {rescored:,} records differ")
    bad = sum(wrong.values()) + differ
    escape = "every batch, so no forgery escapes" if len(chosen) == total else \
        f"a forgery touching a fraction f of the batches escapes with probability at most (1 - f)^{spans}"
    columns = ", ".join(f"{k} {v}" for k, v in wrong.items() if v) or "none"
    return Rule("records_pass1", bad == 0, bad, 0, f"{n:,} records against the report's own positions, documents, targets, contexts and "
                f"bytes: wrong {columns}; {len(chosen)} of {total:,} batches ({rescored:,} targets, the first, the last and one in each of "
                f"{spans} spans) rescored as pass 1 batched them: {differ} NLL or entropy differ; {escape}")


CUTS = 4  # causality cuts, one in each quarter of the stream
SUBSTITUTION_POSITIONS = 16  # of the audited positions, spread over the stream
SUBSTITUTION_SPANS = 4  # black-box substitution on pass 1 and adapt: one position in each quarter, plus commits
CAUSALITY_TAIL = 4096  # adapt: random tokens after each cut (the rest removed), so each cut costs a run to it
SPOT_AT = 1  # of those positions, where a candidate also runs the plain way (each costs a run of the method)


def cache_substitution(r: Records, positions: np.ndarray, dist, vocab: int, cp: CacheParams) -> Rule:
    """audit.substitution on the cache: run(stream) is the rescore stage's own cache.rescore on the cut stream
    (pass 1's recorded numbers before the candidate, the model's probability of the candidate at it); the
    batched path walks a CacheScorer to each position once, and is spot-checked against those plain runs."""
    model_prob = np.exp(-r.nll)
    dists = {int(t): dist(int(t)) for t in positions}

    def run(stream: np.ndarray) -> np.ndarray:  # the cache sizes its tables for the validation length it is told
        t = len(stream) - 1
        prob = np.append(model_prob[: t - 1], dists[t][int(stream[t])])
        return cache.rescore(stream, prob, r.entropy[:t], vocab, cp, n_targets=r.n).prob

    scorer, walked = cache.CacheScorer(vocab, r.n, cp, int(r.tokens[0])), [1]

    def batch(prefix: np.ndarray) -> np.ndarray:
        t = len(prefix)
        for i in range(walked[0], t):  # the scorer's state after targets 1..t-1, as rescore had it
            scorer.update(int(r.tokens[i]), float(model_prob[i - 1]), float(r.entropy[i - 1]))
        walked[0] = t
        return scorer.scores(dists[t], float(r.entropy[t - 1]))

    return audit.substitution(run, r.tokens, np.sort(positions), vocab, "substitution_cache", batch=batch, spot=2)


def calibration_hashes(train_shards: list, first_tokens: int, bos: int) -> np.ndarray:
    """Hashes of the complete documents among the first `first_tokens` training tokens (what calibration read)."""
    prefix = np.concatenate([shards.read_tokens(f) for f in train_shards])[:first_tokens] if train_shards else np.zeros(0, np.uint16)
    bounds = np.append(np.flatnonzero(prefix == bos), len(prefix))
    return np.array([hash_doc(prefix[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.uint64)


def budget_rules(artifact_bytes: int, state_bytes: int, overhead: float, train_seconds: float, eval_seconds: float, vp: VerifyParams) -> list[Rule]:
    """artifact_bytes and state_bytes (both recounted by the report) and, on the seconds the stages reported (copied: the
    report cannot time a run it did not make), cache_overhead, training_budget and eval_budget, against their verify.* limits."""
    def budget(name: str, seconds: float, limit: float, what: str, key: str) -> Rule:
        if limit:
            return dataclasses.replace(audit.at_most(name, seconds, limit, f"{what} seconds"), copied=True)
        return Rule(name, True, seconds, 0, f"{seconds:.2f} s of {what}; no budget set (verify.{key})", copied=True)

    return [audit.at_most("artifact_bytes", artifact_bytes, vp.byte_limit, "artifact weights + code bytes"),
            audit.at_most("state_bytes", state_bytes, vp.max_state_bytes, "eval-time cache state, bytes"),
            dataclasses.replace(audit.at_most("cache_overhead", overhead, vp.max_overhead, "cache seconds / neural scoring seconds"), copied=True),
            budget("training_budget", train_seconds, vp.max_train_seconds, "training + Hessian collection", "max_train_seconds"),
            budget("eval_budget", eval_seconds, vp.max_eval_seconds, "evaluation (score + adapt + rescore)", "max_eval_seconds")]


def metrics_match(claimed: dict[str, object], own: dict[str, float]) -> Rule:
    """metrics_match: each figure a stage wrote into metrics/*.json (name: "stage.key") equals the report's own
    recomputation of it, as the stages round (6 decimals): a hand-edited or stale metrics file fails the report."""
    def equal(x: object, v: float) -> bool:  # written this way round, NaN is never equal
        return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(float(x) - round(v, 6)) <= 1e-6

    wrong = [k for k, v in own.items() if not equal(claimed.get(k), v)]
    detail = "; ".join(f"{k} {claimed.get(k)!r} vs {v:.6f}" for k, v in ((k, own[k]) for k in wrong)) or "all equal"
    return Rule("metrics_match", not wrong, len(wrong), 0, f"{len(own)} figures of metrics/*.json recomputed from the records and the report's "
                f"own byte counts: {len(wrong)} differ ({detail})")


def data_rules(doc_index: Path, quant_meta: dict, shards_dir: Path, r: Records, decode: Callable[[list[int]], str], transform: str,
               doc_bytes: np.ndarray, val_docs: int, normalize: Callable[[str], str] | None = None) -> list[Rule]:
    """val_not_in_train, val_not_in_calibration (what calibrate's metadata says it read), bytes_are_utf8,
    val_starts_with_bos and, with tokenizer.transform caseops, transform_inverts. decode: the tokenizer's
    (ids -> text, transformed if a transform is on); doc_bytes: the BPB bytes the records give each validation
    document; val_docs: the validation documents the challenge scores (verify.val_docs; 0: no requirement).
    Where tokenize read the documents as text, the index records each one's original as the tokenizer normalises
    it (norm_hash, normalised: pgolf.doc_index); with normalize that normalisation (caseops.normalizer; None: none)
    transform_inverts then holds every document's inverse to that original, not only to being CaseOps text."""
    index = pq.read_table(doc_index).to_pydict()
    split, hashes = np.array(index["split"]), np.array(index["hash"], dtype=np.uint64)
    val = hashes[split == "val"]
    recorded = [(h, n) for s, h, n in zip(index["split"], index.get("norm_hash", []), index.get("normalised", [])) if s == "val"]
    calibration = quant_meta.get("calibration", {})
    calib = calibration_hashes(shards.list_shards(shards_dir, "train"), int(calibration.get("first_tokens", 0)), r.bos)
    rule = audit.disjoint("val_not_in_calibration", val, calib, "the calibration tokens")
    if calibration.get("split") not in ("train", "self_generated"):  # self_generated: the model's own samples, no data
        rule = Rule(rule.name, False, rule.figure, 0, f"calibration read the {calibration.get('split')!r} split, not train")
    starts = windows.doc_starts(r.tokens, r.bos)
    texts = [decode(r.tokens[a + 1 : b].tolist()) for a, b in zip(starts, np.append(starts[1:], len(r.tokens)))]
    inverses = [inverse(t) for t in texts] if transform == "caseops" else texts
    checked = [val_in_train(val, hashes[split == "train"], val_docs), rule, utf8_bytes(inverses, doc_bytes), starts_with_bos(r, len(val))]
    if transform == "caseops":
        # The tokenizer normalises after the transform: text no transform writes (unmarked capitals, composed accents)
        # is normalisation's mark, not a loss. Only an original says whether the inverse is the right one.
        marked = sum(o is not None and caseops.encode(o) != t for o, t in zip(inverses, texts))
        if not recorded or any(h is None for h, _ in recorded):  # imported shards (or an older index): no text was read
            bad = sum(o is None for o in inverses)
            detail = (f"{bad} of {len(texts):,} decoded validation documents have no CaseOps original; {marked} carry the tokenizer's "
                      "normalisation (capitals or accented letters no transform writes; tokenize recorded no originals to compare: "
                      "it read shards, not text)")
        else:
            norm = normalize or (lambda text: text)
            # A document with no recorded original to compare (the counts differ) fails too.
            bad = sum(o is None or hash_text(norm(o)) != h for o, (h, _) in zip(inverses, recorded)) + abs(len(texts) - len(recorded))
            changed = sum(bool(n) for _, n in recorded)
            detail = (f"{bad} of {len(texts):,} decoded validation documents ({len(recorded):,} originals recorded by tokenize) do not invert "
                      "to their original as the tokenizer normalises it (by its hash); "
                      f"that normalisation changed {changed} of the originals (their tokens stand for the normalised text), "
                      f"{marked} so that the decoded text is no transform's output")
        checked.append(Rule("transform_inverts", bad == 0, bad, 0, detail))
    return checked


def inverse(text: str) -> str | None:
    """The original of decoded CaseOps text as the tokenizer's normalisation left it (caseops.decode, normalised), or
    None where it has none."""
    try:
        return caseops.decode(text, normalised=True)
    except caseops.CaseOpsError:
        return None


def val_in_train(val: np.ndarray, train: np.ndarray, val_docs: int) -> Rule:
    """val_not_in_train: validation documents found in training by hash, plus, when the validation split is shorter
    than the val_docs the challenge scores, the training documents that stand where the rest of validation stood
    (every exporter keeps source order: validation first, training after it). That is openai/parameter-golf#2127:
    the CaseOps preparation script's default of 10,000 validation documents put 40,000 of the 50,000 into training."""
    shared = int(np.isin(val, train).sum())
    moved = min(max(0, val_docs - len(val)), len(train)) if val_docs else 0
    detail = f"{shared} validation documents also in the training split by hash"
    if val_docs:
        detail += (f"; the validation split holds {len(val):,} documents and the challenge scores the first {val_docs:,}, so the first "
                   f"{moved:,} training documents are validation documents" if moved else f"; the validation split holds the {val_docs:,} documents scored")
    return Rule("val_not_in_train", shared + moved == 0, shared + moved, 0, detail)


def utf8_bytes(originals: list[str | None], doc_bytes: np.ndarray) -> Rule:
    """bytes_are_utf8: every validation document's BPB byte count (the tables', or the byte sidecar's) equals the
    UTF-8 bytes of its decoded original text. A document with no original (None) has no bytes to count: it
    differs, and decodes to 0 bytes in the totals, so they agree whenever the rule passes."""
    missing = np.array([o is None for o in originals], dtype=bool)
    utf8 = np.array([0 if o is None else len(o.encode("utf-8")) for o in originals], dtype=np.int64)
    bad = int(np.count_nonzero(missing | (utf8 != doc_bytes)))
    return Rule("bytes_are_utf8", bad == 0, bad, 0, f"{bad} of {len(utf8):,} validation documents count other than their decoded UTF-8 bytes"
                f"{f' ({int(missing.sum())} decode to no original)' if missing.any() else ''} (in all: {int(doc_bytes.sum()):,} counted, "
                f"{int(utf8.sum()):,} decoded)")


def starts_with_bos(r: Records, docs: int) -> Rule:
    """val_starts_with_bos: every validation document tokenize recorded starts with BOS: the stream's first token
    is one, and there is one document start per recorded document."""
    starts = windows.doc_starts(r.tokens, r.bos)
    missing = int(r.tokens[0] != r.bos) + abs(docs - len(starts))
    return Rule("val_starts_with_bos", missing == 0, missing, 0, f"{len(starts):,} documents start at a BOS for {docs:,} validation documents "
                f"recorded; the stream starts with {'BOS' if r.tokens[0] == r.bos else f'token {int(r.tokens[0])}'} (an exporter that "
                "writes no BOS merges documents)")
