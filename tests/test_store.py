"""The verdict store on SQLite and PostgreSQL: migrations, the v_scans view, the cache."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from sqlalchemy import inspect, text

from spoolscan.store.db import create_engine_for, schema_status, upgrade
from spoolscan.store.repo import DONE, MessageInfo, ScanRecord, Store

REPO = Path(__file__).resolve().parent.parent
V_SCANS_COLUMNS = {"scanned_at", "source", "location", "queue_id", "sender", "recipients",
                   "direction", "verdict", "signature", "fingerprint", "trigger", "cached",
                   "action"}


def record(store: Store, identity: str = "id-1", verdict: str = "clean", **kw) -> int:
    info = MessageInfo(source="postfix", kind="postfix-hold", identity=identity,
                       location="ABC123", queue_id="ABC123", sender="a@example.net",
                       recipients=("b@example.org", "c@example.org"), direction="inbound",
                       size=100, content_hash=kw.pop("content_hash", "h" * 64))
    stored = store.record_scans([ScanRecord(
        message=info, verdict=verdict, signature=kw.pop("signature", None), detail=None,
        fingerprint=kw.pop("fingerprint", "ClamAV 1.4.6/27001/x"), duration_ms=3,
        trigger=kw.pop("trigger", "arrival"), cached=False, state=DONE)])
    return stored[0].message_id


def fresh_database_url(db_url: str, tmp_path: Path) -> str:
    """An empty (unmigrated) database of the same kind as db_url."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'empty.db'}"
    from sqlalchemy import create_engine

    name = "spoolscan_empty_" + os.urandom(4).hex()
    admin = create_engine(db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return db_url.rsplit("/", 1)[0] + "/" + name


VIEWS = {"v_scans", "v_messages", "v_recipients", "v_actions", "v_fingerprints"}


def test_upgrade_from_empty_creates_tables_and_view(db_url, tmp_path):
    engine = create_engine_for(fresh_database_url(db_url, tmp_path))
    upgrade(engine)
    insp = inspect(engine)
    assert {"messages", "scans", "actions", "fingerprints",
            "message_recipients"} <= set(insp.get_table_names())
    assert set(insp.get_view_names()) >= VIEWS
    current, head = schema_status(engine)
    assert current == head
    engine.dispose()


def test_upgrading_a_store_with_mail_keeps_every_row(db_url, tmp_path):
    """From the first schema to the last with rows in it: nothing is lost (SQLite's
    batch mode copies tables; with foreign keys on, that once deleted every scan), and
    the recipients and sender domains of earlier mail are filled in."""
    engine = create_engine_for(fresh_database_url(db_url, tmp_path))
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO messages (source, kind, identity, location, sender, recipients, "
            "nrcpt, first_seen_at, updated_at, state, attempts) VALUES ('postfix', "
            "'postfix-hold', 'h/Q1/1/2', 'Q1', 'a@Example.NET.', 'b@x.org, c@Y.org', 2, "
            "'2026-12-01 22:10:00.123456', '2026-12-01 22:10:00.123456', 'done', 0)"))
        message_id = conn.execute(text("SELECT id FROM messages")).scalar()
        conn.execute(text(
            "INSERT INTO scans (message_id, scanned_at, verdict, duration_ms, \"trigger\", "
            "cached, retroactive) VALUES (:m, '2026-12-01 22:10:05.5', 'clean', 12, "
            "'arrival', false, false)"), {"m": message_id})
        conn.execute(text(
            "INSERT INTO actions (message_id, scan_id, action, requested_at, outcome) "
            "SELECT message_id, id, 'release', scanned_at, 'ok' FROM scans"))
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM v_scans")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM v_actions")).scalar() == 1
        assert conn.execute(text("SELECT recipient, recipient_domain FROM v_recipients "
                                 "ORDER BY position")).all() == [("b@x.org", "x.org"),
                                                                 ("c@Y.org", "y.org")]
        row = conn.execute(text("SELECT sender_domain, first_seen_utc, day, released "
                                "FROM v_messages")).one()
    assert tuple(row) == ("example.net", "2026-12-01T22:10:00+00:00", "2026-12-01", 1)
    engine.dispose()


def test_messages_keep_their_headers_envelope_details_and_recipients(store):
    info = MessageInfo(source="postfix", kind="postfix-hold", identity="h/Q2/1/2",
                       location="Q2", queue_id="Q2", sender="",
                       recipients=("b@Example.ORG", "c@example.net"), direction="inbound",
                       subject="Hello \udcff\x00 <b>", message_id="<1@x>",
                       header_from="Mailer <MAILER-DAEMON@Relay.Example.COM>",
                       client_address="192.0.2.7", helo="relay.example.com", size=10)
    record_info(store, info)
    # A later sighting that knows less (a rescan answered from the cache) keeps it all.
    record_info(store, MessageInfo(source="postfix", kind="postfix-hold",
                                   identity="h/Q2/1/2", location="Q2"))
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT subject, message_id, header_from, client_address, "
                                "helo, sender_domain, originator FROM v_messages")).one()
        rcpts = conn.execute(text("SELECT recipient, recipient_domain FROM v_recipients "
                                  "ORDER BY position")).all()
    assert tuple(row) == ("Hello \\xff\\x00 <b>", "<1@x>",
                          "Mailer <MAILER-DAEMON@Relay.Example.COM>", "192.0.2.7",
                          "relay.example.com", "relay.example.com", "")
    assert [tuple(r) for r in rcpts] == [("b@Example.ORG", "example.org"),
                                         ("c@example.net", "example.net")]


def test_a_delivered_message_has_its_mailbox_as_recipient(store):
    record_info(store, MessageInfo(source="mailboxes", kind="maildir",
                                   identity="/vmail/a/Maildir/1.M2", mailbox="/vmail/a/Maildir",
                                   location="/vmail/a/Maildir/new/1.M2",
                                   header_from="Alice <alice@Example.net>"))
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT recipient, recipient_domain FROM v_recipients")
                            ).all() == [("/vmail/a/Maildir", None)]
        assert conn.execute(text("SELECT sender_domain FROM messages")).scalar() == \
            "example.net"


def record_info(store: Store, info: MessageInfo) -> None:
    store.record_scans([ScanRecord(message=info, verdict="clean", signature=None,
                                   detail=None, fingerprint="f", duration_ms=1,
                                   trigger="arrival", cached=False, state=DONE)])


def test_v_scans_has_the_documented_columns(store):
    record(store)
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM v_scans")).mappings().one()
    assert set(row.keys()) >= V_SCANS_COLUMNS
    assert row["queue_id"] == "ABC123" and row["verdict"] == "clean"
    assert row["recipients"] == "b@example.org, c@example.org"


def test_v_scans_shows_the_latest_action(store):
    message_id = record(store, verdict="infected", signature="Eicar")
    with store.engine.connect() as conn:
        scan_id = conn.execute(text("SELECT max(id) FROM scans")).scalar()
    store.record_action(message_id, scan_id, "quarantine", "failed", "disk full")
    store.record_action(message_id, scan_id, "quarantine", "ok")
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT action, action_outcome FROM v_scans")).one()
    assert tuple(row) == ("quarantine", "ok")


def test_cached_verdict_needs_same_content_and_fingerprint(store):
    record(store, content_hash="a" * 64, verdict="infected", signature="X")
    assert store.cached_verdict("a" * 64, "ClamAV 1.4.6/27001/x").signature == "X"
    assert store.cached_verdict("a" * 64, "ClamAV 1.4.6/27002/y") is None
    assert store.cached_verdict("b" * 64, "ClamAV 1.4.6/27001/x") is None


def test_unchecked_verdicts_are_never_cached(store):
    record(store, content_hash="c" * 64, verdict="unchecked")
    assert store.cached_verdict("c" * 64, "ClamAV 1.4.6/27001/x") is None


def test_a_message_is_one_row_however_often_it_is_scanned(store):
    record(store, identity="same")
    record(store, identity="same", trigger="rescan")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM scans")).scalar() == 2


def test_clean_then_infected_on_rescan_is_retroactive(store):
    record(store, identity="m", verdict="clean")
    record(store, identity="m", verdict="infected", signature="New.Sig", trigger="rescan",
           fingerprint="ClamAV 1.4.6/27002/y")
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT previous_verdict, retroactive FROM v_scans "
                                "WHERE verdict = 'infected'")).one()
    assert row[0] == "clean" and bool(row[1]) is True


def test_new_fingerprint_is_noted_once(store):
    assert store.note_fingerprint("ClamAV 1.4.6/27001/x") is True
    assert store.note_fingerprint("ClamAV 1.4.6/27001/x") is False
    assert store.latest_fingerprint() == "ClamAV 1.4.6/27001/x"


def test_alembic_command_line_upgrades_from_the_repository_root(db_url, tmp_path):
    url = fresh_database_url(db_url, tmp_path)
    env = {**os.environ, "SPOOLSCAN_DATABASE_URL": url}
    result = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    engine = create_engine_for(url)
    assert "v_scans" in inspect(engine).get_view_names()
    engine.dispose()


def test_installed_wheel_carries_the_migrations(tmp_path):
    """A non-editable install (a built wheel) can run `spoolscan db upgrade`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(REPO)], check=True,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("spoolscan-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "spoolscan/migrations/env.py" in names
    assert any(n.startswith("spoolscan/migrations/versions/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    url = f"sqlite:///{tmp_path / 'wheel.db'}"
    result = subprocess.run([sys.executable, "-m", "spoolscan", "db", "upgrade"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(target),
                                 "SPOOLSCAN_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert str(target) in subprocess.run(
        [sys.executable, "-c", "import spoolscan; print(spoolscan.__file__)"], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True).stdout


def test_a_batch_may_name_the_same_message_twice(store):
    info = MessageInfo(source="cli", kind="file", identity="/x", location="/x",
                       content_hash="d" * 64)
    records = [ScanRecord(message=info, verdict=v, signature=None, detail=None,
                          fingerprint="f", duration_ms=1, trigger="manual", cached=False,
                          state=DONE) for v in ("error", "clean")]
    stored = store.record_scans(records)
    assert stored[0].message_id == stored[1].message_id
    assert stored[1].previous_verdict == "error"
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM scans")).scalar() == 2


def test_failed_actions_count_as_attempts_and_finished_ones_reset_them(store):
    from spoolscan.store.repo import RETRY, ActionRecord

    message_id = record(store)
    store.record_actions([ActionRecord(message_id, None, "release", "failed", "boom",
                                       state=RETRY)])
    store.record_actions([ActionRecord(message_id, None, "release", "failed", "boom",
                                       state=RETRY)])
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT attempts, last_error FROM messages")).one() == \
            (2, "boom")
    store.record_actions([ActionRecord(message_id, None, "release", "ok", state=DONE)])
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT attempts, state FROM messages")).one() == (0, DONE)


def test_schema_head_constant_matches_the_migrations():
    from spoolscan.store.db import SCHEMA_HEAD, alembic_head

    assert alembic_head() == SCHEMA_HEAD


def test_a_batch_of_new_and_known_messages_keeps_each_verdict_with_its_message(store):
    """Rows are matched by key: PostgreSQL returns upserted rows in its own order."""
    known = MessageInfo(source="postfix", kind="postfix-hold", identity="known",
                        location="AAA", content_hash="a" * 64)
    store.record_scans([ScanRecord(message=known, verdict="error", signature=None,
                                   detail="down", fingerprint="f", duration_ms=1,
                                   trigger="arrival", cached=False, state="retry")])
    fresh = [MessageInfo(source="postfix", kind="postfix-hold", identity=f"new{i}",
                         location=f"B{i}", content_hash="b" * 64) for i in range(5)]
    records = [ScanRecord(message=m, verdict=v, signature=sig, detail=None, fingerprint="f",
                          duration_ms=1, trigger="arrival", cached=False, state=DONE)
               for m, v, sig in [(fresh[0], "clean", None), (fresh[1], "clean", None),
                                 (known, "infected", "Bad"), (fresh[2], "clean", None),
                                 (fresh[3], "clean", None), (fresh[4], "clean", None)]]
    stored = store.record_scans(records)
    with store.engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT identity, verdict FROM messages")).all())
        scan_rows = dict(conn.execute(text(
            "SELECT s.id, m.identity FROM scans s JOIN messages m ON m.id = s.message_id")
        ).all())
    assert rows["known"] == "infected"
    assert all(rows[f"new{i}"] == "clean" for i in range(5))
    for record, s in zip(records, stored, strict=True):
        assert scan_rows[s.scan_id] == record.message.identity
    assert stored[2].previous_verdict == "error"


def test_a_finished_message_is_not_rewritten_by_a_late_failure(store):

    record(store, identity="finished")
    info = MessageInfo(source="postfix", kind="postfix-hold", identity="finished",
                       location="ABC123")
    store.note_failure(info, "no longer in the queue", retry=None)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM messages")).scalar() == DONE


def test_released_hold_mail_is_not_a_rescan_candidate(store):
    record(store, identity="released")  # postfix-hold, clean, done: it left the queue
    assert list(store.rescan_candidates(None, "ClamAV 1.4.6/27002/y")) == []
    assert store.record_clean_copies("ClamAV 1.4.6/27002/y", None) == 0


def test_a_gone_result_from_another_process_does_not_undo_a_finished_action(store):
    from spoolscan.store.repo import GONE, ActionRecord

    message_id = record(store)
    store.record_actions([ActionRecord(message_id, None, "release", "ok", state=DONE)])
    store.record_actions([ActionRecord(message_id, None, "release", "gone", state=GONE)])
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM messages")).scalar() == DONE


def test_the_tables_the_code_uses_are_the_tables_the_migrations_make(db_url):
    # The code's table definitions and the migrations are written separately: a column
    # type, nullability, index or foreign key that differs would only show up on a
    # real database.  Alembic's comparison lists every difference.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from spoolscan.store.models import metadata

    engine = create_engine_for(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_a_new_sqlite_store_is_migrated_in_a_process_of_its_own(tmp_path):
    # The migration's libraries (~15 MB) must not stay loaded in a long-running worker.
    from spoolscan.store.db import SCHEMA_HEAD, upgrade_apart

    url = f"sqlite:///{tmp_path / 'new.db'}"
    before = {m for m in sys.modules if m.split(".")[0] in ("alembic", "mako")}
    assert upgrade_apart(url) is True
    engine = create_engine_for(url)
    try:
        assert schema_status(engine) == (SCHEMA_HEAD, SCHEMA_HEAD)
    finally:
        engine.dispose()
    assert {m for m in sys.modules if m.split(".")[0] in ("alembic", "mako")} == before


def test_the_migration_process_imports_nothing_from_the_current_directory(tmp_path,
                                                                          monkeypatch):
    # Someone else's directory (a mailbox, /tmp) may be where an admin runs spoolscan.
    planted = tmp_path / "cwd"
    for package in ("spoolscan", "sqlalchemy"):
        (planted / package).mkdir(parents=True)
        (planted / package / "__init__.py").write_text(
            f"open({str(tmp_path / 'owned')!r}, 'w').write('planted code ran')\n")
    (planted / "logging.py").write_text(
        f"open({str(tmp_path / 'owned')!r}, 'w').write('planted code ran')\n")
    monkeypatch.chdir(planted)
    from spoolscan.store.db import upgrade_apart

    assert upgrade_apart(f"sqlite:///{tmp_path / 'new.db'}") is True
    assert not (tmp_path / "owned").exists()


def test_a_migration_that_fails_apart_is_left_to_the_caller(tmp_path):
    # The caller migrates in its own process, which reports the real error.
    from spoolscan.store.db import upgrade_apart

    (tmp_path / "a-directory.db").mkdir()
    assert upgrade_apart(f"sqlite:///{tmp_path / 'a-directory.db'}") is False
