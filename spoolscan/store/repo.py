"""Repository functions: everything spoolscan reads from and writes to the database.

All writes of one batch happen in one transaction, so a verdict is either committed with
its message row or not at all.  Callers act on mail only after ``record_scans`` returned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    DateTime,
    Engine,
    Row,
    RowMapping,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from spoolscan.addresses import domain_of, sender_domain
from spoolscan.backoff import Retry
from spoolscan.model import Decision, MessageInfo, Prior, ReleaseTicket, State, Verdict
from spoolscan.store.db import check_schema, create_engine_for
from spoolscan.store.models import (
    actions,
    fingerprints,
    host_rescans,
    message_recipients,
    messages,
    releases,
    rescan_claims,
    scan_claims,
    scans,
)
from spoolscan.text import escape, unescape

log = logging.getLogger(__name__)


# The lifecycle recorded in messages.state (see spoolscan.model.State).
SEEN, VERDICT, ACTING, DONE = State.SEEN, State.VERDICT, State.ACTING, State.DONE
RETRY, STUCK, GONE, RELEASED = State.RETRY, State.STUCK, State.GONE, State.RELEASED
CLEAN, INFECTED = Verdict.CLEAN, Verdict.INFECTED

# Held mail that is done has left the hold queue (released, quarantined): nothing of it
# is left to rescan there (delivered copies are the Maildir source's messages).
_NOT_LEFT_HOLD = ~and_(messages.c.kind == "postfix-hold", messages.c.state == DONE)


_MESSAGE_FIELDS = ("location", "queue_id", "host", "sender", "recipients", "nrcpt",
                   "direction", "size", "content_hash", "arrived_at", "updated_at",
                   "subject", "message_id", "header_from", "client_address", "helo",
                   "sender_domain")


# Statements run for every batch, built once: building one cost more than running it
# for a small batch (the hold queue's).
_SCAN_INSERT = insert(scans).returning(scans.c.id, scans.c.message_id)
_VERDICT_UPDATE = update(messages).where(messages.c.id == bindparam("b_id")).values(
    verdict=bindparam("b_verdict"), signature=bindparam("b_signature"),
    state=bindparam("b_state"), attempts=bindparam("b_attempts"),
    next_attempt_at=bindparam("b_next"), last_error=bindparam("b_error"),
    updated_at=bindparam("b_now"))


# An action's outcome on its message row (see Store.record_actions).
_FAILED = bindparam("b_failed", type_=Boolean)
_FINISHED = bindparam("b_finished", type_=Boolean)
_ACTION_UPDATE = update(messages).where(messages.c.id == bindparam("b_id")).values(
    updated_at=bindparam("b_now"),
    # Another process that found the message already gone must not undo a finished
    # action: "gone" never overrides "done".
    state=case((and_(bindparam("b_gone", type_=Boolean), messages.c.state == DONE),
                messages.c.state),
               else_=func.coalesce(bindparam("b_state"), messages.c.state)),
    location=func.coalesce(bindparam("b_location"), messages.c.location),
    # A finished message's failures are history; a failed action is one.
    attempts=case((_FINISHED, 0), (_FAILED, messages.c.attempts + 1),
                  else_=messages.c.attempts),
    next_attempt_at=case((_FAILED, bindparam("b_next")), else_=messages.c.next_attempt_at),
    last_error=case((_FAILED, bindparam("b_detail")), else_=messages.c.last_error))


# What a rescan needs of a candidate to find it again, answer it from the cache and mark
# it gone (not the headers and envelope: reading every column of 10,000 rows was a tenth
# of a rescan's CPU).
_CANDIDATE_COLUMNS = tuple(messages.c[name] for name in (
    "id", "source", "kind", "identity", "location", "queue_id", "host", "content_hash",
    "size", "state", "verdict", "attempts", "first_seen_at", "updated_at",
    "next_attempt_at"))


def _stored(params: dict[str, object]) -> dict[str, object]:
    """Parameters as written: every text escaped by the one rule of ``spoolscan.text``
    (addresses, headers and file names may hold any bytes)."""
    return {k: escape(v) if isinstance(v, str) else v for k, v in params.items()}


def _read(row: Row) -> dict:
    """A row as a dict, its texts back as the exact names and addresses they were."""
    return {k: unescape(v) if isinstance(v, str) else v for k, v in row._mapping.items()}


def _message_values(info: MessageInfo, now: datetime) -> dict[str, object]:
    return {
        "location": info.location,
        "queue_id": info.queue_id,
        "host": info.host,
        "sender": info.sender,
        "recipients": ", ".join(info.recipients) if info.recipients else None,
        "nrcpt": len(info.recipients) if info.recipients else None,
        "direction": info.direction,
        "size": info.size,
        "content_hash": info.content_hash,
        "arrived_at": info.arrived_at,
        "updated_at": now,
        "subject": info.subject,
        "message_id": info.message_id,
        "header_from": info.header_from,
        "client_address": info.client_address,
        "helo": info.helo,
        "sender_domain": sender_domain(info.sender, info.header_from),
    }


def _recipient_values(message_id: int, info: MessageInfo) -> list[dict[str, object]]:
    """Rows of ``message_recipients`` for a message: its envelope recipients, else the
    mailbox it rests in."""
    if info.recipients:
        return [{"message_id": message_id, "position": i, "address": address,
                 "domain": domain_of(address)} for i, address in enumerate(info.recipients)]
    if info.mailbox:
        return [{"message_id": message_id, "position": 0, "address": info.mailbox,
                 "domain": None}]
    return []


def _candidate_conditions(since: datetime | None, fingerprint: str, source: str | None
                          ) -> list:
    """Messages to rescan under ``fingerprint`` (see ``Store.rescan_candidates``)."""
    finished = select(scans.c.id).where(scans.c.message_id == messages.c.id,
                                        scans.c.fingerprint == fingerprint,
                                        scans.c.verdict.in_((CLEAN, INFECTED)))
    conds = [messages.c.state != GONE, _NOT_LEFT_HOLD,
             or_(messages.c.verdict.is_(None), messages.c.verdict != INFECTED),
             ~finished.exists()]
    if since is not None:
        conds.append(messages.c.first_seen_at >= since)
    if source is not None:
        conds.append(messages.c.source == source)
    return conds


def _distinct_rounds(records: Sequence[ScanRecord]) -> Iterator[list[ScanRecord]]:
    """Split a batch so that no message appears twice in one round (one upsert
    statement cannot update the same row twice)."""
    round_: list[ScanRecord] = []
    seen: set[tuple[str, str]] = set()
    for r in records:
        key = (r.message.source, r.message.identity)
        if key in seen:
            yield round_
            round_, seen = [], set()
        round_.append(r)
        seen.add(key)
    if round_:
        yield round_


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """Datetimes come back naive from SQLite; they are always stored in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class ReleaseExists(Exception):
    """The message has a release already (one release per quarantined message)."""

    def __init__(self, message_id: int) -> None:
        super().__init__(f"message {message_id} has been released already")
        self.message_id = message_id


@dataclass(frozen=True)
class ScanRecord:
    """One scan result to store."""

    message: MessageInfo
    verdict: str
    signature: str | None
    detail: str | None
    fingerprint: str | None
    duration_ms: int
    trigger: str  # arrival | rescan | manual
    cached: bool
    # The message's state after this scan, when the caller knows it; else the ``plan``
    # given to ``Store.record_scans`` decides from what the store knew before.
    state: str | None = None
    next_attempt_at: datetime | None = None


#: ``plan(record, prior)``: the decision for a scan, given the message's stored row.
Plan = Callable[[ScanRecord, Prior], Decision]


@dataclass(frozen=True)
class StoredScan:
    message_id: int
    scan_id: int
    previous_verdict: str | None
    attempts: int
    retroactive: bool
    decision: Decision | None = None  # what the plan decided (record_scans with a plan)


@dataclass(frozen=True)
class ActionRecord:
    """What was done to a message, and the state it leaves the message in."""

    message_id: int
    scan_id: int | None
    action: str  # release | quarantine | delete | hold | leave | restore
    outcome: str  # ok | failed | gone | pending
    detail: str | None = None
    state: str | None = None
    quarantine_path: str | None = None
    original_path: str | None = None
    location: str | None = None
    next_attempt_at: datetime | None = None  # when a failed action is tried again


@dataclass(frozen=True)
class CachedVerdict:
    verdict: str
    signature: str | None


class Store:
    """The verdict store.  Thread-safe (one Engine, one connection per call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Only the dialect in use is imported: sqlalchemy.dialects.postgresql pulls in every
        # PostgreSQL driver's module (~0.25 s), which a SQLite command does not need.
        self._insert: Any
        if engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert
            self._insert = pg_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert
            self._insert = sqlite_insert
        # Built once, like the other statements of every batch (_SCAN_INSERT...), but
        # in the dialect in use.
        upsert = self._insert(messages)
        excluded = upsert.excluded
        # Keep what we knew when a later sighting knows less (e.g. envelope fields).
        keep = {k: func.coalesce(excluded[k], messages.c[k]) for k in _MESSAGE_FIELDS}
        self._message_upsert = upsert.on_conflict_do_update(
            index_elements=["source", "identity"], set_=keep).returning(
            messages.c.source, messages.c.identity, messages.c.id, messages.c.state,
            messages.c.verdict, messages.c.signature, messages.c.attempts,
            messages.c.first_seen_at)

    @classmethod
    def open(cls, url: str, check: bool = True) -> Store:
        engine = create_engine_for(url)
        if check:
            check_schema(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- fingerprints ----------------------------------------------------------------

    def note_fingerprint(self, fingerprint: str) -> bool:
        """Record that ``fingerprint`` is in use; True if it was never seen before."""
        now = utcnow()
        with self.engine.begin() as conn:
            stmt = self._insert(fingerprints).values(
                fingerprint=fingerprint, first_seen_at=now, last_seen_at=now
            ).on_conflict_do_nothing(index_elements=["fingerprint"])
            inserted = conn.execute(stmt.returning(fingerprints.c.fingerprint)).first() is not None
            if not inserted:
                conn.execute(update(fingerprints)
                             .where(fingerprints.c.fingerprint == fingerprint)
                             .values(last_seen_at=now))
        return inserted

    def needs_rescan(self, fingerprint: str, host: str | None = None) -> bool:
        """True unless a rescan under ``fingerprint`` has completed (on a shared store:
        a rescan by ``host``, since each host rescans its own mail)."""
        with self.engine.connect() as conn:
            if self.shared and host is not None:
                done = conn.execute(select(host_rescans.c.rescanned_at).where(
                    host_rescans.c.fingerprint == fingerprint,
                    host_rescans.c.host == host)).scalar()
            else:
                done = conn.execute(select(fingerprints.c.rescanned_at)
                                    .where(fingerprints.c.fingerprint == fingerprint)).scalar()
        return done is None

    def mark_rescanned(self, fingerprint: str, host: str | None = None) -> None:
        self.note_fingerprint(fingerprint)
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(update(fingerprints).where(fingerprints.c.fingerprint == fingerprint)
                         .values(rescanned_at=now))
            if self.shared and host is not None:
                conn.execute(self._insert(host_rescans).values(
                    fingerprint=fingerprint, host=host, rescanned_at=now)
                    .on_conflict_do_update(index_elements=["fingerprint", "host"],
                                           set_={"rescanned_at": now}))

    def fingerprint_first_seen(self, fingerprint: str | None) -> float | None:
        """When ``fingerprint`` was first seen (epoch seconds), None if never."""
        if fingerprint is None:
            return None
        with self.engine.connect() as conn:
            when = conn.execute(select(fingerprints.c.first_seen_at)
                                .where(fingerprints.c.fingerprint == fingerprint)).scalar()
        when = as_utc(when)
        return when.timestamp() if when else None

    def count_states(self, states: Sequence[str]) -> dict[tuple[str, str], int]:
        """{(source, state): messages} for these states."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(messages.c.source, messages.c.state, func.count())
                                .where(messages.c.state.in_(list(states)))
                                .group_by(messages.c.source, messages.c.state))
            return {(src, state): n for src, state, n in rows}

    def latest_fingerprint(self) -> str | None:
        """The fingerprint most recently first seen."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(fingerprints.c.fingerprint)
                .order_by(fingerprints.c.first_seen_at.desc()).limit(1)
            ).scalar()

    # --- the verdict cache -----------------------------------------------------------

    def cached_verdict(self, content_hash: str, fingerprint: str) -> CachedVerdict | None:
        """A definite verdict (clean/infected) for this content under these signatures."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(scans.c.verdict, scans.c.signature)
                .where(scans.c.content_hash == content_hash,
                       scans.c.fingerprint == fingerprint,
                       scans.c.verdict.in_((CLEAN, INFECTED)))
                .order_by(scans.c.id.desc()).limit(1)
            ).first()
        return CachedVerdict(row.verdict, row.signature) if row else None

    def verdicts_under(self, fingerprint: str, limit: int
                       ) -> list[tuple[str, str, str | None]]:
        """(content hash, verdict, signature) of definite verdicts under ``fingerprint``,
        the most recent first, at most ``limit`` distinct contents."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(scans.c.content_hash, scans.c.verdict, scans.c.signature)
                .where(scans.c.fingerprint == fingerprint,
                       scans.c.verdict.in_((CLEAN, INFECTED)),
                       scans.c.content_hash.is_not(None))
                .group_by(scans.c.content_hash, scans.c.verdict, scans.c.signature)
                .order_by(func.max(scans.c.id).desc()).limit(limit))
            return [(h, v, sig) for h, v, sig in rows]

    # --- recording -------------------------------------------------------------------

    def record_scans(self, records: Sequence[ScanRecord], plan: Plan | None = None
                     ) -> list[StoredScan]:
        """Store a batch of scans and their messages in one transaction.

        With ``plan``, each record's resulting state comes from ``plan(record, prior)``,
        called inside the transaction with what the store knew of the message before
        (state, verdict, signature, failed attempts): the decision and the verdict are
        committed together.  A few statements per batch, not per message: the store must
        keep up with clamd.
        """
        if not records:
            return []
        out: list[StoredScan] = []
        with self.engine.begin() as conn:
            for part in _distinct_rounds(records):
                out.extend(self._record_batch(conn, part, plan))
        return out

    def _upsert_messages(self, conn: Connection, infos: Sequence[MessageInfo],
                         now: datetime) -> list[Row]:
        """Insert or update message rows; returns (id, state, verdict, signature,
        attempts) as they were before this batch (the upsert does not touch those)."""
        params = [_stored({"source": i.source, "kind": i.kind, "identity": i.identity,
                           "first_seen_at": now, "state": SEEN, "attempts": 0,
                           **_message_values(i, now)}) for i in infos]
        # Match the returned rows by key, not by position: with ON CONFLICT DO UPDATE,
        # PostgreSQL does not give rows back in parameter order when a batch mixes new
        # and existing messages.
        result = conn.execute(self._message_upsert, params)
        by_key = {(r.source, r.identity): r for r in result}
        rows = [by_key[(escape(i.source), escape(i.identity))] for i in infos]
        # Who a message is for does not change: written when its row is made (its
        # first_seen_at is this batch's), not again for every later sighting or rescan.
        recipients = [_stored(v) for i, r in zip(infos, rows, strict=True)
                      if as_utc(r.first_seen_at) == now for v in _recipient_values(r.id, i)]
        if recipients:
            conn.execute(self._insert(message_recipients).on_conflict_do_nothing(
                index_elements=["message_id", "position"]), recipients)
        return rows

    def _record_batch(self, conn: Connection, records: Sequence[ScanRecord],
                      plan: Plan | None) -> list[StoredScan]:
        now = utcnow()
        before = self._upsert_messages(conn, [r.message for r in records], now)
        tickets = self._claim_releases(conn, records, before, now)
        stored: list[StoredScan] = []
        scan_params = []
        updates = []
        for r, prev in zip(records, before, strict=True):
            retroactive = (r.trigger == "rescan" and prev.verdict == CLEAN
                           and r.verdict == INFECTED)
            # attempts counts consecutive failures (scans without a definite verdict,
            # failed actions) since the last success; a finished action resets it.
            failed_scan = r.verdict not in (CLEAN, INFECTED)
            attempts = prev.attempts + 1 if failed_scan else prev.attempts
            decision = None
            state, next_at = r.state, r.next_attempt_at
            if plan is not None:
                prior = Prior(prev.id, State(prev.state) if prev.state else None,
                              Verdict(prev.verdict) if prev.verdict else None,
                              prev.signature, prev.attempts,
                              release=tickets.get(prev.id))
                decision = plan(r, prior)
                state = VERDICT if decision.acts else decision.state
                next_at = decision.next_attempt_at
            if state is None:
                raise ValueError("a ScanRecord without a state needs a plan")
            stored.append(StoredScan(prev.id, 0, prev.verdict, attempts, retroactive,
                                     decision))
            scan_params.append(_stored({
                "message_id": prev.id, "scanned_at": now, "verdict": r.verdict,
                "signature": r.signature, "detail": r.detail, "fingerprint": r.fingerprint,
                "content_hash": r.message.content_hash, "size": r.message.size,
                "duration_ms": r.duration_ms, "trigger": r.trigger, "cached": r.cached,
                "previous_verdict": prev.verdict, "retroactive": retroactive,
            }))
            updates.append(_stored({"b_id": prev.id, "b_verdict": r.verdict,
                                    "b_signature": r.signature, "b_state": state,
                                    "b_attempts": attempts, "b_next": next_at,
                                    "b_error": r.detail if failed_scan else None,
                                    "b_now": now}))
        # Matched by message (unique within a round), not by position.
        scan_ids = {r.message_id: r.id for r in conn.execute(_SCAN_INSERT, scan_params)}
        conn.execute(_VERDICT_UPDATE, updates)
        return [replace(s, scan_id=scan_ids[s.message_id]) for s in stored]

    def _claim_releases(self, conn: Connection, records: Sequence[ScanRecord],
                        before: Sequence[Row], now: datetime) -> dict[int, ReleaseTicket]:
        """The releases from quarantine that messages of this batch fulfil (by the ticket
        in their X-Spoolscan-Release header).  Message id → ticket.

        Held mail claims its ticket in this transaction: a ticket is consumed by one
        message only (another copy carrying it is not released), and only by a message
        with the envelope it was issued for (same sender, no recipient it was not issued
        for).  A delivered copy (Maildir) is recognised, not claimed: the ticket must be
        consumed already, by held mail with exactly this content (the hash leaves out the
        trace headers delivery adds), so that a forwarded or rewritten copy is not."""
        wanted: dict[str, list[tuple[ScanRecord, Row]]] = {}
        for r, prev in zip(records, before, strict=True):
            if r.message.release_token:
                wanted.setdefault(r.message.release_token, []).append((r, prev))
        if not wanted:
            return {}
        consumer = messages.alias("consumer")
        rows = conn.execute(
            select(releases, consumer.c.content_hash.label("released_hash"))
            .select_from(releases.outerjoin(consumer,
                                            consumer.c.id == releases.c.consumed_by))
            .where(releases.c.token.in_(list(wanted))))
        claimed: dict[int, ReleaseTicket] = {}
        for row in rows.mappings():
            for r, prev in wanted[row["token"]]:
                ticket = self._claim(conn, row, r, prev, now)
                if ticket is not None:
                    claimed[prev.id] = ticket
        return claimed

    def _claim(self, conn: Connection, row: RowMapping, r: ScanRecord, prev: Row,
               now: datetime) -> ReleaseTicket | None:
        info = r.message
        ticket = ReleaseTicket(row["id"], row["message_id"], unescape(row["requested_by"]))
        if info.kind != "postfix-hold":
            if (row["state"] == "consumed" and info.content_hash
                    and info.content_hash == row["released_hash"]):
                return ticket
            log.warning("%s: carries the ticket of release %d but is not the content "
                        "that was released; treated as any other message",
                        info.location, row["id"])
            return None
        issued_for = set(json.loads(row["recipients"]))
        if (escape(info.sender or "") != (row["sender"] or "")
                or not {escape(a) for a in info.recipients} <= issued_for):
            log.warning("%s: carries the ticket of release %d but not its envelope; "
                        "treated as any other message", info.location, row["id"])
            return None
        done = conn.execute(
            update(releases).where(releases.c.id == row["id"]).where(or_(
                releases.c.state == "pending", releases.c.consumed_by == prev.id))
            .values(state="consumed", consumed_by=prev.id,
                    consumed_at=func.coalesce(releases.c.consumed_at, now)))
        if done.rowcount == 1:
            return ticket
        log.warning("%s: carries the ticket of release %d, fulfilled by another "
                    "message already; treated as any other message", info.location,
                    row["id"])
        return None

    def create_release(self, message_id: int, token: str, requested_by: str,
                       sender: str | None, recipients: Sequence[str]) -> int:
        """Record a release of a message quarantined from the hold queue before its copy
        is re-injected; returns its id.  ``ReleaseExists`` if it has one already."""
        row = {"message_id": message_id, "token": token, "requested_at": utcnow(),
               "requested_by": escape(requested_by), "sender": escape(sender or ""),
               "recipients": json.dumps([escape(a) for a in recipients]),
               "state": "pending"}
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(insert(releases).returning(releases.c.id),
                                        row).scalar_one())
        except IntegrityError:
            raise ReleaseExists(message_id) from None

    def cancel_release(self, release_id: int) -> None:
        """Forget a release whose copy could not be re-injected (it can be tried again)."""
        with self.engine.begin() as conn:
            conn.execute(releases.delete().where(releases.c.id == release_id)
                         .where(releases.c.state == "pending"))

    def release_of(self, message_id: int) -> dict | None:
        """The release of a quarantined message, with the queue ID of the copy that
        was released (None while it waits in the hold queue)."""
        consumer = messages.alias("consumer")
        with self.engine.connect() as conn:
            row = conn.execute(
                select(releases, consumer.c.queue_id.label("released_queue_id"))
                .select_from(releases.outerjoin(consumer,
                                                consumer.c.id == releases.c.consumed_by))
                .where(releases.c.message_id == message_id)).mappings().first()
        return ({k: unescape(v) if isinstance(v, str) else v for k, v in row.items()}
                if row is not None else None)

    def record_action(self, message_id: int, scan_id: int | None, action: str, outcome: str,
                      detail: str | None = None, *, state: str | None = None,
                      quarantine_path: str | None = None, original_path: str | None = None,
                      location: str | None = None) -> None:
        """Record what was done to a message (and move it to ``state``)."""
        self.record_actions([ActionRecord(message_id, scan_id, action, outcome, detail, state,
                                          quarantine_path, original_path, location)])

    def record_actions(self, records: Sequence[ActionRecord]) -> None:
        """Record a batch of actions in one transaction (two statements)."""
        if not records:
            return
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(insert(actions), [_stored({
                "message_id": r.message_id, "scan_id": r.scan_id, "action": r.action,
                "requested_at": now,
                "completed_at": now if r.outcome != "pending" else None,
                "outcome": r.outcome, "detail": r.detail,
                "quarantine_path": r.quarantine_path, "original_path": r.original_path,
            }) for r in records])
            conn.execute(
                _ACTION_UPDATE,
                [_stored({"b_id": r.message_id, "b_now": now, "b_state": r.state,
                          "b_location": r.location,
                          "b_finished": r.outcome == "ok" and r.state == DONE,
                          "b_failed": r.outcome == "failed", "b_gone": r.outcome == "gone",
                          "b_next": r.next_attempt_at,
                          "b_detail": r.detail}) for r in records])

    def set_state(self, message_ids: Iterable[int], state: str, detail: str | None = None
                  ) -> None:
        ids = list(message_ids)
        if not ids:
            return
        values: dict[str, object] = {"state": state, "updated_at": utcnow()}
        if detail is not None:
            values["last_error"] = escape(detail)
        with self.engine.begin() as conn:
            conn.execute(update(messages).where(messages.c.id.in_(ids)).values(**values))

    def mark_gone(self, rows: Sequence[dict], detail: str) -> int:
        """Mark these message rows gone, each only if it has not changed since it was
        read (same state and ``updated_at``): a message acted on meanwhile keeps what
        happened to it.  Returns how many were marked."""
        if not rows:
            return 0
        now = utcnow()
        marked = 0
        with self.engine.begin() as conn:
            for row in rows:
                result = conn.execute(
                    update(messages).where(messages.c.id == row["id"],
                                           messages.c.state == row["state"],
                                           messages.c.updated_at == row["updated_at"])
                    .values(state=GONE, last_error=escape(detail), updated_at=now))
                marked += result.rowcount or 0
        return marked

    def note_failure(self, info: MessageInfo, detail: str, *,
                     retry: Callable[[int], Retry] | None) -> Retry | None:
        """Record a message that could not even be read (corrupt, refused, vanished).

        ``retry(failures so far)`` plans the next attempt (None: the message is gone).
        No scan row is written: nothing was scanned.  A finished message stays finished:
        a stale job that finds the file gone (released or quarantined meanwhile) must not
        rewrite that.  Returns the retry plan used (None for gone or finished).
        """
        now = utcnow()
        with self.engine.begin() as conn:
            row = self._upsert_messages(conn, [info], now)[0]
            if row.state in (DONE, RELEASED):
                return None
            plan = retry(row.attempts) if retry is not None else None
            values: dict[str, object] = {"last_error": escape(detail), "updated_at": now}
            if plan is None:
                values["state"] = GONE
            else:
                values.update(state=plan.state, attempts=plan.attempts,
                              next_attempt_at=plan.next_attempt_at)
            conn.execute(update(messages).where(messages.c.id == row.id,
                                                messages.c.state.not_in((DONE, RELEASED)))
                         .values(**values))
        return plan

    # --- queries used by sources and rescans -----------------------------------------

    def messages_by_identity(self, source: str, identities: Sequence[str]
                             ) -> dict[str, dict]:
        """Rows of ``messages`` for these identities (as dicts), keyed by identity."""
        out: dict[str, dict] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(identities), 500):
                chunk = [escape(x) for x in identities[i:i + 500]]
                for row in conn.execute(select(messages).where(
                        messages.c.source == source, messages.c.identity.in_(chunk))):
                    found = _read(row)
                    out[found["identity"]] = found
        return out

    def open_messages(self, source: str) -> Iterator[dict]:
        """Messages of ``source`` not finished (not done/gone/released): the columns that
        say which and where, one row at a time (there may be a backlog of them)."""
        with self.engine.connect() as conn:
            rows = conn.execution_options(yield_per=1000).execute(
                select(messages.c.id, messages.c.identity, messages.c.location,
                       messages.c.queue_id, messages.c.host, messages.c.state,
                       messages.c.updated_at)
                .where(messages.c.source == source,
                       messages.c.state.not_in((DONE, GONE, RELEASED))))
            for r in rows:
                yield _read(r)

    def rescan_candidates(self, since: datetime | None, fingerprint: str,
                          source: str | None = None, batch: int = 1000
                          ) -> Iterator[list[dict]]:
        """Messages to rescan under ``fingerprint``: seen since ``since``, not known to be
        infected already, not gone, and without a definite scan under this fingerprint.

        Every copy of a content is a candidate of its own (each copy may need to be
        quarantined); copies after the first are answered from the cache.  Batches come
        in id order, so a restarted rescan resumes where it stopped: a message finished
        under this fingerprint has a scan under it and is not yielded again.
        """
        last_id = 0
        while True:
            conds = [messages.c.id > last_id,
                     *_candidate_conditions(since, fingerprint, source)]
            with self.engine.connect() as conn:
                rows = [_read(r) for r in conn.execute(
                    select(*_CANDIDATE_COLUMNS).where(and_(*conds))
                    .order_by(messages.c.id).limit(batch))]
            if not rows:
                return
            yield rows
            last_id = rows[-1]["id"]

    def count_rescan_candidates(self, since: datetime | None, fingerprint: str,
                                source: str | None = None) -> int:
        """How many messages ``rescan_candidates`` would yield now."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(messages).where(
                and_(*_candidate_conditions(since, fingerprint, source)))).scalar_one()

    def record_clean_copies(self, fingerprint: str, since: datetime | None,
                            source: str | None = None) -> int:
        """Record a cached clean scan under ``fingerprint`` for every finished, clean
        message whose content already has a clean (and no infected) verdict under it.

        One statement for any number of copies; returns how many were recorded.
        """
        now = utcnow()
        same = scans.alias("same")
        done_here = select(scans.c.id).where(scans.c.message_id == messages.c.id,
                                             scans.c.fingerprint == fingerprint,
                                             scans.c.verdict.in_((CLEAN, INFECTED)))
        content_clean = select(same.c.id).where(same.c.content_hash == messages.c.content_hash,
                                                same.c.fingerprint == fingerprint,
                                                same.c.verdict == CLEAN)
        content_infected = select(same.c.id).where(
            same.c.content_hash == messages.c.content_hash, same.c.fingerprint == fingerprint,
            same.c.verdict == INFECTED)
        conds = [messages.c.state == DONE, messages.c.verdict == CLEAN, _NOT_LEFT_HOLD,
                 messages.c.content_hash.is_not(None), ~done_here.exists(),
                 content_clean.exists(), ~content_infected.exists()]
        if since is not None:
            conds.append(messages.c.first_seen_at >= since)
        if source is not None:
            conds.append(messages.c.source == source)
        rows = select(
            messages.c.id, literal(now, DateTime(timezone=True)), literal(CLEAN),
            literal(fingerprint), messages.c.content_hash, messages.c.size, literal(0),
            literal("rescan"), literal(True), messages.c.verdict, literal(False),
        ).where(and_(*conds))
        columns = ["message_id", "scanned_at", "verdict", "fingerprint", "content_hash", "size",
                   "duration_ms", "trigger", "cached", "previous_verdict", "retroactive"]
        with self.engine.begin() as conn:
            if self.shared:
                # Hosts rescanning at once: one at a time here, so that no copy gets two
                # cached scans (the second statement sees the first one's rows).
                conn.execute(text("SELECT pg_advisory_xact_lock(7271005)"))
            # Count what RETURNING gives: rowcount is not reliable for INSERT .. SELECT.
            result = conn.execute(insert(scans).from_select(columns, rows)
                                  .returning(scans.c.id))
            return sum(1 for _ in result)

    # --- rescans split across hosts (PostgreSQL) --------------------------------------

    @property
    def shared(self) -> bool:
        """True for a server database that several hosts may share (PostgreSQL)."""
        return self.engine.dialect.name == "postgresql"

    def claim_rescan(self, fingerprint: str, hashes: Sequence[str], holder: str,
                     lease: float) -> list[str]:
        """Of ``hashes``, the contents this rescan is now to scan under ``fingerprint``:
        registered if new, then those neither done nor under another live lease, locked
        with ``FOR UPDATE SKIP LOCKED`` (what another host is claiming at this moment is
        skipped, not waited for) and leased to ``holder`` for ``lease`` seconds.  The
        database's clock decides leases, so hosts' clocks need not agree."""
        if not hashes:
            return []
        now = func.now()
        with self.engine.begin() as conn:
            # In one order on every host: two hosts inserting overlapping batches in
            # different orders could deadlock (and PostgreSQL would abort one rescan).
            conn.execute(self._insert(rescan_claims).values(
                [{"fingerprint": fingerprint, "content_hash": h, "created_at": now}
                 for h in sorted(set(hashes))]).on_conflict_do_nothing())
        with self.engine.begin() as conn:
            free = conn.execute(
                select(rescan_claims.c.content_hash)
                .where(rescan_claims.c.fingerprint == fingerprint,
                       rescan_claims.c.content_hash.in_(list(hashes)),
                       rescan_claims.c.done_at.is_(None),
                       or_(rescan_claims.c.lease_until.is_(None),
                           rescan_claims.c.lease_until < now))
                .order_by(rescan_claims.c.content_hash)
                .with_for_update(skip_locked=True)).scalars().all()
            if free:
                conn.execute(rescan_claims.update().where(
                    rescan_claims.c.fingerprint == fingerprint,
                    rescan_claims.c.content_hash.in_(free)).values(
                    holder=holder, lease_until=now + timedelta(seconds=lease)))
        return list(free)

    def release_rescan_claims_of(self, fingerprint: str, holders: Sequence[str]) -> int:
        """Give back the open claims of ``holders`` (rescans known to be dead: a process
        of this host that no longer runs), without waiting for their leases to run out.
        Returns how many were given back."""
        if not holders:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(rescan_claims.update().where(
                rescan_claims.c.fingerprint == fingerprint,
                rescan_claims.c.holder.in_(list(holders)),
                rescan_claims.c.done_at.is_(None)).values(
                holder=None, lease_until=None)).rowcount

    def rescan_claim_holders(self, fingerprint: str) -> list[str]:
        """The holders of open, leased claims under ``fingerprint``."""
        with self.engine.connect() as conn:
            return list(conn.execute(
                select(rescan_claims.c.holder).distinct().where(
                    rescan_claims.c.fingerprint == fingerprint,
                    rescan_claims.c.done_at.is_(None),
                    rescan_claims.c.holder.is_not(None),
                    rescan_claims.c.lease_until.is_not(None))).scalars())

    def finish_rescan_claims(self, fingerprint: str, done: Sequence[str],
                             released: Sequence[str] = ()) -> None:
        """``done``: scanned (their verdicts are in the cache).  ``released``: given back
        unscanned (the copy was gone): another copy, here or elsewhere, claims them."""
        with self.engine.begin() as conn:
            if done:
                conn.execute(rescan_claims.update().where(
                    rescan_claims.c.fingerprint == fingerprint,
                    rescan_claims.c.content_hash.in_(list(done))).values(
                    done_at=func.now(), lease_until=None))
            if released:
                conn.execute(rescan_claims.update().where(
                    rescan_claims.c.fingerprint == fingerprint,
                    rescan_claims.c.content_hash.in_(list(released))).values(
                    holder=None, lease_until=None))

    def claim_scan(self, fingerprint: str, content_hash: str, holder: str,
                   lease: float) -> bool:
        """Arrivals on a shared store: True if ``holder`` is now the one to scan this
        content (nobody held it, or the holder's lease ran out or was given back)."""
        now = func.now()
        until = now + timedelta(seconds=lease)
        stmt = self._insert(scan_claims).values(
            fingerprint=fingerprint, content_hash=content_hash, holder=holder,
            lease_until=until, created_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["fingerprint", "content_hash"],
            set_={"holder": holder, "lease_until": until},
            where=or_(scan_claims.c.lease_until.is_(None), scan_claims.c.lease_until < now))
        with self.engine.begin() as conn:
            # A claim lost in a crash costs at most one more scan: no WAL flush waited for.
            conn.execute(text("SET LOCAL synchronous_commit TO OFF"))
            return conn.execute(stmt.returning(scan_claims.c.holder)).first() is not None

    def release_scan(self, fingerprint: str, content_hash: str, holder: str) -> None:
        """Give a scan claim back (the scan gave no definite verdict): another host may
        scan the content at once."""
        with self.engine.begin() as conn:
            conn.execute(scan_claims.update().where(
                scan_claims.c.fingerprint == fingerprint,
                scan_claims.c.content_hash == content_hash,
                scan_claims.c.holder == holder).values(lease_until=None))

    def open_rescan_claims(self, fingerprint: str, hashes: Sequence[str]) -> int:
        """How many of ``hashes`` are not done yet (leased by another host, or free)."""
        if not hashes:
            return 0
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(rescan_claims).where(
                rescan_claims.c.fingerprint == fingerprint,
                rescan_claims.c.content_hash.in_(list(hashes)),
                rescan_claims.c.done_at.is_(None))).scalar_one()

    def due_retries(self, source: str, now: datetime | None = None) -> list[dict]:
        """Messages of ``source`` waiting for a retry whose time has come."""
        now = now or utcnow()
        with self.engine.connect() as conn:
            rows = conn.execute(select(messages).where(
                messages.c.source == source, messages.c.state == RETRY,
                or_(messages.c.next_attempt_at.is_(None), messages.c.next_attempt_at <= now)))
            return [_read(r) for r in rows]

    def last_actions(self, message_ids: Sequence[int]) -> dict[int, dict]:
        """The latest action row of each message that has one."""
        out: dict[int, dict] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(message_ids), 500):
                chunk = list(message_ids[i:i + 500])
                latest = (select(func.max(actions.c.id))
                          .where(actions.c.message_id.in_(chunk))
                          .group_by(actions.c.message_id))
                for row in conn.execute(select(actions).where(actions.c.id.in_(latest))):
                    out[row.message_id] = _read(row)
        return out

    def last_action(self, message_id: int) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(actions).where(actions.c.message_id == message_id)
                               .order_by(actions.c.id.desc()).limit(1)).first()
        return _read(row) if row else None

    def purge(self, older_than: timedelta) -> int:
        """Delete rows (messages, scans, actions) older than ``older_than`` of messages
        that are no longer anywhere spoolscan looks: gone, or finished in the hold queue
        (released, quarantined, deleted).  Finished Maildir messages are kept while they
        are in their mailbox, else the next sweep would take them for new mail."""
        cutoff = utcnow() - older_than
        with self.engine.begin() as conn:
            old = select(messages.c.id).where(
                messages.c.updated_at < cutoff,
                or_(messages.c.state == GONE,
                    and_(messages.c.state == DONE, messages.c.kind == "postfix-hold")))
            ids = [r[0] for r in conn.execute(old)]
            conn.execute(rescan_claims.delete().where(rescan_claims.c.created_at < cutoff))
            # Arrival claims matter for a lease (minutes): a day is plenty.
            conn.execute(scan_claims.delete().where(
                scan_claims.c.created_at < utcnow() - timedelta(days=1)))
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                conn.execute(actions.delete().where(actions.c.message_id.in_(chunk)))
                conn.execute(scans.delete().where(scans.c.message_id.in_(chunk)))
                conn.execute(message_recipients.delete()
                             .where(message_recipients.c.message_id.in_(chunk)))
                conn.execute(messages.delete().where(messages.c.id.in_(chunk)))
        return len(ids)
