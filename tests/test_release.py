"""Releasing mail quarantined from the hold queue, through a real Postfix: the copy is
re-injected with its envelope, held, released once whatever its verdict, delivered once,
and left alone in the mailboxes; nobody else gets it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import hold_source_toml, running, wait_until, write_config
from mail import eicar_message
from sqlalchemy import text

from spoolscan.cli import main
from spoolscan.config import Config, SourceConfig
from spoolscan.runner import build_worker
from spoolscan.store.repo import Store
from spoolscan.testing.postfix import PostfixInstance

ALICE, BOB, RCPT = "alice@spoolscan.test", "bob@spoolscan.test", "rcpt@spoolscan.test"


def hold_and_mailboxes(config: Config, postfix: PostfixInstance) -> Config:
    """The hold queue and the mailboxes it delivers to, as a site would run both."""
    return replace(config, sources=(
        SourceConfig(name="postfix", type="postfix-hold",
                     config_directory=str(postfix.config_dir), sweep_interval=0.5),
        SourceConfig(name="mailboxes", type="maildir",
                     paths=(f"{postfix.vmail_dir}/*/Maildir",), sweep_interval=0.5),
    ), policy=replace(config.policy, local_domains=("spoolscan.test",)))


@pytest.fixture
def setup(config: Config, store: Store, postfix: PostfixInstance, tmp_path: Path):
    cfg = hold_and_mailboxes(config, postfix)
    config_file = write_config(tmp_path / "spoolscan.toml", cfg,
                               extra=hold_source_toml(postfix.config_dir) + f"""
[[source]]
name = "mailboxes"
type = "maildir"
paths = ["{postfix.vmail_dir}/*/Maildir"]
""")
    return cfg, config_file


def spoolscan(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as an admin runs it (as root: privilege separation included)."""
    return subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                           *args], capture_output=True, text=True, timeout=120)


def quarantine_one(cfg: Config, store: Store, postfix: PostfixInstance,
                   recipients: list[str]) -> int:
    """Send EICAR through the hold queue; the worker quarantines it; its message id."""
    postfix.send(eicar_message(), recipients=recipients)
    postfix.wait_held(1)
    worker = build_worker(cfg, store)
    with running(worker):
        wait_until(lambda: postfix.held_ids() == [] and worker.in_pipeline() == 0)
    (row,) = rows(store, "SELECT message_id FROM v_scans WHERE action = 'quarantine'")
    return int(row["message_id"])


def rows(store: Store, sql: str, **params: object) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings()]


def run_worker_until(cfg: Config, store: Store, condition) -> None:  # type: ignore[no-untyped-def]
    worker = build_worker(cfg, store)
    with running(worker):
        wait_until(condition, timeout=45)
        wait_until(lambda: worker.in_pipeline() == 0)


def test_a_held_message_released_from_quarantine_is_delivered_once_to_its_recipients(
        setup, store: Store, postfix: PostfixInstance) -> None:
    cfg, config_file = setup
    message_id = quarantine_one(cfg, store, postfix, [ALICE, BOB])
    assert postfix.delivered("alice") == [] and postfix.delivered("bob") == []

    done = spoolscan(config_file, "quarantine", "release", "--json", str(message_id))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] and answer["result"] == "released"

    run_worker_until(cfg, store, lambda: len(rows(
        store, "SELECT id FROM messages WHERE kind = 'maildir' AND verdict IS NOT NULL")) == 2)
    # Delivered once each (still infected: see the verdicts below), and left in the mailboxes by the
    # Maildir source that scans them.
    for user in ("alice", "bob"):
        (copy,) = postfix.delivered(user)
        content = copy.read_bytes()
        assert b"Subject: invoice" in content
        assert b"X-Spoolscan-Release:" in content
    assert postfix.delivered("rcpt") == []
    delivered = rows(store, "SELECT state, verdict FROM messages WHERE kind = 'maildir'")
    assert [(r["state"], r["verdict"]) for r in delivered] == [("released", "infected")] * 2

    # Both actions are recorded: the admin's release of the quarantined message, the
    # worker's release of its re-injected copy (and why).
    (restore,) = rows(store, "SELECT * FROM actions WHERE message_id = :m AND "
                             "action = 'restore'", m=message_id)
    assert restore["outcome"] == "ok" and "released from quarantine by" in restore["detail"]
    (release,) = rows(store, "SELECT * FROM v_releases")
    assert release["state"] == "consumed" and release["released_queue_id"]
    (let_through,) = rows(store, "SELECT a.action, a.detail, m.verdict FROM actions a "
                                 "JOIN messages m ON m.id = a.message_id WHERE "
                                 "a.message_id = :m AND a.outcome = 'ok'",
                          m=release["released_message_id"])
    assert let_through["action"] == "release" and let_through["verdict"] == "infected"
    assert "released from quarantine by" in let_through["detail"]
    assert rows(store, "SELECT * FROM v_scans WHERE action = 'quarantine' AND "
                       "message_id <> :m", m=message_id) == []


def test_a_second_release_is_refused_and_says_where_the_first_went(
        setup, store: Store, postfix: PostfixInstance) -> None:
    cfg, config_file = setup
    message_id = quarantine_one(cfg, store, postfix, [RCPT])
    assert spoolscan(config_file, "quarantine", "release", str(message_id)).returncode == 0
    again = spoolscan(config_file, "quarantine", "release", str(message_id))
    assert again.returncode == 2
    assert "already released" in again.stderr and "not passed the hold queue" in again.stderr
    run_worker_until(cfg, store, lambda: len(postfix.delivered("rcpt")) == 1)
    again = spoolscan(config_file, "quarantine", "release", str(message_id))
    assert again.returncode == 2 and "left the hold queue as" in again.stderr
    assert len(postfix.delivered("rcpt")) == 1


def test_dry_run_says_what_would_happen_and_changes_nothing(
        setup, store: Store, postfix: PostfixInstance) -> None:
    cfg, config_file = setup
    message_id = quarantine_one(cfg, store, postfix, [RCPT])
    done = spoolscan(config_file, "quarantine", "release", "--dry-run", str(message_id))
    assert done.returncode == 0, done.stderr
    assert "would be released to the Postfix of" in done.stdout
    assert f"<{RCPT}>" in done.stdout
    assert postfix.held_ids() == [] and rows(store, "SELECT * FROM releases") == []
    listed = spoolscan(config_file, "quarantine", "list", "--json")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [message_id]


def test_a_copy_with_the_ticket_but_another_envelope_is_quarantined(
        setup, store: Store, postfix: PostfixInstance) -> None:
    """Someone who learnt a ticket (a recipient sees it in the header) cannot use it to
    get infected mail to anybody else: the ticket is for one envelope, and once."""
    cfg, config_file = setup
    message_id = quarantine_one(cfg, store, postfix, [RCPT])
    # In this process (no privilege separation): the worker below, also in this process
    # and so root, must keep the quarantine store it owns.
    assert main(["--config", str(config_file), "quarantine", "release",
                 str(message_id)]) == 0
    (ticket,) = rows(store, "SELECT token FROM releases")
    forged = (f"X-Spoolscan-Release: {ticket['token']}\n".encode() + eicar_message())
    postfix.send(forged, recipients=[BOB])
    run_worker_until(cfg, store, lambda: len(postfix.delivered("rcpt")) == 1
                     and postfix.held_ids() == [])
    assert postfix.delivered("bob") == []
    # And once the ticket is used, a copy to the very same envelope is quarantined too.
    postfix.send(forged, recipients=[RCPT])
    run_worker_until(cfg, store, lambda: postfix.held_ids() == [])
    assert len(postfix.delivered("rcpt")) == 1
    quarantines = rows(store, "SELECT message_id FROM actions WHERE action = 'quarantine' "
                              "AND outcome = 'ok'")
    assert len(quarantines) == 3  # the original, then both forgeries


def test_releasing_a_purged_message_says_it_is_gone(
        setup, store: Store, postfix: PostfixInstance) -> None:
    cfg, config_file = setup
    message_id = quarantine_one(cfg, store, postfix, [RCPT])
    purged = spoolscan(config_file, "quarantine", "purge", "--older-than-days", "0")
    assert purged.returncode == 0, purged.stderr
    done = spoolscan(config_file, "quarantine", "release", str(message_id))
    assert done.returncode == 2
    assert "purged" in done.stderr and "nothing to release" in done.stderr
