"""Read Postfix queue files (hold/, deferred/, ...) without running postcat.

A queue file is a sequence of records: one type byte, the data length in 7-bit groups
(least significant first, 0x80 = another length byte follows), then the data.  It has
three segments, read in this order:

* envelope: ``C`` (sizes, always the first record) ... ``M`` (start of content);
* content: ``N`` (a line), ``L`` (a long line continued in the next record), ``w``
  (padding, skipped) ... ``X`` (start of the extracted segment);
* extracted: recipients and attributes taken from the headers ... ``E`` (end).

Any segment may contain ``p`` pointer records: cleanup(8) leaves placeholders when milters
are configured and, when a milter edits the message, overwrites records with pointers to
the new records appended to the file, which end with a pointer back.  A reader follows
them, so the reading order is not the byte order and the last byte of a valid file need
not belong to ``E``.

What this module promises:

* ``QueueFile.open()`` returns only for a ready (owner mode bits 0700), well-formed regular
  file, opened without following symlinks: ``C`` first, ``T``, ``S`` and ``M`` present,
  the content reaching ``X`` exactly where the ``C`` record says it is, and the extracted
  segment reaching ``E``.  Anything else raises ``QueueFileError`` naming the file, the
  offset and the record type (``QueueFileNotReady`` for a file still being written).
* ``QueueFile.content()`` streams the RFC 822 message byte for byte as
  ``postcat -bh -q ID`` prints it, reading the file in chunks of ``READ_CHUNK`` bytes;
  memory does not grow with the size of the message.
* Pointer loops, pointers outside the file, absurd record lengths and truncation (also
  truncation that happens after the file was opened) raise ``QueueFileError``; reading
  never loops forever.

Record types that this reader does not use are skipped in the envelope and extracted
segments (Postfix adds new ones from time to time), but the structure is enforced:
content records outside the content, or other records inside it, are errors.
"""

from __future__ import annotations

import errno
import io
import os
import stat as stat_mod
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

__all__ = [
    "MAX_POINTER_HOPS",
    "READ_CHUNK",
    "ContentStream",
    "Envelope",
    "QueueFile",
    "QueueFileError",
    "QueueFileNotReady",
]

#: Bytes read from the file at a time (and the size of the chunks the content stream holds).
READ_CHUNK = 64 * 1024
#: Content up to this size is kept by ContentStream for its second read (see there).
REPLAY_LIMIT = 256 * 1024
#: Postfix decodes at most 32 bits of length (record.c), i.e. five length bytes.
MAX_LENGTH_BYTES = 5
#: Take records that lie wholly in the reader's buffer from it directly (most of them).
#: The fuzz tests turn this off to hold it to the record-by-record path.
SHORTCUTS = True
#: Envelope/extracted records are read into memory; none is legitimately this long.
MAX_META_RECORD = 1 << 20
#: Pointer records followed in one pass.  Each milter-inserted header costs two hops and
#: each appended recipient one; 100,000 is far beyond real files and bounds the work.
MAX_POINTER_HOPS = 100_000
#: A pointer's data is ``%15ld``; anything much longer is not a pointer.
MAX_POINTER_DATA = 32

# Mode bits that encode the file's state (mail_queue.h).
_OWNER_BITS = 0o700
_MODE_READY = 0o700
_MODE_EMBRYONIC = 0o600
_MODE_CORRUPT = 0o400

# Record types (rec_type.h).  The same byte can mean different things per segment.
REC_SIZE = "C"
REC_TIME = "T"
REC_CTIME = "c"
REC_FROM = "S"
REC_RCPT = "R"
REC_ORCP = "O"
REC_DONE = "D"
REC_DRCP = "/"
REC_ATTR = "A"
REC_MESG = "M"
REC_NORM = "N"
REC_CONT = "L"  # a long line continued in the next record (content segment only)
REC_DTXT = "w"
REC_PTR = "p"
REC_XTRA = "X"
REC_END = "E"

_QUEUE_NAMES = frozenset(
    {"maildrop", "hold", "incoming", "active", "deferred", "corrupt", "saved"}
)
_NOT_IN_ENVELOPE = frozenset({REC_NORM, REC_XTRA, REC_END})
_NOT_IN_EXTRACTED = frozenset({REC_SIZE, REC_MESG, REC_NORM, REC_XTRA})


class QueueFileError(Exception):
    """The file is not a ready, well-formed Postfix queue file.

    The message says what is wrong and where, e.g.
    ``hold/ABC123: truncated record at offset 812 (type 'N', wants 400 bytes, 37 left)``.
    """


class QueueFileNotReady(QueueFileError):
    """The file is still being written (mode 0600, or another non-ready mode).

    Unlike other ``QueueFileError`` cases this is expected to pass: try again once the
    file's mode has become 0700.
    """


@dataclass(frozen=True)
class Envelope:
    """What Postfix knows about a queued message, apart from its content.

    ``recipients`` are the pending recipients: the ``R`` records, in reading order, from
    the envelope and the extracted segment.  Postfix marks a recipient as finished by
    rewriting its ``R`` record in place as ``D`` (delivered or bounced) or ``/``
    (cancelled, e.g. removed by a milter), and ``O`` records only carry the original
    address of the ``R`` that follows, so the remaining ``R`` records are exactly the
    recipients still to deliver.

    ``attributes`` holds the ``A`` records (``name=value``); for a repeated name the last
    value wins (``dsn_orig_rcpt`` repeats per recipient, so it is not meaningful here).

    ``content_size``, ``data_offset`` and ``nrcpt`` are the first three fields of the ``C``
    record; ``content_size`` is what ``postqueue -j`` reports as ``message_size`` (it
    includes record overhead).  ``message_size`` is the exact number of bytes that
    ``QueueFile.content()`` yields.
    """

    queue_id: str
    arrival_time: float
    sender: str
    recipients: tuple[str, ...]
    content_size: int
    data_offset: int
    nrcpt: int
    message_size: int | None  # None when opened with check_content=False
    attributes: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    create_time: float | None = None

    @property
    def client_address(self) -> str | None:
        """SMTP client IP address as recorded by smtpd (``A client_address``)."""
        return self.attributes.get("client_address")

    @property
    def client_name(self) -> str | None:
        """Verified SMTP client host name (``A client_name``)."""
        return self.attributes.get("client_name")

    @property
    def helo_name(self) -> str | None:
        """HELO/EHLO argument given by the SMTP client (``A helo_name``)."""
        return self.attributes.get("helo_name")

    @property
    def log_client_address(self) -> str | None:
        """Client address as logged, before any XCLIENT/XFORWARD override."""
        return self.attributes.get("log_client_address")


# --------------------------------------------------------------------------- reading


def _type_repr(rtype: str) -> str:
    """Show a record type the way error messages name it: ``'N'`` or ``0x01``."""
    return repr(rtype) if rtype.isprintable() and rtype.isascii() else f"0x{ord(rtype):02x}"


class _Cursor:
    """Positional, buffered reader over one file descriptor.

    Uses ``os.pread`` so several readers (the envelope parser, any number of content
    streams) never disturb each other's position.  ``size`` is the file size the reader
    plans with; if the file shrinks later, short reads are reported as truncation.
    """

    def __init__(self, fd: int, size: int, label: str) -> None:
        self.fd = fd
        self.size = size
        self.label = label
        self.pos = 0
        self._buf = b""
        self._buf_start = 0

    def error(self, text: str) -> QueueFileError:
        return QueueFileError(f"{self.label}: {text}")

    def seek(self, pos: int) -> None:
        self.pos = pos

    def peek(self, n: int) -> bytes:
        """Return up to ``n`` bytes at the current position without advancing (fewer only
        at end of file)."""
        offset = self.pos - self._buf_start
        if offset < 0 or offset + n > len(self._buf):
            self._buf = os.pread(self.fd, max(READ_CHUNK, n), self.pos)
            self._buf_start = self.pos
            offset = 0
        return self._buf[offset : offset + n]

    def read(self, n: int) -> bytes:
        """Return up to ``n`` bytes at the current position (fewer at a buffer edge, ``b""`` at
        end of file) and advance."""
        offset = self.pos - self._buf_start
        if not 0 <= offset < len(self._buf):
            self._buf = os.pread(self.fd, READ_CHUNK, self.pos)
            self._buf_start = self.pos
            offset = 0
        data = self._buf[offset : offset + n]
        self.pos += len(data)
        return data

    def read_exact(self, n: int, header: _Header) -> bytes:
        """Read all ``n`` bytes of a record's data, or raise a truncation error."""
        parts = []
        remaining = n
        while remaining:
            chunk = self.read(remaining)
            if not chunk:
                raise self.truncated(header, n - remaining)
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def truncated(self, header: _Header, got: int) -> QueueFileError:
        left = max(0, min(self.size - header.data_offset, got))
        return self.error(
            f"truncated record at offset {header.offset} "
            f"(type {_type_repr(header.rtype)}, wants {header.length} bytes, {left} left)"
        )


class _Header(NamedTuple):
    """A record header: where the record starts, its type, and where its data lies."""

    offset: int
    rtype: str
    length: int
    data_offset: int

    @property
    def end(self) -> int:
        return self.data_offset + self.length


def _read_header(cur: _Cursor) -> _Header | None:
    """Read the record header at the cursor; ``None`` at a clean end of file.

    Promises that the record's data fits in the file (as far as ``cur.size`` knows), so an
    absurd length is reported here, before anything tries to read or allocate it.
    """
    start = cur.pos
    # Most records (every envelope attribute, most lines) have a one-byte length and
    # a header already in the buffer: read it there.
    buf, offset = cur._buf, start - cur._buf_start
    if SHORTCUTS and 0 <= offset < len(buf) - 1 and buf[offset + 1] < 0x80:
        cur.pos = start + 2
        header = _Header(start, chr(buf[offset]), buf[offset + 1], start + 2)
        if start + 2 + header.length > cur.size:
            raise cur.truncated(header, cur.size - header.data_offset)
        return header
    head = cur.peek(1 + MAX_LENGTH_BYTES)  # type byte + the longest possible length
    if not head:
        return None
    rtype = chr(head[0])
    length = 0
    for index, byte in enumerate(head[1:]):
        length |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            cur.seek(start + index + 2)
            break
    else:
        if len(head) <= MAX_LENGTH_BYTES:
            raise cur.error(
                f"truncated record header at offset {start} "
                f"(type {_type_repr(rtype)}, file ends inside the length)"
            )
        raise cur.error(
            f"bad record length at offset {start} (type {_type_repr(rtype)}, "
            f"more than {MAX_LENGTH_BYTES} length bytes)"
        )
    header = _Header(start, rtype, length, cur.pos)
    if header.end > cur.size:
        raise cur.truncated(header, cur.size - header.data_offset)
    return header


def _read_meta(cur: _Cursor, header: _Header) -> bytes:
    """Read the data of an envelope/extracted record, which must be reasonably small."""
    if header.length > MAX_META_RECORD:
        raise cur.error(
            f"record too long at offset {header.offset} "
            f"(type {_type_repr(header.rtype)}, {header.length} bytes)"
        )
    start, length = header.data_offset, header.length
    offset = start - cur._buf_start
    if SHORTCUTS and offset >= 0 and offset + length <= len(cur._buf):  # already read
        cur.pos = start + length
        return cur._buf[offset:offset + length]
    cur.seek(start)
    return cur.read_exact(length, header)


class _Pointers:
    """Follows ``p`` records for one reading pass and refuses loops.

    Reading is deterministic given the position, so jumping to a target visited before in
    the same pass means the reader would go round forever; between jumps the position
    only grows, so with a bounded number of hops every pass ends.
    """

    def __init__(self) -> None:
        self._visited: set[int] = set()

    def follow(self, cur: _Cursor, header: _Header) -> None:
        """Move the cursor to the pointer's target (or past it, for a placeholder)."""
        if header.length > MAX_POINTER_DATA:
            raise cur.error(f"malformed pointer record at offset {header.offset} (too long)")
        text = _read_meta(cur, header).strip()
        if not text.isdigit():
            raise cur.error(f"malformed pointer record at offset {header.offset}: {text!r}")
        target = int(text)
        if target == 0:
            # Placeholder left for a milter that made no change: read on.
            return
        if target >= cur.size:
            raise cur.error(
                f"pointer at offset {header.offset} points past end of file "
                f"(target {target}, file size {cur.size})"
            )
        if target in self._visited:
            raise cur.error(
                f"pointer loop at offset {header.offset} (target {target} already visited)"
            )
        if len(self._visited) >= MAX_POINTER_HOPS:
            raise cur.error(
                f"too many pointer records (more than {MAX_POINTER_HOPS}) "
                f"at offset {header.offset}"
            )
        self._visited.add(target)
        cur.seek(target)


# --------------------------------------------------------------------------- envelope


@dataclass
class _EnvelopeParts:
    """Mutable accumulator for the envelope and extracted segments."""

    content_size: int = 0
    data_offset: int = 0
    nrcpt: int = 0
    arrival_time: float | None = None
    create_time: float | None = None
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    content_start: int | None = None


def _text(data: bytes) -> str:
    # Addresses may be UTF-8 (SMTPUTF8) or arbitrary 8-bit bytes; keep them lossless.
    return data.decode("utf-8", "surrogateescape")


#: Digits in a numeric field.  Postfix writes ``%15ld``; 19 digits hold any 63-bit value.
MAX_DIGITS = 19
#: The largest time a queue file may carry (9999-12-31), so that it converts to a date.
MAX_TIME = 253_402_300_799


def _ints(data: bytes) -> list[int] | None:
    """The whitespace-separated decimal fields of ``data``; None unless every field is
    1 to ``MAX_DIGITS`` ASCII digits (so conversion cannot fail or take long)."""
    fields = data.split()
    if not fields or len(fields) > 16:
        return None
    if not all(0 < len(f) <= MAX_DIGITS and f.isdigit() for f in fields):
        return None
    return [int(f) for f in fields]


def _parse_size(cur: _Cursor, header: _Header, parts: _EnvelopeParts) -> None:
    """``C``: ``%15ld`` fields; Postfix >= 2.4 writes 5, >= 3.0 writes 6.  Only the first
    three (content size, data offset, recipient count) are used, so fewer or more fields
    are accepted as long as those are there."""
    values = _ints(_read_meta(cur, header))
    if values is None or len(values) < 3:
        raise cur.error(f"malformed size record (type 'C') at offset {header.offset}")
    content_size, data_offset, nrcpt = values[:3]
    if data_offset <= 0 or data_offset + content_size > cur.size:
        raise cur.error(
            f"size record at offset {header.offset} places the content outside the file "
            f"(data offset {data_offset}, content size {content_size}, file size {cur.size})"
        )
    parts.content_size, parts.data_offset, parts.nrcpt = content_size, data_offset, nrcpt


def _parse_time(cur: _Cursor, header: _Header) -> float:
    """``T``/``c``: ``"%ld %ld"`` (seconds, microseconds); old files have seconds only."""
    values = _ints(_read_meta(cur, header))
    if (values is None or len(values) > 2 or values[0] > MAX_TIME
            or (len(values) == 2 and values[1] >= 1_000_000)):
        raise cur.error(
            f"malformed time record (type {_type_repr(header.rtype)}) at offset {header.offset}"
        )
    seconds, usec = (values + [0])[:2]
    return seconds + usec / 1_000_000


def _parse_attr(cur: _Cursor, header: _Header, parts: _EnvelopeParts) -> None:
    """``A``: ``name=value``.  Malformed ones are ignored, as qmgr(8) does."""
    name, sep, value = _text(_read_meta(cur, header)).partition("=")
    name = name.strip()
    if not sep or not name:
        return
    value = value.strip()
    parts.attributes[name] = value
    if name == "create_time":
        seconds = _ints(value.encode("utf-8", "surrogateescape"))
        if seconds is not None and len(seconds) == 1 and seconds[0] <= MAX_TIME:
            parts.create_time = float(seconds[0])


def _apply_meta_record(cur: _Cursor, header: _Header, parts: _EnvelopeParts) -> None:
    """Take what the envelope needs from a record of the envelope or extracted segment."""
    rtype = header.rtype
    if rtype == REC_TIME:
        if parts.arrival_time is None:  # the first one wins, as in qmgr(8)
            parts.arrival_time = _parse_time(cur, header)
    elif rtype == REC_CTIME:
        if parts.create_time is None:
            parts.create_time = _parse_time(cur, header)
    elif rtype == REC_FROM:
        if parts.sender is None:
            parts.sender = _text(_read_meta(cur, header))
    elif rtype == REC_RCPT:
        parts.recipients.append(_text(_read_meta(cur, header)))
    elif rtype == REC_ATTR:
        _parse_attr(cur, header, parts)
    # O, D, /, F, W, K, ... carry nothing the envelope reports: skipped.


def _read_envelope_segment(cur: _Cursor, parts: _EnvelopeParts) -> None:
    """Read from offset 0 to the ``M`` record, following pointers."""
    cur.seek(0)
    first = _read_header(cur)
    if first is None:
        raise cur.error("empty file")
    if first.rtype != REC_SIZE:
        raise cur.error(
            f"not a queue file: first record is type {_type_repr(first.rtype)}, "
            "not the size record 'C'"
        )
    _parse_size(cur, first, parts)
    cur.seek(first.end)
    pointers = _Pointers()
    while True:
        header = _read_header(cur)
        if header is None:
            raise cur.error(
                f"file ends at offset {cur.pos} inside the envelope (no 'M' record): "
                "incomplete or corrupt"
            )
        rtype = header.rtype
        if rtype == REC_MESG:
            parts.content_start = header.end
            return
        if rtype == REC_PTR:
            pointers.follow(cur, header)
            continue
        if rtype == REC_SIZE:
            raise cur.error(f"second size record (type 'C') at offset {header.offset}")
        if rtype in _NOT_IN_ENVELOPE:
            raise cur.error(
                f"unexpected record type {_type_repr(rtype)} at offset {header.offset} "
                "in the envelope (before 'M')"
            )
        _apply_meta_record(cur, header, parts)
        cur.seek(header.end)


def _read_extracted_segment(cur: _Cursor, parts: _EnvelopeParts, xtra_offset: int) -> None:
    """Read from the ``X`` record (where ``C`` says it is) to ``E``, following pointers."""
    cur.seek(xtra_offset)
    marker = _read_header(cur)
    if marker is None or marker.rtype != REC_XTRA:
        found = "end of file" if marker is None else f"type {_type_repr(marker.rtype)}"
        raise cur.error(
            f"expected the extracted-segment record 'X' at offset {xtra_offset} "
            f"(data offset + content size from 'C'), found {found}"
        )
    cur.seek(marker.end)
    pointers = _Pointers()
    while True:
        header = _read_header(cur)
        if header is None:
            raise cur.error(
                f"no end record 'E' (file ends at offset {cur.pos}): incomplete or corrupt"
            )
        rtype = header.rtype
        if rtype == REC_END:
            return  # like Postfix, ignore whatever follows E
        if rtype == REC_PTR:
            pointers.follow(cur, header)
            continue
        if rtype in _NOT_IN_EXTRACTED:
            raise cur.error(
                f"unexpected record type {_type_repr(rtype)} at offset {header.offset} "
                "in the extracted segment (after 'X')"
            )
        _apply_meta_record(cur, header, parts)
        cur.seek(header.end)


# --------------------------------------------------------------------------- content


def _next_text_record(cur: _Cursor, pointers: _Pointers, xtra_offset: int) -> _Header | None:
    """The next ``N``/``L`` record of the content (cursor left at its header's end), or
    None at the ``X`` record.  Skips ``w`` padding, follows ``p`` pointers, and raises
    ``QueueFileError`` for truncation or a record that has no place in the content."""
    while True:
        header = _read_header(cur)
        if header is None:
            raise cur.error(
                f"message content ends at offset {cur.pos} without the 'X' record: "
                "file truncated"
            )
        rtype = header.rtype
        if rtype in (REC_NORM, REC_CONT):
            return header
        if rtype == REC_DTXT:
            cur.seek(header.end)
        elif rtype == REC_PTR:
            pointers.follow(cur, header)
        elif rtype == REC_XTRA:
            if header.offset != xtra_offset:
                raise cur.error(
                    f"message content ends with 'X' at offset {header.offset}, but the size "
                    f"record says {xtra_offset}"
                )
            return None
        else:
            raise cur.error(
                f"unexpected record type {_type_repr(rtype)} at offset {header.offset} "
                "in the message content"
            )


def _content_pieces(cur: _Cursor, data_offset: int, xtra_offset: int) -> Iterator[_Piece]:
    """Yield the pieces of the message content in reading order.

    Mirrors ``postcat -bh``: an ``N`` record is its data plus ``\\n``; an ``L`` record is
    its data alone (the line continues in the next text record).  ``w`` records are
    skipped and ``p`` records followed.  The caller may move the cursor between pieces.

    If the last text record before ``X`` is an ``L`` (a message ending without a newline,
    e.g. after a milter replaced the body), postcat's code writes a ``\\n`` at ``X`` but
    exits without flushing it under ``-bh``, so its output ends without one; we produce
    that observable output.
    """
    cur.seek(data_offset)
    pointers = _Pointers()
    while (header := _next_text_record(cur, pointers, xtra_offset)) is not None:
        yield _Piece(header, b"\n" if header.rtype == REC_NORM else b"")
        cur.seek(header.end)


class _Piece(NamedTuple):
    """One text record's data (``header``) followed by ``suffix``."""

    header: _Header
    suffix: bytes

    @property
    def size(self) -> int:
        return self.header.length + len(self.suffix)


_N, _L = ord(REC_NORM), ord(REC_CONT)


def _content_chunks(
    cur: _Cursor, data_offset: int, xtra_offset: int
) -> Generator[bytes, None, None]:
    """Yield the message content (as ``_content_pieces`` defines it) in chunks of about
    ``READ_CHUNK`` bytes.

    Short lines are coalesced so a chunk is not one line; long records are split, so no
    chunk grows with the message.  Runs of ``N``/``L`` records that lie wholly in the
    cursor's buffer are decoded in a tight loop (most of a message); anything else — a
    record crossing the buffer edge, padding, pointers, ``X``, errors — takes the general
    path one record at a time.
    """
    out = bytearray()
    cur.seek(data_offset)
    pointers = _Pointers()
    while True:
        # Fast path: whole N/L records inside the buffer.
        buf, base = cur._buf, cur._buf_start
        i, n = cur.pos - base, len(buf)
        limit = min(n, cur.size - base)  # never trust bytes past the planned size
        if SHORTCUTS and i >= 0:
            while i + 1 < limit:
                rtype = buf[i]
                if rtype != _N and rtype != _L:
                    break
                length = buf[i + 1]
                if length < 0x80:  # one length byte: most lines
                    j = i + 2
                else:
                    j, length, shift = i + 1, 0, 0
                    while j < limit and shift < 7 * MAX_LENGTH_BYTES:
                        byte = buf[j]
                        j += 1
                        length |= (byte & 0x7F) << shift
                        shift += 7
                        if not byte & 0x80:
                            break
                    else:
                        break  # the length runs past the buffer: general path
                end = j + length
                if end > limit:
                    break  # the data runs past the buffer: general path
                out += buf[j:end]
                if rtype == _N:
                    out += b"\n"
                i = end
                if len(out) >= READ_CHUNK:
                    cur.pos = base + i
                    yield bytes(out)
                    out.clear()
            cur.pos = base + i
        # General path: one record.
        header = _next_text_record(cur, pointers, xtra_offset)
        if header is None:
            if out:
                yield bytes(out)
            return
        cur.seek(header.data_offset)
        remaining = header.length
        while remaining:
            data = cur.read(remaining)
            if not data:
                # The size was checked when the header was read, so the file shrank.
                raise cur.truncated(header, header.length - remaining)
            out += data
            remaining -= len(data)
            if len(out) >= READ_CHUNK:
                yield bytes(out)
                out.clear()
        if header.rtype == REC_NORM:
            out += b"\n"
        cur.seek(header.end)
        if len(out) >= READ_CHUNK:
            yield bytes(out)
            out.clear()


class ContentStream(io.RawIOBase):
    """A readable binary stream of a queue file's message content.

    It can be rewound (``seek(0)``), so that the content can be hashed and then sent to
    clamd; other seeks are not supported.  Content of up to ``REPLAY_LIMIT`` bytes read
    to its end is kept, so that the second read replays it instead of decoding the
    records again (most mail: the decoding is the costly part); larger content is
    decoded again from the file, so memory stays bounded.
    Owns its own file descriptor (a duplicate), so it stays valid after the ``QueueFile``
    is closed.  Once a read has raised ``QueueFileError`` every later read raises it too.
    """

    def __init__(self, fd: int, size: int, label: str, data_offset: int, xtra_offset: int):
        super().__init__()
        self._fd = fd
        self._label = label
        self._offsets = (data_offset, xtra_offset)
        self._chunks: Iterator[bytes] = _content_chunks(_Cursor(fd, size, label), data_offset,
                                                        xtra_offset)
        self._pending = memoryview(b"")
        self._error: QueueFileError | None = None
        self._position = 0
        # The chunks read so far (None: more than REPLAY_LIMIT, or not from the start);
        # complete once the end was reached.
        self._replay: list[bytes] | None = []
        self._replay_size = 0
        self._replay_complete = False
        self._replaying = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Rewind to the start (``seek(0)``), or report the position (``seek(0, 1)``)."""
        if whence == io.SEEK_CUR and offset == 0:
            return self._position
        if whence != io.SEEK_SET or offset != 0:
            raise io.UnsupportedOperation("a queue file content stream can only be rewound")
        if self.closed:
            raise ValueError("seek on a closed content stream")
        if isinstance(self._chunks, Generator):
            self._chunks.close()
        if self._replay is not None and self._replay_complete:
            self._chunks = iter(self._replay)
            self._replaying = True
        else:
            size = os.fstat(self._fd).st_size
            self._chunks = _content_chunks(_Cursor(self._fd, size, self._label),
                                           *self._offsets)
            self._replay, self._replay_size, self._replaying = [], 0, False
        self._pending = memoryview(b"")
        self._error = None
        self._position = 0
        return 0

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` with the next bytes; 0 means the end of the message."""
        if self.closed:
            raise ValueError("read from a closed content stream")
        if self._error is not None:
            raise self._error
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                if self._replay is not None:
                    self._replay_complete = True
                return 0
            except QueueFileError as exc:
                self._error = exc
                raise
            except (ValueError, OverflowError, IndexError, RecursionError) as exc:
                self._error = QueueFileError(f"{self._label}: unreadable content "
                                             f"({exc.__class__.__name__})")
                raise self._error from None
            self._pending = memoryview(chunk)
            if self._replay is not None and not self._replaying:
                self._replay_size += len(chunk)
                if self._replay_size > REPLAY_LIMIT:
                    self._replay = None
                else:
                    self._replay.append(chunk)
        target = memoryview(buffer).cast("B")
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        self._position += count
        return count

    def close(self) -> None:
        if not self.closed:
            if isinstance(self._chunks, Generator):
                self._chunks.close()
            self._replay = None
            os.close(self._fd)
        super().close()


# --------------------------------------------------------------------------- the file


def _display_name(path: str) -> str:
    """Name a file in messages the way Postfix does: ``hold/ABC123``, ``hold/7/ABC123``;
    the full path when it is not inside a queue directory.  (Plain string work: a
    ``Path`` per held message was 3% of the worker's time in the hold-queue burst.)"""
    parts = [part for part in path.split("/") if part and part != "."]
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] in _QUEUE_NAMES:
            return "/".join(parts[index:])
    return path


def _check_file(st: os.stat_result, label: str) -> None:
    """Accept only a regular file whose mode says Postfix has finished writing it."""
    if not stat_mod.S_ISREG(st.st_mode):
        kind = "a directory" if stat_mod.S_ISDIR(st.st_mode) else "not a regular file"
        raise QueueFileError(f"{label}: {kind} (mode {stat_mod.filemode(st.st_mode)})")
    owner = st.st_mode & _OWNER_BITS
    if owner == _MODE_READY:
        return
    mode = f"mode {stat_mod.S_IMODE(st.st_mode):04o}"
    if owner == _MODE_CORRUPT:
        raise QueueFileError(f"{label}: marked corrupt by Postfix ({mode})")
    if owner == _MODE_EMBRYONIC:
        raise QueueFileNotReady(f"{label}: embryonic (still being written, {mode})")
    raise QueueFileNotReady(f"{label}: not ready ({mode}; ready files have owner bits 0700)")


def _parse(fd: int, size: int, label: str, queue_id: str, check_content: bool = True
           ) -> Envelope:
    """Read and validate the file structure; see the module docstring.  Without
    ``check_content`` the content records are not walked (they are checked as they are
    read) and ``message_size`` is None."""
    cur = _Cursor(fd, size, label)
    parts = _EnvelopeParts()
    _read_envelope_segment(cur, parts)
    if parts.content_start != parts.data_offset:
        raise cur.error(
            f"size record says the content starts at offset {parts.data_offset}, "
            f"but the 'M' record ends at {parts.content_start}"
        )
    if parts.arrival_time is None:
        raise cur.error("no arrival time record 'T'")
    if parts.sender is None:
        raise cur.error("no sender record 'S'")
    xtra_offset = parts.data_offset + parts.content_size
    # A header-only pass: checks that the content is complete and measures it without
    # reading the text itself.
    message_size = (sum(p.size for p in _content_pieces(cur, parts.data_offset, xtra_offset))
                    if check_content else None)
    _read_extracted_segment(cur, parts, xtra_offset)
    return Envelope(
        queue_id=queue_id,
        arrival_time=parts.arrival_time,
        sender=parts.sender,
        recipients=tuple(parts.recipients),
        content_size=parts.content_size,
        data_offset=parts.data_offset,
        nrcpt=parts.nrcpt,
        message_size=message_size,
        attributes=MappingProxyType(dict(parts.attributes)),
        create_time=parts.create_time,
    )


class QueueFile:
    """An open, validated Postfix queue file.  Use ``QueueFile.open(path)``.

    The file descriptor stays open until ``close()`` (or the end of a ``with`` block), so
    the content can still be read after postsuper renamed or deleted the file.
    """

    def __init__(self, fd: int, st: os.stat_result, envelope: Envelope, label: str) -> None:
        self.stat = st
        self.envelope = envelope
        self._fd: int | None = fd
        self._label = label

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, check_content: bool = True) -> QueueFile:
        """Open and validate a queue file.

        ``check_content=False`` skips the walk over the content records (the envelope and
        the extracted segment are still checked): faster, for callers that stream the
        content anyway, which raises ``QueueFileError`` on a bad record as it reads.

        Raises ``QueueFileNotReady`` for a file still being written, ``QueueFileError`` for
        anything that is not a ready, well-formed queue file (symlink, directory, FIFO,
        corrupt mode, bad structure), and ``OSError`` (e.g. ``FileNotFoundError``) when
        the path cannot be opened at all.
        """
        path = os.fspath(path)
        label = _display_name(path)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # no FIFO hang
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise QueueFileError(f"{label}: is a symbolic link (not followed)") from exc
            raise
        return cls.from_fd(fd, path, check_content=check_content)

    @classmethod
    def from_fd(cls, fd: int, path: str | os.PathLike[str], *, check_content: bool = True,
                envelope: Envelope | None = None) -> QueueFile:
        """Validate the queue file open at ``fd`` (which this object then owns and
        closes, also on error).  ``path`` names it in messages and gives the queue ID.

        ``envelope``: the envelope read earlier from this same file (same inode: Postfix
        does not rewrite held files), so that it is not parsed again.
        """
        path = os.fspath(path)
        label = _display_name(path)
        try:
            st = os.fstat(fd)
            _check_file(st, label)
            if envelope is None:
                queue_id = os.path.basename(path.rstrip("/"))
                envelope = _parse(fd, st.st_size, label, queue_id, check_content)
        except (ValueError, OverflowError, IndexError, RecursionError) as exc:
            # A reader bug on some hostile file must still be this file's error only.
            os.close(fd)
            raise QueueFileError(f"{label}: unreadable ({exc.__class__.__name__}: "
                                 f"{str(exc)[:200]})") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, st, envelope, label)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    @property
    def closed(self) -> bool:
        return self._fd is None

    def content(self) -> ContentStream:
        """Return a new stream of the RFC 822 content (``postcat -bh`` output).

        Each call starts from the beginning; streams are independent of each other and of
        this object's lifetime.
        """
        if self._fd is None:
            raise ValueError(f"{self._label}: queue file is closed")
        fd = os.dup(self._fd)
        try:
            size = os.fstat(fd).st_size
            xtra_offset = self.envelope.data_offset + self.envelope.content_size
            return ContentStream(fd, size, self._label, self.envelope.data_offset, xtra_offset)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> QueueFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<QueueFile {self._label} {state}>"
