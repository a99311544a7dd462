"""The ``hold/`` directory of a Postfix queue, read through the safe file layer.

Only Postfix (and postsuper) write here and the directory belongs to the postfix user,
but it is still read the careful way: opened as a directory, entries named by one checked
component each (a queue ID, or a hash subdirectory and a queue ID), files opened without
following symlinks and checked to be regular before they are read.

``hold/`` is flat by default; with ``hold`` in ``hash_queue_names`` files live in
single-character subdirectories (``hold/7/4jblgN3ZmszJX6h``), as deep as
``hash_queue_depth``.  A file is named by its path relative to ``hold/``.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from spoolscan import fsutil
from spoolscan.fsutil import Directory, OpenFile, UnsafeFile
from spoolscan.text import printable

_MAX_DEPTH: Final = 4  # hash_queue_depth is 1 by default; Postfix allows a few more
_HASH_DIR: Final = re.compile(r"[0-9A-Za-z]")
_QUEUE_ID: Final = re.compile(r"[A-Za-z0-9_]{1,255}")


@dataclass(frozen=True, slots=True)  # slots: a backlog of 100,000 is listed at once
class HoldEntry:
    """A file in hold/: its relative name, inode, mode and modification time."""

    rel: str  # "ID" or "7/ID"
    ino: int
    mode: int
    mtime_ns: int

    @property
    def queue_id(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    @property
    def ready(self) -> bool:
        """cleanup(8) makes a finished file 0700; 0600 is still being written."""
        return self.mode & 0o700 == 0o700


def split_rel(rel: str) -> tuple[list[str], str]:
    """(hash subdirectories, queue ID) of a relative name; UnsafeFile if malformed."""
    parts = rel.split("/")
    *dirs, name = parts
    if (len(dirs) > _MAX_DEPTH or not all(_HASH_DIR.fullmatch(d) for d in dirs)
            or not _QUEUE_ID.fullmatch(name)):
        raise UnsafeFile(f"{printable(rel)!r} is not a file name of the hold queue")
    return dirs, name


class HoldQueue:
    """``<queue_directory>/hold``."""

    def __init__(self, queue_dir: str) -> None:
        self.queue_dir = queue_dir
        self.path = os.path.join(queue_dir, "hold")
        self._lock = threading.Lock()
        self._base: Directory | None = None

    def _queue_directory(self) -> Directory:
        """The queue directory, opened once by the safe walk and kept: every operation
        on a held file would otherwise walk the path from / again.  Reopened when the
        path no longer names the same directory (Postfix's queue recreated)."""
        with self._lock:
            base = self._base
            if base is not None:
                try:
                    st = os.stat(self.queue_dir)  # only compared, never used to open
                    if (st.st_dev, st.st_ino) == (base.st.st_dev, base.st.st_ino):
                        return base
                except OSError:
                    pass
                base.close()
            self._base = fsutil.open_directory(self.queue_dir)
            return self._base

    def close(self) -> None:
        with self._lock:
            if self._base is not None:
                self._base.close()
                self._base = None

    def open_dir(self, dirs: list[str]) -> Directory:
        # openat() relative to the kept descriptor: a fresh open file (own offset) for
        # each caller, so listings in several threads do not disturb each other.
        d = self._queue_directory().open_dir("hold")
        try:
            for name in dirs:
                child = d.open_dir(name)
                d.close()
                d = child
        except BaseException:
            d.close()
            raise
        return d

    def _walk(self) -> Iterator[tuple[list[str], Directory, list[fsutil.Entry]]]:
        """(hash subdirectories, the open directory, its entries) for hold/ and each hash
        subdirectory under it (depth first)."""
        stack: list[list[str]] = [[]]
        while stack:
            dirs = stack.pop()
            try:
                d = self.open_dir(dirs)
            except (FileNotFoundError, UnsafeFile):
                continue
            with d:
                entries = d.entries()
                for e in entries:
                    if e.kind == "dir" and _HASH_DIR.fullmatch(e.name) and len(dirs) < _MAX_DEPTH:
                        stack.append([*dirs, e.name])
                yield dirs, d, entries

    def subdirs(self) -> list[str]:
        """Relative names of the hash subdirectories (all levels)."""
        return ["/".join(dirs) for dirs, _, _ in self._walk() if dirs]

    def entries(self) -> tuple[list[HoldEntry], list[str]]:
        """(files in hold/ and its hash subdirectories, oldest first; names that are not
        queue files: symlinks, FIFOs, other names)."""
        found: list[HoldEntry] = []
        strange: list[str] = []
        for dirs, d, entries in self._walk():
            for e in entries:
                rel = "/".join([*dirs, e.name])
                if e.kind == "dir" and _HASH_DIR.fullmatch(e.name) and len(dirs) < _MAX_DEPTH:
                    continue  # walked by _walk
                if e.name.startswith("."):
                    continue
                if e.kind != "file" or not _QUEUE_ID.fullmatch(e.name):
                    strange.append(rel)
                    continue
                st = d.lstat(e.name)
                if st is None or not stat.S_ISREG(st.st_mode):
                    continue
                found.append(HoldEntry(rel, st.st_ino, st.st_mode, st.st_mtime_ns))
        found.sort(key=lambda x: x.mtime_ns)
        return found, strange

    def stat(self, rel: str) -> HoldEntry | None:
        """The file's entry now, or None if there is no regular file by that name."""
        dirs, name = split_rel(rel)
        try:
            with self.open_dir(dirs) as d:
                st = d.lstat(name)
        except FileNotFoundError:
            return None
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return HoldEntry(rel, st.st_ino, st.st_mode, st.st_mtime_ns)

    def open(self, rel: str) -> OpenFile:
        """Open a held file for reading (FileNotFoundError if it left the hold queue)."""
        dirs, name = split_rel(rel)
        with self.open_dir(dirs) as d:
            return d.open_file(name)

    def find(self, queue_id: str) -> list[str]:
        """Relative names under which ``queue_id`` is held (flat or hashed)."""
        if not _QUEUE_ID.fullmatch(queue_id):
            return []
        found = []
        for sub in ("", *self.subdirs()):
            rel = f"{sub}/{queue_id}" if sub else queue_id
            if self.stat(rel) is not None:
                found.append(rel)
        return found
