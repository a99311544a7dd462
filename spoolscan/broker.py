"""The privileged operations, in one place: everything that lists, watches, opens, moves
or deletes mail files, and everything that runs postsuper.

Sources never touch a mailbox, the hold queue or Postfix's commands themselves; they ask
a broker.  Each operation takes and returns plain data (paths and names as given by the
configuration or found in a listing, device and inode numbers, open file descriptors), so
that the broker can live in another process: the privileged half of a privilege-separated
``spoolscan run`` (see ``docs/security.md``).  ``Broker`` here does the work in the
calling process, on the safe file layer (``spoolscan.fsutil``, ``spoolscan.mailbox``,
``spoolscan.postfix.queuedir``).

Watching: the broker makes the inotify instances and adds the watches (on directories it
opened safely, through ``/proc/self/fd``, never by a path a user could swap); the caller
only reads events from the descriptor it gets back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inotify_simple import INotify

from spoolscan import fsutil
from spoolscan.content import RELEASE_HEADER, RELEASE_TOKEN
from spoolscan.fsutil import OpenFile, UnsafeFile
from spoolscan.mailbox import Location, Mailbox
from spoolscan.postfix import commands
from spoolscan.postfix.queuedir import HoldEntry, HoldQueue

log = logging.getLogger(__name__)


#: Messages looked for by one ``mailbox_find_many`` request.
FIND_BATCH = 500
# Files opened by one ``*_open_many`` request: through the root helper their
# descriptors travel together in one message (see spoolscan.privsep).
OPEN_BATCH = 32


@dataclass(frozen=True)
class Found:
    """A message found where it rests now, and what its entry's status says (nothing is
    opened: ``kind`` and ``owned`` tell whether opening it would be refused)."""

    loc: Location
    size: int
    key: tuple[int, int]
    kind: str  # "file", "symlink", "dir", "other"
    owned: bool  # the mailbox owner's


@dataclass
class FolderListing:
    folder: str  # "" for the root
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (sub, name, kind)


@dataclass
class MailboxListing:
    root: str
    uid: int
    key: tuple[int, int]  # device and inode of the root: a mailbox made again is new
    folders: list[FolderListing] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why a folder was not listed


class Broker:
    """The privileged operations, carried out in this process."""

    def __init__(self) -> None:
        self._watchers: dict[int, INotify] = {}
        self._hold_queues: dict[str, HoldQueue] = {}  # each keeps its directory open

    def _hold_queue(self, queue_dir: str) -> HoldQueue:
        queue = self._hold_queues.get(queue_dir)
        if queue is None:
            queue = self._hold_queues.setdefault(queue_dir, HoldQueue(queue_dir))
        return queue

    def reload(self) -> None:
        """Nothing to do in-process (the privileged helper re-reads its configuration)."""

    def close(self) -> None:
        for inotify in self._watchers.values():
            inotify.close()
        self._watchers.clear()
        for queue in self._hold_queues.values():
            queue.close()
        self._hold_queues.clear()

    # --- Maildir mailboxes ---------------------------------------------------------------

    def mailbox_roots(self, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
        """(Maildir roots matching the glob ``patterns``, reasons for matches refused).

        Each match is opened safely: a root reached through a symlink a user can change,
        or that is not a Maildir, is not a root.
        """
        roots: dict[str, None] = {}
        refused: list[str] = []
        for pattern in patterns:
            for match in fsutil.glob_dirs(pattern):
                path = os.path.normpath(match)
                if path in roots:
                    continue
                try:
                    Mailbox.open(path).close()
                except UnsafeFile as exc:
                    refused.append(str(exc))
                    continue
                except OSError:
                    continue  # vanished, or not a directory
                roots[path] = None
        return sorted(roots), refused

    def mailbox_listing(self, root: str, include_quarantine: bool = False) -> MailboxListing:
        """Every entry of new/ and cur/ of every folder of the mailbox ``root``."""
        with Mailbox.open(root) as box:
            listing = MailboxListing(root, box.uid, box.key())
            for folder in box.folders(include_quarantine):
                found = FolderListing(folder)
                try:
                    found.entries = [(sub, e.name, e.kind) for sub, e in box.entries(folder)]
                except UnsafeFile as exc:
                    listing.refused.append(str(exc))
                    continue
                except OSError as exc:
                    listing.refused.append(f"{root}/{folder}: cannot list: {exc.strerror}")
                    continue
                listing.folders.append(found)
            return listing

    def mailbox_open(self, loc: Location) -> OpenFile:
        """Open a message for reading (regular file of the mailbox owner only)."""
        with Mailbox.open(loc.root) as box:
            return box.open_message(loc)

    def mailbox_kind(self, loc: Location) -> str | None:
        """What is at ``loc``: "file", "symlink", "dir", "other", or None (nothing)."""
        with Mailbox.open(loc.root) as box, box.subdir(loc.folder, loc.subdir) as d:
            st = d.lstat(loc.name)
        return None if st is None else fsutil.kind_of(st)

    def mailbox_find(self, root: str, folder: str, unique: str) -> Location | None:
        with Mailbox.open(root) as box:
            return box.find(folder, unique)

    def mailbox_find_many(self, root: str, folder: str, uniques: Sequence[str]
                          ) -> list[Found | None | Exception]:
        """``mailbox_find`` for many messages of one folder, the mailbox walked to once;
        for each: where it is with the status of that entry (not followed), None if it is
        nowhere, or what refused it."""
        out: list[Found | None | Exception] = []
        with Mailbox.open(root) as box, contextlib.ExitStack() as dirs:
            listed: dict[str, Location] | None = None
            if len(uniques) > 4:  # listing new/ and cur/ once beats one find() each
                listed = box.find_many(folder, uniques)
            subdirs: dict[str, fsutil.Directory] = {}
            for unique in uniques:
                try:
                    fsutil.check_name(unique)
                    loc = listed.get(unique) if listed is not None else box.find(folder,
                                                                                 unique)
                    if loc is None:
                        out.append(None)
                        continue
                    if loc.subdir not in subdirs:
                        subdirs[loc.subdir] = dirs.enter_context(
                            box.subdir(loc.folder, loc.subdir))
                    st = subdirs[loc.subdir].lstat(loc.name)
                    out.append(None if st is None else Found(loc, st.st_size,
                                                             (st.st_dev, st.st_ino),
                                                             fsutil.kind_of(st),
                                                             st.st_uid == box.uid))
                except (OSError, UnsafeFile) as exc:
                    out.append(exc)
        return out

    def mailbox_quarantine(self, loc: Location, key: tuple[int, int]) -> Location:
        """Move the scanned message into the mailbox's .Quarantine folder (as the owner)."""
        with Mailbox.open(loc.root) as box:
            return box.move_to_quarantine_folder(loc, key)

    def mailbox_remove(self, loc: Location, key: tuple[int, int] | None) -> None:
        """Delete the scanned message (as the owner)."""
        with Mailbox.open(loc.root) as box:
            box.remove(loc, key)

    def mailbox_restore(self, loc: Location, content_fd: int,
                        times_ns: tuple[int, int] | None = None) -> Location:
        """Write the content of ``content_fd`` as a new message at ``loc`` (as the owner);
        FileExistsError if the name is taken."""
        with Mailbox.open(loc.root) as box, \
                os.fdopen(os.dup(content_fd), "rb") as content:
            content.seek(0)
            return box.restore(loc, content, times_ns)

    def mailbox_move_back(self, loc: Location, folder: str,
                          key: tuple[int, int] | None) -> Location:
        """Move a message back from the .Quarantine folder into ``folder`` (as the owner)."""
        with Mailbox.open(loc.root) as box:
            return box.move_back(loc, folder, key)

    # --- any file (spoolscan scan PATH) ------------------------------------------------------

    def path_kind(self, path: str) -> str | None:
        """What ``path`` is ("file", "dir", "symlink", "other"), None if nothing; reached
        by the safe walk (UnsafeFile if a user's symlink is on the way)."""
        parent, name = os.path.split(os.path.normpath(path))
        with fsutil.open_directory(parent or "/") as d:
            st = d.lstat(name) if name else d.st
        return None if st is None else fsutil.kind_of(st)

    def path_entries(self, path: str) -> list[tuple[str, str]]:
        """(name, kind) of the entries of the directory ``path``."""
        with fsutil.open_directory(path) as d:
            return [(e.name, e.kind) for e in d.entries()]

    def path_open(self, path: str) -> OpenFile:
        """Open the regular file ``path`` for reading (safe walk, no symlink)."""
        parent, name = os.path.split(os.path.normpath(path))
        with fsutil.open_directory(parent or "/") as d:
            return d.open_file(name)

    def path_open_many(self, directory: str, names: Sequence[str]
                       ) -> list[OpenFile | Exception]:
        """Open the regular files ``names`` of ``directory``, walked to once: for each
        name its OpenFile, or what refused it (OSError, UnsafeFile)."""
        for name in names:
            fsutil.check_name(name)
        with fsutil.open_directory(directory) as d:
            return _open_each(names, d.open_file)

    # --- the Postfix hold queue -------------------------------------------------------------

    def postfix_info(self, config_dir: str) -> tuple[str, str]:
        """(queue_directory, myhostname) of the Postfix instance in ``config_dir``."""
        return str(commands.queue_directory(config_dir)), commands.myhostname(config_dir)

    def hold_entries(self, queue_dir: str) -> tuple[list[HoldEntry], list[str]]:
        return self._hold_queue(queue_dir).entries()

    def hold_names(self, queue_dir: str) -> tuple[str, list[str]]:
        """(names of the files in hold/, oldest first, one per line; names that are not
        queue files).  One string of names, not a list: a backlog of 100,000 is ~1.3 MB
        in the worker instead of ~7 MB of string objects (queue file names hold no
        newline: ``entries`` lists only names of the queue ID form)."""
        entries, strange = self._hold_queue(queue_dir).entries()
        return "\n".join(e.rel for e in entries), strange

    def hold_backlog(self, queue_dir: str) -> tuple[int, int]:
        """(files in hold/, modification time of the oldest in ns; 0 when empty)."""
        entries, _ = self._hold_queue(queue_dir).entries()
        return len(entries), min((e.mtime_ns for e in entries), default=0)

    def hold_subdirs(self, queue_dir: str) -> list[str]:
        return self._hold_queue(queue_dir).subdirs()

    def hold_stat(self, queue_dir: str, rel: str) -> HoldEntry | None:
        return self._hold_queue(queue_dir).stat(rel)

    def hold_stat_many(self, queue_dir: str, rels: Sequence[str]) -> list[HoldEntry | None]:
        """``hold_stat`` of each name (None: not there, or not a queue file name)."""
        out: list[HoldEntry | None] = []
        for rel in rels:
            try:
                out.append(self.hold_stat(queue_dir, rel))
            except UnsafeFile:
                out.append(None)
        return out

    def hold_open(self, queue_dir: str, rel: str) -> OpenFile:
        return self._hold_queue(queue_dir).open(rel)

    def hold_open_many(self, queue_dir: str, rels: Sequence[str]
                       ) -> list[OpenFile | Exception]:
        """``hold_open`` of each name: its OpenFile, or what refused it (OSError,
        FileNotFoundError once it left the hold queue; UnsafeFile)."""
        return _open_each(rels, self._hold_queue(queue_dir).open)

    def hold_find(self, queue_dir: str, queue_id: str) -> list[str]:
        return self._hold_queue(queue_dir).find(queue_id)

    def postsuper_release(self, config_dir: str, ids: Iterable[str]) -> set[str]:
        return commands.release(config_dir, ids)

    def postsuper_delete(self, config_dir: str, ids: Iterable[str]) -> set[str]:
        # Only from hold/: a message released meanwhile is not ours to delete.
        return commands.delete(config_dir, ids, queues=("hold",))

    def wake_qmgr(self, queue_dir: str) -> bool:
        return commands.wake_qmgr(queue_dir)

    def flush(self, config_dir: str, ids: Sequence[str]) -> None:
        commands.flush(config_dir, ids)

    def hold_inject(self, config_dir: str, sender: str, recipients: Sequence[str],
                    token: str, content_fd: int) -> None:
        """Submit the content of ``content_fd`` to the Postfix instance of ``config_dir``
        with this envelope, under an ``X-Spoolscan-Release: token`` header (a release
        from quarantine: the worker releases the held copy that carries the ticket)."""
        if not RELEASE_TOKEN.fullmatch(token):
            raise ValueError("not a release ticket")
        header = f"{RELEASE_HEADER}: {token}\n".encode()
        commands.inject(config_dir, sender, recipients, header, content_fd)

    # --- watching -------------------------------------------------------------------------

    def watcher(self) -> int:
        """A new inotify instance; its descriptor, for reading events."""
        inotify = INotify()
        fd = inotify.fileno()
        self._watchers[fd] = inotify
        return fd

    def close_watcher(self, fd: int) -> None:
        inotify = self._watchers.pop(fd, None)
        if inotify is not None:
            inotify.close()

    def watch_hold(self, fd: int, queue_dir: str, rel: str, mask: int) -> int:
        """Watch hold/ (``rel`` "") or one of its hash subdirectories."""
        queue = self._hold_queue(queue_dir)
        with queue.open_dir(rel.split("/") if rel else []) as d:
            return self._add_watch(fd, d, mask)

    def watch_mailbox(self, fd: int, root: str, folder: str, sub: str | None, mask: int
                      ) -> int:
        """Watch a mailbox folder (``sub`` None) or its new/ or cur/."""
        with Mailbox.open(root) as box:
            d = box.folder_dir(folder) if sub is None else box.subdir(folder, sub)
            with d:
                return self._add_watch(fd, d, mask)

    def unwatch(self, fd: int, wd: int) -> None:
        inotify = self._watchers.get(fd)
        if inotify is not None:
            with contextlib.suppress(OSError):  # already gone with its directory
                inotify.rm_watch(wd)

    def _add_watch(self, fd: int, d: fsutil.Directory, mask: int) -> int:
        inotify = self._watchers[fd]
        proc = Path(f"/proc/self/fd/{d.fd}")
        # Through the open directory, so the watch is on what was checked; without /proc,
        # by path (the directory was just checked; a swap now only misplaces a watch).
        target = str(proc) if proc.parent.is_dir() else d.path
        return inotify.add_watch(target, mask)


def _open_each(names: Sequence[str], open_one: Callable[[str], OpenFile]
               ) -> list[OpenFile | Exception]:
    """``open_one`` of each name: its OpenFile, or what refused it (OSError, UnsafeFile),
    each name on its own; if anything else goes wrong, nothing opened stays open."""
    out: list[OpenFile | Exception] = []
    try:
        for name in names:
            try:
                out.append(open_one(name))
            except (OSError, UnsafeFile) as exc:
                out.append(exc)
    except BaseException:
        fsutil.close_files(out)
        raise
    return out
