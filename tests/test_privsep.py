"""Privilege separation: started as root, spoolscan reads mail as an unprivileged user,
and a small root helper does only what needs root, for the configured places only."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import WORKER_USER, hold_source_toml, wait_until, write_config
from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text

from spoolscan.broker import Broker
from spoolscan.config import SourceConfig
from spoolscan.mailbox import Location
from spoolscan.privsep import Helper, HelperError, Policy

RCPT = "rcpt@spoolscan.test"


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if status(int(entry.name)).get("PPid") == str(pid):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_the_worker_scans_as_the_unprivileged_user_and_still_releases_and_quarantines(
        config, store, postfix, tmp_path):
    worker_uid = pwd.getpwnam(WORKER_USER).pw_uid
    box = make_maildir(tmp_path / "vmail" / "u" / "Maildir", owner=(4242, 4242))
    in_box = deliver(box, eicar_message("in a mailbox"))
    cfg = replace(config, policy=replace(config.policy, local_domains=("spoolscan.test",)))
    config_file = write_config(tmp_path / "run.toml", cfg, extra=(
        hold_source_toml(postfix.config_dir, "1s")
        + f'\n[[source]]\nname = "mailboxes"\ntype = "maildir"\n'
          f'paths = ["{tmp_path}/vmail/*/Maildir"]\nsweep_interval = "1s"\n'))
    log_file = tmp_path / "run.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "spoolscan", "-v", "--config",
                                 str(config_file), "run"], stderr=log, text=True)
    try:
        try:
            wait_until(lambda: not in_box.exists())  # quarantined from the mailbox
        except TimeoutError:
            raise AssertionError(log_file.read_text()[-3000:]) from None
        worker = status(proc.pid)
        assert worker["Uid"].split() == [str(worker_uid)] * 4  # real, effective, saved, fs
        assert worker["CapEff"] == "0000000000000000" and worker["NoNewPrivs"] == "1"
        (helper,) = children(proc.pid)
        assert status(helper)["Uid"].split()[0] == "0"
        assert status(helper)["Name"] == "spoolscan-priv"

        clean = postfix.send(message(subject="clean"), recipients=[RCPT])
        infected = postfix.send(eicar_message(), recipients=[RCPT])
        delivered = postfix.wait_delivered("rcpt", 1, timeout=30)
        wait_until(lambda: postfix.held_ids() == [])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    err = log_file.read_text()
    assert proc.returncode == 0, err
    assert len(delivered) == 1 and b"Subject: clean" in delivered[0].read_bytes()
    with store.engine.connect() as conn:
        outcomes = {r.queue_id or "maildir": (r.verdict, r.state) for r in conn.execute(
            text("SELECT queue_id, verdict, state FROM messages"))}
    assert outcomes == {clean: ("clean", "done"), infected: ("infected", "done"),
                        "maildir": ("infected", "done")}
    quarantined = sorted(Path(config.quarantine.directory).rglob("message.eml"))
    assert len(quarantined) == 2
    assert {p.stat().st_uid for p in quarantined} == {worker_uid}  # written by the worker


def test_the_helper_serves_only_the_configured_places(tmp_path, postfix):
    box = make_maildir(tmp_path / "vmail" / "u" / "Maildir")
    other = make_maildir(tmp_path / "elsewhere" / "Maildir")
    deliver(other, message())
    src = SourceConfig(name="m", type="maildir", paths=(str(tmp_path / "vmail" / "*" /
                                                            "Maildir"),))
    hold = SourceConfig(name="p", type="postfix-hold", config_directory=str(postfix.config_dir))
    from spoolscan.config import Config

    policy = Policy.from_config(Config(sources=(src, hold)), scan_paths=[str(tmp_path / "s")])
    helper = Helper(Broker(), policy)

    def ask(op: str, *args):  # type: ignore[no-untyped-def]
        return helper.handle({"op": op, "args": list(args)}, [])

    assert ask("mailbox_listing", str(box), False).result["root"] == str(box)
    for op, args in [
        ("mailbox_listing", (str(other), False)),
        ("mailbox_open", ({"root": str(other), "folder": "", "subdir": "new",
                           "name": "x"},)),
        ("mailbox_roots", ([str(tmp_path / "*" / "Maildir")],)),
        ("hold_entries", ("/var/spool/postfix",)),
        ("postsuper_release", ("/etc/postfix", ["ABC"])),
        ("path_open", ("/etc/shadow",)),
        ("path_open_many", ("/etc", ["shadow"])),
        ("mailbox_find_many", (str(other), "", ["x"])),
        ("path_entries", (str(tmp_path),)),
    ]:
        with pytest.raises(PermissionError):
            ask(op, *args)
    with pytest.raises(Exception, match="unknown operation"):
        ask("os_system", "id")
    assert ask("hold_entries", str(postfix.queue_dir)).result is not None
    loc = Location(str(box), "", "new", "x")
    assert policy.location(loc) is loc


def test_files_opened_together_are_each_refused_or_opened_on_their_own(tmp_path):
    """``path_open_many``: one walk to the directory, then every name judged alone: a
    symlink, a FIFO, a missing name and a subdirectory are refused, the others opened;
    a name that is a path is refused before anything is opened."""
    from spoolscan.fsutil import OpenFile, UnsafeFile

    scanned = tmp_path / "s"
    scanned.mkdir()
    (scanned / "a.eml").write_bytes(message())
    (scanned / "b.eml").write_bytes(eicar_message())
    (tmp_path / "secret").write_text("root's\n")
    os.symlink(tmp_path / "secret", scanned / "link.eml")
    os.mkfifo(scanned / "fifo.eml")
    (scanned / "sub").mkdir()
    helper = Helper(Broker(), Policy(scan_paths=(str(scanned),)))

    def ask(*args):  # type: ignore[no-untyped-def]
        return helper.handle({"op": "path_open_many", "args": list(args)}, [])

    names = ["a.eml", "link.eml", "fifo.eml", "gone.eml", "sub", "b.eml"]
    reply = ask(str(scanned), names)
    try:
        kinds = [r if isinstance(r, int) else r["type"] for r in reply.result]
        assert kinds == [0, "UnsafeFile", "UnsafeFile", "FileNotFoundError", "UnsafeFile", 1]
        assert len(reply.fds) == 2
        assert os.read(reply.fds[1], 1 << 16) == (scanned / "b.eml").read_bytes()
    finally:
        for fd in reply.fds:
            os.close(fd)
    for bad in (["../secret"], ["sub/../../secret"], ["x"] * 33):
        with pytest.raises((UnsafeFile, PermissionError, HelperError)):
            ask(str(scanned), bad)
    with pytest.raises(PermissionError):
        ask(str(tmp_path), ["secret"])
    # The directory swapped for a symlink to elsewhere: the walk refuses it, nothing opened.
    os.rename(scanned, tmp_path / "moved")
    os.symlink(tmp_path / "moved", scanned)
    with pytest.raises(UnsafeFile):
        ask(str(scanned), ["a.eml"])
    os.unlink(scanned)
    os.rename(tmp_path / "moved", scanned)
    local = Broker().path_open_many(str(scanned), ["a.eml", "link.eml"])
    assert isinstance(local[0], OpenFile) and isinstance(local[1], UnsafeFile)
    local[0].close()


def test_held_files_opened_together_are_each_refused_or_opened_on_their_own(tmp_path,
                                                                           postfix):
    """``hold_open_many``: every name judged alone: a symlink or a FIFO planted in hold/
    under a queue-file name is refused, so is a name that is not a queue-file name, a
    missing one is reported gone, the held file is opened; too many names or another
    queue directory refuse the whole request."""

    held = postfix.send(message(), recipients=[RCPT])
    postfix.wait_held(1)
    hold = postfix.queue_dir / "hold"
    (tmp_path / "secret").write_text("root's\n")
    os.symlink(tmp_path / "secret", hold / "ABCDEF123")
    os.mkfifo(hold / "ABCDEF124")
    hold_src = SourceConfig(name="p", type="postfix-hold",
                            config_directory=str(postfix.config_dir))
    from spoolscan.config import Config

    helper = Helper(Broker(), Policy.from_config(Config(sources=(hold_src,))))

    def ask(*args):  # type: ignore[no-untyped-def]
        return helper.handle({"op": "hold_open_many", "args": list(args)}, [])

    reply = ask(str(postfix.queue_dir), ["ABCDEF123", "ABCDEF124", "ABCDEF125", held])
    try:
        kinds = [r if isinstance(r, int) else r["type"] for r in reply.result]
        assert kinds == ["UnsafeFile", "UnsafeFile", "FileNotFoundError", 0]
        assert os.read(reply.fds[0], 1 << 16) == postfix.held_path(held).read_bytes()
    finally:
        for fd in reply.fds:
            os.close(fd)
    refused = ask(str(postfix.queue_dir), ["../../etc/passwd"]).result
    assert [r["type"] for r in refused] == ["UnsafeFile"]
    with pytest.raises(HelperError):
        ask(str(postfix.queue_dir), [held] * 33)
    with pytest.raises(PermissionError):
        ask("/var/spool/postfix", [held])


def test_messages_looked_for_together_are_each_found_on_their_own(tmp_path):
    """``mailbox_find_many`` stats (never follows, never opens) each message: a message
    owned by someone else is reported as such, a symlink is no message, a missing one is
    nothing, a name with a slash is refused."""
    box = make_maildir(tmp_path / "vmail" / "u" / "Maildir")
    mine = deliver(box, message())
    (box / "cur" / "1700000002.M2P2.example:2,S").symlink_to(tmp_path / "secret")
    theirs = deliver(box, message(subject="planted by root"))
    os.chown(theirs, 0, 0)
    os.chown(mine, 4321, 4321)
    for d in (box, box / "new", box / "cur", box / "tmp"):
        os.chown(d, 4321, 4321)
    src = SourceConfig(name="m", type="maildir", paths=(str(tmp_path / "vmail" / "*" /
                                                            "Maildir"),))
    from spoolscan.config import Config

    helper = Helper(Broker(), Policy.from_config(Config(sources=(src,))))
    uniques = [mine.name.split(":")[0], "1700000002.M2P2.example", theirs.name.split(":")[0],
               "1700000009.M9P9.example"]
    found = helper.handle({"op": "mailbox_find_many", "args": [str(box), "", uniques]},
                          []).result
    assert found[0]["kind"] == "file" and found[0]["owned"]
    assert found[0]["size"] == mine.stat().st_size
    assert found[1] is None
    assert found[2]["kind"] == "file" and not found[2]["owned"]
    assert found[3] is None
    bad = helper.handle({"op": "mailbox_find_many", "args": [str(box), "", ["../../x"]]},
                        []).result
    assert bad[0]["error"]["type"] == "UnsafeFile"


def test_scan_as_root_of_many_files_scans_each_once(config, tmp_path):
    """Files opened in batches through the helper: more files than two batches, one
    named with bytes that are not UTF-8, every file scanned and named once."""
    box = tmp_path / "many"
    box.mkdir()
    for i in range(70):
        (box / f"m{i:02d}.eml").write_bytes(eicar_message() if i % 30 == 0 else message())
    (box / os.fsdecode(b"not-utf8-\xff.eml")).write_bytes(message())  # any bytes
    config_file = write_config(tmp_path / "scan.toml", config)
    result = subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                             "scan", "--no-store", str(box)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(box))]
    assert len(lines) == 71 and len(set(lines)) == 71
    assert any("not-utf8-\\xff.eml: OK" in line for line in lines)
    assert sum(line.endswith(" FOUND") for line in lines) == 3


def test_scan_as_root_reads_the_files_named_through_the_helper(config, tmp_path):
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "infected.eml").write_bytes(eicar_message())
    os.chmod(secret_dir / "infected.eml", 0o600)
    config_file = write_config(tmp_path / "scan.toml", config)
    result = subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                             "scan", "--no-store", str(secret_dir)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "infected.eml: Spoolscan.Test.EICAR-NDB.UNOFFICIAL FOUND" in result.stdout


def test_a_missing_worker_user_is_a_clear_error(config, tmp_path):
    config_file = write_config(tmp_path / "nouser.toml", config)
    config_file.write_text(config_file.read_text().replace(
        f'user = "{WORKER_USER}"', 'user = "no-such-user-here"'))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                             "run", "--once"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert "no-such-user-here" in result.stderr and "adduser" in result.stderr


def test_a_hard_link_planted_beside_the_database_is_not_handed_over(tmp_path):
    """The database directory is the worker's: a name it planted there (a hard link to
    a root file) must not make root chown that file when handing the database over."""
    from spoolscan.config import ConfigError, DatabaseConfig, parse_config
    from spoolscan.privsep import hand_over, run_as

    secret = tmp_path / "root-only"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    os.link(secret, db_dir / "spoolscan.db-wal")
    config = parse_config({"privileges": {"user": WORKER_USER},
                           "quarantine": {"directory": str(tmp_path / "q")}}, "test")
    config = replace(config, database=DatabaseConfig(url=f"sqlite:///{db_dir}/spoolscan.db"))
    os.chown(db_dir, pwd.getpwnam(WORKER_USER).pw_uid, 0)
    with pytest.raises(ConfigError, match="single link"):
        hand_over(config, run_as(config))
    assert secret.stat().st_uid == 0
