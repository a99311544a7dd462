"""Notifications: tell an admin (and optionally the recipients) what spoolscan caught.

``[notify] admin = ["postmaster@example.org"]`` turns them on.  Events:

* ``infected``: mail quarantined, deleted or kept held because it is infected;
* ``retroactive``: mail found infected by a rescan after it was clean;
* ``outbound``: infected mail *sent* by a local sender (the account may be compromised);
* ``stuck``: a message spoolscan gave up on (unchecked or unreadable): it waits for an
  admin.

Each event becomes a notice per admin (and, with ``recipients = true``, one to each local
recipient of quarantined inbound mail), sent through the local ``sendmail`` right away,
or collected into one digest every ``digest``.  At most ``max_per_hour`` notices go to
one address in an hour; what is held back beyond that goes out as one digest once the
hour allows it.  A notice never carries the mail itself: it names the message (sender,
recipients, subject, signature, spoolscan's message id) and says where it went.  Every
notice is a row in ``notices`` (``v_notices``): sent, failed, queued for a digest, or
digested.

Templates: ``admin.txt``, ``recipient.txt`` and ``digest.txt`` in ``[notify] templates``
replace the built-in ones: the first line is ``Subject: ...``, then an empty line, then
the body, with ``$name`` placeholders (see ``FIELDS``).  Values from mail are made
printable and single-line before they are put in.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shlex
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from string import Template

from sqlalchemy import insert, select, update

from spoolscan.config import NotifyConfig
from spoolscan.model import Action, Pending, State, Verdict
from spoolscan.store.models import notices
from spoolscan.store.repo import Store, as_utc, utcnow
from spoolscan.text import escape, printable

log = logging.getLogger(__name__)


#: The placeholders a template can use.
FIELDS = ("event", "id", "queue_id", "location", "source", "host", "sender", "recipients",
          "subject", "header_from", "message_id", "signature", "action", "direction",
          "detail", "time")

TEMPLATES = {
    "admin.txt": """Subject: [spoolscan] $event: $signature in mail from <$sender>

spoolscan found $event mail and did: $action.

  signature   $signature
  from        <$sender> (From: $header_from)
  to          $recipients
  subject     $subject
  message-id  $message_id
  queue ID    $queue_id
  where       $location ($source on $host)
  direction   $direction
  detail      $detail
  when        $time

spoolscan quarantine show $id      (details and headers)
spoolscan quarantine release $id   (deliver it after all)
""",
    "recipient.txt": """Subject: A message to you was quarantined: $subject

A message addressed to you was not delivered because it contains $signature.

  from     <$sender> (From: $header_from)
  subject  $subject
  when     $time

It is kept in quarantine. If you expected it, ask your mail administrator to look at
message $id.
""",
    "digest.txt": """Subject: [spoolscan] $count event(s) $period

$lines
Details: spoolscan quarantine show ID; all of them: spoolscan report threats
""",
}

_LINE_LIMIT = 200  # characters of one value in a notice
_DIGEST_LIMIT = 500  # events listed in one digest (the rest are counted)


@dataclass
class Event:
    kind: str  # infected | retroactive | outbound | stuck
    fields: dict[str, str]
    message_row: int | None
    audience: str = "admin"  # admin | recipient
    to: str = ""


@dataclass
class _Budget:
    """Notices sent to one address in the last hour (a sliding window)."""

    sent: deque[float] = field(default_factory=deque)

    def used(self, now: float) -> int:
        while self.sent and self.sent[0] <= now - 3600:
            self.sent.popleft()
        return len(self.sent)


def _flat(value: object) -> str:
    """One line, printable, bounded: safe in a header and a body."""
    text = printable("" if value is None else str(value)).replace("\n", " ")
    return text[:_LINE_LIMIT]


def events_for(p: Pending, config: NotifyConfig, local_domains: Sequence[str],
               notified_attempts: int) -> list[Event]:
    """The notices a message's outcome calls for (none for most messages)."""
    info, result, decision = p.outcome.info, p.outcome.result, p.decision
    kinds: list[str] = []
    if result.verdict == Verdict.INFECTED and decision.action in (
            Action.QUARANTINE, Action.DELETE, Action.HOLD):
        if info.direction in ("outbound", "internal"):
            kinds.append("outbound")
        kinds.append("retroactive" if p.retroactive else "infected")
    if decision.state == State.STUCK and p.attempts == notified_attempts:
        kinds.append("stuck")  # once, when it becomes stuck (not at every later retry)
    kinds = [k for k in kinds if k in config.events][:1]  # the most specific one
    if not kinds:
        return []
    fields = {
        "event": kinds[0], "id": str(p.message_id), "queue_id": _flat(info.queue_id or "-"),
        "location": _flat(info.location), "source": _flat(info.source),
        "host": _flat(info.host or "-"), "sender": _flat(info.sender or ""),
        "recipients": _flat(", ".join(f"<{r}>" for r in info.recipients) or "-"),
        "subject": _flat(info.subject or "(none)"),
        "header_from": _flat(info.header_from or "-"),
        "message_id": _flat(info.message_id or "-"),
        "signature": _flat(result.signature or result.verdict),
        "action": _flat(decision.action), "direction": _flat(info.direction or "-"),
        "detail": _flat(decision.reason), "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = [Event(kinds[0], fields, p.message_id, "admin", admin) for admin in config.admin]
    if (config.recipients and kinds[0] == "infected" and info.direction == "inbound"
            and decision.action == Action.QUARANTINE):
        local = [r for r in info.recipients if _is_local(r, local_domains)]
        out += [Event(kinds[0], fields, p.message_id, "recipient", r) for r in local]
    return out


def _is_local(address: str, local_domains: Sequence[str]) -> bool:
    domain = address.rpartition("@")[2].lower().rstrip(".")
    return bool(domain) and any(domain == d or domain.endswith("." + d)
                                for d in local_domains)


class Notifier:
    """Sends the notices of the events it is given, from a thread of its own (a slow
    sendmail never holds up the pipeline).  See the module docstring."""

    def __init__(self, config: NotifyConfig, store: Store, local_domains: Sequence[str],
                 max_attempts: int, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.local_domains = tuple(local_domains)
        self.max_attempts = max_attempts
        self.clock = clock
        self.templates = {name: self._template(name) for name in TEMPLATES}
        self._events: queue.Queue[Event | None] = queue.Queue(maxsize=10_000)
        self._budgets: dict[str, _Budget] = {}
        self._last_digest: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.config.admin) or self.config.recipients

    def _template(self, name: str) -> Template:
        if self.config.templates:
            path = Path(self.config.templates) / name
            with contextlib.suppress(FileNotFoundError):
                return Template(path.read_text(encoding="utf-8"))
        return Template(TEMPLATES[name])

    # --- from the pipeline ---------------------------------------------------------------

    def note(self, p: Pending) -> None:
        """Queue the notices ``p`` calls for; never blocks the pipeline (beyond 10,000
        waiting events, more are only logged)."""
        for event in events_for(p, self.config, self.local_domains, self.max_attempts):
            try:
                self._events.put_nowait(event)
            except queue.Full:
                log.warning("notify: too many notices waiting; not telling %s about "
                            "message %s", printable(event.to), event.message_row)

    # --- the sending thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._events.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=1.0)
            except queue.Empty:
                event = None
            try:
                if event is not None:
                    self.handle(event)
                if self._stop.is_set() and self._events.empty():
                    self.flush()
                    return
                if event is None:
                    self.flush()
            except Exception:
                log.exception("notify: unexpected error; the notices stay in the store")

    def handle(self, event: Event) -> None:
        """Send ``event``'s notice now, or keep it for a digest (digest mode, or over the
        hourly limit)."""
        now = self.clock()
        budget = self._budget(event.to)
        if self.config.digest or budget.used(now) >= self.config.max_per_hour:
            self._record(event, "queued", None)
            return
        subject, body = self._render(self.templates[f"{event.audience}.txt"], event.fields)
        row = self._record(event, "sending", subject)
        budget.sent.append(now)
        self._finish(row, self._send(event.to, subject, body))

    def flush(self, now: float | None = None) -> int:
        """Send the digests that are due: every ``digest`` in digest mode; otherwise, for
        what the hourly limit held back, as soon as the limit allows one more notice.
        Returns how many digests were sent."""
        now = self.clock() if now is None else now
        with self.store.engine.connect() as conn:
            waiting = conn.execute(select(notices.c.recipient).where(
                notices.c.status == "queued").distinct()).scalars().all()
        sent = 0
        for to in waiting:
            budget = self._budget(to)
            if self.config.digest:
                if now - self._last_digest.get(to, 0.0) < self.config.digest:
                    continue
            elif budget.used(now) >= self.config.max_per_hour:
                continue
            sent += self._send_digest(to, now)
            budget.sent.append(now)
        return sent

    def _send_digest(self, to: str, now: float) -> int:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(notices.c.id, notices.c.event, notices.c.subject,
                                       notices.c.message_id, notices.c.created_at)
                                .where(notices.c.status == "queued")
                                .where(notices.c.recipient == escape(to))
                                .order_by(notices.c.id)).all()
        if not rows:
            return 0
        lines = [f"  {r.created_at:%Y-%m-%d %H:%M}  {r.event:11}  message {r.message_id}  "
                 f"{printable(r.subject or '')}" for r in rows[:_DIGEST_LIMIT]]
        if len(rows) > _DIGEST_LIMIT:
            lines.append(f"  ... and {len(rows) - _DIGEST_LIMIT} more")
        period = ("since the last digest" if self.config.digest
                  else "held back by the limit of "
                       f"{self.config.max_per_hour} notices an hour")
        subject, body = self._render(self.templates["digest.txt"], {
            "count": str(len(rows)), "period": period, "lines": "\n".join(lines)})
        digest = self._record(Event("digest", {}, None, "admin", to), "sending", subject)
        ok = self._send(to, subject, body)
        self._finish(digest, ok)
        if ok is None:
            with self.store.engine.begin() as conn:
                conn.execute(update(notices).where(notices.c.id.in_([r.id for r in rows]))
                             .values(status="digested", sent_at=utcnow(),
                                     detail=f"in digest {digest}"))
            self._last_digest[to] = now
        return 1 if ok is None else 0

    # --- pieces ------------------------------------------------------------------------------

    def _budget(self, to: str) -> _Budget:
        """The hourly window of ``to``, seeded from the store the first time (a restart
        does not reset the limit)."""
        budget = self._budgets.get(to)
        if budget is None:
            since = datetime.fromtimestamp(self.clock() - 3600, UTC)
            with self.store.engine.connect() as conn:
                times = conn.execute(select(notices.c.sent_at).where(
                    notices.c.recipient == escape(to), notices.c.status == "sent",
                    notices.c.sent_at > since).order_by(notices.c.sent_at)).scalars().all()
            stamps = [as_utc(t) for t in times]
            budget = self._budgets[to] = _Budget(deque(
                t.timestamp() for t in stamps if t is not None))
        return budget

    def _render(self, template: Template, fields: dict[str, str]) -> tuple[str, str]:
        text = template.safe_substitute(fields)
        head, _, body = text.partition("\n\n")
        subject = head.removeprefix("Subject:").strip() if head.startswith("Subject:") \
            else "[spoolscan] notice"
        return _flat(subject), body

    def _record(self, event: Event, status: str, subject: str | None) -> int:
        with self.store.engine.begin() as conn:
            return int(conn.execute(insert(notices).returning(notices.c.id), {
                "created_at": utcnow(), "event": event.kind, "message_id": event.message_row,
                "recipient": escape(event.to), "kind": event.audience,
                "subject": escape(subject), "status": status}).scalar_one())

    def _finish(self, row: int, error: str | None) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(update(notices).where(notices.c.id == row).values(
                status="sent" if error is None else "failed",
                sent_at=utcnow() if error is None else None, detail=escape(error)))

    def _send(self, to: str, subject: str, body: str) -> str | None:
        """Submit one notice through sendmail; None if it was accepted, else why not."""
        msg = EmailMessage()
        msg["From"] = self.config.sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid("spoolscan")
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
        msg.set_content(body)
        argv = [*shlex.split(self.config.sendmail), "-i", "-f", self.config.sender, "--", to]
        try:
            done = subprocess.run(argv, input=msg.as_bytes(), capture_output=True,
                                  timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("notify: cannot run %s: %s", argv[0], exc)
            return str(exc)
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip()[:500] or \
                f"exit {done.returncode}"
            log.error("notify: notice to %s not sent: %s", printable(to), printable(why))
            return why
        log.info("notify: told %s: %s", printable(to), subject)
        return None
