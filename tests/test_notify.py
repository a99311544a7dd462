"""Notifications through a real Postfix: the admin (and the recipient) are told, a burst
is held to the hourly limit and summed up in one digest, the mail itself never goes out."""

from __future__ import annotations

import time
from dataclasses import replace
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest
from conftest import running, wait_until
from mail import deliver, eicar_message, make_maildir
from sqlalchemy import text

from spoolscan.config import Config, NotifyConfig, SourceConfig
from spoolscan.runner import build_worker
from spoolscan.store.repo import Store
from spoolscan.testing.postfix import PostfixInstance

ADMIN = "alice@spoolscan.test"
RCPT = "rcpt@spoolscan.test"


def with_notices(config: Config, postfix: PostfixInstance, *sources: SourceConfig,
                 **notify: object) -> Config:
    """The hold queue of ``postfix`` (notices pass through it like any mail), more
    sources, and notices sent through that Postfix's sendmail."""
    hold = SourceConfig(name="postfix", type="postfix-hold",
                        config_directory=str(postfix.config_dir), sweep_interval=0.5)
    settings = {"admin": (ADMIN,), "sendmail": f"/usr/sbin/sendmail -C {postfix.config_dir}",
                "sender": "spoolscan@spoolscan.test", **notify}
    return replace(config, sources=(hold, *sources),
                   notify=NotifyConfig(**settings),  # type: ignore[arg-type]
                   policy=replace(config.policy, local_domains=("spoolscan.test",)))


def notices(store: Store) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT * FROM v_notices ORDER BY notice_id")).mappings()]


def received(postfix: PostfixInstance, user: str) -> list:
    return [message_from_bytes(p.read_bytes(), policy=default)
            for p in postfix.delivered(user)]


def test_the_admin_and_the_recipient_are_told_and_the_virus_is_not_sent(
        config: Config, store: Store, postfix: PostfixInstance) -> None:
    cfg = with_notices(config, postfix, recipients=True)
    postfix.send(eicar_message(subject="your invoice"), recipients=[RCPT])
    postfix.wait_held(1)
    worker = build_worker(cfg, store)
    with running(worker):
        wait_until(lambda: received(postfix, "alice") and received(postfix, "rcpt"),
                   timeout=45)
    (to_admin,) = received(postfix, "alice")
    assert to_admin["Subject"].startswith("[spoolscan] infected: ")
    assert to_admin["Auto-Submitted"] == "auto-generated"
    body = to_admin.get_content()
    assert "your invoice" in body and "spoolscan quarantine release" in body
    (to_recipient,) = received(postfix, "rcpt")
    assert "quarantined" in to_recipient["Subject"]
    for notice in (to_admin, to_recipient):
        assert not notice.is_multipart()  # nothing attached: the mail itself stays put
        raw = notice.as_string()
        assert "X5O!P%@AP" not in raw and "WDVPIVAlQEFQ" not in raw  # EICAR, plain or base64
    rows = notices(store)
    assert {(r["kind"], r["recipient"], r["status"]) for r in rows} == {
        ("admin", ADMIN, "sent"), ("recipient", RCPT, "sent")}
    assert all(r["event"] == "infected" and r["queue_id"] for r in rows)


def test_a_burst_of_200_is_held_to_the_hourly_limit_then_summed_up_in_one_digest(
        config: Config, store: Store, postfix: PostfixInstance, tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "vmail" / "victim" / "Maildir")
    for i in range(200):
        deliver(box, eicar_message(subject=f"burst {i}"))
    mailboxes = SourceConfig(name="mailboxes", type="maildir",
                             paths=(str(tmp_path / "vmail" / "*" / "Maildir"),),
                             sweep_interval=0.5)
    cfg = with_notices(config, postfix, mailboxes, max_per_hour=5)
    worker = build_worker(cfg, store)
    assert worker.notifier is not None
    with running(worker):
        wait_until(lambda: sum(r["status"] in ("sent", "queued")
                               for r in notices(store)) == 200, timeout=120)
        wait_until(lambda: len(received(postfix, "alice")) == 5, timeout=45)
        time.sleep(2)  # nothing more comes within the hour
        assert len(received(postfix, "alice")) == 5
        # An hour later the limit allows one more notice: the digest of the rest.
        assert worker.notifier.flush(now=time.time() + 3601) == 1
        wait_until(lambda: len(received(postfix, "alice")) == 6, timeout=45)
    digest = received(postfix, "alice")[-1]
    assert "195 event(s)" in digest["Subject"]
    assert digest.get_content().count("infected") == 195
    statuses = [r["status"] for r in notices(store) if r["event"] != "digest"]
    assert statuses.count("sent") == 5 and statuses.count("digested") == 195


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_custom_template_replaces_the_built_in_one(
        config: Config, store: Store, postfix: PostfixInstance, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "admin.txt").write_text("Subject: VIRUS $signature for $recipients\n\n"
                                         "Message $id; $nonsense stays as it is.\n")
    cfg = with_notices(config, postfix, templates=str(templates))
    postfix.send(eicar_message(), recipients=[RCPT])
    postfix.wait_held(1)
    worker = build_worker(cfg, store)
    with running(worker):
        wait_until(lambda: received(postfix, "alice"), timeout=45)
    (notice,) = received(postfix, "alice")
    assert notice["Subject"] == f"VIRUS Spoolscan.Test.EICAR-NDB.UNOFFICIAL for <{RCPT}>"
    assert "$nonsense stays as it is" in notice.get_content()


def test_no_notice_for_infected_mail_that_left_the_queue_before_the_action(
        config: Config, store: Store, postfix: PostfixInstance) -> None:
    """An admin deletes the held message while it is scanned: spoolscan records that it
    is gone and tells nobody it was quarantined (it was not)."""
    import subprocess

    cfg = with_notices(config, postfix, recipients=True)
    qid = postfix.send(eicar_message(subject="deleted by the admin"), recipients=[RCPT])
    postfix.wait_held(1)
    worker = build_worker(cfg, store)
    scan = worker.service.scan

    def scan_then_delete(job):  # type: ignore[no-untyped-def]
        outcome = scan(job)
        subprocess.run(["postsuper", "-c", str(postfix.config_dir), "-d", qid, "hold"],
                       check=True, capture_output=True)
        return outcome

    worker.service.scan = scan_then_delete  # type: ignore[method-assign]
    worker.run_once()
    with store.engine.connect() as conn:
        outcome = conn.execute(text("SELECT outcome FROM actions WHERE action = "
                                    "'quarantine' AND outcome <> 'pending'")).scalar()
    assert outcome == "gone" and postfix.held_ids() == []
    assert notices(store) == []
