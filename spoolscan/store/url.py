"""Database URLs, read without loading the database layer (a command that stores
nothing must not pay for SQLAlchemy): the password to scrub from anything shown, the
SQLite file the unprivileged worker must be able to write."""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["sqlite_path", "url_password"]

# scheme://user:password@host...: the password ends at the first "@", as SQLAlchemy's
# make_url() reads it (an "@" in a password must be written %40).
_PASSWORD = re.compile(r"^[^:/]+://[^:/@]*:([^@]*)@")


def url_password(url: str) -> str | None:
    """The password in a database URL, as the driver sees it (%-decoded), to be scrubbed
    from any text shown; None if there is none."""
    m = _PASSWORD.match(url)
    return unquote(m.group(1)) if m and m.group(1) else None


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (``sqlite:///relative``, ``sqlite:////absolute``), None
    for another database or an in-memory one."""
    if not url.startswith("sqlite:///"):
        return None
    path = unquote(url[len("sqlite:///"):].partition("?")[0])
    return path if path and path != ":memory:" else None
