"""The report's SVG plots: well-formed, every point inside the frame, axes that cover the data."""
import random
import xml.etree.ElementTree as ET

from pgolf import svgplot

NS = "{http://www.w3.org/2000/svg}"


def test_ticks_cover_the_data():
    rng = random.Random(0)
    for _ in range(500):
        lo = rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-6, 3)
        hi = lo + rng.uniform(1e-6, 1e3) * 10 ** rng.randint(-3, 3)
        ticks = svgplot._ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi * (1 - 1e-12) - 1e-12 and 2 <= len(ticks) <= 12


def test_line_chart_points_lie_inside_the_frame():
    xs = list(range(1, 101))
    svg = ET.fromstring(svgplot.line_chart("loss", "step", "nats", {"a": (xs, [7 - 0.03 * x for x in xs]), "b & c": (xs, [3.2] * 100)}))
    lines = svg.findall(f"{NS}polyline")
    assert len(lines) == 2 and [ln.find(f"{NS}title").text for ln in lines] == ["a", "b & c"]
    for line in lines:
        points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        assert len(points) == 100
        assert all(svgplot.LEFT - 1e-6 <= x <= svgplot.W - svgplot.RIGHT + 1e-6 for x, _ in points)
        assert all(svgplot.TOP - 1e-6 <= y <= svgplot.H - svgplot.BOTTOM + 1e-6 for _, y in points)


def test_bar_chart_has_one_bar_per_label_within_the_axis():
    bars = {f"t{i}": 0.0001 * i for i in range(12)}
    svg = ET.fromstring(svgplot.bar_chart("err", "h_error", bars))
    rects = svg.findall(f"{NS}rect")[1:]  # after the background
    assert len(rects) == 12 and int(svg.get("height")) == svgplot.TOP + svgplot.BOTTOM + 16 * 12
    assert max(float(r.get("width")) for r in rects) <= svgplot.W - svgplot.LEFT - svgplot.RIGHT
