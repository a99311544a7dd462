"""`spoolscan scan PATH...`: scan files, directories and Maildirs on demand.

Exit status, as clamdscan: 0 everything clean, 1 something infected (or unchecked: clamd
could not vouch for it), 2 an error occurred (some content could not be scanned).  An
error wins over a detection: the run did not give a complete answer.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from spoolscan.broker import OPEN_BATCH, Broker
from spoolscan.config import PolicyConfig, SourceConfig
from spoolscan.fsutil import OpenFile, UnsafeFile, close_files
from spoolscan.mailbox import Location
from spoolscan.model import (
    Action,
    ContentUnavailable,
    Decision,
    Job,
    MessageInfo,
    Opened,
    Outcome,
    Prior,
    ScanResult,
    State,
    Trigger,
    Verdict,
)
from spoolscan.policy import decide
from spoolscan.privsep import HelperError
from spoolscan.progress import ProgressBar
from spoolscan.scan import ScanService, run_jobs
from spoolscan.text import printable

if TYPE_CHECKING:  # the database layer is loaded only when verdicts are stored
    from spoolscan.store.repo import ScanRecord, Store

log = logging.getLogger(__name__)

CLI_SOURCE = "cli"
EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2
CLEAN, INFECTED, UNCHECKED, ERROR = (Verdict.CLEAN, Verdict.INFECTED, Verdict.UNCHECKED,
                                     Verdict.ERROR)


@dataclass(frozen=True)
class Target:
    """A file to scan: its path, and the message it is for a configured source."""

    path: str
    source: str = CLI_SOURCE
    identity: str | None = None
    problem: str | None = None  # could not be reached: reported as an error
    mailbox: str | None = None  # the Maildir root of a configured source's message


class Finder:
    """Files to scan under the paths given: files as given, directories recursively (an
    explicit stack: no depth limit), every regular file in them, a Maildir's included
    (nothing can hide next to a ``new/``).  Walked through the broker on the safe layer:
    symlinks a user could change are never followed, only regular files are opened.  A
    message in new/ or cur/ of a configured Maildir source keeps that source's identity,
    so that it is not recorded twice."""

    def __init__(self, sources: Sequence[SourceConfig] = (), broker: Broker | None = None
                 ) -> None:
        self.broker = broker or Broker()
        self.roots: dict[str, str] = {}  # mailbox root → source name
        for src in sources:
            if src.type == "maildir":
                for root in self.broker.mailbox_roots(src.paths)[0]:
                    self.roots.setdefault(root, src.name)

    def targets(self, paths: Sequence[str]) -> Iterator[Target]:
        for raw in paths:
            path = os.path.normpath(os.path.abspath(raw))
            try:
                kind = self.broker.path_kind(path)
            except (OSError, UnsafeFile) as exc:
                yield Target(path, problem=_why(exc))
                continue
            if kind is None:
                yield Target(path, problem="no such file or directory")
            elif kind == "file":
                yield self._target(path)
            elif kind == "dir":
                yield from self._walk(path)
            elif kind == "symlink":
                yield Target(path, problem="a symlink (name the file itself)")
            else:
                log.warning("%s: skipped (not a regular file or directory)", printable(path))

    def _target(self, path: str) -> Target:
        for root, source in self.roots.items():
            loc = Location.from_path(path, root)
            if loc is not None:
                return Target(path, source, loc.identity, mailbox=root)
        return Target(path)

    def _walk(self, top: str) -> Iterator[Target]:
        stack = [top]
        while stack:
            path = stack.pop()
            try:
                entries = sorted(self.broker.path_entries(path), reverse=True)
            except (OSError, UnsafeFile) as exc:
                log.error("%s: cannot list: %s", printable(path), _why(exc))
                continue
            for name, kind in entries:
                child = f"{path.rstrip('/')}/{name}"
                if kind == "dir":
                    stack.append(child)
                elif kind == "file":
                    yield self._target(child)
                else:
                    log.info("%s: skipped (%s)", printable(child),
                             "symlink" if kind == "symlink" else "not a regular file")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def open_target(target: Target, broker: Broker) -> contextlib.AbstractContextManager[Opened]:
    """Open a file found by the Finder, through the broker (regular files only)."""
    if target.problem is not None:
        raise ContentUnavailable(f"{target.path}: {target.problem}")
    opened: OpenFile | Exception
    try:
        opened = broker.path_open(target.path)
    except (OSError, UnsafeFile) as exc:
        opened = exc
    return _use_opened(target, opened)


@contextlib.contextmanager
def _use_opened(target: Target, opened: OpenFile | Exception) -> Iterator[Opened]:
    """The content of a file opened (``open_target``, or ahead of its scan by
    ``jobs_for``), or why it could not be."""
    if isinstance(opened, FileNotFoundError):
        raise ContentUnavailable(f"{target.path}: no longer exists", gone=True)
    if isinstance(opened, Exception):
        raise ContentUnavailable(f"{target.path}: cannot open: {_why(opened)}")
    with opened, open(opened.fd, "rb", buffering=0, closefd=False) as stream:
        yield Opened(stream=stream, fd=opened.fd, size=opened.st.st_size,  # type: ignore[arg-type]
                     shared=True)


def _info(target: Target) -> MessageInfo:
    if target.identity is not None:
        return MessageInfo(source=target.source, kind="maildir", identity=target.identity,
                           location=target.path, mailbox=target.mailbox)
    return MessageInfo(source=CLI_SOURCE, kind="file", identity=target.path,
                       location=target.path)


def job_for(target: Target, broker: Broker, trigger: Trigger = Trigger.MANUAL) -> Job:
    return Job(info=_info(target), open=lambda: open_target(target, broker),
               trigger=trigger)


def jobs_for(targets: Iterable[Target], broker: Broker, trigger: Trigger = Trigger.MANUAL,
             batch: int = OPEN_BATCH) -> Iterator[Job]:
    """A job per target; consecutive files of one directory are opened together, up to
    ``batch`` at a time (one request to the root helper instead of one per file, one walk
    to the directory).  Files opened but not handed out are closed when the iteration
    ends early."""
    pending: list[Target] = []
    opened: list[OpenFile | Exception] = []

    def flush() -> Iterator[Job]:
        nonlocal opened
        directory = os.path.dirname(pending[0].path)
        try:
            opened = list(broker.path_open_many(directory, [os.path.basename(t.path)
                                                            for t in pending]))
        except (OSError, UnsafeFile, HelperError) as exc:
            # The directory itself could not be reached: each file says so on its own.
            log.debug("%s: files opened one by one (%s)", printable(directory), _why(exc))
            opened = []
            for t in pending:
                yield job_for(t, broker, trigger)
            pending.clear()
            return
        while pending:
            t, f = pending.pop(0), opened.pop(0)
            yield Job(info=_info(t), open=lambda t=t, f=f: _use_opened(t, f),  # type: ignore[misc]
                      trigger=trigger)

    try:
        for target in targets:
            if pending and (len(pending) >= batch or target.problem is not None
                            or os.path.dirname(target.path)
                            != os.path.dirname(pending[0].path)):
                yield from flush()
            if target.problem is not None:
                yield job_for(target, broker, trigger)
            else:
                pending.append(target)
        if pending:
            yield from flush()
    finally:
        close_files(opened)


def plan_for(policy: PolicyConfig, now: datetime):  # type: ignore[no-untyped-def]
    """How a manual scan changes a stored message.  A message of a configured source is
    decided like the worker would (an infected one is then acted on by the worker's next
    sweep); a file of no source is simply done, or to be retried."""

    def plan(record: ScanRecord, prior: Prior) -> Decision:
        result_verdict = Verdict(record.verdict)
        if record.message.source == CLI_SOURCE:
            state = State.DONE if result_verdict.definite else State.RETRY
            return Decision(Action.LEAVE, state, "manual scan")
        result = ScanResult(result_verdict, record.signature, record.detail)
        return decide(result, held=False, prior=prior, policy=policy, now=now)

    return plan


@dataclass
class Tally:
    scanned: int = 0
    cached: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {v: 0 for v in
                                                            (CLEAN, INFECTED, UNCHECKED, ERROR)})

    def add(self, outcome: Outcome) -> None:
        self.scanned += 1
        self.cached += outcome.cached
        self.counts[outcome.result.verdict] += 1

    @property
    def exit_code(self) -> int:
        if self.counts[ERROR]:
            return EXIT_ERROR
        if self.counts[INFECTED] or self.counts[UNCHECKED]:
            return EXIT_FOUND
        return EXIT_CLEAN


class _NoTerminal(io.StringIO):
    """Where the progress bar goes when it must not be drawn (JSON output)."""

    def isatty(self) -> bool:
        return False


def format_line(outcome: Outcome) -> str:
    r = outcome.result
    suffix = " (cached)" if outcome.cached else ""
    if r.verdict == CLEAN:
        text = "OK"
    elif r.verdict == INFECTED:
        text = f"{r.signature} FOUND"
    elif r.verdict == UNCHECKED:
        text = f"UNCHECKED ({r.signature or r.detail})"
    else:
        text = f"ERROR ({r.detail})"
    return printable(f"{outcome.info.location}: {text}{suffix}")


def format_json(outcome: Outcome) -> str:
    r = outcome.result
    return json.dumps({
        "path": outcome.info.location,
        "verdict": r.verdict,
        "signature": r.signature if r.verdict in (INFECTED, UNCHECKED) else None,
        "sha256": outcome.info.content_hash,
        "size": outcome.info.size,
        "duration_ms": r.duration_ms,
        "cached": outcome.cached,
        "detail": r.detail,
    })


def scan_paths(service: ScanService, paths: list[str], *, concurrency: int,
               as_json: bool = False, out: TextIO | None = None,
               err: TextIO | None = None, trigger: Trigger = Trigger.MANUAL,
               sources: Sequence[SourceConfig] = (),
               policy: PolicyConfig | None = None, broker: Broker | None = None,
               infected_only: bool = False, summary: bool = True) -> int:
    """Scan ``paths``, print a line (or JSON object) per message and a summary.

    ``infected_only``: lines only for messages that are not clean (infected, unchecked,
    errors), as ``clamdscan --infected``; ``summary``: the closing summary.

    Returns the exit status.  Verdicts are stored in batches when the service has a store.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    store: Store | None = service.store
    broker = broker or Broker()
    finder = Finder(sources, broker)
    tally = Tally()
    # On a terminal, count first so that the bar can say how far along it is.
    total = (sum(1 for _ in finder.targets(paths)) if err.isatty() and not as_json
             else None)
    progress = ProgressBar(err if not as_json else _NoTerminal(), total, "scan")
    pending: list[ScanRecord] = []
    last_flush = time.monotonic()
    started = time.monotonic()
    plan = plan_for(policy or PolicyConfig(), datetime.now(UTC))

    def flush() -> None:
        nonlocal last_flush
        if store is not None and pending:
            store.record_scans(pending, plan)
        pending.clear()
        last_flush = time.monotonic()

    jobs = jobs_for(finder.targets(paths), broker, trigger)
    interactive = out.isatty()  # asked once: it is a system call
    flushed = time.monotonic()
    for outcome in run_jobs(service, jobs, concurrency):
        tally.add(outcome)
        if not (infected_only and outcome.unavailable is None
                and outcome.result.verdict == CLEAN):
            if interactive:  # the bar shares the terminal with the result lines
                progress.clear()
            out.write((format_json(outcome) if as_json else format_line(outcome)) + "\n")
            # A pipe or file gets the lines in writes of up to 0.2 s, not one per line.
            if interactive or time.monotonic() - flushed > 0.2:
                out.flush()
                flushed = time.monotonic()
        progress.update(tally.scanned, f"{tally.counts[INFECTED]} infected, "
                                       f"{tally.cached} cached")
        if store is not None and outcome.unavailable is None:
            r = outcome.result
            from spoolscan.store.repo import ScanRecord

            pending.append(ScanRecord(
                message=outcome.info, verdict=r.verdict, signature=r.signature,
                detail=r.detail, fingerprint=r.fingerprint, duration_ms=r.duration_ms,
                trigger=trigger, cached=outcome.cached))
            if len(pending) >= 500 or time.monotonic() - last_flush > 1.0:
                flush()
    flush()
    out.flush()
    progress.clear()
    elapsed = time.monotonic() - started
    if not summary:
        return tally.exit_code
    text = (
        f"scanned {tally.scanned} messages ({tally.cached} from cache) in {elapsed:.2f}s: "
        f"{tally.counts[CLEAN]} clean, {tally.counts[INFECTED]} infected, "
        f"{tally.counts[UNCHECKED]} unchecked, {tally.counts[ERROR]} errors"
    )
    if as_json:
        print(text, file=err)
    else:
        print(f"----------- SCAN SUMMARY -----------\n{text}", file=out)
    return tally.exit_code
