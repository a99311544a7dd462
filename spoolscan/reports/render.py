"""Report rows as text: a table for the terminal, CSV, JSON (an array, or JSON lines).

Texts from mail are in the rows as stored (escaped by the one rule of ``spoolscan.text``:
valid UTF-8, reversible).  CSV and JSON give them as they are, so what a script reads is
what ``sqlite3``/``psql`` show; the table shows them through ``printable`` (control
characters escaped too), so that nothing from mail can drive the terminal.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence

from spoolscan.reports.query import Result, Value, is_number_column
from spoolscan.text import printable, unescape

_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_MIN_WRAP = 12  # a wrapped column keeps at least this many characters per line
_BREAK_AFTER = "/ ,;"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d(T\d\d:\d\d:\d\d\+00:00)?")


def _csv_cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run: a cell that starts like a formula (a
    subject "=HYPERLINK(...)", a sender "@SUM(...)") gets a leading apostrophe."""
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def duration(seconds: int | float) -> str:
    """``93784`` → ``1d 2h 3m 4s``: how long, for a reader (largest units first)."""
    left = int(seconds)
    sign = "-" if left < 0 else ""
    left = abs(left)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size or parts:
            parts.append(f"{left // size}{unit}")
            left %= size
    parts.append(f"{left}s")
    return sign + " ".join(parts)


def shown(column: str, value: Value) -> str:
    """A value as a person reads it (table, HTML): texts unescaped then made printable,
    ``*_seconds`` as a duration."""
    if value is None:
        return ""
    if isinstance(value, str):
        return printable(unescape(value))
    if column.endswith("_seconds"):
        return duration(value)
    return str(value)


def csv_text(result: Result) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if v is None else _csv_cell(v) if isinstance(v, str) else v
                         for v in row])
    return out.getvalue()


def json_text(result: Result, lines: bool = False) -> str:
    """One JSON array of objects (``lines``: one object per line, JSON lines)."""
    objects = [json.dumps(dict(zip(result.columns, row, strict=True)), ensure_ascii=False)
               for row in result.rows]
    if lines:
        return "".join(o + "\n" for o in objects)
    if not objects:
        return "[]\n"
    return "[\n" + ",\n".join(objects) + "\n]\n"


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken after a ``/`` or a
    blank where one is near the end of a line: a path is never cut short."""
    lines = []
    while len(text) > width:
        cut = max(text.rfind(ch, width // 2, width) for ch in _BREAK_AFTER)
        cut = cut + 1 if cut > 0 else width
        lines.append(text[:cut])
        text = text[cut:]
    lines.append(text)
    return lines


def _fit(widths: list[int], limit: int, rigid: Sequence[bool]) -> list[int]:
    """Column widths that fit ``limit`` (two spaces between columns): the widest of the
    other columns are narrowed first, none below ``_MIN_WRAP``; ``rigid`` columns
    (numbers, timestamps) only when that is not enough.  May stay wider than ``limit``."""
    widths = list(widths)
    for narrowable in ([not r for r in rigid], [True] * len(widths)):
        while sum(widths) + 2 * (len(widths) - 1) > limit:
            candidates = [i for i in range(len(widths))
                          if narrowable[i] and widths[i] > _MIN_WRAP]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            widths[widest] -= 1
    return widths


def table_text(result: Result, width: int | None = None, heading: bool = True) -> str:
    """An aligned table.  ``width``: the terminal's; long cells are then wrapped onto
    more lines (never cut).  None: as wide as the longest value (wide mode)."""
    columns = result.columns
    cells = [[shown(c, v) for c, v in zip(columns, row, strict=True)] for row in result.rows]
    numeric = [is_number_column(result.rows, i) for i in range(len(columns))]
    natural = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    rigid = [numeric[i] or all(_TIMESTAMP.fullmatch(r[i]) or not r[i] for r in cells)
             for i in range(len(columns))]
    widths = natural if width is None else _fit(natural, width, rigid)

    def line(values: Sequence[str]) -> list[str]:
        wrapped = [_wrap(v, w) for v, w in zip(values, widths, strict=True)]
        height = max(len(w) for w in wrapped)
        out = []
        for k in range(height):
            parts = []
            for i, w in enumerate(wrapped):
                piece = w[k] if k < len(w) else ""
                parts.append(piece.rjust(widths[i]) if numeric[i] else piece.ljust(widths[i]))
            out.append("  ".join(parts).rstrip())
        return out

    lines = line(columns) + ["  ".join("-" * w for w in widths)]
    for r in cells:
        lines.extend(line(r))
    count = len(result.rows)
    lines.append(f"({count} row{'s' if count != 1 else ''})")
    head = ""
    if heading:
        head = f"{result.report.title}\n{result.window.shown()} (UTC)\n\n"
    return head + "\n".join(lines) + "\n"
