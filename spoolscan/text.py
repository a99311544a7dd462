"""Text from mail and from users' file names: lossless, and never fatal.

Envelope addresses, headers and file names are bytes that need not be valid UTF-8
(``MAIL FROM:<\\xfe\\xfe@...>`` with SMTPUTF8 off, a file named ``\\xff\\xfe`` in a
Maildir).  Inside spoolscan they are ``str`` with each such byte kept as a lone surrogate
(Python's ``surrogateescape``), so ``os.fsencode`` gives back the exact bytes wherever a
name is used as a name.  They cannot be written as they are into SQLite or PostgreSQL
(which want valid UTF-8, and PostgreSQL no NUL), nor shown raw in a log or on a terminal.

**The rule** (one for everything stored or shown):

* valid UTF-8 stays as it is;
* each byte that is not part of valid UTF-8 becomes ``\\xHH`` (two lower-case hex digits);
* NUL becomes ``\\x00``;
* a backslash becomes ``\\\\``, so that the rule can be reversed (``unescape``).

``printable()`` applies the same rule and also writes control characters (newline, tab,
escape, DEL, the C1 controls...) as ``\\n``, ``\\t``, ``\\x1b``, ``\\u0085``..., so that no
byte from mail can start a new log line, forge one, or drive a terminal.
"""

from __future__ import annotations

import re
from typing import Final, overload

_NEEDS_ESCAPE: Final = re.compile(r"[\\\x00\udc80-\udcff]")
_ESCAPED: Final = re.compile(r"\\(\\|x[0-9a-f]{2})")
_CONTROLS: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch == "\\":
        return "\\\\"
    if ch == "\x00":
        return "\\x00"
    return f"\\x{ord(ch) - 0xDC00:02x}"


@overload
def escape(text: str) -> str: ...
@overload
def escape(text: None) -> None: ...
def escape(text: str | None) -> str | None:
    """``text`` as stored: valid UTF-8, no NUL, reversible (see the module docstring)."""
    if text is None or not _NEEDS_ESCAPE.search(text):
        return text
    return _NEEDS_ESCAPE.sub(_escape_char, text)


def _unescape_match(m: re.Match[str]) -> str:
    code = m.group(1)
    if code == "\\":
        return "\\"
    value = int(code[1:], 16)
    if value == 0:
        return "\x00"
    if value < 0x80:
        return chr(value)  # not produced by escape(); read leniently
    return chr(0xDC00 + value)


@overload
def unescape(text: str) -> str: ...
@overload
def unescape(text: None) -> None: ...
def unescape(text: str | None) -> str | None:
    """The text ``escape`` was given: undecodable bytes back as lone surrogates."""
    if text is None or "\\" not in text:
        return text
    return _ESCAPED.sub(_unescape_match, text)


def printable(text: str) -> str:
    """``text`` made safe for one log line or a terminal: the storage rule, plus control
    characters escaped."""
    text = escape(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _CONTROLS:
            out.append(_CONTROLS[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)
