"""The pipeline: sources → scan → policy → store → actions → store, until stopped.

Like Postfix's own daemons, it is a few small loops joined by queues with explicit states:

* **sources** (the hold-queue watcher, the Maildir watcher, sweeps, rescans) ``submit``
  jobs into a bounded queue; a full queue blocks them (back-pressure, bounded memory);
* ``concurrency`` **scanner** threads take jobs from that queue (each waits for one of
  a bounded number of slots for what is scanned but not yet acted on) and scan them;
* the **committer** takes finished scans in batches: it commits the verdicts together
  with the policy's decisions (made from what the store knew of each message), writes the
  intent of each action, and only then asks the source to act (release, quarantine...),
  then records what happened.  If a commit fails, nothing is done to the mail: it stays
  where it is and the next sweep brings it back.

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
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from spoolscan.backoff import after_failure
from spoolscan.clamdpool import Scanner
from spoolscan.config import Config
from spoolscan.model import (
    Action,
    ActionOutcome,
    Job,
    Outcome,
    Pending,
    Prior,
    ScanResult,
    State,
    Trigger,
    Verdict,
)
from spoolscan.policy import decide
from spoolscan.scan import ScanService
from spoolscan.sources.base import Source
from spoolscan.store.repo import ActionRecord, ScanRecord, Store, utcnow
from spoolscan.text import printable

if TYPE_CHECKING:
    from spoolscan.metrics import Metrics
    from spoolscan.notify import Notifier

log = logging.getLogger(__name__)

JOB_QUEUE_SIZE = 1000  # jobs waiting for a scanner thread
OPEN_LIMIT = 256  # jobs scanned but not yet committed and acted on, plus those in scan
# How the commit loop gathers a batch (see Worker._gather).
GATHER_IDLE = 0.01  # seconds without a new outcome that end a batch
GATHER_MAX = 0.2  # seconds the first outcome of a batch waits at most
BATCH_MAX = 100  # well under OPEN_LIMIT: scanning goes on while a batch is committed


def _discard(job: Job) -> None:
    """Give back what the job's source kept open for it (see ``Job.discard``)."""
    if job.discard is not None:
        try:
            job.discard()
        except Exception:  # a descriptor that fails to close must not stop the pipeline
            log.exception("%s: could not give back what was kept open", job.info.location)


def is_outage(exc: BaseException) -> bool:
    """True for a database that cannot be reached or used right now (connection refused
    or lost, locked): the whole batch waits.  Anything else is a problem with one of the
    records (bad data), isolated record by record."""
    return isinstance(exc, OperationalError | InterfaceError) or bool(
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def log_failure(logger: logging.Logger, what: str, exc: Exception) -> None:
    """One line for a database outage (mail stays where it is), a traceback otherwise."""
    if is_outage(exc):
        assert isinstance(exc, DBAPIError)
        logger.error("%s: database unavailable; mail stays where it is: %s", what,
                     str(exc.orig).splitlines()[0] if exc.orig else exc)
    else:
        logger.exception("%s", what)


def line_level(p: Pending, record: ActionRecord) -> int:
    """A failed action is an error; a detection, something unchecked or stuck a warning
    (``journalctl -p warning`` shows them); a clean message information."""
    if record.outcome == ActionOutcome.FAILED:
        return logging.ERROR
    if p.outcome.result.verdict != Verdict.CLEAN or p.decision.state == State.STUCK:
        return logging.WARNING
    return logging.INFO


def line_fields(p: Pending) -> dict[str, object]:
    """The fields of the per-message line, for the journal and JSON logs."""
    info = p.outcome.info
    return {"queue_id": info.queue_id, "verdict": str(p.outcome.result.verdict),
            "signature": p.outcome.result.signature, "action": str(p.decision.action),
            "source": info.source, "message_id": getattr(info, "message_id", None)}


def log_line(p: Pending, record: ActionRecord | None) -> str:
    """One line per message, queue ID (or path) first, like Postfix's own logs."""
    o, r = p.outcome, p.outcome.result
    info = o.info
    parts = [f"{printable(info.queue_id or info.location)}: verdict={r.verdict}"]
    if r.signature:
        parts.append(f"signature={printable(r.signature)}")
    action = str(p.decision.action)
    if record is not None and record.outcome != ActionOutcome.OK:
        action = f"{action}-{record.outcome}"
    parts.append(f"action={action}")
    if p.decision.state in (State.RETRY, State.STUCK):
        parts.append(f"state={p.decision.state}")
    if info.direction:
        parts.append(f"direction={info.direction}")
    if info.kind == "postfix-hold":
        shown = ",".join(f"<{r}>" for r in info.recipients[:5])
        more = f",+{len(info.recipients) - 5}" if len(info.recipients) > 5 else ""
        parts.append(f"from=<{printable(info.sender or '')}> to={printable(shown)}{more} "
                     f"nrcpt={len(info.recipients)}")
    message_id = getattr(info, "message_id", None)
    if message_id:
        parts.append(f"message-id={printable(message_id)}")
    if info.size is not None:
        parts.append(f"size={info.size}")
    if o.job.trigger != Trigger.ARRIVAL:
        parts.append(f"trigger={o.job.trigger}")
    if p.retroactive:
        parts.append("retroactive=yes")
    if o.cached:
        parts.append("cached=yes")
    parts.append(f"ms={r.duration_ms}")
    if not r.verdict.definite and r.detail:
        parts.append(f'reason="{printable(r.detail)}"')
    if record is not None and record.outcome != ActionOutcome.OK and record.detail:
        parts.append(f'detail="{printable(record.detail)}"')
    return " ".join(parts)


class Worker:
    """Runs the pipeline for a set of sources.  See the module docstring."""

    def __init__(self, config: Config, store: Store, client: Scanner,
                 sources: Iterable[Source], metrics: Metrics | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.notifier = notifier
        self.store = store
        self.service = ScanService(client=client, store=store,
                                   snapshot_dir=config.quarantine.directory)
        self.sources = {s.name: s for s in sources}
        # Sources a reload removed: messages they found may still be in flight, and the
        # source that found a message is the one that acts on it.
        self._retired: dict[str, Source] = {}
        self.heartbeat = time.monotonic()  # the commit loop's last turn (systemd watchdog)
        self.stats: Counter[str] = Counter()
        # None in either queue only wakes its reader (see stop()).
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=JOB_QUEUE_SIZE)
        self._outcomes: queue.Queue[Outcome | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(OPEN_LIMIT)
        self._keys: set[tuple[str, str]] = set()
        self._keys_lock = threading.Lock()
        for source in self.sources.values():
            source.busy = self._busy_in(source.name)
        # Jobs that ended with nothing stored: handed over again once out of the pipeline.
        self._unrecorded: list[Outcome] = []
        self._stopping = threading.Event()  # no new jobs accepted
        self._stop_requested = threading.Event()  # SIGTERM: cut sweeps short
        self._halt = threading.Event()  # loops exit once drained
        self._threads: list[threading.Thread] = []
        # Scanning threads, fixed at start-up; more than the slots leave for scanning
        # could only wait, each holding a job outside the bounded queue.
        self._scanners = min(config.clamd.concurrency, OPEN_LIMIT - BATCH_MAX)

    # --- submitting ------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue ``job`` unless its message is already in the pipeline.  Blocks while the
        queue is full.  Returns False if dropped (duplicate, or shutting down)."""
        key = (job.info.source, job.info.identity)
        with self._keys_lock:
            if key in self._keys or self._stopping.is_set():
                _discard(job)
                return False
            self._keys.add(key)
        while True:
            try:
                self._jobs.put(job, timeout=0.5)
                return True
            except queue.Full:
                if self._stopping.is_set() or self._stop_requested.is_set():
                    self._forget(key)
                    _discard(job)
                    return False

    def _forget(self, key: tuple[str, str]) -> None:
        with self._keys_lock:
            self._keys.discard(key)

    def _busy_in(self, source: str) -> Callable[[str], bool]:
        def busy(identity: str) -> bool:
            with self._keys_lock:
                return (source, identity) in self._keys
        return busy

    def in_pipeline(self) -> int:
        with self._keys_lock:
            return len(self._keys)

    # --- the loops -------------------------------------------------------------------

    def _scan_loop(self) -> None:
        """One scanning thread: the next job, once a slot is free (what is scanned but
        not yet committed and acted on is bounded), scanned, its outcome handed to the
        commit loop.  Each takes jobs from the queue itself: no hand-over in between."""
        while not (self._halt.is_set() and self._jobs.empty()):
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job is None:  # woken up by stop()
                continue
            self._slots.acquire()
            self._scan(job)

    def _scan(self, job: Job) -> None:
        try:
            outcome = self.service.scan(job)
        except BaseException as exc:  # never lose a job (or its thread): its slot and key
            # go with its outcome
            log.exception("%s: unexpected error while scanning", job.info.location)
            outcome = Outcome(job, job.info,
                              ScanResult(Verdict.ERROR, detail=f"internal error: {exc!r}"))
        _discard(job)
        self._outcomes.put(outcome)

    def _commit_loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            if self._halt.is_set() and self.in_pipeline() == 0:
                return
            try:
                first = self._outcomes.get(timeout=0.2)
            except queue.Empty:
                continue
            if first is None:  # woken up by stop()
                continue
            batch = self._gather(first)
            try:
                self.process(batch)
            except Exception:
                log.exception("unexpected error while processing a batch; the messages "
                              "stay where they are and will be picked up again")
            finally:
                for outcome in batch:
                    self._forget((outcome.job.info.source, outcome.job.info.identity))
                    self._slots.release()
                self._hand_over_again()

    def _gather(self, first: Outcome) -> list[Outcome]:
        """``first`` and the outcomes that follow it closely: until none came for
        ``GATHER_IDLE`` seconds, ``GATHER_MAX`` after the first, or ``BATCH_MAX`` of
        them.  A lone message waits little; under load the batches grow, and with them
        what each commit, postsuper run and action record is shared by (CPU per message
        at 10 a batch about twice that at 50)."""
        batch = [first]
        deadline = time.monotonic() + GATHER_MAX
        while len(batch) < BATCH_MAX:
            wait = min(GATHER_IDLE, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                more = self._outcomes.get(timeout=wait)
            except queue.Empty:
                break
            if more is not None:
                batch.append(more)
        return batch

    # --- verdict → store → action → store --------------------------------------------

    def process(self, outcomes: list[Outcome]) -> None:
        """Commit the verdicts and decisions of ``outcomes``, then act, then record."""
        now = utcnow()
        scanned: list[Outcome] = []
        database_down = False
        for o in outcomes:
            if o.unavailable is None:
                scanned.append(o)
            elif database_down:  # one wait for a down (or locked) database per batch
                self._not_recorded([o])
            else:
                database_down = not self._note_unavailable(o)
        if not scanned:
            return
        records = [ScanRecord(
            message=o.info, verdict=o.result.verdict, signature=o.result.signature,
            detail=o.result.detail, fingerprint=o.result.fingerprint,
            duration_ms=o.result.duration_ms, trigger=o.job.trigger, cached=o.cached,
        ) for o in scanned]
        by_record = {id(r): o for r, o in zip(records, scanned, strict=True)}

        def plan(record: ScanRecord, prior: Prior):  # type: ignore[no-untyped-def]
            source = self._source(record.message.source)
            return decide(by_record[id(record)].result, held=bool(source and source.held),
                          prior=prior, policy=self.config.policy, now=now)

        try:
            committed = list(zip(scanned, self.store.record_scans(records, plan),
                                 strict=True))
        except Exception as exc:
            # Invariant: no verdict committed, no action.  The mail stays where it is.
            if is_outage(exc):
                self.stats["database_errors"] += len(records)
                if self.metrics is not None:
                    self.metrics.database_errors.inc()
                log_failure(log, f"{len(records)} verdict(s) not recorded; they will be "
                                 "scanned again", exc)
                self._not_recorded(scanned)
                time.sleep(1.0)
                return
            # One bad record must not hold back the others: one at a time.
            committed = self._record_one_by_one(scanned, records, plan, exc)
        pending = []
        for o, s in committed:
            assert s.decision is not None
            pending.append(Pending(o, s.decision, s.message_id, s.scan_id, s.attempts,
                                   s.retroactive))
        by_source: dict[str, list[Pending]] = {}
        for p in pending:
            by_source.setdefault(p.outcome.info.source, []).append(p)
        for name, items in by_source.items():
            self._act(self._source(name), items)

    def _interrupted_quarantines(self, source: Source, items: list[Pending]) -> dict[int, str]:
        """Messages whose last action is a quarantine left pending (the worker died while
        acting) or failed after the copy was made (postsuper could not remove the held
        message), its copy complete in the store: message ID -> that copy's path."""
        if not items:
            return {}
        try:
            last = self.store.last_actions([p.message_id for p in items])
        except Exception as exc:  # the intent write that follows reports an outage
            log.debug("earlier quarantine intents not looked up: %r", exc)
            return {}
        found = {}
        for message_id, row in last.items():
            path = row.get("quarantine_path")
            if (row.get("action") == Action.QUARANTINE
                    and row.get("outcome") in (ActionOutcome.PENDING, ActionOutcome.FAILED)
                    and path
                    and source.quarantine_store.exists(path)):
                found[message_id] = path
        return found

    def _source(self, name: str) -> Source | None:
        return self.sources.get(name) or self._retired.get(name)

    def _act(self, source: Source | None, items: list[Pending]) -> None:
        acting = [p for p in items if p.decision.acts]
        results: dict[int, ActionRecord] = {}
        if acting and source is None:  # cannot happen; if it does, not "done"
            for p in acting:
                results[p.message_id] = ActionRecord(
                    p.message_id, p.scan_id, p.decision.action, ActionOutcome.FAILED,
                    "its source is no longer configured", state=State.RETRY)
            acting = []
        if acting and source is not None:
            quarantining = [p for p in acting if p.decision.action == Action.QUARANTINE]
            earlier = self._interrupted_quarantines(source, quarantining)
            for p in quarantining:
                p.target = source.quarantine_target(p)
                if p.target is not None and p.message_id in earlier:
                    # A copy made by an attempt that did not finish (killed, postsuper
                    # failed): finish that one (put() keeps a complete copy) rather than
                    # make another.
                    p.target = earlier[p.message_id]
            # Write the intent first: if we die while acting, the restart finds a pending
            # action for a message that is no longer where it was, and knows why (and,
            # for a quarantine, where its copy went).
            intents = [ActionRecord(p.message_id, p.scan_id, p.decision.action,
                                    ActionOutcome.PENDING, p.decision.reason,
                                    quarantine_path=p.target) for p in acting]
            written = self._record_actions(intents, "intent not recorded, not acted on; "
                                                    "it stays where it is")
            if written is None:
                return
            acting = [p for p in acting if p.message_id in written]
            try:
                for record in source.act(acting):
                    results[record.message_id] = record
            except Exception as exc:
                log.exception("%s: acting on %d message(s) failed", source.name, len(acting))
                for p in acting:
                    results[p.message_id] = ActionRecord(
                        p.message_id, p.scan_id, p.decision.action, ActionOutcome.FAILED,
                        f"{exc!r}", state=State.RETRY)
        records: list[ActionRecord] = []
        for p in items:
            found = results.get(p.message_id)
            if found is None:
                record = ActionRecord(p.message_id, p.scan_id, p.decision.action,
                                      ActionOutcome.OK, p.decision.reason,
                                      state=p.decision.state)
            elif found.outcome == ActionOutcome.FAILED:
                record = self._retry_later(p, found)
            else:
                record = found
            records.append(record)
            self._count(p, record)
            log.log(line_level(p, record), "%s", log_line(p, record), extra=line_fields(p))
            if self.notifier is not None and record.outcome == ActionOutcome.OK:
                self.notifier.note(p)
            if (p.outcome.result.verdict == Verdict.INFECTED
                    and p.outcome.info.direction in ("outbound", "internal")):
                log.warning("%s: infected mail sent by local sender <%s>: the account may be "
                            "compromised",
                            printable(p.outcome.info.queue_id or p.outcome.info.location),
                            printable(p.outcome.info.sender or ""))
        self._record_actions(records, "done but not recorded; the next sweep reconciles")

    def _record_actions(self, records: list[ActionRecord], failure: str) -> set[int] | None:
        """Record actions in one transaction; if the store refuses the batch for a reason
        other than an outage, one by one.  Returns the message ids recorded (None: the
        database is down)."""
        try:
            self.store.record_actions(records)
            return {r.message_id for r in records}
        except Exception as exc:
            if is_outage(exc):
                log_failure(log, f"{len(records)} action(s): {failure}", exc)
                return None
        done: set[int] = set()
        for r in records:
            try:
                self.store.record_actions([r])
                done.add(r.message_id)
            except Exception as exc:
                log.error("message %d: action %s: %s: %s", r.message_id, r.action, failure,
                          printable(f"{exc.__class__.__name__}: {exc}"[:300]))
        return done

    def _record_one_by_one(self, outcomes: list[Outcome], records: list[ScanRecord], plan,
                           first: Exception):  # type: ignore[no-untyped-def]
        """Commit each record alone after a batch failed for a reason other than an
        outage; a record that still fails is flagged (``stuck``, with the reason)."""
        log.warning("a batch of %d verdict(s) was refused (%s); recording them one by one",
                    len(records), first.__class__.__name__)
        committed = []
        for i, (o, r) in enumerate(zip(outcomes, records, strict=True)):
            try:
                committed.append((o, self.store.record_scans([r], plan)[0]))
            except Exception as exc:
                if is_outage(exc):
                    log_failure(log, "verdicts not recorded", exc)
                    self._not_recorded(outcomes[i:])
                    break
                self._poisoned(o, exc)
        return committed

    def _poisoned(self, o: Outcome, exc: Exception) -> None:
        """A message whose verdict the store refuses: flag it, keep it where it is."""
        self.stats["unrecordable"] += 1
        name = printable(o.info.queue_id or o.info.location)
        reason = f"the store refused its verdict: {exc.__class__.__name__}: " \
                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''}"
        log.error("%s: %s; kept where it is, flagged stuck", name, printable(reason))
        policy = self.config.policy
        try:
            self.store.note_failure(
                o.info, reason,
                retry=lambda _: after_failure(policy, policy.max_attempts, utcnow()))
        except Exception:  # not even that: it stays, the log line says why
            log.debug("cannot flag %s", name, exc_info=True)

    def _not_recorded(self, outcomes: list[Outcome]) -> None:
        """Nothing was stored for these: let the next sweep hand them over again, once
        they have left the pipeline (``_commit_loop``).  Forgotten earlier, a sweep in
        between would claim them again and have its job refused as a duplicate, and the
        claim would then keep them from every sweep for ``HANDED_WINDOW``."""
        self._unrecorded.extend(outcomes)

    def _hand_over_again(self) -> None:
        unrecorded, self._unrecorded = self._unrecorded, []
        for o in unrecorded:
            source = self.sources.get(o.info.source)
            if source is not None:
                source.handed.forget(o.info.identity)

    def _retry_later(self, p: Pending, record: ActionRecord) -> ActionRecord:
        """A failed action: back off like a failed scan; stuck after max_attempts."""
        retry = after_failure(self.config.policy, p.attempts, utcnow())
        return replace(record, state=retry.state, next_attempt_at=retry.next_attempt_at)

    def _count(self, p: Pending, record: ActionRecord) -> None:
        if self.metrics is not None:
            m, source = self.metrics, p.outcome.info.source
            m.messages.labels(source, str(p.outcome.result.verdict),
                              str(p.decision.action)).inc()
            if p.outcome.cached:
                m.cached.labels(source).inc()
            elif p.outcome.result.duration_ms:
                m.scan_seconds.labels(source).observe(p.outcome.result.duration_ms / 1000)
            if p.retroactive:
                m.retroactive.labels(source).inc()
            if record.outcome == ActionOutcome.FAILED:
                m.failed_actions.labels(source, str(p.decision.action)).inc()
        self.stats["scanned"] += 1
        self.stats[p.outcome.result.verdict] += 1
        if p.outcome.cached:
            self.stats["cached"] += 1
        if p.retroactive:
            self.stats["retroactive"] += 1
        self.stats[f"action:{p.decision.action}:{record.outcome}"] += 1
        if p.decision.state == State.STUCK:
            self.stats["stuck"] += 1

    def _note_unavailable(self, o: Outcome) -> bool:
        """Record a message that could not be read; False if the database is down."""
        assert o.unavailable is not None
        name = printable(o.info.queue_id or o.info.location)
        policy = self.config.policy
        try:
            if o.unavailable.gone:
                self.stats["gone"] += 1
                log.info("%s: gone before it could be scanned (%s)", name,
                         printable(str(o.unavailable)))
                self.store.note_failure(o.info, str(o.unavailable), retry=None)
                return True
            self.stats["unreadable"] += 1
            retry = self.store.note_failure(
                o.info, str(o.unavailable),
                retry=lambda failures: after_failure(policy, failures, utcnow()))
        except Exception as exc:
            log_failure(log, f"{name}: not recorded", exc)
            self._not_recorded([o])
            return not is_outage(exc)
        if retry is not None:
            log.warning("%s: cannot be read, kept where it is: %s (attempt %d of %d%s)",
                        name, printable(str(o.unavailable)), retry.attempts,
                        policy.max_attempts, ", flagged stuck" if retry.stuck else "")
        return True

    # --- running ---------------------------------------------------------------------

    def start(self, watch: bool = True) -> None:
        """Start the scanning threads and the committer, and (``watch``) the sources'
        watchers."""
        loops = [(self._scan_loop, f"scan-{i}") for i in range(self._scanners)]
        for target, name in [*loops, (self._commit_loop, "commit")]:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.notifier is not None:
            self.notifier.start()
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
            for _ in range(self._scanners):
                self._jobs.put_nowait(None)
        self._outcomes.put(None)
        deadline = time.monotonic() + timeout
        scanners, committer = self._threads[:-1], self._threads[-1:]  # see start()
        for t in scanners:
            t.join(max(0.01, deadline - time.monotonic()))
        self._drop_unscanned()
        for t in committer:
            t.join(max(0.01, deadline - time.monotonic()))
        self._threads.clear()
        if self.notifier is not None:
            self.notifier.stop()  # after the last action: its notices go out first

    def _drop_unscanned(self) -> None:
        """Jobs still queued once the scanners ended (a source that submitted as they
        stopped): dropped, so that the commit loop does not wait for them (the mail stays
        where it is; the next start's sweep finds it)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _discard(job)
                self._forget((job.info.source, job.info.identity))

    def run_once(self) -> None:
        """Process what is there now (and what arrives meanwhile), then stop."""
        self.start()
        for source in self.sources.values():
            self.sweep(source)
        self.wait_idle()
        self.stop()

    def reconfigure(self, config: Config, client: Scanner,
                    sources: Iterable[Source]) -> None:
        """Switch to a new configuration (SIGHUP) without dropping work: sources that
        are new or changed start watching (and are swept at the next turn of
        :meth:`run_forever`), removed ones stop; messages in flight finish with the
        source that found them.  The scan pool's size is the one set at start-up."""
        new = {s.name: s for s in sources}
        for name, old in list(self.sources.items()):
            if name in new and new[name].src == old.src:
                new[name] = old  # unchanged: keep its watches and state
                continue
            try:
                old.stop()
            except Exception:
                log.exception("%s: error while stopping", name)
            self._retired[name] = old
        self.config = config
        self.service.client = client
        self.service.fingerprints.client = client
        started = [s for name, s in new.items() if self.sources.get(name) is not s]
        self.sources = new
        for source in started:
            self._retired.pop(source.name, None)
            source.busy = self._busy_in(source.name)
            source.start(self.submit)

    def run_forever(self, stop: threading.Event,
                    every: Callable[[], None] | None = None) -> None:
        """Run until ``stop`` is set: watchers, plus a sweep of each source at start-up
        and every ``sweep_interval`` seconds (missed events, retries, reconciliation).
        ``every`` is called from this thread about twice a second (reloads, systemd)."""
        self._stop_requested = stop
        self.start()
        next_sweep: dict[int, float] = {}  # by id(source): a replaced source is swept anew
        while not stop.is_set():
            for name, source in list(self.sources.items()):
                if time.monotonic() >= next_sweep.get(id(source), 0.0):
                    try:
                        self.sweep(source)
                    except Exception as exc:
                        log_failure(log, f"{name}: sweep failed, retrying at the next "
                                         "interval", exc)
                    next_sweep[id(source)] = time.monotonic() + source.src.sweep_interval
            if every is not None:
                try:
                    every()
                except Exception:
                    log.exception("unexpected error in the main loop; carrying on")
            stop.wait(0.5)
        log.info("stopping: finishing %d message(s) in flight", self.in_pipeline())
        self.stop()
