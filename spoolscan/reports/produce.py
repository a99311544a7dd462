"""Producing a report (or ``all``) in one format: run the queries, render the text."""

from __future__ import annotations

import socket
from datetime import datetime

from spoolscan.reports.catalog import ALL, REPORTS, selected
from spoolscan.reports.query import Result, TimeRange, run_report, sql_text
from spoolscan.reports.render import csv_text, json_text, table_text
from spoolscan.store.repo import Store


def produce(store: Store | None, name: str, fmt: str, window: TimeRange, *,
            jsonl: bool = False, width: int | None = None, now: datetime,
            host: str | None = None) -> str:
    """The text of report ``name`` (or ``all``) in format ``fmt``.  ``store`` may be None
    for ``sql`` (nothing is run).  ``width``: the terminal's, for the table (None: wide).
    CSV and JSON take one report (ValueError for ``all``)."""
    reports = selected(name)
    if fmt == "sql":
        return sql_text(reports, window)
    if store is None:
        raise ValueError("a store is needed to run a report")
    if fmt in ("csv", "json") and len(reports) != 1:
        raise ValueError(f"--format {fmt} takes one report, not {name!r}")
    results = [run_report(store, r, window) for r in reports]
    if fmt == "csv":
        return csv_text(results[0])
    if fmt == "json":
        return json_text(results[0], lines=jsonl)
    if fmt == "html":
        from spoolscan.reports.html import Overview, page

        done = {r.report.name: r for r in results}

        def get(report_name: str) -> Result:
            return done.get(report_name) or run_report(store, REPORTS[report_name], window)

        overview = Overview(get("summary"), get("threats"), get("scanner"))
        title = ("spoolscan report" if name == ALL
                 else f"spoolscan report: {reports[0].title}")
        return page(results, overview, window, host or socket.gethostname(), now, title)
    return "\n".join(table_text(r, width) for r in results)
