"""A hostile mailbox owner against spoolscan running as root.

The owner (a spare uid, its commands run for real with ``setpriv``) plants symlinks,
FIFOs, devices and hard links in its own Maildir, or swaps a directory for a symlink at
the worst moment (made deterministic with ``spoolscan.mailbox.race_point``), to make root
move, write, show or delete a file outside the mailbox.  After every attack: nothing
outside the mailbox and the quarantine store was created, changed or deleted (a snapshot
of root's files, before and after), and the infected message is quarantined or left in
place with its reason in the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import wait_until, write_config
from hostile import GID, UID, Arena, files_under, make_arena, remove_arena
from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text

from spoolscan import mailbox
from spoolscan.cli import main
from spoolscan.config import SourceConfig
from spoolscan.runner import build_worker
from spoolscan.sources import base as sources_base


@pytest.fixture
def arena():
    made = make_arena()
    yield made
    remove_arena(made)


@pytest.fixture
def cfg_for(config, arena):
    def make(quarantine: str = "folder", store: Path | None = None):
        src = SourceConfig(name="mailboxes", type="maildir", paths=(str(arena.maildir),),
                           quarantine=quarantine, sweep_interval=0.5)
        return replace(config, sources=(src,),
                       quarantine=replace(config.quarantine,
                                          directory=str(store or arena.store)),
                       policy=replace(config.policy, retry_delay=0.2))
    return make


@pytest.fixture
def run_once(store):
    def run(cfg):
        worker = build_worker(cfg, store)
        worker.run_once()
    return run


def rows(store, sql="SELECT * FROM messages ORDER BY id", **params):
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def only_message(store) -> dict:
    (row,) = [r for r in rows(store)]
    return row


def quarantined_in_store(arena: Arena) -> list[str]:
    return [f for f in files_under(arena.store) if f.endswith("message.eml")]


# --- the quarantine folder ------------------------------------------------------------------


@pytest.mark.parametrize("planted", [".Quarantine", ".Quarantine/new", ".Quarantine/tmp",
                                     ".Quarantine/cur"])
def test_a_symlinked_quarantine_folder_is_never_followed(arena, cfg_for, run_once, store,
                                                         planted):
    q = arena.maildir / ".Quarantine"
    if planted != ".Quarantine":
        arena.as_owner(f"mkdir -p {q}/tmp {q}/new {q}/cur && touch {q}/maildirfolder")
    arena.as_owner(f"rm -rf {arena.maildir / planted} && "
                   f"ln -s {arena.sentinel / 'run-parts'} {arena.maildir / planted}")
    infected = deliver(arena.maildir, eicar_message(), subdir="cur", flags="S")
    before = arena.outside()

    run_once(cfg_for("folder"))

    assert arena.outside() == before  # nothing moved into run-parts, nothing made there
    assert infected.exists()
    row = only_message(store)
    assert row["state"] == "retry" and row["verdict"] == "infected"
    assert "symlink" in row["last_error"] and planted.split("/")[0] in row["last_error"]


def test_a_symlinked_maildir_folder_is_not_a_folder(arena, cfg_for, run_once, store):
    fake = arena.sentinel / "folder"
    for sub in ("new", "cur", "tmp"):
        (fake / sub).mkdir(parents=True)
    os.link(arena.sentinel / "infected-victim", fake / "new" / "1.M1P1.host")
    arena.as_owner(f"rm -rf {arena.maildir / '.Lists'} && "
                   f"ln -s {fake} {arena.maildir / '.Lists'}")
    before = arena.outside()

    run_once(cfg_for("store"))

    assert arena.outside() == before
    assert rows(store) == [] and quarantined_in_store(arena) == []


@pytest.mark.parametrize("planted", ["new", "cur", "Maildir"])
def test_a_mailbox_with_a_symlinked_new_cur_or_root_is_refused(arena, cfg_for, run_once,
                                                               store, planted, caplog):
    fake = arena.sentinel / "maildir"
    for sub in ("new", "cur", "tmp"):
        (fake / sub).mkdir(parents=True)
        os.link(arena.sentinel / "infected-victim", fake / sub / f"1.M1P1.{sub}")
    target = arena.home / "Maildir" if planted == "Maildir" else arena.maildir / planted
    arena.as_owner(f"rm -rf {target} && ln -s {fake / planted if planted != 'Maildir' else fake}"
                   f" {target}")
    before = arena.outside()

    run_once(cfg_for("store"))

    assert arena.outside() == before
    assert rows(store) == [] and quarantined_in_store(arena) == []
    assert "symlink" in caplog.text or "not a Maildir" in caplog.text


# --- what is in new/ and cur/ -------------------------------------------------------------------


def test_symlinks_fifos_devices_and_foreign_hard_links_are_never_opened(
        arena, cfg_for, run_once, store):
    new = arena.maildir / "new"
    arena.as_owner(f"ln -s {arena.sentinel / 'infected-victim'} {new}/1.M1P1.symlink && "
                   f"mkfifo {new}/1.M2P1.fifo")
    # A user cannot make these two, but a careless admin or a filesystem without
    # protected_hardlinks can: a link to root's file, and a device node.
    os.link(arena.sentinel / "infected-victim", new / "1.M3P1.hardlink")
    os.mknod(new / "1.M4P1.device", 0o600 | 0o020000, os.makedev(1, 3))  # like /dev/null
    infected = deliver(arena.maildir, eicar_message())
    before = arena.outside()

    started = time.monotonic()
    run_once(cfg_for("store"))

    assert time.monotonic() - started < 30  # the FIFO did not block anything
    assert arena.outside() == before  # root's file: same inode, same links, same content
    assert not infected.exists() and len(quarantined_in_store(arena)) == 1
    by_name = {r["identity"].rpartition("/")[2]: r for r in rows(store)}
    assert by_name[infected.name]["state"] == "done"
    # The foreign hard link is flagged (not the owner's), never moved; the others never
    # even get a row: they are reported and left alone.
    assert by_name["1.M3P1.hardlink"]["state"] == "retry"
    assert "not by the mailbox owner" in by_name["1.M3P1.hardlink"]["last_error"]
    assert set(by_name) == {infected.name, "1.M3P1.hardlink"}
    for name in ("1.M1P1.symlink", "1.M2P1.fifo", "1.M3P1.hardlink", "1.M4P1.device"):
        assert os.path.lexists(new / name)


# --- races: a directory or a file swapped at the worst moment -----------------------------------


def _swap_at(monkeypatch, arena: Arena, where: str, script: str) -> list[str]:
    done: list[str] = []

    def attacker(point: str, loc: mailbox.Location) -> None:
        if point == where and not done:
            done.append(point)
            arena.as_owner(script.format(name=loc.name))

    monkeypatch.setattr(mailbox, "race_point", attacker)
    return done


def test_new_swapped_for_a_symlink_before_the_move_changes_nothing_outside(
        arena, cfg_for, run_once, store, monkeypatch):
    decoy = arena.sentinel / "decoy"
    decoy.mkdir()
    infected = deliver(arena.maildir, eicar_message())
    (decoy / infected.name).write_bytes(b"root's file with the same name\n")
    new = arena.maildir / "new"
    swapped = _swap_at(monkeypatch, arena, "move",
                       f"mv {new} {new}.real && ln -s {decoy} {new}")
    before = arena.outside()

    run_once(cfg_for("folder"))

    assert swapped and arena.outside() == before
    # The directory that was opened (now new.real) is where the move happened.
    assert (arena.maildir / ".Quarantine" / "new" / infected.name).exists()
    assert only_message(store)["state"] == "done"


def test_a_message_swapped_for_another_file_before_the_move_is_put_back(
        arena, cfg_for, run_once, store, monkeypatch):
    infected = deliver(arena.maildir, eicar_message())
    other = deliver(arena.maildir, message(subject="the owner's other mail"), subdir="cur")
    new = arena.maildir / "new"
    swapped = _swap_at(monkeypatch, arena, "move",
                       f"mv {new}/{{name}} {new}/{{name}}.orig && ln {other} {new}/{{name}}")
    before = arena.outside()

    run_once(cfg_for("folder"))

    assert swapped and arena.outside() == before
    assert os.path.samefile(new / infected.name, other)  # the other file, put back
    # The infected one, renamed by its owner, is a message of its own: quarantined.
    assert (arena.maildir / ".Quarantine" / "new" / f"{infected.name}.orig").exists()
    rows_by_name = {r["identity"].rpartition("/")[2]: r for r in rows(store)}
    assert "replaced" in rows_by_name[infected.name]["last_error"]


def test_a_directory_swapped_before_the_unlink_deletes_nothing_outside(
        arena, cfg_for, run_once, store, monkeypatch):
    decoy = arena.sentinel / "decoy"
    decoy.mkdir()
    infected = deliver(arena.maildir, eicar_message())
    (decoy / infected.name).write_bytes(b"root's file with the same name\n")
    new = arena.maildir / "new"
    swapped = _swap_at(monkeypatch, arena, "remove",
                       f"mv {new} {new}.real && ln -s {decoy} {new}")
    before = arena.outside()

    run_once(cfg_for("store"))

    assert swapped and arena.outside() == before
    assert not (arena.maildir / "new.real" / infected.name).exists()  # removed from there
    assert len(quarantined_in_store(arena)) == 1


@pytest.mark.parametrize("mode", ["folder", "store"])
def test_new_swapped_for_a_symlink_between_scan_and_action_is_refused(
        arena, cfg_for, store, mode):
    decoy = arena.sentinel / "decoy"
    decoy.mkdir()
    infected = deliver(arena.maildir, eicar_message())
    (decoy / infected.name).write_bytes(b"root's file with the same name\n")
    new = arena.maildir / "new"
    worker = build_worker(cfg_for(mode), store)
    source = worker.sources["mailboxes"]
    act = source.act

    def swapped_meanwhile(items):
        arena.as_owner(f"mv {new} {new}.real && ln -s {decoy} {new}")
        return act(items)

    source.act = swapped_meanwhile  # type: ignore[method-assign]
    before = arena.outside()
    worker.run_once()

    assert arena.outside() == before
    assert (arena.maildir / "new.real" / infected.name).exists()  # left, with a reason
    row = only_message(store)
    assert row["state"] == "retry" and "symlink" in row["last_error"]


# --- the quarantine commands -------------------------------------------------------------------


def _quarantine_one(arena, cfg, run_once, store, tmp_path) -> tuple[int, Path, Path]:
    """Quarantine one infected message; (message id, original path, config file)."""
    infected = deliver(arena.maildir, eicar_message(), subdir="cur", flags="RS")
    run_once(cfg)
    assert not infected.exists()
    extra = "".join(
        f'\n[[source]]\nname = "{s.name}"\ntype = "maildir"\npaths = ["{s.paths[0]}"]\n'
        f'quarantine = "{s.quarantine}"\n' for s in cfg.sources)
    config_file = write_config(tmp_path / "spoolscan.toml", cfg, extra=extra)
    return only_message(store)["id"], infected, config_file


def q(capsys, config_file, *args):
    code = main(["--config", str(config_file), "quarantine", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_show_delete_and_purge_do_not_follow_a_swapped_quarantine_folder(
        arena, cfg_for, run_once, store, tmp_path, capsys):
    message_id, infected, config_file = _quarantine_one(arena, cfg_for("folder"), run_once,
                                                        store, tmp_path)
    q_dir = arena.maildir / ".Quarantine"
    decoy = arena.sentinel / "decoy"
    (decoy / "cur").mkdir(parents=True)
    (decoy / "cur" / infected.name).write_text("Subject: ROOT SECRET\n\nroot only\n")
    arena.as_owner(f"mv {q_dir} {q_dir}.old && ln -s {decoy} {q_dir}")
    before = arena.outside()

    code, out, err = q(capsys, config_file, "show", str(message_id))
    assert code == 2 and "ROOT SECRET" not in out and "symlink" in err
    code, _, err = q(capsys, config_file, "delete", str(message_id))
    code, _, _ = q(capsys, config_file, "purge", "--older-than-days", "0")
    assert arena.outside() == before  # root's file of the same name is still there


def test_show_of_a_fifo_in_place_of_the_quarantined_message_does_not_hang(
        arena, cfg_for, run_once, store, tmp_path, capsys):
    message_id, infected, config_file = _quarantine_one(arena, cfg_for("folder"), run_once,
                                                        store, tmp_path)
    held = arena.maildir / ".Quarantine" / "cur" / infected.name
    arena.as_owner(f"rm {held} && mkfifo {held}")
    started = time.monotonic()
    code, out, err = q(capsys, config_file, "show", str(message_id))
    assert time.monotonic() - started < 10
    assert code == 2 and "FIFO" in err


@pytest.mark.parametrize("plant", ["dangling-symlink", "symlinked-cur"])
def test_release_never_writes_through_a_planted_symlink(arena, cfg_for, run_once, store,
                                                       tmp_path, capsys, plant):
    message_id, infected, config_file = _quarantine_one(arena, cfg_for("store"), run_once,
                                                        store, tmp_path)
    keys = arena.sentinel / "ssh" / "authorized_keys2"
    cur = arena.maildir / "cur"
    if plant == "dangling-symlink":
        arena.as_owner(f"ln -s {keys} {infected}")
    else:
        arena.as_owner(f"mv {cur} {cur}.old && ln -s {arena.sentinel / 'ssh'} {cur}")
    before = arena.outside()

    code, _, err = q(capsys, config_file, "release", str(message_id))

    assert code == 2 and ("exists" in err or "symlink" in err)
    assert not keys.exists() and arena.outside() == before
    assert len(quarantined_in_store(arena)) == 1  # still in quarantine, nothing lost


def test_a_release_restores_the_message_as_its_owner_with_its_flags(
        arena, cfg_for, run_once, store, tmp_path, capsys):
    message_id, infected, config_file = _quarantine_one(arena, cfg_for("store"), run_once,
                                                        store, tmp_path)
    code, out, _ = q(capsys, config_file, "release", str(message_id))
    assert code == 0 and infected.exists()
    st = os.stat(infected)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, GID, 0o600)
    assert quarantined_in_store(arena) == []
    code, _, err = q(capsys, config_file, "release", str(message_id))
    assert code == 2 and "already released" in err


# --- the quarantine store ----------------------------------------------------------------------


def test_a_store_directory_a_user_swapped_for_a_symlink_is_not_used(
        arena, cfg_for, run_once, store):
    in_home = arena.home / "quarantine"
    arena.as_owner(f"ln -s {arena.sentinel / 'run-parts'} {in_home}")
    infected = deliver(arena.maildir, eicar_message())
    before = arena.outside()

    run_once(cfg_for("store", store=in_home))

    assert arena.outside() == before and infected.exists()
    assert only_message(store)["state"] == "retry"


def test_the_store_is_private(arena, cfg_for, run_once, store):
    deliver(arena.maildir, eicar_message())
    run_once(cfg_for("store"))
    (path,) = quarantined_in_store(arena)
    for p in (arena.store, *(arena.store / path).parents[:2]):
        assert os.stat(p).st_mode & 0o777 == 0o700
    for p in ((arena.store / path), (arena.store / path).with_name("meta.json")):
        assert os.stat(p).st_mode & 0o777 == 0o600
    meta = json.loads((arena.store / path).with_name("meta.json").read_text())
    assert meta["owner"] == UID and meta["folder"] == ""


def test_a_full_store_leaves_the_message_and_no_partial_file_then_succeeds(
        arena, cfg_for, run_once, store):
    arena.store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(arena.store)],
                   check=True)
    big = eicar_message() + b"X-Padding: " + b"y" * 300_000 + b"\n"
    infected = deliver(arena.maildir, big)
    cfg = cfg_for("store")

    run_once(cfg)

    assert infected.exists() and quarantined_in_store(arena) == []
    assert files_under(arena.store) == []  # no partial or temporary file left
    row = only_message(store)
    assert row["state"] == "retry" and "No space left" in row["last_error"]

    subprocess.run(["mount", "-o", "remount,size=4m", str(arena.store)], check=True)
    time.sleep(0.5)  # the retry is due
    run_once(cfg)

    assert not infected.exists() and len(quarantined_in_store(arena)) == 1
    assert only_message(store)["state"] == "done"


# --- released stays released -------------------------------------------------------------------


def test_a_released_message_stays_released_under_a_running_worker_and_a_restart(
        arena, cfg_for, run_once, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources_base, "HANDED_WINDOW", 0.5)
    cfg = cfg_for("store")
    message_id, infected, config_file = _quarantine_one(arena, cfg, run_once, store, tmp_path)
    worker = build_worker(cfg, store)
    for source in worker.sources.values():
        source.handed.window = 0.5
    stop = __import__("threading").Event()
    thread = __import__("threading").Thread(target=worker.run_forever, args=(stop,),
                                            daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        code, _, _ = q(capsys, config_file, "release", str(message_id))
        assert code == 0 and infected.exists()
        time.sleep(3.0)  # several sweeps, well past the hand-over window
        assert infected.exists()
    finally:
        stop.set()
        thread.join(30)
    run_once(cfg)  # a restart
    main(["--config", str(config_file), "-q", "rescan", "--all"])
    assert infected.exists() and quarantined_in_store(arena) == []
    assert only_message(store)["state"] == "released"


# --- spoolscan run, as root, under attack ------------------------------------------------------


def test_spoolscan_run_as_root_survives_the_owner_and_quarantines_once_fixed(
        arena, cfg_for, store, tmp_path):
    cfg = cfg_for("folder")
    extra = (f'\n[[source]]\nname = "mailboxes"\ntype = "maildir"\n'
             f'paths = ["{arena.maildir}"]\nquarantine = "folder"\nsweep_interval = "1s"\n')
    config_file = write_config(tmp_path / "run.toml", cfg, extra=extra)
    q_dir = arena.maildir / ".Quarantine"
    arena.as_owner(f"ln -s {arena.sentinel / 'run-parts'} {q_dir}")
    proc = subprocess.Popen([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                             "run"], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        before = arena.outside()
        # The owner delivers an infected message itself (tmp/ then rename into new/).
        (arena.home / "msg").write_bytes(eicar_message())
        os.chown(arena.home / "msg", UID, GID)
        arena.as_owner(f"mv {arena.home}/msg {arena.maildir}/tmp/1.M9P9.evil && "
                       f"mv {arena.maildir}/tmp/1.M9P9.evil {arena.maildir}/new/")
        wait_until(lambda: any(r["state"] == "retry" for r in rows(store)))
        assert arena.outside() == before
        assert (arena.maildir / "new" / "1.M9P9.evil").exists()

        arena.as_owner(f"rm {q_dir}")  # fixed: the next retry quarantines it
        wait_until(lambda: (q_dir / "new" / "1.M9P9.evil").exists())
        assert arena.outside() == before
        assert os.stat(q_dir).st_uid == UID  # made with the owner's identity
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "symlink" in err


# --- the content changes under our feet ---------------------------------------------------


def test_a_message_rewritten_during_its_scan_cannot_poison_the_cache(
        arena, cfg_for, store, monkeypatch):
    """The owner overwrites the EICAR bytes of their copy while it is scanned: what is
    scanned and cached is one private copy, so the other user's copy of the same content
    is still infected, and quarantined."""
    victim = make_maildir(arena.base / "home" / "victim" / "Maildir", owner=(4243, 4243))
    content = eicar_message("the same message to two users")
    attacker_copy = deliver(arena.maildir, content)
    victim_copy = deliver(victim, content)
    cfg = cfg_for("store")
    cfg = replace(cfg, sources=(replace(cfg.sources[0], paths=(
        str(arena.maildir), str(victim))),))
    from spoolscan.clamd import ClamdClient

    real = ClamdClient.scan_fd
    rewritten = []

    def scan_after_the_owner_rewrote_it(self, fd, size=None):  # type: ignore[no-untyped-def]
        if not rewritten:
            rewritten.append(True)
            data = attacker_copy.read_bytes().replace(b"WDVPIVAl", b"AAAAAAAA")
            assert data != attacker_copy.read_bytes()
            arena.as_owner("printf '%s' '' > /dev/null")  # (the owner's own process...)
            with open(attacker_copy, "r+b") as fh:  # ...rewrites the same inode in place
                fh.write(data)
        return real(self, fd, size)

    monkeypatch.setattr(ClamdClient, "scan_fd", scan_after_the_owner_rewrote_it)
    worker = build_worker(replace(cfg, clamd=replace(cfg.clamd, concurrency=1)), store)
    worker.run_once()

    assert rewritten and not victim_copy.exists()  # quarantined: the cache said infected
    by_name = {r["identity"].rpartition("/")[2]: r for r in rows(store)}
    assert by_name[victim_copy.name]["verdict"] == "infected"
    attacker = by_name[attacker_copy.name]
    # Its scanned copy was infected, its file no longer is: not quarantined, retried.
    assert attacker["state"] == "retry" and "changed since it was scanned" in \
        attacker["last_error"]


def test_a_message_that_grows_while_read_is_cut_at_the_limit(arena, cfg_for, store,
                                                              monkeypatch):
    grown = deliver(arena.maildir, eicar_message("grows"))
    other = deliver(arena.maildir, eicar_message("another one"))
    from spoolscan import fsutil

    real = fsutil.snapshot

    def owner_grows_it_first(src, limit, directory=None, memory=None):  # type: ignore[no-untyped-def]
        if os.fstat(src).st_size < 10_000:
            os.truncate(grown, 1 << 40)  # 1 TiB, sparse: as the owner could
        return real(src, limit, directory, memory)

    monkeypatch.setattr(fsutil, "snapshot", owner_grows_it_first)
    started = time.monotonic()
    run = build_worker(cfg_for("store"), store)
    run.run_once()
    assert time.monotonic() - started < 60  # no thread reads a terabyte
    assert not other.exists()
    assert all(os.path.getsize(arena.store / p) < 100_000
               for p in files_under(arena.store))
    by_name = {r["identity"].rpartition("/")[2]: r for r in rows(store)}
    assert by_name[grown.name]["verdict"] == "unchecked"


def test_a_message_that_grows_while_hashed_for_the_cache_is_cut_at_the_limit(
        arena, cfg_for, store, monkeypatch):
    """A known content answers from the cache without a private copy: the live file is
    hashed first, and that read stops at the size limit too."""
    grown = deliver(arena.maildir, eicar_message("grows before it is hashed"))
    from spoolscan import scan

    real = scan.content_hash

    def owner_grows_it_first(stream, max_size=None):  # type: ignore[no-untyped-def]
        if grown.exists() and os.path.getsize(grown) < 10_000:
            os.truncate(grown, 1 << 40)  # 1 TiB, sparse: as the owner could
        return real(stream, max_size)

    monkeypatch.setattr(scan, "content_hash", owner_grows_it_first)
    started = time.monotonic()
    build_worker(cfg_for("store"), store).run_once()
    assert time.monotonic() - started < 60  # no thread reads a terabyte
    by_name = {r["identity"].rpartition("/")[2]: r for r in rows(store)}
    assert by_name[grown.name]["verdict"] == "unchecked"


def test_a_small_message_grown_while_copied_is_not_copied_into_memory(tmp_path):
    """Small messages are copied into memory; one its owner makes grow (sparse, costing
    them nothing) while it is copied goes to the file system instead: memory holds at
    most the in-memory bound, whatever the size limit."""
    from spoolscan import fsutil

    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    grown = tmp_path / "grown"
    grown.write_bytes(b"x" * 100)
    with open(small, "rb") as s, open(grown, "rb") as g:
        fd, size = fsutil.snapshot(s.fileno(), 50 << 20, str(tmp_path), memory=1 << 20)
        try:
            assert size == 100 and os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        finally:
            os.close(fd)
        os.truncate(grown, 8 << 20)  # after the open, before the copy
        fd, size = fsutil.snapshot(g.fileno(), 50 << 20, str(tmp_path), memory=1 << 20)
        try:
            assert size == 8 << 20
            assert not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        finally:
            os.close(fd)


def test_leased_files_do_not_stall_the_others(arena, cfg_for, run_once, store):
    leased = [deliver(arena.maildir, message(subject=f"leased {i}")) for i in range(5)]
    infected = deliver(arena.maildir, eicar_message())
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--",
         "/usr/bin/python3", "-c",
         "import fcntl, signal, sys, time\n"
         "signal.signal(signal.SIGIO, signal.SIG_IGN)\n"
         "files = [open(p, 'rb') for p in sys.argv[1:]]\n"
         "for f in files:\n"
         "    fcntl.fcntl(f, fcntl.F_SETLEASE, fcntl.F_RDLCK)\n"
         "print('leased', flush=True)\n"
         "time.sleep(120)\n", *map(str, leased)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leased"
        started = time.monotonic()
        run_once(cfg_for("store"))
        assert time.monotonic() - started < 30  # not 5 x 45 s of lease-break-time
        assert not infected.exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_files_with_one_unique_part_are_both_scanned(arena, cfg_for, run_once, store):
    clean = deliver(arena.maildir, message(subject="clean"), unique="1.M1P1.same")
    infected = deliver(arena.maildir, eicar_message(), subdir="cur", flags="S",
                       unique="1.M1P1.same")
    run_once(cfg_for("store"))
    assert clean.exists() and not infected.exists()


def test_a_broken_quarantine_entry_does_not_stop_the_purge(arena, cfg_for, run_once, store,
                                                          tmp_path, capsys):
    cfg = cfg_for("folder")
    first_id, first, config_file = _quarantine_one(arena, cfg, run_once, store, tmp_path)
    second = deliver(arena.maildir, eicar_message("second"))
    run_once(cfg)
    held = arena.maildir / ".Quarantine" / "cur" / first.name
    arena.as_owner(f"rm {held} && mkfifo {held}")
    code, out, _ = q(capsys, config_file, "purge", "--older-than-days", "0")
    assert code == 0 and "deleted 1 quarantined" in out
    assert not (arena.maildir / ".Quarantine" / "new" / second.name).exists()


def test_a_flood_of_symlinks_is_one_log_line_per_folder(arena, cfg_for, store, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    arena.as_owner(f"cd {arena.maildir}/new && for i in $(seq 1 300); do "
                   f"ln -s /etc/passwd link$i; done")
    worker = build_worker(cfg_for("store"), store)
    source = worker.sources["mailboxes"]
    for _ in range(3):
        list(source.sweep())
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "300 entries skipped (300 symlink" in lines[0]


def test_a_glob_never_lists_a_directory_behind_a_users_symlink(arena, cfg_for, store):
    from inotify_simple import INotify
    from inotify_simple import flags as inflags

    secret = arena.sentinel / "secret-dir"
    (secret / "box" / "new").mkdir(parents=True)
    (secret / "box" / "cur").mkdir()
    arena.as_owner(f"ln -s {secret} {arena.home}/mail")
    watch = INotify()
    watch.add_watch(str(secret), inflags.OPEN | inflags.ACCESS)
    cfg = cfg_for("store")
    cfg = replace(cfg, sources=(replace(cfg.sources[0], paths=(
        str(arena.base / "home" / "*" / "mail" / "*"),)),))
    list(build_worker(cfg, store).sources["mailboxes"].sweep())
    assert watch.read(timeout=200) == []  # root never opened it
    watch.close()


def test_a_release_works_for_a_name_of_255_bytes(arena, cfg_for, run_once, store, tmp_path,
                                                 capsys):
    unique = "1." + "x" * 240 + ".host"
    infected = deliver(arena.maildir, eicar_message(), unique=unique)
    cfg = cfg_for("store")
    run_once(cfg)
    assert not infected.exists()
    config_file = write_config(tmp_path / "long.toml", cfg, extra=(
        f'\n[[source]]\nname = "mailboxes"\ntype = "maildir"\n'
        f'paths = ["{arena.maildir}"]\n'))
    code, _, err = q(capsys, config_file, "release", str(only_message(store)["id"]))
    assert code == 0, err
    assert infected.exists()
