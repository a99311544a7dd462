"""Where spoolscan's log lines go, and how they look.

* ``stderr``: ``time spoolscan[pid]: LEVEL message`` (the default on a terminal);
* ``syslog``: ``/dev/log`` with facility ``mail`` by default, so that the verdict of a held
  message sits beside Postfix's own lines in mail.log (``grep QUEUEID
  /var/log/mail.log``), ident ``spoolscan[pid]``, syslog priorities;
* ``journal``: systemd's native protocol, with the priority and, for a message, the
  fields ``QUEUE_ID``, ``MESSAGE_ID``, ``VERDICT``, ``SIGNATURE`` (``journalctl
  QUEUE_ID=4jblq...``); ``SYSLOG_FACILITY`` too, so that a journal forwarded to syslog
  still lands in mail.log;
* ``auto`` (the default): stderr on a terminal, the journal under systemd, else stderr.

``format = "json"`` writes one JSON object per line instead of text (for log shippers).
Every message is one line: text from mail and file names is escaped
(``spoolscan.text.printable``), and the database password never appears.

Priorities: a detection, a message flagged stuck, a retroactive detection are WARNING; a
failed action or an outage ERROR; the rest INFO.  Libraries (APScheduler, Alembic,
SQLAlchemy) log only their warnings unless ``-v``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import struct
import sys
from datetime import UTC, datetime
from typing import Any, Final

from spoolscan.config import LogConfig
from spoolscan.text import printable

NOTICE: Final = 25
logging.addLevelName(NOTICE, "NOTICE")

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
#: Fields a message's log record may carry (``extra=``), shown in json and the journal.
FIELDS: Final = ("queue_id", "message_id", "verdict", "signature", "action", "source")
_SYSLOG_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, NOTICE: 5, logging.WARNING: 4,
                           logging.ERROR: 3, logging.CRITICAL: 2}
_FACILITY: Final = {"mail": 2, "daemon": 3, "user": 1,
                    **{f"local{i}": 16 + i for i in range(8)}}
_NOISY: Final = ("apscheduler", "alembic", "sqlalchemy", "urllib3")


def priority(levelno: int) -> int:
    """The syslog priority for a logging level."""
    for level in sorted(_SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return _SYSLOG_PRIORITY[level]
    return 7


class _Clean:
    """The message of a record, made one safe line without the secret."""

    def __init__(self, secret: str | None) -> None:
        self.secret = secret

    def __call__(self, text: str) -> str:
        text = printable(text)
        return text.replace(self.secret, "***") if self.secret else text


class TextFormatter(logging.Formatter):
    def __init__(self, fmt: str, secret: str | None = None, datefmt: str | None = None
                 ) -> None:
        super().__init__(fmt, datefmt=datefmt)
        self.clean = _Clean(secret)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = self.clean(record.message)
        return super().formatMessage(safe)

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]  # noqa: N802
        text = super().formatException(ei)
        return text.replace(self.clean.secret, "***") if self.clean.secret else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the message fields."""

    def __init__(self, secret: str | None = None) -> None:
        super().__init__()
        self.clean = _Clean(secret)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(), "logger": record.name,
            "pid": record.process, "message": self.clean(record.getMessage())}
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = self.clean(str(value))
        if record.exc_info:
            out["exception"] = self.clean(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class JournalHandler(logging.Handler):
    """systemd's native journal protocol: one datagram per record (a few lines of code,
    so no library is needed)."""

    def __init__(self, facility: str, identifier: str = "spoolscan",
                 path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.path = path
        self.facility = _FACILITY[facility]
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"MESSAGE": self.format(record), "PRIORITY": str(priority(record.levelno)),
                      "SYSLOG_FACILITY": str(self.facility),
                      "SYSLOG_IDENTIFIER": self.identifier, "SYSLOG_PID": str(record.process),
                      "LOGGER": record.name}
            for key in FIELDS:
                value = getattr(record, key, None)
                if value is not None:
                    fields[key.upper()] = printable(str(value))
            self.sock.sendto(_journal_datagram(fields), self.path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def _journal_datagram(fields: dict[str, str]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:  # the protocol's binary form: KEY, newline, length, data
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class SyslogHandler(logging.handlers.SysLogHandler):
    """/dev/log, ``spoolscan[pid]: `` ident, priorities including NOTICE."""

    def __init__(self, facility: str, address: str = "/dev/log") -> None:
        super().__init__(address=address, facility=_FACILITY[facility])
        self.ident = f"spoolscan[{os.getpid()}]: "

    def mapPriority(self, levelName: str) -> str:  # noqa: N802,N803 (logging API)
        return {"NOTICE": "notice"}.get(levelName, super().mapPriority(levelName))


def resolve_target(target: str) -> str:
    """``auto``: stderr on a terminal, the journal under systemd, else stderr."""
    if target != "auto":
        return target
    if sys.stderr.isatty():
        return "stderr"
    if os.environ.get("JOURNAL_STREAM") and os.path.exists(JOURNAL_SOCKET):
        return "journal"
    return "stderr"


def setup(config: LogConfig, *, verbose: int = 0, quiet: bool = False,
          secret: str | None = None, json_format: bool = False,
          target: str | None = None) -> None:
    """Install the handler the configuration asks for (replacing any)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else \
        logging.getLevelName(config.level.upper())
    chosen = resolve_target(target or config.target)
    handler: logging.Handler
    if chosen == "journal":
        handler = JournalHandler(config.facility)
    elif chosen == "syslog":
        handler = SyslogHandler(config.facility, config.syslog_socket)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if json_format or config.format == "json":
        handler.setFormatter(JsonFormatter(secret))
    elif chosen == "stderr":
        handler.setFormatter(TextFormatter("%(asctime)s spoolscan[%(process)d]: %(levelname)s "
                                           "%(message)s", secret, datefmt="%b %d %H:%M:%S"))
    else:  # the journal and syslog add time, name and priority themselves
        handler.setFormatter(TextFormatter("%(message)s", secret))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
