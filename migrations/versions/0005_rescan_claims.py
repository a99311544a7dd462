"""rescan claims: rescans split across hosts

``rescan_claims``: one row per (signature fingerprint, content hash) that some host's
rescan needs.  A host claims rows in batches with ``SELECT ... FOR UPDATE SKIP LOCKED``
and holds them for a lease (``holder``, ``lease_until``); a content is scanned by the host
holding its claim, and ``done_at`` says it has been.  A host that dies holding a claim
loses it when the lease expires.  Used on PostgreSQL; SQLite (one host) does not need it.

``scan_claims``: on arrival, the host about to scan a content new to the store under a
fingerprint holds it for a lease; another host getting the same content meanwhile waits
for its verdict instead of scanning it too.

``host_rescans``: which host completed a rescan under which fingerprint (each host rescans
its own mail, so "rescanned" is per host on a shared store).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 02:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'rescan_claims',
        sa.Column('fingerprint', sa.String(length=255), nullable=False),
        sa.Column('content_hash', sa.String(length=64), nullable=False),
        sa.Column('holder', sa.Text(), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('fingerprint', 'content_hash'),
    )
    op.create_index('ix_rescan_claims_created_at', 'rescan_claims', ['created_at'])
    op.create_table(
        'scan_claims',
        sa.Column('fingerprint', sa.String(length=255), nullable=False),
        sa.Column('content_hash', sa.String(length=64), nullable=False),
        sa.Column('holder', sa.Text(), nullable=False),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('fingerprint', 'content_hash'),
    )
    op.create_index('ix_scan_claims_created_at', 'scan_claims', ['created_at'])
    op.create_table(
        'host_rescans',
        sa.Column('fingerprint', sa.String(length=255), nullable=False),
        sa.Column('host', sa.Text(), nullable=False),
        sa.Column('rescanned_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('fingerprint', 'host'),
    )


def downgrade() -> None:
    op.drop_table('host_rescans')
    op.drop_index('ix_scan_claims_created_at', table_name='scan_claims')
    op.drop_table('scan_claims')
    op.drop_index('ix_rescan_claims_created_at', table_name='rescan_claims')
    op.drop_table('rescan_claims')
