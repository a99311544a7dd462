"""The Maildir source: watch mailboxes, sweep them, quarantine or delete infected mail.

*Watching.*  Every Maildir root matching the source's ``paths`` globs gets a recursive
watchdog (inotify) watch, which covers ``new/``, ``cur/`` and the Maildir++ folders
(``.Name``), including folders created later.  A message arrives by rename (Dovecot,
possibly straight into ``cur/`` with ``:2,FLAGS``: a *moved* event) or by link (Postfix
``local``/``virtual``: a *created* event).  ``tmp/``, ``.Quarantine``, dot-files and
renames of a message within its folder (``new/X`` → ``cur/X:2,S``, flag changes) are
ignored.  Symlinks are never followed; other non-regular files are skipped with a log line.

The watchdog thread only files events into a bounded queue and never blocks; a thread of
ours turns them into jobs and submits them (submitting blocks while the pipeline is full).
When events are lost (the kernel's inotify queue overflowed, which watchdog only logs, or
our own queue was full) this thread sweeps all mailboxes at once.  The periodic sweep the
worker runs is the safety net for everything else.

*Identity.*  ``<folder path>/<unique part>``: stable across Dovecot's renames.  A job whose
file was renamed meanwhile finds it again by its unique part before giving up.

*Deduplication.*  Besides the worker's own rule (one job per message in the pipeline), the
source remembers for a while which messages it handed over and when: a sweep does not hand
over again a message whose stored row is older than that (its job is still under way), and
a late event does not rescan a message a sweep already handed over.

*Acting.*  ``quarantine = "folder"`` moves the file into the mailbox's ``.Quarantine``
Maildir++ folder under the same name (so with its flags); ``"store"`` moves it to
``<quarantine directory>/<YYYYMMDD>/<message id>-<unique part>`` (UTC date, 0700
directories, 0600 file).  Moves are ``rename(2)`` on one filesystem, else copy into a
temporary file, fsync, rename into place, then unlink the original.  The file moved must be
the one scanned (same inode), else nothing is done and the message is scanned again.

*Reconciling.*  The sweep marks open messages (not ``done``/``gone``) that are no longer in
their folder as gone, except those whose pending quarantine or delete (the intent the
worker records before acting) did happen before an interruption: those are recorded as
done, with where the file went.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import logging
import os
import queue
import shutil
import stat
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from watchdog.events import (
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from spoolscan import maildir
from spoolscan.config import Config, SourceConfig
from spoolscan.maildir import QUARANTINE_FOLDER, MaildirMessage
from spoolscan.policy import DELETE, QUARANTINE
from spoolscan.scanning import ContentUnavailable, Job, Opened, open_file
from spoolscan.store.repo import (
    DONE,
    GONE,
    RETRY,
    STUCK,
    ActionRecord,
    MessageInfo,
    Store,
    as_utc,
    utcnow,
)

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver, ObservedWatch

    from spoolscan.worker import Pending

log = logging.getLogger(__name__)

EVENT_QUEUE_SIZE = 10_000  # events waiting for our thread; more are dropped, then swept
LOOKUP_BATCH = 500  # messages looked up in the store at once by a sweep
RECENT_WINDOW = 600.0  # seconds a handed-over message counts as under way
RECENT_MAX = 200_000  # at most this many remembered (oldest forgotten first)
REPORTED_MAX = 10_000  # skipped paths whose warning is not repeated at every sweep
WATCHDOG_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


@dataclass
class MaildirItem:
    """A job's payload: the message (updated when found under a new name), its mailbox
    root, and the inode of the file that was scanned."""

    message: MaildirMessage
    root: Path
    inode: tuple[int, int] | None = None


class _Gone(Exception):
    """The message is no longer anywhere in its folder."""


class _Refused(Exception):
    """The file is not the one that was scanned (replaced, not a regular file)."""


def _moved(msg: MaildirMessage, path: Path) -> MaildirMessage:
    return replace(msg, path=path, subdir=path.parent.name)


@contextlib.contextmanager
def _open_job(job: Job) -> Iterator[Opened]:
    """Open a job's file; if it was renamed meanwhile (``new/X`` → ``cur/X:2,S``), find it
    again by its unique part.  Records the inode scanned and the current location."""
    item: MaildirItem = job.payload
    with contextlib.ExitStack() as stack:
        opened: Opened | None = None
        for _ in range(3):
            try:
                opened = stack.enter_context(open_file(item.message.path))
                break
            except ContentUnavailable as exc:
                if not exc.gone:
                    raise
                found = maildir.find_current(item.message)
                if found is None or found == item.message.path:
                    raise
                item.message = _moved(item.message, found)
        if opened is None or opened.fd is None:
            raise ContentUnavailable(f"{item.message.path}: renamed again and again")
        st = os.fstat(opened.fd)
        item.inode = (st.st_dev, st.st_ino)
        if job.info.location != str(item.message.path):
            job.info = replace(job.info, location=str(item.message.path))
        yield opened


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread (holding its lock): files events, never blocks."""

    def __init__(self, source: MaildirSource, root: Path) -> None:
        self.source = source
        self.root = root

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.source._event(self.root, os.fsdecode(event.src_path), None)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.source._event(self.root, os.fsdecode(event.dest_path),
                               os.fsdecode(event.src_path))


class _OverflowHook(logging.Handler):
    """watchdog reports a kernel queue overflow only in its log: listen there."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.callback("the inotify event queue overflowed")


class _ShutdownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


class MaildirSource:
    """Maildir mailboxes as a :class:`spoolscan.worker.Source`."""

    held = False

    def __init__(self, src: SourceConfig, config: Config, store: Store) -> None:
        self.src = src
        self.config = config
        self.store = store
        self.name = src.name
        self.stats: Counter[str] = Counter()
        self._events: queue.Queue[tuple[Path, MaildirMessage]] = queue.Queue(EVENT_QUEUE_SIZE)
        self._rescan = threading.Event()  # events were lost: sweep now
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._hook: _OverflowHook | None = None
        self._feeder: threading.Thread | None = None
        self._watch_lock = threading.Lock()
        self._watches: dict[Path, tuple[ObservedWatch, tuple[int, int]]] = {}
        self._unwatchable: set[Path] = set()
        self._recent_lock = threading.Lock()
        self._recent: OrderedDict[str, float] = OrderedDict()  # identity → handed over at
        self._reported: OrderedDict[str, None] = OrderedDict()

    # --- watching --------------------------------------------------------------------

    def start(self, submit: Callable[[Job], bool]) -> None:
        """Watch every mailbox; submit a job for each message that arrives."""
        self._stop.clear()
        # watchdog warns when a directory made inside a recursive watch (a new Maildir++
        # folder with its tmp/new/cur) gets watched twice, for its parent's event and for
        # its own: harmless, and nothing for the admin to act on.
        warnings.filterwarnings("ignore", message=r"Callback with id .* already exists for "
                                r"watch", category=RuntimeWarning)
        with self._recent_lock:
            self._recent.clear()
        try:
            observer = Observer()  # the inotify instance (and its queue size) is made here
            observer.start()
        except OSError as exc:
            log.error("%s: cannot watch the mailboxes (%s): new mail is found by the sweeps "
                      "only, every %gs", self.name, exc, self.src.sweep_interval)
            observer = None
        self._observer = observer
        if observer is not None:
            self._hook = _OverflowHook(self._lost)
            logging.getLogger(WATCHDOG_OVERFLOW_LOGGER).addHandler(self._hook)
        roots = maildir.find_roots(self.src.paths)
        self._sync_watches(roots)
        self._feeder = threading.Thread(target=self._feed, args=(submit,),
                                        name=f"maildir-{self.name}", daemon=True)
        self._feeder.start()
        log.info("%s: watching %d of %d mailbox(es) matching %s", self.name,
                 len(self._watches), len(roots), ", ".join(self.src.paths))

    def stop(self) -> None:
        """Stop watching.  Events not yet turned into jobs are dropped (the next sweep,
        at the latest at the next start, finds their messages)."""
        self._stop.set()
        observer, self._observer = self._observer, None
        if observer is not None:
            # watchdog's emitters may log an error when stopped while reading: not ours.
            watchdog_log = logging.getLogger("watchdog.observers.inotify")
            noise = _ShutdownNoise()
            watchdog_log.addFilter(noise)
            try:
                observer.stop()
                observer.join(timeout=10)
            finally:
                watchdog_log.removeFilter(noise)
        if self._hook is not None:
            logging.getLogger(WATCHDOG_OVERFLOW_LOGGER).removeHandler(self._hook)
            self._hook = None
        if self._feeder is not None:
            self._feeder.join(timeout=10)
            self._feeder = None
        with self._watch_lock:
            self._watches.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                self._events.get_nowait()

    def watched(self) -> list[Path]:
        """The mailbox roots being watched now."""
        with self._watch_lock:
            return sorted(self._watches)

    def _sync_watches(self, roots: list[Path]) -> None:
        """Watch new roots (and roots replaced since), forget vanished ones."""
        observer = self._observer
        if observer is None:
            return
        with self._watch_lock:
            for root in set(self._watches) - set(roots):
                self._unwatch(observer, root)
            for root in roots:
                self._watch(observer, root)

    def _watch(self, observer: BaseObserver, root: Path) -> None:
        try:
            st = os.stat(root)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        current = self._watches.get(root)
        if current is not None:
            if current[1] == key:
                return
            self._unwatch(observer, root)  # deleted and made again: a new directory
        try:
            watch = observer.schedule(_Handler(self, root), str(root), recursive=True,
                                      event_filter=[FileCreatedEvent, FileMovedEvent])
        except OSError as exc:
            if root not in self._unwatchable:
                hint = ""
                if exc.errno == errno.ENOSPC:
                    hint = " (raise the sysctl fs.inotify.max_user_watches)"
                elif exc.errno == errno.EMFILE:
                    hint = " (raise the sysctl fs.inotify.max_user_instances)"
                log.error("%s: cannot watch %s: %s%s; it is covered by the sweeps only, "
                          "every %gs", self.name, root, exc, hint, self.src.sweep_interval)
            self._unwatchable.add(root)
            return
        self._unwatchable.discard(root)
        self._watches[root] = (watch, key)
        log.debug("%s: watching %s", self.name, root)

    def _unwatch(self, observer: BaseObserver, root: Path) -> None:
        watch, _ = self._watches.pop(root)
        try:
            observer.unschedule(watch)
        except Exception as exc:  # already gone with its directory
            log.debug("%s: unwatching %s: %r", self.name, root, exc)

    def _event(self, root: Path, path: str, src_path: str | None) -> None:
        """A file appeared (created or renamed into place) under ``root``."""
        try:
            msg = maildir.message_in(Path(path), root)
            if msg is None:
                return
            if src_path:
                before = maildir.message_in(Path(src_path), root)
                if before is not None and (before.folder, before.unique) == (msg.folder,
                                                                             msg.unique):
                    return  # the same message, renamed in its folder (seen, flags)
            self._events.put_nowait((root, msg))
        except queue.Full:
            self._lost("too many events waiting")
        except Exception:  # never let watchdog's thread die: it would stop all events
            log.exception("%s: cannot handle the event for %s", self.name, path)

    def _lost(self, why: str) -> None:
        self.stats["events_lost"] += 1
        if not self._rescan.is_set():
            log.warning("%s: %s: events were lost; sweeping all mailboxes", self.name, why)
            self._rescan.set()

    def _feed(self, submit: Callable[[Job], bool]) -> None:
        while not self._stop.is_set():
            if self._rescan.is_set():
                self._rescan.clear()
                try:
                    for swept in self.sweep():
                        if self._stop.is_set():
                            break
                        submit(swept)
                except Exception:
                    log.exception("%s: sweep after lost events failed", self.name)
                continue
            try:
                root, msg = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                job = self._arrived(root, msg)
                if job is not None:
                    submit(job)
            except Exception:
                log.exception("%s: %s: cannot handle", self.name, msg.path)

    def _arrived(self, root: Path, msg: MaildirMessage) -> Job | None:
        """The job for a message just delivered, or None (not a regular file, gone, or
        already handed over)."""
        try:
            st = os.lstat(msg.path)
        except FileNotFoundError:
            found = maildir.find_current(msg)
            if found is None:
                log.debug("%s: gone before it could be looked at", msg.path)
                return None
            msg = _moved(msg, found)
            try:
                st = os.lstat(found)
            except OSError:
                return None
        if not stat.S_ISREG(st.st_mode):
            self._skip(str(msg.path), "symlink" if stat.S_ISLNK(st.st_mode)
                       else "not a regular file")
            return None
        if not self._claim(msg.identity, None):
            return None
        self.stats["arrived"] += 1
        return self._job(msg, root)

    def _skip(self, path: str, kind: str) -> None:
        self.stats["skipped"] += 1
        with self._recent_lock:
            if path in self._reported:
                return
            self._reported[path] = None
            while len(self._reported) > REPORTED_MAX:
                self._reported.popitem(last=False)
        log.warning("%s: skipped (%s; never followed or scanned)", path, kind)

    # --- what was handed over recently -------------------------------------------------

    def _claim(self, identity: str, row: dict | None) -> bool:
        """True if a job for ``identity`` should be handed over now, and remember that it
        is.  False while an earlier job for it is under way: handed over recently, and the
        stored ``row`` (None: not looked up, or no row) does not yet show its result."""
        now = time.time()
        with self._recent_lock:
            since = self._recent.get(identity)
            if since is not None and now - since < RECENT_WINDOW:
                updated = as_utc(row["updated_at"]) if row is not None else None
                if updated is None or updated.timestamp() < since:
                    return False
            self._recent[identity] = now
            self._recent.move_to_end(identity)
            while self._recent:
                oldest = next(iter(self._recent.values()))
                if len(self._recent) <= RECENT_MAX and now - oldest < RECENT_WINDOW:
                    break
                self._recent.popitem(last=False)
        return True

    def _under_way(self, row: dict) -> bool:
        with self._recent_lock:
            since = self._recent.get(row["identity"])
        if since is None or time.time() - since >= RECENT_WINDOW:
            return False
        updated = as_utc(row["updated_at"])
        return updated is None or updated.timestamp() < since

    # --- jobs ------------------------------------------------------------------------

    def _job(self, msg: MaildirMessage, root: Path, attempts: int = 0,
             trigger: str = "arrival") -> Job:
        info = MessageInfo(source=self.name, kind="maildir", identity=msg.identity,
                           location=str(msg.path))
        job = Job(info=info, open=lambda: open_file(msg.path), trigger=trigger,
                  payload=MaildirItem(msg, root), attempts=attempts)
        job.open = functools.partial(_open_job, job)
        return job

    def _root_for(self, folder: Path) -> Path:
        with self._watch_lock:
            known = set(self._watches)
        if folder in known:
            return folder
        if folder.parent in known:
            return folder.parent
        return maildir.root_of(folder)

    def job_for(self, row: dict, trigger: str) -> Job | None:
        """A job to rescan a stored message, or None if it is no longer in its folder."""
        folder_name, _, unique = row["identity"].rpartition("/")
        folder = Path(folder_name)
        location = Path(row["location"]) if row.get("location") else folder / "new" / unique
        msg = MaildirMessage(path=location, folder=folder, subdir=location.parent.name,
                             unique=unique)
        path: Path | None = None
        if location.parent.parent == folder and location.parent.name in maildir.SUBDIRS:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(location).st_mode):
                    path = location
        if path is None:
            path = maildir.find_current(msg)
            if path is None:
                return None
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    return None
            except OSError:
                return None
        return self._job(_moved(msg, path), self._root_for(folder),
                         attempts=row.get("attempts") or 0, trigger=trigger)

    # --- sweeping --------------------------------------------------------------------

    def sweep(self) -> Iterator[Job]:
        """Jobs for every message that needs work; then marks vanished messages gone.

        Re-reads the globs (and watches new mailboxes), walks every folder, looks the
        messages up in the store by batches and hands over those that need work (see
        ``_wants_work``): unknown messages, verdicts not acted on, retries that are due.
        """
        roots = maildir.find_roots(self.src.paths)
        self._sync_watches(roots)
        seen = handed = 0
        batch: list[tuple[Path, MaildirMessage]] = []
        for root in roots:
            for folder in maildir.folders(root):
                for msg in maildir.iter_folder(folder, skipped=self._skip):
                    seen += 1
                    batch.append((root, msg))
                    if len(batch) >= LOOKUP_BATCH:
                        for job in self._due(batch):
                            handed += 1
                            yield job
                        batch = []
        for job in self._due(batch):
            handed += 1
            yield job
        gone = self._mark_gone()
        self.stats["swept"] += 1
        (log.info if handed or gone else log.debug)(
            "%s: sweep: %d mailbox(es), %d message(s), %d to scan, %d gone", self.name,
            len(roots), seen, handed, gone)

    def _due(self, batch: list[tuple[Path, MaildirMessage]]) -> Iterator[Job]:
        if not batch:
            return
        rows = self.store.messages_by_identity(self.name, [m.identity for _, m in batch])
        now = utcnow()
        for root, msg in batch:
            row = rows.get(msg.identity)
            if row is not None and not _wants_work(row, now):
                continue
            if not self._claim(msg.identity, row):
                continue
            yield self._job(msg, root, attempts=row["attempts"] if row else 0)

    def _present(self, row: dict) -> bool:
        folder_name, _, unique = row["identity"].rpartition("/")
        folder = Path(folder_name)
        location = Path(row["location"])
        if location.parent.parent == folder and os.path.lexists(location):
            return True
        msg = MaildirMessage(path=location, folder=folder, subdir=location.parent.name,
                             unique=unique)
        return maildir.find_current(msg) is not None

    def _mark_gone(self) -> int:
        """Open messages of this source no longer in their folder: a quarantine or delete
        interrupted after the file was moved (pending action) is recorded as done, the
        others are marked gone.  Returns how many were marked gone."""
        missing = [row for row in self.store.open_messages(self.name)
                   if not self._present(row)]
        if not missing:
            return 0
        fresh = self.store.messages_by_identity(self.name, [r["identity"] for r in missing])
        confirmed = []
        for row in missing:
            now = fresh.get(row["identity"])
            if (now is None or (now["state"], now["updated_at"]) != (row["state"],
                                                                   row["updated_at"])
                    or self._under_way(now) or self._present(now)):
                continue  # changed meanwhile (acted on, rescanned...): not ours to decide
            confirmed.append(now)
        if not confirmed:
            return 0
        last = self.store.last_actions([r["id"] for r in confirmed])
        finished: list[ActionRecord] = []
        gone: list[int] = []
        for row in confirmed:
            action = last.get(row["id"])
            if action is not None and action["outcome"] == "pending":
                requested = as_utc(action["requested_at"])
                if requested is not None and (utcnow() - requested).total_seconds() < 60:
                    continue  # being carried out right now, most likely
                record = self._finished(row, action)
                if record is not None:
                    log.info("%s: %s completed before an interruption (%s)",
                             row["location"], record.action,
                             record.quarantine_path or "deleted")
                    finished.append(record)
                    continue
            gone.append(row["id"])
            log.info("%s: gone (no longer in the mailbox; was %s)", row["location"],
                     row["state"])
        self.store.record_actions(finished)
        self.store.set_state(gone, GONE, "no longer in the mailbox")
        return len(gone)

    def _finished(self, row: dict, action: dict) -> ActionRecord | None:
        """The record of a pending quarantine or delete that did happen, or None."""
        ids = (row["id"], action["scan_id"])
        if action["action"] == DELETE:
            return ActionRecord(*ids, DELETE, "ok", "done before an interruption",
                                state=DONE, original_path=row["location"])
        if action["action"] != QUARANTINE:
            return None
        folder_name, _, unique = row["identity"].rpartition("/")
        qfolder = self._root_for(Path(folder_name)) / QUARANTINE_FOLDER
        where = maildir.find_current(MaildirMessage(path=qfolder / "new" / unique,
                                                    folder=qfolder, subdir="new",
                                                    unique=unique))
        if where is None:
            base = glob.escape(self.config.quarantine.directory)
            name = glob.escape(f"{row['id']}-{unique}")
            matches = sorted(glob.glob(os.path.join(base, "*", name)))
            where = Path(matches[0]) if matches else None
        if where is None:
            return None
        return ActionRecord(*ids, QUARANTINE, "ok", "moved before an interruption",
                            state=DONE, quarantine_path=str(where),
                            original_path=row["location"], location=str(where))

    # --- acting ----------------------------------------------------------------------

    def act(self, items: list[Pending]) -> list[ActionRecord]:
        """Quarantine or delete; one record each (ok, gone, or failed → retry)."""
        records = []
        for p in items:
            item: MaildirItem = p.outcome.job.payload
            action = p.decision.action
            ids = (p.stored.message_id, p.stored.scan_id)
            original = str(item.message.path)
            try:
                if action == QUARANTINE:
                    src, dest = self._quarantine(item, p.stored.message_id)
                    records.append(ActionRecord(
                        *ids, action, "ok", p.decision.reason, state=DONE,
                        quarantine_path=str(dest), original_path=str(src),
                        location=str(dest)))
                elif action == DELETE:
                    src = self._with_current(item, _unlink)
                    records.append(ActionRecord(*ids, action, "ok", p.decision.reason,
                                                state=DONE, original_path=str(src)))
                else:
                    records.append(ActionRecord(*ids, action, "failed",
                                                f"{action} is not possible in a mailbox",
                                                state=STUCK, original_path=original))
            except _Gone as exc:
                records.append(ActionRecord(*ids, action, "gone", str(exc), state=GONE,
                                            original_path=original))
            except (_Refused, OSError) as exc:
                detail = str(exc)
                if isinstance(exc, OSError) and exc.strerror:
                    detail = f"{exc.filename or original}: {exc.strerror}"
                records.append(ActionRecord(*ids, action, "failed", detail, state=RETRY,
                                            original_path=original))
        return records

    def _with_current(self, item: MaildirItem, operation: Callable[[Path], None]) -> Path:
        """Run ``operation`` on the file scanned, found again if renamed; its path."""
        for _ in range(3):
            path = _current(item)
            try:
                operation(path)
                return path
            except FileNotFoundError:
                if os.path.lexists(path):
                    raise  # the destination is missing, not the message
        raise _Gone(f"{item.message.path}: keeps being renamed")

    def _quarantine(self, item: MaildirItem, message_id: int) -> tuple[Path, Path]:
        dest: Path | None = None

        def move(src: Path) -> None:
            nonlocal dest
            if self.src.quarantine == "store":
                base = Path(self.config.quarantine.directory)
                day = base / utcnow().strftime("%Y%m%d")
                _private_dir(base)
                _private_dir(day)
                dest = _free_name(day, f"{message_id}-{item.message.unique}")
                _move(src, dest, day, mode=0o600)
            else:
                folder = item.root / QUARANTINE_FOLDER
                maildir.ensure_folder(folder, like=item.root)
                dest = _free_name(folder / src.parent.name, src.name)
                _move(src, dest, folder / "tmp", mode=None)

        src = self._with_current(item, move)
        assert dest is not None
        log.debug("%s: moved to %s", src, dest)
        return src, dest


# --- helpers ---------------------------------------------------------------------------


def _wants_work(row: dict, now: datetime) -> bool:
    """Whether a message present in its folder, with this stored row, needs a job.

    ``done``: no.  ``retry`` (and ``stuck``, retried now and then at the longest back-off
    when the policy sets a time): once ``next_attempt_at`` has come.  ``verdict`` and
    ``acting`` (committed, not acted on: the cache answers the rescan), ``gone`` (it is
    back) and anything else: yes.
    """
    state = row["state"]
    if state == DONE:
        return False
    if state in (RETRY, STUCK):
        due = as_utc(row["next_attempt_at"])
        if due is None:
            return state == RETRY
        return due <= now
    return True




def _current(item: MaildirItem) -> Path:
    """The path of the file that was scanned, found again by unique part if renamed."""
    for _ in range(3):
        path = item.message.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            found = maildir.find_current(item.message)
            if found is None:
                raise _Gone(f"{path}: no longer exists") from None
            item.message = _moved(item.message, found)
            continue
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{path}: not a regular file any more; not touched")
        if item.inode is not None and (st.st_dev, st.st_ino) != item.inode:
            raise _Refused(f"{path}: replaced since it was scanned; not touched, it will "
                           "be scanned again")
        return path
    raise _Gone(f"{item.message.path}: keeps being renamed")


def _unlink(path: Path) -> None:
    os.unlink(path)
    _fsync_dir(path.parent)


def _free_name(directory: Path, name: str) -> Path:
    """``directory/name``, or ``directory/q<n>-name`` if taken (never overwrite)."""
    candidate = directory / name
    n = 0
    while os.path.lexists(candidate):
        n += 1
        candidate = directory / f"q{n}-{name}"
    return candidate


def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 if missing."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move(src: Path, dest: Path, tmpdir: Path, mode: int | None) -> None:
    """Move ``src`` to ``dest``: rename, or (other filesystem) copy into ``tmpdir``, fsync,
    rename into place, unlink ``src``.  ``mode``: the new file's mode (None: keep)."""
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(src, dest, tmpdir, mode)
        return
    if mode is not None:
        os.chmod(dest, mode)
    _fsync_dir(dest.parent)
    if src.parent != dest.parent:
        _fsync_dir(src.parent)


def _copy_across(src: Path, dest: Path, tmpdir: Path, mode: int | None) -> None:
    tmp = tmpdir / f"{time.time_ns()}.P{os.getpid()}.spoolscan-{dest.name}"
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(src_fd)
        new_mode = stat.S_IMODE(st.st_mode) if mode is None else mode
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, new_mode)
        try:
            try:
                with open(src_fd, "rb", closefd=False) as fin, \
                        open(dst_fd, "wb", closefd=False) as fout:
                    shutil.copyfileobj(fin, fout, 1024 * 1024)
                os.fchmod(dst_fd, new_mode)
                if mode is None and os.geteuid() == 0:
                    os.fchown(dst_fd, st.st_uid, st.st_gid)
                # Keep the delivery time: IMAP servers show it as the received date.
                os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
            os.rename(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(dest.parent)
        os.unlink(src)
        _fsync_dir(src.parent)
    finally:
        os.close(src_fd)
