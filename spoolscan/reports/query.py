"""Running a report: the time range, the query, the rows as plain values.

The range is whole seconds in UTC, ``since`` included, ``until`` excluded.  It is bound
to the query as a parameter, and written into ``--format sql`` as a literal
``'YYYY-MM-DD HH:MM:SS+00:00'`` that means the same on both databases: PostgreSQL reads
it as a ``timestamptz`` (the explicit zone, whatever the session's), and SQLite, which
keeps timestamps as text ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC, compares it as text with
the same outcome (``+`` sorts before ``.``, so an instant equal to the literal is neither
before nor after it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import text

from spoolscan.reports.catalog import Report
from spoolscan.store.repo import Store

_PARAM = re.compile(r":(since|until)\b")

Value = str | int | float | None


@dataclass(frozen=True)
class TimeRange:
    """``since`` (included) to ``until`` (excluded), aware UTC, whole seconds."""

    since: datetime
    until: datetime

    def literal(self, which: str) -> str:
        """The SQL literal for ``since`` or ``until`` (see the module docstring)."""
        value: datetime = getattr(self, which)
        return "'" + value.strftime("%Y-%m-%d %H:%M:%S") + "+00:00'"

    def shown(self) -> str:
        """The range as an admin reads it: ``ISO .. ISO`` (UTC)."""
        return f"{iso(self.since)} .. {iso(self.until)}"


def iso(value: datetime) -> str:
    """ISO 8601 with the zone, in UTC, whole seconds: ``2026-12-01T22:10:00+00:00``."""
    return value.astimezone(UTC).replace(microsecond=0).isoformat()


def parse_when(spec: str, now: datetime) -> datetime:
    """A point in time from ``--since`` / ``--until``: a duration before ``now`` (``7d``,
    ``12h``, ``90m``) or an ISO 8601 date or date-time (without a zone: UTC).  Raises
    ValueError."""
    from spoolscan.config import parse_duration

    try:
        return now - timedelta(seconds=parse_duration(spec))
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(spec.strip())
    except ValueError:
        value = datetime.combine(date.fromisoformat(spec.strip()), datetime.min.time())
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def time_range(since: str, until: str | None, now: datetime) -> TimeRange:
    """The range for ``--since`` and ``--until`` (default: now).  Ends are rounded up to
    whole seconds, so that what was recorded until now is included.  ValueError for a
    spec that is neither a duration nor a date, or an empty range."""
    start = _ceil_second(parse_when(since, now))
    if until:
        end = _ceil_second(parse_when(until, now))
    else:  # the second under way included
        end = now.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
    if end <= start:
        raise ValueError(f"the range {iso(start)} .. {iso(end)} is empty")
    return TimeRange(start, end)


def _ceil_second(value: datetime) -> datetime:
    value = value.astimezone(UTC)
    whole = value.replace(microsecond=0)
    return whole if whole == value else whole + timedelta(seconds=1)


@dataclass(frozen=True)
class Result:
    """A report's rows: texts as stored (escaped by ``spoolscan.text``), numbers, None."""

    report: Report
    columns: list[str]
    rows: list[tuple[Value, ...]]
    window: TimeRange


def _plain(value: object) -> Value:
    # PostgreSQL gives sums of BIGINT and round() as Decimal: integers stay integers, a
    # decimal fraction becomes a float (as SQLite gives it).
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= 0:
            return int(value)
        return float(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, datetime):
        return iso(value)
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)


def run_report(store: Store, report: Report, window: TimeRange) -> Result:
    """Run ``report`` over ``window``; the rows exactly as the query gives them."""
    params: dict[str, object]
    if store.engine.dialect.name == "sqlite":
        # The literal's text: what --format sql prints, compared as SQLite compares it.
        params = {k: window.literal(k).strip("'") for k in ("since", "until")}
    else:
        params = {"since": window.since, "until": window.until}
    with store.engine.connect() as conn:
        result = conn.execute(text(report.sql), params)
        columns = list(result.keys())
        rows = [tuple(_plain(v) for v in row) for row in result]
    return Result(report, columns, rows, window)


def sql_text(reports: Sequence[Report], window: TimeRange) -> str:
    """The queries as an admin can paste them into ``sqlite3`` or ``psql``: the time range
    written in, each ending with ``;``."""
    parts = []
    for report in reports:
        body = _PARAM.sub(lambda m: window.literal(m.group(1)), report.sql.strip())
        parts.append(f"-- spoolscan report {report.name}: {report.title}\n"
                     f"-- from {iso(window.since)} (included) to {iso(window.until)} "
                     f"(excluded)\n{body};\n")
    return "\n".join(parts)


def is_number_column(rows: Sequence[tuple[Value, ...]], index: int) -> bool:
    """True when every value of the column is a number or None (and one is a number)."""
    seen = False
    for row in rows:
        value = row[index]
        if isinstance(value, str):
            return False
        if value is not None:
            seen = True
    return seen
