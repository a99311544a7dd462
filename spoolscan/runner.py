"""Assembling the worker from the configuration: sources, scanner, store, scheduler."""

from __future__ import annotations

import logging
import signal
import threading

from spoolscan.config import Config, SourceConfig
from spoolscan.scanner import ClamdScanner
from spoolscan.store.repo import Store
from spoolscan.worker import Source, Worker

log = logging.getLogger(__name__)


def build_source(src: SourceConfig, config: Config, store: Store) -> Source:
    """The Source object for one ``[[source]]`` table."""
    if src.type == "maildir":
        from spoolscan.maildir_source import MaildirSource

        return MaildirSource(src, config, store)
    if src.type == "postfix-hold":
        from spoolscan.postfix.source import HoldSource

        return HoldSource(src, config, store)
    raise ValueError(f"unknown source type {src.type!r}")


def build_worker(config: Config, store: Store, only: str | None = None) -> Worker:
    """A Worker for every configured source (or only the one named ``only``)."""
    scanner = ClamdScanner(config.clamd, max_size=config.policy.max_size)
    sources = [build_source(s, config, store) for s in config.sources
               if only is None or s.name == only]
    return Worker(config, store, scanner, sources)


def run(config: Config, store: Store, once: bool = False,
        stop: threading.Event | None = None) -> int:
    """`spoolscan run`: the worker and the scheduler until SIGTERM/SIGINT (or ``once``)."""
    if not config.sources:
        log.error("no [[source]] configured: nothing to watch (see spoolscan.example.toml)")
        return 2
    worker = build_worker(config, store)
    names = ", ".join(f"{s.name} ({s.type})" for s in config.sources)
    if once:
        log.info("processing what is there now in: %s", names)
        worker.run_once()
        log.info("done: %s", _summary(worker))
        return 0

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    from spoolscan.jobs import start_scheduler

    scheduler = start_scheduler(config, worker)
    log.info("spoolscan started: sources %s; clamd %s", names, config.clamd.endpoint)
    try:
        worker.run_forever(stop)
    finally:
        scheduler.shutdown(wait=False)
    log.info("stopped: %s", _summary(worker))
    return 0


def _summary(worker: Worker) -> str:
    s = worker.stats
    return (f"{s['scanned']} scanned ({s['cached']} cached): {s['clean']} clean, "
            f"{s['infected']} infected, {s['unchecked']} unchecked, {s['error']} errors, "
            f"{s['stuck']} stuck, {s['unreadable']} unreadable")
