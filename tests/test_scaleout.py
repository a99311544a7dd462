"""Many hosts on one store: shards and sweep-only mailboxes, rescans split with leases,
three hosts with three Postfix instances sharing one verdict cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import running, wait_until, write_config
from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text

from spoolscan.clamd import ClamdClient
from spoolscan.config import ConfigError, SourceConfig, parse_config
from spoolscan.runner import build_worker
from spoolscan.store.repo import Store
from spoolscan.testing.clamd import EICAR, ndb_line


def test_shard_config():
    cfg = parse_config({"source": [{"name": "m", "type": "maildir", "paths": ["/x/*"],
                                    "shard": "2/4", "sweep_only": True}]})
    assert cfg.sources[0].shard == (2, 4) and cfg.sources[0].sweep_only
    for bad in ("0/4", "5/4", "2", "a/b", 2):
        with pytest.raises(ConfigError, match="shard"):
            parse_config({"source": [{"name": "m", "type": "maildir", "paths": ["/x/*"],
                                      "shard": bad}]})
    with pytest.raises(ConfigError, match="only for a maildir"):
        parse_config({"source": [{"name": "p", "type": "postfix-hold", "shard": "1/2"}]})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_shards_split_the_mailboxes_and_each_host_owns_only_its_share(config, store, tmp_path):
    root = tmp_path / "vmail"
    for i in range(24):
        make_maildir(root / f"user{i}" / "Maildir")
    pattern = str(root / "*" / "Maildir")
    shares = []
    for k in range(1, 5):
        src = SourceConfig(name="mailboxes", type="maildir", paths=(pattern,), shard=(k, 4))
        source = build_worker(replace(config, sources=(src,)), store).sources["mailboxes"]
        shares.append(set(source.roots()))
        for r in source.roots():
            assert source.owns({"identity": f"{r}/.Lists/unique1"})
    assert sum(len(s) for s in shares) == 24 and len(set().union(*shares)) == 24
    assert all(shares)  # a stable hash spreads 24 mailboxes over 4 shares
    other = next(iter(shares[1]))
    assert not source.owns({"identity": f"{other}/unique2"})  # not in shard 4's share
    assert not source.owns({"identity": "/elsewhere/Maildir/unique3"})


def test_a_single_host_owns_mailboxes_named_with_a_dot_or_globbed_with_a_slash(config, store,
                                                                                tmp_path):
    """Ownership decides what rescans and reconciliation look at: a mailbox it misses
    would never be rescanned after a signature update."""
    root = tmp_path / "home"
    for pattern, box in ((str(root / "*" / ".maildir"), root / "a" / ".maildir"),
                         (str(root / "*" / "Maildir") + "/", root / "b" / "Maildir")):
        make_maildir(box)
        src = SourceConfig(name="mailboxes", type="maildir", paths=(pattern,))
        source = build_worker(replace(config, sources=(src,)), store).sources["mailboxes"]
        assert source.owns({"identity": f"{box}/unique1"})
        assert source.owns({"identity": f"{box}/.Sent/unique2"})
        assert source.owns({"identity": f"{box}/.maildir/unique3"})  # a folder of that name
        assert not source.owns({"identity": f"{tmp_path}/other/Maildir/unique4"})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sweep_only_mailboxes_are_found_without_inotify(config, store, tmp_path):
    box = make_maildir(tmp_path / "vmail" / "alice" / "Maildir")
    src = SourceConfig(name="mailboxes", type="maildir", sweep_interval=0.3, sweep_only=True,
                       paths=(str(tmp_path / "vmail" / "*" / "Maildir"),))
    worker = build_worker(replace(config, sources=(src,)), store)
    with running(worker):
        bad = deliver(box, eicar_message())
        good = deliver(box, message(subject="stays"))
        wait_until(lambda: not bad.exists(), 15)
        assert worker.sources["mailboxes"].watched() == []
    assert good.exists()


# --- rescans split across hosts ------------------------------------------------------------

MARKER = b"SPOOLSCAN-SCALEOUT-RETRO-MARKER-4410"
NEW_SIGNATURE = ndb_line("Spoolscan.Test.ScaleRetro", MARKER)
DISTINCT = 12  # contents; every third one matches the new signature




CONTENTS = [message(subject=f"content {i}", body=f"content {i}\n"
                   + (MARKER.decode() + "\n" if i % 3 == 0 else ""))
            for i in range(DISTINCT)]


def host_maildirs(root, host: int) -> dict[int, Path]:
    """Host ``host``'s own mailboxes, holding every one of the DISTINCT contents."""
    return {i: deliver(make_maildir(root / f"host{host}" / f"u{i % 4}" / "Maildir"), data)
            for i, data in enumerate(CONTENTS)}


def rows(store, sql: str, **params) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings()]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_three_hosts_rescan_each_content_once_and_take_over_a_dead_hosts_share(
        config, store, tmp_path, updatable_clamd):
    clamd = updatable_clamd
    root = tmp_path / "vmail"
    boxes = {h: host_maildirs(root, h) for h in (1, 2, 3)}
    cfgs = {}
    for h in (1, 2, 3):
        src = SourceConfig(name="mailboxes", type="maildir", quarantine="folder",
                           paths=(str(root / f"host{h}" / "*" / "Maildir"),))
        cfgs[h] = replace(config, sources=(src,),
                          clamd=replace(config.clamd, socket=str(clamd.socket_path),
                                        database_directory=str(clamd.db_dir)))
    before = clamd.scan_count()
    for h in (1, 2, 3):  # arrival on three hosts: the shared cache answers hosts 2 and 3
        build_worker(cfgs[h], store).run_once()
    assert clamd.scan_count() - before == DISTINCT

    clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))
    fingerprint = ClamdClient(cfgs[1].clamd).fingerprint()
    # A host that died mid-rescan: its lease on three contents expires in 3 s.
    hashes = sorted({r["content_hash"] for r in rows(store, "SELECT content_hash FROM "
                                                            "messages")})
    with store.engine.begin() as conn:
        for digest in hashes[:3]:
            conn.execute(text("INSERT INTO rescan_claims (fingerprint, content_hash, holder, "
                              "lease_until, created_at) VALUES (:f, :h, 'dead-host:1', "
                              "now() + interval '3 seconds', now())"),
                         {"f": fingerprint, "h": digest})
    before = clamd.scan_count()
    cmds = {}
    for h in (1, 2, 3):
        path = write_config(tmp_path / f"host{h}.toml", cfgs[h], extra=f"""
[schedule]
rescan_lease = "3s"

[[source]]
name = "mailboxes"
type = "maildir"
quarantine = "folder"
paths = ["{root}/host{h}/*/Maildir"]
""")
        cmds[h] = [sys.executable, "-m", "spoolscan", "--config", str(path), "rescan", "--all"]
    # Host 3 starts first and is SIGKILLed as soon as it holds claims (mid-way: it cannot
    # finish before the dead host's lease expires); hosts 1 and 2 start meanwhile.
    procs = {3: subprocess.Popen(cmds[3], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)}
    victim = f"%:{procs[3].pid}"
    deadline = time.monotonic() + 30
    while procs[3].poll() is None and time.monotonic() < deadline:
        if rows(store, "SELECT 1 FROM rescan_claims WHERE holder LIKE :v", v=victim):
            procs[3].kill()
            break
        time.sleep(0.01)
    procs[3].wait()
    assert procs[3].returncode == -9
    held = rows(store, "SELECT count(*) AS n FROM rescan_claims WHERE holder LIKE :v AND "
                       "done_at IS NULL", v=victim)
    assert held[0]["n"] > 0  # it died holding leases: hosts 1 and 2 take them over
    for h in (1, 2):
        procs[h] = subprocess.Popen(cmds[h], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    for h in (1, 2):
        out, err = procs[h].communicate(timeout=90)
        assert procs[h].returncode == 1, err[-2000:]  # detections found
        assert " 0 errors" in out  # (clean copies may be recorded by another host)

    # Each distinct content was scanned by clamd once between the hosts (a scan lost
    # with the killed host, never recorded, is done again by the host taking over).
    fresh = rows(store, "SELECT content_hash, count(*) AS n FROM scans WHERE "
                        "\"trigger\" = 'rescan' AND NOT cached GROUP BY content_hash")
    assert sorted(r["content_hash"] for r in fresh) == hashes
    assert all(r["n"] == 1 for r in fresh)
    assert DISTINCT <= clamd.scan_count() - before <= DISTINCT + 50
    assert rows(store, "SELECT * FROM rescan_claims WHERE fingerprint = :f AND "
                       "done_at IS NULL", f=fingerprint) == []
    for h in (1, 2):  # each host acted on its own copies, once each
        for i, path in boxes[h].items():
            assert path.exists() == (i % 3 != 0)

    # Host 3 restarted: its own mail is finished from the cache, without clamd.
    before = clamd.scan_count()
    again = subprocess.run([sys.executable, "-m", "spoolscan", "--config",
                            str(tmp_path / "host3.toml"), "rescan", "--all"],
                           capture_output=True, text=True, timeout=90)
    assert again.returncode in (0, 1), again.stderr[-2000:]
    assert clamd.scan_count() == before
    for i, path in boxes[3].items():
        assert path.exists() == (i % 3 != 0)
    acted = rows(store, "SELECT message_id, count(*) AS n FROM actions WHERE action = "
                        "'quarantine' AND outcome = 'ok' GROUP BY message_id")
    assert len(acted) == 3 * (DISTINCT // 3) and all(r["n"] == 1 for r in acted)
    assert len(rows(store, "SELECT * FROM scans WHERE retroactive")) == 3 * (DISTINCT // 3)


# --- three hosts, three Postfix instances, one PostgreSQL ----------------------------------

RCPT = "rcpt@spoolscan.test"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_three_hosts_share_verdicts_and_each_handles_its_own_mail(config, db_url, clamd,
                                                                  postfix_factory):
    hosts = [postfix_factory(f"mx{i}", hostname=f"mx{i}.spoolscan.test") for i in (1, 2, 3)]
    # Real mail has a Date (else each Postfix adds its own, and the copies differ).
    date = {"Date": "Wed, 02 Dec 2026 02:00:00 +0000"}
    shared_clean = message(subject="to every MX", body="one mail, three hosts\n",
                           headers=date)
    shared_bad = message(subject="to every MX, infected", body="See attachment.\n",
                         attachment=EICAR, filename="eicar.com", headers=date)
    stores, workers = [], []
    for pf in hosts:
        src = SourceConfig(name="postfix", type="postfix-hold", sweep_interval=0.5,
                           config_directory=str(pf.config_dir))
        cfg = replace(config, sources=(src,),
                      policy=replace(config.policy, local_domains=("spoolscan.test",)))
        stores.append(Store.open(db_url))  # a host of its own: its own connections
        workers.append(build_worker(cfg, stores[-1]))
    before = clamd.scan_count()
    try:
        with running(workers[0]), running(workers[1]), running(workers[2]):
            # The same mail reaches the three hosts at the same moment.
            for i, pf in enumerate(hosts, start=1):
                for data in (shared_clean, shared_bad, message(subject=f"only mx{i}")):
                    pf.send(data, recipients=[RCPT])
            for pf in hosts:
                pf.wait_delivered("rcpt", 2, timeout=30)
                wait_until(lambda pf=pf: pf.held_ids() == [], 30)
    finally:
        for s in stores:
            s.close()
    # 3 distinct contents + the 2 shared ones: one clamd scan each, in total.
    assert clamd.scan_count() - before == 5
    for pf in hosts:
        delivered = sorted(p.read_bytes().count(b"to every MX") for p in pf.delivered("rcpt"))
        assert delivered == [0, 1]  # the shared clean one and its own; never the EICAR
    store = stores[0]
    msgs = rows(store, "SELECT host, verdict, state, content_hash FROM messages")
    assert len(msgs) == 9 and all(m["state"] == "done" for m in msgs)
    assert sorted(m["host"] for m in msgs) == sorted(f"mx{i}.spoolscan.test"
                                                     for i in (1, 2, 3) for _ in range(3))
    acted = rows(store, "SELECT a.action, m.host, count(*) AS n FROM actions a JOIN "
                        "messages m ON m.id = a.message_id WHERE a.outcome = 'ok' "
                        "GROUP BY a.action, m.host")
    assert sorted((r["action"], r["n"]) for r in acted) == (
        [("quarantine", 1)] * 3 + [("release", 2)] * 3)
    cached = rows(store, "SELECT count(*) AS n FROM scans WHERE cached")
    assert cached[0]["n"] == 4  # the shared contents on mx2 and mx3


@pytest.mark.parametrize("db_url", ["postgresql", "sqlite"], indirect=True)
def test_a_rescan_is_complete_per_host_on_a_shared_store(store):
    store.mark_rescanned("ClamAV daily/27002/", "mx1")
    assert not store.needs_rescan("ClamAV daily/27002/", "mx1")
    # Each host rescans its own mail: mx2 has not (one host on SQLite: it has).
    assert store.needs_rescan("ClamAV daily/27002/", "mx2") == store.shared
    assert not store.needs_rescan("ClamAV daily/27002/")


def test_doctor_on_network_mailboxes_and_shards(tmp_path, monkeypatch):
    from spoolscan import doctor

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nfiler:/vmail /srv/vmail nfs4 rw 0 0\n"
                      "filer:/x /srv/my\\040mail nfs rw 0 0\n")
    assert doctor.filesystem_type("/srv/vmail/a/Maildir", str(mounts)) == "nfs4"
    assert doctor.filesystem_type("/srv/my mail/b", str(mounts)) == "nfs"
    assert doctor.filesystem_type("/srv/vmailx", str(mounts)) == "ext4"
    make_maildir(tmp_path / "vmail" / "u1" / "Maildir")
    paths = (str(tmp_path / "vmail" / "*" / "Maildir"),)
    monkeypatch.setattr(doctor, "filesystem_type", lambda path: "nfs4")
    src = SourceConfig(name="m", type="maildir", paths=paths)
    with pytest.raises(doctor.Problem, match="network filesystem"):
        doctor.check_maildir_source(src)
    sharded = replace(src, sweep_only=True, shard=(1, 1))
    cfg = parse_config({"database": {"url": "sqlite:////tmp/x.db"}})
    with pytest.raises(doctor.Problem, match="database of this host only"):
        doctor.check_maildir_source(sharded, cfg)
    pg = parse_config({"database": {"url": "postgresql+psycopg://db/spoolscan"}})
    assert "1 in shard 1/1" in doctor.check_maildir_source(sharded, pg)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_killed_rescan_of_this_host_gives_its_claims_back_at_once(store):
    """Its leases would otherwise hold the next rescan up to rescan_lease (5 min)."""
    import socket

    from spoolscan.rescan import _dead_here

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}"
    assert _dead_here(dead)
    assert not _dead_here(f"{socket.gethostname()}:{os.getpid()}")  # this one runs
    assert not _dead_here(f"other-host.example:{gone.pid}")  # not ours to judge

    fp = "ClamAV 1.4.6 daily/27002/"
    assert store.claim_rescan(fp, ["c1", "c2"], dead, 300) == ["c1", "c2"]
    assert store.claim_rescan(fp, ["c1", "c2"], "other:1", 300) == []  # leased
    assert store.rescan_claim_holders(fp) == [dead]
    assert store.release_rescan_claims_of(fp, [dead]) == 2
    assert store.claim_rescan(fp, ["c1", "c2"], "other:1", 300) == ["c1", "c2"]
