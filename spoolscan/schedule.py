"""Scheduled work (APScheduler): signature checks that trigger rescans, the nightly
rescan, the quarantine and store purge.

The schedule is defined in the configuration and kept in memory (one scheduler per
worker process; APScheduler job stores cannot be shared between processes).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from spoolscan.config import Config
from spoolscan.pipeline import Worker
from spoolscan.rescan import check_signatures, rescan
from spoolscan.store.repo import utcnow

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


def purge(config: Config, worker: Worker) -> None:
    """Delete quarantined copies, then store rows, older than ``retention_days``."""
    from spoolscan.quarantine import commands

    days = config.quarantine.retention_days
    files = commands.purge(worker.store, config, days)
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
