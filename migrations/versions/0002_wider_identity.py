"""identities and queue IDs of any length

Maildir identities are a folder path plus a file name of up to 255 bytes (escaped:
up to four characters per byte), and Postfix accepts queue IDs of up to 255
characters: neither fits the old limits (1024 and 64), and a message that does not
fit must still be recorded.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 23:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# The view of 0001, unchanged (made again after the columns it reads were altered).
V_SCANS = """
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


def upgrade() -> None:
    # v_scans reads messages.queue_id: PostgreSQL will not alter a column a view uses.
    op.execute("DROP VIEW IF EXISTS v_scans")
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.alter_column('identity', existing_type=sa.String(length=1024),
                              type_=sa.Text(), existing_nullable=False)
        batch_op.alter_column('queue_id', existing_type=sa.String(length=64),
                              type_=sa.String(length=255), existing_nullable=True)
        batch_op.alter_column('host', existing_type=sa.String(length=255),
                              type_=sa.Text(), existing_nullable=True)
    op.execute(V_SCANS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_scans")
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.alter_column('host', existing_type=sa.Text(),
                              type_=sa.String(length=255), existing_nullable=True)
        batch_op.alter_column('queue_id', existing_type=sa.String(length=255),
                              type_=sa.String(length=64), existing_nullable=True)
        batch_op.alter_column('identity', existing_type=sa.Text(),
                              type_=sa.String(length=1024), existing_nullable=False)
    op.execute(V_SCANS)
