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
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so that Alembic's batch mode on SQLite can alter them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# Integer primary keys that are BIGINT on PostgreSQL but stay INTEGER on SQLite, where only
# "INTEGER PRIMARY KEY" is the autoincrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("source", "identity", name="uq_messages_source_identity"),
        Index("ix_messages_content_hash", "content_hash"),
        Index("ix_messages_state_next_attempt", "state", "next_attempt_at"),
        Index("ix_messages_first_seen_at", "first_seen_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))  # configured source name, or "cli"
    kind: Mapped[str] = mapped_column(String(16))  # postfix-hold | maildir | file
    # Stable identity within the source.  Hold queue: host/queue_id/arrival_usec/inode
    # (short queue IDs are reused).  Maildir: mailbox root + unique part of the file name.
    identity: Mapped[str] = mapped_column(Text)
    location: Mapped[str] = mapped_column(Text)  # queue ID or current path
    queue_id: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(Text)
    sender: Mapped[str | None] = mapped_column(Text)
    recipients: Mapped[str | None] = mapped_column(Text)  # comma-separated
    nrcpt: Mapped[int | None] = mapped_column(Integer)
    direction: Mapped[str | None] = mapped_column(String(16))  # inbound|outbound|internal
    size: Mapped[int | None] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    arrived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16), default="seen")
    verdict: Mapped[str | None] = mapped_column(String(16))  # latest verdict
    signature: Mapped[str | None] = mapped_column(Text)  # latest signature
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # From the content (first 64 KiB): decoded, unfolded, at most 1000 characters.
    subject: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(Text)  # the Message-ID header
    header_from: Mapped[str | None] = mapped_column(Text)
    # From the envelope of held mail (smtpd's client_address and helo_name attributes).
    client_address: Mapped[str | None] = mapped_column(Text)
    helo: Mapped[str | None] = mapped_column(Text)
    # Domain of the envelope sender, else of the From header's address (lower case).
    sender_domain: Mapped[str | None] = mapped_column(Text)


class Scan(Base):
    __tablename__ = "scans"
    __table_args__ = (
        # The verdict cache: same content under the same signatures.
        Index("ix_scans_content_hash_fingerprint", "content_hash", "fingerprint"),
        Index("ix_scans_scanned_at", "scanned_at"),
        Index("ix_scans_message_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    scanned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    verdict: Mapped[str] = mapped_column(String(16))
    signature: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(String(255))
    content_hash: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    trigger: Mapped[str] = mapped_column(String(16))  # arrival | rescan | manual
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    # For rescans: the verdict the message had before; "clean" → infected = retroactive.
    previous_verdict: Mapped[str | None] = mapped_column(String(16))
    retroactive: Mapped[bool] = mapped_column(Boolean, default=False)


class Action(Base):
    __tablename__ = "actions"
    __table_args__ = (
        Index("ix_actions_scan_id", "scan_id"),
        Index("ix_actions_message_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    scan_id: Mapped[int | None] = mapped_column(ForeignKey("scans.id", ondelete="SET NULL"))
    action: Mapped[str] = mapped_column(String(16))  # release|quarantine|delete|hold|leave|restore
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16), default="pending")  # pending|ok|failed|gone
    detail: Mapped[str | None] = mapped_column(Text)
    # Where a quarantined message now is (path), so that release can undo the move.
    quarantine_path: Mapped[str | None] = mapped_column(Text)
    original_path: Mapped[str | None] = mapped_column(Text)


class Fingerprint(Base):
    __tablename__ = "fingerprints"

    fingerprint: Mapped[str] = mapped_column(String(255), primary_key=True)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When a rescan of the rescan window under this fingerprint last completed.
    rescanned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MessageRecipient(Base):
    """Who a message is for: each envelope recipient of held mail (in envelope order), or
    the mailbox (its root directory) a delivered message rests in."""

    __tablename__ = "message_recipients"
    __table_args__ = (Index("ix_message_recipients_domain", "domain"),)

    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"),
                                            primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    address: Mapped[str] = mapped_column(Text)
    domain: Mapped[str | None] = mapped_column(Text)  # lower case; None for a mailbox


class Release(Base):
    """An admin's release of a message quarantined from the Postfix hold queue: the copy
    is re-injected with a header carrying ``token``; the worker releases the held copy
    that carries it (once, whatever its verdict) and records which message that was."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # One release per quarantined message: a second one is refused.
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"),
                                            unique=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    requested_by: Mapped[str] = mapped_column(Text)  # the admin's login name
    sender: Mapped[str | None] = mapped_column(Text)
    recipients: Mapped[str] = mapped_column(Text)  # JSON array of the envelope recipients
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|consumed
    consumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The re-injected message (a new row in messages) that was released.
    consumed_by: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"))


class Notice(Base):
    """A notification spoolscan sent (or held back by the rate limit) about a message."""

    __tablename__ = "notices"
    __table_args__ = (Index("ix_notices_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    event: Mapped[str] = mapped_column(String(16))  # infected|retroactive|stuck|outbound|digest
    message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"))
    recipient: Mapped[str] = mapped_column(Text)  # who is told
    kind: Mapped[str] = mapped_column(String(16))  # admin | recipient
    subject: Mapped[str | None] = mapped_column(Text)
    # queued (waits for the next digest or send) | sent | failed | limited (over the
    # hourly limit: counted in the next digest)
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class RescanClaim(Base):
    """A content some host's rescan under ``fingerprint`` needs: claimed by one host at a
    time for a lease (``FOR UPDATE SKIP LOCKED``), done once it has been scanned."""

    __tablename__ = "rescan_claims"
    __table_args__ = (Index("ix_rescan_claims_created_at", "created_at"),)

    fingerprint: Mapped[str] = mapped_column(String(255), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(Text)  # host:pid of the claiming rescan
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class HostRescan(Base):
    """A host completed a rescan of its own mail under ``fingerprint`` (shared stores)."""

    __tablename__ = "host_rescans"

    fingerprint: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(Text, primary_key=True)
    rescanned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ScanClaim(Base):
    """A host is scanning a content new to the store under ``fingerprint`` (arrivals on a
    shared store): others wait for its verdict until ``lease_until``."""

    __tablename__ = "scan_claims"
    __table_args__ = (Index("ix_scan_claims_created_at", "created_at"),)

    fingerprint: Mapped[str] = mapped_column(String(255), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
