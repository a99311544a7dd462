"""The clamd pool: spread by scans in flight, failover, back-off, one set of signatures.

Unit tests with fake servers (the clock is the test's), then two real clamd servers
behind a hold queue: one killed mid-burst, then both, then restarted.
"""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import pytest
from conftest import running, wait_until
from mail import message

from spoolscan.clamd import ClamdError, ClamdUnreachable
from spoolscan.clamdpool import ClamdPool, client_for
from spoolscan.config import ClamdConfig, ConfigError, SourceConfig, parse_config
from spoolscan.model import ScanResult, Verdict
from spoolscan.runner import build_worker
from spoolscan.testing.clamd import ClamdInstance


class FakeServer:
    """Stands in for one ClamdClient of the pool."""

    def __init__(self, name: str, fingerprint: str = "ClamAV daily/27001/") -> None:
        self.endpoint = name
        self.fp = fingerprint
        self.up = True
        self.scans = 0
        self.gate: threading.Event | None = None
        self.hangs = False  # takes the message, then no answer (a scan bomb)

    def _check(self) -> None:
        if not self.up:
            raise ClamdUnreachable(f"{self.endpoint}: connection refused")

    def _command(self, command: str, timeout: float | None = None) -> str:
        self._check()
        return "PONG"

    def fingerprint(self, timeout: float = 10.0) -> str:
        self._check()
        return self.fp

    def exchange_stream(self, stream, deadline: float) -> ScanResult:
        self._check()
        if self.gate is not None:
            self.gate.wait(5)
        self.scans += 1
        data = stream.read()
        if self.hangs:
            raise TimeoutError("deadline passed")
        return ScanResult(Verdict.INFECTED if b"BAD" in data else Verdict.CLEAN)

    exchange_fd = None  # not used here


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_pool(*servers: FakeServer) -> tuple[ClamdPool, Clock]:
    clock = Clock()
    cfg = ClamdConfig(servers=tuple(f"/fake/{i}" for i in range(len(servers))), timeout=5)
    pool = ClamdPool(cfg, clock=clock)
    for member, server in zip(pool.members, servers, strict=True):
        member.client = server  # type: ignore[assignment]
    return pool, clock


def scan(pool: ClamdPool, data: bytes = b"hello") -> ScanResult:
    return pool.scan_stream(io.BytesIO(data), len(data))


def test_a_message_that_breaks_a_server_is_not_handed_to_the_next_one():
    """A server that took the message and gave no answer may have been broken by the
    message itself: that message gets an error (retried later), the others still flow."""
    a, b = FakeServer("a"), FakeServer("b")
    pool, _ = fake_pool(a, b)
    a.hangs = True
    b.scans = 10  # (ties go to the first server: a gets the message)
    result = scan(pool, b"bomb")
    assert result.verdict == Verdict.ERROR and "timed out" in (result.detail or "")
    assert b.scans == 10  # not tried on b
    a.hangs = False
    assert scan(pool).verdict == Verdict.CLEAN  # a still answers PING: still in the pool
    assert [m.down for m in pool.members] == [False, False]


def test_scans_go_to_the_server_with_fewest_in_flight():
    a, b = FakeServer("a"), FakeServer("b")
    pool, _ = fake_pool(a, b)
    pool.fingerprint()
    a.gate = threading.Event()  # a's scan hangs until released
    t = threading.Thread(target=scan, args=(pool,))
    t.start()
    wait_until(lambda: pool.members[0].inflight == 1, 5)
    for _ in range(3):
        assert scan(pool).verdict == Verdict.CLEAN
    assert b.scans == 3  # a is busy: b takes them
    a.gate.set()
    t.join()
    assert a.scans == 1


def test_a_failed_server_is_taken_out_and_retried_with_back_off():
    a, b = FakeServer("a"), FakeServer("b")
    pool, clock = fake_pool(a, b)
    pool.fingerprint()
    a.up = False
    results = [scan(pool, b"BAD") for _ in range(4)]
    assert all(r.verdict == Verdict.INFECTED for r in results)  # failover: nothing lost
    assert b.scans == 4 and pool.failovers == 1
    assert [s for _, s, _ in pool.states()] == ["down", "up"]
    a.up = True
    clock.now += 0.5
    scan(pool)
    assert a.scans == 0  # not yet: back-off of 1 s
    clock.now += 1.0
    pool.fingerprint()  # the health check PINGs it now
    assert [s for _, s, _ in pool.states()] == ["up", "up"]
    # Back-off doubles while it keeps failing, capped at 60 s.
    a.up = False
    for expected in (1, 2, 4, 8):
        pool.fingerprint()
        assert pool.members[0].retry_at - clock.now == expected
        clock.now = pool.members[0].retry_at
    pool.members[0].failures = 20
    pool.fingerprint()
    assert pool.members[0].retry_at - clock.now == 60


def test_no_server_answers_fails_closed_then_flows_again():
    a, b = FakeServer("a"), FakeServer("b")
    pool, clock = fake_pool(a, b)
    pool.fingerprint()
    a.up = b.up = False
    result = scan(pool)
    assert result.verdict == Verdict.ERROR and "clamd pool" in result.detail
    with pytest.raises(ClamdError):
        pool.fingerprint()
    b.up = True
    clock.now += 5
    assert scan(pool).verdict == Verdict.CLEAN  # probed (PING) and used at once


def test_a_server_with_other_signatures_gets_no_scans_until_it_catches_up():
    a, b = FakeServer("a", "ClamAV daily/27001/"), FakeServer("b", "ClamAV daily/27002/")
    pool, _ = fake_pool(a, b)
    assert pool.fingerprint() == "ClamAV daily/27002/"  # the newest signatures win
    for _ in range(3):
        scan(pool)
    assert (a.scans, b.scans) == (0, 3)
    assert pool.states()[0][1] == "behind"
    b.up = False  # the only up-to-date server is down: fail closed, never stamp wrongly
    assert scan(pool).verdict == Verdict.ERROR and a.scans == 0
    assert pool.states()[0][2] >= 1  # refusals counted
    a.fp = "ClamAV daily/27002/"
    pool.fingerprint()
    assert scan(pool).verdict == Verdict.CLEAN and a.scans == 1


def test_config_servers_and_a_pool_of_one():
    cfg = parse_config({"clamd": {"servers": ["/run/clamav/clamd.ctl", "scan1:3310"]}})
    assert cfg.clamd.members == ("/run/clamav/clamd.ctl", "scan1:3310")
    pool = client_for(cfg.clamd)
    assert isinstance(pool, ClamdPool)
    assert [m.client.socket for m in pool.members] == ["/run/clamav/clamd.ctl", None]
    assert [m.client.address for m in pool.members] == [None, "scan1:3310"]
    for bad in (["relative.sock"], ["host:"], [], ["/a", "/a"]):
        with pytest.raises(ConfigError, match="servers"):
            parse_config({"clamd": {"servers": bad}})
    with pytest.raises(ConfigError, match="servers replaces"):
        parse_config({"clamd": {"servers": ["/a"], "socket": "/b"}})
    single = client_for(parse_config({"clamd": {"address": "127.0.0.1:3310"}}).clamd)
    assert not isinstance(single, ClamdPool) and single.address == "127.0.0.1:3310"


# --- two real servers behind a hold queue --------------------------------------------------

RCPT = "rcpt@spoolscan.test"


@pytest.fixture
def two_clamds(tmp_path):
    instances = [ClamdInstance(tmp_path / f"clamd-{i}") for i in range(2)]
    for instance in instances:
        instance.start()
    yield instances
    for instance in instances:
        instance.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pool_of_two_one_killed_mid_burst_then_both_then_restarted(config, store, postfix,
                                                                    two_clamds):
    a, b = two_clamds
    src = SourceConfig(name="postfix", type="postfix-hold",
                       config_directory=str(postfix.config_dir), sweep_interval=0.5)
    cfg = replace(config, sources=(src,),
                  clamd=replace(config.clamd, socket=None,
                                servers=(str(a.socket_path), str(b.socket_path)),
                                database_directory=str(a.db_dir), timeout=5),
                  policy=replace(config.policy, retry_delay=0.2, max_attempts=50,
                                 local_domains=("spoolscan.test",)))
    worker = build_worker(cfg, store)
    with running(worker):
        for i in range(30):
            postfix.send(message(subject=f"burst {i}", body=f"distinct body {i}\n"),
                         recipients=[RCPT])
            if i == 10:
                a.process.kill()  # SIGKILL mid-burst
                a.process.wait()
        postfix.wait_delivered("rcpt", 30, timeout=60)
        assert postfix.held_ids() == []
        assert a.scan_count() > 0 and b.scan_count() > 0  # both had a share
        b.process.kill()
        b.process.wait()
        for i in range(3):
            postfix.send(message(subject=f"no clamd {i}"), recipients=[RCPT])
        postfix.wait_held(3)
        wait_until(lambda: store.count_states(("retry",)) != {}, 20)
        assert len(postfix.delivered("rcpt")) == 30 and len(postfix.held_ids()) == 3
        b.start()
        postfix.wait_delivered("rcpt", 33, timeout=60)
        wait_until(lambda: postfix.held_ids() == [], 20)
    assert worker.stats["error"] >= 3 and worker.stats["clean"] >= 33


def test_a_local_and_a_tcp_server_fildes_and_instream(tmp_path):
    """FILDES goes to the local socket, INSTREAM to the TCP server; equal signatures (the
    daily version) make one pool fingerprint."""
    import socket as socketmod

    from spoolscan.testing.clamd import EICAR

    with socketmod.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = ClamdInstance(tmp_path / "local")
    remote = ClamdInstance(tmp_path / "remote",
                           extra_conf=f"TCPSocket {port}\nTCPAddr 127.0.0.1\n")
    for instance in (local, remote):
        instance.start()
        instance.publish_daily(27001)
    try:
        cfg = ClamdConfig(servers=(str(local.socket_path), f"127.0.0.1:{port}"), timeout=10,
                          database_directory=str(local.db_dir))
        pool = client_for(cfg)
        assert isinstance(pool, ClamdPool)
        assert pool.fingerprint().endswith(" daily/27001/")  # engine, daily: one for both
        assert [s for _, s, _ in pool.states()] == ["up", "up"]
        sample = tmp_path / "eicar.com"
        sample.write_bytes(EICAR)
        before = (local.scan_count(), remote.scan_count())
        results = []
        with open(sample, "rb") as fh:
            for _ in range(12):
                results.append(pool.scan_fd(fh.fileno(), len(EICAR)))
        assert all(r.verdict == Verdict.INFECTED for r in results)
        assert local.scan_count() > before[0] and remote.scan_count() > before[1]
        found = [line for line in remote.log_path.read_text().splitlines() if "FOUND" in line]
        assert found and all("instream(127.0.0.1@" in line for line in found)  # INSTREAM
        found = [line for line in local.log_path.read_text().splitlines() if "FOUND" in line]
        assert found and all(str(sample) in line for line in found)  # FILDES: the file
    finally:
        local.stop()
        remote.stop()
