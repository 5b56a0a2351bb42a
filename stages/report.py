"""Stage 7: every upstream output -> the rules, metrics/report.json, reports/report.md with its plots.

python -m stages.report    (reads params.yaml: verify; eval, ttt and cache to rebuild what was scored)
Each rule is measured, not copied from upstream metrics (pgolf/rules.py), and so is every headline figure:
BPB from the records checked here, over the report's own byte counts; the stages' metrics must agree
(metrics_match). Only the stages' seconds are copied, and marked so. With verify.strict a broken rule
fails the stage, after the report is written.
"""
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pgolf import artifact, caseops, checkpoint, params, report, rules, runtime, shards, tokenizer, windows
from pgolf.audit import VerifyParams
from pgolf.bpb import ByteTables, bits_per_byte, val_position_bytes
from pgolf.cache import CacheParams
from pgolf.errors import InputError, StageError
from pgolf.files import staged, write_bytes, write_json
from pgolf.layout import (ADAPTED, ARTIFACT, CHECKPOINT, DETAILS, DOC_INDEX, LOADER_MODULE, METRICS, PLOTS, QUANTIZED, REPORT, RESCORES, SCORES, SHARDS,
                          TOKENIZER, TRAIN_CURVE)
from pgolf.progress import Progress
from pgolf.score import EvalParams
from pgolf.sources import code_bytes, code_files, self_extracting
from pgolf.stage import run_stage
from pgolf.tokenizer import TokenizerParams
from pgolf.ttt import TTTParams


def need(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: missing (run dvc repro)")


def read_json(path: Path) -> dict:
    need(path)
    return json.loads(path.read_text())


def main() -> None:
    t0 = time.perf_counter()
    p = params.load()
    vp, ev, cp = params.section(p, "verify", VerifyParams), params.section(p, "eval", EvalParams), params.section(p, "cache", CacheParams)
    tp = params.section(p, "ttt", TTTParams)
    transform = params.section(p, "tokenizer", TokenizerParams).transform
    m = {name: read_json(METRICS / f"{name}.json") for name in ("tokenize", "train", "quant", "pack", "score", "adapt", "rescore")}
    quant = read_json(DETAILS / "quant.json")["tensors"]
    need(SCORES, ADAPTED, RESCORES, ARTIFACT, CHECKPOINT, DOC_INDEX, QUANTIZED)
    steps = Progress("report", 10 + rules.adapt_steps(ev, tp), "steps", every=0)
    sp = tokenizer.load(TOKENIZER)
    tokens = shards.split_tokens(SHARDS, "val")
    rec, adapted, res = pq.read_table(SCORES), pq.read_table(ADAPTED), pq.read_table(RESCORES)
    mixed = rec if cp.input == "score" else adapted  # the neural records the cache mixed with
    r = rules.Records(tokens, sp.bos_id(), mixed.column("nll").to_numpy().astype(np.float64), mixed.column("entropy").to_numpy(),
                      mixed.column("context").to_numpy(), res.column("prob").to_numpy())
    if not len(r.nll) == rec.num_rows == adapted.num_rows == len(r.prob) == r.n:
        raise InputError(f"{SCORES} / {ADAPTED} / {RESCORES}: {rec.num_rows} / {adapted.num_rows} / {len(r.prob)} records for {r.n} validation targets")
    model = artifact.load_model(ARTIFACT).eval()
    runtime.keep_freed_memory()  # the report reruns pass 1 and the adaptation on the CPU, as the score stage does
    float_model, _ = checkpoint.load_model(CHECKPOINT)
    pos_bytes = val_position_bytes(SHARDS, tokens, ByteTables.from_sentencepiece(sp, model.p.vocab_size))

    plan = windows.plan(tokens, ev.seq_len, ev.stride, ev.doc_isolated, r.bos)
    pass1_nll = rec.column("nll").to_numpy().astype(np.float64)
    checked = [rules.pass1_records(model, rec, tokens, r.bos, pos_bytes, plan, ev, vp.record_batches)]
    steps.update(what="records_pass1")
    positions = rules.audited(r, vp)
    # The report's own runs of the adaptation, each from a fresh copy of the artifact's model.
    adapt_checked, adapted_dist, adapted_nll = rules.adapt_rules(model, r, adapted.column("nll").to_numpy(), pass1_nll, ev, tp, positions, steps)
    checked += adapt_checked
    checked.append(rules.pass1_substitution(model, r, ev))
    steps.update(what="substitution_pass1")
    dist = rules.model_dist(model, r, ev.tilt(tokens)) if cp.input == "score" else adapted_dist
    scoring, rerun = rules.scoring_rules(model, r, pass1_nll, dist, plan, vp, cp, ev, steps)
    checked += scoring
    if ev.doc_isolated:  # a per-document scorer: other documents must not move its records
        checked.append(rules.pass1_isolation(model, tokens, ev, r.bos))
    files = code_files(LOADER_MODULE)  # re-counted here, the way pack says it counted (raw source or the compressed script)
    artifact_bytes = ARTIFACT.stat().st_size + (len(self_extracting(files)) if m["pack"].get("code") == "compressed" else code_bytes(files))
    train_seconds = m["train"]["train_seconds"] + m["quant"]["hessian_seconds"]  # what the challenge's 600 s covers
    eval_seconds = m["score"]["seconds"] + m["adapt"]["seconds"] + m["rescore"]["seconds"]  # what the challenge's eval limit covers
    checked += rules.budget_rules(artifact_bytes, rerun.state_bytes, m["rescore"]["seconds"] / m["score"]["seconds"], train_seconds, eval_seconds, vp)
    starts = windows.doc_starts(tokens, r.bos)
    doc = windows.doc_of(np.arange(1, r.n + 1), starts)
    doc_bytes = np.bincount(doc, pos_bytes[1:], minlength=len(starts)).astype(np.int64)
    normalize = caseops.normalizer(sp) if transform == "caseops" else None  # what the index's norm_hash hashed (pgolf.doc_index)
    checked += rules.data_rules(DOC_INDEX, checkpoint.read_safetensors(QUANTIZED)[1], SHARDS, r, sp.decode, transform, doc_bytes, vp.val_docs,
                                normalize)
    steps.update(what="sizes, data and bytes rules")

    pre = report.non_overlapping_bpb(float_model.eval(), tokens, ev, pos_bytes, r.bos, "float checkpoint")
    steps.update(what="float checkpoint val_bpb")
    post = report.non_overlapping_bpb(model, tokens, ev, pos_bytes, r.bos, "packed artifact")
    steps.update(what="packed artifact val_bpb")
    val_bytes = int(pos_bytes[1:].sum(dtype=np.int64))

    def bpb(nll: np.ndarray) -> float:
        return bits_per_byte(float(np.sum(nll, dtype=np.float64)), val_bytes)

    scored = report.Scored(ev.mode, tp.method, cp.input, bpb(pass1_nll), bpb(adapted_nll), bpb(rerun.nll))
    claimed = {f"{stage}.{k}": v for stage in ("score", "adapt", "rescore") for k, v in m[stage].items()}
    checked.append(rules.metrics_match(claimed, scored.claims()))
    weights = ARTIFACT.stat().st_size
    headline = report.headline(pre, post, scored, weights, artifact_bytes - weights, rerun.state_bytes, r.n, val_bytes, checked)
    by_pos = report.bpb_by_position(np.arange(1, r.n + 1) - starts[doc], r.nll, rerun.nll, pos_bytes[1:])
    with warnings.catch_warnings():  # an imported model's curve has no rows
        warnings.simplefilter("ignore", UserWarning)
        curve = np.loadtxt(TRAIN_CURVE, delimiter=",", skiprows=1, ndmin=2)
    plots = report.plots(curve, by_pos, quant)
    steps.update(what="plots")
    seconds = {"tokenize": m["tokenize"]["seconds"], "train": m["train"]["train_seconds"], "calibrate": m["quant"]["seconds"],
               "pack": m["pack"]["seconds"], "score": m["score"]["seconds"], "adapt": m["adapt"]["seconds"], "rescore": m["rescore"]["seconds"],
               "report": round(time.perf_counter() - t0, 2)}
    # Every output replaces the last good one together, or none does.
    outs = (METRICS / "bpb_by_position.csv", METRICS / "quant_error.csv", METRICS / "report.json", DETAILS / "report.json", REPORT, PLOTS)
    with staged(*outs) as (by_pos_csv, quant_csv, report_json, details_json, report_md, plots_dir):
        write_bytes(by_pos_csv, report.csv_bytes(["bucket", "from_position", "targets", "neural", "cache"], by_pos))
        write_bytes(quant_csv, report.csv_bytes(["tensor", "bits", "h_error"], [[k, v["bits"], float(v["h_error"])] for k, v in quant.items()]))
        write_json(report_json, headline)
        write_json(details_json, {"rules": {x.name: x.as_dict() for x in checked}, "seconds": seconds, "report_steps": steps.laps})
        write_bytes(report_md, report.markdown(headline, checked, seconds, p, list(plots)).encode())
        plots_dir.mkdir()
        for name, svg in plots.items():
            (plots_dir / name).write_text(svg, encoding="utf-8")
    steps.done(f"{report.summary(headline)} -> {REPORT}")
    if (broken := [x.name for x in checked if not x.passed]) and vp.strict:  # a copied figure over its limit is the run's own word: it fails too
        raise StageError(f"{REPORT}: broken rules: {', '.join(broken)} (verify.strict is true)")


if __name__ == "__main__":
    run_stage(main, "report")
