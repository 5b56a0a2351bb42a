"""Stage 7: every upstream output -> audits, metrics/report.json, reports/report.md, plot data.

python -m stages.report    (reads params.yaml: verify; eval and cache to rebuild what was scored)
Each rule is measured, not copied from upstream metrics: the artifact is re-sized, the cache rerun,
distributions rebuilt from the artifact's model. With verify.strict a broken rule fails the stage,
after the report is written.
"""
import csv
import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pgolf import artifact, audit, cache, checkpoint, params, shards, svgplot, tokenizer, windows
from pgolf.bpb import ByteTables
from pgolf.distributed import Dist
from pgolf.doc_records import hash_doc
from pgolf.errors import InputError, StageError
from pgolf.stage import run_stage
from pgolf.files import staged, write_bytes, write_json
from pgolf.layout import (ARTIFACT, CHECKPOINT, DETAILS, DOC_INDEX, LOADER_MODULE, METRICS, PLOTS, QUANTIZED, REPORT, RESCORES, SCORES, SHARDS,
                          TOKENIZER, TRAIN_CURVE)
from pgolf.audit import VerifyParams
from pgolf.cache import CacheParams
from pgolf.score import EvalParams
from pgolf.progress import Progress
from pgolf.score import score_batch, write_records
from pgolf.sources import code_bytes, code_files

CPU = Dist(0, 1, torch.device("cpu"))


STEPS = ("normalization", "causality_cache", "causality_pass1", "rules", "float bpb", "packed bpb", "plots")


def metrics(name: str, folder: Path = METRICS) -> dict:
    path = folder / f"{name}.json"
    if not path.is_file():
        raise InputError(f"{path}: missing (run dvc repro)")
    return json.loads(path.read_text())


def details(name: str) -> dict:
    return metrics(name, DETAILS)


def non_overlapping_bpb(model, tokens, ev: EvalParams, tables, bos: int, what: str) -> float:
    plan = windows.plan(tokens, ev.seq_len, ev.seq_len, False, bos)
    progress = Progress(f"report: {what}, non-overlapping", len(tokens) - 1, "tokens")
    bpb = write_records(model, tokens, plan, ev.batch, tables, bos, CPU, None, progress).val_bpb
    progress.done(f"val_bpb {bpb:.4f}")
    return bpb


def model_dist(model, tokens: np.ndarray, context: np.ndarray):
    """The artifact model's full next-token distribution at target t, from the context pass 1 used."""

    @torch.inference_mode()
    def dist(t: int) -> np.ndarray:
        x = torch.from_numpy(tokens[t - context[t - 1] : t].astype(np.int64))[None]
        return F.softmax(model.logits(x)[0, -1].double(), dim=-1).numpy()

    return dist


def pass1_causality(model, tokens, plan: windows.Windows, positions: np.ndarray, cut: int, seed: int) -> audit.Rule:
    """Rescore, batched as pass 1 did, the windows of audited targets before the cut, with the tokens after
    it replaced: the scores of targets before the cut must be bit-identical."""
    targets = positions[positions <= cut]
    sel = np.unique(np.searchsorted(plan.end, targets))
    sub = windows.Windows(plan.begin[sel], plan.score_from[sel], plan.end[sel])
    before = sub.targets(0, len(sub)) <= cut

    def run(toks: np.ndarray) -> np.ndarray:
        return score_batch(model, toks, sub, 0, len(sub), CPU.device)[0].numpy()[before]

    rule = audit.causality("causality_pass1", run, tokens, cut, seed)
    return audit.Rule(rule.name, rule.passed, rule.figure, 0, f"{int(before.sum())} pass-1 scores of audited targets, {len(sub)} windows: {rule.detail}")


def bpb_by_position(doc_pos: np.ndarray, nll_neural: np.ndarray, nll_cache: np.ndarray, nbytes: np.ndarray) -> list[list]:
    """Rows (bucket, first position in document, targets, neural BPB, cache BPB) by powers of two."""
    bucket = np.floor(np.log2(np.maximum(doc_pos, 1))).astype(int)
    rows = []
    for b in np.unique(bucket):
        m = bucket == b
        nb = max(int(nbytes[m].sum()), 1)
        rows.append([int(b), 2 ** int(b), int(m.sum()), nll_neural[m].sum() / np.log(2) / nb, nll_cache[m].sum() / np.log(2) / nb])
    return rows


def csv_bytes(header: list[str], rows: list[list]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    w.writerows([[f"{v:.6f}" if isinstance(v, float) else v for v in r] for r in rows])
    return out.getvalue().encode()


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        # Only code and params count: DVC deletes this stage's own outputs before running it.
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", "pgolf", "stages", "params.yaml", "dvc.yaml"]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+changes" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    t0 = time.perf_counter()
    p = params.load()
    vp = params.section(p, "verify", VerifyParams)
    ev, cp = params.section(p, "eval", EvalParams), params.section(p, "cache", CacheParams)
    stage_metrics = {name: metrics(name) for name in ("tokenize", "train", "quant", "pack", "score", "rescore")}
    quant_details = details("quant")
    steps = Progress("report", len(STEPS), "steps", every=0)
    for path in (SCORES, RESCORES, ARTIFACT, CHECKPOINT, DOC_INDEX, QUANTIZED):
        if not path.is_file():
            raise InputError(f"{path}: missing (run dvc repro)")
    sp = tokenizer.load(TOKENIZER)
    bos = sp.bos_id()
    tokens = np.concatenate([shards.read_tokens(f) for f in shards.list_shards(SHARDS, "val")])
    n = len(tokens) - 1
    rec = pq.read_table(SCORES)
    res = pq.read_table(RESCORES)
    nll = rec.column("nll").to_numpy().astype(np.float64)
    entropy, context = rec.column("entropy").to_numpy(), rec.column("context").to_numpy()
    nbytes = rec.column("bytes").to_numpy()
    recorded = res.column("prob").to_numpy()
    if len(nll) != n or len(recorded) != n:
        raise InputError(f"{SCORES} / {RESCORES}: {len(nll)} / {len(recorded)} records for {n} validation targets")
    model = artifact.load_model(ARTIFACT).eval()
    float_model, _ = checkpoint.load_model(CHECKPOINT)
    tables = ByteTables.from_sentencepiece(sp, model.p.vocab_size)

    # Audited positions: a seeded sample of the first verify.audit_tokens targets, plus one whole document.
    span = min(n, vp.audit_tokens) if vp.audit_tokens else n
    rng = np.random.default_rng(0)
    starts = windows.doc_starts(tokens, bos)
    doc_end = int(starts[1]) if len(starts) > 1 else n  # document 0: targets 1..its closing BOS
    positions = np.union1d(rng.choice(np.arange(1, span + 1), min(vp.positions, span), replace=False), np.arange(1, min(doc_end, span) + 1))
    cut = span // 2
    model_prob = np.exp(-nll)
    plan = windows.plan(tokens, ev.seq_len, ev.stride, ev.doc_isolated, bos)

    rules: list[audit.Rule] = []
    scorer = cache.CacheScorer(model.p.vocab_size, n, cp, int(tokens[0]))
    rules.append(audit.normalization(scorer, tokens, positions, model_dist(model, tokens, context), model_prob, entropy, recorded,
                                     Progress("report: normalization audit", int(positions.max()), "tokens")))
    steps.update(what="normalization")
    rng_tail = np.random.default_rng(1)
    mp_changed, ent_changed = model_prob.copy(), entropy.copy()
    mp_changed[cut:] = rng_tail.uniform(1e-4, 1, n - cut)  # a rerun of pass 1 would change these too
    ent_changed[cut:] = rng_tail.uniform(0, 6, n - cut).astype(entropy.dtype)
    reruns: list[cache.Rescored] = []

    def rerun(toks: np.ndarray) -> np.ndarray:
        same = np.array_equal(toks, tokens)
        out = cache.rescore(toks, model_prob if same else mp_changed, entropy if same else ent_changed, model.p.vocab_size, cp)
        reruns.append(out)
        return out.prob

    rules.append(audit.causality("causality_cache", rerun, tokens, cut))
    steps.update(what="causality_cache")
    rules.append(audit.Rule("single_pass", bool(np.array_equal(reruns[0].prob, recorded)), float(np.count_nonzero(reruns[0].prob != recorded)), 0,
                            "records equal one causal pass over the stream: " f"{int(np.count_nonzero(reruns[0].prob != recorded))} of {n} differ"))
    rules.append(pass1_causality(model, tokens, plan, positions, cut, 2))
    steps.update(what="causality_pass1")

    files = code_files(LOADER_MODULE)
    artifact_bytes = ARTIFACT.stat().st_size + code_bytes(files)
    rules.append(audit.at_most("artifact_bytes", artifact_bytes, vp.byte_limit, "artifact weights + code bytes"))
    rules.append(audit.at_most("state_bytes", reruns[0].state_bytes, vp.max_state_bytes, "eval-time cache state, bytes"))
    overhead = stage_metrics["rescore"]["seconds"] / stage_metrics["score"]["seconds"]
    rules.append(audit.at_most("cache_overhead", overhead, vp.max_overhead, "cache seconds / neural scoring seconds"))

    index = pq.read_table(DOC_INDEX).to_pydict()
    split = np.array(index["split"])
    hashes = np.array(index["hash"], dtype=np.uint64)
    val_hashes, train_hashes = hashes[split == "val"], hashes[split == "train"]
    rules.append(audit.disjoint("val_not_in_train", val_hashes, train_hashes, "the training split"))
    _, qmeta = checkpoint.read_safetensors(QUANTIZED)
    calib = qmeta.get("calibration", {})
    train_paths = shards.list_shards(SHARDS, "train")
    prefix = np.concatenate([shards.read_tokens(f) for f in train_paths])[: int(calib.get("first_tokens", 0))] if train_paths else np.zeros(0, np.uint16)
    bounds = np.append(np.flatnonzero(prefix == bos), len(prefix))
    calib_hashes = np.array([hash_doc(prefix[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.uint64)
    rule = audit.disjoint("val_not_in_calibration", val_hashes, calib_hashes, "the calibration tokens")
    if calib.get("split") != "train":
        rule = audit.Rule(rule.name, False, rule.figure, 0, f"calibration read the {calib.get('split')!r} split, not train")
    rules.append(rule)
    rules.append(audit.equal("bytes_are_utf8", int(nbytes.sum()), audit.decoded_bytes(sp.decode, tokens, starts),
                             "BPB byte count vs UTF-8 bytes of the decoded validation documents"))
    steps.update(what="sizes, data and bytes rules")

    # Headline figures, measured here on one basis: non-overlapping windows of eval.seq_len, every target once.
    pre = non_overlapping_bpb(float_model.eval(), tokens, ev, tables, bos, "float checkpoint")
    steps.update(what="float checkpoint val_bpb")
    post = non_overlapping_bpb(model, tokens, ev, tables, bos, "packed artifact")
    steps.update(what="packed artifact val_bpb")
    pack, score, rescore = stage_metrics["pack"], stage_metrics["score"], stage_metrics["rescore"]
    seconds = {
        "tokenize": stage_metrics["tokenize"]["seconds"], "train": stage_metrics["train"]["train_seconds"],
        "calibrate": stage_metrics["quant"]["seconds"], "pack": pack["seconds"], "score": score["seconds"], "rescore": rescore["seconds"],
    }
    report = {  # flat headline figures (dvc metrics show); the rules in full go to reports/details/report.json
        "val_bpb_pre_quant": round(pre, 6),
        "val_bpb_post_quant": round(post, 6),
        "quant_penalty": round(post - pre, 6),
        "val_bpb_scored": score["val_bpb"],
        "scored_mode": score["mode"],
        "val_bpb_cache": rescore["val_bpb"],
        "cache_gain": rescore["gain"],
        "artifact_bytes": artifact_bytes,
        "weight_bytes": ARTIFACT.stat().st_size,
        "code_bytes": artifact_bytes - ARTIFACT.stat().st_size,
        "state_bytes": reruns[0].state_bytes,
        "val_tokens": n,
        "val_bytes": int(nbytes.sum()),
        "rules": len(rules),
        "rules_passed": sum(bool(r.passed) for r in rules),
        "passed": all(bool(r.passed) for r in rules),
        "revision": git_revision(),
    }
    doc_pos = np.arange(1, n + 1) - starts[rec.column("doc").to_numpy()]
    by_pos = bpb_by_position(doc_pos, nll, res.column("nll").to_numpy(), nbytes)
    quant = quant_details["tensors"]
    curve = np.loadtxt(TRAIN_CURVE, delimiter=",", skiprows=1, ndmin=2)
    plots = {
        "train_curve.svg": svgplot.line_chart("Training loss", "step", "train loss (nats)", {"train_loss": (curve[:, 0].tolist(), curve[:, 1].tolist())}),
        "bpb_by_position.svg": svgplot.line_chart(
            "BPB by position in the document", "log2 of the position (bucket)", "bits per byte",
            {"neural": ([r[0] for r in by_pos], [r[3] for r in by_pos]), "cache": ([r[0] for r in by_pos], [r[4] for r in by_pos])}),
        "quant_error.svg": svgplot.bar_chart("Relative H-weighted quantization error per tensor", "h_error", {k: v["h_error"] for k, v in quant.items()}),
    }
    steps.update(what="plots")
    seconds["report"] = round(time.perf_counter() - t0, 2)
    # Every output replaces the last good one together, or none does.
    outs = (METRICS / "bpb_by_position.csv", METRICS / "quant_error.csv", METRICS / "report.json", DETAILS / "report.json", REPORT, PLOTS)
    with staged(*outs) as (by_pos_csv, quant_csv, report_json, details_json, report_md, plots_dir):
        write_bytes(by_pos_csv, csv_bytes(["bucket", "from_position", "targets", "neural", "cache"], by_pos))
        write_bytes(quant_csv, csv_bytes(["tensor", "bits", "h_error"], [[k, v["bits"], float(v["h_error"])] for k, v in quant.items()]))
        write_json(report_json, report)
        write_json(details_json, {"rules": {r.name: r.as_dict() for r in rules}, "seconds": seconds})
        write_bytes(report_md, markdown(report, rules, seconds, p, list(plots)).encode())
        plots_dir.mkdir()
        for name, svg in plots.items():
            (plots_dir / name).write_text(svg, encoding="utf-8")
    broken = [r.name for r in rules if not r.passed]
    steps.done(f"val_bpb {pre:.4f} float -> {post:.4f} packed (non-overlapping), {report['val_bpb_scored']:.4f} {score['mode']}, "
               f"{report['val_bpb_cache']:.4f} with the cache; artifact {artifact_bytes:,} bytes; "
               f"{len(rules) - len(broken)}/{len(rules)} rules pass -> {REPORT}")
    if broken and vp.strict:
        raise StageError(f"{REPORT}: broken rules: {', '.join(broken)} (verify.strict is true)")


def markdown(r: dict, rules: list[audit.Rule], seconds: dict, p: dict, plots: list[str]) -> str:
    rows = "\n".join(f"| {x.name} | {'pass' if x.passed else '**FAIL**'} | {x.detail} |" for x in rules)
    secs = ", ".join(f"{k} {v}s" for k, v in seconds.items())
    figures = "\n\n".join(f"![{name.removesuffix('.svg')}]({PLOTS.relative_to(REPORT.parent) / name})" for name in plots)
    return f"""# pgolf run report

Revision `{r['revision']}`. Every figure below was measured by the report stage or read from the stage that made it.

## Results

| | val_bpb |
|---|---|
| float checkpoint, non-overlapping {p['eval']['seq_len']} | {r['val_bpb_pre_quant']:.4f} |
| packed artifact, non-overlapping {p['eval']['seq_len']} | {r['val_bpb_post_quant']:.4f} (quantization penalty {r['quant_penalty']:+.4f}) |
| packed artifact, {r['scored_mode']} | {r['val_bpb_scored']:.4f} |
| with the causal n-gram cache ({p['cache']['mix']}, orders 1..{p['cache']['max_order']}) | {r['val_bpb_cache']:.4f} (gain {r['cache_gain']:+.4f}) |

{r['val_tokens']:,} validation targets, {r['val_bytes']:,} bytes.

## Rules

| rule | result | figure |
|---|---|---|
{rows}

## Sizes

| | bytes |
|---|---|
| artifact (weights + code) | {r['artifact_bytes']:,} |
| weights (compressed) | {r['weight_bytes']:,} |
| code | {r['code_bytes']:,} |
| eval-time cache state | {r['state_bytes']:,} |

## Plots

{figures}

## How it was produced

`dvc repro` at revision `{r['revision']}`; seconds per stage: {secs}.

```json
{json.dumps({k: p[k] for k in ('seed', 'model', 'train', 'quant', 'pack', 'eval', 'cache', 'verify') if k in p}, indent=2)}
```
"""


if __name__ == "__main__":
    run_stage(main, "report")
