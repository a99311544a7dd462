"""Privilege separation: the code that reads mail does not run as root.

Started as root, ``spoolscan run`` (and ``rescan``, ``scan``, ``quarantine``) splits in two
processes, in the manner of OpenSSH's privileged monitor:

* the **helper** keeps root and does only what needs it: the broker's operations
  (``spoolscan.broker``): open a held queue file or a mailbox message and pass the open
  descriptor, list and watch the directories, move or delete mail as the mailbox owner,
  run ``postsuper`` with validated queue IDs.  It parses no mail.  It accepts requests
  only for the mailboxes, queue directories and Postfix instances of the configuration
  (and the paths named on a ``scan`` command line), so a compromised worker cannot make
  it reach anything else.  It ignores SIGTERM and SIGINT (the worker may still need it to
  finish what is in flight) and ends when the worker closes its connections or dies;
* the **worker** (this process, after ``start()``) drops to ``[privileges] user``: it
  parses queue files and headers, hashes, talks to clamd and the database, and decides.
  Its uid, gid and groups are the user's, with no way back (``setresuid``, then
  ``PR_SET_NO_NEW_PRIVS``).

They talk over a few Unix socket pairs made before the fork: a request is one frame (a
4-byte length, then JSON), a reply one frame plus, for an opened file or an inotify
instance, the descriptor itself (``SCM_RIGHTS``).  Names travel as JSON strings with
undecodable bytes kept (lone surrogates), so nothing is lost or re-encoded.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import logging
import os
import pwd
import queue
import signal
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from spoolscan.broker import (
    FIND_BATCH,
    OPEN_BATCH,
    Broker,
    FolderListing,
    Found,
    MailboxListing,
)
from spoolscan.config import Config, ConfigError
from spoolscan.fsutil import OpenFile, UnsafeFile
from spoolscan.mailbox import Location
from spoolscan.postfix import commands
from spoolscan.postfix.queuedir import HoldEntry
from spoolscan.store.url import sqlite_path
from spoolscan.text import printable

log = logging.getLogger(__name__)

_FRAME: Final = struct.Struct("!I")
_MAX_FRAME: Final = 256 * 1024 * 1024
_MAX_FDS: Final = 64
_CTRUNC: Final = int(socket.MSG_CTRUNC)
CONNECTIONS: Final = 16  # concurrent requests (scanner threads, committer, watchers)
_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NAME: Final = 15
_PR_SET_NO_NEW_PRIVS: Final = 38
_libc = ctypes.CDLL(None, use_errno=True)


class HelperError(RuntimeError):
    """The privileged helper is gone or broke the protocol: nothing more can be done to
    mail; the worker stops (and systemd restarts it)."""


# --- the wire --------------------------------------------------------------------------------


def _send(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    payload = json.dumps(obj, separators=(",", ":")).encode("ascii")
    header = _FRAME.pack(len(payload))
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.sendall(header)
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            raise EOFError("connection closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    head, fds, flags, _ = socket.recv_fds(sock, _FRAME.size, _MAX_FDS)
    if not head:
        raise EOFError("connection closed")
    if flags & _CTRUNC:
        for fd in fds:
            os.close(fd)
        raise HelperError("descriptors were lost in transit")
    if len(head) < _FRAME.size:
        head += _recv_exact(sock, _FRAME.size - len(head))
    (length,) = _FRAME.unpack(head)
    if length > _MAX_FRAME:
        raise HelperError(f"frame of {length} bytes")
    return json.loads(_recv_exact(sock, length)), list(fds)


# --- what the helper allows ------------------------------------------------------------------


def _matches(pattern: str, path: str) -> bool:
    """``path`` matches the glob ``pattern`` component by component (``*`` never spans
    a ``/``), as ``glob.glob`` would have found it."""
    pat = [p for p in os.path.normpath(pattern).split("/") if p]
    parts = [p for p in os.path.normpath(path).split("/") if p]
    return len(pat) == len(parts) and all(
        fnmatch.fnmatchcase(part, p) for part, p in zip(parts, pat, strict=True))


def _under(path: str, prefixes: Iterable[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


@dataclass
class Policy:
    """What the worker may ask the helper for: the configuration's mailboxes and Postfix
    instances, and the paths named on a ``scan`` command line."""

    patterns: tuple[str, ...] = ()
    config_dirs: frozenset[str] = frozenset()
    queue_dirs: frozenset[str] = frozenset()
    scan_paths: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config, scan_paths: Sequence[str] = ()) -> Policy:
        patterns = tuple(os.path.abspath(p) for s in config.sources if s.type == "maildir"
                         for p in s.paths)
        config_dirs = [s.config_directory for s in config.sources
                       if s.type == "postfix-hold"]
        queue_dirs = []
        for directory in config_dirs:
            try:
                queue_dirs.append(str(commands.queue_directory(directory)))
            except commands.PostfixCommandError as exc:
                log.error("%s", exc)
        return cls(patterns, frozenset(config_dirs), frozenset(queue_dirs),
                   tuple(os.path.normpath(os.path.abspath(p)) for p in scan_paths))

    def root(self, root: str) -> str:
        if any(_matches(p, root) for p in self.patterns) or _under(root, self.scan_paths):
            return root
        raise PermissionError(f"{printable(root)} is not a mailbox of the configuration")

    def location(self, loc: Location) -> Location:
        self.root(loc.root)
        return loc

    def path(self, path: str) -> str:
        if _under(path, self.scan_paths):
            return path
        raise PermissionError(f"{printable(path)} was not named on the command line")

    def pattern_list(self, patterns: Sequence[str]) -> list[str]:
        for p in patterns:
            if os.path.abspath(p) not in self.patterns and not _under(p, self.scan_paths):
                raise PermissionError(f"{printable(p)} is not a configured mailbox pattern")
        return list(patterns)

    def queue_dir(self, queue_dir: str) -> str:
        if queue_dir in self.queue_dirs:
            return queue_dir
        raise PermissionError(f"{printable(queue_dir)} is not a configured queue directory")

    def config_dir(self, config_dir: str) -> str:
        if config_dir in self.config_dirs:
            return config_dir
        raise PermissionError(f"{printable(config_dir)} is not a configured Postfix")


# --- encoding results ------------------------------------------------------------------------


def _loc(d: dict) -> Location:
    return Location(str(d["root"]), str(d["folder"]), str(d["subdir"]), str(d["name"]))


def _opened_many(files: Sequence[OpenFile | Exception]) -> _Reply:
    """A ``*_open_many`` reply: per file the position of its descriptor, or its error."""
    result: list = []
    fds: list[int] = []
    for f in files:
        if isinstance(f, OpenFile):
            result.append(len(fds))
            fds.append(f.fd)
        else:
            result.append(_error_json(f))
    return _Reply(result, fds)


def _loc_json(loc: Location | None) -> dict | None:
    return None if loc is None else {"root": loc.root, "folder": loc.folder,
                                     "subdir": loc.subdir, "name": loc.name}


def _key(value: Any) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def _entry_json(e: HoldEntry | None) -> list | None:
    return None if e is None else [e.rel, e.ino, e.mode, e.mtime_ns]


def _entry(v: list | None) -> HoldEntry | None:
    return None if v is None else HoldEntry(str(v[0]), int(v[1]), int(v[2]), int(v[3]))


_ERRORS: dict[str, type[OSError]] = {
    "FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError,
    "PermissionError": PermissionError, "IsADirectoryError": IsADirectoryError,
    "NotADirectoryError": NotADirectoryError,
}


def _error_json(exc: BaseException) -> dict:
    kind = type(exc).__name__
    if isinstance(exc, UnsafeFile):
        kind = "UnsafeFile"
    elif isinstance(exc, commands.PostfixCommandError):
        kind = "PostfixCommandError"
    elif isinstance(exc, commands.InvalidQueueId):
        kind = "InvalidQueueId"
    elif isinstance(exc, OSError) and kind not in _ERRORS:
        kind = "OSError"
    errno_ = exc.errno if isinstance(exc, OSError) else None
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    filename = exc.filename if isinstance(exc, OSError) else None
    return {"type": kind, "errno": errno_, "message": text,
            "filename": filename if isinstance(filename, str) else None}


def _exception(err: dict) -> Exception:
    """The exception the helper's ``_error_json`` described."""
    kind, message = err.get("type"), str(err.get("message"))
    if kind == "UnsafeFile":
        return UnsafeFile(message)
    if kind == "PostfixCommandError":
        return commands.PostfixCommandError(message)
    if kind == "InvalidQueueId":
        return commands.InvalidQueueId(message)
    if kind in _ERRORS or kind == "OSError":
        cls = _ERRORS.get(str(kind), OSError)
        if err.get("errno") is not None:
            return cls(err["errno"], message, err.get("filename"))
        return cls(message)
    return HelperError(f"the privileged helper failed: {kind}: {message}")


def _raise(err: dict) -> None:
    raise _exception(err)


# --- the helper ------------------------------------------------------------------------------


@dataclass
class _Reply:
    result: Any = None
    fds: list[int] = field(default_factory=list)  # sent, then closed here


class Helper:
    """Serves the worker's requests with a local Broker, within the Policy."""

    def __init__(self, broker: Broker, policy: Policy, config_path: str | None = None,
                 scan_paths: Sequence[str] = ()) -> None:
        self.broker = broker
        self.policy = policy
        self.config_path = config_path
        self.scan_paths = tuple(scan_paths)
        b = broker

        def p() -> Policy:  # the policy in force now (a reload replaces it)
            return self.policy

        def opened(f: OpenFile) -> _Reply:
            return _Reply(True, [f.fd])

        def listing(m: MailboxListing) -> dict:
            return {"root": m.root, "uid": m.uid, "key": list(m.key), "refused": m.refused,
                    "folders": [[f.folder, [list(e) for e in f.entries]] for f in m.folders]}

        self.ops: dict[str, Callable[..., Any]] = {
            "mailbox_roots": lambda pats: list(b.mailbox_roots(p().pattern_list(pats))),
            "mailbox_listing": lambda root, q: listing(b.mailbox_listing(p().root(root), q)),
            "mailbox_open": lambda loc: opened(b.mailbox_open(p().location(_loc(loc)))),
            "mailbox_kind": lambda loc: b.mailbox_kind(p().location(_loc(loc))),
            "mailbox_find": lambda root, folder, unique: _loc_json(
                b.mailbox_find(p().root(root), folder, unique)),
            "mailbox_find_many": self.mailbox_find_many,
            "mailbox_quarantine": lambda loc, key: _loc_json(
                b.mailbox_quarantine(p().location(_loc(loc)), _key(key))),  # type: ignore[arg-type]
            "mailbox_remove": lambda loc, key: b.mailbox_remove(p().location(_loc(loc)),
                                                                _key(key)),
            "mailbox_move_back": lambda loc, folder, key: _loc_json(
                b.mailbox_move_back(p().location(_loc(loc)), folder, _key(key))),
            "path_kind": lambda path: b.path_kind(p().path(path)),
            "path_entries": lambda path: [list(e) for e in b.path_entries(p().path(path))],
            "path_open": lambda path: opened(b.path_open(p().path(path))),
            "path_open_many": self.path_open_many,
            "hold_open_many": self.hold_open_many,
            "postfix_info": lambda cd: list(b.postfix_info(p().config_dir(cd))),
            "hold_entries": lambda qd: (lambda r: [[_entry_json(e) for e in r[0]], r[1]])(
                b.hold_entries(p().queue_dir(qd))),
            "hold_names": lambda qd: list(b.hold_names(p().queue_dir(qd))),
            "hold_backlog": lambda qd: list(b.hold_backlog(p().queue_dir(qd))),
            "hold_subdirs": lambda qd: b.hold_subdirs(p().queue_dir(qd)),
            "hold_stat": lambda qd, rel: _entry_json(b.hold_stat(p().queue_dir(qd), rel)),
            "hold_stat_many": lambda qd, rels: [_entry_json(e) for e in b.hold_stat_many(
                p().queue_dir(qd), [str(r) for r in rels])],
            "hold_open": lambda qd, rel: opened(b.hold_open(p().queue_dir(qd), rel)),
            "hold_find": lambda qd, qid: b.hold_find(p().queue_dir(qd), qid),
            "postsuper_release": lambda cd, ids: sorted(
                b.postsuper_release(p().config_dir(cd), ids)),
            "postsuper_delete": lambda cd, ids: sorted(
                b.postsuper_delete(p().config_dir(cd), ids)),
            "wake_qmgr": lambda qd: b.wake_qmgr(p().queue_dir(qd)),
            "flush": lambda cd, ids: b.flush(p().config_dir(cd), ids),
            "watcher": lambda: (lambda fd: _Reply(fd, [os.dup(fd)]))(b.watcher()),
            "close_watcher": b.close_watcher,
            "watch_hold": lambda wid, qd, rel, mask: b.watch_hold(wid, p().queue_dir(qd), rel,
                                                                  mask),
            "watch_mailbox": lambda wid, root, folder, sub, mask: b.watch_mailbox(
                wid, p().root(root), folder, sub, mask),
            "unwatch": b.unwatch,
            "reload": self.reload,
        }

    def reload(self) -> None:
        """Re-read the configuration file (the helper's own copy of its path: the worker
        cannot point it elsewhere) and allow what it now configures."""
        from spoolscan.config import load_config

        if self.config_path is None:
            return
        self.policy = Policy.from_config(load_config(self.config_path), self.scan_paths)

    def mailbox_find_many(self, root: str, folder: str, uniques: list) -> list:
        if len(uniques) > FIND_BATCH:
            raise HelperError(f"mailbox_find_many: more than {FIND_BATCH} names")
        out: list = []
        for f in self.broker.mailbox_find_many(self.policy.root(root), str(folder),
                                               [str(u) for u in uniques]):
            if f is None:
                out.append(None)
            elif isinstance(f, Exception):
                out.append({"error": _error_json(f)})
            else:
                out.append({"loc": _loc_json(f.loc), "size": f.size, "key": list(f.key),
                            "kind": f.kind, "owned": f.owned})
        return out

    def path_open_many(self, directory: str, names: list) -> _Reply:
        """Files of one directory named on the command line: per name the position of
        its descriptor, or the error that refused it."""
        names = [str(n) for n in names]
        if len(names) > OPEN_BATCH:
            raise HelperError(f"path_open_many: more than {OPEN_BATCH} names")
        for name in names:  # each name is checked as one component by the broker
            self.policy.path(os.path.join(directory, name))
        return _opened_many(self.broker.path_open_many(directory, names))

    def hold_open_many(self, queue_dir: str, rels: list) -> _Reply:
        """Held files: per name the position of its descriptor, or the error that
        refused it (names are checked by the queue directory's ``split_rel``)."""
        rels = [str(r) for r in rels]
        if len(rels) > OPEN_BATCH:
            raise HelperError(f"hold_open_many: more than {OPEN_BATCH} names")
        return _opened_many(self.broker.hold_open_many(self.policy.queue_dir(queue_dir), rels))

    def restore(self, args: list, fds: list[int]) -> _Reply:
        loc, times = _loc(args[0]), args[1]
        if len(fds) != 1:
            raise HelperError("restore needs one descriptor")
        return _Reply(_loc_json(self.broker.mailbox_restore(
            self.policy.location(loc), fds[0], tuple(times) if times else None)))

    def inject(self, args: list, fds: list[int]) -> _Reply:
        config_dir, sender, recipients, token = args
        if len(fds) != 1:
            raise HelperError("hold_inject needs one descriptor")
        self.broker.hold_inject(self.policy.config_dir(config_dir), str(sender),
                                [str(r) for r in recipients], str(token), fds[0])
        return _Reply(None)

    def handle(self, request: dict, fds: list[int]) -> _Reply:
        op, args = request.get("op"), request.get("args", [])
        try:
            if op == "mailbox_restore":
                return self.restore(args, fds)
            if op == "hold_inject":
                return self.inject(args, fds)
            handler = self.ops.get(str(op))
            if handler is None:
                raise HelperError(f"unknown operation {op!r}")
            result = handler(*args)
            return result if isinstance(result, _Reply) else _Reply(result)
        finally:
            for fd in fds:
                os.close(fd)

    def serve(self, sock: socket.socket) -> None:
        """Answer one connection until the worker closes it."""
        with sock:
            while True:
                try:
                    request, fds = _recv(sock)
                except (EOFError, ConnectionError, OSError):
                    return
                try:
                    reply = self.handle(request, fds)
                    answer: dict = {"ok": reply.result}
                except Exception as exc:
                    reply, answer = _Reply(), {"error": _error_json(exc)}
                try:
                    _send(sock, answer, reply.fds)
                except OSError:
                    return
                finally:
                    for fd in reply.fds:
                        os.close(fd)


def _serve_forever(helper: Helper, socks: list[socket.socket]) -> None:
    threads = [threading.Thread(target=helper.serve, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- the worker's side -----------------------------------------------------------------------


class RemoteBroker:
    """The Broker interface, carried out by the privileged helper."""

    def __init__(self, socks: list[socket.socket], helper_pid: int) -> None:
        self.helper_pid = helper_pid
        self._free: queue.Queue[socket.socket] = queue.Queue()
        for s in socks:
            self._free.put(s)
        self._socks = socks
        self._watchers: dict[int, int] = {}  # our inotify fd → the helper's id

    def _call(self, op: str, *args: Any, fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        sock = self._free.get()
        try:
            try:
                _send(sock, {"op": op, "args": list(args)}, fds)
                answer, received = _recv(sock)
            except (EOFError, OSError) as exc:
                raise HelperError(f"the privileged helper is gone ({exc}); spoolscan must "
                                  "be restarted") from None
        finally:
            self._free.put(sock)
        if "error" in answer:
            for fd in received:
                os.close(fd)
            _raise(answer["error"])
        return answer.get("ok"), received

    def _value(self, op: str, *args: Any) -> Any:
        return self._call(op, *args)[0]

    def _file(self, op: str, *args: Any) -> OpenFile:
        _, fds = self._call(op, *args)
        if len(fds) != 1:
            raise HelperError(f"{op}: no descriptor received")
        return OpenFile(fds[0], os.fstat(fds[0]))

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        for fd in list(self._watchers):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.helper_pid, 0)

    # Maildir mailboxes

    def mailbox_roots(self, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
        roots, refused = self._value("mailbox_roots", list(patterns))
        return list(roots), list(refused)

    def mailbox_listing(self, root: str, include_quarantine: bool = False) -> MailboxListing:
        d = self._value("mailbox_listing", root, include_quarantine)
        return MailboxListing(d["root"], d["uid"], _key(d["key"]) or (0, 0),  # type: ignore[arg-type]
                              [FolderListing(f, [tuple(e) for e in entries])  # type: ignore[misc]
                               for f, entries in d["folders"]], list(d["refused"]))

    def mailbox_open(self, loc: Location) -> OpenFile:
        return self._file("mailbox_open", _loc_json(loc))

    def mailbox_kind(self, loc: Location) -> str | None:
        return self._value("mailbox_kind", _loc_json(loc))

    def mailbox_find_many(self, root: str, folder: str, uniques: Sequence[str]
                          ) -> list[Found | None | Exception]:
        out: list[Found | None | Exception] = []
        for r in self._value("mailbox_find_many", root, folder, list(uniques)):
            if r is None:
                out.append(None)
            elif "error" in r:
                out.append(_exception(r["error"]))
            else:
                out.append(Found(_loc(r["loc"]), int(r["size"]), _key(r["key"]),  # type: ignore[arg-type]
                                 str(r["kind"]), bool(r["owned"])))
        return out

    def mailbox_find(self, root: str, folder: str, unique: str) -> Location | None:
        found = self._value("mailbox_find", root, folder, unique)
        return None if found is None else _loc(found)

    def mailbox_quarantine(self, loc: Location, key: tuple[int, int]) -> Location:
        return _loc(self._value("mailbox_quarantine", _loc_json(loc), list(key)))

    def mailbox_remove(self, loc: Location, key: tuple[int, int] | None) -> None:
        self._value("mailbox_remove", _loc_json(loc), list(key) if key else None)

    def mailbox_restore(self, loc: Location, content_fd: int,
                        times_ns: tuple[int, int] | None = None) -> Location:
        result, _ = self._call("mailbox_restore", _loc_json(loc),
                               list(times_ns) if times_ns else None, fds=[content_fd])
        return _loc(result)

    def mailbox_move_back(self, loc: Location, folder: str,
                          key: tuple[int, int] | None) -> Location:
        return _loc(self._value("mailbox_move_back", _loc_json(loc), folder,
                                list(key) if key else None))

    # any file

    def path_kind(self, path: str) -> str | None:
        return self._value("path_kind", path)

    def path_entries(self, path: str) -> list[tuple[str, str]]:
        return [(str(n), str(k)) for n, k in self._value("path_entries", path)]

    def path_open(self, path: str) -> OpenFile:
        return self._file("path_open", path)

    def path_open_many(self, directory: str, names: Sequence[str]
                       ) -> list[OpenFile | Exception]:
        return self._files("path_open_many", directory, list(names))

    def _files(self, op: str, *args: Any) -> list[OpenFile | Exception]:
        """The reply of a ``*_open_many`` request: per name its file or its error."""
        result, fds = self._call(op, *args)
        try:
            return [OpenFile(fds[r], os.fstat(fds[r])) if isinstance(r, int)
                    else _exception(r) for r in result]
        except BaseException:
            for fd in fds:  # a malformed reply: nothing received may stay open
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    # the Postfix hold queue

    def postfix_info(self, config_dir: str) -> tuple[str, str]:
        queue_dir, host = self._value("postfix_info", config_dir)
        return str(queue_dir), str(host)

    def hold_entries(self, queue_dir: str) -> tuple[list[HoldEntry], list[str]]:
        entries, strange = self._value("hold_entries", queue_dir)
        return [e for e in map(_entry, entries) if e is not None], list(strange)

    def hold_names(self, queue_dir: str) -> tuple[str, list[str]]:
        names, strange = self._value("hold_names", queue_dir)
        return str(names), [str(s) for s in strange]

    def hold_backlog(self, queue_dir: str) -> tuple[int, int]:
        count, oldest = self._value("hold_backlog", queue_dir)
        return int(count), int(oldest)

    def hold_subdirs(self, queue_dir: str) -> list[str]:
        return list(self._value("hold_subdirs", queue_dir))

    def hold_stat(self, queue_dir: str, rel: str) -> HoldEntry | None:
        return _entry(self._value("hold_stat", queue_dir, rel))

    def hold_stat_many(self, queue_dir: str, rels: Sequence[str]) -> list[HoldEntry | None]:
        return [_entry(e) for e in self._value("hold_stat_many", queue_dir, list(rels))]

    def hold_open(self, queue_dir: str, rel: str) -> OpenFile:
        return self._file("hold_open", queue_dir, rel)

    def hold_open_many(self, queue_dir: str, rels: Sequence[str]
                       ) -> list[OpenFile | Exception]:
        return self._files("hold_open_many", queue_dir, list(rels))

    def hold_find(self, queue_dir: str, queue_id: str) -> list[str]:
        return list(self._value("hold_find", queue_dir, queue_id))

    def postsuper_release(self, config_dir: str, ids: Iterable[str]) -> set[str]:
        return set(self._value("postsuper_release", config_dir, list(ids)))

    def postsuper_delete(self, config_dir: str, ids: Iterable[str]) -> set[str]:
        return set(self._value("postsuper_delete", config_dir, list(ids)))

    def wake_qmgr(self, queue_dir: str) -> bool:
        return bool(self._value("wake_qmgr", queue_dir))

    def flush(self, config_dir: str, ids: Sequence[str]) -> None:
        self._value("flush", config_dir, list(ids))

    def hold_inject(self, config_dir: str, sender: str, recipients: Sequence[str],
                    token: str, content_fd: int) -> None:
        self._call("hold_inject", config_dir, sender, list(recipients), token,
                   fds=[content_fd])

    # watching

    def watcher(self) -> int:
        remote, fds = self._call("watcher")
        if len(fds) != 1:
            raise HelperError("watcher: no descriptor received")
        self._watchers[fds[0]] = int(remote)
        return fds[0]

    def close_watcher(self, fd: int) -> None:
        remote = self._watchers.pop(fd, None)
        with contextlib.suppress(OSError):
            os.close(fd)
        if remote is not None:
            with contextlib.suppress(HelperError):
                self._value("close_watcher", remote)

    def watch_hold(self, fd: int, queue_dir: str, rel: str, mask: int) -> int:
        return int(self._value("watch_hold", self._watchers[fd], queue_dir, rel, mask))

    def watch_mailbox(self, fd: int, root: str, folder: str, sub: str | None, mask: int
                      ) -> int:
        return int(self._value("watch_mailbox", self._watchers[fd], root, folder, sub, mask))

    def unwatch(self, fd: int, wd: int) -> None:
        remote = self._watchers.get(fd)
        if remote is not None:
            self._value("unwatch", remote, wd)

    def reload(self) -> None:
        """Have the helper re-read the configuration (SIGHUP: sources added, removed)."""
        self._value("reload")


# --- starting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def run_as(config: Config) -> User:
    """The user the worker runs as (ConfigError if it does not exist)."""
    name = config.privileges.user
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"[privileges] user {name!r} does not exist: create it (adduser --system "
            f"--group --home /var/lib/spoolscan {name}), or name another user") from None
    if pw.pw_uid == 0:
        raise ConfigError(f"[privileges] user {name!r} is root: name an unprivileged user, "
                          'or write user = "root" to keep everything in one process')
    return User(name, pw.pw_uid, pw.pw_gid)


def hand_over(config: Config, user: User) -> None:
    """Before dropping root: give the worker what it must write (the SQLite database and
    the quarantine store), without touching anyone else's directories."""
    database = sqlite_path(config.database.url)
    if database is not None:
        path = os.path.abspath(database)
        directory = os.path.dirname(path)
        _give_dir(directory, user, "the database directory (SQLite writes its journal "
                                   "beside the file)")
        for name in (path, f"{path}-wal", f"{path}-shm", f"{path}-journal"):
            _give_file(name, user)
    _give_tree(os.path.abspath(config.quarantine.directory), user)


def _give_file(name: str, user: User) -> None:
    """Hand a database file made by root over to the worker's user.  The directory is the
    worker's: what is chowned is the file opened (never through a symlink), and only a
    plain file with one link, so that a name planted there cannot make root hand over
    someone else's file (a hard link to it, or a swap between a check and the chown)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            return
        raise ConfigError(f"{name}: cannot be opened as a plain file: {exc.strerror}; "
                          "remove it or make it the database's own file") from None
    try:
        st = os.fstat(fd)
        if st.st_uid == user.uid:
            return
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ConfigError(f"{name}: not a plain file with a single link; not handed "
                              f"over to {user.name}: check what it is, then remove it")
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)


def _give_dir(directory: str, user: User, what: str) -> None:
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o750)
        os.chown(directory, user.uid, user.gid)
        return
    st = os.stat(directory)
    writable = (st.st_uid == user.uid and st.st_mode & 0o200
                or st.st_gid == user.gid and st.st_mode & 0o020 or st.st_mode & 0o002)
    if not writable:
        raise ConfigError(f"{directory}: {what} must be writable by the user "
                          f"{user.name}: chown {user.name} {directory}")


def _give_tree(base: str, user: User) -> None:
    """The quarantine store: created for the user, or handed over from root (a store
    made before privilege separation).  Never followed through a symlink."""
    if not os.path.lexists(base):
        os.makedirs(os.path.dirname(base), mode=0o755, exist_ok=True)
        os.mkdir(base, 0o700)
        os.chown(base, user.uid, user.gid)
        return
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, user.uid):
        return  # the store's own checks will refuse it, with a reason
    if st.st_uid == 0:
        for _top, dirs, files, fd in os.fwalk(base, follow_symlinks=False):
            for name in dirs + files:
                os.chown(name, user.uid, user.gid, dir_fd=fd, follow_symlinks=False)
        os.chown(base, user.uid, user.gid, follow_symlinks=False)


def _drop_to(user: User) -> None:
    os.initgroups(user.name, user.gid)  # e.g. a group that may use clamd's socket
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise RuntimeError("could not drop privileges")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise RuntimeError("privileges could be regained after dropping them")
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


#: Modules imported lazily by the libraries the worker uses: loaded while still root, in
#: case the interpreter lives where the worker's user cannot read (e.g. under /root).
_PRELOAD: Final = ("concurrent.futures.thread", "encodings.idna", "json.decoder",
                   "sqlalchemy.dialects.sqlite.pysqlite", "sqlalchemy.dialects.postgresql",
                   "psycopg", "sqlalchemy.sql.default_comparator", "apscheduler.executors.pool",
                   "apscheduler.jobstores.memory", "apscheduler.triggers.cron",
                   "apscheduler.schedulers.background", "alembic.command",
                   "alembic.runtime.migration", "spoolscan.pipeline", "spoolscan.sources.hold",
                   "spoolscan.sources.maildir", "spoolscan.rescan", "spoolscan.schedule",
                   "spoolscan.ondemand", "spoolscan.quarantine.commands")


def _preload() -> None:
    """Import ``_PRELOAD`` now, unless the worker's user can read the interpreter, the
    libraries and spoolscan itself anyway (then a command starts faster without)."""
    import importlib
    import sysconfig

    places = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib",
                                                      "platlib")}
    places.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if all(_world_readable(p) for p in places):
        return
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _world_readable(path: str) -> bool:
    """True if any user can list ``path`` and reach it (o+rx on it, o+x above it)."""
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        parent = os.path.dirname(path)
        while parent != path:
            if not os.stat(parent).st_mode & 0o001:
                return False
            path, parent = parent, os.path.dirname(parent)
    except OSError:
        return False
    return True


def start(config: Config, scan_paths: Sequence[str] = ()) -> RemoteBroker:
    """Fork the privileged helper and drop this process to ``[privileges] user``.

    Call it as root, before any thread is started.  Returns the broker the worker uses.
    """
    user = run_as(config)
    _preload()
    hand_over(config, user)
    policy = Policy.from_config(config, scan_paths)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(CONNECTIONS)]
    pid = os.fork()
    if pid == 0:  # the helper
        code = 0
        try:
            for mine, _ in pairs:
                mine.close()
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _libc.prctl(_PR_SET_NAME, b"spoolscan-priv", 0, 0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            if os.getppid() == 1:  # the worker died before the death signal was set
                os._exit(1)
            _serve_forever(Helper(Broker(), policy, config.path, scan_paths),
                           [theirs for _, theirs in pairs])
        except BaseException:
            log.exception("the privileged helper failed")
            code = 1
        finally:
            os._exit(code)
    for _, theirs in pairs:
        theirs.close()
    try:
        _drop_to(user)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    log.debug("privileged helper %d started; working as %s (uid %d)", pid, user.name,
              user.uid)
    return RemoteBroker([mine for mine, _ in pairs], pid)
