"""Scanning: jobs in, outcomes out, with bounded concurrency.

A *job* is one message to scan, described by its source: what it is (``MessageInfo``)
and how to open its content.  The pipeline hashes the content, reuses a stored verdict
for the same content under the same signature fingerprint, and otherwise asks clamd.
Copies of one message scanned at the same moment wait for the first copy's scan instead
of scanning again.

Memory stays bounded: content is streamed (never read whole), at most a fixed number of
jobs are in flight, and the in-process verdict cache is an LRU of fixed size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from spoolscan.content import content_hash
from spoolscan.scanner import ERROR, UNCHECKED, ClamdError, ClamdScanner, Verdict
from spoolscan.store.repo import MessageInfo, Store

log = logging.getLogger(__name__)


class ContentUnavailable(Exception):
    """The message could not be opened or read (vanished, corrupt, not a regular file)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass
class Opened:
    """An open message: a binary stream, and its descriptor when it is a plain file."""

    stream: BinaryIO
    fd: int | None = None
    size: int | None = None


Opener = Callable[[], contextlib.AbstractContextManager[Opened]]


@dataclass
class Job:
    """One message to scan."""

    info: MessageInfo
    open: Opener
    trigger: str = "arrival"  # arrival | rescan | manual
    payload: Any = None  # source-specific data carried to the action step
    attempts: int = 0
    # (content hash, size) recorded when the message was first scanned.  Rescans use it
    # instead of reading the content again when the size is unchanged: delivered mail is
    # not modified in place (Maildir, Postfix queue files), so only new signatures
    # matter, and most answers then come from the cache without any I/O.
    known_content: tuple[str, int] | None = None


@dataclass
class Outcome:
    job: Job
    info: MessageInfo  # with content_hash and size filled in when the content was readable
    verdict: Verdict
    cached: bool = False
    unavailable: ContentUnavailable | None = None


@contextlib.contextmanager
def open_file(path: str | os.PathLike[str]) -> Iterator[Opened]:
    """Open a plain file for scanning: no symlinks, regular files only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ContentUnavailable(f"{path}: no longer exists", gone=True) from None
    except OSError as exc:
        raise ContentUnavailable(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ContentUnavailable(f"{path}: not a regular file")
        with os.fdopen(os.dup(fd), "rb", buffering=0) as stream:
            yield Opened(stream=stream, fd=fd, size=st.st_size)  # type: ignore[arg-type]
    finally:
        os.close(fd)


class FingerprintWatch:
    """The current signature fingerprint, asked of clamd at most every ``ttl`` seconds."""

    def __init__(self, scanner: ClamdScanner, store: Store | None, ttl: float = 10.0) -> None:
        self.scanner = scanner
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._value: str | None = None
        self._read_at = 0.0
        self._failing = False

    def current(self) -> str | None:
        with self._lock:
            ttl = 1.0 if self._failing else self.ttl  # retry an outage sooner
            if time.monotonic() - self._read_at > ttl:
                self.refresh_locked()
            return self._value

    def refresh(self) -> str | None:
        with self._lock:
            self.refresh_locked()
            return self._value

    def refresh_locked(self) -> None:
        self._read_at = time.monotonic()
        try:
            value = self.scanner.fingerprint()
        except ClamdError as exc:
            if not self._failing:  # once per outage, not once per message
                log.warning("cannot read clamd's signature version: %s", exc)
            self._failing = True
            self._value = None
            return
        if self._failing:
            log.info("clamd answers again")
        self._failing = False
        if (value != self._value and self.store is not None
                and self.store.note_fingerprint(value)):
            log.info("new signature fingerprint: %s", value)
        self._value = value


class VerdictCache:
    """(content hash, fingerprint) → definite verdict: in memory (LRU), then the store.

    When a fingerprint is first used, the verdicts already stored under it are loaded
    (up to ``size``); if that was all of them, a miss in memory is a miss, and the
    database is not asked again for each new message.

    Also coordinates scans in flight, so that copies of a message scanned at once cost
    one clamd scan.
    """

    def __init__(self, store: Store | None, size: int = 50_000) -> None:
        self.store = store
        self.size = size
        self._lock = threading.Lock()
        self._lru: OrderedDict[tuple[str, str], Verdict] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future[Verdict]] = {}
        self._warmed: set[str] = set()
        self._complete: str | None = None  # the fingerprint whose verdicts are all here

    def warm(self, fingerprint: str) -> None:
        """Load the stored verdicts for ``fingerprint`` (once per fingerprint)."""
        with self._lock:
            if fingerprint in self._warmed or self.store is None:
                return
            self._warmed.add(fingerprint)
        rows = self.store.verdicts_under(fingerprint, limit=self.size)
        with self._lock:
            for content_hash, verdict, signature in rows:
                self._lru[(content_hash, fingerprint)] = Verdict(
                    verdict, signature=signature, fingerprint=fingerprint)
            self._trim()
            if len(rows) < self.size:
                self._complete = fingerprint

    def get(self, key: tuple[str, str]) -> Verdict | None:
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                return hit
            if self._complete == key[1]:
                return None  # everything stored under this fingerprint is in memory
        if self.store is None:
            return None
        row = self.store.cached_verdict(*key)
        if row is None:
            return None
        verdict = Verdict(row.verdict, signature=row.signature, fingerprint=key[1])
        self.put(key, verdict)
        return verdict

    def put(self, key: tuple[str, str], verdict: Verdict) -> None:
        with self._lock:
            self._lru[key] = verdict
            self._lru.move_to_end(key)
            self._trim()

    def _trim(self) -> None:
        while len(self._lru) > self.size:
            self._lru.popitem(last=False)
            self._complete = None  # evicted entries must be looked up again

    def claim(self, key: tuple[str, str]) -> Future[Verdict] | None:
        """None if the caller should scan (and later ``release``); else a future to wait on."""
        with self._lock:
            existing = self._inflight.get(key)
            if existing is not None:
                return existing
            # Another copy may have finished between the caller's get() and now.
            done = self._lru.get(key)
            if done is not None:
                resolved: Future[Verdict] = Future()
                resolved.set_result(done)
                return resolved
            self._inflight[key] = Future()
            return None

    def release(self, key: tuple[str, str], verdict: Verdict) -> None:
        if verdict.is_final:
            self.put(key, verdict)
        with self._lock:
            future = self._inflight.pop(key, None)
        if future is not None:
            future.set_result(verdict)


@dataclass
class ScanService:
    """Scans one job at a time per calling thread; share one instance between threads."""

    scanner: ClamdScanner
    store: Store | None
    use_cache: bool = True
    cache: VerdictCache = field(init=False)
    fingerprints: FingerprintWatch = field(init=False)

    def __post_init__(self) -> None:
        self.cache = VerdictCache(self.store)
        self.fingerprints = FingerprintWatch(self.scanner, self.store)

    def scan(self, job: Job) -> Outcome:
        """Hash, look up, scan.  Never raises for a problem with the message or clamd."""
        try:
            with job.open() as opened:
                limit = self.scanner.max_size
                if limit is not None and opened.size is not None and opened.size > limit:
                    # Too large to scan: say so without reading it (not even to hash it).
                    verdict = self.scanner.scan_stream(opened.stream, opened.size)
                    return Outcome(job, replace(job.info, size=opened.size), verdict)
                known = job.known_content
                if known is not None and opened.size is not None and opened.size == known[1]:
                    digest, size = known
                else:
                    digest, size = content_hash(opened.stream)
                info = replace(job.info, content_hash=digest, size=size)
                # Read the fingerprint before scanning: the stamp may be older than the
                # signatures used, never newer (see ClamdScanner.fingerprint).
                fingerprint = self.fingerprints.current()
                key = (digest, fingerprint) if fingerprint else None
                if key and self.use_cache:
                    self.cache.warm(key[1])
                    hit = self.cache.get(key)
                    if hit is not None:
                        return Outcome(job, info, replace(hit, duration_ms=0), cached=True)
                    waiting = self.cache.claim(key)
                    if waiting is not None:
                        verdict = waiting.result(timeout=self.scanner.config.timeout * 2)
                        if verdict.is_final:
                            return Outcome(job, info, replace(verdict, duration_ms=0),
                                           cached=True)
                        key = None  # the other scan failed: scan this copy ourselves
                verdict = Verdict(ERROR, detail="not scanned", fingerprint=fingerprint)
                try:
                    verdict = replace(self._scan_content(job, opened, size),
                                      fingerprint=fingerprint)
                finally:
                    if key and self.use_cache:
                        self.cache.release(key, verdict)
                return Outcome(job, info, verdict)
        except ContentUnavailable as exc:
            detail = str(exc)
            return Outcome(job, job.info, Verdict(ERROR, detail=detail), unavailable=exc)
        except Exception as exc:  # a reader bug must not stop the other messages
            log.exception("%s: unexpected error while scanning", job.info.location)
            return Outcome(job, job.info, Verdict(ERROR, detail=f"internal error: {exc!r}"))

    def _scan_content(self, job: Job, opened: Opened, size: int) -> Verdict:
        if opened.fd is not None:
            return self.scanner.scan_fd(opened.fd, size)
        # Streams that cannot seek (a queue file's content) are opened a second time.
        stream = opened.stream
        if stream.seekable():
            stream.seek(0)
            return self.scanner.scan_stream(stream, size)
        with job.open() as again:
            return self.scanner.scan_stream(again.stream, size)


def run_jobs(service: ScanService, jobs: Iterable[Job], concurrency: int,
             stop: threading.Event | None = None) -> Iterator[Outcome]:
    """Scan ``jobs`` with ``concurrency`` scans in flight; yield outcomes as they finish.

    Jobs are pulled from the iterable only as capacity frees up (back-pressure), so a
    backlog of any size costs memory for at most ``2 * concurrency`` jobs.
    """
    limit = max(1, concurrency) * 2
    with ThreadPoolExecutor(max_workers=max(1, concurrency),
                            thread_name_prefix="scan") as pool:
        pending: set[Future[Outcome]] = set()
        source = iter(jobs)
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit and not (stop and stop.is_set()):
                try:
                    job = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.add(pool.submit(service.scan, job))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def is_unsafe(verdict: Verdict) -> bool:
    """unchecked or error: never to be treated as clean."""
    return verdict.verdict in (UNCHECKED, ERROR)
