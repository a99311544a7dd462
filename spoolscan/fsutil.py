"""The safe file layer: how spoolscan touches files and directories it does not control.

spoolscan runs as root (the hold queue needs it) inside directories that local users own
and can change at any moment: a mailbox owner can plant symlinks, FIFOs and hard links, or
swap a directory for a symlink between two system calls.  Everything spoolscan does to
mail goes through this module, which keeps to four rules:

1. **Directories are opened, not named.**  A path is walked one component at a time from
   ``/`` with ``O_DIRECTORY | O_NOFOLLOW`` (``Directory``), and every later operation is an
   ``*at()`` call on one name inside an open directory.  No path string is resolved twice,
   so swapping a directory after it was opened changes nothing for us.  Symlinks are
   followed only in the part of a path that only root can change (an admin's
   ``/home -> /srv/home``); past the first directory a user can write, never.
2. **Files are checked after opening, and only regular files are read.**  A name is
   opened with ``O_PATH | O_NOFOLLOW`` (which cannot block or trigger a device), checked
   with ``fstat`` (regular file, expected owner), and only then reopened for reading
   through ``/proc/self/fd``: what is read is exactly what was checked.
3. **Nothing is overwritten.**  New names are created with ``O_CREAT | O_EXCL |
   O_NOFOLLOW``; renames use ``renameat2(RENAME_NOREPLACE)`` (or ``link()`` + ``unlink()``
   where the filesystem lacks it), which refuse an existing name instead of replacing it.
   Temporary files are removed on every failure.
4. **Changes inside a user's directory are made with the user's identity**
   (``acting_as``): the thread's filesystem uid and gid become the owner's, so the
   kernel itself refuses anything the owner could not do.  See ``docs/security.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from spoolscan.text import printable

O_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH: Final = getattr(os, "O_PATH", 0)
_O_WALK: Final = (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE: Final = 1
_MAX_SYMLINKS: Final = 40
_COPY_CHUNK: Final = 1024 * 1024
_PROC_FD: Final = "/proc/self/fd"

_libc = ctypes.CDLL(None, use_errno=True)


class UnsafeFile(Exception):
    """An entry spoolscan refuses to touch (a symlink, not a regular file or directory,
    an unexpected owner, an invalid name).  The message says which and why."""


# --- names -----------------------------------------------------------------------------


def check_name(name: str) -> str:
    """``name`` if it is one path component (no ``/``, not ``.``/``..``, no NUL, at most
    255 bytes); else UnsafeFile.  Names from users are never joined into paths unchecked."""
    raw = os.fsencode(name)
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > 255:
        raise UnsafeFile(f"{printable(name)!r} is not a valid file name")
    return name


# --- identity --------------------------------------------------------------------------


def _set_fsid(call: str, value: int) -> int:
    """setfsuid/setfsgid; returns the id now in effect (checked, not assumed)."""
    function = getattr(_libc, call)
    function(ctypes.c_uint(value))
    return int(function(ctypes.c_uint(0xFFFFFFFF)))  # an invalid id only reports


@contextlib.contextmanager
def acting_as(uid: int, gid: int) -> Iterator[None]:
    """Run the block with filesystem uid/gid ``uid``/``gid`` on this thread only.

    Linux keeps credentials per thread and setfsuid() is not broadcast to the other
    threads, so scanner threads keep root's identity meanwhile.  When the filesystem
    uid leaves 0, the kernel drops the filesystem capabilities (DAC override, chown,
    fowner...) from this thread: permission checks are the owner's.  Without root,
    this does nothing (we can only act as ourselves).
    """
    if os.geteuid() != 0 or uid == 0:
        yield
        return
    if os.getgroups():
        # Root needs no supplementary groups, and they would still count in permission
        # checks made with the owner's fsuid (e.g. a root-group-writable directory).
        os.setgroups([])
    if _set_fsid("setfsgid", gid) != gid or _set_fsid("setfsuid", uid) != uid:
        _set_fsid("setfsuid", 0)
        _set_fsid("setfsgid", 0)
        raise OSError(errno.EPERM, f"cannot take the filesystem identity {uid}:{gid}")
    try:
        yield
    finally:
        _set_fsid("setfsuid", 0)
        _set_fsid("setfsgid", 0)


# --- directories -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: a listing of 100,000 names
class Entry:
    """A name in a directory listing and what it is, without following it."""

    name: str
    kind: str  # "file" | "dir" | "symlink" | "other"


@dataclass
class OpenFile:
    """A regular file opened for reading, and its status when it was checked."""

    fd: int
    st: os.stat_result

    @property
    def key(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_files(results: Iterable[OpenFile | Exception]) -> None:
    """Close the files among the results of a batch of opens (the others are errors)."""
    for f in results:
        if isinstance(f, OpenFile):
            f.close()


class Directory:
    """An open directory: every operation is one name inside it (``*at()`` calls).

    ``path`` is for messages only; it is never used to reach the directory again.
    ``trusted``: only root can change the directory and every directory above it (no
    other user can swap anything on the way here).
    """

    def __init__(self, fd: int, path: str, trusted: bool = False, readable: bool = True
                 ) -> None:
        self.fd = fd
        self.path = path
        self.trusted = trusted
        self.readable = readable  # False: an O_PATH descriptor (no listing, no fsync)
        self.st = os.fstat(fd)

    # life cycle

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Directory({self.path!r})"

    def child_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    # looking

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry's status (symlinks not followed); None if it does not exist."""
        try:
            return os.stat(check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def entries(self) -> list[Entry]:
        """The names in this directory and their kinds (never followed)."""
        fd = os.open(".", O_DIR, dir_fd=self.fd)  # a fresh offset for each listing
        found: list[Entry] = []
        try:
            with os.scandir(fd) as it:
                for e in it:
                    try:
                        if e.is_symlink():
                            kind = "symlink"
                        elif e.is_dir(follow_symlinks=False):
                            kind = "dir"
                        elif e.is_file(follow_symlinks=False):
                            kind = "file"
                        else:
                            kind = "other"
                    except OSError:  # vanished while listing
                        continue
                    found.append(Entry(e.name, kind))
        finally:
            os.close(fd)
        return found

    # opening

    def open_dir(self, name: str, owners: tuple[int, ...] | None = None) -> Directory:
        """The subdirectory ``name`` (never a symlink).  ``owners``: the uids allowed to
        own it (UnsafeFile otherwise)."""
        path = self.child_path(name)
        try:
            fd = os.open(check_name(name), O_DIR, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFile(f"{printable(path)}: not a directory (a symlink or a file); "
                                 "not followed") from None
            raise
        child = Directory(fd, path, trusted=self.trusted and _root_only(os.fstat(fd)))
        if owners is not None and child.st.st_uid not in owners:
            uid = child.st.st_uid
            child.close()
            raise UnsafeFile(f"{printable(path)}: owned by uid {uid}, expected "
                             f"{' or '.join(map(str, owners))}; not used")
        return child

    def make_dir(self, name: str, mode: int) -> Directory:
        """The subdirectory ``name``, created with ``mode`` if missing (as the current
        filesystem identity, which then owns it)."""
        mode &= 0o777  # never set-id or sticky bits
        try:
            os.mkdir(check_name(name), mode, dir_fd=self.fd)
        except FileExistsError:
            return self.open_dir(name)
        child = self.open_dir(name)
        try:
            os.fchmod(child.fd, mode)  # the umask may have taken bits away
            self.fsync()
        except BaseException:
            child.close()
            raise
        return child

    def open_file(self, name: str, owner: int | None = None) -> OpenFile:
        """Open the regular file ``name`` for reading.

        Refuses (UnsafeFile) symlinks, FIFOs, devices, sockets and directories without
        ever opening them for reading, and files not owned by ``owner`` (when given).
        FileNotFoundError if there is no such name.
        """
        path = self.child_path(name)
        check_name(name)
        if _O_PATH and os.path.isdir(_PROC_FD):
            probe = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            try:
                st = os.fstat(probe)
                _check_regular(st, path, owner)
                # O_NONBLOCK: a file lease held by the owner makes the open fail at once
                # (EWOULDBLOCK: busy, tried again later) instead of waiting for the
                # lease to be broken (lease-break-time, 45 s) while a thread is blocked.
                fd = os.open(f"{_PROC_FD}/{probe}",
                             os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            finally:
                os.close(probe)
        else:  # no /proc: O_NONBLOCK keeps a FIFO from blocking, then check
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | os.O_CLOEXEC, dir_fd=self.fd)
            st = os.fstat(fd)
            try:
                _check_regular(st, path, owner)
            except UnsafeFile:
                os.close(fd)
                raise
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):  # cannot happen
            os.close(fd)
            raise UnsafeFile(f"{printable(path)}: changed while being opened")
        return OpenFile(fd, opened)

    # changing (exclusive: nothing is ever replaced)

    def create(self, name: str, mode: int = 0o600) -> int:
        """A new file ``name`` open for writing; FileExistsError if the name is taken
        (by anything, a dangling symlink included)."""
        mode &= 0o666  # a new file is never executable, set-id or sticky
        fd = os.open(check_name(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, mode, dir_fd=self.fd)
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def rename(self, name: str, target: Directory, target_name: str) -> None:
        """Move ``name`` to ``target/target_name``; FileExistsError if that name is taken.
        OSError(EXDEV) across filesystems."""
        rename_noreplace(self.fd, check_name(name), target.fd, check_name(target_name))

    def unlink(self, name: str) -> None:
        os.unlink(check_name(name), dir_fd=self.fd)

    def fsync(self) -> None:
        if self.readable:
            os.fsync(self.fd)


def kind_of(st: os.stat_result) -> str:
    """"file", "dir", "symlink" or "other" (FIFO, device, socket)."""
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


def _root_only(st: os.stat_result) -> bool:
    """Only root can change a directory with this status."""
    return st.st_uid == 0 and not st.st_mode & 0o022


def _check_regular(st: os.stat_result, path: str, owner: int | None) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFile(f"{printable(path)}: a symlink; never followed")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{printable(path)}: not a regular file ({_kind(st.st_mode)}); "
                         "never opened")
    if owner is not None and st.st_uid != owner:
        raise UnsafeFile(f"{printable(path)}: owned by uid {st.st_uid}, not by the mailbox "
                         f"owner ({owner}); not opened")


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "unknown type"


def open_directory(path: str | os.PathLike[str]) -> Directory:
    """Open the directory ``path`` (absolute), walking it one component at a time.

    A symlink on the way (the last component included) is followed only if root owns
    it and every directory walked so far can be changed by root alone (an admin's
    ``/home -> /srv/home``); anywhere else it is refused (UnsafeFile).
    """
    text = os.fspath(path)
    if not text.startswith("/"):
        raise ValueError(f"{text}: not an absolute path")
    todo = [p for p in os.path.normpath(text).split("/") if p]
    # The walk uses O_PATH: passing through a directory needs only its search permission
    # (an unprivileged worker reaches its store through 0711 directories); the last one
    # is opened for reading at the end.
    fd = os.open("/", _O_WALK)
    trusted = _root_only(os.fstat(fd))
    walked = "/"
    followed = 0
    try:
        while todo:
            part = todo.pop(0)
            if part == "..":
                # Only from a symlink target in root's part of the path: go up from there.
                next_fd = os.open("..", _O_WALK, dir_fd=fd)
            else:
                try:
                    next_fd = os.open(check_name(part), _O_WALK, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise
                    where = os.path.join(walked, part)
                    if not (trusted and st.st_uid == 0):
                        raise UnsafeFile(f"{printable(where)}: a symlink in a directory "
                                         "that a user can change; not followed") from None
                    followed += 1
                    if followed > _MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, f"{text}: too many symlinks") from None
                    target = os.readlink(part, dir_fd=fd)
                    todo = [p for p in target.split("/") if p and p != "."] + todo
                    if target.startswith("/"):
                        os.close(fd)
                        fd = os.open("/", _O_WALK)
                        walked = "/"
                    continue
            os.close(fd)
            fd = next_fd
            # O_PATH descriptors are fstat-able: the ownership check is on what was opened.
            trusted = trusted and _root_only(os.fstat(fd))
            walked = os.path.join(walked, part)
        try:
            final = os.open(".", O_DIR, dir_fd=fd)
        except PermissionError:
            # Searchable but not readable by us (a parent of our own directory): it can
            # still be worked in by name, not listed.
            return Directory(fd, os.path.normpath(text), trusted=trusted, readable=False)
        os.close(fd)
        return Directory(final, os.path.normpath(text), trusted=trusted)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def glob_dirs(pattern: str) -> list[str]:
    """The directories matching the glob ``pattern`` (absolute; ``*``, ``?``, ``[...]``
    within one component), found on the safe layer: each directory listed is opened by
    the safe walk, and a wildcard matches a symlink only in root's part of the tree.
    Components without a wildcard are not checked here (the caller opens the result)."""
    parts = [p for p in os.path.normpath(os.path.abspath(pattern)).split("/") if p]
    found: list[str] = []
    stack: list[tuple[str, int]] = [("/", 0)]
    while stack:
        path, index = stack.pop()
        if index == len(parts):
            found.append(path)
            continue
        part = parts[index]
        if not any(c in part for c in "*?["):
            stack.append((os.path.join(path, part), index + 1))
            continue
        try:
            with open_directory(path) as d:
                entries, trusted = d.entries(), d.trusted
        except (OSError, UnsafeFile):
            continue
        for e in entries:
            if e.name.startswith(".") and not part.startswith("."):
                continue  # as glob(): a wildcard does not match a leading dot
            if (e.kind == "dir" or e.kind == "symlink" and trusted) and fnmatch.fnmatchcase(
                    e.name, part):
                stack.append((os.path.join(path, e.name), index + 1))
    return sorted(found)


# --- moving, copying, syncing ----------------------------------------------------------


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """``renameat2(RENAME_NOREPLACE)``: FileExistsError instead of replacing ``dst``.

    Where the filesystem does not support it, ``link()`` then ``unlink()``: link refuses
    an existing name too, and a crash in between leaves two names, never none.
    """
    result = _libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst),
                             _RENAME_NOREPLACE)
    if result == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), src, None, dst)
    os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir)


def copy_fd(src: int, dst: int) -> int:
    """Copy the whole file ``src`` (from offset 0, whatever its file offset) to ``dst``;
    returns the bytes copied."""
    offset = 0
    while True:
        try:
            n = os.sendfile(dst, src, offset, _COPY_CHUNK)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            chunk = os.pread(src, _COPY_CHUNK, offset)
            n = len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
        if n == 0:
            return offset
        offset += n


def copy_stream(stream: BinaryIO, dst: int) -> int:
    """Copy what ``stream`` gives to ``dst`` in chunks; returns the bytes copied."""
    total = 0
    while chunk := stream.read(_COPY_CHUNK):
        view = memoryview(chunk)
        while view:
            written = os.write(dst, view)
            view = view[written:]
        total += len(chunk)
    return total


def temp_name() -> str:
    """A fresh temporary file name of fixed length (never derived from another name, so
    never too long), a dot-file that Maildir readers ignore."""
    return f".spoolscan.{os.urandom(8).hex()}.tmp"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of ``temp_name``'s."""
    return (len(name) == 31 and name.startswith(".spoolscan.") and name.endswith(".tmp")
            and all(c in "0123456789abcdef" for c in name[11:27]))


def snapshot(src: int, limit: int, directory: str | None = None,
             memory: int | None = None) -> tuple[int, int]:
    """A private copy of the file open at ``src``: (descriptor, size).

    At most ``limit + 1`` bytes are copied, so a size above ``limit`` means "larger than
    the limit" whatever the file grows to meanwhile.  The copy is an unnamed file
    (``O_TMPFILE``) in ``directory`` that nobody else can open, or, for a file of at most
    ``memory`` bytes, an anonymous one in memory (``memfd_create``: no file system work).
    A file that turns out larger than ``memory`` while it is copied (its owner made it
    grow) is copied again into ``directory``: what is kept in memory never exceeds
    ``memory + 1`` bytes.  A mailbox owner can change their file while it is being
    scanned, never the copy, so what is hashed, scanned, cached and quarantined is one
    and the same content.
    """
    if memory is not None and memory < limit and os.fstat(src).st_size <= memory:
        try:
            fd = os.memfd_create("spoolscan-copy", os.MFD_CLOEXEC)
        except (OSError, AttributeError):  # no memfd here: a file, as without ``memory``
            fd = -1
        if fd >= 0:
            try:
                copied = _copy_into(fd, src, memory)
            except BaseException:
                os.close(fd)
                raise
            if copied <= memory:
                os.lseek(fd, 0, os.SEEK_SET)
                return fd, copied
            os.close(fd)  # it grew: into the file system, from the start
    base = directory or tempfile.gettempdir()
    try:
        fd = os.open(base, os.O_TMPFILE | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:  # no O_TMPFILE there: a named file, unlinked at once
        fd, name = tempfile.mkstemp(dir=base)
        os.unlink(name)
    try:
        copied = _copy_into(fd, src, limit)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd, copied
    except BaseException:
        os.close(fd)
        raise


def _copy_into(fd: int, src: int, limit: int) -> int:
    """Copy at most ``limit + 1`` bytes of ``src`` (from its start) into ``fd``."""
    copied = 0
    while copied <= limit:
        try:
            n = os.sendfile(fd, src, copied, min(_COPY_CHUNK, limit + 1 - copied))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            chunk = os.pread(src, min(_COPY_CHUNK, limit + 1 - copied), copied)
            n = len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        if n == 0:
            break
        copied += n
    return copied


def write_new(directory: Directory, name: str, stream: BinaryIO, mode: int = 0o600,
              times_ns: tuple[int, int] | None = None) -> int:
    """Write ``stream`` into the new file ``directory/name`` durably: a temporary name
    created exclusively, fsync, then renamed into place without replacing anything.

    The temporary file is removed on any failure (ENOSPC included), so a failed write
    leaves nothing behind.  Returns the size written.
    """
    tmp = temp_name()
    fd = directory.create(tmp, mode)
    try:
        try:
            size = copy_stream(stream, fd)
            if times_ns is not None:
                os.utime(fd, ns=times_ns)
            os.fsync(fd)
        finally:
            os.close(fd)
        directory.rename(tmp, directory, name)
    except BaseException:
        with contextlib.suppress(OSError):
            directory.unlink(tmp)
        raise
    directory.fsync()
    return size
