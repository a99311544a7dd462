"""The worker: sources → scanner → policy → actions → store, running until stopped.

Like Postfix's own daemons, it is a few small loops joined by queues with explicit states:

* **sources** (the hold-queue watcher, the Maildir watcher, sweeps, rescans) ``submit``
  jobs into a bounded queue; a full queue blocks them (back-pressure, bounded memory);
* the **dispatcher** hands jobs to ``concurrency`` scanner threads;
* the **committer** takes finished scans in batches: it decides (policy), commits the
  verdicts, and only then asks the source to act (release, quarantine...), then records
  what happened.  If the commit fails, nothing is done to the mail: it stays where it is
  and the next sweep brings it back.

A message is in the pipeline at most once: a job for a message already queued or being
scanned is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy.exc import DBAPIError

from spoolscan.config import Config
from spoolscan.policy import Decision, decide, retry_delay
from spoolscan.scanner import CLEAN, INFECTED, ClamdScanner
from spoolscan.scanning import Job, Outcome, ScanService
from spoolscan.store.repo import (
    GONE,
    RETRY,
    STUCK,
    VERDICT,
    ActionRecord,
    ScanRecord,
    Store,
    StoredScan,
    utcnow,
)

log = logging.getLogger(__name__)

JOB_QUEUE_SIZE = 1000  # jobs waiting for a scanner thread
OPEN_LIMIT = 256  # jobs scanned but not yet committed and acted on, plus those in scan


@dataclass
class Pending:
    """A scan whose verdict is committed; the source now acts on the decision."""

    outcome: Outcome
    decision: Decision
    stored: StoredScan


class Source(Protocol):
    """Where messages come from, and how to act on them."""

    name: str
    held: bool  # True for the hold queue: clean mail is released, not left in place

    def start(self, submit: Callable[[Job], bool]) -> None:
        """Start watching; call ``submit`` for each message that needs scanning."""

    def stop(self) -> None:
        """Stop watching."""

    def sweep(self) -> Iterator[Job]:
        """Jobs for every message present that needs work (arrived, due for a retry,
        verdict committed but not acted on).  Marks vanished messages gone."""

    def act(self, items: list[Pending]) -> list[ActionRecord]:
        """Carry out the decisions (only those whose ``decision.acts``); one record each."""

    def job_for(self, row: dict, trigger: str) -> Job | None:
        """A job to rescan a stored message, or None if it is no longer there."""


def log_failure(logger: logging.Logger, what: str, exc: Exception) -> None:
    """One line for a database outage (mail stays where it is), a traceback otherwise."""
    if isinstance(exc, DBAPIError):
        logger.error("%s: database unavailable; mail stays where it is: %s", what,
                     str(exc.orig).splitlines()[0] if exc.orig else exc)
    else:
        logger.exception("%s", what)


def log_line(p: Pending, record: ActionRecord | None) -> str:
    """One line per message, queue ID (or path) first, like Postfix's own logs."""
    o, v = p.outcome, p.outcome.verdict
    info = o.info
    parts = [f"{info.queue_id or info.location}: verdict={v.verdict}"]
    if v.signature:
        parts.append(f"signature={v.signature}")
    action = p.decision.action
    if record is not None:
        action = action if record.outcome == "ok" else f"{action}-{record.outcome}"
    parts.append(f"action={action}")
    if p.decision.state in (RETRY, STUCK):
        parts.append(f"state={p.decision.state}")
    if info.direction:
        parts.append(f"direction={info.direction}")
    if info.kind == "postfix-hold":
        parts.append(f"from=<{info.sender or ''}> nrcpt={len(info.recipients)}")
    if o.job.trigger != "arrival":
        parts.append(f"trigger={o.job.trigger}")
    if p.stored.retroactive:
        parts.append("retroactive=yes")
    if o.cached:
        parts.append("cached=yes")
    parts.append(f"ms={v.duration_ms}")
    if v.verdict not in (CLEAN, INFECTED) and v.detail:
        parts.append(f"reason=\"{v.detail}\"")
    if record is not None and record.outcome != "ok" and record.detail:
        parts.append(f"detail=\"{record.detail}\"")
    return " ".join(parts)


class Worker:
    """Runs the pipeline for a set of sources.  See the module docstring."""

    def __init__(self, config: Config, store: Store, scanner: ClamdScanner,
                 sources: Iterable[Source]) -> None:
        self.config = config
        self.store = store
        self.service = ScanService(scanner=scanner, store=store)
        self.sources = {s.name: s for s in sources}
        self.stats: Counter[str] = Counter()
        # None in either queue only wakes its reader (see stop()).
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=JOB_QUEUE_SIZE)
        self._outcomes: queue.Queue[Outcome | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(OPEN_LIMIT)
        self._keys: set[tuple[str, str]] = set()
        self._keys_lock = threading.Lock()
        self._stopping = threading.Event()  # no new jobs accepted
        self._stop_requested = threading.Event()  # SIGTERM: cut sweeps short
        self._halt = threading.Event()  # loops exit once drained
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=config.clamd.concurrency,
                                        thread_name_prefix="scan")

    # --- submitting ------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue ``job`` unless its message is already in the pipeline.  Blocks while the
        queue is full.  Returns False if dropped (duplicate, or shutting down)."""
        key = (job.info.source, job.info.identity)
        with self._keys_lock:
            if key in self._keys or self._stopping.is_set():
                return False
            self._keys.add(key)
        while True:
            try:
                self._jobs.put(job, timeout=0.5)
                return True
            except queue.Full:
                if self._stopping.is_set() or self._stop_requested.is_set():
                    self._forget(key)
                    return False

    def _forget(self, key: tuple[str, str]) -> None:
        with self._keys_lock:
            self._keys.discard(key)

    def in_pipeline(self) -> int:
        with self._keys_lock:
            return len(self._keys)

    # --- the loops -------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not (self._halt.is_set() and self._jobs.empty()):
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job is None:  # woken up by stop()
                continue
            self._slots.acquire()
            self._pool.submit(self._scan, job)

    def _scan(self, job: Job) -> None:
        self._outcomes.put(self.service.scan(job))

    def _commit_loop(self) -> None:
        while True:
            if self._halt.is_set() and self.in_pipeline() == 0:
                return
            try:
                first = self._outcomes.get(timeout=0.2)
            except queue.Empty:
                continue
            if first is None:  # woken up by stop()
                continue
            batch = [first]
            deadline = time.monotonic() + 0.02  # gather what finishes together
            while len(batch) < 200:
                try:
                    more = self._outcomes.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is not None:
                    batch.append(more)
            try:
                self.process(batch)
            except Exception:
                log.exception("unexpected error while processing a batch; the messages "
                              "stay where they are and will be picked up again")
            finally:
                for outcome in batch:
                    self._forget((outcome.job.info.source, outcome.job.info.identity))
                    self._slots.release()

    # --- verdict → store → action → store --------------------------------------------

    def process(self, outcomes: list[Outcome]) -> None:
        """Commit the verdicts of ``outcomes``, then act on them, then record the actions."""
        now = utcnow()
        records: list[ScanRecord] = []
        planned: list[tuple[Outcome, Decision]] = []
        for o in outcomes:
            source = self.sources.get(o.info.source)
            if o.unavailable is not None:
                self._note_unavailable(o)
                continue
            decision = decide(o.verdict, held=bool(source and source.held),
                              attempts=o.job.attempts, policy=self.config.policy, now=now)
            v = o.verdict
            records.append(ScanRecord(
                message=o.info, verdict=v.verdict, signature=v.signature, detail=v.detail,
                fingerprint=v.fingerprint, duration_ms=v.duration_ms, trigger=o.job.trigger,
                cached=o.cached, state=VERDICT if decision.acts else decision.state,
                next_attempt_at=decision.next_attempt_at,
            ))
            planned.append((o, decision))
        if not records:
            return
        try:
            stored = self.store.record_scans(records)
        except Exception as exc:
            # Invariant: no verdict committed, no action.  The mail stays where it is.
            self.stats["database_errors"] += len(records)
            log.error("database unavailable, %d verdict(s) not recorded; the mail stays "
                      "where it is and will be scanned again: %s", len(records), exc)
            time.sleep(1.0)
            return
        pending = [Pending(o, d, s) for (o, d), s in zip(planned, stored, strict=True)]
        by_source: dict[str, list[Pending]] = {}
        for p in pending:
            by_source.setdefault(p.outcome.info.source, []).append(p)
        for name, items in by_source.items():
            self._act(self.sources.get(name), items)

    def _act(self, source: Source | None, items: list[Pending]) -> None:
        acting = [p for p in items if p.decision.acts]
        results: dict[int, ActionRecord] = {}
        if acting and source is not None:
            # Write the intent first: if we die while acting, the restart finds a pending
            # action for a message that is no longer where it was, and knows why.
            try:
                self.store.record_actions([
                    ActionRecord(p.stored.message_id, p.stored.scan_id, p.decision.action,
                                 "pending", p.decision.reason) for p in acting])
            except Exception as exc:
                log.error("database unavailable, not acting on %d message(s); they stay "
                          "where they are: %s", len(acting), exc)
                return
            try:
                for record in source.act(acting):
                    results[record.message_id] = record
            except Exception as exc:
                log.exception("%s: acting on %d message(s) failed", source.name, len(acting))
                for p in acting:
                    results[p.stored.message_id] = ActionRecord(
                        p.stored.message_id, p.stored.scan_id, p.decision.action, "failed",
                        f"{exc!r}", state=RETRY)
        records: list[ActionRecord] = []
        for p in items:
            found = results.get(p.stored.message_id)
            if found is None:
                record = ActionRecord(p.stored.message_id, p.stored.scan_id,
                                      p.decision.action, "ok", p.decision.reason,
                                      state=p.decision.state)
            elif found.outcome == "failed":
                record = self._retry_later(p, found)
            else:
                record = found
            records.append(record)
            self._count(p, record)
            line = log_line(p, record)
            if p.decision.state == STUCK or record.outcome == "failed":
                log.warning(line)
            else:
                log.info(line)
            if (p.outcome.verdict.verdict == INFECTED
                    and p.outcome.info.direction in ("outbound", "internal")):
                log.warning("%s: infected mail sent by local sender <%s>: the account may be "
                            "compromised", p.outcome.info.queue_id or p.outcome.info.location,
                            p.outcome.info.sender)
        try:
            self.store.record_actions(records)
        except Exception as exc:
            log.error("database unavailable, %d action(s) done but not recorded; the next "
                      "sweep reconciles: %s", len(records), exc)

    def _retry_later(self, p: Pending, record: ActionRecord) -> ActionRecord:
        """A failed action: back off like a failed scan; stuck after max_attempts."""
        policy = self.config.policy
        attempts = p.stored.attempts + 1
        state = STUCK if attempts >= policy.max_attempts else RETRY
        delay = retry_delay(policy, policy.max_attempts if state == STUCK else attempts)
        return replace(record, state=state, next_attempt_at=utcnow() + delay)

    def _count(self, p: Pending, record: ActionRecord) -> None:
        self.stats["scanned"] += 1
        self.stats[p.outcome.verdict.verdict] += 1
        if p.outcome.cached:
            self.stats["cached"] += 1
        if p.stored.retroactive:
            self.stats["retroactive"] += 1
        self.stats[f"action:{p.decision.action}:{record.outcome}"] += 1
        if p.decision.state == STUCK:
            self.stats["stuck"] += 1

    def _note_unavailable(self, o: Outcome) -> None:
        assert o.unavailable is not None
        info = o.info
        name = info.queue_id or info.location
        if o.unavailable.gone:
            self.stats["gone"] += 1
            log.info("%s: gone before it could be scanned (%s)", name, o.unavailable)
            self.store.note_failure(info, GONE, str(o.unavailable), None)
            return
        self.stats["unreadable"] += 1
        attempts = o.job.attempts + 1
        policy = self.config.policy
        if attempts >= policy.max_attempts:
            state, when = STUCK, utcnow() + retry_delay(policy, policy.max_attempts)
        else:
            state, when = RETRY, utcnow() + retry_delay(policy, attempts)
        self.store.note_failure(info, state, str(o.unavailable), when)
        log.warning("%s: cannot be read, kept where it is: %s (attempt %d of %d%s)", name,
                    o.unavailable, attempts, policy.max_attempts,
                    ", flagged stuck" if state == STUCK else "")

    # --- running ---------------------------------------------------------------------

    def start(self, watch: bool = True) -> None:
        """Start the dispatcher and committer, and (``watch``) the sources' watchers."""
        for target, name in ((self._dispatch_loop, "dispatch"), (self._commit_loop, "commit")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if watch:
            for source in self.sources.values():
                source.start(self.submit)

    def sweep(self, source: Source) -> int:
        """Submit every job ``source``'s sweep finds; returns how many were queued."""
        queued = 0
        for job in source.sweep():
            if self._stopping.is_set() or self._stop_requested.is_set():
                break
            queued += self.submit(job)
        return queued

    def wait_idle(self, settle: float = 0.5, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or in flight for ``settle`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        quiet_since: float | None = None
        while deadline is None or time.monotonic() < deadline:
            if self.in_pipeline() == 0:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle:
                    return True
            else:
                quiet_since = None
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting work, finish what is in flight (scan, commit, act), stop."""
        self._stopping.set()
        for source in self.sources.values():
            try:
                source.stop()
            except Exception:
                log.exception("%s: error while stopping", source.name)
        self._halt.set()
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        self._outcomes.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self._pool.shutdown(wait=True)
        self._threads.clear()

    def run_once(self) -> None:
        """Process what is there now (and what arrives meanwhile), then stop."""
        self.start()
        for source in self.sources.values():
            self.sweep(source)
        self.wait_idle()
        self.stop()

    def run_forever(self, stop: threading.Event, scheduler: object | None = None) -> None:
        """Run until ``stop`` is set: watchers, plus a sweep of each source at start-up
        and every ``sweep_interval`` seconds (missed events, retries, reconciliation)."""
        self._stop_requested = stop
        self.start()
        intervals = {s.name: self.config.source(s.name).sweep_interval
                     for s in self.sources.values() if _configured(self.config, s.name)}
        next_sweep = {name: 0.0 for name in self.sources}
        while not stop.is_set():
            now = time.monotonic()
            for name, source in self.sources.items():
                if now >= next_sweep[name]:
                    try:
                        self.sweep(source)
                    except Exception as exc:
                        log_failure(log, f"{name}: sweep failed, retrying at the next "
                                         "interval", exc)
                    next_sweep[name] = time.monotonic() + intervals.get(name, 30.0)
            stop.wait(0.5)
        log.info("stopping: finishing %d message(s) in flight", self.in_pipeline())
        self.stop()


def _configured(config: Config, name: str) -> bool:
    return any(s.name == name for s in config.sources)
