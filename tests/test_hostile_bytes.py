"""Hostile bytes: one bad message, name or record never stops the others.

Non-UTF-8 envelope senders and file names are stored losslessly escaped (one rule:
``spoolscan.text``); corrupt queue files are flagged, never fatal; a record the store
refuses is isolated; secrets are never printed; what reaches a log, a terminal or a
spreadsheet is made safe.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import write_config
from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text
from sqlalchemy.exc import DataError
from test_hold_queue import RCPT, hold_config, message_rows, write_as_postfix
from test_queuefile import rec

from spoolscan.cli import main
from spoolscan.config import SourceConfig
from spoolscan.logs import TextFormatter
from spoolscan.model import MessageInfo
from spoolscan.runner import build_worker
from spoolscan.store.repo import ScanRecord
from spoolscan.text import escape, printable, unescape


def rows(store, sql: str, **params) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


# --- the hold queue --------------------------------------------------------------------------


def sendmail(postfix, sender: bytes, data: bytes) -> None:
    """Local submission (pickup), where any bytes can be the sender."""
    subprocess.run([b"sendmail", b"-C", str(postfix.config_dir).encode(), b"-f", sender,
                    RCPT.encode()], input=data, check=True, timeout=30)


def test_a_non_utf8_sender_does_not_hold_back_the_mail_around_it(config, store, postfix):
    cfg = hold_config(config, postfix)
    for i in range(3):
        postfix.send(message(subject=f"clean {i}"), recipients=[RCPT])
    sendmail(postfix, b"\xfe\xfe@bad.example", message(subject="odd sender"))
    postfix.send(eicar_message(), recipients=[RCPT])
    postfix.wait_held(5, timeout=30)

    build_worker(cfg, store).run_once()

    postfix.wait_delivered("rcpt", 4)
    assert postfix.held_ids() == []
    odd = rows(store, "SELECT sender, state FROM messages WHERE sender LIKE :p",
               p="%bad.example")
    assert odd == [{"sender": "\\xfe\\xfe@bad.example", "state": "done"}]
    assert unescape(odd[0]["sender"]) == b"\xfe\xfe@bad.example".decode("utf-8",
                                                                       "surrogateescape")


def _records(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, data offset, length) of the records up to the 'M' record."""
    found, pos = [], 0
    while pos < len(data):
        kind, length, shift, i = data[pos:pos + 1], 0, 0, pos + 1
        while True:
            byte = data[i]
            length |= (byte & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if not byte & 0x80:
                break
        found.append((kind, i, length))
        if kind == b"M":
            break
        pos = i + length
    return found


def _with_record(real: bytes, rtype: bytes, make) -> bytes:  # type: ignore[no-untyped-def]
    """``real`` with the data of its first ``rtype`` record replaced by ``make(length)``
    (of the same length, so every offset stays right)."""
    kind, start, length = next(r for r in _records(real) if r[0] == rtype)
    data = make(length)
    assert len(data) == length
    return real[:start] + data + real[start + length:]


def test_absurd_numbers_in_queue_files_are_flagged_and_the_rest_flows(config, store,
                                                                      postfix):
    cfg = hold_config(config, postfix, max_attempts=1)
    good = postfix.send(message(subject="good"), recipients=[RCPT])
    postfix.wait_held(1)
    real = postfix.held_path(good).read_bytes()
    hold = postfix.queue_dir / "hold"
    # A time far too large to be a date, one just past year 9999, and a size record with
    # 5,000 digits (more than Python converts to an int by default).
    write_as_postfix(hold / "A1B2C3D4E5F", _with_record(real, b"T", lambda n: b"9" * n))
    write_as_postfix(hold / "B1C2D3E4F5A", _with_record(
        real, b"T", lambda n: (b"253402300800 " + b"1" * n)[:n]))
    digits = b"9" * 5000 + b" 1 1"
    write_as_postfix(hold / "C1D2E3F4A5B", rec("C", digits) + real)
    worker = build_worker(cfg, store)

    worker.run_once()  # does not raise, exits normally

    postfix.wait_delivered("rcpt", 1)
    by_id = {r["queue_id"]: r for r in message_rows(store)}
    assert by_id[good]["state"] == "done"
    for bad in ("A1B2C3D4E5F", "B1C2D3E4F5A", "C1D2E3F4A5B"):
        assert by_id[bad]["state"] == "stuck" and by_id[bad]["last_error"], bad
        assert (hold / bad).exists()  # kept, for an admin


def test_a_record_the_store_refuses_is_flagged_and_the_batch_goes_on(config, store, postfix,
                                                                    monkeypatch):
    cfg = hold_config(config, postfix)
    ids = [postfix.send(message(subject=f"m{i}"), recipients=[RCPT]) for i in range(4)]
    postfix.wait_held(4)
    poisoned = ids[2]
    real = store.record_scans

    def refusing(records, plan=None):
        if any(r.message.queue_id == poisoned for r in records):
            raise DataError("INSERT", {}, Exception("invalid byte sequence"))
        return real(records, plan)

    monkeypatch.setattr(store, "record_scans", refusing)
    build_worker(cfg, store).run_once()

    postfix.wait_delivered("rcpt", 3)
    assert postfix.held_ids() == [poisoned]
    (row,) = rows(store, "SELECT state, last_error FROM messages WHERE queue_id = :q",
                  q=poisoned)
    assert row["state"] == "stuck" and "refused" in row["last_error"]


# --- Maildir --------------------------------------------------------------------------------


def test_an_undecodable_file_name_does_not_stop_the_sweep(config, store, tmp_path):
    odd_box = make_maildir(tmp_path / "vmail" / "odd" / "Maildir")
    other = make_maildir(tmp_path / "vmail" / "other" / "Maildir")
    odd_name = os.fsdecode(b"\xff\xfe")
    deliver(odd_box, eicar_message(), unique=odd_name)
    newline_name = "1.M1P1.host\nspoolscan[1]: forged line"
    deliver(odd_box, message(), unique=newline_name)
    infected = deliver(other, eicar_message())
    src = SourceConfig(name="mailboxes", type="maildir",
                       paths=(str(tmp_path / "vmail" / "*" / "Maildir"),))
    config_file = write_config(tmp_path / "s.toml", config, extra=(
        f'\n[[source]]\nname = "mailboxes"\ntype = "maildir"\npaths = ["{src.paths[0]}"]\n'))

    result = subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                             "run", "--once"], capture_output=True, text=True, timeout=120,
                            errors="surrogateescape")

    assert result.returncode == 0, result.stderr
    assert not infected.exists() and not (odd_box / "new" / odd_name).exists()
    states = {r["identity"]: r["state"] for r in rows(store, "SELECT * FROM messages")}
    assert states[escape(f"{odd_box}/{odd_name}")] == "done"  # stored as \xff\xfe
    assert states[escape(f"{other}/{infected.name}")] == "done"
    # No line of the log starts with the forged text: the newline was escaped.
    assert not any(line.startswith("spoolscan[1]: forged") for line in
                   result.stderr.splitlines())
    assert "\\nspoolscan[1]: forged line" in result.stderr


def test_scan_walks_a_deep_tree(tmp_path, config_file, capsys):
    deep = tmp_path / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1100):  # made through directory fds: the path is too long to name
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    out_fd = os.open("bottom.eml", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
    os.write(out_fd, eicar_message())
    os.close(out_fd)
    os.close(fd)
    try:
        code = main(["--config", str(config_file), "scan", "--no-store", str(deep)])
        out = capsys.readouterr().out
        found = [line for line in out.splitlines() if line.endswith("FOUND")]
        assert code == 1 and len(found) == 1
        assert found[0].endswith("/d/bottom.eml: Spoolscan.Test.EICAR-NDB.UNOFFICIAL FOUND")
    finally:
        _remove_level_by_level(deep)


def _remove_level_by_level(top: Path) -> None:
    """Remove a tree too deep for shutil.rmtree (pytest's clean-up of old temporary
    directories recurses and would fail on it): lift each level up, then remove it."""
    lifted = top.with_name(top.name + ".up")
    while True:
        for entry in top.iterdir():
            if entry.name != "d":
                entry.unlink()
        if not (top / "d").is_dir():
            top.rmdir()
            return
        os.rename(top / "d", lifted)
        top.rmdir()
        os.rename(lifted, top)


# --- secrets ----------------------------------------------------------------------------------


PASSWORD = "s3cr3t-Passw0rd"
UNREACHABLE = f"postgresql+psycopg://spoolscan:{PASSWORD}@127.0.0.1:1/spoolscan"


@pytest.mark.parametrize("command", [["report", "summary"], ["quarantine", "list"],
                                     ["run", "--once"], ["scan", "/etc/hostname"],
                                     ["rescan", "--all"], ["db", "status"]])
@pytest.mark.parametrize("where", ["config file", "environment"])
def test_the_database_password_is_never_printed(tmp_path, config, command, where):
    env = {**os.environ}
    if where == "config file":
        cfg = replace(config, database=replace(config.database, url=UNREACHABLE))
    else:
        cfg = config
        env["SPOOLSCAN_DATABASE_URL"] = UNREACHABLE
    config_file = write_config(tmp_path / "pw.toml", cfg,
                               extra='\n[[source]]\nname = "m"\ntype = "maildir"\n'
                                     f'paths = ["{tmp_path}/none/*/Maildir"]\n')
    result = subprocess.run([sys.executable, "-m", "spoolscan", "-v", "--config",
                             str(config_file), *command], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert PASSWORD not in result.stdout + result.stderr
    assert "127.0.0.1" in result.stderr or "database" in result.stderr


# --- output safety ----------------------------------------------------------------------------


def test_csv_cells_that_look_like_formulas_are_neutralised(store, config_file, capsys):
    for i, sender in enumerate(("=HYPERLINK(\"http://evil\")", "+cmd", "-2+3", "@SUM(A1)")):
        info = MessageInfo(source="cli", kind="file", identity=f"f{i}", location=f"/f{i}",
                           sender=sender)
        store.record_scans([ScanRecord(message=info, verdict="infected", signature="Sig",
                                       detail=None, fingerprint="x", duration_ms=1,
                                       trigger="manual", cached=False, state="done")])
    assert main(["--config", str(config_file), "report", "infected", "--format",
                 "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = "\n".join(lines[1:])
    for dangerous in ("=HYPERLINK", "+cmd", "-2+3", "@SUM"):
        assert f"'{dangerous}" in body
        assert f",{dangerous}" not in body and f'"{dangerous}' not in body


def test_log_lines_escape_control_characters_and_undecodable_bytes():
    formatter = TextFormatter("%(levelname)s %(message)s", secret=PASSWORD)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s: verdict=clean", (
        os.fsdecode(b"/m/new/a\nINFO forged\x1b[2J\xff " + PASSWORD.encode()),), None)
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line
    assert line == "INFO /m/new/a\\nINFO forged\\x1b[2J\\xff ***: verdict=clean"


@pytest.mark.parametrize("raw", [b"plain", b"back\\slash", b"\xff\xfe", b"nul\x00byte",
                                 "caf\u00e9 \u2603".encode(), b"\\xff literal"])
def test_the_storage_rule_is_lossless(raw):
    name = os.fsdecode(raw)
    stored = escape(name)
    stored.encode("utf-8")  # storable
    assert "\x00" not in stored
    assert unescape(stored) == name and os.fsencode(unescape(stored)) == raw
    assert printable(name).isprintable()


def test_commits_are_durable_before_an_action(store, db_url):
    with store.engine.connect() as conn:
        if db_url.startswith("sqlite"):
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        else:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
