"""The Postfix hold queue as a source: watch ``hold/``, scan, release or quarantine.

Postfix puts incoming mail on hold (``header_checks`` ``/^Received:/ HOLD``).  cleanup(8)
renames the still-open 0600 file into ``hold/``, then makes it 0700 and closes it, so a
file is taken only once its mode says it is ready (``IN_ATTRIB`` / ``IN_CLOSE_WRITE``
after ``IN_MOVED_TO``).  Files are read natively (``spoolscan.postfix.queuefile``) and
never written: mail leaves the hold queue only through ``postsuper``, whose per-ID output
is checked because it always exits 0.

Identity: short queue IDs are reused, so a held message is (myhostname, queue ID, arrival
time in microseconds, inode), never the queue ID alone.

inotify can overflow and a stopped worker misses events: a sweep at start-up and every
``sweep_interval`` lists ``hold/`` (hashed subdirectories included) and reconciles it with
the store: unknown messages are scanned, a message whose verdict was committed but not
acted on (a crash in between) goes through again (the verdict cache answers), retries
come when due, and messages that vanished are recorded as gone.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from inotify_simple import INotify
from inotify_simple import flags as inflags

from spoolscan.config import Config, SourceConfig
from spoolscan.policy import DELETE, QUARANTINE, RELEASE
from spoolscan.postfix import commands
from spoolscan.postfix.queuefile import QueueFile, QueueFileError, QueueFileNotReady
from spoolscan.scanning import ContentUnavailable, Job, Opened
from spoolscan.store.repo import (
    ACTING,
    DONE,
    GONE,
    RETRY,
    SEEN,
    STUCK,
    VERDICT,
    ActionRecord,
    MessageInfo,
    Store,
    as_utc,
    utcnow,
)
from spoolscan.worker import Pending, log_failure

log = logging.getLogger(__name__)

KIND = "postfix-hold"
_WATCH_MASK = (inflags.CLOSE_WRITE | inflags.MOVED_TO | inflags.ATTRIB | inflags.CREATE
               | inflags.DELETE_SELF)
_LOOKUP_BATCH = 500
_FLUSH_THREADS = 4
_RECENT_SECONDS = 60.0
_RECENT_MAX = 10_000


def direction(sender: str, recipients: tuple[str, ...], local_domains: tuple[str, ...]) -> str:
    """inbound (to us from elsewhere), outbound (from us, leaving) or internal."""

    def local(address: str) -> bool:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        return bool(domain) and any(domain == d or domain.endswith("." + d)
                                    for d in local_domains)

    if not local(sender):
        return "inbound" if any(local(r) for r in recipients) or not recipients else "outbound"
    return "internal" if recipients and all(local(r) for r in recipients) else "outbound"


class _GuardedStream(io.RawIOBase):
    """A queue file content stream whose format errors become ContentUnavailable.

    The file is validated when opened, but it can still be truncated while it is read.
    """

    def __init__(self, inner: io.RawIOBase) -> None:
        self.inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        try:
            return self.inner.readinto(buffer) or 0
        except QueueFileError as exc:
            raise ContentUnavailable(str(exc)) from None

    def close(self) -> None:
        self.inner.close()
        super().close()


class HoldSource:
    """Watches one Postfix instance's hold queue.  See the module docstring."""

    held = True

    def __init__(self, src: SourceConfig, config: Config, store: Store) -> None:
        self.name = src.name
        self.src = src
        self.config = config
        self.store = store
        self.config_dir = src.config_directory
        self.queue_dir = commands.queue_directory(self.config_dir)
        self.hold_dir = self.queue_dir / "hold"
        self.host = _myhostname(self.config_dir)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify: INotify | None = None
        self._watches: dict[int, Path] = {}
        self._recent: OrderedDict[tuple[str, int], float] = OrderedDict()

    # --- identity and jobs -----------------------------------------------------------

    def _info(self, qf: QueueFile) -> MessageInfo:
        env = qf.envelope
        usec = int(round(env.arrival_time * 1_000_000))
        return MessageInfo(
            source=self.name, kind=KIND,
            identity=f"{self.host}/{env.queue_id}/{usec}/{qf.stat.st_ino}",
            location=env.queue_id, queue_id=env.queue_id, host=self.host,
            sender=env.sender, recipients=env.recipients,
            direction=direction(env.sender, env.recipients, self.config.policy.local_domains),
            size=env.message_size,  # None here: known once the content is read
            arrived_at=datetime.fromtimestamp(env.arrival_time, UTC),
        )

    def _unreadable_info(self, path: Path, st: os.stat_result) -> MessageInfo:
        # No envelope to name it by: the inode and modification time stand in for the
        # arrival time, stable across sweeps so that retries and "stuck" are counted.
        return MessageInfo(
            source=self.name, kind=KIND,
            identity=f"{self.host}/{path.name}/unreadable-{st.st_mtime_ns}/{st.st_ino}",
            location=path.name, queue_id=path.name, host=self.host,
        )

    def _job(self, path: Path, info: MessageInfo, inode: int, trigger: str = "arrival",
             attempts: int = 0) -> Job:
        return Job(info=info, open=lambda: _open_content(path, inode), trigger=trigger,
                   payload=(path, inode), attempts=attempts)

    def _examine(self, path: Path) -> tuple[MessageInfo, int, Path] | None:
        """(info, inode, path) for a ready file; None if not ready or gone."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s: not a regular file in the hold queue; ignored", path)
            return None
        try:
            commands.validate_queue_id(path.name)
        except commands.InvalidQueueId:
            # postsuper cannot act on it, so neither can we: leave it for an admin.
            log.warning("%s: not a Postfix queue file name; ignored", path)
            return None
        if st.st_mode & 0o700 != 0o700:
            return None  # still being written: a later event or sweep takes it
        try:
            # The content is checked when it is read for scanning.
            with QueueFile.open(path, check_content=False) as qf:
                return self._info(qf), qf.stat.st_ino, path
        except QueueFileNotReady:
            return None
        except FileNotFoundError:
            return None
        except QueueFileError as exc:
            log.debug("%s: unreadable queue file: %s", path, exc)
            return self._unreadable_info(path, st), st.st_ino, path
        except OSError as exc:
            log.warning("%s: cannot open: %s", path, exc)
            return None

    @staticmethod
    def _wanted(row: dict | None, now: datetime) -> bool:
        """Whether a held message with this store row needs (another) pass."""
        if row is None:
            return True
        state = row["state"]
        if state in (SEEN, VERDICT, ACTING):
            return True  # never finished: e.g. a crash between commit and action
        if state in (RETRY, STUCK):
            due = as_utc(row["next_attempt_at"])
            return due is not None and due <= now
        # Recorded gone, yet here: that record was wrong, look again.  Done (kept on hold
        # by policy): leave it.
        return state == GONE

    # --- watching --------------------------------------------------------------------

    def start(self, submit: Callable[[Job], bool]) -> None:
        self._stop.clear()
        self._inotify = INotify()
        self._add_watch(self.hold_dir)
        for entry in _subdirs(self.hold_dir):
            self._add_watch(entry)
        self._thread = threading.Thread(target=self._watch_loop, args=(submit,),
                                        name=f"watch-{self.name}", daemon=True)
        self._thread.start()
        log.info("%s: watching %s", self.name, self.hold_dir)

    def _add_watch(self, directory: Path) -> None:
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(directory, _WATCH_MASK)
        except OSError as exc:
            log.error("%s: cannot watch %s: %s (the periodic sweep still finds its mail)",
                      self.name, directory, exc)
            return
        self._watches[wd] = directory

    def _watch_loop(self, submit: Callable[[Job], bool]) -> None:
        assert self._inotify is not None
        while not self._stop.is_set():
            try:
                events = self._inotify.read(timeout=500)
            except OSError as exc:
                log.error("%s: inotify read failed: %s", self.name, exc)
                self._stop.wait(1.0)
                continue
            overflow = False
            files: dict[Path, None] = {}  # one look per file per read, in event order
            for event in events:
                if event.mask & inflags.Q_OVERFLOW:
                    overflow = True
                    continue
                directory = self._watches.get(event.wd)
                if directory is None or not event.name:
                    continue
                path = directory / event.name
                if event.mask & inflags.ISDIR:
                    if event.mask & inflags.CREATE:  # hash_queue_names gained "hold"
                        self._add_watch(path)
                        files.update(dict.fromkeys(_ready_files(path)))
                    continue
                files[path] = None
            try:
                if files:
                    self._submit_all(submit, self._not_recent(list(files)))
                if overflow:
                    log.warning("%s: inotify queue overflowed; sweeping %s", self.name,
                                self.hold_dir)
                    for job in self.sweep():
                        submit(job)
            except Exception as exc:
                # The watcher must outlive a database outage; the mail stays on hold and
                # the periodic sweep takes whatever was missed here.
                log_failure(log, f"{self.name}: new mail not looked at now", exc)

    def _not_recent(self, paths: list[Path]) -> list[Path]:
        """Drop files already handed over a moment ago: cleanup's chmod (IN_ATTRIB) and
        close (IN_CLOSE_WRITE) both announce one arrival."""
        now = time.monotonic()
        fresh = []
        for path in paths:
            try:
                inode = os.lstat(path).st_ino
            except FileNotFoundError:
                continue
            seen = self._recent.get((path.name, inode))
            if seen is None or now - seen > _RECENT_SECONDS:
                fresh.append(path)
        return fresh

    def _submit_all(self, submit: Callable[[Job], bool], paths: list[Path]) -> None:
        found = [x for x in map(self._examine, paths) if x is not None]
        for job in self._jobs_for(found):
            path, inode = job.payload
            self._recent[(path.name, inode)] = time.monotonic()
            while len(self._recent) > _RECENT_MAX:
                self._recent.popitem(last=False)
            submit(job)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
            self._watches.clear()

    # --- sweeping --------------------------------------------------------------------

    def sweep(self) -> Iterator[Job]:
        started = utcnow()
        present: set[str] = set()
        batch: list[tuple[MessageInfo, int, Path]] = []
        for path in _ready_files(self.hold_dir):
            examined = self._examine(path)
            if examined is None:
                continue
            present.add(examined[0].identity)
            batch.append(examined)
            if len(batch) >= _LOOKUP_BATCH:
                yield from self._jobs_for(batch)
                batch = []
        yield from self._jobs_for(batch)
        self._mark_vanished(present, started)

    def _jobs_for(self, batch: list[tuple[MessageInfo, int, Path]]) -> Iterator[Job]:
        if not batch:
            return
        rows = self.store.messages_by_identity(self.name, [i.identity for i, _, _ in batch])
        now = utcnow()
        for info, inode, path in batch:
            row = rows.get(info.identity)
            if self._wanted(row, now):
                yield self._job(path, info, inode, attempts=row["attempts"] if row else 0)

    def _still_held(self, row: dict) -> bool:
        """Is this stored message's file in hold/ (flat or hashed), same inode?"""
        queue_id = row["queue_id"] or ""
        inode = row["identity"].rsplit("/", 1)[-1]
        for path in (self.hold_dir / queue_id, *(d / queue_id for d in _subdirs(self.hold_dir))):
            try:
                if str(os.lstat(path).st_ino) == inode:
                    return True
            except OSError:
                continue
        return False

    def _mark_vanished(self, present: set[str], started: datetime) -> None:
        """Record as gone what left hold/ without us.  Only rows last touched before this
        sweep began are judged (newer ones may have arrived after the listing), and each
        is looked for once more, so a listing that missed a file cannot lose it."""
        open_rows = [r for r in self.store.open_messages(self.name)
                     if r["identity"] not in present
                     and (as_utc(r["updated_at"]) or started) < started]
        open_rows = [r for r in open_rows if not self._still_held(r)]
        vanished = [r["id"] for r in open_rows]
        if not vanished:
            return
        queue_ids = {r["id"]: r["queue_id"] for r in open_rows}
        last = self.store.last_actions(vanished)
        finished = [ActionRecord(mid, last[mid]["scan_id"], last[mid]["action"], "ok",
                                 "completed before a restart (reconciled)", state=DONE,
                                 quarantine_path=(last[mid]["quarantine_path"]
                                                  or self._quarantine_copy(mid)))
                    for mid in vanished
                    if mid in last and last[mid]["outcome"] == "pending"]
        if finished:
            # We had started to act when we stopped: the message left the hold queue
            # because of us.  A release may have stopped between postsuper -H and
            # postqueue -i: ask again for immediate delivery (harmless if delivered).
            released = [queue_ids.get(r.message_id) for r in finished
                        if r.action == RELEASE]
            self._deliver_now([q for q in released if q])
            self.store.record_actions(finished)
            log.info("%s: %d action(s) interrupted by a restart had completed; recorded",
                     self.name, len(finished))
        done = {r.message_id for r in finished}
        gone = [mid for mid in vanished if mid not in done]
        if gone:
            self.store.set_state(gone, GONE, "left the hold queue without spoolscan")
            log.info("%s: %d message(s) left the hold queue without spoolscan (released or "
                     "deleted by someone else); recorded as gone", self.name, len(gone))

    # --- rescans ---------------------------------------------------------------------

    def job_for(self, row: dict, trigger: str) -> Job | None:
        queue_id = row["queue_id"] or row["location"]
        for path in (self.hold_dir / queue_id, *(d / queue_id for d in _subdirs(self.hold_dir))):
            examined = self._examine(path)
            if examined is not None and examined[0].identity == row["identity"]:
                info, inode, found = examined
                return self._job(found, info, inode, trigger=trigger,
                                 attempts=row["attempts"])
        return None

    # --- acting ----------------------------------------------------------------------

    def act(self, items: list[Pending]) -> list[ActionRecord]:
        records: list[ActionRecord] = []
        releases = [p for p in items if p.decision.action == RELEASE]
        quarantines = [p for p in items if p.decision.action == QUARANTINE]
        deletes = [p for p in items if p.decision.action == DELETE]
        if releases:
            records += self._release(releases)
        for p in quarantines:
            records.append(self._quarantine(p))
        if deletes:
            records += self._delete(deletes, DELETE)
        return records

    def _still_ours(self, p: Pending) -> bool:
        """The held file is still the one we scanned (queue IDs are reused)."""
        path, inode = p.outcome.job.payload
        try:
            return os.lstat(path).st_ino == inode
        except FileNotFoundError:
            return False

    def _missing(self, p: Pending, action: str) -> ActionRecord:
        return ActionRecord(p.stored.message_id, p.stored.scan_id, action, "gone",
                            "no longer in the hold queue", state=GONE)

    def _release(self, items: list[Pending]) -> list[ActionRecord]:
        records, released = self._postsuper(
            items, RELEASE, lambda ids: commands.release(self.config_dir, ids), "release")
        self._deliver_now(sorted(released))
        return records

    def _postsuper(self, items: list[Pending], action: str,
                   run: Callable[[list[str]], set[str]], verb: str
                   ) -> tuple[list[ActionRecord], set[str]]:
        """One postsuper run for the items still on hold; a record per item from what
        postsuper said it did (it exits 0 whatever happened).  Returns the records and
        the queue IDs postsuper confirmed."""
        ours = [p for p in items if self._still_ours(p)]
        records = [self._missing(p, action) for p in items if p not in ours]
        try:
            done = run([p.outcome.info.queue_id or "" for p in ours]) if ours else set()
        except commands.PostfixCommandError as exc:
            return records + [ActionRecord(p.stored.message_id, p.stored.scan_id, action,
                                           "failed", str(exc), state=RETRY)
                              for p in ours], set()
        for p in ours:
            if p.outcome.info.queue_id in done:
                records.append(ActionRecord(p.stored.message_id, p.stored.scan_id, action,
                                            "ok", p.decision.reason, state=DONE))
            elif self._still_ours(p):
                records.append(ActionRecord(p.stored.message_id, p.stored.scan_id, action,
                                            "failed", f"postsuper did not {verb} it",
                                            state=RETRY))
            else:
                records.append(self._missing(p, action))
        return records, done

    def _deliver_now(self, ids: list[str]) -> None:
        """Released mail waits in deferred/ for the next queue run unless qmgr is told:
        one trigger for the batch, or postqueue -i per message if qmgr cannot be reached."""
        try:
            if ids and not commands.wake_qmgr(self.queue_dir):
                self._flush(ids)
        except Exception as exc:  # released already: delivery just waits for the queue run
            log.warning("%s: could not ask for immediate delivery of %d released "
                        "message(s): %s", self.name, len(ids), exc)

    def _flush(self, ids: list[str]) -> None:
        """Ask for immediate delivery (postqueue -i per ID), a few at a time."""
        if not ids:
            return
        if len(ids) == 1:
            commands.flush(self.config_dir, ids)
            return
        with ThreadPoolExecutor(max_workers=_FLUSH_THREADS) as pool:
            list(pool.map(lambda qid: commands.flush(self.config_dir, [qid]), ids))

    def _quarantine(self, p: Pending) -> ActionRecord:
        if not self._still_ours(p):
            return self._missing(p, QUARANTINE)
        path, inode = p.outcome.job.payload
        try:
            target = self._copy_to_quarantine(p, path, inode)
        except (OSError, ContentUnavailable, QueueFileError) as exc:
            return ActionRecord(p.stored.message_id, p.stored.scan_id, QUARANTINE, "failed",
                                f"cannot write the quarantine copy: {exc}", state=RETRY)
        record = self._delete([p], QUARANTINE)[0]
        return ActionRecord(record.message_id, record.scan_id, QUARANTINE, record.outcome,
                            record.detail if record.outcome != "ok" else p.decision.reason,
                            state=record.state, quarantine_path=str(target),
                            original_path=str(path))

    def _delete(self, items: list[Pending], action: str) -> list[ActionRecord]:
        # Only from hold/: a message released meanwhile is not ours to delete.
        records, _ = self._postsuper(
            items, action,
            lambda ids: commands.delete(self.config_dir, ids, queues=("hold",)), "remove")
        return records

    def _quarantine_copy(self, message_id: int) -> str | None:
        """Where an interrupted quarantine left its copy (any day's directory), if it
        finished writing one."""
        root = Path(self.config.quarantine.directory)
        found = sorted(root.glob(f"*/{message_id}/message.eml"))
        return str(found[-1]) if found else None

    def _copy_to_quarantine(self, p: Pending, path: Path, inode: int) -> Path:
        """Write message.eml and envelope.json under the quarantine directory, durably."""
        info = p.outcome.info
        day = utcnow().strftime("%Y%m%d")
        target = Path(self.config.quarantine.directory) / day / f"{p.stored.message_id}"
        _mkdirs(target)
        envelope = {
            "message_id": p.stored.message_id, "source": self.name, "host": info.host,
            "queue_id": info.queue_id, "sender": info.sender,
            "recipients": list(info.recipients), "direction": info.direction,
            "arrived_at": info.arrived_at.isoformat() if info.arrived_at else None,
            "signature": p.outcome.verdict.signature, "verdict": p.outcome.verdict.verdict,
            "content_sha256": info.content_hash, "config_directory": self.config_dir,
        }
        with _open_content(path, inode) as opened:
            _write_durably(target / "message.eml", opened.stream)
        _write_durably(target / "envelope.json",
                       io.BytesIO(json.dumps(envelope, indent=2).encode()))
        _fsync_dir(target)
        return target / "message.eml"


# --- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _open_content(path: Path, inode: int) -> Iterator[Opened]:
    try:
        qf = QueueFile.open(path, check_content=False)  # the stream checks as it reads
    except FileNotFoundError:
        raise ContentUnavailable(f"{path.name}: no longer in the queue", gone=True) from None
    except QueueFileError as exc:
        raise ContentUnavailable(str(exc)) from None
    with qf:
        if qf.stat.st_ino != inode:
            raise ContentUnavailable(f"{path.name}: replaced by another message", gone=True)
        with _GuardedStream(qf.content()) as stream:
            yield Opened(stream=stream, size=qf.envelope.message_size)  # type: ignore[arg-type]


def _subdirs(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _ready_files(directory: Path) -> list[Path]:
    """Files under ``directory`` (one level of hash subdirectories), oldest first."""
    found: list[tuple[float, Path]] = []
    stack = [directory]
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except OSError as exc:
            log.error("cannot list %s: %s", current, exc)
            continue
        with it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif not entry.name.startswith("."):
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue
                    found.append((mtime, Path(entry.path)))
    found.sort(key=lambda x: x[0])
    return [p for _, p in found]


def _myhostname(config_dir: str) -> str:
    try:
        out = subprocess.run(["postconf", "-c", config_dir, "-h", "myhostname"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return socket.getfqdn()


def _mkdirs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    os.chmod(path.parent, 0o700)


def _write_durably(path: Path, stream: BinaryIO | io.RawIOBase) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "wb") as out:
        while chunk := stream.read(256 * 1024):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
