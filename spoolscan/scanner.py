"""The clamd scanner: content in, a Verdict out.

pyclamd is used for what it does well (finding and connecting to clamd's Unix or TCP
socket); the data path is ours because pyclamd's has defects that lose mail safety:
an instance is not thread-safe (shared instances returned "clean" for infected files),
it retries ``recv`` five times on a timeout, sends with ``send`` instead of ``sendall`` and
does not frame replies.  So: one pyclamd instance per thread, ``z``-framed commands, every
reply read up to its terminating NUL under one deadline.

Every answer clamd can give maps to exactly one verdict.  Anything that is not a clear
"OK" or a clear detection is *unchecked* (clamd could not scan it fully) or *error* (no
usable answer); neither is ever treated as clean.
"""

from __future__ import annotations

import array
import hashlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import BinaryIO, Final

import pyclamd

from spoolscan.config import ClamdConfig

CLEAN: Final = "clean"
INFECTED: Final = "infected"
UNCHECKED: Final = "unchecked"
ERROR: Final = "error"
VERDICTS: Final = (CLEAN, INFECTED, UNCHECKED, ERROR)

CHUNK_SIZE: Final = 256 * 1024
_MAX_REPLY: Final = 64 * 1024
_LIMITS_PREFIX: Final = "Heuristics.Limits.Exceeded."
_DB_SUFFIXES: Final = (".cvd", ".cld", ".cud", ".ndb", ".hdb", ".hsb", ".mdb", ".msb", ".ldb",
                       ".idb", ".cdb", ".fp", ".sfp", ".ign", ".ign2", ".pdb", ".gdb", ".wdb",
                       ".yar", ".yara", ".cbc", ".ftm", ".info", ".crb", ".cat")


@dataclass(frozen=True)
class Verdict:
    """The outcome of scanning one message.

    ``signature`` is the detection name for ``infected`` and for limit-based ``unchecked``
    verdicts; ``detail`` says in words why a verdict is ``unchecked`` or ``error``.
    """

    verdict: str
    signature: str | None = None
    detail: str | None = None
    fingerprint: str | None = None
    duration_ms: int = 0

    @property
    def is_final(self) -> bool:
        """True when clamd gave a definite answer (clean or infected) that may be cached."""
        return self.verdict in (CLEAN, INFECTED)


class ClamdError(Exception):
    """clamd could not be reached or gave no usable answer."""


def parse_reply(reply: str) -> Verdict:
    """Map one clamd scan reply (``stream: OK``, ``fd[5]: Name FOUND``...) to a Verdict."""
    text = reply.strip("\0\r\n ")
    head, _, status = text.rpartition(" ")
    if status == "OK" or text.endswith(": OK"):
        return Verdict(CLEAN)
    if status == "FOUND":
        name = head.rsplit(": ", 1)[-1]
        if name.startswith(_LIMITS_PREFIX):
            return Verdict(UNCHECKED, signature=name, detail=f"clamd limit exceeded ({name})")
        return Verdict(INFECTED, signature=name)
    if status == "ERROR":
        reason = head.rsplit(": ", 1)[-1].rstrip(".")
        if "size limit exceeded" in reason:
            return Verdict(UNCHECKED, detail=f"clamd: {reason} (StreamMaxLength)")
        return Verdict(ERROR, detail=f"clamd: {reason}")
    return Verdict(ERROR, detail=f"unexpected reply from clamd: {text[:200]!r}")


class ClamdScanner:
    """Scans content with clamd.  Safe to share between threads.

    ``timeout`` bounds one whole scan (connect, send, reply).  ``max_size`` makes larger
    content *unchecked* without sending it.
    """

    def __init__(self, config: ClamdConfig, max_size: int | None = None) -> None:
        self.config = config
        self.max_size = max_size
        self._local = threading.local()

    # --- connections -----------------------------------------------------------------

    def _client(self) -> pyclamd.pyclamd._ClamdGeneric:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.config.address:
                host, _, port = self.config.address.rpartition(":")
                client = pyclamd.ClamdNetworkSocket(host=host.strip("[]"), port=int(port),
                                                    timeout=self.config.timeout)
            else:
                client = pyclamd.ClamdUnixSocket(filename=self.config.socket,
                                                 timeout=self.config.timeout)
            self._local.client = client
        return client

    def _connect(self, deadline: float) -> socket.socket:
        try:
            client = self._client()
            client._init_socket()
        except OSError as exc:  # pyclamd.ConnectionError is an OSError
            raise ClamdError(f"cannot connect to clamd at {self.config.endpoint}: {exc}") from None
        sock: socket.socket = client.clamd_socket
        client.clamd_socket = None  # the socket is ours now; pyclamd must not reuse it
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        return sock

    @staticmethod
    def _read_reply(sock: socket.socket, deadline: float) -> str:
        data = bytearray()
        while b"\0" not in data:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            part = sock.recv(4096)
            if not part:
                break
            data += part
            if len(data) > _MAX_REPLY:
                raise ClamdError("reply from clamd too long")
        if not data:
            raise ClamdError("clamd closed the connection without a reply")
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")

    def _command(self, command: str, timeout: float | None = None) -> str:
        deadline = time.monotonic() + (timeout or self.config.timeout)
        try:
            sock = self._connect(deadline)
            with sock:
                sock.sendall(b"z" + command.encode() + b"\0")
                return self._read_reply(sock, deadline)
        except TimeoutError:
            raise ClamdError(f"clamd did not answer {command} in time") from None
        except OSError as exc:
            raise ClamdError(f"clamd {command} failed: {exc}") from None

    # --- control ---------------------------------------------------------------------

    def ping(self, timeout: float = 5.0) -> bool:
        """True if clamd answers PING."""
        try:
            return self._command("PING", timeout) == "PONG"
        except ClamdError:
            return False

    def version(self, timeout: float = 10.0) -> str:
        """clamd's VERSION reply, e.g. ``ClamAV 1.4.6/27001/Fri Nov 27 20:36:49 2026``."""
        return self._command("VERSION", timeout)

    def reload(self) -> str:
        """Ask clamd to reload its databases (asynchronous on clamd's side)."""
        return self._command("RELOAD")

    def fingerprint(self) -> str:
        """An identifier of the signatures clamd is using now.

        clamd's VERSION line (its middle number is the version of the official ``daily``
        database) plus a digest of the database directory listing (names, sizes,
        mtimes), so that third-party or local signature files count too.  Read it
        *before* the scans it stamps.  VERSION changes only once clamd has loaded new
        official signatures; the digest can change a little earlier (files replaced,
        reload pending), in which case a later fingerprint follows the reload and its
        rescan covers what was stamped in between.
        """
        version = self.version()
        return f"{version}+db:{database_digest(self.config.database_directory)}"

    # --- scanning --------------------------------------------------------------------

    def scan_stream(self, stream: BinaryIO, size: int | None = None) -> Verdict:
        """Scan content read from ``stream`` (INSTREAM), in chunks: never whole in memory."""
        if self.max_size is not None and size is not None and size > self.max_size:
            return Verdict(UNCHECKED, detail=f"{size} bytes is over max_size "
                                             f"({self.max_size}); not scanned")
        started = time.monotonic()
        verdict = self._instream(stream, started + self.config.timeout)
        return replace(verdict, duration_ms=int((time.monotonic() - started) * 1000))

    def scan_fd(self, fd: int, size: int | None = None) -> Verdict:
        """Scan an open file by passing its descriptor (FILDES; Unix socket only).

        clamd reads the file itself, so this is the fastest way for plain files; it falls
        back to streaming over TCP.
        """
        if self.max_size is not None and size is not None and size > self.max_size:
            return Verdict(UNCHECKED, detail=f"{size} bytes is over max_size "
                                             f"({self.max_size}); not scanned")
        if self.config.address:
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as stream:
                return self.scan_stream(stream)  # type: ignore[arg-type]
        started = time.monotonic()
        deadline = started + self.config.timeout
        try:
            sock = self._connect(deadline)
            with sock:
                sock.sendall(b"zFILDES\0")
                sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [fd]))])
                verdict = parse_reply(self._read_reply(sock, deadline))
        except ClamdError as exc:
            verdict = Verdict(ERROR, detail=str(exc))
        except TimeoutError:
            verdict = Verdict(ERROR, detail=f"clamd timed out after {self.config.timeout:g}s")
        except OSError as exc:
            verdict = Verdict(ERROR, detail=f"clamd connection failed: {exc}")
        return replace(verdict, duration_ms=int((time.monotonic() - started) * 1000))

    def _instream(self, stream: BinaryIO, deadline: float) -> Verdict:
        try:
            sock = self._connect(deadline)
        except ClamdError as exc:
            return Verdict(ERROR, detail=str(exc))
        with sock:
            try:
                sock.sendall(b"zINSTREAM\0")
                buf = bytearray(CHUNK_SIZE)
                view = memoryview(buf)
                while True:
                    n = _readinto(stream, buf)
                    if not n:
                        break
                    sock.settimeout(max(0.05, deadline - time.monotonic()))
                    sock.sendall(struct.pack("!L", n))
                    sock.sendall(view[:n])
                sock.sendall(b"\0\0\0\0")
            except (BrokenPipeError, ConnectionResetError):
                # clamd stops reading when the stream passes StreamMaxLength; its reply
                # ("INSTREAM size limit exceeded. ERROR") is usually still readable.
                try:
                    return parse_reply(self._read_reply(sock, deadline))
                except (OSError, ClamdError):
                    return Verdict(ERROR, detail="clamd closed the connection while the "
                                                 "message was being sent")
            except TimeoutError:
                return Verdict(ERROR, detail=f"clamd timed out after {self.config.timeout:g}s")
            except OSError as exc:
                return Verdict(ERROR, detail=f"clamd connection failed: {exc}")
            try:
                return parse_reply(self._read_reply(sock, deadline))
            except TimeoutError:
                return Verdict(ERROR, detail=f"clamd timed out after {self.config.timeout:g}s")
            except (OSError, ClamdError) as exc:
                return Verdict(ERROR, detail=f"no reply from clamd: {exc}")


def _readinto(stream: BinaryIO, buf: bytearray) -> int:
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return readinto(buf) or 0
    data = stream.read(len(buf))
    buf[: len(data)] = data
    return len(data)


def database_digest(directory: str) -> str:
    """A short digest of the signature files in ``directory`` (name, size, mtime)."""
    try:
        entries = sorted(
            (e.name, e.stat().st_size, e.stat().st_mtime_ns)
            for e in os.scandir(directory)
            if e.name.endswith(_DB_SUFFIXES) and e.is_file()
        )
    except OSError:
        return "unreadable"
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
