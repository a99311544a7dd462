"""Maildir mailboxes on the safe file layer: folders, messages, and the changes spoolscan
makes to them (quarantine into a folder, remove, restore), with the owner's identity.

A Maildir is a directory with ``cur/`` and ``new/`` (and ``tmp/``, never scanned).
Maildir++ folders are dot-prefixed subdirectories of the root (``.Sent``,
``.Lists.debian``), each a Maildir of its own.  Messages are the regular files in ``new/``
and ``cur/``.  A message's identity is its folder plus the *unique part* of its name (the
name up to ``:2,``): Dovecot renames ``new/X`` to ``cur/X:2,S`` when a client sees it, and
flag changes rename it again, but the unique part stays.

The mailbox **owner** is the owner of the root directory.  Every directory spoolscan uses
inside it must belong to the owner (or root), every message file to the owner; anything
else is refused (``UnsafeFile``) and left alone.  Reading is done with root's rights
through the safe layer (no symlink followed, only regular files opened); every change is
made with the owner's filesystem identity (``fsutil.acting_as``), so the kernel refuses
what the owner could not do.  Before a file is moved or removed, its device and inode are
compared with those recorded when it was scanned; after a move they are checked again at
the destination, and a file that is not the scanned one is moved back untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO, Final

from spoolscan import fsutil
from spoolscan.fsutil import Directory, OpenFile, UnsafeFile
from spoolscan.text import printable

SUBDIRS: Final = ("new", "cur")
QUARANTINE_FOLDER: Final = ".Quarantine"
_FREE_NAME_TRIES: Final = 100


def race_point(where: str, loc: Location) -> None:
    """Does nothing.  Called between checking a message and changing it (``where``:
    "move", "remove", "restore"), the moment an attacker would swap something; tests
    replace it to make such races happen deterministically."""


def _clash_name(attempt: int, name: str) -> str:
    """Another name for a message whose name is taken: ``q<n>-<name>``, cut to fit."""
    prefix = f"q{attempt}-"
    raw = os.fsencode(name)
    return prefix + os.fsdecode(raw[len(raw) + len(prefix) - 255:] if
                                len(raw) + len(prefix) > 255 else raw)


def _primary_gid(uid: int, fallback: int) -> int:
    """The owner's primary group (files made as the owner get it), else the group of
    the mailbox root (an owner without an account, e.g. a virtual mail uid)."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return fallback


def unique_part(name: str) -> str:
    """The unique part of a Maildir file name (without ``:2,FLAGS``)."""
    return name.split(":", 1)[0]


def is_folder_name(name: str) -> bool:
    """A Maildir++ folder name: ``.Name`` (not ``.`` or ``..``)."""
    return name.startswith(".") and name not in (".", "..") and "/" not in name


@dataclass(frozen=True)
class Location:
    """Where a message file is: mailbox root, folder (``""`` for the root), subdir, name."""

    root: str
    folder: str
    subdir: str
    name: str

    @property
    def unique(self) -> str:
        return unique_part(self.name)

    @property
    def folder_path(self) -> str:
        return f"{self.root}/{self.folder}" if self.folder else self.root

    @property
    def path(self) -> str:
        return f"{self.folder_path}/{self.subdir}/{self.name}"

    @property
    def identity(self) -> str:
        """Stable across Dovecot's renames (new/ → cur/, flag changes)."""
        return f"{self.folder_path}/{self.unique}"

    @classmethod
    def from_path(cls, path: str, root: str) -> Location | None:
        """``path`` as a message of the mailbox ``root``: in new/ or cur/ of the root or
        of one of its Maildir++ folders.  None for anything else.  No system call."""
        root = root.rstrip("/")
        if not path.startswith(root + "/"):
            return None
        parts = path[len(root) + 1:].split("/")
        if len(parts) == 2:
            folder, (sub, name) = "", parts
        elif len(parts) == 3 and is_folder_name(parts[0]):
            folder, sub, name = parts
        else:
            return None
        if sub not in SUBDIRS or not name or name.startswith("."):
            return None
        return cls(root, folder, sub, name)


class Mailbox:
    """A Maildir root, opened safely, and its owner.  Close it (or use ``with``)."""

    def __init__(self, root: Directory) -> None:
        self.dir = root
        self.path = root.path
        self.uid = root.st.st_uid
        self.gid = _primary_gid(self.uid, root.st.st_gid)
        self.owners = (self.uid, 0)

    @classmethod
    def open(cls, path: str) -> Mailbox:
        """Open the Maildir ``path`` (UnsafeFile if it is not one, or a symlink)."""
        root = fsutil.open_directory(path)
        try:
            for sub in SUBDIRS:
                st = root.lstat(sub)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    what = (f"{sub}/ is a symlink; never followed"
                            if st is not None and stat.S_ISLNK(st.st_mode) else f"no {sub}/")
                    raise UnsafeFile(f"{printable(path)}: not a Maildir ({what})")
        except BaseException:
            root.close()
            raise
        return cls(root)

    def close(self) -> None:
        self.dir.close()

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key(self) -> tuple[int, int]:
        return (self.dir.st.st_dev, self.dir.st.st_ino)

    # --- folders -----------------------------------------------------------------------

    def folder_dir(self, folder: str) -> Directory:
        """The folder (``""``: the root itself) as a new open Directory."""
        if not folder:
            return Directory(os.open(".", fsutil.O_DIR, dir_fd=self.dir.fd), self.path,
                             self.dir.trusted)
        if not is_folder_name(folder):
            raise UnsafeFile(f"{printable(folder)!r} is not a Maildir++ folder name")
        return self.dir.open_dir(folder, owners=self.owners)

    def subdir(self, folder: str, sub: str) -> Directory:
        if sub not in (*SUBDIRS, "tmp"):
            raise UnsafeFile(f"{printable(sub)!r} is not a Maildir subdirectory")
        with self.folder_dir(folder) as d:
            return d.open_dir(sub, owners=self.owners)

    def folders(self, include_quarantine: bool = False) -> list[str]:
        """The root (``""``) and its Maildir++ folders (``.Name`` directories with new/
        and cur/), sorted.  Symlinked folders are not folders."""
        found = [""]
        for entry in sorted(self.dir.entries(), key=lambda e: e.name):
            if entry.kind != "dir" or not is_folder_name(entry.name):
                continue
            if entry.name == QUARANTINE_FOLDER and not include_quarantine:
                continue
            found.append(entry.name)
        return found

    def _message_dirs(self, folder: str) -> Iterator[tuple[str, Directory]]:
        """("new" or "cur", the open directory) for each of them the folder has."""
        for sub in SUBDIRS:
            try:
                d = self.subdir(folder, sub)
            except FileNotFoundError:
                continue
            with d:
                yield sub, d

    def entries(self, folder: str) -> Iterator[tuple[str, fsutil.Entry]]:
        """(subdir, entry) for every name in the folder's new/ and cur/ (dot-files
        left out).  Entries that are not regular files are listed too: the caller
        reports them, nothing opens them."""
        for sub, d in self._message_dirs(folder):
            for entry in d.entries():
                if not entry.name.startswith("."):
                    yield sub, entry

    # --- messages ------------------------------------------------------------------------

    def location(self, folder: str, sub: str, name: str) -> Location:
        return Location(self.path, folder, sub, name)

    def open_message(self, loc: Location) -> OpenFile:
        """Open a message for reading (UnsafeFile: not a regular file of the owner)."""
        with self.subdir(loc.folder, loc.subdir) as d:
            return d.open_file(loc.name, owner=self.uid)

    def find(self, folder: str, unique: str) -> Location | None:
        """Where the message with this unique part is now in ``folder`` (new/ or cur/),
        if anywhere (Dovecot renames messages when they are seen or flagged)."""
        for sub, d in self._message_dirs(folder):
            st = d.lstat(unique)
            if st is not None and stat.S_ISREG(st.st_mode):
                return self.location(folder, sub, unique)
            for entry in d.entries():
                if entry.kind == "file" and unique_part(entry.name) == unique:
                    return self.location(folder, sub, entry.name)
        return None

    def find_many(self, folder: str, uniques: Iterable[str]) -> dict[str, Location]:
        """``find`` for many unique parts: new/ and cur/ listed once, not once per
        message (a message read by an IMAP client has flags after its unique part, so
        ``find`` lists the directory for it).  Unique parts found nowhere are left out."""
        wanted = set(uniques)
        found: dict[str, Location] = {}
        for sub, d in self._message_dirs(folder):
            here: dict[str, str] = {}
            for entry in d.entries():
                if entry.kind != "file":
                    continue
                unique = unique_part(entry.name)
                if unique in wanted and unique not in found and (
                        unique not in here or entry.name == unique):
                    here[unique] = entry.name  # the exact name first, as find()
            for unique, name in here.items():
                found[unique] = self.location(folder, sub, name)
        return found

    # --- changes, with the owner's identity -------------------------------------------------

    def move_to_quarantine_folder(self, loc: Location, key: tuple[int, int]) -> Location:
        """Move the scanned message (``key``: its device and inode) into the
        ``.Quarantine`` folder, same subdir and name (so same flags).  Creates the folder
        like an IMAP server would, with the mode of the mailbox root."""
        with fsutil.acting_as(self.uid, self.gid):
            self._quarantine_folder()
            return self._move(loc, QUARANTINE_FOLDER, key)

    def move_back(self, loc: Location, folder: str, key: tuple[int, int] | None) -> Location:
        """Move a message (from the ``.Quarantine`` folder) back into ``folder`` under its
        name; FileExistsError if that name is taken there."""
        with fsutil.acting_as(self.uid, self.gid):
            return self._move(loc, folder, key, rename_on_clash=False)

    def remove(self, loc: Location, key: tuple[int, int] | None) -> None:
        """Delete the scanned message (``key``: its device and inode).

        The name is first renamed to a private one in the same directory, the file found
        there checked, and only then unlinked: a file swapped in at the last moment is
        put back, never deleted."""
        with fsutil.acting_as(self.uid, self.gid), self.subdir(loc.folder, loc.subdir) as d:
            self._check(d, loc, key)
            race_point("remove", loc)
            doomed = fsutil.temp_name()
            d.rename(loc.name, d, doomed)
            st = d.lstat(doomed)
            if key is not None and (st is None or (st.st_dev, st.st_ino) != key):
                with contextlib.suppress(OSError):
                    d.rename(doomed, d, loc.name)
                raise UnsafeFile(f"{printable(loc.path)}: replaced while being removed; "
                                 "put back, not removed (it will be scanned again)")
            d.unlink(doomed)
            d.fsync()

    def restore(self, loc: Location, content: BinaryIO,
                times_ns: tuple[int, int] | None = None) -> Location:
        """Write ``content`` as a new message at ``loc`` (a release from the quarantine
        store): a new file of the owner, written in tmp/ and renamed into place without
        replacing anything (FileExistsError if the name is taken)."""
        with fsutil.acting_as(self.uid, self.gid), \
                self.subdir(loc.folder, "tmp") as tmp, \
                self.subdir(loc.folder, loc.subdir) as target:
            staged = fsutil.temp_name()
            fsutil.write_new(tmp, staged, content, mode=0o600, times_ns=times_ns)
            race_point("restore", loc)
            try:
                tmp.rename(staged, target, loc.name)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink(staged)
                raise
            target.fsync()
        return loc

    # --- helpers (called with the owner's identity) -----------------------------------------

    def _quarantine_folder(self) -> None:
        mode = stat.S_IMODE(self.dir.st.st_mode) & 0o777 | 0o700
        with self.dir.make_dir(QUARANTINE_FOLDER, mode) as q:
            if q.st.st_uid not in self.owners:
                raise UnsafeFile(f"{q.path}: owned by uid {q.st.st_uid}; not used")
            for sub in ("tmp", *SUBDIRS):
                q.make_dir(sub, mode).close()
            if q.lstat("maildirfolder") is None:
                with contextlib.suppress(FileExistsError):
                    os.close(q.create("maildirfolder", mode & 0o666))
                q.fsync()

    def _check(self, d: Directory, loc: Location, key: tuple[int, int] | None) -> None:
        st = d.lstat(loc.name)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no longer there", loc.path)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{printable(loc.path)}: not a regular file any more; "
                             "not touched")
        if st.st_uid != self.uid:
            raise UnsafeFile(f"{printable(loc.path)}: owned by uid {st.st_uid}, not "
                             f"by the mailbox owner; not touched")
        if key is not None and (st.st_dev, st.st_ino) != key:
            raise UnsafeFile(f"{printable(loc.path)}: replaced since it was scanned; "
                             "not touched (it will be scanned again)")

    def _move(self, loc: Location, folder: str, key: tuple[int, int] | None,
              rename_on_clash: bool = True) -> Location:
        with self.subdir(loc.folder, loc.subdir) as src, \
                self.subdir(folder, loc.subdir) as dst:
            self._check(src, loc, key)
            race_point("move", loc)
            name = loc.name
            for attempt in range(_FREE_NAME_TRIES):
                if attempt:
                    name = _clash_name(attempt, loc.name)
                try:
                    src.rename(loc.name, dst, name)
                    break
                except FileExistsError:
                    if not rename_on_clash:
                        raise
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    self._copy_across(src, loc, dst, name, key)
                    break
            else:
                raise FileExistsError(errno.EEXIST, "no free name", loc.path)
            moved = replace(loc, folder=folder, name=name)
            st = dst.lstat(name)
            if key is not None and (st is None or (st.st_dev, st.st_ino) != key):
                # Swapped between the check and the rename: that file is not the one
                # scanned.  Put it back where the owner left it, untouched.
                with contextlib.suppress(OSError):
                    dst.rename(name, src, loc.name)
                raise UnsafeFile(f"{printable(loc.path)}: replaced while being moved; "
                                 "moved back, not quarantined (it will be scanned again)")
            dst.fsync()
            src.fsync()
            return moved

    def _copy_across(self, src: Directory, loc: Location, dst: Directory, name: str,
                     key: tuple[int, int] | None) -> None:
        """The folder is on another filesystem: copy the scanned file, then remove it."""
        with src.open_file(loc.name, owner=self.uid) as opened:
            if key is not None and opened.key != key:
                raise UnsafeFile(f"{printable(loc.path)}: replaced since it was "
                                 "scanned; not touched")
            with os.fdopen(os.dup(opened.fd), "rb") as stream:
                fsutil.write_new(dst, name, stream,
                                 mode=stat.S_IMODE(opened.st.st_mode) & 0o666,
                                 times_ns=(opened.st.st_atime_ns, opened.st.st_mtime_ns))
        src.unlink(loc.name)
