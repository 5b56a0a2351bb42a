"""The human side of the report stage: headline BPB on one basis, BPB by position, its CSV rows and plots,
the markdown report, and the git revision it names.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
from dataclasses import dataclass

import numpy as np

from pgolf import svgplot, windows
from pgolf.audit import Rule
from pgolf.runtime import CPU
from pgolf.layout import PLOTS, REPORT
from pgolf.model import GPT
from pgolf.progress import Progress
from pgolf.score import EvalParams, write_records


def non_overlapping_bpb(model: GPT, tokens: np.ndarray, ev: EvalParams, nbytes: np.ndarray, bos: int, what: str) -> float:
    """val_bpb with non-overlapping windows of eval.seq_len, every target once: the headline's common basis."""
    plan = windows.plan(tokens, ev.seq_len, ev.seq_len, False, bos)
    progress = Progress(f"report: {what}, non-overlapping", len(tokens) - 1, "tokens")
    bpb = write_records(model, tokens, plan, ev.batch, nbytes, bos, CPU, None, progress).val_bpb
    progress.done(f"val_bpb {bpb:.4f}")
    return bpb


@dataclass(frozen=True)
class Scored:
    """The report's own BPB of what each scoring stage recorded, each over the bytes the report counted itself."""

    mode: str  # pass 1's scoring mode (eval)
    method: str  # ttt.method
    cache_input: str  # whose records the cache mixed: score | adapt
    pass1: float  # from pass 1's records, checked by records_pass1
    adapt: float  # from the report's own run of the adaptation (pass 1's with ttt.method none)
    cache: float  # from the report's own rerun of the cache

    def claims(self) -> dict[str, float]:
        """What the stages' metrics/*.json must say, by "stage.key" (rules.metrics_match)."""
        neural = self.pass1 if self.cache_input == "score" else self.adapt
        return {"score.val_bpb": self.pass1, "adapt.val_bpb": self.adapt, "adapt.pass1_val_bpb": self.pass1, "adapt.gain": self.pass1 - self.adapt,
                "rescore.val_bpb": self.cache, "rescore.val_bpb_neural": neural, "rescore.gain": neural - self.cache}


def headline(pre: float, post: float, s: Scored, weight_bytes: int, code_bytes: int, state_bytes: int, targets: int, nbytes: int,
             rules: list[Rule]) -> dict:
    """metrics/report.json: flat figures for dvc metrics (every rule in full goes to reports/details/report.json), each
    computed by the report. pre/post: the float checkpoint's and the artifact's val_bpb on one basis (non_overlapping_bpb).
    Rules judged on copied figures are counted apart: they certify nothing."""
    certified, copied = [x for x in rules if not x.copied], [x for x in rules if x.copied]
    claims = s.claims()
    return {
        "val_bpb_pre_quant": round(pre, 6), "val_bpb_post_quant": round(post, 6), "quant_penalty": round(post - pre, 6),
        "val_bpb_scored": round(s.pass1, 6), "scored_mode": s.mode,
        "val_bpb_adapt": round(s.adapt, 6), "adapt_gain": round(claims["adapt.gain"], 6), "ttt_method": s.method,
        "val_bpb_cache": round(s.cache, 6), "cache_gain": round(claims["rescore.gain"], 6),
        "artifact_bytes": weight_bytes + code_bytes, "weight_bytes": weight_bytes, "code_bytes": code_bytes,
        "state_bytes": state_bytes, "val_tokens": targets, "val_bytes": nbytes,
        "rules": len(certified), "rules_passed": sum(bool(x.passed) for x in certified), "passed": all(bool(x.passed) for x in certified),
        "rules_copied": len(copied), "copied_within": sum(bool(x.passed) for x in copied),
        "revision": git_revision(),
    }


def summary(h: dict) -> str:
    """The stage's last line."""
    adapted = f"{h['val_bpb_adapt']:.4f} adapted ({h['ttt_method']}), " if h["ttt_method"] != "none" else ""
    copied = f"; {h['copied_within']}/{h['rules_copied']} on copied seconds within limits" if h["rules_copied"] else ""
    return (f"val_bpb {h['val_bpb_pre_quant']:.4f} float -> {h['val_bpb_post_quant']:.4f} packed (non-overlapping), "
            f"{h['val_bpb_scored']:.4f} {h['scored_mode']}, {adapted}{h['val_bpb_cache']:.4f} with the cache; artifact {h['artifact_bytes']:,} bytes; "
            f"{h['rules_passed']}/{h['rules']} rules pass{copied}")


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


def plots(curve: np.ndarray, by_pos: list[list], quant: dict[str, dict]) -> dict[str, str]:
    """The report's figures as SVG: training loss (unless the weights were imported, untrained here), BPB by
    position (neural vs cache), quantization error per tensor."""
    trained = curve.shape[1] >= 2 and len(curve) > 0
    return {
        **({"train_curve.svg": svgplot.line_chart("Training loss", "step", "train loss (nats)", {"train_loss": (curve[:, 0].tolist(), curve[:, 1].tolist())})}
           if trained else {}),
        "bpb_by_position.svg": svgplot.line_chart(
            "BPB by position in the document", "log2 of the position (bucket)", "bits per byte",
            {"neural": ([r[0] for r in by_pos], [r[3] for r in by_pos]), "cache": ([r[0] for r in by_pos], [r[4] for r in by_pos])}),
        "quant_error.svg": svgplot.bar_chart("Relative H-weighted quantization error per tensor", "h_error", {k: v["h_error"] for k, v in quant.items()}),
    }


def markdown(r: dict, rules: list[Rule], seconds: dict, p: dict, plots: list[str]) -> str:
    """reports/report.md: results, rules, sizes, plots, and the params that produced them."""
    rows = "\n".join(f"| {x.name} | {'pass' if x.passed else '**FAIL**'}{' (copied)' if x.copied else ''} | {x.detail} |" for x in rules)
    secs = ", ".join(f"{k} {v}s" for k, v in seconds.items())
    figures = "\n\n".join(f"![{name.removesuffix('.svg')}]({PLOTS.relative_to(REPORT.parent) / name})" for name in plots)
    return f"""# pgolf run report

Revision `{r['revision']}`. Every figure below was recomputed by the report stage from the records, the artifact and its
own byte counts, except the stages' seconds: those are copied from metrics/*.json, and a rule judged on them is marked
(copied) and is not counted among the rules passed.

## Results

| | val_bpb |
|---|---|
| float checkpoint, non-overlapping {p['eval']['seq_len']} | {r['val_bpb_pre_quant']:.4f} |
| packed artifact, non-overlapping {p['eval']['seq_len']} | {r['val_bpb_post_quant']:.4f} (quantization penalty {r['quant_penalty']:+.4f}) |
| packed artifact, {r['scored_mode']} | {r['val_bpb_scored']:.4f} |
| after test-time training ({r['ttt_method']}) | {r['val_bpb_adapt']:.4f} (gain {r['adapt_gain']:+.4f}) |
| with the causal n-gram cache on {p['cache'].get('input', 'score')}'s records ({p['cache']['mix']}, orders 1..{p['cache']['max_order']}) \
| {r['val_bpb_cache']:.4f} (gain {r['cache_gain']:+.4f}) |

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

`dvc repro` at revision `{r['revision']}`; seconds per stage (copied from metrics/*.json, the report's its own): {secs}.

```json
{json.dumps({k: p[k] for k in ('seed', 'model', 'train', 'quant', 'pack', 'eval', 'ttt', 'cache', 'verify') if k in p}, indent=2)}
```
"""
