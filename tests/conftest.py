"""Shared fixtures: a real clamd, real SQLite and PostgreSQL stores, configs.

Every database test runs twice, on SQLite and on PostgreSQL (``db_url`` is parametrized).
PostgreSQL is reached at $SPOOLSCAN_TEST_POSTGRES_URL (default: the local server, trust
auth); each test session works in a database of its own, dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text

from spoolscan.config import ClamdConfig, Config, DatabaseConfig, PolicyConfig, QuarantineConfig
from spoolscan.store.db import create_engine_for, upgrade
from spoolscan.store.repo import Store
from spoolscan.testing.clamd import ClamdInstance
from spoolscan.testing.postfix import PostfixInstance
from spoolscan.testing.postgres import ADMIN_URL, new_database

PG_ADMIN_URL = ADMIN_URL

def pytest_configure(config: pytest.Config) -> None:
    # spoolscan runs as root (the hold queue needs it) and so do its tests (privilege
    # separation, attacks as another uid, Postfix): fail at once rather than skip them.
    if os.geteuid() != 0:
        raise pytest.UsageError("the tests run as root, as spoolscan does: sudo make test")


# --- clamd -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdInstance]:
    """The session's clamd: EICAR + clam.exe signatures, StreamMaxLength 3M, MaxFileSize
    2M, AlertExceedsMax yes."""
    instance = ClamdInstance(tmp_path_factory.mktemp("clamd"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def updatable_clamd(tmp_path: Path) -> Iterator[ClamdInstance]:
    """A private clamd whose signatures the test can update (daily version 27001)."""
    instance = ClamdInstance(tmp_path / "clamd")
    instance.write_database()
    instance.start()
    instance.publish_daily(27001)
    yield instance
    instance.stop()


@pytest.fixture
def clamd_config(clamd: ClamdInstance) -> ClamdConfig:
    return ClamdConfig(socket=str(clamd.socket_path), timeout=10, concurrency=4,
                       database_directory=str(clamd.db_dir), config_file=str(clamd.conf_path))


# --- databases -------------------------------------------------------------------------


def new_postgres_database(prefix: str = "spoolscan_test") -> contextlib.AbstractContextManager[str]:
    """A new, migrated PostgreSQL database for the block (dropped after it); its URL."""
    return new_database(prefix, PG_ADMIN_URL)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session; its URL."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a new SQLite file, or the session's PostgreSQL
    database with its tables emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'spoolscan.db'}"
        engine = create_engine_for(url)
        upgrade(engine)
        engine.dispose()
        return url
    url = request.getfixturevalue("postgres_database")
    engine = create_engine_for(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE actions, scans, message_recipients, messages, "
                          "fingerprints, rescan_claims, host_rescans, scan_claims "
                          "RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


# --- configuration ---------------------------------------------------------------------


@pytest.fixture
def config(clamd_config: ClamdConfig, db_url: str, tmp_path: Path) -> Config:
    """A config pointing at the session clamd and the test database."""
    return Config(
        database=DatabaseConfig(url=db_url),
        clamd=clamd_config,
        quarantine=QuarantineConfig(directory=str(tmp_path / "quarantine")),
        policy=PolicyConfig(local_domains=("example.org",), max_size=8 * 1024 * 1024),
    )


WORKER_USER = "spoolscan"  # the unprivileged user `spoolscan` runs as (privilege separation)


def ready_for_the_worker(config: Config) -> None:
    """Let the unprivileged worker of a `spoolscan` command started as root reach what a
    test made for it: pytest's directories are 0700 (give them the search bit), and
    SQLite writes its journal beside the database (give the worker that directory)."""
    import pwd

    user = pwd.getpwnam(WORKER_USER)
    paths = [Path(config.quarantine.directory).parent]
    if config.clamd.socket:
        paths.append(Path(config.clamd.socket).parent)
    if config.database.url.startswith("sqlite:///"):
        db_dir = Path(config.database.url[len("sqlite:///"):]).parent
        paths.append(db_dir)
        if db_dir.is_dir() and db_dir.stat().st_uid == 0:
            os.chown(db_dir, user.pw_uid, user.pw_gid)
    for path in paths:
        allow_traversal(path)


def allow_traversal(path: Path) -> None:
    """Add the search bit for others to ``path`` and its ancestors that lack it."""
    for directory in (path, *path.parents):
        if directory.is_dir():
            st = directory.stat()
            if not st.st_mode & 0o001:
                directory.chmod(st.st_mode & 0o7777 | 0o001)


def write_config(path: Path, config: Config, extra: str = "") -> Path:
    """Write ``config`` as a TOML file (what an admin would write).  A `spoolscan` command
    started by a test as root runs its worker as the unprivileged user, as in production;
    the test's directories are made reachable for it."""
    c = config
    if os.geteuid() == 0:
        ready_for_the_worker(config)
        allow_traversal(path.parent)
    sock = f'socket = "{c.clamd.socket}"' if c.clamd.socket else f'address = "{c.clamd.address}"'
    path.write_text(f"""
[database]
url = "{c.database.url}"

[clamd]
{sock}
timeout = {c.clamd.timeout}
concurrency = {c.clamd.concurrency}
database_directory = "{c.clamd.database_directory}"
config_file = "{c.clamd.config_file}"

[quarantine]
directory = "{c.quarantine.directory}"

[policy]
local_domains = {list(c.policy.local_domains)!r}
max_size = "{c.policy.max_size}B"
max_attempts = {c.policy.max_attempts}
retry_delay = {c.policy.retry_delay}

[privileges]
user = "{WORKER_USER}"
{extra}
""".replace("'", '"'))
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def config_file(config: Config, tmp_path: Path) -> Path:
    return write_config(tmp_path / "spoolscan.toml", config)


def with_policy(config: Config, **changes: object) -> Config:
    return replace(config, policy=replace(config.policy, **changes))


def hold_source_toml(config_dir: Path | str, sweep_interval: str = "1s") -> str:
    """A ``[[source]]`` table for the hold queue of the Postfix in ``config_dir``."""
    return f"""
[[source]]
name = "postfix"
type = "postfix-hold"
config_directory = "{config_dir}"
sweep_interval = "{sweep_interval}"
"""


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


@contextlib.contextmanager
def running(worker) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Run ``worker.run_forever`` (watchers, sweeps) in a thread for the block."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


# --- the private Postfix -----------------------------------------------------------------


@pytest.fixture(scope="session")
def postfix_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``make(name, **options) -> PostfixInstance``: started now, stopped at session end."""
    instances: list[PostfixInstance] = []

    def make(name: str = "postfix", **options: object) -> PostfixInstance:
        instance = PostfixInstance(tmp_path_factory.mktemp(name), **options)  # type: ignore[arg-type]
        instances.append(instance)
        instance.start()
        return instance

    yield make
    errors = []
    for instance in reversed(instances):
        try:
            instance.stop()
        except Exception as exc:  # stop the others anyway
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def postfix_instance(postfix_factory) -> PostfixInstance:
    """A running private Postfix with short queue IDs and the test milter."""
    return postfix_factory("postfix-short", milter=True)


@pytest.fixture(scope="session")
def postfix_long_ids(postfix_factory) -> PostfixInstance:
    """A running private Postfix with ``enable_long_queue_ids = yes`` and no milter."""
    return postfix_factory("postfix-long", long_queue_ids=True)


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[PostfixInstance]:
    """A private Postfix of this test's own (short queue IDs, no milter): tests that run
    a worker on its hold queue must not see another test's mail."""
    instance = PostfixInstance(tmp_path / "postfix")
    instance.start()
    yield instance
    instance.stop()



def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """After the fuzz targets ran: examples and examples per second, per target."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    results = getattr(fuzz, "RESULTS", None)
    if not results:
        return
    terminalreporter.section("fuzzing")
    terminalreporter.write_line(f"{'target':34} {'examples':>9}  {'wall':>8}  "
                                f"{'examples/s (wall, with generation)':>36}")
    for name, (examples, _, first, last) in sorted(results.items()):
        wall = max(last - first, 1e-9)
        terminalreporter.write_line(f"{name:34} {int(examples):>9,}  {wall:>7.1f}s  "
                                    f"{examples / wall:>36,.0f}")
