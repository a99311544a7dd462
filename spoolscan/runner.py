"""Assembling the worker from the configuration: sources, scanner, store, scheduler."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from spoolscan.broker import Broker
from spoolscan.clamdpool import Scanner, client_for
from spoolscan.config import Config, ConfigError, load_config
from spoolscan.logs import NOTICE
from spoolscan.notify_systemd import SystemdNotifier
from spoolscan.pipeline import Worker
from spoolscan.quarantine.store import QuarantineStore
from spoolscan.sources import build_source
from spoolscan.sources.base import Source
from spoolscan.store.repo import Store
from spoolscan.text import printable

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from spoolscan.metrics import Metrics
    from spoolscan.notify import Notifier

log = logging.getLogger(__name__)


def build_worker(config: Config, store: Store, only: str | None = None,
                 broker: Broker | None = None, metrics: Metrics | None = None) -> Worker:
    """A Worker for every configured source (or only the one named ``only``)."""
    broker = broker or Broker()
    return Worker(config, store, build_client(config), build_sources(config, store, broker, only),
                  metrics=metrics, notifier=build_notifier(config, store))


def build_notifier(config: Config, store: Store) -> Notifier | None:
    """The notifier ``[notify]`` asks for (None: nobody to tell)."""
    if not (config.notify.admin or config.notify.recipients):
        return None
    from spoolscan.notify import Notifier

    return Notifier(config.notify, store, config.policy.local_domains,
                    config.policy.max_attempts)


def build_client(config: Config) -> Scanner:
    return client_for(config.clamd, max_size=config.policy.max_size)


def build_sources(config: Config, store: Store, broker: Broker,
                  only: str | None = None) -> list[Source]:
    return [build_source(s, config, store, broker) for s in config.sources
            if only is None or s.name == only]


def prepare(config: Config) -> None:
    """What must exist before the worker acts: the quarantine store (0700)."""
    QuarantineStore(config.quarantine.directory).prepare()


def run(config: Config, store: Store, once: bool = False,
        stop: threading.Event | None = None, broker: Broker | None = None,
        on_reload: Callable[[Config], None] | None = None) -> int:
    """`spoolscan run`: the worker and the scheduler until SIGTERM/SIGINT (or ``once``).

    SIGHUP re-reads the configuration file: sources added, removed or changed, policy,
    schedule, clamd address, logging (``on_reload``).  A file that does not load leaves
    everything as it was (and says why)."""
    if not config.sources:
        log.error("no [[source]] configured: nothing to watch (see spoolscan.example.toml)")
        return 2
    prepare(config)
    broker = broker or Broker()
    metrics = None
    if config.metrics.listen and not once:
        from spoolscan.metrics import Metrics

        metrics = Metrics()
    worker = build_worker(config, store, broker=broker, metrics=metrics)
    if once:
        log.info("processing what is there now in: %s", _names(config))
        worker.run_once()
        log.info("done: %s", _summary(worker))
        return 0

    stop = stop or threading.Event()
    main = Main(config, store, broker, worker, on_reload)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: main.reload_requested.set())
    if metrics is not None and config.metrics.listen:
        metrics.watch(worker)
        metrics.serve(config.metrics.listen)
    main.start_scheduler()
    log.info("spoolscan started: sources %s; clamd %s", _names(config), config.clamd.endpoint)
    main.notifier.send(READY=1, STATUS=f"watching {_names(config)}")
    try:
        worker.run_forever(stop, every=main.tick)
    finally:
        main.notifier.send(STOPPING=1, STATUS="finishing the messages in flight")
        main.scheduler_shutdown()
    log.info("stopped: %s", _summary(worker))
    return 0


class Main:
    """What `spoolscan run` does between turns of the worker's loop: reloads on SIGHUP,
    the systemd watchdog and status line."""

    # The commit loop turns at least every 0.2 s; a minute without a turn is a hang
    # (a database call that never returns), and systemd should restart us.
    HUNG_AFTER = 60.0

    def __init__(self, config: Config, store: Store, broker: Broker, worker: Worker,
                 on_reload: Callable[[Config], None] | None) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self.worker = worker
        self.on_reload = on_reload
        self.reload_requested = threading.Event()
        self.notifier = SystemdNotifier()
        self.watchdog_every = self.notifier.watchdog_interval()
        self._last_ping = 0.0
        self._last_status = ""
        self._scheduler: BackgroundScheduler | None = None

    def start_scheduler(self) -> None:
        from spoolscan.schedule import start_scheduler

        self._scheduler = start_scheduler(self.config, self.worker)

    def scheduler_shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def tick(self) -> None:
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.reload()
        now = time.monotonic()
        if (self.watchdog_every is not None and now - self._last_ping >= self.watchdog_every
                and now - self.worker.heartbeat < self.HUNG_AFTER):
            self.notifier.send(WATCHDOG=1)
            self._last_ping = now
        if self.notifier.enabled:
            status = self.status()
            if status != self._last_status:
                self.notifier.send(STATUS=status)
                self._last_status = status

    def status(self) -> str:
        s = self.worker.stats
        return (f"{self.worker.in_pipeline()} in the pipeline; {s['scanned']} scanned, "
                f"{s['infected']} infected, {s['unchecked'] + s['error']} not checked")

    def reload(self) -> None:
        """Re-read the configuration file; on any error keep the running configuration."""
        path = self.config.path
        self.notifier.send(RELOADING=1, STATUS="reloading the configuration")
        try:
            new = load_config(path)
            if not new.sources:
                raise ConfigError("no [[source]] configured")
            self.broker.reload()  # the privileged helper allows what the new file names
            sources = build_sources(new, self.store, self.broker)
            QuarantineStore(new.quarantine.directory).prepare()
        except Exception as exc:
            log.error("reload: %s: %s; still running with the previous configuration",
                      path or "built-in defaults", printable(str(exc)))
            self.notifier.send(READY=1)
            return
        for what in _needs_restart(self.config, new):
            log.warning("reload: %s changed; that takes effect at the next restart", what)
        if self.on_reload is not None:
            self.on_reload(new)
        self.worker.reconfigure(new, build_client(new), sources)
        if self.worker.notifier is not None:
            self.worker.notifier.config = new.notify
        self.config = new
        self.scheduler_shutdown()
        self.start_scheduler()
        log.log(NOTICE, "reloaded %s: sources %s", path, _names(new))
        self.notifier.send(READY=1, STATUS=f"reloaded; watching {_names(new)}")


def _needs_restart(old: Config, new: Config) -> list[str]:
    changed = []
    if old.database.url != new.database.url:
        changed.append("[database] url")
    if old.clamd.concurrency != new.clamd.concurrency:
        changed.append("[clamd] concurrency")
    if old.privileges != new.privileges:
        changed.append("[privileges]")
    if old.metrics != new.metrics:
        changed.append("[metrics]")
    if old.quarantine.directory != new.quarantine.directory:
        changed.append("[quarantine] directory")
    return changed


def _names(config: Config) -> str:
    return ", ".join(f"{s.name} ({s.type})" for s in config.sources)


def _summary(worker: Worker) -> str:
    s = worker.stats
    return (f"{s['scanned']} scanned ({s['cached']} cached): {s['clean']} clean, "
            f"{s['infected']} infected, {s['unchecked']} unchecked, {s['error']} errors, "
            f"{s['stuck']} stuck, {s['unreadable']} unreadable")
