"""The clamd client: content in, a ScanResult out.

pyclamd is used for what it does well (finding and connecting to clamd's Unix or TCP
socket); the data path is ours because pyclamd's has defects that lose mail safety:
an instance is not thread-safe (shared instances returned "clean" for infected files),
it retries ``recv`` five times on a timeout, sends with ``send`` instead of ``sendall`` and
does not frame replies.  So: one pyclamd instance per thread, ``z``-framed commands, every
reply read up to its terminating NUL under one absolute deadline per scan.

Every answer clamd can give maps to exactly one verdict, and only a strict, complete reply
(one line, the expected ``stream:``/``fd[N]:`` prefix, the NUL terminator) can mean
``clean``.  Anything that is not a clear "OK" or a clear detection is *unchecked* (clamd
could not scan it fully) or *error* (no usable answer); neither is ever treated as clean.
"""

from __future__ import annotations

import array
import hashlib
import os
import re
import socket
import struct
import threading
import time
from dataclasses import replace
from typing import BinaryIO, Final

import pyclamd

from spoolscan.config import ClamdConfig
from spoolscan.model import ScanResult, Verdict

CHUNK_SIZE: Final = 256 * 1024
_MAX_REPLY: Final = 64 * 1024
_LIMITS_PREFIX: Final = "Heuristics.Limits.Exceeded."
_DB_SUFFIXES: Final = (".cvd", ".cld", ".cud", ".ndb", ".hdb", ".hsb", ".mdb", ".msb", ".ldb",
                       ".idb", ".cdb", ".fp", ".sfp", ".ign", ".ign2", ".pdb", ".gdb", ".wdb",
                       ".yar", ".yara", ".cbc", ".ftm", ".info", ".crb", ".cat")
# One scan reply: "<prefix>: OK", "<prefix>: <Name> FOUND", "<prefix>: <reason> ERROR", and
# (INSTREAM over StreamMaxLength, no prefix) "INSTREAM size limit exceeded. ERROR".
_REPLY_RE: Final = re.compile(
    r"(?:(?P<prefix>stream|fd\[\d+\]): (?:(?P<ok>OK)|(?P<name>[^\s:]+) FOUND"
    r"|(?P<reason>[^\n]+) ERROR)|(?P<limit>INSTREAM size limit exceeded)\. ERROR)")


class ClamdError(Exception):
    """clamd could not be reached or gave no usable answer."""


class ClamdUnreachable(ClamdError):
    """clamd could not be reached: nothing of the message was sent."""


def parse_reply(reply: str, prefix: str | None = None) -> ScanResult:
    """Map one clamd scan reply (``stream: OK``, ``fd[5]: Name FOUND``...) to a result.

    ``prefix``: the prefix the command produces (``stream`` for INSTREAM; None accepts
    ``stream`` or ``fd[N]``).  A reply that is not exactly one of the three forms is an
    error, never clean.
    """
    text = reply
    m = _REPLY_RE.fullmatch(text)
    if m is None or (prefix is not None and m.group("prefix") not in (prefix, None)):
        shown = text[:200].encode("unicode_escape").decode("ascii")
        return ScanResult(Verdict.ERROR, detail=f"unexpected reply from clamd: {shown!r}")
    if m.group("ok"):
        return ScanResult(Verdict.CLEAN)
    name = m.group("name")
    if name is not None:
        if name.startswith(_LIMITS_PREFIX):
            return ScanResult(Verdict.UNCHECKED, signature=name,
                              detail=f"clamd limit exceeded ({name})")
        return ScanResult(Verdict.INFECTED, signature=name)
    if m.group("limit"):
        return ScanResult(Verdict.UNCHECKED,
                          detail="clamd: INSTREAM size limit exceeded (StreamMaxLength)")
    reason = m.group("reason").rstrip(".")
    if "size limit exceeded" in reason:
        return ScanResult(Verdict.UNCHECKED, detail=f"clamd: {reason} (StreamMaxLength)")
    return ScanResult(Verdict.ERROR, detail=f"clamd: {reason}")


class ClamdClient:
    """Scans content with clamd.  Safe to share between threads.

    ``timeout`` bounds one whole scan (connect, send, reply) as an absolute deadline: a
    clamd that trickles its reply byte by byte gets no more time than one that says
    nothing.  ``max_size`` makes larger content *unchecked* without sending it.
    """

    def __init__(self, config: ClamdConfig, max_size: int | None = None,
                 server: str | None = None) -> None:
        """``server``: one of ``[clamd] servers`` (a socket path or ``host:port``);
        default: ``[clamd] address`` if set, else ``socket``."""
        self.config = config
        self.max_size = max_size
        if server is None:
            self.address: str | None = config.address
            self.socket: str | None = None if config.address else config.socket
        else:
            self.address = None if server.startswith("/") else server
            self.socket = server if server.startswith("/") else None
        self._local = threading.local()

    @property
    def endpoint(self) -> str:
        return f"tcp:{self.address}" if self.address else f"unix:{self.socket}"

    # --- connections -----------------------------------------------------------------

    def _client(self) -> pyclamd.pyclamd._ClamdGeneric:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.address:
                host, _, port = self.address.rpartition(":")
                client = pyclamd.ClamdNetworkSocket(host=host.strip("[]"), port=int(port),
                                                    timeout=self.config.timeout)
            else:
                client = pyclamd.ClamdUnixSocket(filename=self.socket,
                                                 timeout=self.config.timeout)
            self._local.client = client
        return client

    def _connect(self, deadline: float) -> socket.socket:
        try:
            client = self._client()
            client.timeout = _remaining(deadline)
            client._init_socket()
        except OSError as exc:  # pyclamd.ConnectionError is an OSError
            raise ClamdUnreachable(f"cannot connect to clamd at {self.endpoint}: {exc}"
                                   ) from None
        sock: socket.socket = client.clamd_socket
        client.clamd_socket = None  # the socket is ours now; pyclamd must not reuse it
        sock.settimeout(_remaining(deadline))
        return sock

    @staticmethod
    def _read_reply(sock: socket.socket, deadline: float) -> str:
        """One NUL-terminated reply.  Raises ClamdError if the connection ends before the
        terminator (a truncated reply is no reply), TimeoutError at the deadline."""
        data = bytearray()
        while True:
            end = data.find(b"\0")
            if end >= 0:
                return bytes(data[:end]).decode("utf-8", "replace")
            sock.settimeout(_remaining(deadline))
            part = sock.recv(4096)
            if not part:
                if data:
                    raise ClamdError("clamd's reply ended without its terminator")
                raise ClamdError("clamd closed the connection without a reply")
            data += part
            if len(data) > _MAX_REPLY:
                raise ClamdError("reply from clamd too long")

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

    def fingerprint(self, timeout: float = 10.0) -> str:
        """An identifier of the signatures clamd is using now, equal on every host that
        has the same signatures (the verdict cache is shared between hosts under it).

        Content-based: when clamd's VERSION reports the version of the ``daily`` database
        (``ClamAV 1.4.6/27001/<date>``), that number, plus a digest of the *contents* of
        any other (local, third-party) signature files in ``database_directory``; with
        custom databases only, the digest of all signature files' contents.  Neither the
        engine version, nor clamd's time zone (the date in VERSION), nor file names of
        temporary copies, sizes or mtimes enter it.  Digests are cached per file by
        (size, mtime, ctime, inode), so asking every few seconds reads nothing again.

        Only a clamd on a local socket is digested (``database_directory`` is on this
        host); a clamd over TCP is fingerprinted by its VERSION only.  Read it *before*
        the scans it stamps: VERSION changes only once clamd has loaded new official
        signatures; the digest can change a little earlier (files replaced, reload
        pending), in which case a later fingerprint follows the reload and its rescan
        covers what was stamped in between.
        """
        return content_fingerprint(self.version(timeout),
                                   None if self.address else self.config.database_directory)

    # --- scanning --------------------------------------------------------------------

    def _too_large(self, size: int | None) -> ScanResult | None:
        if self.max_size is not None and size is not None and size > self.max_size:
            return ScanResult(Verdict.UNCHECKED, detail=f"{size} bytes is over max_size "
                                                        f"({self.max_size}); not scanned")
        return None

    def scan_stream(self, stream: BinaryIO, size: int | None = None) -> ScanResult:
        """Scan content read from ``stream`` (INSTREAM), in chunks: never whole in memory."""
        too_large = self._too_large(size)
        if too_large is not None:
            return too_large
        started = time.monotonic()
        result = self._guarded(self._instream, stream, started + self.config.timeout)
        return replace(result, duration_ms=int((time.monotonic() - started) * 1000))

    def scan_fd(self, fd: int, size: int | None = None) -> ScanResult:
        """Scan an open file by passing its descriptor (FILDES; Unix socket only).

        clamd reads the file itself, so this is the fastest way for plain files; it falls
        back to streaming over TCP.
        """
        too_large = self._too_large(size)
        if too_large is not None:
            return too_large
        started = time.monotonic()
        result = self._guarded(self.exchange_fd, fd, started + self.config.timeout)
        return replace(result, duration_ms=int((time.monotonic() - started) * 1000))

    def exchange_fd(self, fd: int, deadline: float) -> ScanResult:
        """One scan of an open file: FILDES on a local socket, INSTREAM over TCP (from
        the start of the file).  Raises ClamdError/OSError/TimeoutError when this clamd
        gave no usable answer (another server may); returns clamd's answer otherwise."""
        if self.address:
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as stream:
                return self._instream(stream, deadline)  # type: ignore[arg-type]
        return self._fildes(fd, deadline)

    def exchange_stream(self, stream: BinaryIO, deadline: float) -> ScanResult:
        """One INSTREAM scan; raises as ``exchange_fd`` does."""
        return self._instream(stream, deadline)

    def _guarded(self, scan, content, deadline: float) -> ScanResult:  # type: ignore[no-untyped-def]
        """Run one scan exchange; every failure becomes an ``error`` result."""
        try:
            return scan(content, deadline)
        except ClamdError as exc:
            return ScanResult(Verdict.ERROR, detail=str(exc))
        except TimeoutError:
            return ScanResult(Verdict.ERROR,
                              detail=f"clamd timed out after {self.config.timeout:g}s")
        except OSError as exc:
            return ScanResult(Verdict.ERROR, detail=f"clamd connection failed: {exc}")

    def _fildes(self, fd: int, deadline: float) -> ScanResult:
        with self._connect(deadline) as sock:
            sock.sendall(b"zFILDES\0")
            sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [fd]))])
            return parse_reply(self._read_reply(sock, deadline))

    def _instream(self, stream: BinaryIO, deadline: float) -> ScanResult:
        with self._connect(deadline) as sock:
            try:
                sock.sendall(b"zINSTREAM\0")
                buf = bytearray(CHUNK_SIZE)
                view = memoryview(buf)
                while True:
                    n = _readinto(stream, buf)
                    if not n:
                        break
                    sock.settimeout(_remaining(deadline))
                    sock.sendall(struct.pack("!L", n))
                    sock.sendall(view[:n])
                sock.sendall(b"\0\0\0\0")
            except (BrokenPipeError, ConnectionResetError):
                # clamd stops reading when the stream passes StreamMaxLength; its reply
                # ("INSTREAM size limit exceeded. ERROR") is usually still readable.
                try:
                    return parse_reply(self._read_reply(sock, deadline), "stream")
                except (OSError, ClamdError):
                    raise ClamdError("clamd closed the connection while the message was "
                                     "being sent") from None
            try:
                return parse_reply(self._read_reply(sock, deadline), "stream")
            except ClamdError as exc:
                raise ClamdError(f"no reply from clamd: {exc}") from None


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _readinto(stream: BinaryIO, buf: bytearray) -> int:
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return readinto(buf) or 0
    data = stream.read(len(buf))
    buf[: len(data)] = data
    return len(data)


_OFFICIAL: Final = ("main.", "daily.", "bytecode.")
_DIGESTS: dict[str, tuple[tuple[int, int, int, int], str]] = {}
_DIGESTS_LOCK = threading.Lock()


def content_fingerprint(version: str, directory: str | None) -> str:
    """The fingerprint for clamd's VERSION reply and its database directory (None: not
    reachable from here).  See ``ClamdClient.fingerprint``."""
    parts = version.split("/")
    # The engine counts (a newer one unpacks and detects more), clamd's clock does not.
    engine = parts[0].strip() or "ClamAV"
    if len(parts) >= 2 and parts[1].strip().isdigit():
        # Official (or versioned) daily: its number names it; local files beside it too.
        base = f"{engine} daily/{int(parts[1])}/"
        if directory is None:
            return base
        local = database_digest(directory, official=False)
        return base if local == EMPTY_DIGEST else f"{base}+db:{local}"
    if directory is None:
        return f"{version.strip()}+remote"
    return f"{engine} custom+db:{database_digest(directory)}"


EMPTY_DIGEST: Final = hashlib.sha256(b"").hexdigest()[:16]


def database_digest(directory: str, official: bool = True) -> str:
    """A short digest of the contents of the signature files in ``directory`` (sorted by
    name; ``official=False``: leaving out ``main.*``, ``daily.*``, ``bytecode.*``).  A
    file whose size, mtime, ctime and inode are unchanged is not read again."""
    lines: list[str] = []
    try:
        entries = sorted(
            (e.name, e.path, e.stat(follow_symlinks=False))
            for e in os.scandir(directory)
            if e.name.endswith(_DB_SUFFIXES) and not e.name.startswith(".")
            and e.is_file(follow_symlinks=False)
            and (official or not e.name.startswith(_OFFICIAL))
        )
        for name, path, st in entries:
            key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            with _DIGESTS_LOCK:
                cached = _DIGESTS.get(path)
            if cached is None or cached[0] != key:
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                cached = (key, h.hexdigest())
                with _DIGESTS_LOCK:
                    _DIGESTS[path] = cached
            # The name's suffix says how clamd reads the file; the rest of it is free.
            lines.append(f"{name.rsplit('.', 1)[-1]}:{cached[1]}\n")
    except OSError:
        return "unreadable"
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()[:16]
