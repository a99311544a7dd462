"""Prometheus metrics (``[metrics] listen = "127.0.0.1:9466"``).

Counters are counted as the pipeline works; the gauges an admin alerts on (the hold
backlog and the age of its oldest message, messages retrying and stuck, whether clamd
answers, how old the signatures are) are read when Prometheus scrapes, so they are never
stale.  docs/operations.md has alert rules to paste.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from spoolscan.pipeline import Worker

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The worker's metrics, in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter("spoolscan_messages", "Messages scanned, by source, verdict "
                                "and action taken", ["source", "verdict", "action"],
                                registry=self.registry)
        self.scan_seconds = Histogram("spoolscan_scan_seconds", "clamd scan time (cache hits "
                                      "not included)", ["source"], buckets=LATENCY_BUCKETS,
                                      registry=self.registry)
        self.cached = Counter("spoolscan_cache_hits", "Verdicts served from the cache",
                              ["source"], registry=self.registry)
        self.retroactive = Counter("spoolscan_retroactive_detections", "Mail found infected "
                                   "by a rescan after it was clean", ["source"],
                                   registry=self.registry)
        self.failed_actions = Counter("spoolscan_failed_actions", "Releases, quarantines, "
                                      "deletions that failed (retried)", ["source", "action"],
                                      registry=self.registry)
        self.database_errors = Counter("spoolscan_database_errors", "Database operations "
                                       "that failed (mail stays where it is)",
                                       registry=self.registry)

    def watch(self, worker: Worker) -> None:
        """Also report the gauges read from ``worker`` at each scrape."""
        self.registry.register(_Gauges(worker))

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                          registry=self.registry)
        log.info("metrics on http://%s/metrics", listen)


class _Gauges(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        yield _gauge("spoolscan_in_pipeline", "Messages queued or being scanned and acted on",
                     [((), w.in_pipeline())])
        yield _gauge("spoolscan_clamd_up", "1 if clamd answered the last time it was asked",
                     [((), 0 if w.service.fingerprints.failing else 1)])
        states = getattr(w.service.client, "states", None)
        if states is not None:  # a pool of clamd servers
            pool = states()
            yield _gauge("spoolscan_clamd_server_up", "Per clamd server of the pool: 1 if "
                         "it gets scans (state up), 0 if down or its signatures differ "
                         "from the pool's (behind, differs)",
                         [((name, state), 1 if state == "up" else 0)
                          for name, state, _ in pool], ["server", "state"])
            yield _gauge("spoolscan_clamd_refused_scans", "Scans not sent to a clamd "
                         "server because its signatures differ from the pool's (since "
                         "start)", [((name,), refused) for name, _, refused in pool],
                         ["server"])
        backlog, oldest = [], []
        for name, source in w.sources.items():
            try:
                found = source.backlog()
            except Exception as exc:  # a scrape must not fail because a listing did
                log.debug("%s: backlog not read: %s", name, exc)
                continue
            if found is not None:
                backlog.append(((name,), found[0]))
                oldest.append(((name,), found[1]))
        yield _gauge("spoolscan_hold_backlog", "Messages on hold now", backlog, ["source"])
        yield _gauge("spoolscan_hold_oldest_seconds", "Age of the oldest message on hold",
                     oldest, ["source"])
        try:
            states = w.store.count_states(("retry", "stuck"))
            first_seen = w.store.fingerprint_first_seen(w.service.fingerprints.current())
        except Exception as exc:
            log.debug("metrics: store not read: %s", exc)
            return
        yield _gauge("spoolscan_messages_waiting", "Messages kept for a retry (retry) or "
                     "flagged for an admin (stuck)",
                     [((src, state), n) for (src, state), n in states.items()],
                     ["source", "state"])
        if first_seen is not None:
            yield _gauge("spoolscan_fingerprint_age_seconds", "Time since clamd's current "
                         "signatures were first seen", [((), time.time() - first_seen)])


def _gauge(name: str, doc: str, samples: Iterable[tuple[tuple[str, ...], float]],
           labels: list[str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels or [])
    for values, value in samples:
        family.add_metric(list(values), value)
    return family

