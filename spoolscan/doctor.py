"""`spoolscan doctor`: check that everything spoolscan needs is in place.

Each check prints one line, ``ok`` or ``FAIL`` with what to do about it.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from spoolscan.config import Config, SourceConfig


def _check_clamd(config: Config) -> str:
    from spoolscan.clamd import ClamdClient, ClamdError

    client = ClamdClient(config.clamd)
    try:
        return f"clamd answers at {config.clamd.endpoint}: {client.fingerprint()}"
    except ClamdError as exc:
        raise RuntimeError(f"{exc} (is clamav-daemon running? check [clamd] socket/address "
                           "and that this user may use the socket)") from None


def _check_database(config: Config) -> str:
    from spoolscan.store.db import check_schema, create_engine_for

    engine = create_engine_for(config.database.url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    return f"database {engine.url.render_as_string(hide_password=True)} is up to date"


def _check_quarantine(config: Config) -> str:
    directory = Path(config.quarantine.directory)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # it will be created on first use
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RuntimeError(f"quarantine directory {directory} is not writable by uid "
                           f"{os.geteuid()}")
    return f"quarantine directory {directory} is writable"


def _check_source(src: SourceConfig) -> str:
    if src.type == "maildir":
        import glob

        roots = [p for pattern in src.paths for p in glob.glob(pattern)]
        return f"source {src.name}: {len(roots)} Maildir root(s) match {list(src.paths)}"
    try:
        out = subprocess.run(["postconf", "-c", src.config_directory, "-h", "queue_directory",
                              "header_checks"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise RuntimeError("postconf not found: is Postfix installed?") from None
    if out.returncode != 0:
        raise RuntimeError(f"postconf -c {src.config_directory} failed: {out.stderr.strip()}")
    queue_dir, header_checks = (out.stdout.splitlines() + ["", ""])[:2]
    hold = Path(queue_dir) / "hold"
    if not os.access(hold, os.R_OK | os.X_OK):
        raise RuntimeError(f"{hold} is not readable: run spoolscan as root or postfix")
    if not header_checks:
        raise RuntimeError(f"source {src.name}: Postfix puts nothing on hold (no "
                           "header_checks): run `spoolscan setup postfix`")
    return f"source {src.name}: hold queue {hold} readable, header_checks = {header_checks}"


def run_checks(config: Config) -> int:
    checks: list[tuple[str, Callable[[], str]]] = [
        ("config", lambda: f"configuration {config.path or '(built-in defaults)'} is valid"),
        ("clamd", lambda: _check_clamd(config)),
        ("database", lambda: _check_database(config)),
        ("quarantine", lambda: _check_quarantine(config)),
    ]
    for src in config.sources:
        checks.append((f"source {src.name}", functools.partial(_check_source, src)))
    failed = 0
    for name, check in checks:
        try:
            print(f"ok    {check()}")
        except Exception as exc:
            failed += 1
            print(f"FAIL  {name}: {exc}")
    return 1 if failed else 0
