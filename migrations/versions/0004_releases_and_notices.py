"""releases from quarantine (hold queue) and notifications

``releases``: one row per release of a message quarantined from the Postfix hold queue
(who asked, when, the envelope it was re-injected with, the ticket its copy carries, and
which message fulfilled it).  ``notices``: every notification sent or held back.  Views
``v_releases`` and ``v_notices`` (docs/sql.md).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def _utc(dialect: str, col: str) -> str:
    """ISO 8601 UTC text, as the views of 0003 write it."""
    if dialect == 'sqlite':
        return f"strftime('%Y-%m-%dT%H:%M:%S+00:00', {col})"
    return f"""to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')"""


def upgrade() -> None:
    op.create_table(
        'releases',
        sa.Column('id', BigId, nullable=False),
        sa.Column('message_id', BigId, nullable=False),
        sa.Column('token', sa.String(length=64), nullable=False),
        sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('requested_by', sa.Text(), nullable=False),
        sa.Column('sender', sa.Text(), nullable=True),
        sa.Column('recipients', sa.Text(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('consumed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('consumed_by', BigId, nullable=True),
        sa.ForeignKeyConstraint(['message_id'], ['messages.id'],
                                name=op.f('fk_releases_message_id_messages'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['consumed_by'], ['messages.id'],
                                name=op.f('fk_releases_consumed_by_messages'),
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_releases')),
        sa.UniqueConstraint('message_id', name=op.f('uq_releases_message_id')),
        sa.UniqueConstraint('token', name=op.f('uq_releases_token')),
    )
    op.create_table(
        'notices',
        sa.Column('id', BigId, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('event', sa.String(length=16), nullable=False),
        sa.Column('message_id', BigId, nullable=True),
        sa.Column('recipient', sa.Text(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('subject', sa.Text(), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['message_id'], ['messages.id'],
                                name=op.f('fk_notices_message_id_messages'),
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_notices')),
    )
    op.create_index('ix_notices_created_at', 'notices', ['created_at'], unique=False)
    d = op.get_bind().dialect.name
    op.execute(f"""
CREATE VIEW v_releases AS
SELECT
    r.id                 AS release_id,
    r.message_id         AS message_id,
    m.queue_id           AS queue_id,
    m.signature          AS signature,
    m.subject            AS subject,
    r.requested_at       AS requested_at,
    {_utc(d, 'r.requested_at')} AS requested_utc,
    r.requested_by       AS requested_by,
    r.sender             AS sender,
    r.recipients         AS recipients,
    r.state              AS state,
    r.consumed_at        AS consumed_at,
    {_utc(d, 'r.consumed_at')} AS consumed_utc,
    r.consumed_by        AS released_message_id,
    n.queue_id           AS released_queue_id
FROM releases r
JOIN messages m ON m.id = r.message_id
LEFT JOIN messages n ON n.id = r.consumed_by
""")
    op.execute(f"""
CREATE VIEW v_notices AS
SELECT
    x.id                 AS notice_id,
    x.created_at         AS created_at,
    {_utc(d, 'x.created_at')} AS created_utc,
    x.sent_at            AS sent_at,
    {_utc(d, 'x.sent_at')} AS sent_utc,
    x.event              AS event,
    x.kind               AS kind,
    x.recipient          AS recipient,
    x.status             AS status,
    x.subject            AS subject,
    x.detail             AS detail,
    x.message_id         AS message_id,
    m.queue_id           AS queue_id,
    m.signature          AS signature
FROM notices x
LEFT JOIN messages m ON m.id = x.message_id
""")


def downgrade() -> None:
    op.execute("DROP VIEW v_notices")
    op.execute("DROP VIEW v_releases")
    op.drop_index('ix_notices_created_at', table_name='notices')
    op.drop_table('notices')
    op.drop_table('releases')
