"""Inline SVG line charts and PNG data URIs: what the project's self-contained HTML pages (the run report, the
guidance sweep, comparisons) draw with, no network, no script and no other file."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    band: tuple[list[float], list[float]] | None = None
    """Lower and upper edge of a shaded band (e.g. mean +- std), one per point."""


@dataclass
class Chart:
    title: str
    x_label: str
    series: list[Series]
    markers: list[tuple[float, str]] = field(default_factory=list)
    """Vertical lines (x, label), e.g. the epoch where the held-out score peaked."""
    empty_note: str = "no data yet"


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def nice_ticks(low: float, high: float, count: int = 5, min_step: float = 0.0) -> list[float]:
    """About `count` round tick values (1, 2 or 5 x 10^k apart, at least `min_step`) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = max((high - low) / max(count - 1, 1), min_step)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels with just enough decimals to tell evenly spaced ticks apart."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(ticks[0]) or 1.0
    largest = max(abs(t) for t in ticks)
    if largest >= 1e5 or largest < 1e-3 or step < 1e-4:
        digits = max(1, math.floor(math.log10(largest)) - math.floor(math.log10(step))) if largest > 0 else 1
        return [f"{t:.{digits}e}" if t else "0" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step)))
    return [f"{t:.{decimals}f}" for t in ticks]


def render_chart(chart: Chart, width: int = 440, height: int = 250) -> str:
    """An inline <svg> line chart: axes with round ticks, one line (and optional band) per series, a legend."""
    named = [s for s in chart.series if s.name]
    left, right, top, bottom = 62, 12, 26 + 13 * len(named), 40  # legend rows above the plot
    points = [(x, y) for s in chart.series for x, y in zip(s.xs, s.ys) if finite(x) and finite(y)]
    for s in chart.series:
        if s.band:
            points += [(x, y) for x, lo, hi in zip(s.xs, *s.band) for y in (lo, hi) if finite(x) and finite(y)]
    title = f'<text x="{width / 2}" y="17" text-anchor="middle" class="title">{html.escape(chart.title)}</text>'
    if not points:
        return (
            f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{title}<rect x="{left}" y="{top}" width="{width - left - right}" '
            f'height="{height - top - bottom}" class="frame"/><text x="{width / 2}" y="{height / 2}" '
            f'text-anchor="middle" class="note">{html.escape(chart.empty_note)}</text></svg>'
        )
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(min(xs), max(xs), min_step=1.0 if all(float(x).is_integer() for x in xs) else 0.0)
    pad = (max(ys) - min(ys)) * 0.05 or abs(max(ys)) * 0.05 or 0.5
    y_ticks = nice_ticks(min(ys) - pad, max(ys) + pad)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [title, f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for t, label in zip(y_ticks, tick_labels(y_ticks)):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 5}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for t, label in zip(x_ticks, tick_labels(x_ticks)):
        parts.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 15}" text-anchor="middle" class="tick">{label}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" class="axis">{html.escape(chart.x_label)}</text>')
    for x, label in chart.markers:
        if finite(x):
            parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + plot_h}" class="marker"/>')
            parts.append(f'<text x="{px(x) + 3:.1f}" y="{top + plot_h - 5}" class="marker-label">{html.escape(label)}</text>')
    for index, s in enumerate(chart.series):
        color = COLORS[index % len(COLORS)]
        if s.band:
            edge = [(x, lo, hi) for x, lo, hi in zip(s.xs, *s.band) if finite(x) and finite(lo) and finite(hi)]
            if edge:
                outline = [(px(x), py(hi)) for x, _, hi in edge] + [(px(x), py(lo)) for x, lo, _ in reversed(edge)]
                parts.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in outline)}" fill="{color}" fill-opacity="0.18" stroke="none"/>')
        line = [(px(x), py(y)) for x, y in zip(s.xs, s.ys) if finite(x) and finite(y)]
        if len(line) > 1:
            parts.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in line)}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.4" fill="{color}"/>' for a, b in line]
        legend_y = 34 + 13 * index
        parts.append(f'<line x1="{left}" x2="{left + 14}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{color}" stroke-width="2.5"/>')
        parts.append(f'<text x="{left + 18}" y="{legend_y}" class="legend">{html.escape(s.name)}</text>')
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


# ------------------------------------------------------------------------------------------------ run data



def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
