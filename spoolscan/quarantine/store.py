"""The quarantine store: one directory, one layout, for every source.

::

    <directory>/                      0700, created at start
        <YYYYMMDD>/                   0700, the UTC day of the quarantine
            <message id>-<scan id>/   0700, one per quarantine decision
                message.eml           0600, the message as it was scanned
                meta.json             0600, where it came from (envelope, folder, flags...)

Every name is made from spoolscan's own IDs, never from mail or from a user's file name,
so it is short, unique and predictable: the path of a quarantine is decided (and recorded
in the store as the action's intent) *before* anything is written, and a restart finds an
interrupted quarantine by that recorded path, whatever the source.

``message.eml`` is written under a temporary name, fsynced, and renamed into place: it
exists only once it is complete.  A failed write (ENOSPC...) leaves nothing behind, so the
next attempt starts clean.  Only spoolscan writes here; the directory is opened without
following symlinks (``spoolscan.fsutil``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
from datetime import UTC, datetime
from typing import BinaryIO, Final

from spoolscan import fsutil
from spoolscan.fsutil import Directory, OpenFile, UnsafeFile
from spoolscan.text import printable

MESSAGE: Final = "message.eml"
META: Final = "meta.json"
_RELATIVE: Final = re.compile(r"(?P<day>\d{8})/(?P<entry>\d+-\d+)/message\.eml")


class QuarantineStore:
    """The quarantine directory.  Cheap to create; opens the directory per operation."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)

    def __repr__(self) -> str:
        return f"QuarantineStore({self.directory!r})"

    # --- where -------------------------------------------------------------------------

    def path_for(self, message_id: int, scan_id: int, when: datetime | None = None) -> str:
        """Where the quarantine of ``message_id`` decided by ``scan_id`` goes."""
        day = (when or datetime.now(UTC)).strftime("%Y%m%d")
        return f"{self.directory}/{day}/{message_id}-{scan_id}/{MESSAGE}"

    def contains(self, path: str | None) -> bool:
        """True if ``path`` is a message path of this store's layout."""
        return self._relative(path) is not None

    def _relative(self, path: str | None) -> tuple[str, str] | None:
        if not path or not path.startswith(self.directory + "/"):
            return None
        m = _RELATIVE.fullmatch(path[len(self.directory) + 1:])
        return (m.group("day"), m.group("entry")) if m else None

    def _parts(self, path: str) -> tuple[str, str]:
        parts = self._relative(path)
        if parts is None:
            raise UnsafeFile(f"{printable(path)} is not a message of the quarantine "
                             f"store {self.directory}")
        return parts

    # --- the base directory -------------------------------------------------------------

    def prepare(self) -> None:
        """Create the base directory (0700) if missing; tighten its mode if wider.

        Raises UnsafeFile if it is reached through a symlink a user could change or is
        owned by someone else than this process.
        """
        parent, name = os.path.split(self.directory)
        os.makedirs(parent or "/", mode=0o700, exist_ok=True)
        with fsutil.open_directory(parent or "/") as d:
            base = d.make_dir(name, 0o700)
        with base:
            if base.st.st_uid != os.geteuid():
                raise UnsafeFile(f"{self.directory}: owned by uid {base.st.st_uid}, not by "
                                 f"spoolscan (uid {os.geteuid()}); not used")
            if stat.S_IMODE(base.st.st_mode) != 0o700:
                os.fchmod(base.fd, 0o700)

    def _base(self) -> Directory:
        base = fsutil.open_directory(self.directory)
        if base.st.st_uid != os.geteuid():
            base.close()
            raise UnsafeFile(f"{self.directory}: owned by uid {base.st.st_uid}, not by "
                             "spoolscan; not used")
        return base

    def _entry_dir(self, path: str, create: bool) -> Directory:
        day, entry = self._parts(path)
        if create and not os.path.isdir(self.directory):
            self.prepare()  # normally done at start (spoolscan run), but never missing
        with self._base() as base:
            if not create:
                with base.open_dir(day) as d:
                    return d.open_dir(entry)
            with base.make_dir(day, 0o700) as d:
                return d.make_dir(entry, 0o700)

    # --- writing -------------------------------------------------------------------------

    def put(self, path: str, content: BinaryIO, meta: dict[str, object],
            times_ns: tuple[int, int] | None = None) -> int:
        """Write ``content`` (read to its end, in chunks) and ``meta`` at ``path`` (from
        ``path_for``).  If a complete copy is already there (an attempt interrupted after
        writing it), it is kept.  Returns the message size.  On failure nothing of this
        attempt remains."""
        with self._entry_dir(path, create=True) as d:
            existing = d.lstat(MESSAGE)
            if existing is not None and stat.S_ISREG(existing.st_mode):
                return existing.st_size
            _remove_leftovers(d)  # of an attempt killed while it wrote
            body = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()
            try:
                if d.lstat(META) is None:
                    fsutil.write_new(d, META, io.BytesIO(body))
                return fsutil.write_new(d, MESSAGE, content, times_ns=times_ns)
            except BaseException:
                # Nothing of a failed attempt stays (ENOSPC...): the next one starts clean.
                with contextlib.suppress(OSError):
                    self.remove(path)
                raise

    # --- reading and removing --------------------------------------------------------------

    def exists(self, path: str) -> bool:
        try:
            with self._entry_dir(path, create=False) as d:
                st = d.lstat(MESSAGE)
        except (FileNotFoundError, UnsafeFile):
            return False
        return st is not None and stat.S_ISREG(st.st_mode)

    def open(self, path: str) -> OpenFile:
        """The quarantined message, open for reading (FileNotFoundError if gone)."""
        with self._entry_dir(path, create=False) as d:
            return d.open_file(MESSAGE)

    def meta(self, path: str) -> dict[str, object]:
        """What was recorded about the quarantined message ({} if nothing)."""
        try:
            with self._entry_dir(path, create=False) as d, d.open_file(META) as f, \
                    os.fdopen(os.dup(f.fd), "rb") as fh:
                data = json.loads(fh.read(1024 * 1024))
        except (FileNotFoundError, UnsafeFile, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def remove(self, path: str) -> bool:
        """Delete a quarantined message and what was recorded with it; False if it was
        not there."""
        try:
            d = self._entry_dir(path, create=False)
        except FileNotFoundError:
            return False
        with d:
            found = False
            for name in (MESSAGE, META):
                with contextlib.suppress(FileNotFoundError):
                    d.unlink(name)
                    found = found or name == MESSAGE
            _remove_leftovers(d)
            d.fsync()
        day, entry = self._parts(path)
        with contextlib.suppress(OSError), self._base() as base, base.open_dir(day) as dd:
            os.rmdir(entry, dir_fd=dd.fd)
        return found


def _remove_leftovers(d: Directory) -> None:
    """Remove the temporary files (``fsutil.temp_name``) that a write killed midway (a
    SIGKILL, a power cut) left in an entry directory: only this message's writer uses it."""
    for e in d.entries():
        if e.kind == "file" and fsutil.is_temp_name(e.name):
            with contextlib.suppress(FileNotFoundError):
                d.unlink(e.name)
