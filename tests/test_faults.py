"""The fault matrix, short version: every row on SQLite and PostgreSQL with a small burst
and faults of a few seconds (``make faults`` runs the issue's durations and writes
docs/reliability.md).  See ``spoolscan.testing.faults``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import allow_traversal

from spoolscan.testing import faults
from spoolscan.testing.clamd import ClamdInstance
from spoolscan.testing.postfix import PostfixInstance

# Rows whose fault is the database's run on both; the others (clamd, inotify, the
# quarantine store, Postfix, the Maildir's filesystem) on one, SQLite and PostgreSQL in
# turn, to keep what the matrix adds to `make test` near two minutes.  `make faults` runs
# every row on both; so does SPOOLSCAN_FAULTS_ALL_DATABASES=1.
BOTH = {"sigkill", "postgres-restart", "database-locked", "sqlite-disk-full", "rescan-sigkill"}
ALL = os.environ.get("SPOOLSCAN_FAULTS_ALL_DATABASES") == "1"
CASES = [(r.name, db) for i, r in enumerate(faults.ROWS) for db in r.databases
         if ALL or r.name in BOTH or db == ("sqlite", "postgresql")[i % 2]]


@pytest.fixture(scope="module")
def matrix_clamd(tmp_path_factory: pytest.TempPathFactory):
    """A clamd of the matrix's own: rows stop it, replace its signatures."""
    root = tmp_path_factory.mktemp("faults-clamd")
    allow_traversal(root)  # the unprivileged worker connects to its socket
    instance = ClamdInstance(root)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def matrix_postfix():
    """One Postfix for the rows (a mailbox and a stretch of the log each): starting one
    per row would double the time the matrix adds to the suite.  A short directory:
    Postfix's sockets live under it (108 bytes at most)."""
    root = Path(tempfile.mkdtemp(prefix="ssf-pf-", dir="/tmp"))
    instance = PostfixInstance(root / "pf", mailboxes=())
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(("name", "db"), CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_fault_row_loses_nothing(name: str, db: str, matrix_clamd: ClamdInstance,
                                 matrix_postfix: PostfixInstance) -> None:
    work = Path(tempfile.mkdtemp(prefix="ssf-", dir="/tmp"))
    try:
        result = faults.run_row(faults.row(name), db, work, matrix_clamd, faults.SHORT,
                                postfix=matrix_postfix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # make test installs and sets up what every row needs: a row that cannot run is a
    # broken set-up, not something to pass over.
    assert not result.skipped, f"{name}/{db} could not run: {result.skipped}"
    c = result.counts
    assert c is not None
    assert (c.lost, c.infected_delivered, c.duplicated, c.released_unscanned) == \
        (0, 0, 0, 0), (c, result.notes, c.problems[:10])
    assert c.delivered + c.quarantined + c.held >= c.sent, c


def test_the_ledger_counts_what_must_never_happen(tmp_path: Path) -> None:
    """The ledger itself: a message delivered twice, one released without a clean verdict,
    an infected one delivered, one nowhere, one held with a reason in the store."""
    from types import SimpleNamespace

    from spoolscan.store.db import create_engine_for, upgrade
    from spoolscan.store.repo import DONE, RETRY, MessageInfo, ScanRecord, Store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_engine_for(url)
    upgrade(engine)
    engine.dispose()
    ledger = faults.Ledger("0badcafe")
    kinds = ["clean", "clean", "infected", "clean", "clean", "clean", "infected"]
    entries = [ledger.new(kind) for kind in kinds]
    for i, e in enumerate(entries):
        e.queue_id = f"QID{i}"
    store = Store.open(url)

    def scan(i: int, verdict: str, state: str, detail: str | None = None) -> None:
        info = MessageInfo(source="postfix", kind="postfix-hold", identity=f"h/QID{i}",
                           location=f"QID{i}", queue_id=f"QID{i}")
        store.record_scans([ScanRecord(message=info, verdict=verdict, signature=None,
                                       detail=detail, fingerprint="f", duration_ms=1,
                                       trigger="arrival", cached=False, state=state)])

    scan(0, "clean", DONE)
    scan(4, "error", RETRY, "clamd down")
    scan(5, "clean", DONE)
    store.close()
    postfix = SimpleNamespace(log_path=tmp_path / "mail.log", queue_dir=tmp_path / "spool",
                              vmail_dir=tmp_path / "vmail")
    sent = "status=sent (delivered to maildir)"
    postfix.log_path.write_text("".join(
        f"Dec  2 01:00:00 mx postfix/virtual[1]: QID{i}: to=<r@spoolscan.test>, "
        f"relay=virtual, {sent}\n" for i in (0, 0, 1, 2, 5)))
    (postfix.queue_dir / "hold").mkdir(parents=True)
    (postfix.queue_dir / "hold" / "QID4").write_bytes(entries[4].marker.encode())
    quarantine = tmp_path / "quarantine" / "20261202" / "1-1"
    quarantine.mkdir(parents=True)
    (quarantine / "message.eml").write_bytes(entries[6].marker.encode())
    c = ledger.classify(postfix, tmp_path / "quarantine", url)  # type: ignore[arg-type]
    assert (c.sent, c.delivered, c.quarantined, c.held) == (7, 4, 1, 1)
    assert (c.lost, c.infected_delivered, c.duplicated, c.released_unscanned) == (1, 1, 1, 2)
    assert not c.ok
