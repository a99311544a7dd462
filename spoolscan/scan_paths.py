"""`spoolscan scan PATH...`: scan files, directories and Maildirs on demand.

Exit status, as clamdscan: 0 everything clean, 1 something infected (or unchecked: clamd
could not vouch for it), 2 an error occurred (some content could not be scanned).  An
error wins over a detection: the run did not give a complete answer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from spoolscan import maildir
from spoolscan.progress import ProgressBar
from spoolscan.scanner import CLEAN, ERROR, INFECTED, UNCHECKED
from spoolscan.scanning import Job, Outcome, ScanService, open_file, run_jobs
from spoolscan.store.repo import DONE, RETRY, MessageInfo, ScanRecord, Store

log = logging.getLogger(__name__)

CLI_SOURCE = "cli"
EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


def _job_for(path: Path, trigger: str) -> Job:
    msg = maildir.message_at(path)
    if msg is not None and maildir.is_maildir(msg.folder):
        info = MessageInfo(source=CLI_SOURCE, kind="maildir", identity=msg.identity,
                           location=str(path))
    else:
        info = MessageInfo(source=CLI_SOURCE, kind="file", identity=str(path),
                           location=str(path))
    return Job(info=info, open=lambda: open_file(path), trigger=trigger)


def iter_paths(paths: list[str]) -> Iterator[Path]:
    """Files to scan under ``paths``: files as given, directories recursively, Maildirs as
    mailboxes (new/ and cur/ of every folder, never tmp/).  Symlinks below a given path are
    not followed."""
    for raw in paths:
        path = Path(os.path.abspath(raw))
        try:
            st = os.stat(path)  # a path named on the command line may be a symlink
        except OSError as exc:
            log.error("%s: cannot access: %s", path, exc.strerror)
            yield path  # scanned as an error, so the exit status says so
            continue
        if stat.S_ISREG(st.st_mode):
            yield path
        elif stat.S_ISDIR(st.st_mode):
            yield from _walk(path)
        else:
            log.warning("%s: skipped (not a regular file or directory)", path)


def _walk(directory: Path) -> Iterator[Path]:
    if maildir.is_maildir(directory):
        for msg in maildir.iter_maildir(directory):
            yield msg.path
        return
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        log.error("%s: cannot list: %s", directory, exc.strerror)
        return
    for entry in entries:
        if entry.is_symlink():
            log.info("%s: skipped (symlink)", entry.path)
        elif entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            yield Path(entry.path)
        else:
            log.info("%s: skipped (not a regular file)", entry.path)


@dataclass
class Tally:
    scanned: int = 0
    cached: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {v: 0 for v in
                                                            (CLEAN, INFECTED, UNCHECKED, ERROR)})

    def add(self, outcome: Outcome) -> None:
        self.scanned += 1
        self.cached += outcome.cached
        self.counts[outcome.verdict.verdict] += 1

    @property
    def exit_code(self) -> int:
        if self.counts[ERROR]:
            return EXIT_ERROR
        if self.counts[INFECTED] or self.counts[UNCHECKED]:
            return EXIT_FOUND
        return EXIT_CLEAN


def _count(paths: list[str]) -> int:
    """How many files a scan of ``paths`` will look at (problems are reported by the
    scan itself, not twice)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return sum(1 for _ in iter_paths(paths))
    finally:
        logging.disable(previous)


class _NoTerminal(io.StringIO):
    """Where the progress bar goes when it must not be drawn (JSON output)."""

    def isatty(self) -> bool:
        return False


def format_line(outcome: Outcome) -> str:
    v = outcome.verdict
    suffix = " (cached)" if outcome.cached else ""
    if v.verdict == CLEAN:
        text = "OK"
    elif v.verdict == INFECTED:
        text = f"{v.signature} FOUND"
    elif v.verdict == UNCHECKED:
        text = f"UNCHECKED ({v.signature or v.detail})"
    else:
        text = f"ERROR ({v.detail})"
    return f"{outcome.info.location}: {text}{suffix}"


def format_json(outcome: Outcome) -> str:
    v = outcome.verdict
    return json.dumps({
        "path": outcome.info.location,
        "verdict": v.verdict,
        "signature": v.signature if v.verdict in (INFECTED, UNCHECKED) else None,
        "sha256": outcome.info.content_hash,
        "size": outcome.info.size,
        "duration_ms": v.duration_ms,
        "cached": outcome.cached,
        "detail": v.detail,
    })


def scan_paths(service: ScanService, paths: list[str], *, concurrency: int,
               as_json: bool = False, out: TextIO | None = None,
               err: TextIO | None = None, trigger: str = "manual") -> int:
    """Scan ``paths``, print a line (or JSON object) per message and a summary.

    Returns the exit status.  Verdicts are stored in batches when the service has a store.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    store: Store | None = service.store
    tally = Tally()
    # On a terminal, count first so that the bar can say how far along it is.
    total = _count(paths) if err.isatty() and not as_json else None
    progress = ProgressBar(err if not as_json else _NoTerminal(), total, "scan")
    pending: list[ScanRecord] = []
    last_flush = time.monotonic()
    started = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if store is not None and pending:
            store.record_scans(pending)
        pending.clear()
        last_flush = time.monotonic()

    jobs = (_job_for(p, trigger) for p in iter_paths(paths))
    for outcome in run_jobs(service, jobs, concurrency):
        tally.add(outcome)
        if out.isatty():  # the bar shares the terminal with the result lines
            progress.clear()
        print(format_json(outcome) if as_json else format_line(outcome), file=out, flush=True)
        progress.update(tally.scanned, f"{tally.counts[INFECTED]} infected, "
                                       f"{tally.cached} cached")
        if store is not None and outcome.unavailable is None:
            v = outcome.verdict
            pending.append(ScanRecord(
                message=replace(outcome.info), verdict=v.verdict, signature=v.signature,
                detail=v.detail, fingerprint=v.fingerprint, duration_ms=v.duration_ms,
                trigger=trigger, cached=outcome.cached,
                state=DONE if v.is_final else RETRY,
            ))
            if len(pending) >= 500 or time.monotonic() - last_flush > 1.0:
                flush()
    flush()
    progress.clear()
    elapsed = time.monotonic() - started
    summary = (
        f"scanned {tally.scanned} messages ({tally.cached} from cache) in {elapsed:.2f}s: "
        f"{tally.counts[CLEAN]} clean, {tally.counts[INFECTED]} infected, "
        f"{tally.counts[UNCHECKED]} unchecked, {tally.counts[ERROR]} errors"
    )
    if as_json:
        print(summary, file=err)
    else:
        print(f"----------- SCAN SUMMARY -----------\n{summary}", file=out)
    return tally.exit_code
