"""The canned reports: one SQL query each, over the documented views (``docs/sql.md``).

Every query is one text for SQLite and PostgreSQL: what differs between the two (how a
timestamp is shown, its day, its Unix time) is in the views, made per database by the
migrations.  Rules the queries follow so that both databases give the same rows:

* the time range is ``:since`` / ``:until`` on a stored ``*_at`` column (the indexes
  apply); what is shown is the view's ``*_utc`` text (ISO 8601, UTC), never a stored
  timestamp, whose text differs between the databases;
* no boolean is shown (SQLite says 1, PostgreSQL t): counts and CASE instead;
* every ordering ends with a unique key, so that equal rows come in one order.
"""

from __future__ import annotations

from dataclasses import dataclass

_OUTBOUND_FIRST = """CASE {col} WHEN 'outbound' THEN 0 WHEN 'internal' THEN 1
                  WHEN 'inbound' THEN 2 ELSE 3 END"""


@dataclass(frozen=True)
class Report:
    """A canned report: ``sql`` has the parameters ``:since`` and ``:until``."""

    name: str
    title: str
    sql: str


def _outbound_first(col: str) -> str:
    return _OUTBOUND_FIRST.format(col=col)


SUMMARY = Report("summary", "Messages per day and source, by verdict", """
SELECT day,
       source,
       count(*) AS messages,
       sum(CASE WHEN verdict = 'clean' THEN 1 ELSE 0 END) AS clean,
       sum(CASE WHEN verdict = 'infected' THEN 1 ELSE 0 END) AS infected,
       sum(CASE WHEN verdict = 'unchecked' THEN 1 ELSE 0 END) AS unchecked,
       sum(CASE WHEN verdict = 'error' THEN 1 ELSE 0 END) AS error,
       sum(quarantined) AS quarantined,
       sum(released) AS released,
       coalesce(sum(size), 0) AS bytes
FROM v_messages
WHERE first_seen_at >= :since AND first_seen_at < :until
GROUP BY day, source
ORDER BY day, source""")

THREATS = Report("threats", "Threats: signatures by messages hit", """
SELECT s.signature AS signature,
       count(DISTINCT s.message_id) AS messages,
       count(DISTINCT s.scan_id) AS hits,
       count(DISTINCT s.content_hash) AS contents,
       count(DISTINCT r.recipient) AS recipients,
       count(DISTINCT s.originator) AS senders,
       min(s.scanned_utc) AS first_seen,
       max(s.scanned_utc) AS last_seen
FROM v_scans s
LEFT JOIN v_recipients r ON r.message_id = s.message_id
WHERE s.verdict = 'infected' AND s.scanned_at >= :since AND s.scanned_at < :until
GROUP BY s.signature
ORDER BY messages DESC, hits DESC, signature""")

RECIPIENTS = Report("recipients", "Who receives infected mail (outbound first)", f"""
SELECT r.recipient AS recipient,
       coalesce(r.recipient_domain, '') AS domain,
       coalesce(s.direction, '') AS direction,
       count(DISTINCT s.message_id) AS infected,
       count(DISTINCT s.signature) AS threats,
       count(DISTINCT s.originator) AS senders,
       min(s.scanned_utc) AS first_seen,
       max(s.scanned_utc) AS last_seen
FROM v_scans s
JOIN v_recipients r ON r.message_id = s.message_id
WHERE s.verdict = 'infected' AND s.scanned_at >= :since AND s.scanned_at < :until
GROUP BY r.recipient, coalesce(r.recipient_domain, ''), coalesce(s.direction, '')
ORDER BY {_outbound_first("coalesce(s.direction, '')")},
         infected DESC, recipient, domain""")

SENDERS = Report("senders", "Who sends infected mail (outbound first: a compromised "
                 "account?)", f"""
SELECT coalesce(s.originator, '') AS sender,
       coalesce(s.sender_domain, '') AS domain,
       coalesce(s.direction, '') AS direction,
       count(DISTINCT s.message_id) AS infected,
       count(DISTINCT s.signature) AS threats,
       count(DISTINCT r.recipient) AS recipients,
       min(s.scanned_utc) AS first_seen,
       max(s.scanned_utc) AS last_seen
FROM v_scans s
LEFT JOIN v_recipients r ON r.message_id = s.message_id
WHERE s.verdict = 'infected' AND s.scanned_at >= :since AND s.scanned_at < :until
GROUP BY coalesce(s.originator, ''), coalesce(s.sender_domain, ''), coalesce(s.direction, '')
ORDER BY {_outbound_first("coalesce(s.direction, '')")},
         infected DESC, sender, domain""")

DOMAINS = Report("domains", "Domains sending and receiving infected mail (outbound "
                 "first)", f"""
SELECT d.role AS role,
       d.domain AS domain,
       d.direction AS direction,
       count(DISTINCT d.message_id) AS infected,
       count(DISTINCT d.signature) AS threats,
       min(d.scanned_utc) AS first_seen,
       max(d.scanned_utc) AS last_seen
FROM (SELECT 'sender' AS role, s.sender_domain AS domain,
             coalesce(s.direction, '') AS direction,
             s.message_id AS message_id, s.signature AS signature,
             s.scanned_utc AS scanned_utc
      FROM v_scans s
      WHERE s.verdict = 'infected' AND s.scanned_at >= :since AND s.scanned_at < :until
      UNION ALL
      SELECT 'recipient', r.recipient_domain, coalesce(s.direction, ''),
             s.message_id, s.signature, s.scanned_utc
      FROM v_scans s
      JOIN v_recipients r ON r.message_id = s.message_id
      WHERE s.verdict = 'infected' AND s.scanned_at >= :since AND s.scanned_at < :until
     ) d
WHERE d.domain IS NOT NULL
GROUP BY d.role, d.domain, d.direction
ORDER BY {_outbound_first("d.direction")},
         infected DESC, role DESC, domain""")

RETROACTIVE = Report("retroactive", "Mail found infected by a rescan after it was "
                     "delivered clean", """
SELECT s.scanned_utc AS detected_at,
       coalesce(m.arrived_utc, m.first_seen_utc) AS delivered_at,
       s.scanned_epoch - coalesce(m.arrived_epoch, m.first_seen_epoch) AS sat_seconds,
       s.source AS source,
       coalesce(s.original_path, s.location) AS location,
       s.originator AS sender,
       s.subject AS subject,
       s.signature AS signature,
       s.fingerprint AS fingerprint,
       s.action AS action,
       s.action_outcome AS outcome,
       s.quarantine_path AS moved_to
FROM v_scans s
JOIN v_messages m ON m.id = s.message_id
WHERE s.retroactive = true AND s.scanned_at >= :since AND s.scanned_at < :until
ORDER BY s.scanned_at DESC, s.scan_id DESC""")

STUCK = Report("stuck", "Mail kept where it is: retrying, stuck (needs an admin), held by "
               "policy", """
SELECT m.updated_utc AS updated_at,
       m.source AS source,
       m.location AS location,
       m.queue_id AS queue_id,
       m.state AS state,
       m.attempts AS attempts,
       m.verdict AS verdict,
       m.next_attempt_utc AS next_attempt,
       m.last_error AS last_error,
       m.originator AS sender,
       m.subject AS subject
FROM v_messages m
WHERE (m.state IN ('retry', 'stuck') OR (m.state = 'done' AND m.last_action = 'hold'))
  AND m.updated_at >= :since AND m.updated_at < :until
ORDER BY CASE m.state WHEN 'stuck' THEN 0 WHEN 'retry' THEN 1 ELSE 2 END,
         m.updated_at, m.id""")

# Percentiles by nearest rank (the value at position ceil(p * n) of the sorted
# latencies), with row_number: SQLite has no percentile_cont.  Errors (no answer from
# clamd) count in the error rate, not in the latencies; cached verdicts asked nothing.
SCANNER = Report("scanner", "clamd: latency percentiles, errors, signature fingerprints "
                 "per day", """
WITH timed AS (
    SELECT day, fingerprint, duration_ms,
           CASE WHEN verdict = 'error' THEN 0 ELSE 1 END AS answered,
           row_number() OVER (PARTITION BY day, CASE WHEN verdict = 'error' THEN 0 ELSE 1 END
                              ORDER BY duration_ms, scan_id) AS pos,
           count(*) OVER (PARTITION BY day, CASE WHEN verdict = 'error' THEN 0 ELSE 1 END) AS n
    FROM v_scans
    WHERE cached = false AND scanned_at >= :since AND scanned_at < :until
),
days AS (
    SELECT day,
           count(*) AS scans,
           sum(1 - answered) AS errors,
           max(CASE WHEN answered = 1 AND pos = (50 * n + 99) / 100 THEN duration_ms END)
               AS p50_ms,
           max(CASE WHEN answered = 1 AND pos = (90 * n + 99) / 100 THEN duration_ms END)
               AS p90_ms,
           max(CASE WHEN answered = 1 AND pos = (99 * n + 99) / 100 THEN duration_ms END)
               AS p99_ms,
           max(CASE WHEN answered = 1 THEN duration_ms END) AS max_ms,
           count(DISTINCT fingerprint) AS fingerprints
    FROM timed
    GROUP BY day
)
SELECT d.day AS day,
       d.scans AS scans,
       d.errors AS errors,
       round(100.0 * d.errors / d.scans, 1) AS error_pct,
       d.p50_ms AS p50_ms,
       d.p90_ms AS p90_ms,
       d.p99_ms AS p99_ms,
       d.max_ms AS max_ms,
       d.fingerprints AS fingerprints,
       (SELECT count(*) FROM v_fingerprints f WHERE f.first_seen_day = d.day)
           AS new_fingerprints,
       (SELECT f.fingerprint FROM v_fingerprints f
        WHERE f.fingerprint IN (SELECT t.fingerprint FROM timed t WHERE t.day = d.day)
        ORDER BY f.first_seen_at DESC, f.fingerprint LIMIT 1) AS newest_fingerprint,
       (SELECT f.first_seen_utc FROM v_fingerprints f
        WHERE f.fingerprint IN (SELECT t.fingerprint FROM timed t WHERE t.day = d.day)
        ORDER BY f.first_seen_at DESC, f.fingerprint LIMIT 1) AS newest_first_seen
FROM days d
ORDER BY d.day""")

INFECTED = Report("infected", "Detections, newest first", """
SELECT s.scanned_utc AS scanned_at,
       s.source AS source,
       s.location AS location,
       s.originator AS sender,
       s.recipients AS recipients,
       s.subject AS subject,
       s.signature AS signature,
       s."trigger" AS "trigger",
       s.action AS action,
       s.action_outcome AS outcome
FROM v_scans s
WHERE s.verdict = 'infected' AND s.scanned_at >= :since AND s.scanned_at < :until
ORDER BY s.scanned_at DESC, s.scan_id DESC""")

REPORTS: dict[str, Report] = {r.name: r for r in (
    SUMMARY, THREATS, RECIPIENTS, SENDERS, DOMAINS, RETROACTIVE, STUCK, SCANNER, INFECTED)}

#: Names of earlier versions, kept working.
ALIASES: dict[str, str] = {"signatures": "threats", "outbound": "senders"}

#: ``report all``: every report, in this order.
ALL = "all"


def resolve(name: str) -> Report:
    """The report called ``name`` (or an alias of it); KeyError if there is none."""
    return REPORTS[ALIASES.get(name, name)]


#: The output formats of ``spoolscan report``.
FORMATS = ("table", "csv", "json", "html", "sql")


def selected(name: str) -> list[Report]:
    """The reports ``name`` stands for: one (or its alias), or every one for ``all``."""
    return list(REPORTS.values()) if name == ALL else [resolve(name)]
