"""The fault matrix, short version: every row on SQLite and PostgreSQL with a small burst
and faults of a few seconds (``make faults`` runs the issue's durations and writes
docs/reliability.md).  See ``spoolscan.testing.faults``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import allow_traversal

from spoolscan.testing import faults
from spoolscan.testing.clamd import ClamdInstance
from spoolscan.testing.postfix import PostfixInstance

CASES = [(r.name, db) for r in faults.ROWS for db in r.databases]


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
    if result.skipped:
        pytest.skip(result.skipped)
    c = result.counts
    assert c is not None
    assert (c.lost, c.infected_delivered, c.duplicated, c.released_unscanned) == \
        (0, 0, 0, 0), (c, result.notes, c.problems[:10])
    assert c.delivered + c.quarantined + c.held >= c.sent, c
