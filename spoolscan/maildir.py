"""Maildir stores: finding mailboxes and messages, and naming messages stably.

A Maildir is a directory with ``cur/``, ``new/`` and ``tmp/``.  Maildir++ folders are
dot-prefixed subdirectories of the root (``.Sent``, ``.Lists.debian``), each a Maildir of its
own.  Messages are the regular files in ``new/`` and ``cur/``; ``tmp/`` holds deliveries in
progress and is never scanned.

A message's identity is its mailbox folder plus the *unique part* of its file name (the
name up to ``:2,``): Dovecot renames ``new/X`` to ``cur/X:2,S`` when a client sees it, and
flag changes rename it again, but the unique part stays.

Symlinks are never followed.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUBDIRS = ("new", "cur")
QUARANTINE_FOLDER = ".Quarantine"


@dataclass(frozen=True)
class MaildirMessage:
    path: Path  # current path of the file
    folder: Path  # the Maildir (root or Maildir++ folder) holding it
    subdir: str  # "new" or "cur"
    unique: str  # file name up to the ":2," info part

    @property
    def identity(self) -> str:
        return f"{self.folder}/{self.unique}"


def unique_part(name: str) -> str:
    """The unique part of a Maildir file name (without ``:2,FLAGS``)."""
    return name.split(":", 1)[0]


def is_maildir(path: Path) -> bool:
    """True for a directory with cur/ and new/ (tmp/ may be missing on some stores)."""
    try:
        return all(stat.S_ISDIR(os.lstat(path / d).st_mode) for d in SUBDIRS)
    except OSError:
        return False


def folders(root: Path, include_quarantine: bool = False) -> list[Path]:
    """The root Maildir and its Maildir++ folders (``.Name`` subdirectories)."""
    found = [root]
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        log.warning("%s: cannot list mailbox: %s", root, exc.strerror)
        return found
    for entry in entries:
        if not entry.name.startswith(".") or entry.name in (".", ".."):
            continue
        if entry.name == QUARANTINE_FOLDER and not include_quarantine:
            continue
        if entry.is_dir(follow_symlinks=False) and is_maildir(Path(entry.path)):
            found.append(Path(entry.path))
    return found


def message_at(path: Path) -> MaildirMessage | None:
    """Describe ``path`` as a Maildir message, or None if it is not inside new/ or cur/."""
    subdir = path.parent.name
    if subdir not in SUBDIRS or path.name.startswith("."):
        return None
    folder = path.parent.parent
    return MaildirMessage(path=path, folder=folder, subdir=subdir, unique=unique_part(path.name))


def iter_folder(folder: Path, skipped: Callable[[str, str], None] | None = None
                ) -> Iterator[MaildirMessage]:
    """Messages in one Maildir folder's new/ and cur/ (regular files only).

    Other entries (symlinks, FIFOs...) are logged, or passed to ``skipped(path, kind)``.
    """
    for sub in SUBDIRS:
        try:
            it = os.scandir(folder / sub)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("%s: cannot list: %s", folder / sub, exc.strerror)
            continue
        with it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    kind = "symlink" if entry.is_symlink() else "not a regular file"
                    if skipped is not None:
                        skipped(entry.path, kind)
                    else:
                        log.warning("%s: skipped (%s)", entry.path, kind)
                    continue
                yield MaildirMessage(path=Path(entry.path), folder=folder, subdir=sub,
                                     unique=unique_part(entry.name))


def iter_maildir(root: Path) -> Iterator[MaildirMessage]:
    """Every message of a Maildir, its Maildir++ folders included (not .Quarantine)."""
    for folder in folders(root):
        yield from iter_folder(folder)


def find_current(message: MaildirMessage) -> Path | None:
    """Where a message is now, if it was renamed (new/ → cur/, flag changes).

    Looks for the same unique part in new/ and cur/ of its folder.
    """
    for sub in SUBDIRS:
        directory = message.folder / sub
        candidate = directory / message.unique
        if candidate.exists():
            return candidate
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if unique_part(entry.name) == message.unique:
                        return Path(entry.path)
        except OSError:
            continue
    return None


# --- roots, folders and quarantine folders (used by the Maildir source) ------------------


def find_roots(patterns: Iterable[str]) -> list[Path]:
    """The Maildir roots matching the glob ``patterns`` (absolute, sorted, no duplicates).

    A match that is a symlink is skipped with a warning: configure the real path.
    """
    found: dict[str, Path] = {}
    for pattern in patterns:
        for match in sorted(glob.glob(os.path.abspath(pattern))):
            path = Path(match)
            if str(path) in found:
                continue
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    log.warning("%s: skipped (a symlink; configure the real path)", path)
                    continue
            except OSError:
                continue
            if is_maildir(path):
                found[str(path)] = path
    return sorted(found.values())


def root_of(folder: Path) -> Path:
    """The Maildir root of ``folder``: itself, or its parent for a Maildir++ folder."""
    if folder.name.startswith(".") and is_maildir(folder.parent):
        return folder.parent
    return folder


def message_in(path: Path, root: Path) -> MaildirMessage | None:
    """``path`` as a message of the mailbox ``root`` (its new/ or cur/, or those of one of
    its Maildir++ folders, not .Quarantine); None for anything else (tmp/, dot-files...).

    Looks at the path only: no system call.
    """
    msg = message_at(path)
    if msg is None:
        return None
    folder = msg.folder
    if folder == root:
        return msg
    if (folder.parent == root and folder.name.startswith(".")
            and folder.name not in (".", "..", QUARANTINE_FOLDER)):
        return msg
    return None


def ensure_folder(folder: Path, like: Path) -> None:
    """Create the Maildir++ folder ``folder`` (tmp/, new/, cur/ and an empty
    ``maildirfolder``) where missing, with the owner, group and mode of the directory
    ``like`` (the mailbox root), so that the mail user's IMAP server can read it."""
    st = os.stat(like)
    dir_mode = stat.S_IMODE(st.st_mode)
    file_mode = dir_mode & 0o666
    created: list[Path] = []
    for path in (folder, folder / "tmp", folder / "new", folder / "cur"):
        try:
            os.mkdir(path, dir_mode)
        except FileExistsError:
            continue
        created.append(path)
    marker = folder / "maildirfolder"
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        created.append(marker)
    for path in created:
        os.chmod(path, file_mode if path == marker else dir_mode)
        if os.geteuid() == 0:
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
