"""The SQL schema.  It is a public interface: admins query it, reports are written on it.

Tables (migrated only by Alembic, see ``migrations/``):

``messages``      one row per message spoolscan has seen, keyed by (source, identity).
                  ``state`` follows the lifecycle seen → scanning → verdict → acting → done,
                  plus ``stuck`` (gave up after max_attempts, still held/left) and ``gone``
                  (vanished before we finished).
``scans``         one row per scan (or cache reuse) of a message: verdict, signature,
                  signature fingerprint, trigger (arrival | rescan | manual), cached.
``actions``       what was done to a message because of a scan: release, quarantine,
                  delete, hold, leave, restore; with its outcome.
``fingerprints``  every signature fingerprint seen, with when it was first and last seen.
``message_recipients``  one row per recipient of a message: envelope recipients of held
                  mail, the mailbox of delivered mail; with the domain, for reports.

The views (``v_messages``, ``v_scans``, ``v_recipients``, ``v_actions``,
``v_fingerprints``: see ``docs/sql.md``, created by the migrations) are what the reports
read.

Plain SQLAlchemy Core tables: spoolscan writes and reads rows in batches, never objects,
and the ORM's import alone cost every command ~0.15 s and ~6 MB.  ``tests/test_store.py``
checks that these definitions are exactly what the migrations create.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Named constraints, so that Alembic's batch mode on SQLite can alter them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Integer primary keys that are BIGINT on PostgreSQL but stay INTEGER on SQLite, where only
# "INTEGER PRIMARY KEY" is the autoincrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _when(name: str, required: bool = False) -> Column:
    return Column(name, DateTime(timezone=True), nullable=not required)


def _id() -> Column:
    return Column("id", BigId, primary_key=True, autoincrement=True)


def _refers(name: str, target: str, ondelete: str, required: bool = False,
            **kw: Any) -> Column:
    return Column(name, ForeignKey(target, ondelete=ondelete), nullable=not required, **kw)


# Columns are NOT NULL only where stated (required=True / nullable=False).

messages = Table(
    "messages", metadata,
    _id(),
    Column("source", String(64), nullable=False),  # configured source name, or "cli"
    Column("kind", String(16), nullable=False),  # postfix-hold | maildir | file
    # Stable identity within the source.  Hold queue: host/queue_id/arrival_usec/inode
    # (short queue IDs are reused).  Maildir: mailbox root + unique part of the file name.
    Column("identity", Text, nullable=False),
    Column("location", Text, nullable=False),  # queue ID or current path
    Column("queue_id", String(255)),
    Column("host", Text),
    Column("sender", Text),
    Column("recipients", Text),  # comma-separated
    Column("nrcpt", Integer),
    Column("direction", String(16)),  # inbound | outbound | internal
    Column("size", BigInteger),
    Column("content_hash", String(64)),
    _when("arrived_at"),
    _when("first_seen_at", required=True),
    _when("updated_at", required=True),
    Column("state", String(16), nullable=False, default="seen"),
    Column("verdict", String(16)),  # latest verdict
    Column("signature", Text),  # latest signature
    Column("attempts", Integer, nullable=False, default=0),
    _when("next_attempt_at"),
    Column("last_error", Text),
    # From the content (first 64 KiB): decoded, unfolded, at most 1000 characters.
    Column("subject", Text),
    Column("message_id", Text),  # the Message-ID header
    Column("header_from", Text),
    # From the envelope of held mail (smtpd's client_address and helo_name attributes).
    Column("client_address", Text),
    Column("helo", Text),
    # Domain of the envelope sender, else of the From header's address (lower case).
    Column("sender_domain", Text),
    UniqueConstraint("source", "identity", name="uq_messages_source_identity"),
    Index("ix_messages_content_hash", "content_hash"),
    Index("ix_messages_state_next_attempt", "state", "next_attempt_at"),
    Index("ix_messages_first_seen_at", "first_seen_at"),
)

scans = Table(
    "scans", metadata,
    _id(),
    _refers("message_id", "messages.id", "CASCADE", required=True),
    _when("scanned_at", required=True),
    Column("verdict", String(16), nullable=False),
    Column("signature", Text),
    Column("detail", Text),
    Column("fingerprint", String(255)),
    Column("content_hash", String(64)),
    Column("size", BigInteger),
    Column("duration_ms", Integer, nullable=False, default=0),
    Column("trigger", String(16), nullable=False),  # arrival | rescan | manual
    Column("cached", Boolean, nullable=False, default=False),
    # For rescans: the verdict the message had before; "clean" → infected = retroactive.
    Column("previous_verdict", String(16)),
    Column("retroactive", Boolean, nullable=False, default=False),
    # The verdict cache: same content under the same signatures.
    Index("ix_scans_content_hash_fingerprint", "content_hash", "fingerprint"),
    Index("ix_scans_scanned_at", "scanned_at"),
    Index("ix_scans_message_id", "message_id"),
)

actions = Table(
    "actions", metadata,
    _id(),
    _refers("message_id", "messages.id", "CASCADE", required=True),
    _refers("scan_id", "scans.id", "SET NULL"),
    # release | quarantine | delete | hold | leave | restore
    Column("action", String(16), nullable=False),
    _when("requested_at", required=True),
    _when("completed_at"),
    # pending | ok | failed | gone
    Column("outcome", String(16), nullable=False, default="pending"),
    Column("detail", Text),
    # Where a quarantined message now is (path), so that release can undo the move.
    Column("quarantine_path", Text),
    Column("original_path", Text),
    Index("ix_actions_scan_id", "scan_id"),
    Index("ix_actions_message_id", "message_id"),
)

fingerprints = Table(
    "fingerprints", metadata,
    Column("fingerprint", String(255), primary_key=True),
    _when("first_seen_at", required=True),
    _when("last_seen_at", required=True),
    # When a rescan of the rescan window under this fingerprint last completed.
    _when("rescanned_at"),
)

# Who a message is for: each envelope recipient of held mail (in envelope order), or the
# mailbox (its root directory) a delivered message rests in.
message_recipients = Table(
    "message_recipients", metadata,
    _refers("message_id", "messages.id", "CASCADE", required=True, primary_key=True,
            autoincrement=False),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("address", Text, nullable=False),
    Column("domain", Text),  # lower case; None for a mailbox
    Index("ix_message_recipients_domain", "domain"),
)

# An admin's release of a message quarantined from the Postfix hold queue: the copy is
# re-injected with a header carrying ``token``; the worker releases the held copy that
# carries it (once, whatever its verdict) and records which message that was.
releases = Table(
    "releases", metadata,
    _id(),
    # One release per quarantined message: a second one is refused.
    _refers("message_id", "messages.id", "CASCADE", required=True, unique=True),
    Column("token", String(64), nullable=False, unique=True),
    _when("requested_at", required=True),
    Column("requested_by", Text, nullable=False),  # the admin's login name
    Column("sender", Text),
    Column("recipients", Text, nullable=False),  # JSON array of the envelope recipients
    Column("state", String(16), nullable=False, default="pending"),  # pending | consumed
    _when("consumed_at"),
    # The re-injected message (a new row in messages) that was released.
    _refers("consumed_by", "messages.id", "SET NULL"),
)

# A notification spoolscan sent (or held back by the rate limit) about a message.
notices = Table(
    "notices", metadata,
    _id(),
    _when("created_at", required=True),
    _when("sent_at"),
    # infected | retroactive | stuck | outbound | digest
    Column("event", String(16), nullable=False),
    _refers("message_id", "messages.id", "SET NULL"),
    Column("recipient", Text, nullable=False),  # who is told
    Column("kind", String(16), nullable=False),  # admin | recipient
    Column("subject", Text),
    # queued (waits for the next digest or send) | sent | failed | limited (over the
    # hourly limit: counted in the next digest)
    Column("status", String(16), nullable=False),
    Column("detail", Text),
    Index("ix_notices_created_at", "created_at"),
)

# A content some host's rescan under ``fingerprint`` needs: claimed by one host at a time
# for a lease (``FOR UPDATE SKIP LOCKED``), done once it has been scanned.
rescan_claims = Table(
    "rescan_claims", metadata,
    Column("fingerprint", String(255), primary_key=True),
    Column("content_hash", String(64), primary_key=True),
    Column("holder", Text),  # host:pid of the claiming rescan
    _when("lease_until"),
    _when("done_at"),
    _when("created_at", required=True),
    Index("ix_rescan_claims_created_at", "created_at"),
)

# A host completed a rescan of its own mail under ``fingerprint`` (shared stores).
host_rescans = Table(
    "host_rescans", metadata,
    Column("fingerprint", String(255), primary_key=True),
    Column("host", Text, primary_key=True),
    _when("rescanned_at", required=True),
)

# A host is scanning a content new to the store under ``fingerprint`` (arrivals on a
# shared store): others wait for its verdict until ``lease_until``.
scan_claims = Table(
    "scan_claims", metadata,
    Column("fingerprint", String(255), primary_key=True),
    Column("content_hash", String(64), primary_key=True),
    Column("holder", Text, nullable=False),
    _when("lease_until"),
    _when("created_at", required=True),
    Index("ix_scan_claims_created_at", "created_at"),
)
