"""Mail addresses as reports group them: the domain of an envelope address, the address
inside a ``From`` header.  Never raise: addresses come from mail."""

from __future__ import annotations

import re
from email.utils import parseaddr
from functools import lru_cache

# The address in angle brackets at the end of a From value: what is left when the
# display name (decoded from RFC 2047, so it may hold any character) confuses parseaddr.
_LAST_ANGLE = re.compile(r"<([^<>\s]+@[^<>\s]+)>\s*$")


def domain_of(address: str | None) -> str | None:
    """The domain of ``address`` (after the last ``@``), lower-cased, without a trailing
    dot; None when there is none (the null sender ``<>``, a bare local part, a path)."""
    if not address or "@" not in address:
        return None
    domain = address.rpartition("@")[2].strip().lower().rstrip(".")
    return domain or None


def header_address(value: str | None) -> str | None:
    """The address of a ``From`` header value (``Name <user@example.org>`` →
    ``user@example.org``); None if none can be found."""
    if not value:
        return None
    if len(value) <= 256:  # the same senders come again and again; parseaddr is slow
        return _cached_header_address(value)
    return _header_address(value)


def _header_address(value: str) -> str | None:
    try:
        address = parseaddr(value)[1]
    except Exception:  # the parser of a hostile header: not worth failing a message for
        address = ""
    if not address or "@" not in address:
        m = _LAST_ANGLE.search(value)
        address = m.group(1) if m else address
    return address or None


# Short values only: the cache holds at most 1,024 x 256 characters.
_cached_header_address = lru_cache(maxsize=1024)(_header_address)


def sender_domain(sender: str | None, header_from: str | None) -> str | None:
    """The sending domain: of the envelope sender when there is one, else of the
    ``From`` header (delivered mail has no envelope left)."""
    return domain_of(sender) if sender else domain_of(header_address(header_from))
