"""`spoolscan quarantine`: list, show, release, delete and purge quarantined mail.

A message is in quarantine while its latest successful action is ``quarantine``; the
action row says where it went (``quarantine_path``) and where it came from
(``original_path``).  Releasing or deleting records a new action, so the history stays in
the store and ``v_scans`` shows what happened.

Where the quarantined copy is decides how it is reached, always on the safe file layer:
in the quarantine store (``spoolscan.quarantine.store``) it belongs to spoolscan; in a
mailbox's ``.Quarantine`` folder it belongs to the mailbox owner, and is read, moved or
deleted through the broker, as the owner, never by following a path a user could swap.

Release puts a Maildir message back where it was (same folder, same name, so its flags)
and marks it ``released``: no later scan quarantines it again for the same signature.

Mail quarantined from the Postfix hold queue is released by re-injecting the copy through
that Postfix's ``sendmail`` with its original envelope (sender, recipients) and one more
header, ``X-Spoolscan-Release: <ticket>``.  The re-injected copy is held like any other
mail; the worker finds the ticket while hashing it, and the store matches it to the
release (same sender, no other recipient) and consumes it in the transaction that
records the verdict: that copy is released whatever its verdict, once; a second copy
with the same ticket, or one with another envelope, is treated as any other mail.  The
ticket is 128 random bits known only to the store.  Nothing in Postfix's configuration
changes for this (no second pickup service without header checks): the copy takes the
normal path, milters and checks included.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text

from spoolscan.broker import Broker
from spoolscan.config import Config, ConfigError
from spoolscan.fsutil import OpenFile, UnsafeFile
from spoolscan.mailbox import QUARANTINE_FOLDER, Location, is_folder_name
from spoolscan.model import Action, ActionOutcome, State
from spoolscan.quarantine.store import QuarantineStore
from spoolscan.store.repo import ReleaseExists, Store, as_utc, utcnow
from spoolscan.text import escape, printable, unescape

log = logging.getLogger(__name__)

_IN_QUARANTINE = """
SELECT m.id AS id, a.completed_at AS quarantined_at, m.source, m.kind, m.location,
       m.identity, m.queue_id, m.sender, m.recipients, m.signature, m.content_hash,
       a.quarantine_path, a.original_path, a.scan_id, m.subject, m.header_from,
       m.message_id
FROM messages m
JOIN actions a ON a.id = (SELECT max(a2.id) FROM actions a2
                          WHERE a2.message_id = m.id AND a2.outcome = 'ok')
WHERE a.action = 'quarantine'
"""
_LAST_OK = """
SELECT a.action, a.completed_at, a.detail FROM actions a
WHERE a.message_id = :id AND a.outcome = 'ok' ORDER BY a.id DESC LIMIT 1
"""
_HEADER_LIMIT = 64 * 1024


class QuarantineError(Exception):
    """The operation is not possible; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    id: int
    quarantined_at: datetime | None
    source: str
    kind: str
    location: str
    identity: str
    queue_id: str | None
    sender: str | None
    recipients: str | None
    signature: str | None
    quarantine_path: str | None
    original_path: str | None
    scan_id: int | None
    subject: str | None = None
    header_from: str | None = None
    message_id: str | None = None  # the Message-ID header

    def as_json(self) -> dict:
        """For output: texts escaped by the storage rule (valid JSON, lossless)."""
        return {
            "id": self.id,
            "quarantined_at": self.quarantined_at.isoformat() if self.quarantined_at else None,
            "source": self.source, "kind": self.kind, "queue_id": self.queue_id,
            "sender": escape(self.sender), "recipients": escape(self.recipients),
            "subject": escape(self.subject), "from": escape(self.header_from),
            "message_id": escape(self.message_id),
            "signature": self.signature, "quarantine_path": escape(self.quarantine_path),
            "original_path": escape(self.original_path),
        }

    def describe(self) -> list[str]:
        """``name  value`` lines for `show`, each made safe for a terminal."""
        values = {**self.as_json(), "sender": self.sender, "recipients": self.recipients,
                  "subject": self.subject, "from": self.header_from,
                  "message_id": self.message_id, "quarantine_path": self.quarantine_path,
                  "original_path": self.original_path}
        return [printable(f"{key:16} {'' if value is None else value}")
                for key, value in values.items()]


def _entry(row: dict) -> Entry:
    # Texts come back escaped (spoolscan.text): names and paths as the exact bytes again.
    return Entry(id=row["id"], quarantined_at=_timestamp(row["quarantined_at"]),
                 source=row["source"], kind=row["kind"], location=unescape(row["location"]),
                 identity=unescape(row["identity"]), queue_id=row["queue_id"],
                 sender=unescape(row["sender"]), recipients=unescape(row["recipients"]),
                 signature=row["signature"],
                 quarantine_path=unescape(row["quarantine_path"]),
                 original_path=unescape(row["original_path"]), scan_id=row["scan_id"],
                 subject=unescape(row["subject"]), header_from=unescape(row["header_from"]),
                 message_id=unescape(row["message_id"]))


def _timestamp(value: object) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return as_utc(value)
    return as_utc(datetime.fromisoformat(str(value)))  # SQLite text through text()


def entries(store: Store, since: datetime | None = None) -> list[Entry]:
    """Quarantined messages, newest first."""
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(text(_IN_QUARANTINE)).mappings()]
    found = [_entry(r) for r in rows]
    if since is not None:
        found = [e for e in found if e.quarantined_at and e.quarantined_at >= since]
    return sorted(found, key=lambda e: e.quarantined_at or datetime.min, reverse=True)


def get(store: Store, message_id: int) -> Entry:
    with store.engine.connect() as conn:
        row = conn.execute(text(_IN_QUARANTINE + " AND m.id = :id"),
                           {"id": message_id}).mappings().first()
        last = None if row else conn.execute(text(_LAST_OK), {"id": message_id}).first()
    if row is not None:
        return _entry(dict(row))
    if last is not None and last.action in (Action.RESTORE, Action.DELETE):
        when = _timestamp(last.completed_at)
        on = f" on {when:%Y-%m-%d %H:%M} UTC" if when else ""
        if last.action == Action.DELETE:
            how = "purged" if (last.detail or "").startswith("purged") else "deleted"
            raise QuarantineError(f"message {message_id} was {how} from quarantine{on}: "
                                  "it is gone, there is nothing to release")
        detail = f" ({printable(unescape(last.detail))})" if last.detail else ""
        release = store.release_of(message_id)
        if release is not None and release["released_queue_id"]:
            detail += f"; its copy left the hold queue as {release['released_queue_id']}"
        elif release is not None:
            detail += "; its copy has not passed the hold queue yet"
        raise QuarantineError(f"message {message_id} was already released{on}{detail}")
    raise QuarantineError(f"message {message_id} is not in quarantine (see "
                          "`spoolscan quarantine list`)")


# --- where the copy is -----------------------------------------------------------------------


class _Copy:
    """A quarantined copy: in the quarantine store, or in a mailbox's .Quarantine folder."""

    def __init__(self, config: Config, entry: Entry, broker: Broker) -> None:
        self.entry = entry
        self.broker = broker
        self.store = QuarantineStore(config.quarantine.directory)
        path = entry.quarantine_path or ""
        self.in_store = self.store.contains(path)
        self.folder_loc: Location | None = None
        if not self.in_store:
            root, sep, rest = path.partition(f"/{QUARANTINE_FOLDER}/")
            sub, _, name = rest.partition("/")
            if not sep or not root or "/" in name or not name:
                raise QuarantineError(f"message {entry.id}: the store does not say where its "
                                      f"quarantined copy is ({printable(path)!r})")
            self.folder_loc = Location(root, QUARANTINE_FOLDER, sub, name)

    def gone(self) -> QuarantineError:
        return QuarantineError(f"message {self.entry.id}: the quarantined copy "
                               f"{printable(self.entry.quarantine_path or '')} no longer "
                               "exists (purged or deleted)")

    def open(self) -> OpenFile:
        try:
            if self.in_store:
                return self.store.open(self.entry.quarantine_path or "")
            assert self.folder_loc is not None
            return self.broker.mailbox_open(self.folder_loc)
        except FileNotFoundError:
            raise self.gone() from None
        except UnsafeFile as exc:
            raise QuarantineError(f"message {self.entry.id}: {exc}") from None

    def remove(self) -> None:
        if self.in_store:
            self.store.remove(self.entry.quarantine_path or "")
            return
        assert self.folder_loc is not None
        with contextlib.suppress(FileNotFoundError):
            self.broker.mailbox_remove(self.folder_loc, None)


def _original(entry: Entry, copy: _Copy) -> Location:
    """Where a quarantined Maildir message came from (root, folder, subdir, name)."""
    meta = copy.store.meta(entry.quarantine_path or "") if copy.in_store else {}
    if all(isinstance(meta.get(k), str) for k in ("root", "folder", "subdir", "name")):
        return Location(str(meta["root"]), str(meta["folder"]), str(meta["subdir"]),
                        str(meta["name"]))
    folder_path = entry.identity.rpartition("/")[0]
    head, _, last = folder_path.rpartition("/")
    root = head if is_folder_name(last) else folder_path
    loc = Location.from_path(entry.original_path or "", root)
    if loc is None:
        raise QuarantineError(f"message {entry.id}: the store does not say where it came "
                              "from")
    return loc


# --- the commands ---------------------------------------------------------------------------


def headers(config: Config, entry: Entry, broker: Broker | None = None) -> str:
    """The header section of the quarantined message (for `show`), made safe to print."""
    if not entry.quarantine_path:
        return ""
    copy = _Copy(config, entry, broker or Broker())
    with copy.open() as opened:
        head = os.pread(opened.fd, _HEADER_LIMIT, 0)
    end = head.find(b"\n\n")
    if end < 0:
        end = head.find(b"\r\n\r\n")
    text_ = head[: end if end >= 0 else len(head)].decode("utf-8", "surrogateescape")
    return "\n".join(printable(line.rstrip("\r")) for line in text_.split("\n"))


def who() -> str:
    """The login name of the admin running the command (behind sudo, the real one)."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def release(store: Store, config: Config, entry: Entry, broker: Broker | None = None,
            dry_run: bool = False) -> str:
    """Release a quarantined message; returns where it went (``dry_run``: where it would
    go, nothing done).  A Maildir message goes back where it was and is then
    ``released``: no later scan quarantines it again for the same signature.  A message
    from the hold queue is re-injected (see the module docstring)."""
    broker = broker or Broker()
    if entry.kind == "postfix-hold":
        return _release_held(store, config, entry, broker, dry_run)
    copy = _Copy(config, entry, broker)
    target = _original(entry, copy)
    if dry_run:
        return target.path
    try:
        if copy.in_store:
            with copy.open() as opened:
                released = broker.mailbox_restore(
                    target, opened.fd, (opened.st.st_atime_ns, opened.st.st_mtime_ns))
        else:
            assert copy.folder_loc is not None
            released = broker.mailbox_move_back(copy.folder_loc, target.folder, None)
    except FileExistsError:
        raise QuarantineError(f"message {entry.id}: {printable(target.path)} exists; not "
                              "overwriting it") from None
    except FileNotFoundError:
        raise QuarantineError(f"message {entry.id}: the folder of {printable(target.path)} "
                              "no longer exists, or the copy is gone") from None
    except UnsafeFile as exc:
        raise QuarantineError(f"message {entry.id}: {exc}") from None
    store.record_action(entry.id, entry.scan_id, Action.RESTORE, ActionOutcome.OK,
                        f"released from quarantine by {who()}", state=State.RELEASED,
                        original_path=entry.quarantine_path, location=released.path)
    if copy.in_store:
        copy.remove()
    return released.path


def _release_held(store: Store, config: Config, entry: Entry, broker: Broker,
                  dry_run: bool) -> str:
    copy = _Copy(config, entry, broker)
    if not copy.in_store:
        raise QuarantineError(f"message {entry.id}: its copy is not in the quarantine store")
    meta = copy.store.meta(entry.quarantine_path or "")
    sender, recipients = meta.get("sender"), meta.get("recipients")
    if not (isinstance(sender, str) and isinstance(recipients, list) and recipients
            and all(isinstance(r, str) for r in recipients)):
        raise QuarantineError(f"message {entry.id}: the envelope of its copy is missing "
                              f"or incomplete ({printable(entry.quarantine_path or '')}"
                              "/../meta.json); it cannot be re-injected as it was")
    try:
        config_dir = config.source(entry.source).config_directory
    except ConfigError:
        raise QuarantineError(f"message {entry.id} came from the source {entry.source!r}, "
                              "which is no longer configured: add it back to release "
                              "the message") from None
    where = f"the Postfix of {config_dir}"
    envelope = (f"from <{printable(sender)}> to "
                + ", ".join(f"<{printable(r)}>" for r in recipients))
    if dry_run:
        return f"{where}, {envelope} (it is then released when it passes the hold queue)"
    with copy.open() as opened:
        token = secrets.token_hex(16)
        try:
            release_id = store.create_release(entry.id, token, who(), sender, recipients)
        except ReleaseExists:
            raise QuarantineError(f"message {entry.id} was already released") from None
        try:
            broker.hold_inject(config_dir, sender, recipients, token, opened.fd)
        except Exception as exc:
            store.cancel_release(release_id)
            raise QuarantineError(f"message {entry.id}: could not re-inject it into "
                                  f"{where}: {printable(str(exc))}; nothing was "
                                  "released") from None
    store.record_action(entry.id, entry.scan_id, Action.RESTORE, ActionOutcome.OK,
                        f"released from quarantine by {who()}: re-injected into {where} "
                        f"{envelope} (release {release_id})", state=State.RELEASED,
                        original_path=entry.quarantine_path)
    copy.remove()
    return f"{where} (release {release_id}), {envelope}"


def delete(store: Store, config: Config, entry: Entry, broker: Broker | None = None,
           reason: str | None = None) -> None:
    """Delete the quarantined copy for good (QuarantineError if it cannot be)."""
    if entry.quarantine_path:
        try:
            _Copy(config, entry, broker or Broker()).remove()
        except QuarantineError as exc:
            if "does not say where" not in str(exc):
                raise
        except (OSError, UnsafeFile) as exc:
            raise QuarantineError(f"message {entry.id}: the quarantined copy cannot be "
                                  f"deleted: {exc}") from None
    store.record_action(entry.id, entry.scan_id, Action.DELETE, ActionOutcome.OK,
                        reason or f"deleted from quarantine by {who()}", state=State.DONE,
                        quarantine_path=entry.quarantine_path)


def purge(store: Store, config: Config, older_than_days: int,
          broker: Broker | None = None) -> int:
    """Delete quarantined copies older than ``older_than_days``; returns how many."""
    broker = broker or Broker()
    cutoff = utcnow().timestamp() - older_than_days * 86400
    old = [e for e in entries(store)
           if e.quarantined_at and e.quarantined_at.timestamp() < cutoff]
    deleted = 0
    for entry in old:
        # One entry that cannot be deleted (its owner swapped their .Quarantine folder,
        # say) must not stop the purge of everybody else's.
        try:
            delete(store, config, entry, broker,
                   reason=f"purged: quarantined more than {older_than_days} days ago")
            deleted += 1
        except Exception as exc:
            log.error("purge: %s", printable(str(exc)))
    return deleted


def format_entry(entry: Entry) -> str:
    when = entry.quarantined_at.strftime("%Y-%m-%d %H:%M") if entry.quarantined_at else "?"
    who_ = entry.queue_id or entry.location.rpartition("/")[2]
    return printable(f"{entry.id:>7}  {when}  {entry.source:10.10}  "
                     f"{entry.signature or '':36.36}  {who_}  {entry.subject or ''}")


def dump(entry: Entry) -> str:
    return json.dumps(entry.as_json())
