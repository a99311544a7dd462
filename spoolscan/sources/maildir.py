"""Maildir mailboxes: watch them, sweep them, quarantine or delete infected mail.

*Mailboxes.*  Every directory matching the source's ``paths`` globs that is a Maildir is
a mailbox root; the globs are read again at every sweep, so mailboxes made later are
picked up.  Messages are the regular files in ``new/`` and ``cur/`` of the root and of its
Maildir++ folders (``.Name``); ``tmp/``, dot-files and the ``.Quarantine`` folder are never
scanned.  Symlinks are never followed, other non-regular files never opened: they are
reported once and left alone.  Everything is done through the broker on the safe file
layer (``spoolscan.mailbox``): reads with root's rights but never outside the mailbox,
changes with the mailbox owner's identity.

*Watching.*  One inotify instance for the source (made by the broker, which adds every
watch on a directory it opened safely): each mailbox root and folder (for folders made
later), and each folder's ``new/`` and ``cur/``.  A message arrives by rename (Dovecot,
possibly straight into ``cur/`` with ``:2,FLAGS``: ``IN_MOVED_TO``) or by link (Postfix
``local``/``virtual``: ``IN_CREATE``).  A rename within its folder (``new/X`` →
``cur/X:2,S``, flag changes) is paired by its cookie and ignored: same message.  When
events are lost (the kernel queue overflowed) or a folder appears, the mailboxes are
swept.

*Identity.*  ``<folder path>/<unique part>``: stable across Dovecot's renames.  A job or an
action whose file was renamed meanwhile finds it again by its unique part.

*Quarantine* (``quarantine``).  ``quarantine = "store"`` (the default): the scanned file
(same device and inode as scanned, checked) is copied into the admin's quarantine store,
then removed from the mailbox as its owner.  ``"folder"``: it is moved into the mailbox's
``.Quarantine`` Maildir++ folder (made if missing, with the root's mode) under the same
name, so with its flags, as the owner.  Either way a file that is not the scanned one is
not touched, and the message is scanned again.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from inotify_simple import flags as inflags

from spoolscan import fsutil
from spoolscan.broker import FIND_BATCH, Broker, MailboxListing
from spoolscan.config import Config, SourceConfig
from spoolscan.content import content_hash
from spoolscan.fsutil import UnsafeFile
from spoolscan.mailbox import QUARANTINE_FOLDER, SUBDIRS, Location, is_folder_name, unique_part
from spoolscan.model import (
    ActionOutcome,
    ContentUnavailable,
    Job,
    MessageInfo,
    Opened,
    Pending,
    State,
    Trigger,
)
from spoolscan.sources.base import EventReader, Sighting, Source, Submit, done, failed, missing
from spoolscan.store.repo import ActionRecord, Store
from spoolscan.text import printable

log = logging.getLogger(__name__)

KIND = "maildir"
_MESSAGE_MASK = inflags.CREATE | inflags.MOVED_TO | inflags.MOVED_FROM
_FOLDER_MASK = inflags.CREATE | inflags.MOVED_TO | inflags.ONLYDIR
_RENAMED_AGAIN = 3  # how often a message may be renamed under our feet before we give up
_COOKIES_KEPT = 1000  # unpaired MOVED_FROM events remembered (the pair may span reads)


@dataclass
class MaildirItem:
    """A job's payload: where the message is, and the device and inode of the file that
    was scanned (set when it is opened)."""

    loc: Location
    key: tuple[int, int] | None = None


@dataclass
class _RootWatch:
    key: tuple[int, int]
    wds: dict[tuple[str, str | None], int] = field(default_factory=dict)  # (folder, sub)


class MaildirSource(Source):
    """Maildir mailboxes.  See the module docstring."""

    kind = KIND
    held = False
    gone_reason = "no longer in the mailbox"

    def __init__(self, src: SourceConfig, config: Config, store: Store, broker: Broker
                 ) -> None:
        super().__init__(src, config, store, broker)
        self._rescan = threading.Event()  # events were lost: sweep everything
        self._rescan_roots: set[str] = set()  # a folder appeared there: sweep that mailbox
        self._watch_lock = threading.Lock()
        self._roots: dict[str, _RootWatch] = {}
        self._wd: dict[int, tuple[str, str, str | None]] = {}  # wd → (root, folder, sub)
        self._known_roots: list[str] = []
        self._moved_from: dict[int, tuple[str, str, str]] = {}
        # The mailbox of a directory, asked for every stored message a rescan or a
        # reconciliation looks at: a few hundred distinct directories for 100,000 rows.
        self._root_of_directory = functools.lru_cache(maxsize=4096)(self._match_root)

    # --- mailboxes ------------------------------------------------------------------------

    def roots(self) -> list[str]:
        """The mailbox roots matching the globs now (refusals reported once)."""
        roots, refused = self.broker.mailbox_roots(self.src.paths)
        for reason in refused:
            self.reporter.once(f"root:{reason}", f"{self.name}: {reason}")
        if self.src.shard is not None:
            roots = [r for r in roots if self.src.in_shard(r)]
        self._known_roots = roots
        return roots

    def _root_of(self, path: str) -> str | None:
        for root in sorted(self._known_roots or self.roots(), key=len, reverse=True):
            if path.startswith(root + "/"):
                return root
        return None

    def owns(self, row: dict) -> bool:
        """A stored message is this host's if its mailbox matches this source's globs and
        is in this host's shard (other hosts of one store have other mailboxes)."""
        root = self._mailbox_of(row["identity"])
        return root is not None and self.src.in_shard(root)

    def _mailbox_of(self, identity: str) -> str | None:
        """The mailbox root of a stored message: the shortest directory above it that one
        of the globs matches (a Maildir++ folder is below its root; the root's own name
        may start with a dot, as ``~/.maildir`` does)."""
        return self._root_of_directory(identity.rpartition("/")[0])

    def _match_root(self, directory: str) -> str | None:
        """The shortest of ``directory`` and the directories above it that one of the
        globs matches."""
        patterns = [os.path.normpath(p) for p in self.src.paths]
        parts = directory.split("/")
        for i in range(2, len(parts) + 1):  # "/a", "/a/b", ... up to ``directory``
            candidate = "/".join(parts[:i])
            if any(fnmatch.fnmatchcase(candidate, p) for p in patterns):
                return candidate
        return None

    def _listing(self, root: str) -> MailboxListing | None:
        try:
            listing = self.broker.mailbox_listing(root)
        except UnsafeFile as exc:
            self.stats["refused"] += 1
            self.reporter.once(f"root:{exc}", f"{self.name}: mailbox refused: {exc}")
            return None
        except OSError as exc:
            log.warning("%s: %s: cannot list the mailbox: %s", self.name, printable(root),
                        exc.strerror or exc)
            return None
        for reason in listing.refused:
            self.stats["refused"] += 1
            self.reporter.once(f"folder:{reason}", f"{self.name}: folder refused: {reason}")
        return listing

    # --- hooks: finding messages --------------------------------------------------------------

    def sightings(self) -> Iterator[Sighting]:
        roots = self.roots()
        self._forget_vanished_roots(roots)
        for root in roots:
            yield from self._mailbox_sightings(root)

    def _mailbox_sightings(self, root: str) -> Iterator[Sighting]:
        listing = self._listing(root)
        if listing is None:
            return
        self._sync_watches(listing)
        for folder in listing.folders:
            skipped: Counter[str] = Counter()
            example = ""
            seen: set[str] = set()
            for sub, name, kind in folder.entries:
                loc = Location(root, folder.folder, sub, name)
                if kind != "file":
                    skipped[kind] += 1
                    example = example or loc.path
                    continue
                identity = loc.identity
                if identity in seen:
                    # Two files with one unique part (new/X and cur/X:2,S): not a real
                    # Maildir state; each is a message of its own, so both are scanned.
                    identity = f"{loc.folder_path}/{sub}/{name}"
                seen.add(loc.identity)
                yield Sighting(identity, loc)
            if skipped:
                self._skipped(root, folder.folder, skipped, example)

    def _skipped(self, root: str, folder: str, kinds: Counter[str], example: str) -> None:
        """One line per folder (not per entry: a user can make millions), repeated only
        when the numbers change."""
        total = sum(kinds.values())
        self.stats["skipped"] += total
        what = ", ".join(f"{n} {k if k != 'other' else 'FIFO/device/socket'}"
                         for k, n in sorted(kinds.items()))
        where = f"{root}/{folder}" if folder else root
        self.reporter.once(f"skip:{where}:{sorted(kinds.items())}",
                           f"{self.name}: {where}: {total} entries skipped ({what}; never "
                           f"followed or opened), e.g. {example}")

    def _place(self, row: dict) -> tuple[str, str, str] | None:
        """(mailbox root, folder, unique part) of a stored message's identity; None if
        no configured mailbox holds it."""
        folder_path, _, unique = row["identity"].rpartition("/")
        root = self._root_of(folder_path + "/")
        if root is None:
            return None
        folder = folder_path[len(root) + 1:] if folder_path != root else ""
        if folder and not is_folder_name(folder):
            return None
        return root, folder, unique

    def locate(self, row: dict) -> Sighting | None:
        place = self._place(row)
        if place is None:
            return None
        root, folder, unique = place
        try:
            loc = self.broker.mailbox_find(root, folder, unique)
        except (OSError, UnsafeFile):
            return None
        return None if loc is None else Sighting(loc.identity, loc)

    def jobs_for(self, rows: Sequence[dict], trigger: Trigger) -> list[Job | None]:
        """``job_for`` of each row, the messages of one folder looked for with one request
        to the helper.  A message found as a regular file of the owner carries its key
        and its size as listed (a rescan may then answer from the cache without opening
        it); anything else is left to the open, which says what is wrong."""
        jobs: list[Job | None] = [None] * len(rows)
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for i, row in enumerate(rows):
            place = self._place(row)
            if place is not None:
                groups.setdefault(place[:2], []).append((i, place[2]))
        for (root, folder), wanted in groups.items():
            for start in range(0, len(wanted), FIND_BATCH):
                part = wanted[start:start + FIND_BATCH]
                try:
                    found = self.broker.mailbox_find_many(root, folder, [u for _, u in part])
                except (OSError, UnsafeFile):  # the mailbox itself: as locate() says
                    continue
                for (i, _), f in zip(part, found, strict=True):
                    if f is None or isinstance(f, Exception):
                        continue  # no longer there (or unreachable): as locate() says
                    job = self.job(Sighting(f.loc.identity, f.loc), trigger)
                    if f.kind == "file" and f.owned:
                        job.payload.key = f.key
                        job.listed_size = f.size
                    jobs[i] = job
        return jobs

    def job(self, sighting: Sighting, trigger: Trigger = Trigger.ARRIVAL) -> Job:
        loc: Location = sighting.data
        info = MessageInfo(source=self.name, kind=KIND, identity=sighting.identity,
                           location=loc.path, mailbox=loc.root)
        item = MaildirItem(loc)
        job = Job(info=info, open=lambda: self._open(job), trigger=trigger, payload=item)
        return job

    @contextlib.contextmanager
    def _open(self, job: Job) -> Iterator[Opened]:
        """Open a job's file; if it was renamed meanwhile (``new/X`` → ``cur/X:2,S``), find
        it again by its unique part.  Records the file scanned and where it is."""
        item: MaildirItem = job.payload
        opened = None
        for _ in range(_RENAMED_AGAIN):
            try:
                opened = self.broker.mailbox_open(item.loc)
                break
            except FileNotFoundError:
                found = self._find(item.loc)
                if found is None or found == item.loc:
                    raise ContentUnavailable(f"{item.loc.path}: no longer exists",
                                             gone=True) from None
                item.loc = found
            except (UnsafeFile, OSError) as exc:
                raise ContentUnavailable(f"{printable(str(exc))}") from None
        if opened is None:
            raise ContentUnavailable(f"{item.loc.path}: renamed again and again")
        with opened:
            item.key = opened.key
            # The modification time is when the message was delivered, as far as the
            # mailbox says (IMAP servers show it as the received date).
            delivered = datetime.fromtimestamp(opened.st.st_mtime, UTC)
            if job.info.location != item.loc.path or job.info.arrived_at != delivered:
                job.info = replace(job.info, location=item.loc.path, arrived_at=delivered)
            with open(opened.fd, "rb", buffering=0, closefd=False) as stream:
                # shared: the owner can change it while we read; the scan uses a copy.
                yield Opened(stream=stream, fd=opened.fd,  # type: ignore[arg-type]
                             size=opened.st.st_size, shared=True)

    def _find(self, loc: Location) -> Location | None:
        try:
            return self.broker.mailbox_find(loc.root, loc.folder, loc.unique)
        except (OSError, UnsafeFile):
            return None

    # --- watching -----------------------------------------------------------------------------

    def start(self, submit: Submit) -> None:
        """Watch every mailbox; submit a job for each message that arrives."""
        self.handed.clear()
        if self.src.sweep_only:
            # A network store: inotify sees only this host's own changes.  The sweeps
            # (every sweep_interval) find everything.
            log.info("%s: sweeps only, every %gs, of the mailboxes matching %s%s", self.name,
                     self.src.sweep_interval, ", ".join(self.src.paths),
                     f" (shard {self.src.shard[0]}/{self.src.shard[1]})"
                     if self.src.shard else "")
            return
        self._watch_in_background(self._watch_loop, submit)
        roots = self.roots()
        for root in roots:
            listing = self._listing(root)
            if listing is not None:
                self._sync_watches(listing)
        log.info("%s: watching %d of %d mailbox(es) matching %s", self.name,
                 len(self._roots), len(roots), ", ".join(self.src.paths))

    def _forget_watches(self) -> None:
        with self._watch_lock:
            self._roots.clear()
            self._wd.clear()

    def watched(self) -> list[str]:
        """The mailbox roots being watched now."""
        with self._watch_lock:
            return sorted(self._roots)

    def _forget_vanished_roots(self, roots: list[str]) -> None:
        with self._watch_lock:
            for root in set(self._roots) - set(roots):
                self._unwatch_root(root)

    def _unwatch_root(self, root: str) -> None:
        watch = self._roots.pop(root)
        for wd in watch.wds.values():
            self._wd.pop(wd, None)
            if self._watch_fd is not None:
                self.broker.unwatch(self._watch_fd, wd)

    def _sync_watches(self, listing: MailboxListing) -> None:
        """Watch what the listing shows and is not watched yet (a root made again is a
        new root)."""
        with self._watch_lock:
            if self._watch_fd is None:
                return
            root = listing.root
            watch = self._roots.get(root)
            if watch is not None and watch.key != listing.key:
                self._unwatch_root(root)
                watch = None
            if watch is None:
                watch = self._roots[root] = _RootWatch(listing.key)
            wanted: list[tuple[str, str | None]] = [("", None)]
            for found in listing.folders:
                wanted += [(found.folder, None), *((found.folder, s) for s in SUBDIRS)]
            for folder, sub in dict.fromkeys(wanted):
                if (folder, sub) in watch.wds:
                    continue
                mask = _FOLDER_MASK if sub is None else _MESSAGE_MASK
                try:
                    wd = self.broker.watch_mailbox(self._watch_fd, root, folder, sub, mask)
                except (OSError, UnsafeFile) as exc:
                    hint = ""
                    if getattr(exc, "errno", None) == errno.ENOSPC:
                        hint = " (raise the sysctl fs.inotify.max_user_watches)"
                    self.reporter.once(f"watch:{root}/{folder}/{sub}",
                                       f"{self.name}: cannot watch {root}/{folder} {sub or ''}:"
                                       f" {exc}{hint}; covered by the sweeps only, every "
                                       f"{self.src.sweep_interval:g}s")
                    continue
                watch.wds[(folder, sub)] = wd
                self._wd[wd] = (root, folder, sub)

    def _watch_loop(self, submit: Submit) -> None:
        fd = self._watch_fd
        reader = EventReader(fd) if fd is not None else None
        while not self._stop.is_set():
            if self._rescan.is_set():
                self._rescan.clear()
                try:
                    for job in self.sweep():
                        if self._stop.is_set():
                            break
                        submit(job)
                except Exception:
                    log.exception("%s: sweep after lost events failed", self.name)
                continue
            with self._watch_lock:
                roots, self._rescan_roots = self._rescan_roots, set()
            for root in sorted(roots):
                try:
                    self._sweep_mailbox(root, submit)
                except Exception:
                    log.exception("%s: %s: sweep after a new folder failed", self.name,
                                  printable(root))
            if reader is None:
                self._stop.wait(0.5)
                continue
            try:
                events = reader.read(200)
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("%s: inotify read failed: %s", self.name, exc)
                self._stop.wait(1.0)
                continue
            try:
                for loc in self._arrivals(events):
                    self._arrived(loc, submit)
            except Exception:
                log.exception("%s: new mail not looked at now (the next sweep will)",
                              self.name)

    def _arrivals(self, events: list) -> list[Location]:  # type: ignore[type-arg]
        """The messages that arrived according to one read of events (renames within a
        folder paired by cookie and left out)."""
        moved_from = self._moved_from  # cookie → (root, folder, unique), across reads
        found: dict[Location, None] = {}
        for event in events:
            if event.mask & inflags.Q_OVERFLOW:
                self._lost("the inotify event queue overflowed")
                continue
            if event.mask & inflags.IGNORED:
                with self._watch_lock:
                    self._wd.pop(event.wd, None)
                continue
            with self._watch_lock:
                target = self._wd.get(event.wd)
            if target is None or not event.name:
                continue
            root, folder, sub = target
            if sub is None:  # a folder (or its new/, cur/) appeared: watch it, sweep it
                if event.mask & inflags.ISDIR and (
                        folder or (is_folder_name(event.name)
                                   and event.name != QUARANTINE_FOLDER)):
                    with self._watch_lock:
                        self._rescan_roots.add(root)
                continue
            if event.mask & inflags.ISDIR or event.name.startswith("."):
                continue
            if event.mask & inflags.MOVED_FROM:
                moved_from[event.cookie] = (root, folder, unique_part(event.name))
                while len(moved_from) > _COOKIES_KEPT:
                    moved_from.pop(next(iter(moved_from)))
                continue
            before = moved_from.pop(event.cookie, None) if event.cookie else None
            if before == (root, folder, unique_part(event.name)):
                continue  # the same message, renamed in its folder (seen, flags)
            found[Location(root, folder, sub, event.name)] = None
        return list(found)

    def _sweep_mailbox(self, root: str, submit: Submit) -> None:
        """Watch and sweep one mailbox (a folder appeared in it: messages may have landed
        before its watches were in place)."""
        batch = list(self._mailbox_sightings(root))
        for job in self._due(batch):
            if self._stop.is_set():
                return
            submit(job)

    def _lost(self, why: str) -> None:
        self.stats["events_lost"] += 1
        if not self._rescan.is_set():
            log.warning("%s: %s; sweeping all mailboxes", self.name, why)
            self._rescan.set()

    def _arrived(self, loc: Location, submit: Submit) -> None:
        try:
            kind = self.broker.mailbox_kind(loc)
        except (OSError, UnsafeFile):
            return  # the folder itself is refused or gone: the sweep reports it
        if kind is None:
            found = self._find(loc)  # renamed already (new/X → cur/X:2,S)
            if found is None:
                return
            loc = found
            kind = "file"
        if kind != "file":
            self.stats["skipped"] += 1  # reported by the sweep, once per folder
            return
        if not self.handed.claim(loc.identity, None):
            return
        self.stats["arrived"] += 1
        submit(self.job(Sighting(loc.identity, loc)))

    # --- acting ---------------------------------------------------------------------------------

    def quarantine_target(self, pending: Pending) -> str | None:
        if self.src.quarantine == "folder":
            return None  # the name in .Quarantine is known once the file is moved
        return super().quarantine_target(pending)

    def release(self, items: list[Pending]) -> list[ActionRecord]:
        return [failed(p, "release is not possible in a mailbox", state=State.STUCK)
                for p in items]

    def quarantine(self, items: list[Pending]) -> list[ActionRecord]:
        return [self._act_one(p, self._quarantine_one) for p in items]

    def delete(self, items: list[Pending]) -> list[ActionRecord]:
        return [self._act_one(p, self._delete_one) for p in items]

    def _act_one(self, p: Pending, operation) -> ActionRecord:  # type: ignore[no-untyped-def]
        item: MaildirItem = p.outcome.job.payload
        original = item.loc.path
        try:
            for _ in range(_RENAMED_AGAIN):
                try:
                    return operation(p, item)
                except FileNotFoundError:
                    found = self._find(item.loc)
                    if found is None or found == item.loc:
                        return missing(p, f"{printable(item.loc.path)}: no longer exists",
                                       original_path=original)
                    item.loc = found
            return missing(p, f"{printable(original)}: keeps being renamed",
                           original_path=original)
        except (UnsafeFile, ContentUnavailable) as exc:
            return failed(p, printable(str(exc)), original_path=original)
        except OSError as exc:
            detail = f"{printable(exc.filename or original)}: {exc.strerror or exc}"
            return failed(p, detail, original_path=original)

    def _quarantine_one(self, p: Pending, item: MaildirItem) -> ActionRecord:
        if item.key is None:
            raise ContentUnavailable(f"{item.loc.path}: was never opened; not touched")
        if self.src.quarantine == "folder":
            moved = self.broker.mailbox_quarantine(item.loc, item.key)
            return done(p, quarantine_path=moved.path, original_path=item.loc.path,
                        location=moved.path)
        assert p.target is not None
        with self.broker.mailbox_open(item.loc) as opened:
            if opened.key != item.key:
                raise UnsafeFile(f"{item.loc.path}: replaced since it was scanned; not "
                                 "touched (it will be scanned again)")
            # What goes into the store is a private copy whose content is the content that
            # was judged (same hash), however the owner changes their file meanwhile.
            snap_fd, size = fsutil.snapshot(opened.fd, self.config.policy.max_size,
                                            self.quarantine_store.directory
                                            if os.path.isdir(self.quarantine_store.directory)
                                            else None)
            st = opened.st
        with open(snap_fd, "rb", closefd=True) as copy:
            if content_hash(copy)[0] != p.outcome.info.content_hash:
                raise UnsafeFile(f"{item.loc.path}: its content changed since it was "
                                 "scanned; not quarantined (it will be scanned again)")
            copy.seek(0)
            meta = {
                "message_id": p.message_id, "scan_id": p.scan_id, "source": self.name,
                "kind": KIND, "root": item.loc.root, "folder": item.loc.folder,
                "subdir": item.loc.subdir, "name": item.loc.name,
                "owner": st.st_uid, "mtime_ns": st.st_mtime_ns, "size": size,
                "signature": p.outcome.result.signature,
                "verdict": p.outcome.result.verdict,
                "content_sha256": p.outcome.info.content_hash,
                "quarantined_at": datetime.now(UTC).isoformat(),
            }
            self.quarantine_store.put(p.target, copy, meta,
                                      times_ns=(st.st_atime_ns, st.st_mtime_ns))
        try:
            self.broker.mailbox_remove(item.loc, item.key)
        except BaseException:
            # Not removed from the mailbox: this copy is not a quarantine (the next
            # attempt makes its own).
            self.quarantine_store.remove(p.target)
            raise
        return done(p, quarantine_path=p.target, original_path=item.loc.path,
                    location=p.target)

    def _delete_one(self, p: Pending, item: MaildirItem) -> ActionRecord:
        if item.key is None:
            raise ContentUnavailable(f"{item.loc.path}: was never opened; not touched")
        self.broker.mailbox_remove(item.loc, item.key)
        return done(p, original_path=item.loc.path)

    def completed(self, row: dict, intent: dict) -> ActionRecord | None:
        ids = (row["id"], intent["scan_id"])
        if intent["action"] == "delete":
            return ActionRecord(*ids, "delete", ActionOutcome.OK, "done before an "
                                "interruption", state=State.DONE,
                                original_path=row["location"])
        if intent["action"] != "quarantine":
            return None
        where = intent["quarantine_path"]
        if where and not self.quarantine_store.exists(where):
            where = None
        if where is None:  # folder mode: look in the mailbox's .Quarantine
            folder_path, _, unique = row["identity"].rpartition("/")
            root = self._root_of(folder_path + "/")
            if root is not None:
                found = None
                with contextlib.suppress(OSError, UnsafeFile):
                    found = self.broker.mailbox_find(root, QUARANTINE_FOLDER, unique)
                where = found.path if found else None
        if where is None:
            return None
        return ActionRecord(*ids, "quarantine", ActionOutcome.OK, "moved before an "
                            "interruption", state=State.DONE, quarantine_path=where,
                            original_path=row["location"], location=where)
