"""What every source shares: sweeping in batches, "does this message need work",
reconciling what vanished, handing jobs over once, and dispatching actions.

A source is where messages rest (the Postfix hold queue, Maildir mailboxes).  A subclass
says how to find its messages and how to act on them, through these hooks (like huey's
storage base class, each documented where it is declared):

* ``start(submit)`` / ``stop()``: watch for arrivals, call ``submit(job)`` for each;
* ``sightings()``: every message present now (for sweeps);
* ``locate(row)``: a stored message, found again where it is now (or None);
* ``job(sighting, trigger)``: the scan job for a message;
* ``release`` / ``quarantine`` / ``delete``: carry out decisions, one record each;
* ``completed(row, intent)``: whether an action interrupted by a crash did happen.

Everything a source does to mail goes through its broker (``spoolscan.broker``), which
works on the safe file layer.  Sources never import the pipeline: jobs go out through
``submit``, committed decisions come back through ``act``.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from inotify_simple import Event, parse_events
from sqlalchemy.exc import InterfaceError, OperationalError

from spoolscan.broker import Broker
from spoolscan.config import Config, SourceConfig
from spoolscan.model import Action, ActionOutcome, Job, Pending, State, Trigger
from spoolscan.quarantine.store import QuarantineStore
from spoolscan.store.repo import ActionRecord, Store, as_utc, utcnow
from spoolscan.text import printable

log = logging.getLogger(__name__)

LOOKUP_BATCH = 500  # messages looked up in the store at once by a sweep
HANDED_WINDOW = 600.0  # seconds a handed-over message counts as under way
# At most this many remembered (oldest forgotten first).  Well above what the pipeline
# holds (a forgotten message still in the pipeline is not queued twice: Worker.submit),
# and bounded: a backlog of 100,000 must not be remembered whole.
HANDED_MAX = 20_000
INTENT_GRACE = 60.0  # seconds a pending action may still be under way in another process
REPORTED_MAX = 10_000  # paths whose warning is not repeated at every sweep

Submit = Callable[[Job], bool]


@dataclass(frozen=True)
class Sighting:
    """A message seen where it rests: its identity and what the source needs to make
    its job (``data``: source-specific)."""

    identity: str
    data: Any


def needs_work(row: dict | None, now: datetime) -> bool:
    """Whether a message present where it rests, with this stored row, needs a job.

    Unknown: yes.  ``done`` and ``released``: no.  ``retry`` and ``stuck`` (retried
    now and then at the longest back-off): once ``next_attempt_at`` has come.
    ``seen``, ``verdict``, ``acting`` (never finished: a crash between commit and action;
    the cache answers the new scan) and ``gone`` (it is back): yes.
    """
    if row is None:
        return True
    state = row["state"]
    if state in (State.DONE, State.RELEASED):
        return False
    if state in (State.RETRY, State.STUCK):
        due = as_utc(row["next_attempt_at"])
        if due is None:
            return state == State.RETRY
        return due <= now
    return True


class Seen:
    """The identities one sweep saw, in a fixed 1 MiB whatever the backlog (a set of the
    hashes of 100,000 identities took ~7 MB for the whole drain of that backlog).

    One bit per hash of (this sweep's salt, identity).  An identity added is always
    found.  One not added is found by mistake with a small probability (~1% with 100,000
    added, ~11% with a million): that only makes a vanished message wait for a later
    sweep to be marked gone, and a later sweep has another salt, so it is not the same
    message every time."""

    BITS = 1 << 23

    def __init__(self) -> None:
        self._bits = bytearray(self.BITS // 8)
        self._salt = "\0" + os.urandom(8).hex()

    def _bit(self, identity: str) -> tuple[int, int]:
        # The salt inside the hashed string: str's hash (SipHash) of another string is
        # independent, where mixing a salt into a tuple's hash keeps its collisions.
        h = hash(identity + self._salt) & (self.BITS - 1)
        return h >> 3, 1 << (h & 7)

    def add(self, identity: str) -> None:
        byte, mask = self._bit(identity)
        self._bits[byte] |= mask

    def __contains__(self, identity: object) -> bool:
        if not isinstance(identity, str):
            return False
        byte, mask = self._bit(identity)
        return bool(self._bits[byte] & mask)


class HandOver:
    """Which messages were handed over recently, so that a sweep or a repeated event
    does not hand over again a message whose job is still under way."""

    def __init__(self, window: float = HANDED_WINDOW, limit: int = HANDED_MAX) -> None:
        self.window = window
        self.limit = limit
        self._lock = threading.Lock()
        self._at: OrderedDict[str, float] = OrderedDict()

    def claim(self, identity: str, row: dict | None) -> bool:
        """True if a job for ``identity`` should be handed over now (and remember it).

        False while an earlier job for it is under way: handed over within the window,
        and the stored ``row`` (None: not looked up, or no row) does not show its result
        yet."""
        now = time.time()
        with self._lock:
            since = self._at.get(identity)
            if since is not None and now - since < self.window:
                updated = as_utc(row["updated_at"]) if row is not None else None
                if updated is None or updated.timestamp() < since:
                    return False
            self._at[identity] = now
            self._at.move_to_end(identity)
            while self._at:
                oldest = next(iter(self._at.values()))
                if len(self._at) <= self.limit and now - oldest < self.window:
                    break
                self._at.popitem(last=False)
        return True

    def under_way(self, row: dict) -> bool:
        """True if ``row``'s message was handed over and its result is not stored yet."""
        with self._lock:
            since = self._at.get(row["identity"])
        if since is None or time.time() - since >= self.window:
            return False
        updated = as_utc(row["updated_at"])
        return updated is None or updated.timestamp() < since

    def forget(self, identity: str) -> None:
        """The job ended without a stored result (database down): hand it over again."""
        with self._lock:
            self._at.pop(identity, None)

    def clear(self) -> None:
        with self._lock:
            self._at.clear()


class Reporter:
    """Logs a warning about a path once, not at every sweep."""

    def __init__(self, logger: logging.Logger, limit: int = REPORTED_MAX) -> None:
        self.log = logger
        self.limit = limit
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def once(self, key: str, message: str) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
        self.log.warning("%s", printable(message))
        return True


class EventReader:
    """Reads inotify events from a descriptor the broker gave us."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read(self, timeout_ms: int) -> list[Event]:
        if not self._poll.poll(timeout_ms):
            return []
        return list(parse_events(os.read(self.fd, 256 * 1024)))


class Source(ABC):
    """A place where messages rest.  See the module docstring for the hooks."""

    kind: ClassVar[str]
    held: ClassVar[bool]  # True for the hold queue: clean mail is released, not left

    def __init__(self, src: SourceConfig, config: Config, store: Store, broker: Broker
                 ) -> None:
        self.src = src
        self.name = src.name
        self.config = config
        self.store = store
        self.broker = broker
        self.quarantine_store = QuarantineStore(config.quarantine.directory)
        self.stats: Counter[str] = Counter()
        self.handed = HandOver()
        # Whether a message of this source is in the worker's pipeline (scanned, being
        # committed or acted on): the worker that runs the source sets it.
        self.busy: Callable[[str], bool] = lambda identity: False
        self.reporter = Reporter(log)
        self._stop = threading.Event()  # set: the watcher thread ends
        self._thread: threading.Thread | None = None
        self._watch_fd: int | None = None  # our inotify descriptor (made by the broker)

    # --- hooks -----------------------------------------------------------------------------

    @abstractmethod
    def start(self, submit: Submit) -> None:
        """Start watching; call ``submit`` for each message that arrives."""

    def stop(self) -> None:
        """Stop watching.  Arrivals not yet submitted are found by the next sweep."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._watch_fd is not None:
            self.broker.close_watcher(self._watch_fd)
            self._watch_fd = None
        self._forget_watches()

    def _forget_watches(self) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """Hook: drop what the source knows of its watches (they are gone)."""

    def _watch_in_background(self, loop: Callable[[Submit], None], submit: Submit) -> None:
        """Get an inotify instance from the broker and run ``loop(submit)`` in a thread;
        without one (limits reached), the sweeps alone find new mail."""
        self._stop.clear()
        try:
            self._watch_fd = self.broker.watcher()
        except OSError as exc:
            log.error("%s: cannot watch (%s): new mail is found by the sweeps only, every "
                      "%gs", self.name, exc, self.src.sweep_interval)
            self._watch_fd = None
        self._thread = threading.Thread(target=loop, args=(submit,),
                                        name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    @abstractmethod
    def sightings(self) -> Iterator[Sighting]:
        """Every message present now."""

    @abstractmethod
    def locate(self, row: dict) -> Sighting | None:
        """The stored message ``row``, where it is now; None if it is no longer there."""

    @abstractmethod
    def job(self, sighting: Sighting, trigger: Trigger = Trigger.ARRIVAL) -> Job:
        """The scan job for a message."""

    @abstractmethod
    def release(self, items: list[Pending]) -> list[ActionRecord]:
        """Release (hold queue); one record per item."""

    @abstractmethod
    def quarantine(self, items: list[Pending]) -> list[ActionRecord]:
        """Quarantine (to ``item.target`` when the store is used); one record per item."""

    @abstractmethod
    def delete(self, items: list[Pending]) -> list[ActionRecord]:
        """Delete; one record per item."""

    @abstractmethod
    def completed(self, row: dict, intent: dict) -> ActionRecord | None:
        """The record of an action interrupted by a crash (``intent``: its pending action
        row) if it did happen: the message is no longer where it was because of us."""

    def backlog(self) -> tuple[int, float] | None:
        """(messages waiting here, age of the oldest in seconds), for sources where mail
        waits for spoolscan (the hold queue); None elsewhere."""
        return None

    def quarantine_target(self, pending: Pending) -> str | None:
        """Where a quarantine of ``pending`` goes (recorded before acting), or None if the
        source decides it while acting."""
        return self.quarantine_store.path_for(pending.message_id, pending.scan_id)

    # --- sweeping ---------------------------------------------------------------------------

    def sweep(self) -> Iterator[Job]:
        """Jobs for every message that needs work (``needs_work``), looked up in the
        store by batches; then reconciles what vanished."""
        started = utcnow()
        present = Seen()
        batch: list[Sighting] = []
        seen = handed = 0
        for sighting in self.sightings():
            seen += 1
            present.add(sighting.identity)
            batch.append(sighting)
            if len(batch) >= LOOKUP_BATCH:
                for job in self._due(batch):
                    handed += 1
                    yield job
                batch = []
        for job in self._due(batch):
            handed += 1
            yield job
        gone = self.reconcile(present, started)
        self.stats["swept"] += 1
        (log.info if handed or gone else log.debug)(
            "%s: sweep: %d message(s), %d to scan, %d gone", self.name, seen, handed, gone)

    def _due(self, batch: Sequence[Sighting]) -> Iterator[Job]:
        if not batch:
            return
        rows = self._lookup(batch)
        now = utcnow()
        for sighting in batch:
            row = rows.get(sighting.identity)
            if needs_work(row, now) and self.handed.claim(sighting.identity, row):
                yield self.job(sighting)

    def _lookup(self, batch: Sequence[Sighting]) -> dict[str, dict]:
        """Stored rows of a batch; if the store refuses the batch for a reason other than
        an outage (which the sweep's caller reports), one sighting at a time, skipping
        (and reporting) one that cannot be looked up."""
        try:
            return self.store.messages_by_identity(self.name, [s.identity for s in batch])
        except (OperationalError, InterfaceError):
            raise
        except Exception as first:
            log.warning("%s: a batch of %d lookups failed (%s); one at a time", self.name,
                        len(batch), first.__class__.__name__)
        rows: dict[str, dict] = {}
        for s in batch:
            try:
                rows.update(self.store.messages_by_identity(self.name, [s.identity]))
            except (OperationalError, InterfaceError):
                raise
            except Exception as exc:
                self.reporter.once(f"lookup:{s.identity}",
                                   f"{self.name}: {s.identity}: cannot be looked up, left "
                                   f"where it is: {exc.__class__.__name__}: {exc}")
                rows[s.identity] = {"state": State.STUCK, "next_attempt_at": None,
                                    "identity": s.identity, "updated_at": None}
        return rows

    def owns(self, row: dict) -> bool:
        """Whether a stored message of this source is this host's to look at and act on
        (several hosts may share one store, each with sources of the same name)."""
        return True

    def job_for(self, row: dict, trigger: Trigger) -> Job | None:
        """A job to rescan a stored message, or None if it is no longer there."""
        sighting = self.locate(row)
        return None if sighting is None else self.job(sighting, trigger)

    def jobs_for(self, rows: Sequence[dict], trigger: Trigger) -> list[Job | None]:
        """``job_for`` of each row (a source may find many at once)."""
        return [self.job_for(row, trigger) for row in rows]

    def reconcile(self, present: Container[str], started: datetime) -> int:
        """Open messages of this source that are no longer where they rest: an action
        interrupted after it took effect (a pending intent) is recorded as done, the
        others as gone.  Only rows last touched before the listing began are judged, and
        each is looked for once more.  Returns how many were marked gone."""
        missing = [r for r in self.store.open_messages(self.name)
                   if r["identity"] not in present and self.owns(r)
                   and (as_utc(r["updated_at"]) or started) < started
                   and not self.handed.under_way(r)
                   # Acted on right now: its own action records the outcome (a second
                   # "completed before an interruption" would record it twice).
                   and not self.busy(r["identity"])]
        missing = [r for r in missing if self.locate(r) is None]
        if not missing:
            return 0
        last = self.store.last_actions([r["id"] for r in missing])
        finished: list[ActionRecord] = []
        gone: list[dict] = []
        now = utcnow()
        for row in missing:
            intent = last.get(row["id"])
            if intent is not None and intent["outcome"] == ActionOutcome.PENDING:
                record = self.completed(row, intent)
                if record is not None:
                    log.info("%s: %s completed before an interruption (%s)",
                             printable(row["location"]), record.action,
                             printable(record.quarantine_path or "recorded"))
                    finished.append(record)
                    continue
                requested = as_utc(intent["requested_at"])
                if requested is not None and (now - requested).total_seconds() < INTENT_GRACE:
                    continue  # may be under way in another process: not gone yet
            gone.append(row)
        self.store.record_actions(finished)
        marked = self.store.mark_gone(gone, self.gone_reason)
        for row in gone:
            log.info("%s: gone (no longer there; was %s)", printable(row["location"]),
                     row["state"])
        return marked

    gone_reason = "no longer there"

    # --- acting ------------------------------------------------------------------------------

    def act(self, items: list[Pending]) -> list[ActionRecord]:
        """Carry out the decisions (only those that change mail); one record each."""
        handlers = {Action.RELEASE: self.release, Action.QUARANTINE: self.quarantine,
                    Action.DELETE: self.delete}
        records: list[ActionRecord] = []
        groups: dict[Action, list[Pending]] = {}
        for p in items:
            groups.setdefault(p.decision.action, []).append(p)
        for action, group in groups.items():
            handler = handlers.get(action)
            if handler is None:
                records += [failed(p, f"{action} is not possible here", state=State.STUCK)
                            for p in group]
            else:
                records += handler(group)
        return records


def record(p: Pending, outcome: ActionOutcome, detail: str | None, state: State | None,
           *, quarantine_path: str | None = None, original_path: str | None = None,
           location: str | None = None) -> ActionRecord:
    """An action record for ``p``'s decided action."""
    return ActionRecord(p.message_id, p.scan_id, p.decision.action, outcome, detail,
                        state=state, quarantine_path=quarantine_path,
                        original_path=original_path, location=location)


def done(p: Pending, **paths: str | None) -> ActionRecord:
    return record(p, ActionOutcome.OK, p.decision.reason, State.DONE, **paths)


def failed(p: Pending, detail: str, state: State = State.RETRY, **paths: str | None
           ) -> ActionRecord:
    return record(p, ActionOutcome.FAILED, detail, state, **paths)


def missing(p: Pending, detail: str, **paths: str | None) -> ActionRecord:
    return record(p, ActionOutcome.GONE, detail, State.GONE, **paths)
