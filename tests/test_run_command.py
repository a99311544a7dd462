"""`spoolscan run`: the hold queue, the Maildirs and the scheduler in one process."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import timedelta

from conftest import hold_source_toml, wait_until, write_config
from mail import deliver, eicar_message, message

from spoolscan.rescan import check_signatures, rescan
from spoolscan.schedule import start_scheduler

RCPT = "rcpt@spoolscan.test"


def test_run_scans_hold_queue_and_maildirs_until_sigterm(config, postfix, tmp_path):
    maildirs = postfix.vmail_dir
    config_file = write_config(tmp_path / "run.toml", config,
                               extra=hold_source_toml(postfix.config_dir) + f"""
[[source]]
name = "mailboxes"
type = "maildir"
paths = ["{maildirs}/*/Maildir"]
quarantine = "folder"
sweep_interval = "1s"
""")
    worker = subprocess.Popen([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                               "run"], stderr=subprocess.PIPE, text=True)
    try:
        postfix.send(message(subject="through the hold queue"), recipients=[RCPT])
        postfix.send(eicar_message(), recipients=[RCPT])
        delivered = postfix.wait_delivered("rcpt", 1)
        inbox = postfix.maildir_for("rcpt")
        # Mail that reached a mailbox some other way is caught there.
        sneaked = deliver(inbox, eicar_message(subject="sneaked in"))
        wait_until(lambda: not sneaked.exists())
        assert list((inbox / ".Quarantine" / "new").iterdir())
        assert delivered[0].exists()  # the clean one stays
        assert postfix.held_ids() == []
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert "stopped:" in err and "infected" in err


def test_the_scheduler_has_the_configured_jobs_and_they_rescan(config, store, tmp_path):
    from dataclasses import replace

    from spoolscan.config import ScheduleConfig, SourceConfig
    from spoolscan.runner import build_worker

    cfg = replace(config, schedule=ScheduleConfig(signature_check="*/5 * * * *",
                                                  nightly_rescan="30 2 * * 0"),
                  sources=(SourceConfig(name="m", type="maildir",
                                        paths=(str(tmp_path / "none" / "*"),)),))
    worker = build_worker(cfg, store)
    worker.start(watch=False)
    scheduler = start_scheduler(cfg, worker)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"signature_check", "nightly_rescan", "purge"}
        assert jobs["signature_check"].func is check_signatures
        nightly = jobs["nightly_rescan"].trigger
        assert str(nightly.fields[4]) == "sun"  # crontab's 0 is Sunday
        summary = jobs["signature_check"].func(*jobs["signature_check"].args)
        assert summary is None or summary.errors == 0
        assert rescan(worker, since=None).errors == 0
        assert jobs["signature_check"].args[1] == timedelta(days=7)
    finally:
        scheduler.shutdown(wait=False)
        worker.stop()
