"""Seeds and significance: group DVC experiments by everything but the seed, test against a baseline.

python -m pgolf.compare [--baseline EXP] [--margin 0.005] [--metric val_loss]

The challenge asks a record to beat the best by `margin` nats at p < 0.01. Per group (same params,
any seed) this prints n, mean ± std of val_bpb and val_loss (the score stage's, i.e. the submitted
artifact's), and a one-sided Welch t-test of H1: mean(baseline) − mean(group) > margin.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Iterable

import yaml

from pgolf.params import PARAMS_FILE

METRICS = {"val_bpb": "metrics/score.json:val_bpb", "val_loss": "metrics/score.json:val_loss"}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def mean_pm(xs: list[float]) -> str:
    """'mean ± std', or 'mean (one run)': one run has no spread to show, not a spread of 0."""
    m, sd = mean_std(xs)
    return f"{m:.4f} ± {sd:.4f}" if len(xs) > 1 else f"{m:.4f} (one run)"


def welch_one_sided(base: list[float], new: list[float], margin: float = 0.0) -> tuple[float, float, float]:
    """(t, df, p) for H1: mean(base) − mean(new) > margin (lower is better); needs 2+ runs on each side."""
    (mb, sb), (mn, sn) = mean_std(base), mean_std(new)
    vb, vn = sb * sb / len(base), sn * sn / len(new)
    se = math.sqrt(vb + vn)
    if se == 0:
        return math.inf if mb - mn > margin else -math.inf, math.nan, 0.0 if mb - mn > margin else 1.0
    t = (mb - mn - margin) / se
    df = (vb + vn) ** 2 / (vb * vb / (len(base) - 1) + vn * vn / (len(new) - 1))
    return t, df, t_sf(t, df)


def param_keys(params: dict, prefix: str = "") -> list[str]:
    """Flattened keys of params.yaml, as exp_show names them."""
    keys = []
    for k, v in params.items():
        keys += param_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def lookup(row: dict, key: str):
    for name in (f"params.yaml:{key}", key):
        if name in row:
            return row[name]
    return None


def groups(rows: Iterable[dict], keys: list[str], seed_key: str = "seed") -> dict[tuple, list[dict]]:
    """Rows with both metrics, grouped by every param but the seed. A run shown twice (the workspace and
    the commit it was made at) counts once."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    seen = set()
    for row in rows:
        if any(row.get(m) is None for m in METRICS.values()):
            continue
        group = tuple((k, lookup(row, k)) for k in keys if k != seed_key)
        run = (group, lookup(row, seed_key), tuple(row[m] for m in METRICS.values()))
        if run not in seen:
            seen.add(run)
            out[group].append(row)
    return out


def differences(group: tuple, base: tuple) -> str:
    diff = [f"{k}={v}" for (k, v), (_, b) in zip(group, base) if v != b]
    return ", ".join(diff) or "(baseline params)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="an experiment name or revision in the baseline group (default: the workspace)")
    ap.add_argument("--margin", type=float, default=0.005, help="improvement required, in the metric's units (nats for val_loss)")
    ap.add_argument("--metric", choices=sorted(METRICS), default="val_loss", help="what the test is on")
    args = ap.parse_args()
    import dvc.api  # here, so the library imports without DVC's start-up cost

    rows = dvc.api.exp_show()
    keys = param_keys(yaml.safe_load(PARAMS_FILE.read_text()))
    by_group = groups(rows, keys)
    want = args.baseline or "workspace"
    base_key = next((g for g, rs in by_group.items() if any(want in (r.get("Experiment"), r.get("rev")) for r in rs)), None)
    if base_key is None:
        raise SystemExit(f"error: no experiment {want!r} with metrics/score.json among {len(rows)} rows of dvc exp show")
    base = [r[METRICS[args.metric]] for r in by_group[base_key]]
    print(f"{'n':>3} {'val_bpb':>17} {'val_loss':>17} {'t':>7} {'df':>6} {'p':>8}  params vs baseline")
    for g, rs in sorted(by_group.items(), key=lambda kv: mean_std([r[METRICS[args.metric]] for r in kv[1]])[0]):
        bpb, loss = mean_pm([r[METRICS["val_bpb"]] for r in rs]), mean_pm([r[METRICS["val_loss"]] for r in rs])
        new = [r[METRICS[args.metric]] for r in rs]
        test = welch_one_sided(base, new, args.margin) if len(new) > 1 and len(base) > 1 and g != base_key else None
        stats = f"{test[0]:>7.2f} {test[1]:>6.1f} {test[2]:>8.4f}" if test else f"{'':>7} {'':>6} {'':>8}"
        print(f"{len(rs):>3} {bpb:>17} {loss:>17} {stats}  {differences(g, base_key)}")
    print(f"one-sided Welch t-test on {args.metric}: H1 baseline − group > {args.margin}; a record needs p < 0.01")


if __name__ == "__main__":
    main()
