"""Assembling the worker from the configuration: sources, scanner, store, scheduler."""

from __future__ import annotations

import logging
import signal
import threading

from spoolscan.broker import Broker
from spoolscan.clamd import ClamdClient
from spoolscan.config import Config
from spoolscan.pipeline import Worker
from spoolscan.quarantine.store import QuarantineStore
from spoolscan.sources import build_source
from spoolscan.store.repo import Store

log = logging.getLogger(__name__)


def build_worker(config: Config, store: Store, only: str | None = None,
                 broker: Broker | None = None) -> Worker:
    """A Worker for every configured source (or only the one named ``only``)."""
    broker = broker or Broker()
    client = ClamdClient(config.clamd, max_size=config.policy.max_size)
    sources = [build_source(s, config, store, broker) for s in config.sources
               if only is None or s.name == only]
    return Worker(config, store, client, sources)


def prepare(config: Config) -> None:
    """What must exist before the worker acts: the quarantine store (0700)."""
    QuarantineStore(config.quarantine.directory).prepare()


def run(config: Config, store: Store, once: bool = False,
        stop: threading.Event | None = None, broker: Broker | None = None) -> int:
    """`spoolscan run`: the worker and the scheduler until SIGTERM/SIGINT (or ``once``)."""
    if not config.sources:
        log.error("no [[source]] configured: nothing to watch (see spoolscan.example.toml)")
        return 2
    prepare(config)
    worker = build_worker(config, store, broker=broker)
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
    from spoolscan.schedule import start_scheduler

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
