"""Inline SVG charts for the HTML report: no script, no network, every label escaped.

Each function takes a report's rows and returns one ``<svg>`` element (a ``viewBox``, so
that it scales with the page), with a ``<title>`` on every bar for the exact numbers.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from spoolscan.reports.query import Result, Value
from spoolscan.reports.render import shown

WIDTH = 720
VERDICT_COLOURS = (("clean", "#3a8f4b"), ("infected", "#c62828"), ("unchecked", "#e0a100"),
                   ("error", "#6d6d6d"))
LATENCY_COLOURS = (("p50_ms", "#90b4de"), ("p90_ms", "#4a7fc1"), ("p99_ms", "#1d3f73"))


def _e(text: str) -> str:
    return html.escape(text, quote=True)


@dataclass(frozen=True)
class _Plot:
    """The drawing area of a chart with a y axis from 0 to ``top``, a line every
    ``step``."""

    left: int
    top_px: int
    width: int
    height: int
    top: float
    step: float

    def y(self, value: float) -> float:
        return self.top_px + self.height - (value / self.top) * self.height

    def axis(self, unit: str = "") -> str:
        out = []
        ticks = int(round(self.top / self.step))
        for k in range(ticks + 1):
            value = self.step * k
            y = self.y(value)
            out.append(f'<line x1="{self.left}" x2="{self.left + self.width}" y1="{y:.1f}" '
                       f'y2="{y:.1f}" stroke="#d8d8d8" stroke-width="1"/>'
                       f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end" '
                       f'font-size="11" fill="#555">{_e(f"{value:,.0f}{unit}")}</text>')
        return "".join(out)


def _scale(most: float) -> tuple[float, float]:
    """(top, step) of an axis for values up to ``most``: whole, round steps (1, 2, 5 times
    a power of ten), at most five of them."""
    step = 1.0
    while True:
        for m in (1, 2, 5):
            if most <= m * step * 5:
                unit = m * step
                return max(1, -(-most // unit)) * unit, unit
        step *= 10


def _svg(height: int, label: str, body: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg" '
            f'font-family="system-ui, sans-serif">{body}</svg>')


def _empty(height: int, label: str, why: str) -> str:
    return _svg(height, label, f'<text x="{WIDTH / 2}" y="{height / 2}" text-anchor="middle" '
                               f'font-size="13" fill="#777">{_e(why)}</text>')


def _legend(items: Sequence[tuple[str, str]], x: int, y: int) -> str:
    out = []
    for name, colour in items:
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="{y}" font-size="11" fill="#333">{_e(name)}</text>')
        x += 24 + 7 * len(name)
    return "".join(out)


def _column(result: Result, name: str) -> int:
    return result.columns.index(name)


def _number(value: Value) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _day_labels(days: Sequence[str], x_of, bar: float, y: float) -> str:  # type: ignore[no-untyped-def]
    every = max(1, (len(days) + 13) // 14)  # at most ~14 labels
    return "".join(
        f'<text x="{x_of(i) + bar / 2:.1f}" y="{y}" text-anchor="middle" font-size="11" '
        f'fill="#555">{_e(day[5:] if len(day) == 10 else day)}</text>'
        for i, day in enumerate(days) if i % every == 0)


def daily_verdicts(summary: Result) -> str:
    """Stacked bars: messages per day, by verdict (all sources together)."""
    label = "Messages per day by verdict"
    day_i = _column(summary, "day")
    per_day: dict[str, dict[str, float]] = {}
    for row in summary.rows:
        counts = per_day.setdefault(str(row[day_i]), {})
        for verdict, _ in VERDICT_COLOURS:
            counts[verdict] = counts.get(verdict, 0) + _number(row[_column(summary, verdict)])
    if not per_day:
        return _empty(220, label, "no messages in this range")
    days = sorted(per_day)
    plot = _Plot(56, 28, WIDTH - 72, 150,
                 *_scale(max(sum(c.values()) for c in per_day.values())))
    slot = plot.width / len(days)
    bar = max(2.0, min(48.0, slot * 0.7))

    def x_of(i: int) -> float:
        return plot.left + slot * i + (slot - bar) / 2

    out = [plot.axis(), _legend(VERDICT_COLOURS, plot.left, 14)]
    for i, day in enumerate(days):
        base = 0.0
        for verdict, colour in VERDICT_COLOURS:
            n = per_day[day][verdict]
            if not n:
                continue
            y_top, y_base = plot.y(base + n), plot.y(base)
            out.append(f'<rect class="bar" x="{x_of(i):.1f}" y="{y_top:.1f}" width="{bar:.1f}" '
                       f'height="{max(0.5, y_base - y_top):.1f}" fill="{colour}">'
                       f'<title>{_e(day)}: {n:,.0f} {verdict}</title></rect>')
            base += n
    out.append(_day_labels(days, x_of, bar, plot.top_px + plot.height + 16))
    return _svg(210, label, "".join(out))


def top_threats(threats: Result, top: int = 10) -> str:
    """Horizontal bars: the signatures that hit the most messages."""
    label = "Top threats by messages"
    rows = threats.rows[:top]
    if not rows:
        return _empty(120, label, "no infected mail in this range")
    sig_i, n_i = _column(threats, "signature"), _column(threats, "messages")
    height = 24 + 26 * len(rows)
    left, right = 300, WIDTH - 60
    most = max(_number(r[n_i]) for r in rows) or 1.0
    out = []
    for k, row in enumerate(rows):
        name = shown("signature", row[sig_i])
        short = name if len(name) <= 44 else name[:43] + "…"
        n = _number(row[n_i])
        y = 14 + 26 * k
        w = max(1.0, (right - left) * n / most)
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end" font-size="12" '
                   f'fill="#222">{_e(short)}<title>{_e(name)}</title></text>'
                   f'<rect class="bar" x="{left}" y="{y}" width="{w:.1f}" height="18" '
                   f'fill="#c62828"><title>{_e(name)}: {n:,.0f} message(s)</title></rect>'
                   f'<text x="{left + w + 6:.1f}" y="{y + 13}" font-size="12" '
                   f'fill="#333">{n:,.0f}</text>')
    return _svg(height, label, "".join(out))


def scanner_latency(scanner: Result) -> str:
    """Grouped bars per day: clamd's p50, p90 and p99 latency (ms)."""
    label = "clamd latency per day (ms)"
    day_i = _column(scanner, "day")
    rows = [r for r in scanner.rows
            if any(r[_column(scanner, c)] is not None for c, _ in LATENCY_COLOURS)]
    if not rows:
        return _empty(220, label, "no clamd scans in this range")
    most = max(_number(r[_column(scanner, c)]) for r in rows for c, _ in LATENCY_COLOURS)
    plot = _Plot(56, 28, WIDTH - 72, 150, *_scale(most))
    slot = plot.width / len(rows)
    group = max(6.0, min(72.0, slot * 0.75))
    bar = group / len(LATENCY_COLOURS)

    def x_of(i: int) -> float:
        return plot.left + slot * i + (slot - group) / 2

    out = [plot.axis(" ms"), _legend([(c[:3], colour) for c, colour in LATENCY_COLOURS],
                                     plot.left, 14)]
    for i, row in enumerate(rows):
        for k, (col, colour) in enumerate(LATENCY_COLOURS):
            value = _number(row[_column(scanner, col)])
            y = plot.y(value)
            out.append(f'<rect class="bar" x="{x_of(i) + k * bar:.1f}" y="{y:.1f}" '
                       f'width="{bar - 1:.1f}" height="{max(0.5, plot.y(0) - y):.1f}" '
                       f'fill="{colour}"><title>{_e(str(row[day_i]))} {col[:3]}: '
                       f'{value:,.0f} ms</title></rect>')
    out.append(_day_labels([str(r[day_i]) for r in rows], x_of, group,
                           plot.top_px + plot.height + 16))
    return _svg(210, label, "".join(out))
