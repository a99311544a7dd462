"""The Maildir source against real files, the real clamd, SQLite and PostgreSQL.

Deliveries happen while the worker runs, so they are found by the watch (inotify) events,
not by a sweep, unless the test is about sweeps.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text

from spoolscan.broker import Broker
from spoolscan.clamd import ClamdClient
from spoolscan.config import SourceConfig
from spoolscan.pipeline import Worker
from spoolscan.quarantine.store import QuarantineStore
from spoolscan.sources.maildir import MaildirSource
from spoolscan.store.repo import VERDICT, ActionRecord
from spoolscan.testing.inotify import lowered_queue

SIGNATURE = "Spoolscan.Test.EICAR-NDB.UNOFFICIAL"
ACTED = "outcome <> 'pending' AND action <> 'leave'"  # what was done (not intents, not leave)


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def make_worker(config, store):
    """make_worker(*globs, quarantine="folder", max_size=None) → (worker, source)."""
    made: list[Worker] = []

    def make(*paths, quarantine="folder", max_size=None):
        src = SourceConfig(name="mailboxes", type="maildir", paths=tuple(map(str, paths)),
                           quarantine=quarantine, sweep_interval=1.0)
        cfg = replace(config, sources=(src,))
        source = MaildirSource(src, cfg, store, Broker())
        scanner = ClamdClient(cfg.clamd, max_size=max_size or cfg.policy.max_size)
        worker = Worker(cfg, store, scanner, [source])
        made.append(worker)
        return worker, source

    yield make
    for worker in made:
        worker.stop()


def query(store, sql, **params):
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def count(store, sql, **params):
    with store.engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {predicate.__name__}")


def wait_for_scans(store, worker, n, timeout=20.0):
    """Wait for ``n`` scan rows, then for the pipeline to be idle (actions recorded, and
    time for any duplicate scan to show)."""
    def enough_scans():
        return count(store, "SELECT count(*) FROM scans") >= n

    wait_until(enough_scans, timeout)
    assert worker.wait_idle(settle=0.4, timeout=timeout)


def scans_per_location(store):
    return {r["location"]: r["n"] for r in query(
        store, "SELECT location, count(*) AS n FROM v_scans GROUP BY location")}


def deliver_by_link(maildir_root: Path, content: bytes, unique: str) -> Path:
    """Deliver like Postfix local(8): write tmp/X, link it to new/X, unlink tmp/X."""
    tmp = maildir_root / "tmp" / unique
    tmp.write_bytes(content)
    target = maildir_root / "new" / unique
    os.link(tmp, target)
    os.unlink(tmp)
    return target


# --- arrival -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["rename-into-new", "link-into-new", "rename-into-cur-with-flags",
                                 "into-a-maildir++-folder"])
def test_a_delivered_message_is_scanned_once_on_arrival(make_worker, store, tmp_path, how):
    root = make_maildir(tmp_path / "Maildir", folders=(".Lists",))
    worker, _ = make_worker(root)
    worker.start()
    content = message(subject=how)
    if how == "rename-into-new":
        path = deliver(root, content)
    elif how == "link-into-new":
        path = deliver_by_link(root, content, "1700000001.V801I42M1.host,S=99")
    elif how == "rename-into-cur-with-flags":
        path = deliver(root, content, subdir="cur", flags="FS")
    else:
        path = deliver(root, content, folder=".Lists")
    (root / "tmp" / "in-progress").write_bytes(eicar_message())  # tmp/ is never looked at

    wait_for_scans(store, worker, 1)

    (row,) = query(store, "SELECT * FROM v_scans")
    assert (row["location"], row["verdict"], row["trigger"], row["state"]) == (
        str(path), "clean", "arrival", "done")
    folder = path.parent.parent
    unique = path.name.split(":")[0]
    assert query(store, "SELECT identity, kind FROM messages") == [
        {"identity": f"{folder}/{unique}", "kind": "maildir"}]
    assert path.exists()


def test_a_mailbox_created_after_start_is_picked_up_by_the_next_sweep(make_worker, store,
                                                                      tmp_path):
    make_maildir(tmp_path / "vmail" / "alice" / "Maildir")
    worker, source = make_worker(tmp_path / "vmail" / "*" / "Maildir")
    worker.start()
    late = make_maildir(tmp_path / "vmail" / "bob" / "Maildir")
    first = deliver(late, message(subject="before the sweep"))
    time.sleep(0.3)
    assert count(store, "SELECT count(*) FROM scans") == 0  # not watched yet

    worker.sweep(source)
    wait_for_scans(store, worker, 1)
    assert source.watched() == [str(tmp_path / "vmail" / "alice" / "Maildir"), str(late)]

    second = deliver(late, message(subject="after the sweep"))  # now by the watch
    wait_for_scans(store, worker, 2)
    assert scans_per_location(store) == {str(first): 1, str(second): 1}


def test_a_burst_that_overflows_the_inotify_queue_is_scanned_exactly_once(make_worker, store,
                                                                          tmp_path):
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    # The suite runs as root (make test); fail loudly rather than skip if it does not.
    assert os.access(knob, os.W_OK), "lowering fs.inotify.max_queued_events needs root"
    root = make_maildir(tmp_path / "Maildir")
    worker, source = make_worker(root)
    with lowered_queue(64) as saved:  # read when the inotify instance is made, in start()
        worker.start()
    assert knob.read_text().strip() == saved

    n = 1500
    staging = tmp_path / "staging"
    staging.mkdir()
    content = message(subject="burst")  # one content: clamd is asked once, the rest cached
    for i in range(n):
        (staging / f"1700000000.M{i}P1.burst,S={len(content)}").write_bytes(content)
    # All renamed into new/ by another process, far faster than events are read.
    subprocess.run([sys.executable, "-c", "import os, sys\nsrc, dst = sys.argv[1:]\n"
                    "for name in os.listdir(src):\n"
                    "    os.rename(os.path.join(src, name), os.path.join(dst, name))\n",
                    str(staging), str(root / "new")], check=True)

    def events_were_lost():
        return source.stats["events_lost"] > 0

    wait_until(events_were_lost, timeout=10)
    worker.sweep(source)  # what the periodic sweep does; runs alongside the source's own
    wait_for_scans(store, worker, n, timeout=60)

    assert count(store, "SELECT count(*) FROM messages") == n
    assert count(store, "SELECT count(*) FROM scans") == n
    assert count(store, "SELECT count(DISTINCT message_id) FROM scans") == n
    assert count(store, "SELECT count(*) FROM messages WHERE state = 'done'") == n


# --- acting ------------------------------------------------------------------------------


def test_infected_mail_moves_to_the_quarantine_folder_keeping_its_name_and_flags(
        make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir", owner=(1234, 1235))
    os.chmod(root, 0o750)
    worker, _ = make_worker(root)
    worker.start()
    in_new = deliver(root, eicar_message("new"))
    in_cur = deliver(root, eicar_message("cur"), subdir="cur", flags="FS")
    clean = [deliver(root, message(subject="clean new")),
             deliver(root, message(subject="clean cur"), subdir="cur", flags="S")]
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in clean}

    wait_for_scans(store, worker, 4)

    quarantine = root / ".Quarantine"
    moved = {in_new: quarantine / "new" / in_new.name, in_cur: quarantine / "cur" / in_cur.name}
    assert in_cur.name.endswith(":2,FS")
    for original, target in moved.items():
        assert not original.exists() and target.is_file()
    for part in ("tmp", "new", "cur"):
        st = os.stat(quarantine / part)
        assert stat.S_IMODE(st.st_mode) == 0o750
    marker = os.stat(quarantine / "maildirfolder")
    assert marker.st_size == 0 and stat.S_IMODE(marker.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (os.stat(quarantine).st_uid, os.stat(quarantine).st_gid) == (1234, 1235)
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in clean} == before

    actions = query(store, "SELECT action, outcome, quarantine_path, original_path "
                           f"FROM actions WHERE {ACTED}")
    assert sorted(actions, key=lambda a: a["original_path"]) == sorted(
        ({"action": "quarantine", "outcome": "ok", "quarantine_path": str(target),
          "original_path": str(original)} for original, target in moved.items()),
        key=lambda a: a["original_path"])
    infected = query(store, "SELECT location, signature, action, action_outcome, state "
                            "FROM v_scans WHERE verdict = 'infected'")
    assert sorted(r["location"] for r in infected) == sorted(map(str, moved.values()))
    assert {(r["signature"], r["action"], r["action_outcome"], r["state"])
            for r in infected} == {(SIGNATURE, "quarantine", "ok", "done")}


def _quarantine_day_dirs(base: Path) -> set[Path]:
    days = {datetime.now(UTC).strftime("%Y%m%d"),
            (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y%m%d")}
    return {base / d for d in days}


def test_store_quarantine_moves_infected_mail_to_a_private_dated_directory(
        make_worker, store, config, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    path = deliver(root, eicar_message(), subdir="cur", flags="S")
    content = path.read_bytes()
    worker, _ = make_worker(root, quarantine="store")
    worker.run_once()

    (row,) = query(store, "SELECT message_id, quarantine_path, original_path, outcome "
                          f"FROM actions WHERE {ACTED}")
    target = Path(row["quarantine_path"])
    base = Path(config.quarantine.directory)
    # <base>/<day>/<message id>-<scan id>/message.eml: names from our own IDs only
    assert target.parent.parent in _quarantine_day_dirs(base)
    assert target.name == "message.eml"
    assert target.parent.name.startswith(f"{row['message_id']}-")
    assert (row["original_path"], row["outcome"]) == (str(path), "ok")
    assert not path.exists() and target.read_bytes() == content
    meta = json.loads((target.parent / "meta.json").read_text())
    assert (meta["folder"], meta["subdir"], meta["name"]) == ("", "cur", path.name)
    for p in (target, target.parent / "meta.json"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    for d in (target.parent, target.parent.parent, base):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert not (root / ".Quarantine").exists()


def test_store_quarantine_on_another_filesystem_copies_then_unlinks(make_worker, store,
                                                                    config, tmp_path):
    shm = Path("/dev/shm")
    assert shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev, \
        "this test needs /dev/shm on another filesystem than the temp directory"
    qdir = Path(tempfile.mkdtemp(dir=shm)) / "quarantine"
    try:
        root = make_maildir(tmp_path / "Maildir")
        path = deliver(root, eicar_message())
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        content = path.read_bytes()
        worker, source = make_worker(root, quarantine="store")
        source.quarantine_store = QuarantineStore(str(qdir))
        worker.run_once()

        (row,) = query(store, f"SELECT quarantine_path, outcome FROM actions WHERE {ACTED}")
        target = Path(row["quarantine_path"])
        assert row["outcome"] == "ok" and target.parents[2] == qdir
        assert target.read_bytes() == content and not path.exists()
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
        assert os.stat(target).st_mtime_ns == 1_600_000_000_000_000_000
        assert sorted(p.name for p in target.parent.iterdir()) == ["message.eml",
                                                                   "meta.json"]  # no temp
    finally:
        shutil.rmtree(qdir.parent)


def test_a_verdict_committed_but_not_acted_on_is_acted_on_by_the_next_sweep(
        make_worker, store, tmp_path, clamd):
    root = make_maildir(tmp_path / "Maildir")
    path = deliver(root, eicar_message("crash"))
    before = clamd.scan_count()
    crashed, _ = make_worker(root)
    crashed._act = lambda source, items: None  # the process died right after the commit
    crashed.run_once()
    assert query(store, "SELECT state FROM messages") == [{"state": VERDICT}]
    assert path.exists()

    worker, _ = make_worker(root)
    worker.run_once()
    assert (root / ".Quarantine" / "new" / path.name).exists() and not path.exists()
    assert query(store, "SELECT cached, action FROM v_scans ORDER BY scan_id") == [
        {"cached": False, "action": None}, {"cached": True, "action": "quarantine"}]
    assert clamd.scan_count() - before == 1


def test_a_quarantine_interrupted_after_the_move_is_recorded_done_by_the_next_sweep(
        make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    path = deliver(root, eicar_message("interrupted"))
    crashed, source = make_worker(root)

    def die_after_moving(_source, items):
        acting = [p for p in items if p.decision.acts]
        store.record_actions([ActionRecord(p.message_id, p.scan_id,
                                           p.decision.action, "pending") for p in acting])
        source.act(acting)  # the file is moved, then the process dies: nothing recorded

    crashed._act = die_after_moving
    crashed.run_once()
    target = root / ".Quarantine" / "new" / path.name
    assert target.exists() and query(store, "SELECT state FROM messages") == [
        {"state": VERDICT}]
    with store.engine.begin() as conn:  # the crash was a while ago
        conn.execute(text("UPDATE actions SET requested_at = :t"),
                     {"t": datetime.now(UTC) - timedelta(minutes=5)})

    worker, _ = make_worker(root)
    worker.run_once()
    assert query(store, "SELECT state, location FROM messages") == [
        {"state": "done", "location": str(target)}]
    assert query(store, "SELECT outcome, quarantine_path, original_path FROM actions "
                        "ORDER BY id DESC LIMIT 1") == [
        {"outcome": "ok", "quarantine_path": str(target), "original_path": str(path)}]
    assert count(store, "SELECT count(*) FROM scans") == 1


def test_two_hundred_copies_in_two_hundred_mailboxes_cost_one_clamd_scan(
        make_worker, store, tmp_path, clamd):
    roots = [make_maildir(tmp_path / "vmail" / f"user{i:03}" / "Maildir") for i in range(200)]
    worker, source = make_worker(tmp_path / "vmail" / "*" / "Maildir")
    worker.start()
    assert len(source.watched()) == 200
    base = message(subject="list post", sender="list@example.net")
    before = clamd.scan_count()
    for i, root in enumerate(roots):
        deliver(root, b"Delivered-To: user%03d@example.org\n" % i + base)

    wait_for_scans(store, worker, 200)

    assert clamd.scan_count() - before == 1
    assert count(store, "SELECT count(*) FROM scans") == 200
    assert count(store, "SELECT count(DISTINCT content_hash) FROM scans") == 1
    assert count(store, "SELECT count(*) FROM v_scans WHERE cached = :f", f=False) == 1


# --- races -------------------------------------------------------------------------------


def test_a_message_renamed_into_cur_before_its_scan_is_scanned_once_and_not_gone(
        make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    worker, _ = make_worker(root)
    submit = worker.submit
    renamed = []

    def dovecot_sees_it_first(job):
        path = Path(job.info.location)
        seen = path.parent.parent / "cur" / f"{path.name}:2,S"
        os.rename(path, seen)  # between the event and the scan
        renamed.append(seen)
        return submit(job)

    worker.submit = dovecot_sees_it_first
    worker.start()
    deliver(root, eicar_message("renamed"))
    wait_for_scans(store, worker, 1)

    (seen,) = renamed
    target = root / ".Quarantine" / "cur" / seen.name
    assert target.exists() and not seen.exists()
    (row,) = query(store, "SELECT state, location FROM messages")
    assert row == {"state": "done", "location": str(target)}
    assert count(store, "SELECT count(*) FROM scans") == 1
    assert query(store, f"SELECT outcome, original_path FROM actions WHERE {ACTED}") == [
        {"outcome": "ok", "original_path": str(seen)}]


def test_an_infected_message_renamed_after_its_scan_is_quarantined_under_its_new_name(
        make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    worker, source = make_worker(root)
    act = source.act
    renamed = []

    def flagged_meanwhile(items):
        for p in items:
            path = Path(p.outcome.info.location)
            renamed.append(path.parent.parent / "cur" / f"{path.name}:2,FS")
            os.rename(path, renamed[-1])
        return act(items)

    source.act = flagged_meanwhile
    worker.start()
    deliver(root, eicar_message("flagged"))
    wait_for_scans(store, worker, 1)

    (flagged,) = renamed
    assert (root / ".Quarantine" / "cur" / flagged.name).exists()
    assert query(store, f"SELECT outcome, original_path FROM actions WHERE {ACTED}") == [
        {"outcome": "ok", "original_path": str(flagged)}]


def test_a_message_deleted_before_its_scan_is_recorded_gone_and_work_goes_on(
        make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    worker, _ = make_worker(root)
    submit = worker.submit
    calls = []

    def deleted_first(job):
        calls.append(job.info.location)
        if len(calls) == 1:
            os.unlink(job.info.location)  # expunged before the scan
        return submit(job)

    worker.submit = deleted_first
    worker.start()
    doomed = deliver(root, message(subject="doomed"))

    def recorded():
        return count(store, "SELECT count(*) FROM messages") == 1

    wait_until(recorded)
    survivor = deliver(root, message(subject="survivor"))
    wait_for_scans(store, worker, 1)

    states = {r["location"]: r["state"] for r in query(
        store, "SELECT location, state FROM messages")}
    assert states == {str(doomed): "gone", str(survivor): "done"}
    assert scans_per_location(store) == {str(survivor): 1}
    assert worker.stats["gone"] == 1


# --- what is never scanned ----------------------------------------------------------------


def test_symlinks_in_a_mailbox_are_not_followed(make_worker, store, tmp_path, clamd):
    outside = tmp_path / "outside.eml"
    outside.write_bytes(eicar_message("outside"))
    outside_content = outside.read_bytes()
    root = make_maildir(tmp_path / "Maildir")
    worker, source = make_worker(root)
    before = clamd.scan_count()
    worker.start()
    os.symlink(outside, root / "new" / "1700000000.M1P1.link")  # created in place
    os.symlink(outside, root / "tmp" / "1700000000.M2P1.link")
    os.rename(root / "tmp" / "1700000000.M2P1.link",  # renamed into place
              root / "cur" / "1700000000.M2P1.link:2,S")
    marker = deliver(root, message(subject="marker"))
    wait_for_scans(store, worker, 1)
    worker.sweep(source)
    assert worker.wait_idle(settle=0.3, timeout=10)

    assert scans_per_location(store) == {str(marker): 1}
    assert clamd.scan_count() - before == 1
    assert outside.read_bytes() == outside_content
    assert os.path.islink(root / "new" / "1700000000.M1P1.link")
    assert os.path.islink(root / "cur" / "1700000000.M2P1.link:2,S")
    assert outside.exists() and not (root / ".Quarantine").exists()
    assert source.stats["skipped"] >= 2


def test_a_fifo_in_new_is_ignored_without_hanging(make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    worker, source = make_worker(root)
    worker.start()
    os.mkfifo(root / "new" / "1700000000.M1P1.fifo")
    marker = deliver(root, message(subject="after the fifo"))
    wait_for_scans(store, worker, 1, timeout=10)
    worker.sweep(source)
    assert worker.wait_idle(settle=0.3, timeout=10)

    assert scans_per_location(store) == {str(marker): 1}
    assert count(store, "SELECT count(*) FROM messages") == 1
    assert stat.S_ISFIFO(os.lstat(root / "new" / "1700000000.M1P1.fifo").st_mode)


# --- sweeps ------------------------------------------------------------------------------


def test_the_sweep_rescans_a_retry_only_once_it_is_due(make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    path = deliver(root, message(body="x" * 20_000))
    worker, source = make_worker(root, max_size=10_000)  # over max_size: unchecked, retry
    worker.start()
    worker.sweep(source)
    wait_for_scans(store, worker, 1)
    (row,) = query(store, "SELECT state, attempts, next_attempt_at FROM messages")
    assert (row["state"], row["attempts"]) == ("retry", 1) and row["next_attempt_at"]

    worker.sweep(source)  # not due yet: left alone
    assert worker.wait_idle(settle=0.3, timeout=10)
    assert count(store, "SELECT count(*) FROM scans") == 1

    with store.engine.begin() as conn:
        conn.execute(text("UPDATE messages SET next_attempt_at = :t"),
                     {"t": datetime.now(UTC) - timedelta(seconds=1)})
    worker.sweep(source)
    wait_for_scans(store, worker, 2)
    assert query(store, "SELECT state, attempts, location FROM messages") == [
        {"state": "retry", "attempts": 2, "location": str(path)}]


def test_a_stored_message_that_vanished_is_marked_gone_by_the_sweep(make_worker, store,
                                                                    tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    kept = deliver(root, message(body="y" * 20_000, subject="kept"))
    vanishing = deliver(root, message(body="z" * 20_000, subject="vanishing"))
    worker, source = make_worker(root, max_size=10_000)
    worker.start()
    worker.sweep(source)
    wait_for_scans(store, worker, 2)
    os.rename(kept, kept.parent.parent / "cur" / f"{kept.name}:2,S")  # renamed: still there
    os.unlink(vanishing)

    worker.sweep(source)
    assert worker.wait_idle(settle=0.3, timeout=10)
    states = {r["location"]: (r["state"], r["last_error"]) for r in query(
        store, "SELECT location, state, last_error FROM messages")}
    assert states[str(vanishing)] == ("gone", "no longer in the mailbox")
    assert states[str(kept)][0] == "retry"


def test_a_rescan_job_follows_a_renamed_message_and_is_none_for_a_deleted_one(
        make_worker, store, tmp_path):
    root = make_maildir(tmp_path / "Maildir", folders=(".Lists",))
    kept = deliver(root, message(subject="kept"), folder=".Lists")
    deleted = deliver(root, message(subject="deleted"))
    worker, source = make_worker(root)
    worker.run_once()
    rows = {r["location"]: r for r in query(store, "SELECT * FROM messages")}
    seen = kept.parent.parent / "cur" / f"{kept.name}:2,RS"
    os.rename(kept, seen)
    os.unlink(deleted)

    job = source.job_for(rows[str(kept)], "rescan")
    assert (job.info.location, job.info.identity, job.trigger) == (
        str(seen), rows[str(kept)]["identity"], "rescan")
    assert job.payload.loc.root == str(root)
    assert source.job_for(rows[str(deleted)], "rescan") is None


def test_finding_many_messages_at_once_finds_what_finding_each_finds(tmp_path):
    """A rescan looks for a folder's messages with one listing of new/ and cur/: the
    answers are the ones ``find`` gives message by message (new/ before cur/, the exact
    name before a flagged one, a symlink or a FIFO is no message)."""
    from spoolscan.mailbox import Mailbox

    box = make_maildir(tmp_path / "Maildir")
    for sub, name in [("new", "1.A.h"), ("cur", "2.B.h:2,S"), ("cur", "3.C.h:2,S"),
                      ("cur", "3.C.h"), ("new", "4.D.h"), ("cur", "4.D.h:2,RS")]:
        (box / sub / name).write_bytes(message())
    (box / "cur" / "5.E.h:2,S").symlink_to(tmp_path / "elsewhere")
    os.mkfifo(box / "new" / "6.F.h")
    uniques = ["1.A.h", "2.B.h", "3.C.h", "4.D.h", "5.E.h", "6.F.h", "7.G.h"]
    with Mailbox.open(str(box)) as mb:
        one_by_one = {u: mb.find("", u) for u in uniques}
        together = mb.find_many("", uniques)
    assert together == {u: loc for u, loc in one_by_one.items() if loc is not None}
    assert {u: (loc.subdir, loc.name) for u, loc in together.items()} == {
        "1.A.h": ("new", "1.A.h"), "2.B.h": ("cur", "2.B.h:2,S"), "3.C.h": ("cur", "3.C.h"),
        "4.D.h": ("new", "4.D.h")}
    found = Broker().mailbox_find_many(str(box), "", uniques + ["../x"])
    assert [None if f is None or isinstance(f, Exception) else f.loc for f in found[:7]] == [
        one_by_one[u] for u in uniques]
    assert isinstance(found[7], Exception)
