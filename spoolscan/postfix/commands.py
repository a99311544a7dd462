"""Thin, verified wrappers around Postfix's admin commands for one Postfix instance.

Every function takes the instance's configuration directory (passed as ``-c DIR``; ``None``
means Postfix's default) and optionally the directory holding the binaries (``bin_dir``;
default: a ``PATH`` lookup, then ``/usr/sbin``, where Debian installs them).

Facts these wrappers rely on (Postfix 3.7, see ``shared/notes/postfix.md``):

* ``postsuper`` exits 0 even when nothing happened (unknown, already released or
  malformed IDs), so success is read per ID from its stderr lines
  (``postsuper: ID: released from hold``, ``postsuper: ID: removed``).  It exits non-zero
  only on a fatal error (e.g. not run as root), which raises ``PostfixCommandError``.
* ``postqueue -i ID`` also exits 0 for unknown IDs; it only asks flush(8) to deliver.
* ``postqueue -j`` needs a running Postfix (it asks the showq service).

Queue IDs are checked against Postfix's own rule (``[A-Za-z0-9_]+``) before anything runs,
so nothing else ever reaches a command line or postsuper's standard input.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "InvalidQueueId",
    "PostfixCommandError",
    "delete",
    "flush",
    "inject",
    "list_queue",
    "myhostname",
    "queue_directory",
    "release",
    "validate_queue_id",
    "wake_qmgr",
]

log = logging.getLogger(__name__)

#: Seconds a single Postfix command may take before it is abandoned.
DEFAULT_TIMEOUT = 60.0
#: Where Debian installs the Postfix admin commands (often not on a service's PATH).
FALLBACK_BIN_DIR = Path("/usr/sbin")
#: Postfix: mail_queue_id_ok() allows [A-Za-z0-9_] up to VALID_HOSTNAME_LEN characters.
MAX_QUEUE_ID_LEN = 255
_QUEUE_ID_RE = re.compile(r"[A-Za-z0-9_]+")
#: Queue names that postsuper accepts to limit an operation.
QUEUE_NAMES = frozenset({"hold", "incoming", "active", "deferred"})

_RELEASED_RE = re.compile(r"^postsuper: ([A-Za-z0-9_]+): released from hold$")
_REMOVED_RE = re.compile(r"^postsuper: ([A-Za-z0-9_]+): removed$")

PathArg = str | Path


class PostfixCommandError(RuntimeError):
    """A Postfix command could not run at all, or failed as a whole.

    The message names the command, says what went wrong and what to do about it.
    """


class InvalidQueueId(ValueError):
    """A string that is not a Postfix queue ID; raised before any command runs."""


def validate_queue_id(queue_id: str) -> str:
    """Return ``queue_id`` if Postfix would accept it as a queue ID, else raise
    ``InvalidQueueId``.  Status suffixes from ``mailq`` (``*``, ``!``, ``#``) are not
    accepted: strip them first."""
    if (
        not isinstance(queue_id, str)
        or len(queue_id) > MAX_QUEUE_ID_LEN
        or not _QUEUE_ID_RE.fullmatch(queue_id)
    ):
        raise InvalidQueueId(f"invalid Postfix queue ID: {queue_id!r} (want [A-Za-z0-9_]+)")
    return queue_id


def _validated(ids: Iterable[str]) -> list[str]:
    """All IDs validated up front, duplicates dropped, order kept."""
    if isinstance(ids, str):
        # A lone string would otherwise be taken as a sequence of one-letter IDs.
        raise TypeError("pass an iterable of queue IDs, not a single string")
    return list(dict.fromkeys(validate_queue_id(i) for i in ids))


# --------------------------------------------------------------------------- running


def _find(program: str, bin_dir: PathArg | None) -> str:
    if bin_dir is not None:
        candidate = Path(bin_dir) / program
        if candidate.is_file():
            return str(candidate)
        raise PostfixCommandError(
            f"{program} not found in {bin_dir}: check the bin_dir setting "
            "(it must hold the Postfix commands)"
        )
    found = shutil.which(program) or shutil.which(program, path=str(FALLBACK_BIN_DIR))
    if found is None:
        raise PostfixCommandError(
            f"{program} not found on PATH or in {FALLBACK_BIN_DIR}: install Postfix "
            "(apt-get install postfix) or set the directory of its commands (bin_dir)"
        )
    return found


def _advice(stderr: str, config_dir: PathArg | None) -> str:
    """What to do about a fatal error, judged from Postfix's own message."""
    conf = f" -c {config_dir}" if config_dir is not None else ""
    if "reserved for the superuser" in stderr:
        return "run as root: postsuper needs uid 0"
    if "mail system is down" in stderr:
        return f"start Postfix (postfix{conf} start) and try again"
    if "main.cf" in stderr and "No such file or directory" in stderr:
        return "check the Postfix configuration directory: it must contain main.cf"
    if "alternate_config_directories" in stderr or "not authorized" in stderr:
        return (
            "run as root, or list the directory in alternate_config_directories "
            "of the default main.cf"
        )
    return "see the error above and the Postfix mail log"


def _run(
    program: str,
    args: Sequence[str],
    *,
    config_dir: PathArg | None,
    bin_dir: PathArg | None,
    stdin: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a Postfix command; raise ``PostfixCommandError`` if it cannot run, times out,
    or (with ``check``) exits non-zero."""
    argv = [_find(program, bin_dir)]
    if config_dir is not None:
        argv += ["-c", str(config_dir)]
    argv += list(args)
    shown = " ".join(argv)
    try:
        result = subprocess.run(
            argv,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PostfixCommandError(
            f"{shown} did not finish within {timeout:g}s: is Postfix or the disk stuck? "
            "Check the mail log"
        ) from exc
    except OSError as exc:
        raise PostfixCommandError(
            f"cannot run {shown}: {exc}; check that Postfix is installed and executable"
        ) from exc
    if check and result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip() or "(no output)"
        raise PostfixCommandError(
            f"{shown} failed (exit {result.returncode}): {detail}; "
            f"{_advice(result.stderr, config_dir)}"
        )
    return result


def _log_other_lines(program: str, stderr: str, handled: re.Pattern[str]) -> None:
    """Pass postsuper's warnings on to our log; they explain IDs that were skipped."""
    for line in stderr.splitlines():
        if handled.match(line) or not line.strip():
            continue
        if "warning:" in line or "fatal:" in line or "CHECK YOUR QUEUE IDS" in line:
            log.warning("%s: %s", program, line)
        else:
            log.debug("%s: %s", program, line)


def _postsuper_batch(
    option: str,
    ids: Iterable[str],
    done_re: re.Pattern[str],
    *,
    config_dir: PathArg | None,
    bin_dir: PathArg | None,
    queues: Iterable[str] = (),
    timeout: float,
) -> set[str]:
    """Run ``postsuper OPTION - [queue...]`` with IDs on stdin; return the IDs it confirmed."""
    wanted = _validated(ids)
    queue_args = list(queues)
    for name in queue_args:
        if name not in QUEUE_NAMES:
            raise ValueError(f"unknown queue {name!r} (want one of {sorted(QUEUE_NAMES)})")
    if not wanted:
        return set()
    result = _run(
        "postsuper",
        [option, "-", *queue_args],
        config_dir=config_dir,
        bin_dir=bin_dir,
        stdin="".join(f"{qid}\n" for qid in wanted),
        timeout=timeout,
    )
    _log_other_lines("postsuper", result.stderr, done_re)
    confirmed = {m.group(1) for m in map(done_re.match, result.stderr.splitlines()) if m}
    # Only IDs we asked about: a line for any other ID would be a surprise, not a result.
    return confirmed & set(wanted)


# --------------------------------------------------------------------------- the API


def queue_directory(
    config_dir: PathArg | None, *, bin_dir: PathArg | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """The instance's ``queue_directory`` (``postconf -h -x queue_directory``)."""
    result = _run(
        "postconf", ["-h", "-x", "queue_directory"],
        config_dir=config_dir, bin_dir=bin_dir, timeout=timeout,
    )
    value = result.stdout.strip()
    path = Path(value)
    if not value or not path.is_absolute():
        raise PostfixCommandError(
            f"postconf printed no usable queue_directory ({value!r}); "
            "check queue_directory in main.cf"
        )
    return path


def myhostname(config_dir: PathArg | None, *, bin_dir: PathArg | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> str:
    """The instance's ``myhostname`` (the host part of held messages' identities); the
    machine's FQDN if postconf cannot say."""
    try:
        value = _run("postconf", ["-h", "myhostname"], config_dir=config_dir,
                     bin_dir=bin_dir, timeout=timeout).stdout.strip()
    except PostfixCommandError:
        value = ""
    return value or socket.getfqdn()


def release(
    config_dir: PathArg | None, ids: Iterable[str], *, bin_dir: PathArg | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> set[str]:
    """Release held messages (``postsuper -H -``); return the IDs postsuper released.

    IDs that were not on hold (unknown, already released, still being written) are simply
    missing from the result: postsuper says nothing about them and exits 0.
    Released mail moves to ``deferred/``; call ``flush()`` to have it delivered now.
    """
    return _postsuper_batch(
        "-H", ids, _RELEASED_RE, config_dir=config_dir, bin_dir=bin_dir, timeout=timeout
    )


def delete(
    config_dir: PathArg | None, ids: Iterable[str], *, queues: Iterable[str] = (),
    bin_dir: PathArg | None = None, timeout: float = DEFAULT_TIMEOUT,
) -> set[str]:
    """Delete messages (``postsuper -d - [queue...]``); return the IDs postsuper removed.

    ``queues`` limits the deletion to those queues (e.g. ``("hold",)``, so that a message
    released meanwhile is left alone); default: every queue postsuper searches.
    """
    return _postsuper_batch(
        "-d", ids, _REMOVED_RE, config_dir=config_dir, bin_dir=bin_dir,
        queues=queues, timeout=timeout,
    )


def flush(
    config_dir: PathArg | None, ids: Iterable[str], *, bin_dir: PathArg | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> set[str]:
    """Ask for immediate delivery of each message (``postqueue -i ID``, one call per ID).

    Failures of a single ID are logged, not raised; the result is the set of IDs whose
    request was accepted.  postqueue exits 0 for unknown IDs too, so acceptance does not
    prove the message exists.  Raises ``PostfixCommandError`` only when postqueue cannot
    be found, and ``InvalidQueueId`` before running anything.
    """
    wanted = _validated(ids)
    if wanted:
        _find("postqueue", bin_dir)  # a missing program is a setup error: say so once
    accepted: set[str] = set()
    for qid in wanted:
        try:
            _run("postqueue", ["-i", qid], config_dir=config_dir, bin_dir=bin_dir,
                 timeout=timeout)
        except PostfixCommandError as exc:
            log.warning("flush of %s failed: %s", qid, exc)
        else:
            accepted.add(qid)
    return accepted


# Envelope addresses for a command line: Postfix's own limit, no control characters (a
# newline could not be passed safely, a NUL not at all).
_ADDRESS_OK = re.compile(r"[^\x00-\x1f\x7f]{0,2048}")


def inject(
    config_dir: PathArg | None, sender: str, recipients: Sequence[str], header: bytes,
    content_fd: int, *, bin_dir: PathArg | None = None, timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Submit a message through ``sendmail`` (pickup, cleanup: the normal path, so every
    check of the instance applies) with this envelope: ``header`` (one complete header
    line) then the content read from ``content_fd`` (from its start, in chunks).

    The recipients come after ``--`` (one starting with ``-`` is not an option).  Raises
    ``PostfixCommandError`` if sendmail cannot run or exits non-zero, ``ValueError`` for
    an address that cannot be passed on a command line.
    """
    if not recipients:
        raise ValueError("no recipient to send to")
    for address in (sender, *recipients):
        if not _ADDRESS_OK.fullmatch(address):
            raise ValueError(f"address {address[:80]!r} cannot be passed to sendmail")
    argv = [_find("sendmail", bin_dir)]
    if config_dir is not None:
        argv += ["-C", str(config_dir)]
    # -i: a line with a single dot is content; -f: the envelope sender (empty: bounces).
    argv += ["-i", "-f", sender, "--", *recipients]
    # stderr to a file: a pipe nobody reads while we write could fill and block both.
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=errors)
        except OSError as exc:
            raise PostfixCommandError(f"cannot run {argv[0]}: {exc}") from exc
        assert proc.stdin is not None
        try:
            proc.stdin.write(header)
            offset = 0
            while chunk := os.pread(content_fd, 1 << 16, offset):
                proc.stdin.write(chunk)
                offset += len(chunk)
            proc.stdin.close()
            proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc.kill()
            proc.wait()
            raise PostfixCommandError(f"{argv[0]} failed while reading the message: "
                                      f"{exc}; nothing was submitted") from exc
        errors.seek(0)
        err = errors.read(4096)
    if proc.returncode != 0:
        detail = err.decode("utf-8", "replace").strip() or "(no output)"
        raise PostfixCommandError(f"{argv[0]} failed (exit {proc.returncode}): {detail}; "
                                  f"{_advice(detail, config_dir)}")


def wake_qmgr(queue_dir: PathArg) -> bool:
    """Ask qmgr to scan the deferred queue now (the ``D`` trigger on ``public/qmgr``).

    This is what makes mail released by ``postsuper -H`` go out at once: one request for
    a whole batch, where ``postqueue -i`` would start a process per message (each of which
    ends in the same request).  The endpoint is a UNIX socket (Debian's master.cf) or a
    FIFO; both are handled like Postfix's own mail_trigger().  Returns False if qmgr
    could not be reached (Postfix stopped, no permission): then use ``flush()``.
    """
    path = Path(queue_dir) / "public" / "qmgr"
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISSOCK(mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(b"D")
            return True
        if stat.S_ISFIFO(mode):
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, b"D")
            finally:
                os.close(fd)
            return True
    except OSError as exc:
        log.debug("cannot trigger qmgr at %s: %s", path, exc)
    return False


def list_queue(
    config_dir: PathArg | None, *, bin_dir: PathArg | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict[str, Any]]:
    """All queued messages as ``postqueue -j`` reports them, one dict per message.

    Keys include ``queue_name``, ``queue_id``, ``arrival_time``, ``message_size``,
    ``sender`` and ``recipients``; Postfix adds members over time, so ignore unknown ones.
    The listing is not atomic: entries can repeat or be missing while the queue changes.
    """
    result = _run("postqueue", ["-j"], config_dir=config_dir, bin_dir=bin_dir, timeout=timeout)
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(result.stdout.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PostfixCommandError(
                f"postqueue -j printed a line that is not JSON (line {number}: {exc}); "
                "is this Postfix 3.1 or later?"
            ) from exc
        if not isinstance(entry, dict):
            raise PostfixCommandError(
                f"postqueue -j printed a non-object on line {number}; "
                "is this Postfix 3.1 or later?"
            )
        entries.append(entry)
    return entries
