"""The HTML report: one self-contained page (no network, no external file).

The page has the range, the host and when it was made, totals, three inline SVG charts
(``spoolscan.reports.charts``) and one sortable table per report.  Every value is
escaped (``html.escape`` of the printable form: texts from mail cannot add markup, and
control characters show as escapes).  The only script is the page's own table sorter;
the Content-Security-Policy allows exactly that script and style (by hash) and nothing
from the network, so even markup that slipped through could neither run nor load.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from spoolscan import __version__
from spoolscan.reports import charts
from spoolscan.reports.query import Result, TimeRange, iso
from spoolscan.reports.render import shown

STYLE = """
:root { --ink: #1d1d1f; --muted: #5f6368; --line: #d9dce1; --head: #f2f4f7; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1240px; padding: 20px 24px 40px; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 30px 0 6px; }
.meta, .note { color: var(--muted); margin: 0; }
.totals { display: flex; flex-wrap: wrap; gap: 10px; margin: 18px 0; padding: 0; }
.totals li { list-style: none; border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 14px; min-width: 110px; }
.totals b { display: block; font-size: 20px; }
.totals span { color: var(--muted); font-size: 12px; }
.totals .infected b { color: #c62828; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr));
  gap: 14px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 10px; }
figure.wide { grid-column: 1 / -1; }
figure.wide svg.chart { max-width: 900px; }
figcaption { font-weight: 600; margin-bottom: 6px; }
svg.chart { width: 100%; height: auto; display: block; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left;
  vertical-align: top; }
td.w { overflow-wrap: anywhere; min-width: 16em; }
td.t { white-space: nowrap; }
td.n, th.n { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
th { background: var(--head); position: sticky; top: 0; cursor: pointer;
  white-space: nowrap; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafbfc; }
footer { margin-top: 30px; color: var(--muted); font-size: 12px; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  .charts { display: block; }
  figure, tr { break-inside: avoid; }
  figure { margin-bottom: 10px; }
  .wrap { overflow: visible; }
  th { position: static; cursor: auto; }
  th::after { content: "" !important; }
  thead { display: table-header-group; }
  h2 { break-after: avoid; }
  @page { margin: 14mm; }
}
"""

# Click a column head to sort by it (numbers as numbers); again to reverse.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var p = x.getAttribute("data-v"), q = y.getAttribute("data-v");
        var c = (p !== null && q !== null) ? Number(p) - Number(q)
          : x.textContent.localeCompare(y.textContent);
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.documentElement.setAttribute("data-tables", "sortable");
"""

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")

TOTALS = ("messages", "clean", "infected", "unchecked", "error", "quarantined", "released",
          "bytes")


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


@dataclass(frozen=True)
class Overview:
    """What the top of every page shows: the rows of summary, threats and scanner."""

    summary: Result
    threats: Result
    scanner: Result


def _totals(summary: Result) -> str:
    sums = dict.fromkeys(TOTALS, 0.0)
    for row in summary.rows:
        for name in TOTALS:
            value = row[summary.columns.index(name)]
            sums[name] += float(value) if isinstance(value, int | float) else 0.0
    items = []
    for name in TOTALS:
        value = human_bytes(sums[name]) if name == "bytes" else f"{sums[name]:,.0f}"
        items.append(f'<li class="{name}"><b>{_e(value)}</b><span>{name}</span></li>')
    return f'<ul class="totals">{"".join(items)}</ul>'


def _cell_html(text: str) -> tuple[str, str]:
    """(class, markup) of a text cell: a timestamp stays on one line; a long value may
    wrap anywhere, preferably after a ``/`` (paths are never cut, just wrapped)."""
    if _TIMESTAMP.fullmatch(text):
        return "t", _e(text)
    if len(text) > 40:
        return "w", _e(text).replace("/", "/<wbr>")
    return "", _e(text)


def _table(result: Result) -> str:
    numeric = [all(isinstance(r[i], int | float) or r[i] is None for r in result.rows)
               and any(r[i] is not None for r in result.rows)
               for i in range(len(result.columns))]
    head = "".join(f'<th scope="col"{" class=n" if numeric[i] else ""}>{_e(c)}</th>'
                   for i, c in enumerate(result.columns))
    body = []
    for row in result.rows:
        cells = []
        for i, (column, value) in enumerate(zip(result.columns, row, strict=True)):
            text = shown(column, value)
            if numeric[i] and value is not None:
                cells.append(f'<td class="n" data-v="{_e(str(value))}">{_e(text)}</td>')
            else:
                kind, markup = _cell_html(text)
                cells.append(f'<td class="{kind}">{markup}</td>' if kind
                             else f"<td>{markup}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>\n{chr(10).join(body)}\n</tbody></table></div>')


def _section(result: Result) -> str:
    n = len(result.rows)
    name = result.report.name
    return (f'<section id="{_e(name)}"><h2>{_e(result.report.title)}</h2>'
            f'<p class="note">{n} row{"s" if n != 1 else ""} · <code>spoolscan report '
            f'{_e(name)}</code></p>{_table(result) if n else ""}</section>')


def page(results: Sequence[Result], overview: Overview, window: TimeRange, host: str,
         generated: datetime, title: str) -> str:
    """The whole page, for one report or several (``report all``)."""
    charts_html = "".join(
        f"<figure{cls}><figcaption>{_e(caption)}</figcaption>{svg}</figure>"
        for caption, svg, cls in (
            ("Messages per day by verdict", charts.daily_verdicts(overview.summary), ""),
            ("clamd latency per day", charts.scanner_latency(overview.scanner), ""),
            ("Top threats", charts.top_threats(overview.threats), ' class="wide"')))
    csp = (f"default-src 'none'; style-src {_csp_hash(STYLE)}; "
           f"script-src {_csp_hash(SCRIPT)}; img-src data:; base-uri 'none'; "
           "form-action 'none'")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="generator" content="spoolscan {_e(__version__)}">
<title>{_e(title)} · {_e(host)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{_e(title)}</h1>
<p class="meta">From <time>{_e(iso(window.since))}</time> to <time>{_e(iso(window.until))}\
</time> (UTC) · host <b>{_e(host)}</b> · generated <time>{_e(iso(generated))}</time></p>
</header>
{_totals(overview.summary)}
<div class="charts">{charts_html}</div>
{"".join(_section(r) for r in results)}
<footer>spoolscan {_e(__version__)} · every value is from the SQL views documented in \
docs/sql.md; <code>--format sql</code> prints each query.</footer>
<script>{SCRIPT}</script>
</body>
</html>
"""
