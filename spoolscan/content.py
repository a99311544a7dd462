"""Content identity: the hash under which a scan result may be reused.

Copies of one message delivered to several mailboxes differ only in the trace headers the
delivery agent prepends for each recipient (Postfix local/virtual and Dovecot add
``Return-Path``, ``Delivered-To``, ``X-Original-To`` at the top).  The content hash leaves
out exactly those, and only where they are safe to leave out:

* only in the *leading run* of header fields (the fields the delivery agent prepended,
  before the first other field), never further down or in the body;
* only these three names;
* only when the field value is a single address (``<user@example.org>``, ``<>``,
  ``user@example.org``): arbitrary text that a signature could match is always hashed.

One more field is hashed in part: the ``Received:`` field Postfix adds when it takes the
message in (the first field after those trace fields, in a held queue file and in the copies
delivered from it), when it has exactly Postfix's form (field name, spacing, folding and
date as Postfix writes them).  What the sender controls is hashed: the ``from`` part (the
client's HELO name, reverse name, address, TLS details) and the ``for <address>`` part
(an address extension can carry any text).  What this host wrote is not: ``by <host>
(Postfix)``, ``with <protocol>``, ``id <queue ID>`` and the date, each from a strict
character set.  So the same mail taking two MX hosts (or two transactions) to the same
recipient has one hash, and one scan serves it on every host.

Everything else (every other header, every MIME header, the body) is hashed, so any change
that could change what clamd finds changes the hash.  The size returned is the size of the
whole content.

The same read also yields the ``Subject``, ``Message-ID`` and ``From`` of the message
(``Headers``), taken from the head that is read anyway: reports show them, and reading
the content a second time for them would cost as much as the hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from email.header import decode_header, make_header
from typing import BinaryIO, Final, NamedTuple

#: The header a message re-injected for a release from quarantine carries (its ticket).
RELEASE_HEADER: Final = "X-Spoolscan-Release"
RELEASE_TOKEN: Final = re.compile(r"[0-9a-f]{32}")
_TRACE_NAMES: Final = frozenset({b"return-path", b"delivered-to", b"x-original-to"})
# A single address: optional angle brackets, no spaces, at most 320 octets (RFC 5321 limits).
_ADDRESS_VALUE: Final = re.compile(rb"[ \t]*(<[^<>\s]{0,320}>|[^<>\s@]{1,64}@[^<>\s@]{1,255})"
                                   rb"[ \t]*\r?\n")
# Postfix's own Received: field, unfolded (see the module docstring).  The parts left out
# of the hash admit only what Postfix writes there: letters, digits and a few separators,
# never text a signature could match in a way that matters.
_DAY: Final = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH: Final = rb"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_OWN_RECEIVED: Final = re.compile(
    rb"(?:(?P<from>from [^;]*?) )?by [A-Za-z0-9.-]{1,255} \(Postfix(?:, from userid \d{1,10})?\)"
    rb"(?: with [A-Za-z0-9]{1,16})? id [0-9A-Za-z]{6,32}(?P<for> for <[^<>\s]{0,320}>)?; "
    + _DAY + rb", [ 0-3]?\d " + _MONTH + rb" \d{4} \d\d:\d\d:\d\d [+-]\d{4}"
    rb"(?: \([A-Za-z0-9+-]{1,8}\))?")
# Postfix folds with a tab (or a space) after the line end; nothing else is unfolded.
_FOLD: Final = re.compile(rb"\r?\n[ \t]")
_HEAD_LIMIT: Final = 64 * 1024  # trace headers are short; stop looking after this much
CHUNK: Final = 256 * 1024
HEADER_VALUE_LIMIT: Final = 1000  # characters kept of each header value (after decoding)
_WANTED: Final = {b"subject": "subject", b"message-id": "message_id", b"from": "header_from",
                   RELEASE_HEADER.lower().encode(): "release_token"}
_LINE_END: Final = re.compile(rb"\r?\n")
# A wanted field: its name at the start of a line, blanks, a colon; its value, with the
# lines after it that start with a blank (folded).
_WANTED_FIELD: Final = re.compile(
    rb"^(" + b"|".join(re.escape(name) for name in _WANTED) + rb")[ \t]*:"
    rb"([^\n]*(?:\n[ \t][^\n]*)*)", re.IGNORECASE | re.MULTILINE)
_HEADER_END: Final = re.compile(rb"\n\r?\n")


@dataclass(frozen=True)
class Headers:
    """Header values of a message, as text: RFC 2047 encoded-words decoded where that
    works, folded lines unfolded, at most ``HEADER_VALUE_LIMIT`` characters.  Bytes that
    are not UTF-8 are kept as lone surrogates (``surrogateescape``), as every text from
    mail is inside spoolscan (see ``spoolscan.text``).  None: the field is not there
    (within the first 64 KiB)."""

    subject: str | None = None
    message_id: str | None = None
    header_from: str | None = None
    # ``X-Spoolscan-Release``: the ticket of a release from quarantine (see
    # spoolscan.quarantine.release); only its well-formed value is kept.
    release_token: str | None = None


class Digest(NamedTuple):
    """What one read of a message's content gives: its hash, its size, a few headers."""

    sha256: str
    size: int
    headers: Headers


def _strip_leading_trace_headers(head: bytes) -> int:
    """Return how many leading bytes of ``head`` are removable trace header fields."""
    pos = 0
    while True:
        colon = head.find(b":", pos, pos + 64)
        if colon < 0:
            return pos
        name = head[pos:colon].lower()
        if name not in _TRACE_NAMES:
            return pos
        m = _ADDRESS_VALUE.match(head, colon + 1)
        if not m:
            return pos
        end = m.end()
        if end < len(head) and head[end:end + 1] in (b" ", b"\t"):
            return pos  # folded value: not a single address, keep it in the hash
        pos = end


def _own_received(head: bytes, pos: int) -> tuple[int, bytes] | None:
    """If the field at ``pos`` is Postfix's own ``Received:``: where it ends, and what of
    it is hashed (its ``from`` and ``for`` parts, under a tag of their own)."""
    if head[pos:pos + 10] != b"Received: ":  # exactly as Postfix writes the name
        return None
    end = pos
    while True:  # the field: its line and the folded lines after it
        nl = head.find(b"\n", end)
        if nl < 0:
            return None
        end = nl + 1
        if head[end:end + 1] not in (b" ", b"\t"):
            break
    line = head[pos + 10:end]
    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    m = _OWN_RECEIVED.fullmatch(_FOLD.sub(b" ", line))
    if m is None:
        return None
    # NUL and the tag make the hashed form differ from any field of a message as sent.
    return end, (b"\0own-received\0" + (m.group("from") or b"") + b"\0"
                 + (m.group("for") or b"") + b"\0")


def decode_value(raw: bytes) -> str:
    """A header value (unfolded bytes) as text; never raises.

    RFC 2047 encoded-words are decoded with the standard library when the value is
    ASCII as RFC 2047 wants; when that fails (unknown charset, broken encoding) or the
    value carries raw 8-bit bytes, or the decoding is empty, the raw value is kept as
    it is (undecodable bytes as lone surrogates): nothing is lost, nothing is guessed.
    """
    text = raw.decode("utf-8", "surrogateescape").strip(" \t")
    if "=?" in text and text.isascii():
        # Any decoding problem: the raw value is still the truth.  So it is when the
        # decoder turns garbage into nothing (base64 with no valid character).
        with contextlib.suppress(Exception):
            text = str(make_header(decode_header(text))) or text
    return text[:HEADER_VALUE_LIMIT]


def parse_headers(head: bytes) -> Headers:
    """The first ``Subject``, ``Message-ID`` and ``From`` fields of the header section at
    the start of ``head`` (up to the first empty line, or all of ``head``).  Never raises:
    lines that are not fields are skipped.

    A field is a line (lines end at LF or CRLF) whose name, before its first colon and
    any blanks, is a wanted one; its value runs on over the lines after it that start
    with a blank (unfolded: line breaks dropped, blanks kept).  The wanted fields are
    found by one regular expression, not line by line in Python: this runs for every
    message, also for every copy answered from the cache."""
    end = _HEADER_END.search(head)
    section = head[:end.start()].rstrip(b"\r") if end else head
    if section[:1] == b"\n" or section[:2] == b"\r\n":
        return Headers()  # an empty first line: no header section at all
    found: dict[str, bytes] = {}
    for m in _WANTED_FIELD.finditer(section):
        key = _WANTED[m.group(1).lower()]
        if key in found:
            continue
        value = m.group(2)
        if m.end() < len(section) and value.endswith(b"\r"):
            value = value[:-1]  # the CR of the CRLF that ends the field
        found[key] = _LINE_END.sub(b"", value)
        if len(found) == len(_WANTED):
            break
    values = {key: decode_value(raw) for key, raw in found.items()}
    token = values.pop("release_token", None)
    if token is not None and RELEASE_TOKEN.fullmatch(token):
        values["release_token"] = token
    return Headers(**values)


def _read_head(stream: BinaryIO) -> bytes:
    # The head is read whole (streams may return less than asked: a queue file's content
    # stream gives one record at a time), else what is left out of the hash would depend
    # on how the content happened to be read, and copies would not share a hash.
    parts: list[bytes] = []
    wanted = _HEAD_LIMIT
    while wanted > 0 and (part := stream.read(wanted)):
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)


def read_headers(stream: BinaryIO) -> Headers:
    """The ``Headers`` of the content read from ``stream`` (its first 64 KiB only): for
    mail that is not hashed because it is too large to scan."""
    return parse_headers(_read_head(stream))


def content_hash(stream: BinaryIO, max_size: int | None = None) -> Digest:
    """SHA-256 (hex) of the content read from ``stream``, its full size in bytes, and
    the headers of ``Headers`` parsed from its first 64 KiB.

    Reads in chunks; memory does not grow with the size of the message.  With
    ``max_size``, reading stops once more than ``max_size`` bytes were read (a file its
    owner keeps appending to is not read forever): a size above ``max_size`` means the
    digest is of a prefix only.
    """
    digest = hashlib.sha256()
    head = _read_head(stream)
    size = len(head)
    start = _strip_leading_trace_headers(head)
    own = _own_received(head, start)
    if own is not None:
        digest.update(own[1])
        start = own[0]
    digest.update(memoryview(head)[start:])
    while (max_size is None or size <= max_size) and (chunk := stream.read(CHUNK)):
        size += len(chunk)
        digest.update(chunk)
    return Digest(digest.hexdigest(), size, parse_headers(head))
