"""Plots as self-contained SVG: the report's figures render offline in any browser or markdown viewer.

`dvc plots show` draws the same data with Vega, which its HTML loads from the network; these need nothing.
"""
from __future__ import annotations

import math
from html import escape

W, H = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 40, 50
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values from at or below lo to at or above hi."""
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step - 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _frame(title: str, x_label: str, y_label: str, body: list[str], height: int = H) -> str:
    mid = TOP + (height - TOP - BOTTOM) / 2
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{height}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<text x="{LEFT + (W - LEFT - RIGHT) / 2}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="16" y="{mid}" text-anchor="middle" transform="rotate(-90 16 {mid})">{escape(y_label)}</text>',
    ]
    return "\n".join(head + body + ["</svg>"]) + "\n"


def line_chart(title: str, x_label: str, y_label: str, series: dict[str, tuple[list[float], list[float]]]) -> str:
    """One polyline per series, shared axes, a legend on the right."""
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy if math.isfinite(y)]
    x_ticks, y_ticks = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    px = lambda x: LEFT + (x - x0) / ((x1 - x0) or 1) * (W - LEFT - RIGHT)  # noqa: E731
    py = lambda y: H - BOTTOM - (y - y0) / ((y1 - y0) or 1) * (H - TOP - BOTTOM)  # noqa: E731
    body = [f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="black"/>',
            f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="black"/>']
    for t in x_ticks:
        body.append(f'<text x="{px(t):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    for t in y_ticks:
        body.append(f'<line x1="{LEFT}" y1="{py(t):.1f}" x2="{W - RIGHT}" y2="{py(t):.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy) if math.isfinite(y))
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"><title>{escape(name)}</title></polyline>')
        body.append(f'<text x="{W - RIGHT + 12}" y="{TOP + 16 + 18 * i}" fill="{color}">{escape(name)}</text>')
    return _frame(title, x_label, y_label, body)


def bar_chart(title: str, x_label: str, bars: dict[str, float]) -> str:
    """Horizontal bars, one per label, from zero."""
    row = 16.0
    height = int(TOP + BOTTOM + row * len(bars))
    ticks = _ticks(0.0, max(list(bars.values()) + [0.0]) or 1.0)
    scale = (W - 2 * LEFT - RIGHT) / (ticks[-1] or 1)
    left = 2 * LEFT
    body = [f'<line x1="{left}" y1="{TOP}" x2="{left}" y2="{height - BOTTOM}" stroke="black"/>']
    for t in ticks:
        body.append(f'<text x="{left + t * scale:.1f}" y="{height - BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    for i, (label, v) in enumerate(bars.items()):
        y = TOP + i * row
        body.append(f'<rect x="{left}" y="{y + 2:.1f}" width="{max(v, 0) * scale:.1f}" height="{row - 4:.1f}" fill="{COLORS[0]}">'
                    f'<title>{escape(label)}: {_fmt(v)}</title></rect>')
        body.append(f'<text x="{left - 6}" y="{y + row / 2 + 4:.1f}" text-anchor="end" font-size="10">{escape(label)}</text>')
    return _frame(title, x_label, "", body, height)
