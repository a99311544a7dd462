"""The hold-queue source against a real Postfix: release, quarantine, keep held, recover.

Each test gets its own private Postfix instance (``/^Received:/ HOLD``), sends real mail
over SMTP, runs the worker and asserts where every message ends up: delivered to the
Maildir, in quarantine, or still held, with the rows in the store.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import hold_source_toml, running, wait_until, write_config
from mail import EICAR, eicar_message, message
from sqlalchemy import text

from spoolscan.broker import Broker
from spoolscan.config import Config, SourceConfig
from spoolscan.runner import build_worker
from spoolscan.sources.hold import HoldSource, direction
from spoolscan.store.repo import DONE, STUCK, Store
from spoolscan.testing.clamd import TESTFILES_DIR, ClamdInstance
from spoolscan.testing.postfix import PostfixInstance

RCPT = "rcpt@spoolscan.test"


@pytest.fixture
def postfix_long(tmp_path: Path):
    instance = PostfixInstance(tmp_path / "postfix-long", long_queue_ids=True)
    instance.start()
    yield instance
    instance.stop()


def hold_config(config: Config, pf: PostfixInstance, **policy) -> Config:
    src = SourceConfig(name="postfix", type="postfix-hold", config_directory=str(pf.config_dir),
                       sweep_interval=0.5)
    policy = {"retry_delay": 0.2, "max_attempts": 3, "local_domains": ("spoolscan.test",),
              **policy}
    return replace(config, sources=(src,), policy=replace(config.policy, **policy))


def run_until(worker, condition, timeout: float = 30.0) -> None:
    """Run the worker (watchers + sweeps) until ``condition()`` holds."""
    with running(worker):
        wait_until(condition, timeout)


def scans(store: Store, where: str = "1=1") -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            f"SELECT * FROM v_scans WHERE {where} ORDER BY scan_id")).mappings()]


def message_rows(store: Store) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text("SELECT * FROM messages")).mappings()]


def test_mail_is_put_on_hold_by_the_test_postfix(postfix):
    qid = postfix.send(message())
    assert postfix.wait_held(1) == [qid]


def test_clean_mail_is_released_and_delivered(config, store, postfix):
    cfg = hold_config(config, postfix)
    qid = postfix.send(message(subject="clean one"), recipients=[RCPT])
    postfix.wait_held(1)
    build_worker(cfg, store).run_once()
    delivered = postfix.wait_delivered("rcpt", 1)
    assert b"clean one" in delivered[0].read_bytes()
    (row,) = scans(store)
    assert (row["queue_id"], row["verdict"], row["action"], row["action_outcome"]) == \
        (qid, "clean", "release", "ok")
    assert row["direction"] == "inbound" and row["sender"] == "sender@example.com"


def test_infected_mail_is_quarantined_and_never_delivered(config, store, postfix):
    cfg = hold_config(config, postfix)
    qid = postfix.send(eicar_message(), recipients=[RCPT])
    postfix.wait_held(1)
    build_worker(cfg, store).run_once()
    assert postfix.held_ids() == []
    time.sleep(1)
    assert postfix.delivered("rcpt") == []
    (row,) = scans(store)
    assert (row["verdict"], row["action"], row["action_outcome"]) == \
        ("infected", "quarantine", "ok")
    with store.engine.connect() as conn:
        qpath = conn.execute(text("SELECT quarantine_path FROM actions "
                                 "WHERE outcome = 'ok'")).scalar()
    quarantined = Path(qpath)
    assert b"X5O!P%@AP" in quarantined.read_bytes() or b"WDVPIVAlQEFQ" in \
        quarantined.read_bytes()
    envelope = json.loads((quarantined.parent / "meta.json").read_text())
    assert envelope["queue_id"] == qid and envelope["recipients"] == [RCPT]
    assert quarantined.stat().st_mode & 0o777 == 0o600
    assert quarantined.parent.stat().st_mode & 0o777 == 0o700


def test_held_mail_too_large_to_replay_is_read_twice_from_the_queue_file(
        config, store, postfix):
    # A held message is hashed, then sent to clamd: a small one's content is kept from
    # the first read for the second, a larger one is decoded from its records again.
    # Both ways must see every byte.
    from spoolscan.postfix.queuefile import REPLAY_LIMIT

    # 1.5 MiB: above what is replayed, below the test clamd's MaxFileSize (2M).
    filler = "A clean line of a long report.\n" * (1536 * 1024 // 31)
    assert len(filler) > REPLAY_LIMIT
    cfg = hold_config(config, postfix)
    infected = postfix.send(message(subject="big, infected", body=filler, attachment=EICAR,
                                    filename="eicar.com"), recipients=[RCPT])
    clean = postfix.send(message(subject="big, clean", body=filler), recipients=[RCPT])
    postfix.wait_held(2)
    build_worker(cfg, store).run_once()
    verdicts = {r["location"]: (r["verdict"], r["action"]) for r in scans(store)}
    assert verdicts == {infected: ("infected", "quarantine"), clean: ("clean", "release")}
    wait_until(lambda: len(postfix.delivered("rcpt")) == 1)
    assert all(r["size"] > REPLAY_LIMIT for r in message_rows(store))


def test_clamav_testfiles_attachments_are_quarantined(config, store, postfix):
    cfg = hold_config(config, postfix)
    samples = ["clam.zip", "clam.pdf", "clam.7z", "clam.tar.gz", "clam.mail"]
    for name in samples:
        data = (TESTFILES_DIR / name).read_bytes()
        postfix.send(message(subject=name, attachment=data, filename=name), recipients=[RCPT])
    postfix.send(message(subject="harmless"), recipients=[RCPT])
    postfix.wait_held(len(samples) + 1)
    build_worker(cfg, store).run_once()
    delivered = postfix.wait_delivered("rcpt", 1)
    time.sleep(1)
    assert len(postfix.delivered("rcpt")) == 1 and b"harmless" in delivered[0].read_bytes()
    verdicts = sorted(r["verdict"] for r in scans(store))
    assert verdicts == ["clean"] + ["infected"] * len(samples)
    assert postfix.held_ids() == []


def test_long_queue_ids_work_the_same(config, store, postfix_long):
    cfg = hold_config(config, postfix_long)
    clean = postfix_long.send(message(subject="long clean"), recipients=[RCPT])
    bad = postfix_long.send(eicar_message(), recipients=[RCPT])
    assert len(clean) > 12 and "z" in clean  # a long ID
    postfix_long.wait_held(2)
    build_worker(cfg, store).run_once()
    postfix_long.wait_delivered("rcpt", 1)
    rows = {r["queue_id"]: r for r in scans(store)}
    assert rows[clean]["action"] == "release" and rows[bad]["action"] == "quarantine"


def test_clamd_down_keeps_mail_held_then_stuck_then_drained(config, store, postfix, tmp_path):
    private = ClamdInstance(tmp_path / "clamd2")
    cfg = hold_config(config, postfix, max_attempts=2, retry_delay=0.3)
    cfg = replace(cfg, clamd=replace(cfg.clamd, socket=str(private.socket_path)))
    qid = postfix.send(message(subject="waits for clamd"), recipients=[RCPT])
    postfix.wait_held(1)
    worker = build_worker(cfg, store)

    def stuck() -> bool:
        return any(r["state"] == STUCK for r in message_rows(store))

    run_until(worker, stuck)
    assert postfix.held_ids() == [qid]  # never released unscanned
    assert postfix.delivered("rcpt") == []
    assert all(r["verdict"] == "error" for r in scans(store))

    private.start()
    try:
        worker = build_worker(cfg, store)
        run_until(worker, lambda: postfix.held_ids() == [], timeout=30)
    finally:
        private.stop()
    postfix.wait_delivered("rcpt", 1)
    (row,) = message_rows(store)
    assert (row["state"], row["verdict"]) == (DONE, "clean")


def test_unchecked_mail_stays_held(config, store, postfix):
    cfg = hold_config(config, postfix, max_size=10_000, max_attempts=1)
    qid = postfix.send(message(body="z" * 20_000), recipients=[RCPT])
    postfix.wait_held(1)
    build_worker(cfg, store).run_once()
    assert postfix.held_ids() == [qid]
    (row,) = message_rows(store)
    assert (row["verdict"], row["state"]) == ("unchecked", STUCK)


def test_committed_clean_verdict_without_release_is_released_on_restart(config, store,
                                                                       postfix):
    """A crash between the commit and postsuper: the next start reconciles."""
    from spoolscan.store.repo import VERDICT, ScanRecord

    cfg = hold_config(config, postfix)
    qid = postfix.send(message(subject="crash in between"), recipients=[RCPT])
    postfix.wait_held(1)
    source = HoldSource(cfg.sources[0], cfg, store, Broker())
    rel = str(postfix.held_path(qid).relative_to(postfix.queue_dir / "hold"))
    info, _ = source.examine(source.broker.hold_stat(source.queue_dir, rel)).data
    store.record_scans([ScanRecord(message=info, verdict="clean", signature=None, detail=None,
                                   fingerprint="x", duration_ms=1, trigger="arrival",
                                   cached=False, state=VERDICT)])
    build_worker(cfg, store).run_once()
    postfix.wait_delivered("rcpt", 1)
    assert postfix.held_ids() == []
    (row,) = message_rows(store)
    assert row["state"] == DONE


def write_as_postfix(path: Path, data: bytes) -> None:
    pw = pwd.getpwnam("postfix")
    path.write_bytes(data)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o700)


def test_corrupt_queue_files_are_flagged_and_the_rest_flows(config, store, postfix, caplog):
    cfg = hold_config(config, postfix, max_attempts=2, retry_delay=0.1)
    good = postfix.send(message(subject="good"), recipients=[RCPT])
    postfix.wait_held(1)
    real = postfix.held_path(good).read_bytes()
    hold = postfix.queue_dir / "hold"
    write_as_postfix(hold / "ABCDEF12345", real[: len(real) // 2])  # truncated
    write_as_postfix(hold / "BCDEF123456", b"garbage that is not a queue file")
    write_as_postfix(hold / "CDEF1234567", b"")
    worker = build_worker(cfg, store)

    def settled() -> bool:
        rows = message_rows(store)
        return (postfix.delivered("rcpt") != [] and
                sum(r["state"] == STUCK for r in rows) == 3)

    run_until(worker, settled)
    rows = {r["queue_id"]: r for r in message_rows(store)}
    for bad in ("ABCDEF12345", "BCDEF123456", "CDEF1234567"):
        assert rows[bad]["state"] == STUCK and rows[bad]["last_error"]
        assert (hold / bad).exists()  # kept where it was, for an admin
    assert rows[good]["state"] == DONE
    assert "cannot be read" in caplog.text


def test_direction_is_decided_by_local_domains():
    local = ("example.org",)
    assert direction("a@remote.net", ("b@example.org",), local) == "inbound"
    assert direction("a@example.org", ("b@remote.net",), local) == "outbound"
    assert direction("a@mail.example.org", ("b@example.org",), local) == "internal"
    assert direction("a@example.org", ("b@example.org", "c@remote.net"), local) == "outbound"


def test_the_log_line_starts_with_the_queue_id(config, store, postfix, caplog):
    import logging

    caplog.set_level(logging.INFO)
    cfg = hold_config(config, postfix)
    qid = postfix.send(eicar_message(), recipients=[RCPT], sender="x@spoolscan.test")
    postfix.wait_held(1)
    build_worker(cfg, store).run_once()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(qid + ":")]
    assert any("verdict=infected signature=Spoolscan.Test.EICAR-NDB.UNOFFICIAL "
               "action=quarantine direction=internal from=<x@spoolscan.test> "
               "to=<rcpt@spoolscan.test> nrcpt=1" in line
               for line in lines), lines


def test_source_reads_queue_directory_from_postconf(config, store, postfix):
    cfg = hold_config(config, postfix)
    source = HoldSource(cfg.sources[0], cfg, store, Broker())
    assert Path(source.queue_dir) == postfix.queue_dir


@pytest.mark.slow
def test_worker_killed_mid_burst_loses_nothing(config, db_url, postfix, tmp_path):
    """SIGKILL in the middle of a 200-message burst, restart: every message ends up
    delivered (clean) or quarantined (infected); none lost, none delivered twice."""
    cfg = hold_config(config, postfix)
    config_file = write_config(tmp_path / "kill.toml", cfg,
                               extra=hold_source_toml(postfix.config_dir))
    cmd = [sys.executable, "-m", "spoolscan", "--config", str(config_file)]
    infected_subjects, clean_subjects = set(), set()
    for i in range(200):
        if i % 10 == 0:
            postfix.send(eicar_message(subject=f"bad {i}"), recipients=[RCPT])
            infected_subjects.add(f"bad {i}")
        else:
            postfix.send(message(subject=f"good {i}"), recipients=[RCPT])
            clean_subjects.add(f"good {i}")
    postfix.wait_held(200, timeout=60)
    proc = subprocess.Popen([*cmd, "run"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # Killed at the first release seen: a worker that commits a large batch at once
    # (a loaded machine) could otherwise empty hold/ between two looks.
    while len(postfix.held_ids()) >= 200 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert postfix.held_ids(), "the worker finished before it could be killed"
    subprocess.run([*cmd, "run", "--once"], check=True, capture_output=True, timeout=120)
    postfix.wait_delivered("rcpt", len(clean_subjects), timeout=60)
    time.sleep(1)
    subjects = []
    for path in postfix.delivered("rcpt"):
        for line in path.read_bytes().splitlines():
            if line.startswith(b"Subject: "):
                subjects.append(line[9:].decode())
                break
    assert sorted(subjects) == sorted(clean_subjects)  # each once, no infected one
    assert postfix.held_ids() == []
    store = Store.open(db_url)
    with store.engine.connect() as conn:
        quarantined = conn.execute(text(
            "SELECT count(DISTINCT message_id) FROM actions "
            "WHERE action = 'quarantine' AND outcome = 'ok'")).scalar()
    store.close()
    assert quarantined == len(infected_subjects)


def test_database_down_keeps_mail_held_until_it_is_back(config, store, postfix, caplog):
    """No verdict committed, no action: with the database failing, mail stays on hold."""
    from sqlalchemy.exc import OperationalError

    cfg = hold_config(config, postfix)
    qid = postfix.send(message(subject="db down"), recipients=[RCPT])
    postfix.wait_held(1)
    worker = build_worker(cfg, store)
    real = worker.store.record_scans

    def down(records, plan=None):
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    worker.store.record_scans = down  # type: ignore[method-assign]
    worker.run_once()
    assert postfix.held_ids() == [qid]
    assert "database unavailable" in caplog.text
    worker.store.record_scans = real  # type: ignore[method-assign]
    build_worker(cfg, store).run_once()
    postfix.wait_delivered("rcpt", 1)
    assert postfix.held_ids() == []


def test_a_sweep_does_not_call_gone_what_arrived_after_it_listed(config, store, postfix):
    from datetime import timedelta

    from spoolscan.store.repo import GONE, RETRY, MessageInfo, ScanRecord, utcnow

    cfg = hold_config(config, postfix)
    source = HoldSource(cfg.sources[0], cfg, store, Broker())
    before = utcnow() - timedelta(seconds=5)
    info = MessageInfo(source="postfix", kind="postfix-hold",
                       identity=f"{source.host}/ABCDEF0/1/999999", location="ABCDEF0",
                       queue_id="ABCDEF0")
    store.record_scans([ScanRecord(message=info, verdict="error", signature=None,
                                   detail="clamd down", fingerprint=None, duration_ms=0,
                                   trigger="arrival", cached=False, state=RETRY)])
    source.reconcile(set(), before)  # a sweep that listed hold/ before it arrived
    assert message_rows(store)[0]["state"] == RETRY
    source.reconcile(set(), utcnow() + timedelta(seconds=1))  # a later sweep
    assert message_rows(store)[0]["state"] == GONE


def test_hashed_hold_directories_are_watched(config, store, postfix):
    """With hold in hash_queue_names, held files live in hold/<hex>/<ID>."""
    postfix.postconf(hash_queue_names="deferred, defer, hold")
    cfg = hold_config(config, postfix)
    worker = build_worker(cfg, store)

    def settled() -> bool:
        return len(postfix.delivered("rcpt")) == 1 and postfix.held_ids() == []

    with running(worker):
        time.sleep(0.5)  # watching before the mail arrives: events, not only sweeps
        clean = postfix.send(message(subject="hashed"), recipients=[RCPT])
        eicar = postfix.send(eicar_message(), recipients=[RCPT])
        wait_until(settled)
    assert settled()
    rows = {r["queue_id"]: r for r in scans(store)}
    assert rows[clean]["action"] == "release" and rows[eicar]["action"] == "quarantine"
    assert any(p.is_dir() for p in (postfix.queue_dir / "hold").iterdir())


@pytest.mark.parametrize("outcome", ["pending", "failed"])
def test_an_unfinished_quarantine_is_finished_not_copied_again(config, store, postfix,
                                                               outcome):
    """SIGKILL between the copy into the quarantine store and `postsuper -d` (pending), or
    `postsuper -d` failing while Postfix is stopped (failed) — the fault matrix's sigkill
    and postfix-stopped rows: the next attempt scans the message again and must finish
    that copy, not make another one under the new scan's name."""
    import io

    from spoolscan.model import ActionOutcome
    from spoolscan.quarantine.store import QuarantineStore
    from spoolscan.store.repo import ACTING, ActionRecord, ScanRecord

    cfg = hold_config(config, postfix)
    qid = postfix.send(eicar_message(subject="killed mid-quarantine"), recipients=[RCPT])
    postfix.wait_held(1)
    source = HoldSource(cfg.sources[0], cfg, store, Broker())
    rel = str(postfix.held_path(qid).relative_to(postfix.queue_dir / "hold"))
    info, _ = source.examine(source.broker.hold_stat(source.queue_dir, rel)).data
    (stored,) = store.record_scans([ScanRecord(
        message=info, verdict="infected", signature="Spoolscan.Test.EICAR", detail=None,
        fingerprint="x", duration_ms=1, trigger="arrival", cached=False, state=ACTING)])
    qstore = QuarantineStore(cfg.quarantine.directory)
    qstore.prepare()
    path = qstore.path_for(stored.message_id, stored.scan_id)
    store.record_actions([ActionRecord(stored.message_id, stored.scan_id, "quarantine",
                                       ActionOutcome(outcome), "infected",
                                       quarantine_path=path)])
    qstore.put(path, io.BytesIO(postfix.held_path(qid).read_bytes()), {"queue_id": qid})

    build_worker(cfg, store).run_once()
    assert postfix.held_ids() == []
    copies = sorted(Path(cfg.quarantine.directory).rglob("message.eml"))
    assert [str(c) for c in copies] == [path]
    with store.engine.connect() as conn:
        done = conn.execute(text("SELECT quarantine_path FROM actions WHERE outcome = 'ok' "
                                 "AND action = 'quarantine'")).scalars().all()
    assert done == [path]


def test_mail_flows_as_soon_as_a_database_outage_ends(config, store, postfix):
    """Verdicts that cannot be recorded (SQLite's disk full) while sweeps keep running:
    once the database takes writes again the mail flows at the next sweep.  The fault
    matrix's sqlite-disk-full row found it kept from every sweep for HANDED_WINDOW (10
    minutes): a sweep during the outage claimed it again while it was still in the
    pipeline, and the pipeline refused the job as a duplicate."""
    from sqlalchemy.exc import OperationalError

    cfg = hold_config(config, postfix)  # sweeps every 0.5 s
    for i in range(3):
        postfix.send(message(subject=f"outage {i}"), recipients=[RCPT])
    postfix.wait_held(3)
    worker = build_worker(cfg, store)
    real = worker.store.record_scans

    def full(records, plan=None):
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    worker.store.record_scans = full  # type: ignore[method-assign]
    with running(worker):
        time.sleep(3)  # several failed commits, several sweeps
        assert len(postfix.held_ids()) == 3
        worker.store.record_scans = real  # type: ignore[method-assign]
        wait_until(lambda: len(postfix.delivered("rcpt")) == 3, timeout=20)
    assert postfix.held_ids() == []


def open_files_under(directory: Path) -> int:
    """How many descriptors of this process name a file under ``directory``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            count += 1
    return count


def test_a_burst_keeps_a_bounded_number_of_held_files_open(config, store, postfix,
                                                           monkeypatch):
    """The watcher keeps each file it looked at open for its scan (no second open), but
    never more than KEEP_AHEAD ahead of slow scanners; every message still flows, and
    nothing is left open afterwards (duplicates of an arrival included)."""
    import spoolscan.sources.hold as hold

    monkeypatch.setattr(hold, "KEEP_AHEAD", 4)
    monkeypatch.setattr(hold, "OPEN_BATCH", 8)
    cfg = hold_config(config, postfix)
    worker = build_worker(cfg, store)
    scan = worker.service.scan

    def slow_scan(job):
        time.sleep(0.3)
        return scan(job)

    worker.service.scan = slow_scan  # type: ignore[method-assign]
    queue_dir = Path(worker.sources["postfix"].queue_dir)
    most, sampling = 0, threading.Event()

    def sample() -> None:
        nonlocal most
        while not sampling.is_set():
            most = max(most, open_files_under(queue_dir))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with running(worker):
        for i in range(60):
            postfix.send(message(subject=f"burst {i}"), recipients=[RCPT])
        wait_until(lambda: len(postfix.delivered("rcpt")) == 60, timeout=90)
    sampling.set()
    sampler.join()
    # Kept ones, those in a scan (the file and its content stream), one batch being
    # looked at by the watcher and one by a sweep.
    assert 0 < most <= 4 + 2 * cfg.clamd.concurrency + 2 * 8 < 60
    assert open_files_under(queue_dir) == 0
    assert postfix.held_ids() == []


def test_arrivals_read_at_once_beyond_the_keep_budget_flow_without_a_sweep(
        config, store, postfix, monkeypatch):
    """One inotify read naming more files than the watcher may keep open: each is
    handed over as it is looked at, so the scanners make room and nothing waits for
    a sweep (there is none here)."""
    import spoolscan.sources.hold as hold

    monkeypatch.setattr(hold, "KEEP_AHEAD", 4)
    cfg = hold_config(config, postfix)
    cfg = replace(cfg, sources=(replace(cfg.sources[0], sweep_interval=3600.0),))
    worker = build_worker(cfg, store)
    source = worker.sources["postfix"]
    arrived, all_held = source._arrived, threading.Event()

    def late(rels, submit):  # the first read waits: the rest pile up in the kernel
        all_held.wait(60)
        return arrived(rels, submit)

    source._arrived = late  # type: ignore[method-assign]
    with running(worker):
        for i in range(20):
            postfix.send(message(subject=f"pile {i}"), recipients=[RCPT])
        # (the start-up sweep, racing with the first messages, may have taken some)
        wait_until(lambda: len(postfix.held_ids()) + len(postfix.delivered("rcpt")) == 20)
        all_held.set()
        wait_until(lambda: len(postfix.delivered("rcpt")) == 20, timeout=30)
    assert postfix.held_ids() == []
