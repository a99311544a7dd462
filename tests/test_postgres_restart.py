"""A real PostgreSQL restart while the worker runs: held mail waits, nothing is lost.

The test runs its own PostgreSQL cluster (initdb in a temp dir, a free loopback port), so
stopping it does not disturb the server the rest of the suite uses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import running
from mail import message
from sqlalchemy import create_engine, text

from spoolscan.config import (
    Config,
    DatabaseConfig,
    PolicyConfig,
    QuarantineConfig,
    SourceConfig,
)
from spoolscan.runner import build_worker
from spoolscan.store.db import create_engine_for, upgrade
from spoolscan.store.repo import Store
from spoolscan.testing.postgres import PrivatePostgres

RCPT = "rcpt@spoolscan.test"


@pytest.fixture
def private_postgres(tmp_path: Path):
    pg = PrivatePostgres(Path(f"/tmp/spoolscan-pg-{os.getpid()}-{tmp_path.name}"))
    pg.init()
    pg.start()
    admin = create_engine(pg.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE DATABASE spoolscan"))
    admin.dispose()
    engine = create_engine_for(pg.url)
    upgrade(engine)
    engine.dispose()
    yield pg
    pg.destroy()


def test_postgres_restart_keeps_mail_held_then_it_flows(clamd_config, postfix,
                                                        private_postgres, caplog, tmp_path):
    pg = private_postgres
    src = SourceConfig(name="postfix", type="postfix-hold",
                       config_directory=str(postfix.config_dir), sweep_interval=0.5)
    cfg = Config(database=DatabaseConfig(url=pg.url), clamd=clamd_config, sources=(src,),
                 quarantine=QuarantineConfig(directory=str(tmp_path / "quarantine")),
                 policy=PolicyConfig(local_domains=("spoolscan.test",), retry_delay=0.2))
    store = Store.open(pg.url)
    worker = build_worker(cfg, store)
    with running(worker):
        postfix.send(message(subject="before the restart"), recipients=[RCPT])
        postfix.wait_delivered("rcpt", 1)

        pg.stop()
        qid = postfix.send(message(subject="while the database is down"), recipients=[RCPT])
        time.sleep(3)  # several attempts, each failing to commit its verdict
        assert postfix.held_ids() == [qid]  # never released without a recorded verdict
        assert len(postfix.delivered("rcpt")) == 1

        pg.start()
        postfix.wait_delivered("rcpt", 2, timeout=60)
        assert postfix.held_ids() == []
    assert "database unavailable" in caplog.text
    with store.engine.connect() as conn:
        released = conn.execute(text(
            "SELECT count(*) FROM v_scans WHERE action = 'release' "
            "AND action_outcome = 'ok'")).scalar()
    store.close()
    assert released == 2
