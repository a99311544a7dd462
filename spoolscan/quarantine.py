"""`spoolscan quarantine`: list, show, release, delete and purge quarantined mail.

A message is in quarantine while its latest successful action is ``quarantine`` (a later
failed or "gone" attempt by another process does not take it out of the list); the
action row says where it went (``quarantine_path``) and where it came from
(``original_path``).  Releasing or deleting records a new action, so the history stays in
the store and ``v_scans`` shows what happened.

Release puts a Maildir message back where it was (same folder, same name, so its flags).
Mail quarantined from the Postfix hold queue is not re-injected by spoolscan: re-injected
mail would pass the hold rule and be scanned (and quarantined) again, so the command
prints the file and the ``sendmail`` line for an admin who decided to deliver it anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import text

from spoolscan.store.repo import DONE, Store, as_utc, utcnow

_IN_QUARANTINE = """
SELECT m.id AS id, a.completed_at AS quarantined_at, m.source, m.kind, m.location,
       m.queue_id, m.sender, m.recipients, m.signature, m.content_hash,
       a.quarantine_path, a.original_path, a.scan_id
FROM messages m
JOIN actions a ON a.id = (SELECT max(a2.id) FROM actions a2
                          WHERE a2.message_id = m.id AND a2.outcome = 'ok')
WHERE a.action = 'quarantine'
"""


class QuarantineError(Exception):
    """The operation is not possible; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    id: int
    quarantined_at: datetime | None
    source: str
    kind: str
    location: str
    queue_id: str | None
    sender: str | None
    recipients: str | None
    signature: str | None
    quarantine_path: str | None
    original_path: str | None
    scan_id: int | None

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "quarantined_at": self.quarantined_at.isoformat() if self.quarantined_at else None,
            "source": self.source, "kind": self.kind, "queue_id": self.queue_id,
            "sender": self.sender, "recipients": self.recipients,
            "signature": self.signature, "quarantine_path": self.quarantine_path,
            "original_path": self.original_path,
        }


def _entry(row: dict) -> Entry:
    return Entry(id=row["id"], quarantined_at=_timestamp(row["quarantined_at"]),
                 source=row["source"], kind=row["kind"], location=row["location"],
                 queue_id=row["queue_id"], sender=row["sender"], recipients=row["recipients"],
                 signature=row["signature"], quarantine_path=row["quarantine_path"],
                 original_path=row["original_path"], scan_id=row["scan_id"])


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
    if row is None:
        raise QuarantineError(f"message {message_id} is not in quarantine (see "
                              "`spoolscan quarantine list`)")
    return _entry(dict(row))


def headers(entry: Entry, limit: int = 64 * 1024) -> str:
    """The header section of the quarantined message (for `show`)."""
    if not entry.quarantine_path:
        return ""
    with open(entry.quarantine_path, "rb") as fh:
        head = fh.read(limit)
    end = head.find(b"\n\n")
    if end < 0:
        end = head.find(b"\r\n\r\n")
    return head[: end if end >= 0 else len(head)].decode("utf-8", "replace")


def release(store: Store, entry: Entry) -> str:
    """Put a Maildir message back where it was; returns its path."""
    if entry.kind != "maildir":
        envelope = Path(entry.quarantine_path or "").with_name("envelope.json")
        rcpts = (entry.recipients or "").split(", ")
        command = " ".join(["sendmail", "-i", "-f", shlex.quote(entry.sender or "<>"), "--",
                            *map(shlex.quote, rcpts), "<", shlex.quote(entry.quarantine_path
                                                                        or "")])
        raise QuarantineError(
            f"message {entry.id} came from the Postfix hold queue; spoolscan does not "
            f"re-inject it (it would be held and quarantined again). Envelope: {envelope}. "
            f"To deliver it anyway, bypassing the scan, e.g.: {command} with the hold rule "
            f"disabled for that injection path")
    if not entry.quarantine_path or not entry.original_path:
        raise QuarantineError(f"message {entry.id}: the store does not say where it came from")
    source, target = Path(entry.quarantine_path), Path(entry.original_path)
    if not source.exists():
        raise QuarantineError(f"message {entry.id}: {source} no longer exists")
    if target.exists():
        raise QuarantineError(f"message {entry.id}: {target} exists; not overwriting it")
    if not target.parent.is_dir():
        raise QuarantineError(f"message {entry.id}: folder {target.parent} no longer exists")
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: another filesystem
            raise QuarantineError(f"cannot move {source} back: {exc.strerror}") from None
        shutil.copy2(source, target)
        os.unlink(source)
    store.record_action(entry.id, entry.scan_id, "restore", "ok",
                        "released from quarantine by an admin", state=DONE,
                        original_path=str(source), location=str(target))
    return str(target)


def delete(store: Store, entry: Entry) -> None:
    """Delete the quarantined copy for good."""
    path = Path(entry.quarantine_path) if entry.quarantine_path else None
    if path is not None and path.exists():
        path.unlink()
        if entry.kind != "maildir":  # <dir>/<day>/<id>/{message.eml,envelope.json}
            envelope = path.with_name("envelope.json")
            if envelope.exists():
                envelope.unlink()
            with contextlib.suppress(OSError):  # not empty: leave it
                path.parent.rmdir()
    store.record_action(entry.id, entry.scan_id, "delete", "ok", "deleted from quarantine",
                        state=DONE, quarantine_path=entry.quarantine_path)


def purge(store: Store, older_than_days: int) -> int:
    """Delete quarantined copies older than ``older_than_days``; returns how many."""
    cutoff = utcnow().timestamp() - older_than_days * 86400
    old = [e for e in entries(store)
           if e.quarantined_at and e.quarantined_at.timestamp() < cutoff]
    for entry in old:
        delete(store, entry)
    return len(old)


def format_entry(entry: Entry) -> str:
    when = entry.quarantined_at.strftime("%Y-%m-%d %H:%M") if entry.quarantined_at else "?"
    who = entry.queue_id or Path(entry.location).name
    return f"{entry.id:>7}  {when}  {entry.source:10.10}  {entry.signature or '':36.36}  {who}"


def dump(entry: Entry) -> str:
    return json.dumps(entry.as_json())
