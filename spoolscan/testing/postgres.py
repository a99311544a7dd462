"""PostgreSQL for tests and the fault matrix: a fresh database on the machine's server
(``new_database``), or a private cluster (initdb in a directory, a free loopback port)
that they stop and start without disturbing the server the rest uses."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ADMIN_URL", "PrivatePostgres", "new_database"]

ADMIN_URL = os.environ.get("SPOOLSCAN_TEST_POSTGRES_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def new_database(prefix: str = "spoolscan_test", admin_url: str = ADMIN_URL
                 ) -> Iterator[str]:
    """A new database at the server of ``admin_url``, migrated to the current schema,
    dropped after the block; its URL."""
    from sqlalchemy import create_engine, text

    from spoolscan.store.db import create_engine_for, upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        engine = create_engine_for(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found: install postgresql (make deps)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivatePostgres:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self.user = pwd.getpwnam("postgres")

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, timeout=60)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        for parent in self.root.parents:  # let postgres reach its directory
            if parent.stat().st_uid == os.getuid() and not parent.stat().st_mode & 0o001:
                parent.chmod(parent.stat().st_mode | 0o001)
        self._as_postgres(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U",
                          "postgres", "--no-sync")

    def start(self) -> None:
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-w", "-l",
                          str(self.root / "pg.log"), "-o",
                          f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                          "-c fsync=off", "start")

    def stop(self) -> None:
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/spoolscan"

    def create_database(self, name: str = "spoolscan") -> str:
        """Create ``name``, migrate it; its URL."""
        from sqlalchemy import create_engine, text

        from spoolscan.store.db import create_engine_for, upgrade

        admin = create_engine(self.url.rsplit("/", 1)[0] + "/postgres",
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = self.url.rsplit("/", 1)[0] + "/" + name
        engine = create_engine_for(url)
        upgrade(engine)
        engine.dispose()
        return url

    def destroy(self) -> None:
        """Stop at once (if running) and remove the cluster."""
        subprocess.run(["runuser", "-u", "postgres", "--", _bin("pg_ctl"), "-D",
                        str(self.data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
