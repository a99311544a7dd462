"""The vocabulary: what a verdict, a message state and an action are, and the plain data
that flows from the sources through scanning and the policy to the store and back.

Every other module speaks in these names.  The enums are ``StrEnum``: their values are
what the SQL schema stores (``messages.state``, ``scans.verdict``, ``actions.action``...),
so a member compares equal to the string an admin sees in the database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, BinaryIO


class Verdict(StrEnum):
    """What clamd said about a message's content."""

    CLEAN = "clean"  # clamd said OK
    INFECTED = "infected"  # clamd found a signature
    UNCHECKED = "unchecked"  # clamd could not scan it fully (limits, too large)
    ERROR = "error"  # no usable answer (clamd down, timeout, garbage)

    @property
    def definite(self) -> bool:
        """True for an answer that may be cached and acted on as such."""
        return self in (Verdict.CLEAN, Verdict.INFECTED)


class State(StrEnum):
    """Where a message is in its lifecycle (``messages.state``).

    ``seen → verdict → acting → done``, or ``retry`` / ``stuck`` / ``gone``;
    ``released`` once an admin released it from quarantine.
    """

    SEEN = "seen"
    VERDICT = "verdict"  # verdict committed, action not yet taken
    ACTING = "acting"  # verdict committed, action under way (hold queue release)
    DONE = "done"  # finished: released, quarantined, deleted, left in place
    RETRY = "retry"  # unchecked/error/unreadable or a failed action: tried again later
    STUCK = "stuck"  # gave up after max_attempts: kept where it is, needs an admin
    GONE = "gone"  # vanished before spoolscan finished with it
    RELEASED = "released"  # an admin released it from quarantine: never quarantined again
    #                        for the signature it was released from


#: States in which nothing more is done to a message that is where it should be.
FINISHED_STATES = (State.DONE, State.GONE, State.RELEASED)


class Action(StrEnum):
    """What is done to a message (``actions.action``)."""

    RELEASE = "release"  # hold queue: postsuper -H, then ask qmgr to deliver
    QUARANTINE = "quarantine"  # copy into the quarantine store (or folder), then remove
    DELETE = "delete"
    HOLD = "hold"  # hold queue: keep it held
    LEAVE = "leave"  # Maildir: leave it where it is
    RESTORE = "restore"  # an admin released it from quarantine back to where it was

    @property
    def changes_mail(self) -> bool:
        """True if the source must do something to the mail."""
        return self in (Action.RELEASE, Action.QUARANTINE, Action.DELETE)


class ActionOutcome(StrEnum):
    PENDING = "pending"  # the intent, written before acting
    OK = "ok"
    FAILED = "failed"
    GONE = "gone"  # the message was no longer there to act on


class Trigger(StrEnum):
    ARRIVAL = "arrival"
    RESCAN = "rescan"
    MANUAL = "manual"


@dataclass(frozen=True)
class ScanResult:
    """The outcome of scanning one content.

    ``signature`` is the detection name for ``infected`` and for limit-based
    ``unchecked`` results; ``detail`` says in words why a result is ``unchecked`` or
    ``error``.
    """

    verdict: Verdict
    signature: str | None = None
    detail: str | None = None
    fingerprint: str | None = None
    duration_ms: int = 0

    @property
    def is_final(self) -> bool:
        """True when clamd gave a definite answer (clean or infected) that may be cached."""
        return self.verdict.definite


@dataclass(frozen=True)
class MessageInfo:
    """What a source knows about a message, before and after scanning.

    ``subject``, ``message_id`` (the ``Message-ID`` header) and ``header_from`` come from
    the content (read when it is hashed); ``client_address`` and ``helo`` from the
    envelope of held mail; ``mailbox`` is the Maildir a delivered message rests in (its
    recipient, as far as a mailbox knows).  All are None when unknown.
    """

    source: str
    kind: str  # postfix-hold | maildir | file
    identity: str
    location: str
    queue_id: str | None = None
    host: str | None = None
    sender: str | None = None
    recipients: tuple[str, ...] = ()
    direction: str | None = None
    size: int | None = None
    content_hash: str | None = None
    arrived_at: datetime | None = None
    subject: str | None = None
    message_id: str | None = None
    header_from: str | None = None
    client_address: str | None = None
    helo: str | None = None
    mailbox: str | None = None
    release_token: str | None = None  # X-Spoolscan-Release: not stored with the message


class ContentUnavailable(Exception):
    """The message could not be opened or read (vanished, corrupt, refused).

    ``gone``: it is simply no longer there (released, moved, deleted meanwhile).
    """

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass
class Opened:
    """An open message: a binary stream of its content (rewindable when ``seekable()``),
    and the descriptor of the file when the content is the whole file.

    ``shared``: someone else (a mailbox owner) can change the file while it is read, so
    it is scanned from a private copy (hashed, scanned and cached as one content)."""

    stream: BinaryIO
    fd: int | None = None
    size: int | None = None
    shared: bool = False


Opener = Callable[[], contextlib.AbstractContextManager[Opened]]


@dataclass
class Job:
    """One message to scan, as a source describes it.

    ``open`` opens its content; ``payload`` is the source's own data, carried to the
    action step (which file was opened: the action must act on that one).  ``discard``
    gives back what the source keeps open for the job until it is scanned; the pipeline
    calls it once the scan is over or the job is dropped (calling it twice is harmless).
    """

    info: MessageInfo
    open: Opener
    trigger: Trigger = Trigger.ARRIVAL
    payload: Any = None
    # (content hash, size) recorded when the message was first scanned.  Rescans use it
    # instead of reading the content again when the size is unchanged: delivered mail is
    # not modified in place (Maildir, Postfix queue files), so only new signatures
    # matter, and most answers then come from the cache without any I/O.
    known_content: tuple[str, int] | None = None
    # The size of the file as a listing found it just before (rescans): with the known
    # content's size and a verdict in the cache, the file need not even be opened.
    listed_size: int | None = None
    discard: Callable[[], None] | None = None


@dataclass
class Outcome:
    """A scanned job: its info completed with the content hash and size, the result."""

    job: Job
    info: MessageInfo
    result: ScanResult
    cached: bool = False
    unavailable: ContentUnavailable | None = None


@dataclass(frozen=True)
class Prior:
    """What the store knew about a message before this scan."""

    message_id: int
    state: State | None
    verdict: Verdict | None
    signature: str | None
    attempts: int
    # An admin's release from quarantine that this message (re-injected) fulfils.
    release: ReleaseTicket | None = None


@dataclass(frozen=True)
class ReleaseTicket:
    """A release from quarantine of a held message, claimed by its re-injected copy."""

    id: int
    original_id: int  # the quarantined message (messages.id)
    requested_by: str


@dataclass(frozen=True)
class Decision:
    """What the policy decided: the action, and the state it leaves the message in."""

    action: Action
    state: State
    reason: str
    next_attempt_at: datetime | None = None

    @property
    def acts(self) -> bool:
        return self.action.changes_mail


@dataclass
class Pending:
    """A scan whose verdict is committed; the source now acts on the decision.

    ``target``: where a quarantine goes, decided (and recorded as the action's intent)
    before acting, so that a restart can tell whether an interrupted one completed.
    """

    outcome: Outcome
    decision: Decision
    message_id: int
    scan_id: int
    attempts: int  # consecutive failures so far (failed scans, failed actions)
    retroactive: bool = False
    target: str | None = None
