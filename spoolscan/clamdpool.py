"""A pool of clamd servers used as one client (``[clamd] servers = [...]``).

- **Spread:** each scan goes to the server with the fewest scans in flight (then the one
  that had fewest scans), so a slow server gets less.
- **Failover:** a server that gives no usable answer (refused, reset, timeout, a reply cut
  short) is taken out and the same content is sent to another server at once; an answer
  from clamd about the content (OK, FOUND, a clamd ERROR about the file) is final.
- **Back-off:** a server taken out is retried after 1 s, doubling up to 60 s, with a PING
  (and its fingerprint read) before any mail is sent to it again.
- **Fail closed:** when no server answers, the scan is an ``error`` (the mail stays where
  it is and is retried by the policy's back-off).
- **One set of signatures:** the pool's fingerprint is that of the servers with the newest
  signatures (highest ``daily`` version; else the fingerprint most servers have).  A
  server whose fingerprint differs gets no scans until it catches up (logged once per
  change, counted in ``refused``), so every verdict is stamped with the signatures that
  really made it.
- FILDES on local sockets, INSTREAM over TCP (``ClamdClient.exchange_fd``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO, Final

from spoolscan.clamd import ClamdClient, ClamdError, ClamdUnreachable
from spoolscan.config import ClamdConfig
from spoolscan.model import ScanResult, Verdict

log = logging.getLogger(__name__)

RETRY_FIRST: Final = 1.0  # seconds before a failed server is tried again, doubling
RETRY_MAX: Final = 60.0
PROBE_TIMEOUT: Final = 5.0  # PING and VERSION of the health checks: a server that is
# silent (a dropped TCP connection) holds up the fingerprint read no longer than this
_DAILY = re.compile(r"daily/(\d+)/")


@dataclass(eq=False)
class Member:
    """One server of the pool and what the pool knows of it."""

    client: ClamdClient
    inflight: int = 0
    scans: int = 0
    failures: int = 0  # consecutive
    down: bool = False
    retry_at: float = 0.0
    probing: bool = False
    fingerprint: str | None = None
    refused: int = 0  # scans not sent here because its signatures differed

    @property
    def name(self) -> str:
        return self.client.endpoint

    def state(self, pool_fingerprint: str | None) -> str:
        if self.down:
            return "down"
        if pool_fingerprint is not None and self.fingerprint != pool_fingerprint:
            return "behind" if _daily(self.fingerprint) < _daily(pool_fingerprint) else "differs"
        return "up"


def _daily(fingerprint: str | None) -> int:
    m = _DAILY.search(fingerprint or "")
    return int(m.group(1)) if m else -1


class ClamdPool:
    """The same interface as ``ClamdClient`` (scan_fd, scan_stream, ping, version,
    fingerprint, reload), over several servers.  Safe to share between threads."""

    def __init__(self, config: ClamdConfig, max_size: int | None = None,
                 servers: tuple[str, ...] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.max_size = max_size
        self.clock = clock
        self.members = [Member(ClamdClient(config, max_size, server))
                        for server in (servers or config.members)]
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        self.failovers = 0

    @property
    def endpoint(self) -> str:
        return "pool " + ", ".join(m.name for m in self.members)

    # --- health ----------------------------------------------------------------------

    def _failed(self, member: Member, why: str) -> None:
        with self._lock:
            member.failures += 1
            delay = min(RETRY_FIRST * 2 ** (member.failures - 1), RETRY_MAX)
            member.retry_at = self.clock() + delay
            member.probing = False
            if not member.down:
                member.down = True
                log.warning("clamd %s taken out of the pool: %s (retried in %gs)",
                            member.name, why, delay)

    def _answered(self, member: Member, fingerprint: str | None = None) -> None:
        with self._lock:
            if member.down:
                log.info("clamd %s is back in the pool", member.name)
            member.down = False
            member.failures = 0
            member.probing = False
            if fingerprint is not None:
                self._set_fingerprint(member, fingerprint)

    def _set_fingerprint(self, member: Member, fingerprint: str) -> None:
        """(under the lock)"""
        if fingerprint != member.fingerprint:
            member.fingerprint = fingerprint
            if self._fingerprint is not None and fingerprint != self._fingerprint:
                log.warning("clamd %s has signatures %s, the pool uses %s: no scans are sent "
                            "to it until they are the same", member.name, fingerprint,
                            self._fingerprint)

    def _probe(self, member: Member) -> bool:
        """PING a server due for a retry and read its fingerprint; True if it is back."""
        try:
            if member.client._command("PING", PROBE_TIMEOUT) != "PONG":
                raise ClamdError("no PONG")
            fingerprint = member.client.fingerprint(PROBE_TIMEOUT)
        except (ClamdError, OSError) as exc:
            self._failed(member, str(exc))
            return False
        self._answered(member, fingerprint)
        return True

    def fingerprint(self) -> str:
        """The pool's fingerprint, asking every server (a health check too): the newest
        signatures win.  ClamdError when no server answers."""
        now = self.clock()
        for member in self.members:
            if member.down:
                if member.retry_at <= now and not member.probing:
                    self._probe(member)
                continue
            try:
                fingerprint = member.client.fingerprint(PROBE_TIMEOUT)
            except ClamdError as exc:
                self._failed(member, str(exc))
                continue
            self._answered(member, fingerprint)
        with self._lock:
            seen = [m.fingerprint for m in self.members
                    if not m.down and m.fingerprint is not None]
            if not seen:
                self._fingerprint = None
                raise ClamdError("no clamd server of the pool answers ("
                                 + ", ".join(m.name for m in self.members) + ")")
            counts = Counter(seen)
            chosen = max(counts, key=lambda f: (_daily(f), counts[f], f))
            if chosen != self._fingerprint:
                if self._fingerprint is not None:
                    log.info("the clamd pool now uses signatures %s", chosen)
                self._fingerprint = chosen
                for m in self.members:
                    if not m.down and m.fingerprint != chosen:
                        log.warning("clamd %s has signatures %s, the pool uses %s: no scans "
                                    "are sent to it until they are the same", m.name,
                                    m.fingerprint, chosen)
            return chosen

    def states(self) -> list[tuple[str, str, int]]:
        """(server, up|down|behind|differs, scans refused) for the metrics."""
        with self._lock:
            return [(m.name, m.state(self._fingerprint), m.refused) for m in self.members]

    # --- choosing a server -------------------------------------------------------------

    def _acquire(self, tried: set[Member]) -> Member | None:
        """The server for the next attempt (its in-flight count taken), or None."""
        while True:
            with self._lock:
                usable = [m for m in self.members if m not in tried and not m.down
                          and (self._fingerprint is None
                               or m.fingerprint == self._fingerprint)]
                if usable:
                    member = min(usable, key=lambda m: (m.inflight, m.scans))
                    member.inflight += 1
                    member.scans += 1
                    return member
                for m in self.members:
                    if m not in tried and not m.down and m.fingerprint != self._fingerprint:
                        m.refused += 1
                now = self.clock()
                due = [m for m in self.members if m not in tried and m.down
                       and m.retry_at <= now and not m.probing]
                if not due:
                    return None
                probe = due[0]
                probe.probing = True
            tried.add(probe)
            if self._probe(probe) and (self._fingerprint is None
                                       or probe.fingerprint == self._fingerprint):
                tried.discard(probe)

    def _release(self, member: Member) -> None:
        with self._lock:
            member.inflight -= 1

    # --- scanning ----------------------------------------------------------------------

    def _too_large(self, size: int | None) -> ScanResult | None:
        if self.max_size is not None and size is not None and size > self.max_size:
            return ScanResult(Verdict.UNCHECKED, detail=f"{size} bytes is over max_size "
                                                        f"({self.max_size}); not scanned")
        return None

    def _scan(self, exchange: Callable[[ClamdClient, float], ScanResult],
              rewind: Callable[[], bool]) -> ScanResult:
        started = self.clock()
        tried: set[Member] = set()
        problems: list[str] = []
        while True:
            if problems and not rewind():
                break  # the content cannot be sent again: retried later by the policy
            member = self._acquire(tried)
            if member is None:
                break
            tried.add(member)
            try:
                result = exchange(member.client, time.monotonic() + self.config.timeout)
            except ClamdUnreachable as exc:  # nothing was sent: another server may scan it
                problems.append(f"{member.name}: {exc}")
                self._failed(member, str(exc))
                with self._lock:
                    self.failovers += 1
                continue
            except (ClamdError, TimeoutError, OSError) as exc:
                # The server took (some of) the message and gave no usable answer: the
                # message itself may be what broke it (a scan bomb past the timeout, a
                # crash).  Handing it to every other server in turn would take the whole
                # pool down for everyone, so it is this message's error (retried later by
                # the policy); a PING tells whether the server is down for all.
                why = (f"timed out after {self.config.timeout:g}s"
                       if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__)
                self._probe(member)
                return ScanResult(Verdict.ERROR, detail=f"clamd {member.name}: {why}",
                                  duration_ms=int((self.clock() - started) * 1000))
            finally:
                self._release(member)
            self._answered(member)
            return replace(result, duration_ms=int((self.clock() - started) * 1000))
        detail = "; ".join(problems) if problems else "no clamd server of the pool is usable"
        return ScanResult(Verdict.ERROR, detail=f"clamd pool: {detail}",
                          duration_ms=int((self.clock() - started) * 1000))

    def scan_fd(self, fd: int, size: int | None = None) -> ScanResult:
        too_large = self._too_large(size)
        if too_large is not None:
            return too_large

        def rewind() -> bool:
            os.lseek(fd, 0, os.SEEK_SET)
            return True

        return self._scan(lambda client, deadline: client.exchange_fd(fd, deadline), rewind)

    def scan_stream(self, stream: BinaryIO, size: int | None = None) -> ScanResult:
        too_large = self._too_large(size)
        if too_large is not None:
            return too_large
        start = stream.tell() if stream.seekable() else None

        def rewind() -> bool:
            if start is None:
                return False
            stream.seek(start)
            return True

        return self._scan(lambda client, deadline: client.exchange_stream(stream, deadline),
                          rewind)

    # --- control -----------------------------------------------------------------------

    def ping(self, timeout: float = 5.0) -> bool:
        """True if any server answers PING."""
        return any(m.client.ping(timeout) for m in self.members)

    def version(self, timeout: float = 10.0) -> str:
        """The VERSION of the first server that answers."""
        problems = []
        for m in self.members:
            try:
                return m.client.version(timeout)
            except ClamdError as exc:
                problems.append(str(exc))
        raise ClamdError("; ".join(problems))

    def reload(self) -> str:
        """RELOAD every server that answers."""
        replies = []
        for m in self.members:
            try:
                replies.append(m.client.reload())
            except ClamdError as exc:
                replies.append(f"{m.name}: {exc}")
        return "; ".join(replies)


Scanner = ClamdClient | ClamdPool


def client_for(config: ClamdConfig, max_size: int | None = None) -> ClamdClient | ClamdPool:
    """The client for ``[clamd]``: a pool when several servers are configured (one server
    is the plain client: tried on every scan, no back-off)."""
    if len(config.members) > 1:
        return ClamdPool(config, max_size)
    return ClamdClient(config, max_size, config.members[0] if config.servers else None)
