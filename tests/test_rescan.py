"""Retroactive detection: a signature update makes mail that was clean known-bad."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import write_config
from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text

from spoolscan.config import Config, SourceConfig
from spoolscan.rescan import check_signatures, rescan
from spoolscan.runner import build_worker
from spoolscan.schedule import cron_trigger
from spoolscan.store.repo import Store
from spoolscan.testing.clamd import ClamdInstance, ndb_line

MARKER = b"SPOOLSCAN-RETROACTIVE-TEST-MARKER-7731"
NEW_SIGNATURE = ndb_line("Spoolscan.Test.Retro", MARKER)




def maildir_config(config: Config, clamd: ClamdInstance, pattern: str) -> Config:
    # The .Quarantine folder, so that the tests can see where each message went.
    src = SourceConfig(name="mailboxes", type="maildir", paths=(pattern,), sweep_interval=1.0,
                       quarantine="folder")
    return replace(config, sources=(src,),
                   clamd=replace(config.clamd, socket=str(clamd.socket_path),
                                 database_directory=str(clamd.db_dir)))


def rows(store: Store, sql: str) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql)).mappings()]


def rescan_once(cfg: Config, store: Store):  # type: ignore[no-untyped-def]
    """A worker started for one ``rescan`` of everything, stopped after it."""
    worker = build_worker(cfg, store)
    worker.start(watch=False)
    try:
        return rescan(worker, since=None)
    finally:
        worker.stop()


def deliver_corpus(root: Path) -> dict[str, Path]:
    box = make_maildir(root / "alice" / "Maildir", folders=(".Lists",))
    return {
        "clean": deliver(box, message(subject="plain")),
        "marked": deliver(box, message(subject="looked clean",
                                       body="text " + MARKER.decode() + "\n"),
                          subdir="cur", flags="S"),
        "marked-in-folder": deliver(box, message(subject="also marked",
                                                 body=MARKER.decode() + "\n"), folder=".Lists"),
        "eicar": deliver(box, eicar_message()),
    }


def test_signature_update_quarantines_exactly_the_new_detections(config, store, tmp_path,
                                                                 updatable_clamd):
    paths = deliver_corpus(tmp_path / "vmail")
    cfg = maildir_config(config, updatable_clamd, str(tmp_path / "vmail" / "*" / "Maildir"))
    worker = build_worker(cfg, store)
    worker.run_once()
    assert paths["marked"].exists() and paths["clean"].exists()
    assert not paths["eicar"].exists()  # quarantined on arrival

    updatable_clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))
    worker = build_worker(cfg, store)
    worker.start(watch=False)
    try:
        summary = check_signatures(worker, timedelta(days=7))
    finally:
        worker.stop()

    assert summary is not None and summary.retroactive == 2
    assert not paths["marked"].exists() and not paths["marked-in-folder"].exists()
    assert paths["clean"].exists()
    quarantine = tmp_path / "vmail" / "alice" / "Maildir" / ".Quarantine"
    assert (quarantine / "cur" / paths["marked"].name).exists()  # flags kept
    retro = rows(store, "SELECT * FROM v_scans WHERE retroactive = true ORDER BY scan_id")
    assert {r["signature"] for r in retro} == {"Spoolscan.Test.Retro.UNOFFICIAL"}
    assert all(r["trigger"] == "rescan" and r["previous_verdict"] == "clean"
               and r["action"] == "quarantine" and "/27002/" in r["fingerprint"]
               for r in retro)


def test_unchanged_signatures_do_not_trigger_a_rescan(config, store, tmp_path,
                                                      updatable_clamd):
    deliver_corpus(tmp_path / "vmail")
    cfg = maildir_config(config, updatable_clamd, str(tmp_path / "vmail" / "*" / "Maildir"))
    worker = build_worker(cfg, store)
    worker.start(watch=False)
    try:
        first = check_signatures(worker, timedelta(days=7))
        second = check_signatures(worker, timedelta(days=7))
    finally:
        worker.stop()
    assert first is not None  # the first fingerprint ever seen: a (cheap) rescan
    assert second is None


def test_detection_delay_is_visible_in_the_store(config, store, tmp_path, updatable_clamd):
    paths = deliver_corpus(tmp_path / "vmail")
    cfg = maildir_config(config, updatable_clamd, str(tmp_path / "vmail" / "*" / "Maildir"))
    build_worker(cfg, store).run_once()
    updatable_clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))
    worker = build_worker(cfg, store)
    worker.start(watch=False)
    try:
        rescan(worker, since=None)
    finally:
        worker.stop()
    (row,) = rows(store, "SELECT m.first_seen_at, s.scanned_at FROM scans s JOIN messages m "
                         "ON m.id = s.message_id WHERE s.retroactive = true AND m.location "
                         f"LIKE '%{paths['marked'].name}'")
    assert row["scanned_at"] >= row["first_seen_at"]


def test_interrupted_rescan_resumes_without_repeating_finished_work(config, store, tmp_path,
                                                                    updatable_clamd):
    root = tmp_path / "vmail"
    for i in range(12):
        box = make_maildir(root / f"user{i}" / "Maildir")
        deliver(box, message(subject=f"distinct {i}"))
    cfg = maildir_config(config, updatable_clamd, str(root / "*" / "Maildir"))
    build_worker(cfg, store).run_once()
    updatable_clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))

    worker = build_worker(cfg, store)
    worker.start(watch=False)
    try:
        fingerprint = worker.service.fingerprints.refresh()
        first_batch = next(store.rescan_candidates(None, fingerprint, batch=5))
        for row in first_batch:  # the part done before the "interruption"
            worker.submit(worker.sources["mailboxes"].job_for(row, "rescan"))
        worker.wait_idle()
        before = updatable_clamd.scan_count()
        summary = rescan(worker, since=None)
    finally:
        worker.stop()
    assert summary.candidates == 7
    assert updatable_clamd.scan_count() - before == 7
    assert len(rows(store, "SELECT * FROM scans WHERE \"trigger\" = 'rescan'")) == 12


def test_rescan_command_reports_new_detections_with_exit_1(config, db_url, tmp_path,
                                                           updatable_clamd):
    paths = deliver_corpus(tmp_path / "vmail")
    cfg = maildir_config(config, updatable_clamd, str(tmp_path / "vmail" / "*" / "Maildir"))
    config_file = write_config(tmp_path / "r.toml", cfg, extra=f"""
[[source]]
name = "mailboxes"
type = "maildir"
paths = ["{tmp_path}/vmail/*/Maildir"]
""")
    cmd = [sys.executable, "-m", "spoolscan", "--config", str(config_file)]
    subprocess.run([*cmd, "run", "--once"], check=True, capture_output=True)
    unchanged = subprocess.run([*cmd, "rescan", "--if-signatures-changed"],
                               capture_output=True, text=True)
    updatable_clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))
    result = subprocess.run([*cmd, "rescan", "--since", "1d"], capture_output=True, text=True)
    assert unchanged.returncode == 0
    assert result.returncode == 1, result.stderr
    assert "2 detections (2 retroactive)" in result.stdout
    assert not paths["marked"].exists()
    again = subprocess.run([*cmd, "rescan", "--if-signatures-changed"], capture_output=True,
                           text=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.parametrize(("expr", "weekday"), [("0 3 * * 0", 6), ("0 3 * * 7", 6),
                                               ("0 3 * * 1", 0), ("0 3 * * sun", 6),
                                               ("0 3 * * 5", 4)])
def test_cron_weekdays_count_like_crontab(expr, weekday):
    """crontab: 0 and 7 are Sunday; APScheduler 3 alone would read 0 as Monday."""
    tz = ZoneInfo("UTC")
    trigger = cron_trigger(expr)
    trigger.timezone = tz
    fire = trigger.get_next_fire_time(None, datetime(2026, 11, 23, 12, 0, tzinfo=tz))
    assert fire.weekday() == weekday and fire.hour == 3


def test_cron_weekday_ranges_and_steps():
    from spoolscan.schedule import _dow_field

    assert _dow_field("1-5") == "mon,tue,wed,thu,fri"
    assert _dow_field("0-6") == "sun,mon,tue,wed,thu,fri,sat"
    assert _dow_field("*/2") == "sun,tue,thu,sat"
    assert _dow_field("5-7") == "sun,fri,sat"
    assert _dow_field("mon-fri") == "mon-fri"


def test_copies_cost_one_scan_and_every_infected_copy_is_quarantined(config, store, tmp_path,
                                                                    updatable_clamd):
    clean = message(subject="copy, clean")
    marked = message(subject="copy, marked", body=MARKER.decode() + "\n")
    copies = []
    for i in range(6):
        box = make_maildir(tmp_path / "vmail" / f"u{i}" / "Maildir")
        deliver(box, f"Delivered-To: u{i}@example.org\n".encode() + clean)
        copies.append(deliver(box, f"Delivered-To: u{i}@example.org\n".encode() + marked))
    cfg = maildir_config(config, updatable_clamd, str(tmp_path / "vmail" / "*" / "Maildir"))
    build_worker(cfg, store).run_once()
    updatable_clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))
    before = updatable_clamd.scan_count()
    summary = rescan_once(cfg, store)
    assert updatable_clamd.scan_count() - before == 2  # one per distinct content
    assert (summary.candidates, summary.scanned, summary.retroactive) == (12, 12, 6)
    assert not any(p.exists() for p in copies)
    rescans = rows(store, "SELECT verdict, cached FROM scans WHERE \"trigger\" = 'rescan'")
    assert sorted(r["verdict"] for r in rescans) == ["clean"] * 6 + ["infected"] * 6


def test_copies_answered_from_the_cache_are_not_even_opened(config, store, tmp_path,
                                                            updatable_clamd, monkeypatch):
    """After a signature update, a copy whose listed size is the one recorded takes its
    verdict from the copy scanned first without its file being opened; the infected
    ones are still quarantined, each as its own file."""
    marked = message(subject="copy, marked", body=MARKER.decode() + "\n")
    copies = []
    for i in range(5):
        box = make_maildir(tmp_path / "vmail" / f"u{i}" / "Maildir")
        copies.append(deliver(box, f"Delivered-To: u{i}@example.org\n".encode() + marked))
    cfg = maildir_config(config, updatable_clamd, str(tmp_path / "vmail" / "*" / "Maildir"))
    build_worker(cfg, store).run_once()
    updatable_clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))
    from spoolscan.broker import Broker

    opened = []
    real_open = Broker.mailbox_open

    def counting_open(self, loc):  # type: ignore[no-untyped-def]
        opened.append(loc.path)
        return real_open(self, loc)

    monkeypatch.setattr(Broker, "mailbox_open", counting_open)
    summary = rescan_once(cfg, store)
    assert (summary.candidates, summary.retroactive) == (5, 5)
    assert len(opened) == 1  # the copy clamd scanned; the four others were not opened
    assert not any(p.exists() for p in copies)
    quarantined = list(tmp_path.glob("vmail/*/Maildir/.Quarantine/*/*"))
    assert len(quarantined) == 5


def test_a_store_error_while_answering_from_the_cache_fails_one_message_not_the_rescan(
        config, store, tmp_path, updatable_clamd, monkeypatch):
    """The store failing while a copy is answered from the cache (without opening it)
    makes that message an error, retried later: the rescan still finishes."""
    import threading

    from sqlalchemy.exc import OperationalError

    from spoolscan.scan import VerdictCache

    marked = message(subject="copy, marked", body=MARKER.decode() + "\n")
    for i in range(3):
        box = make_maildir(tmp_path / "vmail" / f"u{i}" / "Maildir")
        deliver(box, f"Delivered-To: u{i}@example.org\n".encode() + marked)
    cfg = maildir_config(config, updatable_clamd, str(tmp_path / "vmail" / "*" / "Maildir"))
    build_worker(cfg, store).run_once()
    updatable_clamd.publish_daily(27002, extra_ndb=(NEW_SIGNATURE,))
    real_get = VerdictCache.get
    failed = []

    def get_failing_once_for_a_copy(self, key):  # type: ignore[no-untyped-def]
        if not failed and threading.current_thread().name.startswith("scan") and \
                real_get(self, key) is not None:
            failed.append(key)
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real_get(self, key)

    monkeypatch.setattr(VerdictCache, "get", get_failing_once_for_a_copy)
    worker = build_worker(cfg, store)
    worker.start(watch=False)
    done = []
    try:
        thread = threading.Thread(target=lambda: done.append(rescan(worker, since=None)))
        thread.start()
        thread.join(timeout=120)
    finally:
        worker.stop()
    assert failed and done, "the rescan did not finish"
    assert done[0].errors >= 1
