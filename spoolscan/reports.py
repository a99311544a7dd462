"""Canned reports over the public SQL schema (the ``v_scans`` view and ``messages``).

Each report is one SQL query that runs unchanged on SQLite and PostgreSQL, so an admin
can run the same thing by hand (``spoolscan report NAME --format sql`` prints it).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text

from spoolscan.store.repo import Store
from spoolscan.text import printable


@dataclass(frozen=True)
class Report:
    name: str
    title: str
    sql: str  # with a :since parameter (timestamp)


REPORTS: dict[str, Report] = {r.name: r for r in (
    Report("summary", "Scans by source, direction and verdict", """
SELECT source, coalesce(direction, '') AS direction, verdict, count(*) AS scans,
       sum(CASE WHEN cached THEN 1 ELSE 0 END) AS cached,
       count(DISTINCT message_id) AS messages
FROM v_scans WHERE scanned_at >= :since
GROUP BY source, coalesce(direction, ''), verdict
ORDER BY source, direction, verdict"""),
    Report("infected", "Detections, newest first", """
SELECT scanned_at, source, location, sender, recipients, signature, "trigger",
       coalesce(action, '') AS action, coalesce(action_outcome, '') AS outcome
FROM v_scans WHERE verdict = 'infected' AND scanned_at >= :since
ORDER BY scanned_at DESC"""),
    Report("retroactive", "Mail that was clean, detected later by a rescan", """
SELECT v.scanned_at, v.source, v.location, v.signature, m.first_seen_at, v.fingerprint,
       coalesce(v.action, '') AS action
FROM v_scans v JOIN messages m ON m.id = v.message_id
WHERE v.retroactive = true AND v.scanned_at >= :since
ORDER BY v.scanned_at DESC"""),
    Report("signatures", "Signatures that hit, most frequent first", """
SELECT signature, count(*) AS hits, count(DISTINCT content_hash) AS distinct_contents,
       min(scanned_at) AS first_seen, max(scanned_at) AS last_seen
FROM v_scans WHERE verdict IN ('infected', 'unchecked') AND signature IS NOT NULL
  AND scanned_at >= :since
GROUP BY signature ORDER BY hits DESC, signature"""),
    Report("stuck", "Messages kept where they are: retrying or stuck (needs an admin)", """
SELECT updated_at, source, location, queue_id, state, attempts, verdict, last_error
FROM messages WHERE state IN ('retry', 'stuck') AND updated_at >= :since
ORDER BY state DESC, updated_at"""),
    Report("outbound", "Infected mail sent by local senders (compromised accounts?)", """
SELECT sender, count(*) AS infected, min(scanned_at) AS first, max(scanned_at) AS last
FROM v_scans WHERE verdict = 'infected' AND direction IN ('outbound', 'internal')
  AND scanned_at >= :since
GROUP BY sender ORDER BY infected DESC"""),
)}


def run_report(store: Store, name: str, since: datetime) -> tuple[list[str], list[tuple]]:
    report = REPORTS[name]
    if store.engine.dialect.name == "sqlite":
        # SQLite keeps timestamps as naive UTC text; compare like with like.
        since = since.astimezone(UTC).replace(tzinfo=None)
    with store.engine.connect() as conn:
        result = conn.execute(text(report.sql), {"since": since})
        columns = list(result.keys())
        rows = [tuple(r) for r in result]
    return columns, rows


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run: a cell that starts like a formula (a
    subject "=HYPERLINK(...)", a sender "@SUM(...)") gets a leading apostrophe."""
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def render(columns: Sequence[str], rows: Sequence[tuple], fmt: str, title: str = "") -> str:
    """Format a result as table, csv, json or html."""
    if fmt == "json":
        return "".join(json.dumps({c: (_cell(v) if isinstance(v, datetime) else v)
                                   for c, v in zip(columns, row, strict=True)},
                                  default=str) + "\n" for row in rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([_csv_cell(_cell(v)) for v in row] for row in rows)
        return out.getvalue()
    if fmt == "html":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
                       + "</tr>\n" for row in rows)
        return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>\n"
                f"<h1>{html.escape(title)}</h1>\n<table border=1 cellpadding=4>\n"
                f"<tr>{head}</tr>\n{body}</table>\n")
    # A terminal: texts from mail (senders, file names) shown escaped, one line each.
    cells = [[printable(_cell(v)) for v in row] for row in rows]
    widths = [min(60, max([len(c)] + [len(r[i]) for r in cells])) for i, c in enumerate(columns)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in cells:
        lines.append("  ".join(v[:w].ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n"
