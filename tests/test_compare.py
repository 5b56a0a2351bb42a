"""Seeds and significance: the t-distribution tail against numerical integration, grouping, Welch."""
import math

import pytest

from pgolf import compare


def t_sf_by_integration(t: float, df: float, steps: int = 200_000) -> float:
    """P(T > t) by Simpson's rule on the density over [t, t + 60·scale] (the rest is negligible here)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    if t < 0:
        return 1 - t_sf_by_integration(-t, df, steps)
    hi = t + 400.0
    h = (hi - t) / steps
    s = pdf(t) + pdf(hi) + sum((4 if i % 2 else 2) * pdf(t + i * h) for i in range(1, steps))
    return s * h / 3


@pytest.mark.parametrize("t,df", [(0.5, 3), (1.0, 5), (2.0, 10), (2.7, 4.3), (-1.2, 7), (3.5, 30)])
def test_t_tail_matches_integration(t, df):
    assert compare.t_sf(t, df) == pytest.approx(t_sf_by_integration(t, df), abs=2e-6)


def test_t_tail_closed_forms():
    assert compare.t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-12)  # Cauchy
    assert compare.t_sf(1.0, 2) == pytest.approx(0.5 * (1 - 1 / math.sqrt(3)), abs=1e-12)
    assert compare.t_sf(0.0, 9) == pytest.approx(0.5, abs=1e-12)
    assert compare.t_sf(1.959964, 1e7) == pytest.approx(0.025, abs=1e-6)  # the normal limit


def test_welch_one_sided():
    t, df, p = compare.welch_one_sided([1.0, 1.1, 0.9], [0.5, 0.6, 0.4])
    assert t == pytest.approx(0.5 / math.sqrt(0.02 / 3)) and df == pytest.approx(4.0)
    assert p == pytest.approx(compare.t_sf(t, 4.0)) and p < 0.01
    _, _, p_margin = compare.welch_one_sided([1.0, 1.1, 0.9], [0.5, 0.6, 0.4], margin=0.5)
    assert p_margin == pytest.approx(0.5)  # exactly at the margin: no evidence either way


def test_groups_ignore_the_seed_and_rows_without_metrics():
    m = compare.METRICS
    rows = [
        {"rev": "a", "seed": 1, "quant.bits.mlp": 6, m["val_bpb"]: 1.0, m["val_loss"]: 2.0},
        {"rev": "b", "seed": 2, "quant.bits.mlp": 6, m["val_bpb"]: 1.1, m["val_loss"]: 2.1},
        {"rev": "c", "seed": 1, "params.yaml:quant.bits.mlp": 5, m["val_bpb"]: 0.9, m["val_loss"]: 1.9},
        {"rev": "d", "seed": 3, "quant.bits.mlp": 6, m["val_bpb"]: None, m["val_loss"]: None},
        {"rev": "workspace", "seed": 1, "quant.bits.mlp": 6, m["val_bpb"]: 1.0, m["val_loss"]: 2.0},  # the same run as "a"
    ]
    g = compare.groups(rows, ["seed", "quant.bits.mlp"])
    assert sorted(len(v) for v in g.values()) == [1, 2]
    assert compare.param_keys({"seed": 1, "quant": {"bits": {"mlp": 6}}}) == ["seed", "quant.bits.mlp"]


def test_one_run_shows_no_spread():
    assert compare.mean_pm([1.23456]) == "1.2346 (one run)"
    assert compare.mean_pm([1.0, 1.2]) == f"1.1000 ± {math.sqrt(0.02):.4f}"
