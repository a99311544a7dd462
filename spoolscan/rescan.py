"""Rescans: retroactive detection.

Mail that was clean under yesterday's signatures may be known-bad today.  A rescan takes
the messages seen within the rescan window that have no definite verdict under the
*current* signature fingerprint, and sends them through the worker again (trigger
``rescan``): new detections are quarantined like arrivals and marked retroactive in the
store.  Copies of one content cost one clamd scan (the cache answers the others).  A
rescan is resumable: a message finished under the fingerprint is not a candidate any
more, so an interrupted rescan restarted later does only what is left.

*Several hosts* (PostgreSQL): each host rescans only its own mail (``Source.owns``), and
the distinct contents are split between them: a host claims the contents of a batch of
its candidates in ``rescan_claims`` (``SELECT ... FOR UPDATE SKIP LOCKED``, a lease of
``[schedule] rescan_lease``), scans one copy of each content it got, and marks them done;
contents another host holds are waited for (their verdicts then come from the shared
cache) or, once that host's lease has expired (it died), claimed and scanned here.  So N
hosts rescanning after an update scan each distinct content once between them.  SQLite
(one host) does without claims.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TextIO

from spoolscan.model import Job, Trigger
from spoolscan.pipeline import Worker
from spoolscan.progress import ProgressBar
from spoolscan.store.repo import GONE, utcnow

log = logging.getLogger(__name__)


@dataclass
class RescanSummary:
    fingerprint: str | None
    candidates: int = 0
    scanned: int = 0
    cached: int = 0
    detections: int = 0
    retroactive: int = 0
    errors: int = 0
    gone: int = 0
    elapsed: float = 0.0

    def line(self) -> str:
        return (f"rescan under {self.fingerprint}: {self.candidates} candidates, "
                f"{self.scanned} scanned ({self.cached} from cache), "
                f"{self.detections} detections ({self.retroactive} retroactive), "
                f"{self.errors} errors, {self.gone} gone, {self.elapsed:.1f}s")


def rescan(worker: Worker, *, since: datetime | None, source: str | None = None,
           progress: TextIO | None = None) -> RescanSummary:
    """Rescan stored messages seen since ``since`` (all if None) under the current
    signatures.  The worker must be started.  Returns when the work is done.

    Three passes, so that copies cost almost nothing: (1) one message per distinct
    content goes through the worker (clamd, or the cache); (2) copies of content now known
    clean, whose message was clean and finished, are recorded in one SQL statement (a
    cached scan each); (3) whatever is left (copies of new detections, which must be
    quarantined one by one, and messages waiting for a retry) goes through the worker.
    """
    started = time.monotonic()
    fingerprint = worker.service.fingerprints.refresh()
    summary = RescanSummary(fingerprint)
    if fingerprint is None:
        log.error("rescan: clamd does not answer; nothing rescanned")
        summary.errors = 1
        return summary
    before = dict(worker.stats)
    store = worker.store
    bar: ProgressBar | None = None
    if progress is not None and progress.isatty():
        bar = ProgressBar(progress, store.count_rescan_candidates(since, fingerprint, source),
                          "rescan")
        bar.offset = -before.get("scanned", 0)

    contents: set[str] = set()
    if store.shared:
        summary.candidates = _feed_claimed(worker, since, source, fingerprint, summary, bar)
    else:
        summary.candidates = _feed(worker, since, source, fingerprint, summary, contents, bar)
    copies = store.record_clean_copies(fingerprint, since, source)
    contents.clear()
    if bar is not None:
        bar.offset += copies
        bar.update(worker.stats["scanned"], force=True)
    _feed(worker, since, source, fingerprint, summary, None, bar)
    if bar is not None:
        bar.clear()

    after = worker.stats
    delta = {k: after[k] - before.get(k, 0) for k in after}
    summary.scanned = delta.get("scanned", 0) + copies
    summary.cached = delta.get("cached", 0) + copies
    summary.detections = delta.get("infected", 0)
    summary.retroactive = delta.get("retroactive", 0)
    summary.errors = (delta.get("error", 0) + delta.get("unreadable", 0)
                      + delta.get("database_errors", 0))
    summary.elapsed = time.monotonic() - started
    if summary.errors == 0:
        store.mark_rescanned(fingerprint, rescan_host())
    log.info(summary.line())
    return summary


def _feed(worker: Worker, since: datetime | None, source: str | None, fingerprint: str,
          summary: RescanSummary, first_of_content: set[str] | None,
          bar: ProgressBar | None) -> int:
    """Submit the candidates (only the first message of each content when
    ``first_of_content`` is given); returns how many candidates there were."""
    store = worker.store
    seen = 0
    for rows in store.rescan_candidates(since, fingerprint, source):
        gone: list[int] = []
        wanted: list[dict] = []
        for row in rows:
            src = worker.sources.get(row["source"])
            if src is None or not src.owns(row):
                continue  # a source no longer configured (or `spoolscan scan` results),
                # or another host's mail
            seen += 1
            digest = row["content_hash"]
            if first_of_content is not None:
                if digest in first_of_content:
                    continue
                first_of_content.add(digest)
            wanted.append(row)
        for row, job in zip(wanted, _jobs_for(worker, wanted), strict=True):
            digest = row["content_hash"]
            if job is None:
                gone.append(row["id"])
                continue
            if digest and row["size"] is not None:
                job.known_content = (digest, row["size"])
            worker.submit(job)
            if bar is not None:
                bar.update(worker.stats["scanned"], f"{worker.stats['infected']} infected")
        if gone:
            store.set_state(gone, GONE, "no longer present (found by a rescan)")
            summary.gone += len(gone)
    # The batches come by id (keyset), so the next one can be asked for while this one
    # is in flight (waiting here for each batch left clamd idle at every boundary); the
    # pass is over once everything submitted is finished.
    worker.wait_idle(settle=0.0)
    return seen


def _jobs_for(worker: Worker, rows: list[dict]) -> list[Job | None]:
    """A rescan job for each row (None: no longer there); each source finds its
    messages of the batch at once (the Maildir source: one request per folder)."""
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    jobs: dict[int, Job | None] = {}
    for name, its in by_source.items():
        for row, job in zip(its, worker.sources[name].jobs_for(its, Trigger.RESCAN),
                            strict=True):
            jobs[id(row)] = job
    return [jobs[id(row)] for row in rows]


def rescan_host() -> str:
    """This host's name, for "has this host rescanned its mail?" on a shared store."""
    return socket.gethostname()


def _feed_claimed(worker: Worker, since: datetime | None, source: str | None,
                  fingerprint: str, summary: RescanSummary, bar: ProgressBar | None) -> int:
    """The first pass on a shared store: one copy of each content this host holds the
    claim for goes through the worker; rounds repeat until every content of this host's
    candidates is done (here or by another host).  Returns this host's candidates."""
    store = worker.store
    holder = f"{socket.gethostname()}:{os.getpid()}"
    lease = worker.config.schedule.rescan_lease
    candidates = 0
    first_round = True
    while True:
        # A rescan of this host that was killed (its process is gone) gives its claims
        # back now: the next one need not wait for its leases to run out.
        gave_back = store.release_rescan_claims_of(
            fingerprint, [h for h in store.rescan_claim_holders(fingerprint)
                          if _dead_here(h)])
        if gave_back:
            log.info("rescan: took over %d contents claimed by a rescan of this host "
                     "that is no longer running", gave_back)
        waiting = 0
        for rows in store.rescan_candidates(since, fingerprint, source):
            mine: dict[str, dict] = {}  # content hash -> the first copy of it here
            for row in rows:
                src = worker.sources.get(row["source"])
                if src is None or not src.owns(row):
                    continue
                candidates += first_round
                if row["content_hash"] and row["size"] is not None:
                    mine.setdefault(row["content_hash"], row)
            if not mine:
                continue
            got = store.claim_rescan(fingerprint, list(mine), holder, lease)
            gone: list[str] = []
            for digest, job in zip(got, _jobs_for(worker, [mine[d] for d in got]),
                                   strict=True):
                row = mine[digest]
                if job is None:
                    gone.append(digest)
                    continue
                job.known_content = (digest, row["size"])
                worker.submit(job)
                if bar is not None:
                    bar.update(worker.stats["scanned"], f"{worker.stats['infected']} infected")
            if gone:
                store.set_state([mine[d]["id"] for d in gone], GONE,
                                "no longer present (found by a rescan)")
                summary.gone += len(gone)
            worker.wait_idle(settle=0.0)
            # Done: the contents that now have a definite verdict (in the cache).  One
            # whose scan failed (clamd down, unchecked) is given back, so that it is
            # claimed and scanned again rather than counted as rescanned.
            scanned = [d for d in got if d not in gone]
            done = [d for d in scanned
                    if worker.service.cache.get((d, fingerprint)) is not None]
            failed = [d for d in scanned if d not in set(done)]
            store.finish_rescan_claims(fingerprint, done, gone + failed)
            waiting += store.open_rescan_claims(
                fingerprint, [d for d in mine if d not in got or d in gone])
        first_round = False
        if not waiting:
            return candidates
        log.debug("rescan: %d contents held by other hosts; waiting", waiting)
        time.sleep(min(1.0, lease / 4))


def _dead_here(holder: str) -> bool:
    """Whether ``holder`` ("host:pid") is a process of this host that no longer runs."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # running, as another user
        return False
    return False


def check_signatures(worker: Worker, window: timedelta) -> RescanSummary | None:
    """If clamd's signatures changed since the last completed rescan, rescan the window."""
    fingerprint = worker.service.fingerprints.refresh()
    if fingerprint is None or not worker.store.needs_rescan(fingerprint, rescan_host()):
        return None
    log.info("signatures changed (%s): rescanning mail of the last %s", fingerprint, window)
    return rescan(worker, since=utcnow() - window)




def print_summary(summary: RescanSummary, out: TextIO = sys.stdout) -> None:
    print(summary.line(), file=out)
