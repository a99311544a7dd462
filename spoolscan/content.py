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

Everything else (every other header, every MIME header, the body) is hashed, so any change
that could change what clamd finds changes the hash.  The size returned is the size of the
whole content.
"""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO, Final

_TRACE_NAMES: Final = frozenset({b"return-path", b"delivered-to", b"x-original-to"})
# A single address: optional angle brackets, no spaces, at most 320 octets (RFC 5321 limits).
_ADDRESS_VALUE: Final = re.compile(rb"[ \t]*(<[^<>\s]{0,320}>|[^<>\s@]{1,64}@[^<>\s@]{1,255})"
                                   rb"[ \t]*\r?\n")
_HEAD_LIMIT: Final = 64 * 1024  # trace headers are short; stop looking after this much
CHUNK: Final = 256 * 1024


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


def content_hash(stream: BinaryIO) -> tuple[str, int]:
    """SHA-256 (hex) of the content read from ``stream``, and its full size in bytes.

    Reads in chunks; memory does not grow with the size of the message.
    """
    digest = hashlib.sha256()
    # The head is read whole (streams may return less than asked: a queue file's content
    # stream gives one record at a time), else what is left out would depend on how the
    # content happened to be read, and copies would not share a hash.
    parts: list[bytes] = []
    wanted = _HEAD_LIMIT
    while wanted > 0 and (part := stream.read(wanted)):
        parts.append(part)
        wanted -= len(part)
    head = b"".join(parts)
    size = len(head)
    digest.update(memoryview(head)[_strip_leading_trace_headers(head):])
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        digest.update(chunk)
    return digest.hexdigest(), size
