"""The fault matrix: real bursts through a private Postfix, `spoolscan run` working, one
fault injected per row, and a ledger of every message sent.

Each row × database: a private Postfix (hold everything, deliver to Maildirs; one per row,
or one shared by the rows with a mailbox and a stretch of the mail log each), a `spoolscan
run` subprocess (hold queue + the row's Maildir, store quarantine; started again when it
exits with an error, as systemd's ``Restart=on-failure`` would), a burst of ``burst``
messages sent over SMTP once the worker watches hold/, one every ``pace`` seconds (every
fifth carries EICAR), the fault injected mid-burst, then a settle phase.  The ledger then
classifies every message it sent from what is really there:

* **delivered**: ``status=sent`` lines of Postfix's log for its queue ID (a message
  delivered and then taken out of a Maildir still counts);
* **quarantined**: a ``message.eml`` in the quarantine store carrying its marker;
* **held**: still in a Postfix queue (or its Maildir file still unscanned) with a
  visible reason in the store (``retry``/``stuck`` and ``last_error``);
* **lost**: none of those (held without a visible reason counts as lost);
* **infected delivered** (or a retroactive detection left in its mailbox),
  **duplicated** (delivered more than once, quarantined more than once, or a clean one
  both), **released unscanned** (delivered, but the store has no clean verdict for it).

Used by ``tests/test_faults.py`` (``SHORT``: 20 messages, faults of a second or two) and
by ``bench/faults`` (``make faults``, ``FULL``: 200 messages, the issue's durations;
writes ``docs/reliability.md``).  Needs root (Postfix, mounts, sysctl); a row that cannot
run here (no tmpfs, no writable sysctl) is reported skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import random
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spoolscan.testing.clamd import EICAR, ClamdInstance, ndb_line
from spoolscan.testing.inotify import MAX_QUEUED_EVENTS, lowered_queue
from spoolscan.testing.postfix import NOBODY_GID, NOBODY_UID, PostfixInstance
from spoolscan.testing.postgres import ADMIN_URL, PrivatePostgres, new_database

WORKER_USER = "spoolscan"
PG_ADMIN_URL = ADMIN_URL
INOTIFY_MAX = MAX_QUEUED_EVENTS
_MARKER = re.compile(rb"ledger-[0-9a-f]{8}-\d+-[a-z]+")
LATENT = b"SPOOLSCAN-LATENT-THREAT-7f3a"  # caught only after the signature update


# --------------------------------------------------------------------------- messages


def _run_quietly(*args: str) -> None:
    subprocess.run(list(args), capture_output=True, check=False)


def build_message(marker: str, kind: str) -> bytes:
    """A message whose Subject and body carry ``marker``; ``kind``: clean, infected
    (an EICAR attachment) or latent (clean until the signature update)."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = "alice@example.net"
    msg["To"] = "rcpt@spoolscan.test"
    msg["Subject"] = marker
    msg["Message-ID"] = f"<{marker}@faults.example>"
    body = f"Ledger entry {marker}.\n"
    if kind == "latent":
        body += LATENT.decode() + "\n"
    msg.set_content(body)
    if kind == "infected":
        msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                           filename="eicar.com")
    return bytes(msg)


@dataclass
class Entry:
    marker: str
    kind: str  # clean | infected | latent
    via: str = "smtp"  # smtp | maildir (put straight into a Maildir)
    queue_id: str | None = None
    path: Path | None = None  # via maildir: where it was put


@dataclass
class Counts:
    sent: int = 0
    delivered: int = 0
    quarantined: int = 0
    held: int = 0
    lost: int = 0
    infected_delivered: int = 0
    duplicated: int = 0
    released_unscanned: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.infected_delivered or self.duplicated
                    or self.released_unscanned)


class Ledger:
    """Every message sent in one row, and where each one ended up."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.entries: list[Entry] = []
        self._lock = threading.Lock()
        self.log_offset = 0  # where this row starts in Postfix's log (a shared Postfix)
        self.mailbox: Path | None = None  # the row's own mailbox (a shared Postfix)

    def new(self, kind: str, via: str = "smtp") -> Entry:
        with self._lock:
            entry = Entry(f"ledger-{self.tag}-{len(self.entries)}-{kind}", kind, via)
            self.entries.append(entry)
        return entry

    # --- what is where ------------------------------------------------------------

    def deliveries(self, postfix: PostfixInstance) -> dict[str, int]:
        counts: dict[str, int] = {}
        text = ""
        with contextlib.suppress(OSError), open(postfix.log_path, "rb") as log:
            log.seek(self.log_offset)
            text = log.read().decode(errors="replace")
        for m in re.finditer(r"\b([0-9A-Za-z]+): to=<[^>]*>, .*status=sent", text):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts

    @staticmethod
    def markers_in(paths: Iterator[Path]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for marker in set(_MARKER.findall(data)):
                key = marker.decode()
                counts[key] = counts.get(key, 0) + 1
        return counts

    @staticmethod
    def quarantined(directory: Path) -> dict[str, int]:
        return Ledger.markers_in(directory.rglob("message.eml"))

    def queued(self, postfix: PostfixInstance) -> dict[str, int]:
        files = (p for sub in ("hold", "incoming", "active", "deferred", "maildrop")
                 for p in (postfix.queue_dir / sub).rglob("*") if p.is_file())
        mine = f"ledger-{self.tag}-"
        return {k: v for k, v in self.markers_in(files).items() if k.startswith(mine)}

    @staticmethod
    def in_maildirs(vmail: Path) -> dict[str, int]:
        files = (p for p in vmail.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")
                 and ".Quarantine" not in p.parts)
        return Ledger.markers_in(files)

    def settled(self, postfix: PostfixInstance, quarantine: Path) -> bool:
        """Every entry delivered or quarantined (latent: quarantined), nothing queued."""
        delivered = self.deliveries(postfix)
        quarantined = self.quarantined(quarantine)
        in_maildirs = self.in_maildirs(self.mailbox or postfix.vmail_dir) if any(
            e.via == "maildir" for e in self.entries) else {}
        for e in self.entries:
            if e.kind in ("infected", "latent") or e.via == "maildir":
                if e.kind != "clean" and not quarantined.get(e.marker):
                    return False
                if e.kind != "clean" and in_maildirs.get(e.marker):
                    return False
            if e.via == "smtp" and e.kind != "infected" and not delivered.get(e.queue_id or ""):
                return False
        return not self.queued(postfix)

    def progress(self, postfix: PostfixInstance, quarantine: Path) -> int:
        """How many entries have been acted on (delivered or quarantined) so far."""
        delivered = self.deliveries(postfix)
        quarantined = self.quarantined(quarantine)
        return sum(1 for e in self.entries
                   if delivered.get(e.queue_id or "") or quarantined.get(e.marker))

    def classify(self, postfix: PostfixInstance, quarantine: Path, db_url: str) -> Counts:
        delivered = self.deliveries(postfix)
        quarantined = self.quarantined(quarantine)
        queued = self.queued(postfix)
        in_maildirs = self.in_maildirs(self.mailbox or postfix.vmail_dir)
        clean_ids, reasons = store_facts(db_url)
        c = Counts(sent=len(self.entries))
        for e in self.entries:
            n_del = delivered.get(e.queue_id or "", 0) if e.via == "smtp" else 0
            n_q = quarantined.get(e.marker, 0)
            still_in_box = in_maildirs.get(e.marker, 0)
            if e.via == "maildir" and e.kind == "clean" and still_in_box:
                n_del = 1
            if n_del:
                c.delivered += 1
            if n_q:
                c.quarantined += 1
            if e.kind == "infected" and (n_del or (e.via == "maildir" and still_in_box)):
                c.infected_delivered += 1
                c.problems.append(f"{e.marker}: infected, delivered")
            if e.kind == "latent" and still_in_box and not n_q:
                c.infected_delivered += 1
                c.problems.append(f"{e.marker}: retroactive detection not acted on")
            if n_del > 1 or (n_del and n_q and e.kind == "clean") or n_q > 1:
                c.duplicated += 1
                c.problems.append(f"{e.marker}: delivered {n_del}, quarantined {n_q}")
            if n_del and e.via == "smtp" and e.queue_id not in clean_ids:
                c.released_unscanned += 1
                c.problems.append(f"{e.marker} ({e.queue_id}): delivered without a clean "
                                  "verdict in the store")
            if not n_del and not n_q:
                if queued.get(e.marker) or (e.via == "maildir" and still_in_box):
                    key = e.queue_id if e.via == "smtp" else e.marker
                    if reasons.get(key or ""):
                        c.held += 1
                        continue
                    c.problems.append(f"{e.marker} ({e.queue_id}): held without a reason")
                else:
                    c.problems.append(f"{e.marker} ({e.queue_id}): nowhere")
                c.lost += 1
        return c


def fault_seen(db_url: str, worker_log: Path) -> str:
    """What the store and the worker's log show of the fault: failed scans and actions,
    commits refused by the database."""
    from sqlalchemy import text

    from spoolscan.store.db import create_engine_for

    engine = create_engine_for(db_url)
    try:
        with engine.connect() as conn:
            errors = conn.execute(text("SELECT count(*) FROM scans WHERE verdict = 'error'")
                                  ).scalar()
            failed = conn.execute(text("SELECT count(*) FROM actions WHERE outcome = 'failed'")
                                  ).scalar()
    finally:
        engine.dispose()
    log = b""
    with contextlib.suppress(OSError):
        log = worker_log.read_bytes()
    db = sum(1 for line in log.splitlines() if b"database unavailable" in line)
    parts = [f"{errors} scan errors", f"{failed} failed actions",
             f"{db} database errors logged"]
    if b"inotify events were lost" in log:
        parts.append("overflow logged")
    return ", ".join(parts)


def store_facts(db_url: str) -> tuple[set[str], dict[str, str]]:
    """Queue IDs with a clean verdict; the visible reasons of held messages (by queue ID,
    and by ledger marker in the subject)."""
    from sqlalchemy import text

    from spoolscan.store.db import create_engine_for

    engine = create_engine_for(db_url)
    try:
        with engine.connect() as conn:
            clean = {r[0] for r in conn.execute(text(
                "SELECT m.queue_id FROM messages m JOIN scans s ON s.message_id = m.id "
                "WHERE s.verdict = 'clean' AND m.queue_id IS NOT NULL"))}
            reasons: dict[str, str] = {}
            for qid, subject, state, error in conn.execute(text(
                    "SELECT queue_id, subject, state, last_error FROM messages "
                    "WHERE state IN ('retry', 'stuck', 'seen', 'verdict', 'acting')")):
                reason = f"{state}: {error}" if error else ""
                for key in (qid, subject):
                    if key and reason:
                        reasons[key] = reason
    finally:
        engine.dispose()
    return clean, reasons


# --------------------------------------------------------------------------- a fake clamd


class FakeClamd:
    """A Unix socket server that answers every command with ``reply`` (garbage), or
    accepts and never answers (``reply=None``)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.path = path
        self.reply = reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.recv(65536)
            if self.reply is not None:
                conn.sendall(self.reply)
                conn.close()
                return
            while not self.closed:  # accepted, never answered
                try:
                    if not conn.recv(65536):
                        time.sleep(0.2)
                except TimeoutError:
                    continue
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- one run


@dataclass
class Scale:
    burst: int  # messages per row
    factor: float  # fault durations: the seconds × factor (at least 1 s)
    settle: float  # seconds to wait for the mail to settle after the fault
    kills: int = 10  # SIGKILLs in the sigkill row
    pace: float = 0.1  # seconds between two messages of a burst: the fault lands mid-burst
    retry_delay: float = 0.25  # [policy] retry_delay of the worker

    def seconds(self, full: float) -> float:
        return max(1.0, full * self.factor)


SHORT = Scale(burst=20, factor=0.05, settle=60, kills=4, retry_delay=0.1, pace=0.15)
FULL = Scale(burst=200, factor=1.0, settle=300, kills=10, retry_delay=0.25, pace=0.1)


class Skip(Exception):
    """The row cannot run on this machine (the reason is reported)."""


class Run:
    """One row on one database: the Postfix, the worker, the ledger, the fault's tools."""

    def __init__(self, row: Row, db: str, root: Path, clamd: ClamdInstance, scale: Scale,
                 seed: int, postfix: PostfixInstance | None = None) -> None:
        self.row, self.db, self.root, self.clamd, self.scale = row, db, root, clamd, scale
        self.rng = random.Random(seed)
        self.seed = seed
        self.ledger = Ledger(uuid.uuid4().hex[:8])
        self.rcpt = f"r{self.ledger.tag}"  # the row's own mailbox
        self.shared_postfix = postfix is not None
        self.postfix = postfix or PostfixInstance(root / "postfix", mailboxes=(self.rcpt,))
        self.quarantine = root / "quarantine"
        self.clamd_link = root / "clamd" / "clamd.sock"
        self.db_url = ""
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = root / "worker.log"
        self.config_file = root / "spoolscan.toml"
        self.cleanups: list[Callable[[], None]] = []
        self.notes: list[str] = []
        self.sweep_interval = "1s"
        self.pg: PrivatePostgres | None = None  # when the row needs a cluster of its own
        self.sending_done = threading.Event()
        self.restarts = 0  # the worker exited with an error and was started again
        self._worker_lock = threading.Lock()
        self._finished = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.phases: dict[str, float] = {}
        self._phase_at = time.monotonic()

    # --- the pieces --------------------------------------------------------------

    def mount_tmpfs(self, path: Path, size: str, uid: int = 0, gid: int = 0,
                    mode: int = 0o755) -> None:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:o}",
                                 "tmpfs", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            raise Skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        self.cleanups.append(lambda: _run_quietly("umount", "-l", str(path)))
        os.chown(path, uid, gid)
        os.chmod(path, mode)

    def point_clamd_at(self, target: Path) -> None:
        tmp = self.clamd_link.with_name(".clamd.sock.new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, self.clamd_link)

    def write_config(self) -> None:
        user = pwd.getpwnam(WORKER_USER)
        for path in (self.root, *self.root.parents):
            st = path.stat()
            if not st.st_mode & 0o001:
                path.chmod(st.st_mode & 0o7777 | 0o001)
        if self.db_url.startswith("sqlite:///"):
            os.chown(Path(self.db_url[len("sqlite:///"):]).parent, user.pw_uid, user.pw_gid)
        timeout = 3 if self.scale.factor < 1 else 10
        self.config_file.write_text(f"""
[database]
url = "{self.db_url}"

[clamd]
socket = "{self.clamd_link}"
timeout = {timeout}
concurrency = 4
database_directory = "{self.clamd.db_dir}"
config_file = "{self.clamd.conf_path}"

[quarantine]
directory = "{self.quarantine}"

[policy]
local_domains = ["spoolscan.test"]
max_attempts = 8
retry_delay = {self.scale.retry_delay}

[privileges]
user = "{WORKER_USER}"

[[source]]
name = "postfix"
type = "postfix-hold"
config_directory = "{self.postfix.config_dir}"
sweep_interval = "{self.sweep_interval}"

[[source]]
name = "mailboxes"
type = "maildir"
paths = ["{self.postfix.maildir_for(self.rcpt)}"]
quarantine = "store"
sweep_interval = "{self.sweep_interval}"
""")
        os.chmod(self.config_file, 0o644)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "spoolscan", "--config", str(self.config_file), *args]

    def start_worker(self) -> None:
        with self._worker_lock, open(self.worker_log, "ab") as log:
            self.worker = subprocess.Popen(self.command("run"), stdout=log, stderr=log)
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        """What systemd does for spoolscan.service (Restart=on-failure, RestartSec=5,
        scaled): a worker that exits with an error is started again."""
        while not self._finished.wait(0.2):
            with self._worker_lock:
                proc = self.worker
                if proc is None or proc.poll() is None or proc.returncode == 0:
                    continue
                self.worker = None
            self.restarts += 1
            self._finished.wait(self.scale.seconds(5))
            if not self._finished.is_set():
                self.start_worker()

    def kill_worker(self) -> None:
        with self._worker_lock:
            proc, self.worker = self.worker, None
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def wait_working(self, sent: int, timeout: float = 60) -> None:
        """Until the worker acted on a message and ``sent`` messages were sent."""
        self.wait_progress(1, timeout)
        self.wait_sent(sent, timeout)

    def stop_worker(self) -> None:
        """SIGTERM (and no restart): what `systemctl stop` does."""
        self._finished.set()
        with self._worker_lock:
            proc, self.worker = self.worker, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.notes.append("the worker did not stop on SIGTERM within 60 s")
        if proc.returncode not in (0, -signal.SIGTERM):  # -SIGTERM: still starting
            self.notes.append(f"the worker exited with {proc.returncode} on SIGTERM")

    def resume_supervision(self) -> None:
        self._finished.clear()
        self._supervisor = None

    def wait_maildir_rows(self, n: int, timeout: float) -> None:
        """Until the store has ``n`` messages of the Maildir source (clean, recorded)."""
        from sqlalchemy import text

        from spoolscan.store.db import create_engine_for

        engine = create_engine_for(self.db_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    done = conn.execute(text(
                        "SELECT count(*) FROM messages WHERE kind = 'maildir' "
                        "AND state = 'done'")).scalar()
                if (done or 0) >= n:
                    return
                time.sleep(0.2)
        finally:
            engine.dispose()

    def phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self._phase_at, 2)
        self._phase_at = now

    def wait_log(self, text: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if text in self.worker_log.read_bytes():
                    return True
            time.sleep(0.05)
        return False

    def progress(self) -> int:
        return self.ledger.progress(self.postfix, self.quarantine)

    def wait_progress(self, n: int, timeout: float = 60) -> None:
        """Until ``n`` messages are acted on (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.progress() < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def wait_sent(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (len(self.ledger.entries) < n and not self.sending_done.is_set()
               and time.monotonic() < deadline):
            time.sleep(0.02)

    def send(self, entry: Entry, timeout: float = 120) -> None:
        """Send over SMTP; while Postfix is down, try again (as an SMTP client would)."""
        deadline = time.monotonic() + timeout
        data = build_message(entry.marker, entry.kind)
        while True:
            try:
                entry.queue_id = self.postfix.send(data, recipients=[f"{self.rcpt}@spoolscan.test"])
                return
            except (OSError, smtplib.SMTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def burst(self, n: int, kinds: Callable[[int], str] | None = None) -> None:
        kinds = kinds or (lambda i: "infected" if i % 5 == 0 else "clean")
        try:
            for i in range(n):
                started = time.monotonic()
                self.send(self.ledger.new(kinds(i)))
                if not self.row.unpaced:
                    time.sleep(max(0.0, self.scale.pace - (time.monotonic() - started)))
        finally:
            self.sending_done.set()

    def put_in_maildir(self, kind: str) -> Entry:
        """A message put straight into the recipient's Maildir (not through Postfix)."""
        entry = self.ledger.new(kind, via="maildir")
        box = self.postfix.maildir_for(self.rcpt)
        unique = f"{int(time.time())}.M{len(self.ledger.entries)}P{os.getpid()}.faults"
        tmp = box / "tmp" / unique
        tmp.write_bytes(build_message(entry.marker, kind))
        os.chown(tmp, NOBODY_UID, NOBODY_GID)
        entry.path = box / "new" / unique
        os.rename(tmp, entry.path)
        return entry

    def settle(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout or self.scale.settle)
        while time.monotonic() < deadline:
            if self.ledger.settled(self.postfix, self.quarantine):
                time.sleep(0.5)  # anything late (a second delivery) shows up
                return True
            time.sleep(0.25)
        return False


# --------------------------------------------------------------------------- databases


@contextlib.contextmanager
def database(run: Run) -> Iterator[str]:

    from spoolscan.store.db import create_engine_for, upgrade

    if run.db == "sqlite":
        directory = run.root / "db"
        if run.row.sqlite_on_tmpfs:
            # Room for the database and its WAL (auto-checkpoint at 4 MB) at this load.
            run.mount_tmpfs(directory, f"{max(3, run.scale.burst // 10)}m")
        directory.mkdir(exist_ok=True)
        url = f"sqlite:///{directory / 'spoolscan.db'}"
        engine = create_engine_for(url)
        upgrade(engine)
        engine.dispose()
        user = pwd.getpwnam(WORKER_USER)
        for path in directory.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        yield url
        return
    if run.row.private_postgres:
        pg = PrivatePostgres(Path(f"/tmp/spoolscan-faults-pg-{os.getpid()}-{run.row.name}"))
        try:
            pg.init()
            pg.start()
        except Exception as exc:
            pg.destroy()
            raise Skip(f"cannot run a private PostgreSQL cluster: {exc}") from exc
        run.pg = pg
        try:
            yield pg.create_database()
        finally:
            pg.destroy()
        return
    with new_database("spoolscan_faults", PG_ADMIN_URL) as url:
        yield url


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    how: str  # how the fault is injected ({s} and friends: seconds at this scale)
    inject: Callable[[Run], None]  # runs while the burst is being sent
    prepare: Callable[[Run], None] | None = None  # before Postfix and the worker start
    databases: tuple[str, ...] = ("sqlite", "postgresql")
    not_applicable: str = ""  # why the row does not run on the databases it leaves out
    sqlite_on_tmpfs: bool = False
    private_postgres: bool = False
    own_burst: bool = False  # inject() sends the mail itself
    unpaced: bool = False  # the burst as fast as SMTP takes it (a backlog for the fault)


def _sigkill(run: Run) -> None:
    n = run.scale.burst
    points = sorted(run.rng.sample(range(1, n), run.scale.kills))
    run.notes.append(f"seed {run.seed}: SIGKILL after {', '.join(map(str, points))} "
                     "messages acted on")
    for point in points:
        run.wait_progress(point, timeout=30)
        time.sleep(run.rng.uniform(0, 0.2))
        run.kill_worker()
        run.start_worker()


def _clamd_stopped(run: Run) -> None:
    run.wait_working(run.scale.burst // 3)
    run.clamd.stop()
    time.sleep(run.scale.seconds(30))
    run.clamd.start()


def _fake_clamd(reply: bytes | None) -> Callable[[Run], None]:
    def inject(run: Run) -> None:
        run.wait_working(run.scale.burst // 3)
        fake = FakeClamd(run.root / "clamd" / "fake.sock", reply)
        try:
            run.point_clamd_at(fake.path)
            time.sleep(run.scale.seconds(30))
            run.point_clamd_at(run.clamd.socket_path)
        finally:
            fake.close()
    return inject


def _postgres_restart(run: Run) -> None:
    run.wait_working(run.scale.burst // 3)
    assert run.pg is not None
    run.pg.stop()
    time.sleep(run.scale.seconds(10))
    run.pg.start()


def _database_locked(run: Run) -> None:
    run.wait_working(run.scale.burst // 3)
    seconds = run.scale.seconds(10)
    if run.db == "sqlite":
        lite = sqlite3.connect(run.db_url[len("sqlite:///"):], timeout=30,
                               isolation_level=None)
        lite.execute("BEGIN EXCLUSIVE")
        lite.execute("CREATE TABLE IF NOT EXISTS faults_lock (x INTEGER)")
        time.sleep(seconds)
        lite.execute("ROLLBACK")
        lite.close()
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(run.db_url)
    with engine.connect() as conn:
        conn.execute(text("LOCK TABLE messages, scans, actions IN ACCESS EXCLUSIVE MODE"))
        time.sleep(seconds)
        conn.rollback()
    engine.dispose()


def _inotify_prepare(run: Run) -> None:
    if not os.access(INOTIFY_MAX, os.W_OK):
        raise Skip(f"{INOTIFY_MAX} is not writable here")
    run.sweep_interval = "1h"  # only the overflow handling can find what was dropped


def _inotify_overflow(run: Run) -> None:
    """The worker stopped (SIGSTOP) while the burst lands: far more events than the
    lowered queue holds; then SIGCONT."""
    assert run.worker is not None
    run.worker.send_signal(signal.SIGSTOP)
    try:
        run.sending_done.wait(300)
        time.sleep(0.5)
    finally:
        run.worker.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if b"inotify events were lost" in run.worker_log.read_bytes():
            run.notes.append("the worker logged the overflow and swept hold/")
            return
        time.sleep(0.1)
    run.notes.append("no overflow logged by the worker")


def _fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its filesystem has no byte left."""
    filler = directory / ".faults-filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def _quarantine_full_prepare(run: Run) -> None:
    user = pwd.getpwnam(WORKER_USER)
    run.mount_tmpfs(run.quarantine, "2m", user.pw_uid, user.pw_gid, 0o700)


def _quarantine_full(run: Run) -> None:
    run.wait_progress(1)
    filler = _fill(run.quarantine)
    run.notes.append("quarantine store: a 2 MiB tmpfs, filled up")
    time.sleep(run.scale.seconds(30))
    filler.unlink()


def _quarantine_unwritable(run: Run) -> None:
    """A read-only bind mount over the quarantine store: EROFS for root too (the helper
    and the worker alike)."""
    run.wait_progress(1)
    q = str(run.quarantine)
    for args in (["--bind", q, q], ["-o", "remount,ro,bind", q]):
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", q], capture_output=True)
            raise Skip(f"cannot make a read-only bind mount: {result.stderr.strip()}")
    try:
        time.sleep(run.scale.seconds(30))
    finally:
        subprocess.run(["umount", q], capture_output=True, check=True)


def _postfix_stopped(run: Run) -> None:
    run.wait_working(run.scale.burst // 2)
    run.postfix.stop()
    time.sleep(run.scale.seconds(30))
    run.postfix.start()


def _exdev_prepare(run: Run) -> None:
    box = run.postfix.maildir_for(run.rcpt)
    run.mount_tmpfs(box.parent, "32m", NOBODY_UID, NOBODY_GID, 0o700)
    for path in (box, box / "tmp", box / "new", box / "cur"):  # as virtual(8) makes it
        path.mkdir(mode=0o700, exist_ok=True)
        os.chown(path, NOBODY_UID, NOBODY_GID)


def _exdev(run: Run) -> None:
    for i in range(max(3, run.scale.burst // 5)):
        run.put_in_maildir("infected" if i % 2 == 0 else "clean")
        time.sleep(0.05)


def _disk_full(run: Run) -> None:
    run.wait_working(run.scale.burst // 3)
    filler = _fill(run.root / "db")
    st = os.statvfs(filler)
    run.notes.append(f"the SQLite file's tmpfs filled ({st.f_bavail * st.f_frsize} bytes "
                     "left)")
    time.sleep(run.scale.seconds(30))
    filler.unlink()


def reset_signatures(clamd: ClamdInstance) -> None:
    """Back to the base test database (no daily.cud), reloaded."""
    if not (clamd.db_dir / "daily.cud").exists():
        return
    (clamd.db_dir / "daily.cud").unlink()
    clamd.write_database()
    clamd.command(b"RELOAD")
    deadline = time.monotonic() + 30
    while b"/" in clamd.command(b"VERSION") and time.monotonic() < deadline:
        time.sleep(0.1)


def _rescan_kill(run: Run) -> None:
    """Latent mail delivered clean; new signatures; `spoolscan rescan` killed; again."""
    reset_signatures(run.clamd)  # an earlier run of the row published the new ones
    n = run.scale.burst
    run.burst(n, lambda i: "latent" if i % 3 == 0 else "clean")
    run.wait_progress(n, timeout=120)
    run.wait_maildir_rows(n, timeout=60)  # the Maildir source recorded what was delivered
    version = 1000 + int(time.time()) % 100000
    run.clamd.publish_daily(version, (ndb_line("Spoolscan.Test.Latent", LATENT),))
    run.stop_worker()  # the rescan is its own process here
    kills = 3 if run.scale.kills >= 10 else 1
    points = sorted(run.rng.sample(range(1, max(2, n // 3)), min(kills, max(1, n // 3 - 1))))
    run.notes.append(f"seed {run.seed}: daily version {version}; `spoolscan rescan` "
                     f"SIGKILLed after {', '.join(map(str, points))} retroactive detections")
    for point in points:
        with open(run.worker_log, "ab") as log:
            proc = subprocess.Popen(run.command("rescan", "--all"), stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while (len(Ledger.quarantined(run.quarantine)) < point and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(run.worker_log, "ab") as log:
        subprocess.run(run.command("rescan", "--all"), stdout=log, stderr=log, timeout=300)
    run.resume_supervision()
    run.start_worker()


ROWS: tuple[Row, ...] = (
    Row("sigkill", "SIGKILL of the worker at seeded points",
        "SIGKILL of the `spoolscan run` worker at {kills} points of the burst drawn from the "
        "seed (after k messages were acted on, plus up to 0.2 s), restarted each time",
        _sigkill),
    Row("clamd-stopped", "clamd stopped mid-burst, then started",
        "clamd (SIGTERM) stopped after a third of the burst was sent, started again "
        "{s30} s later", _clamd_stopped),
    Row("clamd-garbage", "clamd answering garbage",
        "the clamd socket swapped for a server answering every command with garbage "
        "bytes for {s30} s, then back", _fake_clamd(b"\x00\xffGARBAGE: \x1b[31m ??? FOUNDX")),
    Row("clamd-silent", "clamd accepting and never answering",
        "the clamd socket swapped for a server that accepts and never answers for "
        "{s30} s, then back", _fake_clamd(None)),
    Row("postgres-restart", "PostgreSQL restarted mid-burst",
        "the worker's own PostgreSQL cluster stopped (pg_ctl -m fast) after a third of the "
        "burst was sent, started {s10} s later", _postgres_restart,
        databases=("postgresql",), private_postgres=True,
        not_applicable="SQLite has no server to restart (see database-locked)"),
    Row("database-locked", "the database locked by another writer",
        "another connection holds the database for {s10} s: SQLite `BEGIN EXCLUSIVE`, "
        "PostgreSQL `LOCK TABLE messages, scans, actions IN ACCESS EXCLUSIVE MODE`",
        _database_locked),
    Row("inotify-overflow", "inotify queue overflow",
        f"{INOTIFY_MAX.name} lowered to 8 while the worker starts its watches (restored "
        "after); full sweeps every hour only; the worker SIGSTOPped while the whole burst "
        "lands (its events overflow the queue), then SIGCONT",
        _inotify_overflow, prepare=_inotify_prepare),
    Row("quarantine-full", "quarantine store full",
        "the quarantine store is a 2 MiB tmpfs, filled to the last byte for {s30} s "
        "once the first message was acted on", _quarantine_full, prepare=_quarantine_full_prepare),
    Row("quarantine-unwritable", "quarantine store unwritable",
        "a read-only bind mount over the quarantine store (EROFS, root included) for "
        "{s30} s once the first message was acted on",
        _quarantine_unwritable),
    Row("postfix-stopped", "Postfix stopped while spoolscan releases",
        "the burst sent as fast as SMTP takes it (a backlog on hold); `postfix stop` after "
        "half of it was sent, while spoolscan releases (postsuper/postqueue fail, SMTP "
        "refused: the sender retries), `postfix start` {s30} s later", _postfix_stopped,
        unpaced=True),
    Row("maildir-exdev", "a Maildir on another filesystem than the quarantine store",
        "the recipient's mailbox is a tmpfs, the quarantine store on the root filesystem: "
        "infected messages put straight into the Maildir are moved across filesystems",
        _exdev, prepare=_exdev_prepare),
    Row("sqlite-disk-full", "the disk of the SQLite file full",
        "the SQLite file on a 3 MiB tmpfs, filled to the last byte after a third of the "
        "burst was sent, freed {s30} s later", _disk_full, databases=("sqlite",),
        sqlite_on_tmpfs=True,
        not_applicable="PostgreSQL's disk belongs to the database server"),
    Row("rescan-sigkill", "SIGKILL during a rescan after a signature update",
        "a third of the burst carries a pattern unknown to clamd (delivered clean); new "
        "signatures published (daily.cud, RELOAD); `spoolscan rescan --all` SIGKILLed "
        "after seeded numbers of retroactive quarantines, run again to the end",
        _rescan_kill, own_burst=True),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def row(name: str) -> Row:
    return next(r for r in ROWS if r.name == name)


@dataclass
class Result:
    row: Row
    db: str
    counts: Counts | None
    skipped: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    settled: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    fault_seen: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or (self.counts is not None and self.counts.ok)


def describe(row: Row, scale: Scale) -> str:
    return row.how.format(s30=f"{scale.seconds(30):g}", s10=f"{scale.seconds(10):g}",
                          kills=scale.kills)


def run_row(row: Row, db: str, workdir: Path, clamd: ClamdInstance, scale: Scale = SHORT,
            seed: int = 12, postfix: PostfixInstance | None = None) -> Result:
    """Run ``row`` on ``db`` (sqlite | postgresql); the ledger's counts.  ``postfix``: a
    running instance to share between rows (each row gets a mailbox of its own and reads
    the mail log from where it started); by default the row starts one of its own."""
    started = time.monotonic()
    root = workdir / f"{row.name}-{db}"
    root.mkdir(parents=True)
    root.chmod(0o755)
    (root / "clamd").mkdir()
    run = Run(row, db, root, clamd, scale, seed, postfix)
    run.point_clamd_at(clamd.socket_path)
    run.ledger.mailbox = run.postfix.maildir_for(run.rcpt)
    if postfix is not None:
        postfix.add_mailbox(run.rcpt)
        run.ledger.mailbox = postfix.maildir_for(run.rcpt)
        with contextlib.suppress(OSError):
            run.ledger.log_offset = postfix.log_path.stat().st_size
    result = Result(row, db, None)
    sender: threading.Thread | None = None
    try:
        if row.prepare is not None:
            row.prepare(run)
        with database(run) as url:
            run.db_url = url
            run.write_config()
            run.phase("database")
            if not run.postfix.running:
                run.postfix.start()
            run.phase("postfix start")
            if row.name == "inotify-overflow":
                with lowered_queue(8) as old:
                    run.start_worker()
                    run.wait_log(b"postfix: watching", 30)  # made with the low limit
                run.notes.append(f"{INOTIFY_MAX}: {old} -> 8 -> {old}")
            else:
                run.start_worker()
            if not run.wait_log(b"postfix: watching", 60):  # working before the burst
                run.notes.append("the worker did not report watching hold/ within 60 s")
            if not row.own_burst:
                sender = threading.Thread(target=run.burst, args=(scale.burst,), daemon=True)
                sender.start()
            run.phase("worker start")
            row.inject(run)
            run.phase("fault")
            if sender is not None:
                sender.join(300)
            result.settled = run.settle()
            run.phase("settle")
            run.stop_worker()
            run.phase("worker stop")
            result.counts = run.ledger.classify(run.postfix, run.quarantine, url)
            result.fault_seen = fault_seen(url, run.worker_log)
            if not result.settled:
                run.notes.append(f"not settled after {scale.settle:g} s")
            if run.restarts:
                run.notes.append(f"the worker exited with an error {run.restarts} time(s) "
                                 "and was started again (as systemd's Restart=on-failure)")
    except Skip as exc:
        result.skipped = str(exc)
    finally:
        with contextlib.suppress(Exception):
            run.stop_worker()
        with contextlib.suppress(Exception):
            if not run.shared_postfix:
                run.postfix.stop()
            elif not run.postfix.running:
                run.postfix.start()
        if not clamd.ping():
            clamd.start()
        for cleanup in reversed(run.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
    run.phase("clean-up")
    result.notes = run.notes
    result.seconds = time.monotonic() - started
    result.phases = run.phases
    return result


# --------------------------------------------------------------------------- the report

FOUND = """\
## What the matrix found (fixed, each with a test)

- **sigkill**: a worker killed between the copy into the quarantine store and
  `postsuper -d` left that copy behind; the restart scanned the message again and made a
  second copy under the new scan's name. An unfinished quarantine's copy is now finished
  instead (`test_an_unfinished_quarantine_is_finished_not_copied_again[pending]`).
- **postfix-stopped**: every failed `postsuper -d` (Postfix stopped) left one more copy
  in the quarantine store, one per retry. Same fix (`...[failed]`).
- **sqlite-disk-full**: verdicts that could not be committed were handed back to the
  sweeps while still in the pipeline; a sweep in between claimed them again, the pipeline
  refused the duplicate job, and the claim kept them from every sweep for 10 minutes
  (HANDED_WINDOW): the mail stayed held long after the disk had room again. They are now
  handed back once out of the pipeline (`test_mail_flows_as_soon_as_a_database_outage_ends`).

`make test` runs every row in a short version (20 messages, fault durations × 0.05 with at
least 1 s, 4 kills, one Postfix shared by the rows; the rows whose fault is the database's
on both databases, the others on one, SQLite and PostgreSQL in turn):
`tests/test_faults.py`.
"""

FUZZING = """\
## Fuzzing (hostile bytes)

`make fuzz` runs the parsers of untrusted input on random examples (Hypothesis); the
figures of the last run on this machine:

| target | examples | examples/s |
|---|---:|---:|
| queue file, mutated | 100,000 | 207 |
| queue file, random bytes | 100,000 | 894 |
| file names | 100,000 | 898 |
| content hash | 100,000 | 519 |
| clamd replies | 100,000 | 956 |
| header values | 20,000 | — |

What the parsers must withstand and why is in [security.md](security.md).
"""


def machine() -> str:
    cpus = os.cpu_count()
    mem = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) // 1024 // 1024 + 1} GiB RAM"
    pf = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                        text=True).stdout.strip()
    clamd = subprocess.run(["clamd", "--version"], capture_output=True, text=True)
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {cpus} CPUs{mem}; "
            f"Python {platform.python_version()}, Postfix {pf}, "
            f"{clamd.stdout.strip().split('/')[0] or 'clamd'}")


def previous_rows(text: str) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """From a report written earlier: (row, db) -> (its table line, its note lines)."""
    found: dict[tuple[str, str], tuple[str, list[str]]] = {}
    current = ""
    for line in text.splitlines():
        m = re.match(r"\| ([a-z-]+) \| (sqlite|postgresql) \|", line)
        if m:
            found[(m.group(1), m.group(2))] = (line, [])
        m = re.match(r"- \*\*([a-z-]+)\*\*", line)
        if m:
            current = m.group(1)
        m = re.match(r"  - (sqlite|postgresql): ", line)
        if m and (current, m.group(1)) in found:
            found[(current, m.group(1))][1].append(line)
    return found


def report(results: list[Result], scale: Scale, seed: int, started: str,
           previous: dict[tuple[str, str], tuple[str, list[str]]] | None = None) -> str:
    """The Markdown report; ``previous`` (``previous_rows``): rows not run now are kept
    from an earlier report (``bench/faults --update``)."""
    previous = previous or {}
    rerun = {(r.row.name, r.db) for r in results}
    kept = [key for key in previous if key not in rerun]
    out = [
        "# Reliability: the fault matrix",
        "",
        "Generated by `make faults` (`bench/faults`) — do not edit by hand.",
        "",
        f"- date: {started}" + (f" (rows {', '.join(f'{a}/{b}' for a, b in sorted(rerun))}; "
                                "the others from the run before)" if kept else ""),
        f"- machine: {machine()}",
        f"- load: {scale.burst} messages per row sent over SMTP, one every {scale.pace:g} s, "
        "to a private Postfix that holds everything (every fifth one carries EICAR), "
        "`spoolscan run` working on the hold queue and on the Maildir Postfix delivers to "
        f"(SQLite or PostgreSQL); fault durations × {scale.factor:g} of the issue's; seed "
        f"{seed}; the worker's retry_delay {scale.retry_delay:g} s, max_attempts 8",
        "- *what the fault did*: scans that ended in `error` and actions that failed, from "
        "the store; commits refused, from the worker's log (a locked database makes commits "
        "wait — SQLite's busy_timeout, PostgreSQL's lock queue — rather than fail)",
        "- the ledger: every message sent is looked for in Postfix's log (delivered, by "
        "queue ID), in the quarantine store, in Postfix's queues and in the Maildirs, and "
        "in the store (a clean verdict for what was delivered; a visible reason for what "
        "is still held). *held* counts only messages held with a reason in the store; "
        "anything else not delivered or quarantined is *lost*.",
        "",
        "| row | db | sent | delivered | quarantined | held | lost | infected delivered "
        "| duplicated | released unscanned | time | what the fault did |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    by_key = {(r.row.name, r.db): r for r in results}
    for key in [(row_.name, db) for row_ in ROWS for db in row_.databases]:
        r = by_key.get(key)
        if r is None:
            if key in previous:
                out.append(previous[key][0])
            continue
        if r.skipped or r.counts is None:
            out.append(f"| {r.row.name} | {r.db} | skipped: {r.skipped or 'no result'} "
                       "| | | | | | | | | |")
            continue
        c = r.counts
        out.append(f"| {r.row.name} | {r.db} | {c.sent} | {c.delivered} | {c.quarantined} "
                   f"| {c.held} | {c.lost} | {c.infected_delivered} | {c.duplicated} "
                   f"| {c.released_unscanned} | {r.seconds:.0f} s | {r.fault_seen} |")
    out += ["", "## The rows", ""]
    for row_ in ROWS:
        out.append(f"- **{row_.name}** — {row_.title}: {describe(row_, scale)}."
                   + (f" Runs on {', '.join(row_.databases)} only: {row_.not_applicable}."
                      if row_.not_applicable else ""))
        for db in row_.databases:
            r = by_key.get((row_.name, db))
            if r is None:
                out += previous.get((row_.name, db), ("", []))[1]
            elif r.notes or (r.counts and r.counts.problems):
                detail = "; ".join(r.notes + (r.counts.problems[:5] if r.counts else []))
                out.append(f"  - {r.db}: {detail}")
    out += ["", FOUND, "", FUZZING]
    return "\n".join(out) + "\n"
