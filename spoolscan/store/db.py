"""Database connections and schema migrations.

SQLite (the default) is opened in WAL mode so that readers (reports, cache look-ups from
scanner threads) do not block the writer; PostgreSQL is reached through psycopg 3
(``postgresql+psycopg://``).  The schema is created and changed only by Alembic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

import spoolscan
from spoolscan.store import StoreError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

# The newest migration in migrations/versions.  Checked against Alembic by the tests; kept
# here so that starting spoolscan does not have to load Alembic to check the schema.
SCHEMA_HEAD = "0005"


def redact_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: for every message and log."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: hide whatever sits between "user:" and "@"
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _normalise_url(url: str) -> str:
    # "postgresql://" would pick psycopg2 on SQLAlchemy 2.0; we ship psycopg 3.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def create_engine_for(url: str) -> Engine:
    """An Engine for ``url``; creates the directory of a SQLite file if needed."""
    url = _normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # cached_statements: the batches are multi-row statements whose text changes
        # with the number of rows, so sqlite3's cache of 128 prepared statements per
        # connection kept up to 128 large programs each (bench/hold_queue --memory: the
        # worker grew by 30 MB over 20,000 messages because of it).  Preparing a batch's
        # statement again costs far less than the batch.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False,
                                                  "cached_statements": 8})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed verdict or intent is on disk before the action it allows
            # happens (NORMAL in WAL mode may lose the last commits on power loss).
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, or the source tree."""
    package_dir = Path(spoolscan.__file__).resolve().parent
    for candidate in (package_dir / "migrations", package_dir.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError("cannot find spoolscan's migrations (looked in "
                     f"{package_dir / 'migrations'} and {package_dir.parent / 'migrations'})")


def _alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", _normalise_url(url).replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def foreign_keys_off(conn: Connection) -> Iterator[None]:
    """On SQLite, foreign keys off for the block (PostgreSQL: nothing to do).

    Alembic's batch mode changes a SQLite table by copying it and dropping the old one;
    with foreign keys on, dropping ``messages`` would delete every scan and action with
    it (ON DELETE CASCADE).  The pragma only works outside a transaction.
    """
    if conn.dialect.name != "sqlite":
        yield
        return
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    conn.commit()
    try:
        yield
    finally:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.commit()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (Alembic upgrade)."""
    from alembic import command

    cfg = _alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as conn, foreign_keys_off(conn), conn.begin():
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def upgrade_apart(url: str) -> bool:
    """``upgrade`` to head in a short-lived Python process of its own; False if that
    could not be done (the caller then migrates in its own process, which also reports
    a migration's real error).

    Alembic, Mako and Pygments, which a migration loads, take ~15 MB that a long-running
    worker would otherwise carry for its whole life (``bench/hold_queue --memory`` on a
    new store).  The child runs isolated (``-I``: neither the current directory nor
    ``PYTHON*`` variables decide what it imports) with this process's own absolute
    ``sys.path``: it imports exactly what this process would.  Only for SQLite URLs,
    which carry no password (the URL is on its command line)."""
    paths = [p for p in sys.path if os.path.isabs(p)]
    code = ("import sys\n"
            "sys.path[:] = sys.argv[2:]\n"
            "from spoolscan.store.db import create_engine_for, upgrade\n"
            "engine = create_engine_for(sys.argv[1])\n"
            "upgrade(engine)\n"
            "engine.dispose()\n")
    try:
        done = subprocess.run([sys.executable, "-I", "-c", code, url, *paths],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        # E.g. an interpreter the unprivileged worker may not run (a venv under /root).
        log.debug("cannot migrate in a process of its own (%s): migrating here", exc)
        return False
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        log.debug("migration in a process of its own failed (%s): migrating here",
                  lines[-1] if lines else f"exit status {done.returncode}")
        return False
    return True


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: no schema yet)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def schema_status(engine: Engine) -> tuple[str | None, str]:
    """(current revision in the database, head revision of the code)."""
    return current_revision(engine), SCHEMA_HEAD


def alembic_head() -> str:
    """The head revision according to Alembic's scripts (slow: loads Alembic)."""
    from alembic.script import ScriptDirectory

    cfg = _alembic_config("sqlite://")
    return ScriptDirectory.from_config(cfg).get_current_head() or ""


def check_schema(engine: Engine) -> None:
    """Raise StoreError unless the database is migrated to the code's head revision."""
    try:
        current = current_revision(engine)
    except Exception as exc:  # connection errors of any driver
        raise StoreError(f"cannot open the database "
                         f"{engine.url.render_as_string(hide_password=True)}: {exc}") from exc
    if current != SCHEMA_HEAD:
        raise StoreError(
            f"the database is at schema revision {current or 'none'}, this spoolscan needs "
            f"{SCHEMA_HEAD}: run `spoolscan db upgrade`"
        )
