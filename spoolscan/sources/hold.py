"""The Postfix hold queue: watch ``hold/``, scan, then release or quarantine.

Postfix puts incoming mail on hold (``header_checks`` ``/^Received:/ HOLD``).  cleanup(8)
renames the still-open 0600 file into ``hold/``, then makes it 0700 and closes it, so a
file is taken only once its mode says it is ready (``IN_ATTRIB`` / ``IN_CLOSE_WRITE``
after ``IN_MOVED_TO``).  Files are read natively (``spoolscan.postfix.queuefile``) and
never written: mail leaves the hold queue only through ``postsuper``, whose per-ID output
is checked because it always exits 0.

*Identity.*  Short queue IDs are reused, so a held message is (myhostname, queue ID,
arrival time in microseconds, inode), never the queue ID alone.

*Parsed once, opened once.*  The envelope is read when the file is first looked at; the
scan, the hash and a quarantine copy then read the content of that same file (same inode,
checked) from one rewindable stream, without parsing the envelope again.  A file the
watcher looked at stays open until its scan (``KEEP_AHEAD`` of them at most: the watcher
waits for the scanners beyond that), so the scan does not ask the helper for it again.

*Releasing* (``release``): ``postsuper -H -`` for the batch, then one trigger to qmgr so
that released mail is delivered now rather than at the next queue run.

*Quarantining* (``quarantine``): the content is copied into the quarantine store (the
path recorded before acting), then ``postsuper -d`` removes the held file.

*Sweeps* (start-up, every ``sweep_interval``, inotify overflow) list ``hold/`` (hashed
subdirectories included) and reconcile it with the store (``sources.base``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from inotify_simple import flags as inflags

from spoolscan.addresses import domain_of
from spoolscan.broker import OPEN_BATCH, Broker
from spoolscan.config import Config, SourceConfig
from spoolscan.fsutil import OpenFile, UnsafeFile, close_files
from spoolscan.model import (
    ActionOutcome,
    ContentUnavailable,
    Job,
    MessageInfo,
    Opened,
    Pending,
    State,
    Trigger,
)
from spoolscan.postfix import commands
from spoolscan.postfix.queuedir import HoldEntry
from spoolscan.postfix.queuefile import Envelope, QueueFile, QueueFileError, QueueFileNotReady
from spoolscan.sources.base import (
    EventReader,
    Sighting,
    Source,
    Submit,
    done,
    failed,
    missing,
)
from spoolscan.store.repo import ActionRecord, Store
from spoolscan.text import printable

log = logging.getLogger(__name__)

KIND = "postfix-hold"
_WATCH_MASK = (inflags.CLOSE_WRITE | inflags.MOVED_TO | inflags.ATTRIB | inflags.CREATE
               | inflags.DELETE_SELF)
_FLUSH_THREADS = 4
#: Held files the watcher keeps open for jobs not yet scanned.  Beyond that it waits
#: (new arrivals wait in the kernel's inotify queue; an overflow there means a sweep), so
#: open descriptors stay bounded however large the burst.
KEEP_AHEAD = 64


def direction(sender: str, recipients: tuple[str, ...], local_domains: tuple[str, ...]) -> str:
    """inbound (to us from elsewhere), outbound (from us, leaving) or internal."""

    def local(address: str) -> bool:
        domain = domain_of(address)
        return domain is not None and any(domain == d or domain.endswith("." + d)
                                          for d in local_domains)

    if not local(sender):
        return "inbound" if any(local(r) for r in recipients) or not recipients else "outbound"
    return "internal" if recipients and all(local(r) for r in recipients) else "outbound"


@dataclass
class HeldFile:
    """A job's payload: which file in hold/ was looked at, and its envelope (None when
    the file could not be parsed)."""

    rel: str
    ino: int
    envelope: Envelope | None
    # The file as the watcher opened it, until the scan takes it, and what gives back
    # the keep slot it holds (the slot of the source that took it).
    kept: QueueFile | None = field(default=None, repr=False, compare=False)
    give_back: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def take(self) -> QueueFile | None:
        """The kept file (now the caller's to close), or None; its slot is given back."""
        kept, self.kept = self.kept, None
        give_back, self.give_back = self.give_back, None
        if give_back is not None:
            give_back()
        return kept

    def discard(self) -> None:
        """Close the kept file, if any, and give back its slot (twice is harmless)."""
        kept = self.take()
        if kept is not None:
            kept.close()


class _GuardedStream(io.RawIOBase):
    """A queue file's content stream whose format errors become ContentUnavailable
    (the file is checked when opened, but could still be truncated while read)."""

    def __init__(self, inner: io.RawIOBase) -> None:
        self.inner = inner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.inner.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        try:
            return self.inner.readinto(buffer) or 0
        except QueueFileError as exc:
            raise ContentUnavailable(str(exc)) from None

    def close(self) -> None:
        self.inner.close()
        super().close()


class HoldSource(Source):
    """One Postfix instance's hold queue.  See the module docstring."""

    kind = KIND
    held = True
    gone_reason = "left the hold queue without spoolscan"

    def __init__(self, src: SourceConfig, config: Config, store: Store, broker: Broker
                 ) -> None:
        super().__init__(src, config, store, broker)
        self.config_dir = src.config_directory
        self.queue_dir, self.host = broker.postfix_info(self.config_dir)
        self._watches: dict[int, str] = {}  # wd → directory relative to hold/
        self._keep_budget = threading.BoundedSemaphore(KEEP_AHEAD)

    # --- identity ---------------------------------------------------------------------------

    def _info(self, envelope: Envelope, ino: int) -> MessageInfo:
        usec = int(round(envelope.arrival_time * 1_000_000))
        return MessageInfo(
            source=self.name, kind=KIND,
            identity=f"{self.host}/{envelope.queue_id}/{usec}/{ino}",
            location=envelope.queue_id, queue_id=envelope.queue_id, host=self.host,
            sender=envelope.sender, recipients=envelope.recipients,
            direction=direction(envelope.sender, envelope.recipients,
                                self.config.policy.local_domains),
            arrived_at=datetime.fromtimestamp(envelope.arrival_time, UTC),
            client_address=envelope.client_address, helo=envelope.helo_name,
        )

    def _unreadable_info(self, entry: HoldEntry) -> MessageInfo:
        # No envelope to name it by: the inode and modification time stand in for the
        # arrival time, stable across sweeps so that retries and "stuck" are counted.
        qid = entry.queue_id
        return MessageInfo(
            source=self.name, kind=KIND,
            identity=f"{self.host}/{qid}/unreadable-{entry.mtime_ns}/{entry.ino}",
            location=qid, queue_id=qid, host=self.host,
        )

    def owns(self, row: dict) -> bool:
        """Held mail is this host's only if it was held here (its myhostname; a row
        without a host is taken as this host's, as before hosts shared a store)."""
        return row.get("host") in (None, self.host)

    def examine(self, entry: HoldEntry) -> Sighting | None:
        """The sighting of a ready held file as listed (None: not ready, gone or not
        ours)."""
        if not entry.ready:
            return None  # still being written: a later event or sweep takes it
        try:
            opened: OpenFile | Exception = self.broker.hold_open(self.queue_dir, entry.rel)
        except (OSError, UnsafeFile) as exc:
            opened = exc
        return self._examine_opened(entry, opened)

    def _look_at(self, rels: Sequence[str], keep: bool = False) -> Iterator[Sighting]:
        """The sightings of the held files named ``rels``, opened ``OPEN_BATCH`` at a
        time with one request to the helper (the open file says whether it is ready).
        What one file does (a bad name, a symlink, a file that cannot be parsed) is that
        file's own outcome; an exception here is the helper's or the configuration's,
        for the caller to report.  ``keep``: each readable file stays open in its
        sighting (``HeldFile.kept``) for the caller to keep for the scan or discard, as
        it comes (keeping one may wait for the scanners to make room)."""
        for start in range(0, len(rels), OPEN_BATCH):
            batch = rels[start:start + OPEN_BATCH]
            files = self.broker.hold_open_many(self.queue_dir, batch)
            k = 0
            try:
                for k, (rel, f) in enumerate(zip(batch, files, strict=True)):  # noqa: B007
                    sighting = self._examine_opened(rel, f, keep)  # f closed or kept
                    if sighting is not None:
                        yield sighting
            finally:  # an error or the caller stopping: the rest of the batch is closed
                close_files(files[k + 1:])

    def _examine_opened(self, entry: HoldEntry | str, opened: OpenFile | Exception,
                        keep: bool = False) -> Sighting | None:
        rel = entry.rel if isinstance(entry, HoldEntry) else entry
        if isinstance(opened, FileNotFoundError):
            return None
        if isinstance(opened, UnsafeFile):
            self.reporter.once(f"unsafe:{rel}", f"{self.name}: {opened}")
            return None
        if isinstance(opened, Exception):
            log.warning("%s: cannot open %s: %s", self.name, printable(rel), opened)
            return None
        if not isinstance(entry, HoldEntry):
            entry = HoldEntry(rel, opened.st.st_ino, opened.st.st_mode,
                              opened.st.st_mtime_ns)
            if not entry.ready:
                opened.close()
                return None
        path = f"{self.queue_dir}/hold/{entry.rel}"
        try:
            # The content is checked as it is read for scanning.
            qf = QueueFile.from_fd(opened.fd, path, check_content=False)
            try:
                info = self._info(qf.envelope, qf.stat.st_ino)
            except BaseException:
                qf.close()
                raise
            # Kept: the caller takes a keep slot for it, or closes it.
            held = HeldFile(entry.rel, qf.stat.st_ino, qf.envelope, kept=qf if keep else None)
            if not keep:
                qf.close()
            return Sighting(info.identity, (info, held))
        except QueueFileNotReady:
            return None
        except Exception as exc:  # QueueFileError, and any parser failure: one file only
            log.debug("%s: unreadable queue file: %s", path, exc)
            info = self._unreadable_info(entry)
            return Sighting(info.identity, (info, HeldFile(entry.rel, entry.ino, None)))

    # --- hooks: finding messages ------------------------------------------------------------

    def sightings(self) -> Iterator[Sighting]:
        names, strange = self.broker.hold_names(self.queue_dir)
        for rel in strange:
            # postsuper cannot act on it, so neither can we: leave it for an admin.
            self.reporter.once(f"strange:{rel}", f"{self.name}: hold/{rel}: not a Postfix "
                                                 "queue file (name or type); left alone")
        batch: list[str] = []
        for rel in _lines(names):
            batch.append(rel)
            if len(batch) == OPEN_BATCH:
                yield from self._look_at(batch)
                batch = []
        yield from self._look_at(batch)

    def backlog(self) -> tuple[int, float] | None:
        count, oldest_ns = self.broker.hold_backlog(self.queue_dir)
        if not count:
            return 0, 0.0
        return count, max(0.0, time.time() - oldest_ns / 1e9)

    def locate(self, row: dict) -> Sighting | None:
        queue_id = row["queue_id"] or row["location"] or ""
        for rel in self.broker.hold_find(self.queue_dir, queue_id):
            entry = self.broker.hold_stat(self.queue_dir, rel)
            if entry is None:
                continue
            sighting = self.examine(entry)
            if sighting is not None and sighting.identity == row["identity"]:
                return sighting
        return None

    def job(self, sighting: Sighting, trigger: Trigger = Trigger.ARRIVAL) -> Job:
        info, held = sighting.data
        return Job(info=info, open=lambda: self._open(held), trigger=trigger, payload=held,
                   discard=held.discard)

    # --- files kept open from the look to the scan ------------------------------------

    def _take_keep_budget(self) -> bool:
        """Wait for room to keep one more file open (False: stopping, do not keep)."""
        while not self._keep_budget.acquire(timeout=0.5):
            if self._stop.is_set():
                return False
        return True

    @contextlib.contextmanager
    def _open(self, held: HeldFile) -> Iterator[Opened]:
        """The content of the file looked at (same inode), as one rewindable stream."""
        # The file the watcher kept open if any (the same inode by construction).
        qf = held.take()
        if qf is None:
            qf = self._queue_file(held)
        with qf, _GuardedStream(qf.content()) as stream:
            yield Opened(stream=stream, size=qf.envelope.message_size)  # type: ignore[arg-type]

    def _queue_file(self, held: HeldFile) -> QueueFile:
        try:
            opened = self.broker.hold_open(self.queue_dir, held.rel)
        except FileNotFoundError:
            raise ContentUnavailable(f"{held.rel}: no longer in the queue", gone=True) from None
        except (UnsafeFile, OSError) as exc:
            raise ContentUnavailable(f"{held.rel}: {exc}") from None
        if opened.st.st_ino != held.ino:
            opened.close()
            raise ContentUnavailable(f"{held.rel}: replaced by another message", gone=True)
        try:
            return QueueFile.from_fd(opened.fd, f"{self.queue_dir}/hold/{held.rel}",
                                     check_content=False, envelope=held.envelope)
        except Exception as exc:  # QueueFileError, and any parser failure
            raise ContentUnavailable(str(exc)) from None

    # --- watching ----------------------------------------------------------------------------

    def start(self, submit: Submit) -> None:
        self._watch_in_background(self._watch_loop, submit)
        self._watch("")
        for rel in self.broker.hold_subdirs(self.queue_dir):
            self._watch(rel)
        log.info("%s: watching %s/hold", self.name, self.queue_dir)

    def _watch(self, rel: str) -> None:
        if self._watch_fd is None:
            return
        try:
            wd = self.broker.watch_hold(self._watch_fd, self.queue_dir, rel, _WATCH_MASK)
        except (OSError, UnsafeFile) as exc:
            log.error("%s: cannot watch hold/%s: %s (the periodic sweep still finds its "
                      "mail)", self.name, rel, exc)
            return
        self._watches[wd] = rel

    def _forget_watches(self) -> None:
        self._watches.clear()

    def _watch_loop(self, submit: Submit) -> None:
        if self._watch_fd is None:
            return  # the periodic sweeps still find the mail
        reader = EventReader(self._watch_fd)
        while not self._stop.is_set():
            try:
                events = reader.read(500)
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("%s: inotify read failed: %s", self.name, exc)
                self._stop.wait(1.0)
                continue
            overflow = False
            files: dict[str, None] = {}  # one look per file per read, in event order
            for event in events:
                if event.mask & inflags.Q_OVERFLOW:
                    overflow = True
                    continue
                directory = self._watches.get(event.wd)
                if directory is None or not event.name:
                    continue
                rel = f"{directory}/{event.name}" if directory else event.name
                if event.mask & inflags.ISDIR:
                    if event.mask & inflags.CREATE:  # hash_queue_names gained "hold"
                        self._watch(rel)
                        overflow = True  # files may have landed before the watch: sweep
                    continue
                files[rel] = None
            try:
                self._arrived(list(files), submit)
                if overflow:
                    log.warning("%s: inotify events were lost or a directory appeared; "
                                "sweeping hold/", self.name)
                    for job in self.sweep():
                        submit(job)
            except Exception:
                # The watcher must outlive a database outage; the mail stays on hold and
                # the periodic sweep takes whatever was missed here.
                log.exception("%s: new mail not looked at now (the next sweep will)",
                              self.name)

    def _arrived(self, rels: list[str], submit: Submit) -> None:
        for sighting in self._look_at(rels, keep=True):
            # cleanup's chmod (IN_ATTRIB) and close (IN_CLOSE_WRITE) both announce one
            # arrival: hand it over once.
            job, handed = self.job(sighting), False
            held: HeldFile = job.payload
            try:
                if self.handed.claim(sighting.identity, None):
                    self.stats["arrived"] += 1
                    # Kept open for the scan only with a slot (a duplicate never waits
                    # for one); without (stopping), the scan opens it again.
                    if self._take_keep_budget():
                        held.give_back = self._keep_budget.release
                    else:
                        held.discard()
                    handed = True
                    submit(job)  # from here the pipeline discards what it drops
            finally:
                if not handed:
                    held.discard()

    # --- acting --------------------------------------------------------------------------

    def _still_ours(self, p: Pending) -> bool:
        """The held file is still the one scanned (queue IDs are reused)."""
        return p in self._ours([p])

    def _ours(self, items: list[Pending]) -> list[Pending]:
        """Those of ``items`` whose held file is still the one scanned (queue IDs are
        reused), asked of the helper in one request."""
        helds: list[HeldFile] = [p.outcome.job.payload for p in items]
        entries = self.broker.hold_stat_many(self.queue_dir, [h.rel for h in helds])
        return [p for p, h, e in zip(items, helds, entries, strict=True)
                if e is not None and e.ino == h.ino]

    def release(self, items: list[Pending]) -> list[ActionRecord]:
        records, released = self._postsuper(items, self.broker.postsuper_release, "release")
        self._deliver_now(sorted(released))
        return records

    def delete(self, items: list[Pending]) -> list[ActionRecord]:
        records, _ = self._postsuper(items, self.broker.postsuper_delete, "remove")
        return records

    def quarantine(self, items: list[Pending]) -> list[ActionRecord]:
        copied: list[Pending] = []
        records: list[ActionRecord] = []
        for p in items:
            if not self._still_ours(p):
                records.append(missing(p, "no longer in the hold queue"))
                continue
            try:
                self._copy_to_quarantine(p)
            except (OSError, ContentUnavailable, UnsafeFile) as exc:
                records.append(failed(p, f"cannot write the quarantine copy: {exc}"))
                continue
            copied.append(p)
        removed, _ = self._postsuper(copied, self.broker.postsuper_delete, "remove")
        for p, r in zip(copied, removed, strict=True):
            records.append(ActionRecord(
                r.message_id, r.scan_id, r.action, r.outcome, r.detail, state=r.state,
                quarantine_path=p.target, original_path=f"hold/{p.outcome.job.payload.rel}"))
        return records

    def _postsuper(self, items: list[Pending], run, verb: str  # type: ignore[no-untyped-def]
                   ) -> tuple[list[ActionRecord], set[str]]:
        """One postsuper run for the items still on hold; a record per item (in the
        order of ``items``) from what postsuper said it did (it exits 0 whatever
        happened).  Returns the records and the queue IDs postsuper confirmed."""
        ours = {id(p) for p in self._ours(items)}
        ids = [p.outcome.info.queue_id or "" for p in items if id(p) in ours]
        error: str | None = None
        confirmed: set[str] = set()
        if ids:
            try:
                confirmed = run(self.config_dir, ids)
            except commands.PostfixCommandError as exc:
                error = str(exc)
        records = []
        for p in items:
            if id(p) not in ours:
                records.append(missing(p, "no longer in the hold queue"))
            elif error is not None:
                records.append(failed(p, error))
            elif p.outcome.info.queue_id in confirmed:
                records.append(done(p))
            elif self._still_ours(p):
                records.append(failed(p, f"postsuper did not {verb} it"))
            else:
                records.append(missing(p, "no longer in the hold queue"))
        return records, confirmed

    def _deliver_now(self, ids: list[str]) -> None:
        """Released mail waits in deferred/ for the next queue run unless qmgr is told:
        one trigger for the batch, or postqueue -i per message if qmgr cannot be reached."""
        try:
            if ids and not self.broker.wake_qmgr(self.queue_dir):
                self._flush(ids)
        except Exception as exc:  # released already: delivery just waits for the queue run
            log.warning("%s: could not ask for immediate delivery of %d released "
                        "message(s): %s", self.name, len(ids), exc)

    def _flush(self, ids: list[str]) -> None:
        if len(ids) == 1:
            self.broker.flush(self.config_dir, ids)
            return
        with ThreadPoolExecutor(max_workers=_FLUSH_THREADS) as pool:
            list(pool.map(lambda qid: self.broker.flush(self.config_dir, [qid]), ids))

    def _copy_to_quarantine(self, p: Pending) -> None:
        """The scanned content (same file) into the quarantine store, durably."""
        assert p.target is not None
        info = p.outcome.info
        held: HeldFile = p.outcome.job.payload
        meta = {
            "message_id": p.message_id, "scan_id": p.scan_id, "source": self.name,
            "kind": KIND, "host": info.host, "queue_id": info.queue_id,
            "sender": info.sender, "recipients": list(info.recipients),
            "direction": info.direction,
            "arrived_at": info.arrived_at.isoformat() if info.arrived_at else None,
            "signature": p.outcome.result.signature, "verdict": p.outcome.result.verdict,
            "content_sha256": info.content_hash, "config_directory": self.config_dir,
            "quarantined_at": datetime.now(UTC).isoformat(),
        }
        with self._queue_file(held) as qf, _GuardedStream(qf.content()) as stream:
            self.quarantine_store.put(p.target, stream, meta)  # type: ignore[arg-type]

    def completed(self, row: dict, intent: dict) -> ActionRecord | None:
        action = intent["action"]
        path = intent["quarantine_path"]
        if action == "quarantine" and not (path and self.quarantine_store.exists(path)):
            return None  # left the queue, but not into our store: someone else did that
        if action == "release":
            # Released, but maybe not yet asked for immediate delivery: ask (harmless if
            # it was delivered already).
            self._deliver_now([row["queue_id"]] if row["queue_id"] else [])
        return ActionRecord(row["id"], intent["scan_id"], action, ActionOutcome.OK,
                            "completed before a restart (reconciled)", state=State.DONE,
                            quarantine_path=path)


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` one at a time (``splitlines`` would hold them all at once:
    ~7 MB for the names of a backlog of 100,000)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        yield text[start:end]
        start = end + 1
