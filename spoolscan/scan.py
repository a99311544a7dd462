"""Scanning a job: jobs in, outcomes out, with bounded concurrency.

A *job* is one message to scan, described by its source: what it is (``MessageInfo``)
and how to open its content.  The pipeline hashes the content, reuses a stored verdict
for the same content under the same signature fingerprint, and otherwise asks clamd.
Copies of one message scanned at the same moment wait for the first copy's scan instead
of scanning again.

Memory stays bounded: content is streamed (never read whole), at most a fixed number of
jobs are in flight, and the in-process verdict cache is an LRU of fixed size.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, BinaryIO

from spoolscan import fsutil
from spoolscan.clamd import ClamdError
from spoolscan.clamdpool import Scanner
from spoolscan.content import Headers, content_hash, read_headers
from spoolscan.model import (
    ContentUnavailable,
    Job,
    MessageInfo,
    Opened,
    Outcome,
    ScanResult,
    Verdict,
)

if TYPE_CHECKING:
    from spoolscan.store.repo import Store

log = logging.getLogger(__name__)

MAX_SNAPSHOT = 1 << 40  # bytes copied when no max_size is configured (never in practice)
# Private copies of messages up to this size are kept in memory: one per scan in flight,
# each at most MEMORY_COPY_MAX + 1 bytes even if the owner makes the file grow meanwhile.
MEMORY_COPY_MAX = 1 << 20


class FingerprintWatch:
    """The current signature fingerprint, asked of clamd at most every ``ttl`` seconds."""

    def __init__(self, client: Scanner, store: Store | None, ttl: float = 10.0) -> None:
        self.client = client
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._value: str | None = None
        self._read_at = 0.0
        self._failing = False

    @property
    def failing(self) -> bool:
        """True while clamd does not answer (since the last time it was asked)."""
        return self._failing

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
            value = self.client.fingerprint()
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
    (up to ``size``); if that was all of them and the store is this host's own (SQLite),
    a miss in memory is a miss, and the database is not asked again for each new
    message.  A PostgreSQL store may be shared by several hosts, whose verdicts arrive
    at any time: there a miss in memory asks the store (one indexed lookup).

    Also coordinates scans in flight, so that copies of a message scanned at once cost
    one clamd scan.
    """

    def __init__(self, store: Store | None, size: int = 10_000) -> None:
        self.store = store
        self.size = size
        self._lock = threading.Lock()
        # Verdicts kept small (verdict, signature): 10,000 of them are a few MB.
        self._lru: OrderedDict[tuple[str, str], tuple[Verdict, str | None]] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future[ScanResult]] = {}
        self._warmed: set[str] = set()
        self._complete: str | None = None  # the fingerprint whose verdicts are all here
        # Other hosts may add verdicts to a shared (server) database at any time.
        self.shared = store is not None and store.engine.dialect.name != "sqlite"

    def warm(self, fingerprint: str) -> None:
        """Load the stored verdicts for ``fingerprint`` (once per fingerprint)."""
        with self._lock:
            if fingerprint in self._warmed or self.store is None:
                return
            self._warmed.add(fingerprint)
        rows = self.store.verdicts_under(fingerprint, limit=self.size)
        with self._lock:
            for content_hash, verdict, signature in rows:
                self._lru[(content_hash, fingerprint)] = (Verdict(verdict), signature)
            self._trim()
            if len(rows) < self.size and not self.shared:
                self._complete = fingerprint

    def get(self, key: tuple[str, str]) -> ScanResult | None:
        """The verdict known for ``key`` (its ``duration_ms`` 0: it took no scan)."""
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                return ScanResult(hit[0], signature=hit[1], fingerprint=key[1])
            if self._complete == key[1]:
                return None  # everything stored under this fingerprint is in memory
        if self.store is None:
            return None
        row = self.store.cached_verdict(*key)
        if row is None:
            return None
        verdict = ScanResult(Verdict(row.verdict), signature=row.signature, fingerprint=key[1])
        self.put(key, verdict)
        return verdict

    def put(self, key: tuple[str, str], verdict: ScanResult) -> None:
        with self._lock:
            self._lru[key] = (verdict.verdict, verdict.signature)
            self._lru.move_to_end(key)
            self._trim()

    def _trim(self) -> None:
        while len(self._lru) > self.size:
            self._lru.popitem(last=False)
            self._complete = None  # evicted entries must be looked up again

    def claim(self, key: tuple[str, str]) -> Future[ScanResult] | None:
        """None if the caller should scan (and later ``release``); else a future to wait on."""
        with self._lock:
            existing = self._inflight.get(key)
            if existing is not None:
                return existing
            # Another copy may have finished between the caller's get() and now.
            done = self._lru.get(key)
            if done is not None:
                resolved: Future[ScanResult] = Future()
                resolved.set_result(ScanResult(done[0], signature=done[1],
                                               fingerprint=key[1]))
                return resolved
            self._inflight[key] = Future()
            return None

    def release(self, key: tuple[str, str], verdict: ScanResult) -> None:
        if verdict.is_final:
            self.put(key, verdict)
        with self._lock:
            future = self._inflight.pop(key, None)
        if future is not None:
            future.set_result(verdict)


@dataclass
class ScanService:
    """Scans one job at a time per calling thread; share one instance between threads."""

    client: Scanner
    store: Store | None
    use_cache: bool = True
    snapshot_dir: str | None = None  # where private copies of shared files go
    cache: VerdictCache = field(init=False)
    fingerprints: FingerprintWatch = field(init=False)

    def __post_init__(self) -> None:
        self.cache = VerdictCache(self.store)
        self.fingerprints = FingerprintWatch(self.client, self.store)

    def scan(self, job: Job) -> Outcome:
        """Hash, look up, scan.  Never raises for a problem with the message, clamd or
        the store (an error outcome says what happened)."""
        try:
            listed = self._listed_hit(job)
            if listed is not None:
                return listed
            with job.open() as opened:
                return self._scan_opened(job, opened)
        except ContentUnavailable as exc:
            return Outcome(job, job.info, ScanResult(Verdict.ERROR, detail=str(exc)),
                           unavailable=exc)
        except Exception as exc:  # a reader bug must not stop the other messages
            log.exception("%s: unexpected error while scanning", job.info.location)
            return Outcome(job, job.info,
                           ScanResult(Verdict.ERROR, detail=f"internal error: {exc!r}"))

    def _listed_hit(self, job: Job) -> Outcome | None:
        """A rescan whose listing shows the recorded size (within the size limit): the
        cache may answer without opening the file, as it would after opening it."""
        known, limit = job.known_content, self.client.max_size
        if (known is None or job.listed_size is None
                or (limit is not None and known[1] > limit)):
            return None
        return self._known_hit(job, job.listed_size, self.fingerprints.current())

    def _known_hit(self, job: Job, size: int | None, fingerprint: str | None
                   ) -> Outcome | None:
        """A rescan: the content hash recorded at arrival answers from the cache without
        reading anything, if the file still has the recorded ``size``."""
        known = job.known_content
        if known is None or size != known[1] or not fingerprint or not self.use_cache:
            return None
        self.cache.warm(fingerprint)
        hit = self.cache.get((known[0], fingerprint))
        if hit is None:
            return None
        info = replace(job.info, content_hash=known[0], size=known[1])
        return Outcome(job, info, hit, cached=True)

    def _scan_opened(self, job: Job, opened: Opened) -> Outcome:
        limit = self.client.max_size
        if limit is not None and opened.size is not None and opened.size > limit:
            # Too large to scan: say so without reading it (not even to hash it), but for
            # its first 64 KiB: what it is (subject, sender) is what an admin needs then.
            result = self.client.scan_stream(opened.stream, opened.size)
            return Outcome(job, _with_headers(job.info, opened.stream, opened.size), result)
        # Read the fingerprint before scanning: the stamp may be older than the
        # signatures used, never newer (see ClamdClient.fingerprint).
        fingerprint = self.fingerprints.current()
        known = self._known_hit(job, opened.size, fingerprint)
        if known is not None:
            return known  # a miss reads (and hashes) the content again, below
        missed = None
        if opened.shared and opened.fd is not None:
            if fingerprint and self.use_cache:
                # A verdict already known for the content read answers without a copy:
                # whatever the owner changes while it is read, the verdict found is the
                # one stored for exactly the bytes hashed.  Only what clamd must read is
                # copied (the copy is hashed again: that hash is the one scanned).
                bound = limit if limit is not None else MAX_SNAPSHOT
                digest, size, headers = content_hash(opened.stream, bound)
                self.cache.warm(fingerprint)
                hit = self.cache.get((digest, fingerprint)) if size <= bound else None
                if hit is not None:
                    info = _headers_into(job.info, headers, content_hash=digest, size=size)
                    return Outcome(job, info, hit, cached=True)
                missed = digest if size <= bound else None
            # Its owner can change the file while we read it: hash, scan and cache one
            # private copy, never the live file (else the verdict for one content could
            # be cached under the hash of another, for every copy of it).
            # A small message is copied into memory (no file system work: on ext4 that
            # is most of the cost of a copy); a large one into the snapshot directory.
            snap_fd, size = fsutil.snapshot(opened.fd, limit if limit is not None
                                            else MAX_SNAPSHOT, self._snapshot_dir(),
                                            memory=MEMORY_COPY_MAX)
            with open(snap_fd, "rb", buffering=0, closefd=True) as stream:
                private = Opened(stream=stream, fd=snap_fd, size=size)  # type: ignore[arg-type]
                if limit is not None and size > limit:  # it grew past the limit meanwhile
                    result = self.client.scan_stream(private.stream, size)
                    return Outcome(job, _with_headers(job.info, private.stream, size), result)
                return self._hash_and_scan(job, private, fingerprint, missed)
        return self._hash_and_scan(job, opened, fingerprint)

    def _snapshot_dir(self) -> str | None:
        if self.snapshot_dir and os.path.isdir(self.snapshot_dir):
            return self.snapshot_dir
        return None

    def _hash_and_scan(self, job: Job, opened: Opened, fingerprint: str | None,
                       missed: str | None = None) -> Outcome:
        """``missed``: a content hash just looked up in vain (not asked again)."""
        digest, size, headers = content_hash(opened.stream)
        info = _headers_into(job.info, headers, content_hash=digest, size=size)
        key = (digest, fingerprint) if fingerprint and self.use_cache else None
        if key is not None:
            self.cache.warm(key[1])
            hit = self.cache.get(key) if digest != missed else None
            if hit is not None:
                return Outcome(job, info, hit, cached=True)
            waiting = self.cache.claim(key)
            if waiting is not None:
                other = waiting.result(timeout=self.client.config.timeout * 2)
                if other.is_final:
                    return Outcome(job, info, replace(other, duration_ms=0), cached=True)
                key = None  # the other scan failed: scan this copy ourselves
        remote = None
        if key is not None and self.cache.shared:
            # Another host may be scanning the same content right now: wait for its
            # verdict rather than scanning it a second time.
            theirs, remote = self._other_host(key)
            if theirs is not None:
                self.cache.release(key, theirs)
                return Outcome(job, info, replace(theirs, duration_ms=0), cached=True)
        result = ScanResult(Verdict.ERROR, detail="not scanned", fingerprint=fingerprint)
        try:
            result = replace(self._scan_content(opened, size), fingerprint=fingerprint)
        finally:
            if key is not None:
                self.cache.release(key, result)
            if remote is not None and not result.is_final:
                self._give_back(key, remote)
        return Outcome(job, info, result)

    def _other_host(self, key: tuple[str, str]) -> tuple[ScanResult | None, str | None]:
        """On a shared store: (another host's verdict for ``key``, None) if one came while
        we waited for it; else (None, our claim's holder) and this host scans.  A host
        holding a claim has until its lease (twice the scan timeout) to commit a verdict;
        a store that cannot be asked means: scan here."""
        from sqlalchemy.exc import SQLAlchemyError

        assert self.store is not None
        holder = f"{socket.gethostname()}:{os.getpid()}"
        lease = self.client.config.timeout * 2
        deadline = time.monotonic() + lease + 1
        try:
            while True:
                if self.store.claim_scan(key[1], key[0], holder, lease):
                    return None, holder
                row = self.store.cached_verdict(*key)
                if row is not None:
                    return ScanResult(Verdict(row.verdict), signature=row.signature,
                                      fingerprint=key[1]), None
                if time.monotonic() > deadline:
                    return None, None
                time.sleep(0.05)
        except SQLAlchemyError as exc:
            log.debug("scan claims not available (%s): scanning here", exc)
            return None, None

    def _give_back(self, key: tuple[str, str] | None, holder: str) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        if key is None or self.store is None:
            return
        try:
            self.store.release_scan(key[1], key[0], holder)
        except SQLAlchemyError as exc:
            log.debug("scan claim not given back (%s): it lapses", exc)

    def _scan_content(self, opened: Opened, size: int) -> ScanResult:
        if opened.fd is not None:
            return self.client.scan_fd(opened.fd, size)
        if not opened.stream.seekable():
            raise ContentUnavailable("internal error: the content stream cannot be rewound")
        opened.stream.seek(0)
        return self.client.scan_stream(opened.stream, size)


def _with_headers(info: MessageInfo, stream: BinaryIO, size: int) -> MessageInfo:
    """``info`` with ``size`` and the headers from the start of ``stream`` (none if it
    cannot be read: the verdict is what matters)."""
    try:
        headers = read_headers(stream)
    except (ContentUnavailable, OSError):
        return replace(info, size=size)
    return _headers_into(info, headers, size=size)


def _headers_into(info: MessageInfo, headers: Headers, **known: Any) -> MessageInfo:
    """``info`` with the fields of ``headers`` and ``known`` (one copy: copying a
    MessageInfo is a visible share of a cached scan's CPU)."""
    return replace(info, subject=headers.subject, message_id=headers.message_id,
                   header_from=headers.header_from, release_token=headers.release_token,
                   **known)


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
