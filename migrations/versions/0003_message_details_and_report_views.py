"""message details (subject, Message-ID, From, SMTP client), recipients, report views

Columns on ``messages`` for what reports show of a message: ``subject``, ``message_id``
(the Message-ID header), ``header_from``, ``client_address`` and ``helo`` (held mail),
``sender_domain``; a table ``message_recipients`` (one row per recipient, with its
domain), so that reports can count recipients and domains with the same SQL on SQLite
and PostgreSQL (neither can split a list the same way); and the views reports read:
``v_messages``, ``v_scans`` (extended: its old columns first, unchanged),
``v_recipients``, ``v_actions``, ``v_fingerprints``.  Documented in docs/sql.md.

Every timestamp column ``X_at`` of a view keeps the stored value (compare with it: the
indexes apply), and comes with ``X_utc``: ISO 8601 text ``YYYY-MM-DDTHH:MM:SS+00:00``
(sorts like the time), and where reports need it ``X_epoch`` (Unix seconds, to
subtract) and ``day`` (``YYYY-MM-DD``, UTC).  Those are the only dialect-specific
expressions: they live here, so that reports are one SQL text for both databases.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

NEW_COLUMNS = ("subject", "message_id", "header_from", "client_address", "helo",
               "sender_domain")


class _Time:
    """The dialect's expressions for a stored UTC timestamp ``col``."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"

    def iso(self, col: str) -> str:
        # SQLite keeps UTC as naive text; PostgreSQL converts to the session's zone
        # unless told: AT TIME ZONE 'UTC' gives the UTC wall time either way.
        if self.sqlite:
            return f"strftime('%Y-%m-%dT%H:%M:%S+00:00', {col})"
        return f"""to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')"""

    def day(self, col: str) -> str:
        if self.sqlite:
            return f"strftime('%Y-%m-%d', {col})"
        return f"to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def epoch(self, col: str) -> str:
        if self.sqlite:
            return f"CAST(strftime('%s', {col}) AS INTEGER)"
        return f"CAST(floor(extract(epoch FROM {col})) AS BIGINT)"


def v_messages(t: _Time) -> str:
    return f"""
CREATE VIEW v_messages AS
SELECT
    m.id                AS id,
    m.source            AS source,
    m.kind              AS kind,
    m.identity          AS identity,
    m.location          AS location,
    m.queue_id          AS queue_id,
    m.host              AS host,
    m.sender            AS sender,
    m.sender_domain     AS sender_domain,
    m.header_from       AS header_from,
    coalesce(m.sender, m.header_from) AS originator,
    m.recipients        AS recipients,
    m.nrcpt             AS nrcpt,
    m.direction         AS direction,
    m.subject           AS subject,
    m.message_id        AS message_id,
    m.client_address    AS client_address,
    m.helo              AS helo,
    m.size              AS size,
    m.content_hash      AS content_hash,
    m.state             AS state,
    m.verdict           AS verdict,
    m.signature         AS signature,
    m.attempts          AS attempts,
    m.last_error        AS last_error,
    m.arrived_at        AS arrived_at,
    {t.iso('m.arrived_at')} AS arrived_utc,
    {t.epoch('m.arrived_at')} AS arrived_epoch,
    m.first_seen_at     AS first_seen_at,
    {t.iso('m.first_seen_at')} AS first_seen_utc,
    {t.epoch('m.first_seen_at')} AS first_seen_epoch,
    {t.day('m.first_seen_at')} AS day,
    m.updated_at        AS updated_at,
    {t.iso('m.updated_at')} AS updated_utc,
    m.next_attempt_at   AS next_attempt_at,
    {t.iso('m.next_attempt_at')} AS next_attempt_utc,
    la.action           AS last_action,
    la.outcome          AS last_outcome,
    {t.iso('coalesce(la.completed_at, la.requested_at)')} AS last_action_utc,
    CASE WHEN EXISTS (SELECT 1 FROM actions q WHERE q.message_id = m.id
                      AND q.action = 'quarantine' AND q.outcome = 'ok')
         THEN 1 ELSE 0 END AS quarantined,
    CASE WHEN EXISTS (SELECT 1 FROM actions r WHERE r.message_id = m.id
                      AND r.action IN ('release', 'restore') AND r.outcome = 'ok')
         THEN 1 ELSE 0 END AS released
FROM messages m
LEFT JOIN actions la ON la.id = (SELECT max(a2.id) FROM actions a2 WHERE a2.message_id = m.id)
"""


def v_scans(t: _Time) -> str:
    # The columns of 0001's v_scans first, in the same order: queries written for it
    # keep working.
    return f"""
CREATE VIEW v_scans AS
SELECT
    s.id               AS scan_id,
    s.message_id       AS message_id,
    s.scanned_at       AS scanned_at,
    m.source           AS source,
    m.kind             AS kind,
    m.location         AS location,
    m.queue_id         AS queue_id,
    m.sender           AS sender,
    m.recipients       AS recipients,
    m.nrcpt            AS nrcpt,
    m.direction        AS direction,
    m.size             AS size,
    s.content_hash     AS content_hash,
    s.verdict          AS verdict,
    s.signature        AS signature,
    s.detail           AS detail,
    s.fingerprint      AS fingerprint,
    s."trigger"        AS "trigger",
    s.cached           AS cached,
    s.duration_ms      AS duration_ms,
    s.previous_verdict AS previous_verdict,
    s.retroactive      AS retroactive,
    m.arrived_at       AS arrived_at,
    m.state            AS state,
    a.action           AS action,
    a.outcome          AS action_outcome,
    a.completed_at     AS action_at,
    m.subject          AS subject,
    m.header_from      AS header_from,
    m.message_id       AS header_message_id,
    coalesce(m.sender, m.header_from) AS originator,
    m.sender_domain    AS sender_domain,
    m.client_address   AS client_address,
    m.helo             AS helo,
    m.first_seen_at    AS first_seen_at,
    a.quarantine_path  AS quarantine_path,
    a.original_path    AS original_path,
    {t.day('s.scanned_at')} AS day,
    {t.iso('s.scanned_at')} AS scanned_utc,
    {t.epoch('s.scanned_at')} AS scanned_epoch,
    {t.iso('a.completed_at')} AS action_utc
FROM scans s
JOIN messages m ON m.id = s.message_id
LEFT JOIN actions a ON a.id = (SELECT max(a2.id) FROM actions a2 WHERE a2.scan_id = s.id)
"""


def v_recipients(t: _Time) -> str:
    return """
CREATE VIEW v_recipients AS
SELECT
    r.message_id       AS message_id,
    r.position         AS position,
    r.address          AS recipient,
    r.domain           AS recipient_domain,
    m.source           AS source,
    m.kind             AS kind
FROM message_recipients r
JOIN messages m ON m.id = r.message_id
"""


def v_actions(t: _Time) -> str:
    return f"""
CREATE VIEW v_actions AS
SELECT
    a.id               AS action_id,
    a.message_id       AS message_id,
    a.scan_id          AS scan_id,
    m.source           AS source,
    m.kind             AS kind,
    m.queue_id         AS queue_id,
    m.location         AS location,
    a.action           AS action,
    a.outcome          AS outcome,
    a.detail           AS detail,
    a.quarantine_path  AS quarantine_path,
    a.original_path    AS original_path,
    a.requested_at     AS requested_at,
    {t.iso('a.requested_at')} AS requested_utc,
    a.completed_at     AS completed_at,
    {t.iso('a.completed_at')} AS completed_utc,
    {t.day('a.requested_at')} AS day
FROM actions a
JOIN messages m ON m.id = a.message_id
"""


def v_fingerprints(t: _Time) -> str:
    return f"""
CREATE VIEW v_fingerprints AS
SELECT
    f.fingerprint      AS fingerprint,
    f.first_seen_at    AS first_seen_at,
    {t.iso('f.first_seen_at')} AS first_seen_utc,
    {t.day('f.first_seen_at')} AS first_seen_day,
    f.last_seen_at     AS last_seen_at,
    {t.iso('f.last_seen_at')} AS last_seen_utc,
    f.rescanned_at     AS rescanned_at,
    {t.iso('f.rescanned_at')} AS rescanned_utc
FROM fingerprints f
"""


VIEWS = (("v_messages", v_messages), ("v_scans", v_scans), ("v_recipients", v_recipients),
         ("v_actions", v_actions), ("v_fingerprints", v_fingerprints))

# 0002's v_scans, for the downgrade.
V_SCANS_0002 = """
CREATE VIEW v_scans AS
SELECT
    s.id               AS scan_id,
    s.message_id       AS message_id,
    s.scanned_at       AS scanned_at,
    m.source           AS source,
    m.kind             AS kind,
    m.location         AS location,
    m.queue_id         AS queue_id,
    m.sender           AS sender,
    m.recipients       AS recipients,
    m.nrcpt            AS nrcpt,
    m.direction        AS direction,
    m.size             AS size,
    s.content_hash     AS content_hash,
    s.verdict          AS verdict,
    s.signature        AS signature,
    s.detail           AS detail,
    s.fingerprint      AS fingerprint,
    s."trigger"        AS "trigger",
    s.cached           AS cached,
    s.duration_ms      AS duration_ms,
    s.previous_verdict AS previous_verdict,
    s.retroactive      AS retroactive,
    m.arrived_at       AS arrived_at,
    m.state            AS state,
    a.action           AS action,
    a.outcome          AS action_outcome,
    a.completed_at     AS action_at
FROM scans s
JOIN messages m ON m.id = s.message_id
LEFT JOIN actions a ON a.id = (SELECT max(a2.id) FROM actions a2 WHERE a2.scan_id = s.id)
"""


def _domain(address):
    # As spoolscan.addresses.domain_of (kept here: a migration must not change when the
    # code does).  Stored texts are escaped; the escapes are lower-case already.
    if not address or "@" not in address:
        return None
    return address.rpartition("@")[2].strip().lower().rstrip(".") or None


def _backfill(conn) -> None:
    """Recipients and sender domains of messages recorded before this revision: the
    envelope recipients were kept comma-separated in ``messages.recipients`` (an address
    with ", " in it cannot be told apart there; such addresses are rare)."""
    messages = sa.table("messages", sa.column("id"), sa.column("sender"),
                        sa.column("recipients"), sa.column("sender_domain"))
    recipients = sa.table("message_recipients", sa.column("message_id"),
                          sa.column("position"), sa.column("address"), sa.column("domain"))
    last = 0
    while True:
        rows = conn.execute(sa.select(messages.c.id, messages.c.sender, messages.c.recipients)
                            .where(messages.c.id > last).order_by(messages.c.id)
                            .limit(5000)).all()
        if not rows:
            return
        last = rows[-1].id
        rcpts = [{"message_id": r.id, "position": i, "address": a, "domain": _domain(a)}
                 for r in rows if r.recipients
                 for i, a in enumerate(r.recipients.split(", "))]
        if rcpts:
            conn.execute(recipients.insert(), rcpts)
        domains = [{"b_id": r.id, "b_domain": _domain(r.sender)} for r in rows
                   if _domain(r.sender)]
        if domains:
            conn.execute(messages.update().where(messages.c.id == sa.bindparam("b_id"))
                         .values(sender_domain=sa.bindparam("b_domain")), domains)


def upgrade() -> None:
    # PostgreSQL will not change a table under a view that reads it; SQLite's batch mode
    # may copy the table.  The views are made again at the end.
    op.execute("DROP VIEW IF EXISTS v_scans")
    with op.batch_alter_table('messages', schema=None) as batch_op:
        for name in NEW_COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Text(), nullable=True))
    op.create_table(
        'message_recipients',
        sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('address', sa.Text(), nullable=False),
        sa.Column('domain', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['message_id'], ['messages.id'],
                                name=op.f('fk_message_recipients_message_id_messages'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('message_id', 'position', name=op.f('pk_message_recipients')),
    )
    with op.batch_alter_table('message_recipients', schema=None) as batch_op:
        batch_op.create_index('ix_message_recipients_domain', ['domain'], unique=False)
    _backfill(op.get_bind())
    t = _Time(op.get_bind().dialect.name)
    for _, make in VIEWS:
        op.execute(make(t))


def downgrade() -> None:
    for name, _ in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table('message_recipients', schema=None) as batch_op:
        batch_op.drop_index('ix_message_recipients_domain')
    op.drop_table('message_recipients')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        for name in reversed(NEW_COLUMNS):
            batch_op.drop_column(name)
    op.execute(V_SCANS_0002)
