"""`spoolscan report`: every report, in every format, over mail that was really scanned.

The store is filled once per database (SQLite and PostgreSQL) by real work: a private
Postfix's hold queue (inbound, outbound and internal mail, clean and infected), a Maildir
source (clean, infected, too large to scan), a signature update and its rescan (a
retroactive detection) and a clamd that does not answer (errors).  Then every report runs
through the command in every format; CSV and JSON are read back; the SQL printed by
``--format sql`` is pasted into ``sqlite3`` and ``psql`` and must give the same rows;
the HTML page is opened in headless Chromium.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import new_postgres_database, write_config
from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text

from spoolscan.cli import main
from spoolscan.config import (
    ClamdConfig,
    Config,
    DatabaseConfig,
    PolicyConfig,
    QuarantineConfig,
    SourceConfig,
)
from spoolscan.reports import REPORTS
from spoolscan.reports.catalog import resolve
from spoolscan.reports.query import Result, TimeRange, run_report, sql_text, time_range
from spoolscan.reports.render import _csv_cell, csv_text, duration, table_text
from spoolscan.rescan import check_signatures
from spoolscan.runner import build_worker
from spoolscan.store.db import create_engine_for, upgrade
from spoolscan.store.repo import Store, utcnow
from spoolscan.testing.clamd import EICAR, ClamdInstance, ndb_line

EICAR_SIG = "Spoolscan.Test.EICAR-NDB.UNOFFICIAL"
RETRO_SIG = "Spoolscan.Test.Retro.UNOFFICIAL"
MARKER = b"SPOOLSCAN-REPORTS-RETRO-MARKER-4417"
MAX_SIZE = 256 * 1024  # mail larger than this is "unchecked" (never read)

# A Subject and a From that try everything: markup that would run (and change the page
# title), terminal escapes, a bell, bytes that are not UTF-8, and an encoded-word that
# decodes to markup.
HOSTILE_SUBJECT = b"<script>document.title='pwned'</script> \x1b[31mred\x07 \xff\xfe caf\xc3\xa9"
HOSTILE_SUBJECT_STORED = "<script>document.title='pwned'</script> \x1b[31mred\x07 \\xff\\xfe café"
HOSTILE_SUBJECT_SHOWN = "<script>document.title='pwned'</script> \\x1b[31mred\\x07 \\xff\\xfe café"
HOSTILE_FROM = b"=?utf-8?q?=3Cimg_src=3Dx_onerror=3Dalert=281=29=3E?= <evil@Evil.Example>"
HOSTILE_FROM_STORED = "<img src=x onerror=alert(1)> <evil@Evil.Example>"

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")


def hostile_eicar(sender: bytes = b"evil@example.net") -> bytes:
    data = eicar_message(subject="PLACEHOLDER")
    data = data.replace(b"Subject: PLACEHOLDER", b"Subject: " + HOSTILE_SUBJECT, 1)
    return data.replace(b"From: alice@example.net", b"From: " + sender, 1)


# --- the store, filled by real scans --------------------------------------------------


@dataclass
class Filled:
    dialect: str
    url: str
    config: Config
    config_file: Path
    store: Store
    range_args: list[str]  # --since/--until: one fixed range for every call
    window: TimeRange
    tmp: Path


def _fill(config: Config, store: Store, postfix, clamd: ClamdInstance, tmp: Path) -> None:  # type: ignore[no-untyped-def]
    # 1. The hold queue: inbound clean, inbound infected (two recipients, hostile
    #    headers), outbound infected (a compromised account?), internal clean.
    hold = SourceConfig(name="postfix", type="postfix-hold",
                        config_directory=str(postfix.config_dir), sweep_interval=0.5)
    postfix.send(message(subject="Weekly news", sender="news@example.net",
                         to="rcpt@spoolscan.test"),
                 sender="news@example.net", recipients=["rcpt@spoolscan.test"])
    postfix.send(hostile_eicar(HOSTILE_FROM), sender="attacker@evil.example",
                 recipients=["rcpt@spoolscan.test", "alice@spoolscan.test"])
    postfix.send(eicar_message(subject="Your invoice"), sender="alice@spoolscan.test",
                 recipients=["partner@example.com"])
    postfix.send(message(subject="Lunch?", sender="alice@spoolscan.test",
                         to="bob@spoolscan.test"),
                 sender="alice@spoolscan.test", recipients=["bob@spoolscan.test"])
    postfix.wait_held(4)
    build_worker(replace(config, sources=(hold,)), store).run_once()
    assert postfix.held_ids() == []

    # 2. Maildir: clean, infected (hostile headers), clean until the update, too large.
    box = make_maildir(tmp / "vmail" / "carol" / "Maildir", folders=(".Lists",))
    deliver(box, message(subject="Minutes", to="carol@spoolscan.test"))
    deliver(box, hostile_eicar(HOSTILE_FROM))
    deliver(box, message(subject="Looked clean", body=f"text {MARKER.decode()}\n"),
            subdir="cur", flags="S")
    deliver(box, message(subject="Holiday pictures", attachment=b"\x89PNG" * MAX_SIZE),
            folder=".Lists")
    mailboxes = replace(config, sources=(SourceConfig(
        name="mailboxes", type="maildir", paths=(str(tmp / "vmail" / "*" / "Maildir"),)),))
    build_worker(mailboxes, store).run_once()

    # 3. A signature update finds what was delivered clean: a retroactive detection.
    clamd.publish_daily(27002, extra_ndb=(ndb_line("Spoolscan.Test.Retro", MARKER),))
    worker = build_worker(mailboxes, store)
    worker.start(watch=False)
    try:
        summary = check_signatures(worker, timedelta(days=7))
    finally:
        worker.stop()
    assert summary is not None and summary.retroactive == 1

    # 4. clamd does not answer for another mailbox: errors, kept for a retry.
    down = make_maildir(tmp / "vmail-down" / "dave" / "Maildir")
    deliver(down, message(subject="While clamd was down"))
    build_worker(replace(config, clamd=replace(config.clamd, socket=str(tmp / "no.sock")),
                         sources=(SourceConfig(name="mailboxes-down", type="maildir",
                                               paths=(str(down),)),)), store).run_once()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           postfix_factory) -> Iterator[Filled]:  # type: ignore[no-untyped-def]
    dialect = request.param
    tmp = tmp_path_factory.mktemp(f"reports-{dialect}")
    with contextlib.ExitStack() as stack:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp / 'db' / 'spoolscan.db'}"
            engine = create_engine_for(url)
            upgrade(engine)
            engine.dispose()
        else:
            url = stack.enter_context(new_postgres_database("spoolscan_reports"))
        clamd = ClamdInstance(tmp / "clamd")
        clamd.write_database()
        clamd.start()
        stack.callback(clamd.stop)
        clamd.publish_daily(27001)
        postfix = postfix_factory(f"postfix-reports-{dialect}")
        # Outbound mail must be accepted to be held (and never leaves: discarded).
        postfix.postconf(default_transport="discard:no outbound mail in tests")
        config = Config(
            database=DatabaseConfig(url=url),
            clamd=ClamdConfig(socket=str(clamd.socket_path), timeout=10, concurrency=4,
                              database_directory=str(clamd.db_dir)),
            quarantine=QuarantineConfig(directory=str(tmp / "quarantine")),
            policy=PolicyConfig(local_domains=("spoolscan.test",), max_size=MAX_SIZE,
                                retry_delay=3600))
        started = utcnow()
        store = Store.open(url)
        stack.callback(store.close)
        _fill(config, store, postfix, clamd, tmp)
        since = (started - timedelta(minutes=5)).replace(microsecond=0).isoformat()
        until = (utcnow() + timedelta(hours=1)).replace(microsecond=0).isoformat()
        yield Filled(dialect, url, config, write_config(tmp / "spoolscan.toml", config), store,
                     ["--since", since, "--until", until],
                     time_range(since, until, utcnow()), tmp)


def report(capsys, filled: Filled, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    code = main(["--config", str(filled.config_file), "report", *args, *filled.range_args])
    out = capsys.readouterr()
    assert out.err == "" or code != 0 or "--output" in args, out.err
    return code, out.out


def as_json(capsys, filled: Filled, name: str) -> list[dict]:  # type: ignore[no-untyped-def]
    code, out = report(capsys, filled, name, "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert isinstance(rows, list)
    return rows


# --- every report, every format -------------------------------------------------------


def _cell(value: object) -> str:
    """A value as sqlite3 -csv and psql --csv print it."""
    return "" if value is None else str(value)


def paste(filled: Filled, sql: str) -> list[list[str]]:
    """Run ``sql`` as an admin would: pasted into sqlite3 or psql; the rows as CSV."""
    if filled.dialect == "sqlite":
        proc = subprocess.run(["sqlite3", "-bail", "-csv", "-header",
                               filled.url.removeprefix("sqlite:///")],
                              input=sql, capture_output=True, text=True, timeout=60)
    else:
        # A session in another zone: the views and the range literals must not care.
        proc = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "--csv", "-h",
                               "127.0.0.1", "-U", "postgres", filled.url.rsplit("/", 1)[1]],
                              input=sql, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PGTZ": "Pacific/Chatham"})
    assert proc.returncode == 0, proc.stderr
    return list(csv.reader(io.StringIO(proc.stdout)))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.tables = 0
        self.svgs = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:  # type: ignore[type-arg]
        self.tags.append(tag)
        self.tables += tag == "table"
        self.svgs += tag == "svg"


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_every_report_in_every_format(capsys, filled, name):
    rows = as_json(capsys, filled, name)
    columns = list(rows[0]) if rows else None

    # JSON lines: the same objects, one per line.
    _, out = report(capsys, filled, name, "--format", "json", "--jsonl")
    assert [json.loads(line) for line in out.splitlines()] == rows

    # CSV reads back to the same rows (formula-like texts get their apostrophe).
    _, out = report(capsys, filled, name, "--format", "csv")
    back = list(csv.reader(io.StringIO(out)))
    assert back[0] == (columns or back[0])
    assert back[1:] == [[_csv_cell(v) if isinstance(v, str) else _cell(v)
                         for v in row.values()] for row in rows]

    # The table: the title, the range, every row (wide: not on a terminal).
    code, out = report(capsys, filled, name)
    assert code == 0 and REPORTS[name].title in out
    assert f"({len(rows)} row{'s' if len(rows) != 1 else ''})" in out
    assert "\x1b" not in out and "\x07" not in out

    # HTML: one page with the table.
    _, out = report(capsys, filled, name, "--format", "html")
    page = _Page()
    page.feed(out)
    assert page.tables == (1 if rows else 0) and page.svgs == 3
    assert "<script>document" not in out

    # The SQL, pasted into sqlite3 / psql, gives exactly the same rows.
    _, sql = report(capsys, filled, name, "--format", "sql")
    pasted = paste(filled, sql)
    if rows:
        assert pasted[0] == columns
        assert pasted[1:] == [[_cell(v) for v in row.values()] for row in rows]
    else:
        assert pasted[1:] == []

    # Every timestamp is ISO 8601 in UTC with its zone.
    for row in rows:
        for key, value in row.items():
            if isinstance(value, str) and re.match(r"\d{4}-\d\d-\d\d[T ]\d", value):
                assert ISO.fullmatch(value), (key, value)


def test_old_report_names_still_work(capsys, filled):
    assert as_json(capsys, filled, "signatures") == as_json(capsys, filled, "threats")
    assert as_json(capsys, filled, "outbound") == as_json(capsys, filled, "senders")


# --- what each report says about that mail --------------------------------------------


def test_summary_counts_every_message_by_day_and_source(capsys, filled):
    rows = as_json(capsys, filled, "summary")
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    by_source = {r["source"]: r for r in rows if r["day"] == day}
    hold, mail = by_source["postfix"], by_source["mailboxes"]
    assert (hold["messages"], hold["clean"], hold["infected"]) == (4, 2, 2)
    assert (hold["quarantined"], hold["released"]) == (2, 2)
    assert (mail["messages"], mail["clean"], mail["infected"], mail["unchecked"]) == (4, 1, 2, 1)
    assert mail["quarantined"] == 2
    assert by_source["mailboxes-down"]["error"] == 1
    assert hold["bytes"] > 4 * 300 and mail["bytes"] > MAX_SIZE


def test_threats_count_messages_recipients_and_senders(capsys, filled):
    threats = {r["signature"]: r for r in as_json(capsys, filled, "threats")}
    eicar = threats[EICAR_SIG]
    # hold: the hostile one (2 recipients) and the outbound one; Maildir: the hostile one.
    assert (eicar["messages"], eicar["hits"], eicar["recipients"]) == (3, 3, 4)
    # attacker@evil.example, alice@spoolscan.test, the From of the delivered one
    assert eicar["senders"] == 3
    assert threats[RETRO_SIG]["messages"] == 1
    assert eicar["first_seen"] <= eicar["last_seen"]


def test_who_sends_and_receives_infected_mail_outbound_first(capsys, filled):
    senders = as_json(capsys, filled, "senders")
    assert (senders[0]["sender"], senders[0]["direction"]) == ("alice@spoolscan.test",
                                                               "outbound")
    assert {s["domain"] for s in senders} >= {"spoolscan.test", "evil.example"}
    recipients = as_json(capsys, filled, "recipients")
    assert (recipients[0]["recipient"], recipients[0]["direction"]) == \
        ("partner@example.com", "outbound")
    names = {r["recipient"] for r in recipients}
    assert {"rcpt@spoolscan.test", "alice@spoolscan.test"} <= names
    assert str(filled.tmp / "vmail" / "carol" / "Maildir") in names  # the mailbox
    domains = as_json(capsys, filled, "domains")
    assert domains[0]["direction"] == "outbound"
    assert {(d["role"], d["domain"]) for d in domains} >= {
        ("sender", "spoolscan.test"), ("recipient", "example.com"),
        ("sender", "evil.example"), ("recipient", "spoolscan.test")}


def test_retroactive_says_when_it_came_how_long_it_sat_and_where_it_went(capsys, filled):
    (row,) = as_json(capsys, filled, "retroactive")
    assert row["signature"] == RETRO_SIG and "/27002/" in row["fingerprint"]
    assert row["delivered_at"] <= row["detected_at"] and row["sat_seconds"] >= 0
    assert row["subject"] == "Looked clean" and row["location"].endswith(":2,S")
    assert (row["action"], row["outcome"]) == ("quarantine", "ok")
    assert row["moved_to"].startswith(str(filled.tmp / "quarantine"))


def test_stuck_lists_mail_kept_with_its_attempts_and_last_error(capsys, filled):
    rows = {r["subject"]: r for r in as_json(capsys, filled, "stuck")}
    big, down = rows["Holiday pictures"], rows["While clamd was down"]
    assert (big["verdict"], big["state"]) == ("unchecked", "retry") and big["attempts"] >= 1
    assert (down["verdict"], down["state"], down["attempts"]) == ("error", "retry", 1)
    assert down["last_error"] and big["last_error"] and ISO.fullmatch(down["next_attempt"])


def test_scanner_percentiles_errors_and_fingerprints(capsys, filled):
    (day,) = as_json(capsys, filled, "scanner")
    assert day["errors"] == 1 and 0 < day["error_pct"] < 100
    assert 0 <= day["p50_ms"] <= day["p90_ms"] <= day["p99_ms"] <= day["max_ms"]
    assert day["fingerprints"] == 2 and day["new_fingerprints"] == 2
    assert "/27002/" in day["newest_fingerprint"] and ISO.fullmatch(day["newest_first_seen"])


DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_documented_queries_run_on_both_databases(filled):
    for doc in ("sql.md", "schema.md"):
        blocks = re.findall(r"```sql\n(.*?)```", (DOCS / doc).read_text(), re.S)
        assert blocks
        for block in blocks:
            for statement in (s.strip() for s in block.split(";")):
                code = "\n".join(line for line in statement.splitlines()
                                 if not line.startswith("--"))
                if code.strip():
                    paste(filled, code + ";\n")  # fails on any error


def test_every_view_column_is_documented(filled):
    text_ = (DOCS / "sql.md").read_text()
    sections = re.split(r"^## (.*)$", text_, flags=re.M)
    documented = {}
    for heading, body in zip(sections[1::2], sections[2::2], strict=True):
        view = re.match(r"`(v_\w+)`", heading)
        if view is None:
            continue
        name = view.group(1)
        cells = re.findall(r"^\| (.+?) \|", body, re.M)
        documented[name] = {c for cell in cells for c in re.findall(r"`(\w+)`", cell)}
    with filled.store.engine.connect() as conn:
        for view, columns in documented.items():
            actual = set(conn.execute(text(f"SELECT * FROM {view} WHERE 1 = 0")).keys())
            assert actual == columns, (view, actual ^ columns)
    assert set(documented) == {"v_messages", "v_scans", "v_recipients", "v_actions",
                               "v_fingerprints", "v_releases", "v_notices"}


def test_hold_mail_keeps_its_smtp_client_and_helo(filled):
    with filled.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT client_address, helo, subject, header_from "
                                 "FROM v_messages WHERE kind = 'postfix-hold'")).all()
    assert {(r.client_address, r.helo) for r in rows} == {("127.0.0.1", "client.example.org")}
    assert {r.subject for r in rows} >= {"Weekly news", HOSTILE_SUBJECT_STORED}


# --- hostile headers: stored losslessly, shown escaped --------------------------------


def test_hostile_subject_and_from_are_stored_and_shown_escaped(capsys, filled):
    infected = [r for r in as_json(capsys, filled, "infected")
                if r["subject"] == HOSTILE_SUBJECT_STORED]
    assert len(infected) == 2  # from the hold queue and from the Maildir
    assert {r["sender"] for r in infected} == {"attacker@evil.example", HOSTILE_FROM_STORED}

    _, table = report(capsys, filled, "infected")
    assert HOSTILE_SUBJECT_SHOWN in table and "\x1b" not in table

    _, page = report(capsys, filled, "infected", "--format", "html")
    page = page.replace("<wbr>", "")
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<img" not in page and "<script>document" not in page

    code = main(["--config", str(filled.config_file), "quarantine", "list"])
    listed = capsys.readouterr().out
    assert code == 0 and HOSTILE_SUBJECT_SHOWN[:40] in listed and "\x1b" not in listed
    quarantined = [json.loads(line) for line in _quarantine_json(capsys, filled)]
    hostile = [q for q in quarantined if q["subject"] == HOSTILE_SUBJECT_STORED]
    assert len(hostile) == 2 and all(q["message_id"] for q in hostile)
    main(["--config", str(filled.config_file), "quarantine", "show", str(hostile[0]["id"])])
    shown = capsys.readouterr().out
    assert f"subject          {HOSTILE_SUBJECT_SHOWN}" in shown and "\x1b" not in shown


def _quarantine_json(capsys, filled: Filled) -> list[str]:  # type: ignore[no-untyped-def]
    main(["--config", str(filled.config_file), "quarantine", "list", "--json"])
    return capsys.readouterr().out.splitlines()


# --- the HTML page in a browser -------------------------------------------------------


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: run scripts/install-deps"
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=120)


def test_the_html_page_in_headless_chromium(capsys, filled):
    target = filled.tmp / "report.html"
    code, _ = report(capsys, filled, "all", "--format", "html", "--output", str(target))
    assert code == 0
    page = target.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page

    # (<wbr> marks where a long value may wrap.)
    dom = chromium("--dump-dom", target.as_uri(), tmp=filled.tmp).stdout.replace("<wbr>", "")
    # The page loaded, its own script ran (the policy allows it: sortable tables),
    # nothing from mail did.
    assert '<html lang="en" data-tables="sortable">' in dom
    title = re.search(r"<title>(.*?)</title>", dom)
    assert title and title.group(1).startswith("spoolscan report")
    assert "pwned" not in title.group(1)
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    assert "<img" not in dom
    for name in REPORTS:
        assert f'<section id="{name}">' in dom
    svgs = re.findall(r'<svg class="chart".*?</svg>', dom, re.S)
    assert len(svgs) == 3 and all(svg.count('class="bar"') >= 1 for svg in svgs)
    assert f"{iso_z(filled.window.since)}" in dom

    shot = filled.tmp / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars",
             target.as_uri(), tmp=filled.tmp)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def iso_z(value: datetime) -> str:
    return value.isoformat()


SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "report.png"


@pytest.mark.parametrize("filled", ["sqlite"], indirect=True)  # one picture is enough
def test_the_readme_screenshot_renders(capsys, filled):
    """The README's picture: the HTML report of real scans (the store above and a week's
    worth of mail scanned now), their times then spread over seven days so that the
    daily charts have days to show, rendered by Chromium.  It becomes
    docs/img/report.png with SPOOLSCAN_UPDATE_SCREENSHOT=1."""
    url = f"sqlite:///{filled.tmp / 'shot' / 'spoolscan.db'}"
    (filled.tmp / "shot").mkdir(exist_ok=True)
    import sqlite3

    # The backup API: a copy of the file would miss what is still in the WAL.
    with contextlib.closing(sqlite3.connect(filled.url.removeprefix("sqlite:///"))) as src, \
            contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as dst:
        src.backup(dst)
    config = replace(filled.config, database=DatabaseConfig(url=url))
    store = Store.open(url)
    try:
        _scan_a_week_of_mail(config, store, filled.tmp / "shot")
        _spread_over_a_week(store)
    finally:
        store.close()
    config_file = write_config(filled.tmp / "shot" / "spoolscan.toml", config)
    target = filled.tmp / "shot" / "report.html"
    assert main(["--config", str(config_file), "report", "all", "--format", "html",
                 "--since", "8d", "--output", str(target)]) == 0
    picture = filled.tmp / "shot" / "report.png"
    chromium(f"--screenshot={picture}", "--window-size=1280,1600", "--hide-scrollbars",
             target.as_uri(), tmp=filled.tmp)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SPOOLSCAN_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, SCREENSHOT)


def _scan_a_week_of_mail(config: Config, store: Store, tmp: Path) -> None:
    from spoolscan.testing.clamd import TESTFILES_DIR

    samples = [TESTFILES_DIR / n for n in ("clam.zip", "clam.pdf", "clam.7z", "clam.exe")]
    senders = ["billing@invoices.example", "news@example.net", "hr@spoolscan.test",
               "noreply@parcel.example", "bob@spoolscan.test"]
    for user in ("erin", "frank", "grace"):
        box = make_maildir(tmp / "vmail" / user / "Maildir")
        for i in range(40):
            sender = senders[(i + len(user)) % len(senders)]
            if i % 9 == 4:
                deliver(box, message(subject=f"Invoice {i}", sender=sender,
                                     body="See attachment.\n", attachment=EICAR,
                                     filename="invoice.com"))
            elif i % 13 == 6:
                sample = samples[i % len(samples)]
                deliver(box, message(subject=f"Scan {i}", attachment=sample.read_bytes(),
                                     filename=sample.name, sender=sender))
            else:
                deliver(box, message(subject=f"Note {i} for {user}", sender=sender,
                                     body="x" * (40 * i)))
    build_worker(replace(config, sources=(SourceConfig(
        name="mailboxes", type="maildir", paths=(str(tmp / "vmail" / "*" / "Maildir"),)),)),
        store).run_once()


def _spread_over_a_week(store: Store) -> None:
    """Move each message, with its scans and actions, 0 to 6 days back."""
    import random

    from sqlalchemy import func, select

    from spoolscan.store.repo import actions, fingerprints, messages, scans

    rng = random.Random(2026)
    with store.engine.begin() as conn:
        for (message_id,) in conn.execute(text("SELECT id FROM messages")).all():
            back = timedelta(days=rng.choice([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6]))
            for table, columns in ((messages, ("first_seen_at", "updated_at", "arrived_at",
                                               "next_attempt_at")),
                                   (scans, ("scanned_at",)),
                                   (actions, ("requested_at", "completed_at"))):
                key = table.c.id if table is messages else table.c.message_id
                for row in conn.execute(table.select().where(key == message_id)).mappings():
                    values = {c: row[c] - back for c in columns if row[c] is not None}
                    conn.execute(table.update().where(table.c.id == row["id"]).values(**values))
        first = conn.execute(select(func.min(scans.c.scanned_at))).scalar()
        conn.execute(fingerprints.update().where(fingerprints.c.fingerprint.like("%/27001/%"))
                     .values(first_seen_at=first))


# --- the pieces, without a store ------------------------------------------------------


def test_time_range_accepts_durations_and_dates():
    now = datetime(2026, 12, 1, 22, 10, 30, 500_000, tzinfo=UTC)
    r = time_range("7d", None, now)
    assert (r.since.isoformat(), r.until.isoformat()) == ("2026-11-24T22:10:31+00:00",
                                                          "2026-12-01T22:10:31+00:00")
    r = time_range("2026-11-30", "2026-12-01T08:00:00+01:00", now)
    assert (r.since.isoformat(), r.until.isoformat()) == ("2026-11-30T00:00:00+00:00",
                                                          "2026-12-01T07:00:00+00:00")
    assert r.literal("since") == "'2026-11-30 00:00:00+00:00'"
    with pytest.raises(ValueError):
        time_range("2026-12-02", "2026-12-01", now)
    with pytest.raises(ValueError):
        time_range("yesterday", None, now)


def test_a_bad_range_is_a_usage_error(capsys, config_file):
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config_file), "report", "summary", "--since", "yesterday"])
    assert exited.value.code == 2
    assert main(["--config", str(config_file), "report", "summary", "--since", "1d",
                 "--until", "2d"]) == 2
    assert main(["--config", str(config_file), "report", "all", "--format", "csv"]) == 2
    assert main(["--config", str(config_file), "report", "summary", "--jsonl",
                 "--format", "csv"]) == 2


def test_the_range_literal_compares_like_the_bound_instant_on_sqlite(store):
    """SQLite compares the literal as text with its stored text: an instant equal to
    the bound is in the range for since, out for until; PostgreSQL compares times."""
    from spoolscan.store.repo import MessageInfo, ScanRecord

    store.record_scans([ScanRecord(MessageInfo("s", "file", "i", "/x"), "clean", None, None,
                                   "f", 1, "manual", False, state="done")])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE messages SET first_seen_at = :t"),
                     {"t": datetime(2026, 12, 1, 22, 10, 0, tzinfo=UTC)})
    at = datetime(2026, 12, 1, 22, 10, 0, tzinfo=UTC)
    summary = resolve("summary")
    assert len(run_report(store, summary, TimeRange(at, at + timedelta(seconds=1))).rows) == 1
    assert run_report(store, summary, TimeRange(at - timedelta(seconds=1), at)).rows == []
    sql = sql_text([summary], TimeRange(at, at + timedelta(seconds=1)))
    assert "'2026-12-01 22:10:00+00:00'" in sql and ":since" not in sql


def _result(columns: list[str], rows: list[tuple]) -> Result:
    return Result(REPORTS["retroactive"], columns, rows,
                  TimeRange(datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC)))


def test_the_table_wraps_long_paths_on_a_terminal_and_never_cuts_them():
    path = "/var/vmail/example.org/someone/Maildir/.Quarantine/cur/" + "1700000000.M1P2." * 6
    result = _result(["location", "sat_seconds"], [(path, 93784)])
    narrow = table_text(result, width=60)
    assert all(len(line) <= 60 for line in narrow.splitlines()[3:])
    cells = [line.split("  ")[0].strip() for line in narrow.splitlines()[5:-1]]
    assert "".join(cells) == path  # every piece of the path is there, in order
    assert "1d 2h 3m 4s" in narrow
    wide = table_text(result)
    assert path in wide


def test_csv_cells_that_look_like_formulas_are_neutralised():
    rows = [("=HYPERLINK(\"http://x\")", 1), ("+1", 2), ("-1", -3), ("@SUM(A1)", 4),
            ("\tx", 5), ("\rx", 6), ("plain", 7)]
    out = csv_text(_result(["location", "sat_seconds"], rows))
    cells = [r[0] for r in list(csv.reader(io.StringIO(out)))[1:]]
    assert all(c.startswith("'") for c in cells[:6]) and cells[6] == "plain"
    assert [r[1] for r in list(csv.reader(io.StringIO(out)))[1:]][2] == "-3"  # a number


def test_durations_read_like_durations():
    assert [duration(s) for s in (0, 59, 61, 3600, 93784)] == \
        ["0s", "59s", "1m 1s", "1h 0m 0s", "1d 2h 3m 4s"]


def test_sql_for_all_reports_runs_without_a_database(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[database]\nurl = "sqlite:////nonexistent/dir/x.db"\n')
    assert main(["--config", str(cfg), "report", "all", "--format", "sql"]) == 0
    out = capsys.readouterr().out
    assert out.count("-- spoolscan report ") == len(REPORTS) and out.count(";\n") >= len(REPORTS)
