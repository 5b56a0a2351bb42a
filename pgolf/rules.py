"""The report's rules applied to one run's outputs: every audit of pgolf/audit.py, on rebuilt inputs.

Each rule is measured, not copied from the stage under audit: distributions are rebuilt from the
artifact's model, the cache is rerun, pass-1 windows are rescored, hashes are recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pgolf import audit, cache, shards, windows
from pgolf.audit import Rule, VerifyParams
from pgolf.cache import CacheParams
from pgolf.doc_records import hash_doc
from pgolf.model import GPT
from pgolf.progress import Progress
from pgolf.score import score_batch


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


def audited(r: Records, vp: VerifyParams) -> tuple[np.ndarray, int]:
    """Audited targets (a seeded sample of the first verify.audit_tokens, plus all of document 0) and the cut."""
    span = min(r.n, vp.audit_tokens) if vp.audit_tokens else r.n
    starts = windows.doc_starts(r.tokens, r.bos)
    doc_end = int(starts[1]) if len(starts) > 1 else r.n  # document 0: targets 1..its closing BOS
    sample = np.random.default_rng(0).choice(np.arange(1, span + 1), min(vp.positions, span), replace=False)
    return np.union1d(sample, np.arange(1, min(doc_end, span) + 1)), span // 2


def model_dist(model: GPT, r: Records):
    """The artifact model's full next-token distribution at target t, from the context pass 1 used."""

    @torch.inference_mode()
    def dist(t: int) -> np.ndarray:
        x = torch.from_numpy(r.tokens[t - r.context[t - 1] : t].astype(np.int64))[None]
        return F.softmax(model.logits(x)[0, -1].double(), dim=-1).numpy()

    return dist


def pass1_causality(model: GPT, tokens: np.ndarray, plan: windows.Windows, positions: np.ndarray, cut: int, seed: int) -> Rule:
    """Rescore, batched as pass 1 did, the windows of audited targets before the cut, with the tokens after
    it replaced: the scores of targets before the cut must be bit-identical."""
    targets = positions[positions <= cut]
    sel = np.unique(np.searchsorted(plan.end, targets))
    sub = windows.Windows(plan.begin[sel], plan.score_from[sel], plan.end[sel])
    before = sub.targets(0, len(sub)) <= cut

    def run(toks: np.ndarray) -> np.ndarray:
        return score_batch(model, toks, sub, 0, len(sub), torch.device("cpu"))[0].numpy()[before]

    rule = audit.causality("causality_pass1", run, tokens, cut, seed)
    return Rule(rule.name, rule.passed, rule.figure, 0, f"{int(before.sum())} pass-1 scores of audited targets, {len(sub)} windows: {rule.detail}")


def scoring_rules(model: GPT, r: Records, plan: windows.Windows, vp: VerifyParams, cp: CacheParams,
                  done: Progress) -> tuple[list[Rule], cache.Rescored]:
    """normalization, causality_cache, single_pass, causality_pass1; and the cache's rerun on the real stream."""
    positions, cut = audited(r, vp)
    model_prob = np.exp(-r.nll)
    scorer = cache.CacheScorer(model.p.vocab_size, r.n, cp, int(r.tokens[0]))
    rules = [audit.normalization(scorer, r.tokens, positions, model_dist(model, r), model_prob, r.entropy, r.prob,
                                 Progress("report: normalization audit", int(positions.max()), "tokens"))]
    done.update(what="normalization")
    rng = np.random.default_rng(1)
    prob_changed, ent_changed = model_prob.copy(), r.entropy.copy()
    prob_changed[cut:] = rng.uniform(1e-4, 1, r.n - cut)  # a rerun of pass 1 would change these too
    ent_changed[cut:] = rng.uniform(0, 6, r.n - cut).astype(r.entropy.dtype)
    reruns: list[cache.Rescored] = []

    def rerun(toks: np.ndarray) -> np.ndarray:
        same = np.array_equal(toks, r.tokens)
        out = cache.rescore(toks, model_prob if same else prob_changed, r.entropy if same else ent_changed, model.p.vocab_size, cp)
        reruns.append(out)
        return out.prob

    rules.append(audit.causality("causality_cache", rerun, r.tokens, cut))
    done.update(what="causality_cache")
    differ = int(np.count_nonzero(reruns[0].prob != r.prob))
    rules.append(Rule("single_pass", differ == 0, float(differ), 0, f"records equal one causal pass over the stream: {differ} of {r.n} differ"))
    rules.append(pass1_causality(model, r.tokens, plan, positions, cut, 2))
    done.update(what="causality_pass1")
    return rules, reruns[0]


def calibration_hashes(train_shards: list, first_tokens: int, bos: int) -> np.ndarray:
    """Hashes of the complete documents among the first `first_tokens` training tokens (what calibration read)."""
    prefix = np.concatenate([shards.read_tokens(f) for f in train_shards])[:first_tokens] if train_shards else np.zeros(0, np.uint16)
    bounds = np.append(np.flatnonzero(prefix == bos), len(prefix))
    return np.array([hash_doc(prefix[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.uint64)


def budget_rules(artifact_bytes: int, state_bytes: int, overhead: float, train_seconds: float, vp: VerifyParams) -> list[Rule]:
    """artifact_bytes, state_bytes, cache_overhead and training_budget against their verify.* limits."""
    if vp.max_train_seconds:
        budget = audit.at_most("training_budget", train_seconds, vp.max_train_seconds, "training + Hessian collection seconds")
    else:
        budget = Rule("training_budget", True, train_seconds, 0, f"{train_seconds:.2f} s of training + Hessians; no budget set (verify.max_train_seconds)")
    return [audit.at_most("artifact_bytes", artifact_bytes, vp.byte_limit, "artifact weights + code bytes"),
            audit.at_most("state_bytes", state_bytes, vp.max_state_bytes, "eval-time cache state, bytes"),
            audit.at_most("cache_overhead", overhead, vp.max_overhead, "cache seconds / neural scoring seconds"), budget]


def data_rules(doc_index: Path, quant_meta: dict, shards_dir: Path, r: Records, decode, nbytes: np.ndarray) -> list[Rule]:
    """val_not_in_train, val_not_in_calibration (what calibrate's metadata says it read) and bytes_are_utf8."""
    index = pq.read_table(doc_index).to_pydict()
    split, hashes = np.array(index["split"]), np.array(index["hash"], dtype=np.uint64)
    val = hashes[split == "val"]
    calibration = quant_meta.get("calibration", {})
    calib = calibration_hashes(shards.list_shards(shards_dir, "train"), int(calibration.get("first_tokens", 0)), r.bos)
    rule = audit.disjoint("val_not_in_calibration", val, calib, "the calibration tokens")
    if calibration.get("split") not in ("train", "self_generated"):  # self_generated: the model's own samples, no data
        rule = Rule(rule.name, False, rule.figure, 0, f"calibration read the {calibration.get('split')!r} split, not train")
    utf8 = audit.decoded_bytes(decode, r.tokens, windows.doc_starts(r.tokens, r.bos))
    return [audit.disjoint("val_not_in_train", val, hashes[split == "train"], "the training split"), rule,
            audit.equal("bytes_are_utf8", int(nbytes.sum()), utf8, "BPB byte count vs UTF-8 bytes of the decoded validation documents")]
