"""Scheduled work: signature checks that trigger rescans, the nightly rescan, the purge.

Retroactive detection: mail that was clean under yesterday's signatures may be known-bad
today.  A rescan takes the messages seen within the rescan window that have no definite
verdict under the *current* signature fingerprint, and sends them through the worker again
(trigger ``rescan``): new detections are quarantined like arrivals and marked
retroactive in the store.  Copies of one content cost one clamd scan (the cache answers
the others).  A rescan is resumable: a message finished under the fingerprint is not a
candidate any more, so an interrupted rescan restarted later does only what is left.

The schedule is defined in the configuration and kept in memory (one scheduler per
worker process; APScheduler job stores cannot be shared between processes).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TextIO

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from spoolscan.config import Config
from spoolscan.progress import ProgressBar
from spoolscan.store.repo import GONE, utcnow
from spoolscan.worker import Worker

log = logging.getLogger(__name__)

_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _dow_field(field: str) -> str:
    """Translate a crontab(5) day-of-week field to APScheduler 3 names.

    APScheduler 3 counts numeric weekdays from Monday = 0; crontab counts Sunday = 0 (and
    7).  Numbers are therefore expanded to names: "1-5" → "mon,tue,wed,thu,fri".
    """
    if field == "*" or not any(c.isdigit() for c in field):
        return field
    days: list[int] = []
    for part in field.split(","):
        rng, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if rng == "*":
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = _dow_number(a), _dow_number(b)
        else:
            lo = hi = _dow_number(rng)
        if hi < lo:  # e.g. "5-0" (fri..sun)
            hi += 7
        days.extend(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_DOW_NAMES[d] for d in sorted(set(days)))


def _dow_number(text: str) -> int:
    text = text.strip().lower()
    if text.isdigit():
        n = int(text)
        if not 0 <= n <= 7:
            raise ValueError(f"day of week out of range: {text}")
        return n % 7
    return _DOW_NAMES.index(text[:3])


def cron_trigger(expr: str) -> CronTrigger:
    """A CronTrigger for a five-field crontab expression, with crontab's weekday numbers."""
    minute, hour, day, month, dow = expr.split()
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=_dow_field(dow))


# --- rescans ---------------------------------------------------------------------------


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
        store.mark_rescanned(fingerprint)
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
        for row in rows:
            src = worker.sources.get(row["source"])
            if src is None:
                continue  # a source no longer configured (or `spoolscan scan` results)
            seen += 1
            digest = row["content_hash"]
            if first_of_content is not None:
                if digest in first_of_content:
                    continue
                first_of_content.add(digest)
            job = src.job_for(row, "rescan")
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
        # Finish this batch before asking for the next one: the query skips what is
        # finished, so it must not race with messages still in flight.
        worker.wait_idle(settle=0.0)
    return seen


def check_signatures(worker: Worker, window: timedelta) -> RescanSummary | None:
    """If clamd's signatures changed since the last completed rescan, rescan the window."""
    fingerprint = worker.service.fingerprints.refresh()
    if fingerprint is None or not worker.store.needs_rescan(fingerprint):
        return None
    log.info("signatures changed (%s): rescanning mail of the last %s", fingerprint, window)
    return rescan(worker, since=utcnow() - window)


def purge(config: Config, worker: Worker) -> None:
    """Delete quarantined copies, then store rows, older than ``retention_days``."""
    from spoolscan import quarantine

    days = config.quarantine.retention_days
    files = quarantine.purge(worker.store, days)
    removed = worker.store.purge(timedelta(days=days))
    log.info("purge: %d quarantined message(s) and %d finished message rows older than %d "
             "days removed", files, removed, days)


def start_scheduler(config: Config, worker: Worker) -> BackgroundScheduler:
    """Start the background scheduler with the configured jobs."""
    window = timedelta(seconds=config.schedule.rescan_window)
    scheduler = BackgroundScheduler()
    common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": 600,
              "replace_existing": True}
    scheduler.add_job(check_signatures, cron_trigger(config.schedule.signature_check),
                      args=(worker, window), id="signature_check", **common)
    scheduler.add_job(lambda: rescan(worker, since=utcnow() - window),
                      cron_trigger(config.schedule.nightly_rescan), id="nightly_rescan",
                      **common)
    scheduler.add_job(purge, cron_trigger(config.schedule.purge), args=(config, worker),
                      id="purge", **common)
    scheduler.start()
    return scheduler


def print_summary(summary: RescanSummary, out: TextIO = sys.stdout) -> None:
    print(summary.line(), file=out)
