"""A private Postfix instance for tests: own config, queue, log and Maildirs under a temp dir.

Nothing in /etc/postfix is touched: the instance has its own ``main.cf``/``master.cf``
(``postfix -c DIR``), listens on a free loopback port and holds every message that has a
``Received:`` header (``header_checks``: ``/^Received:/ HOLD``), i.e. all SMTP mail.
Released mail is delivered by virtual(8) to ``<root>/vmail/<user>/Maildir/`` as
``nobody``, without system accounts.  Needs root (Postfix's master runs as root).

An instance can also run a small test milter (``milter=True``).  With a milter configured,
cleanup(8) leaves placeholder ``p`` (pointer) and ``w`` (padding) records in every queue
file; a message carrying ``X-Test-Milter: headers rcpts body`` (any of the words) is edited
at end of message so that real pointer records appear:

* ``headers``: insert ``X-Milter-Inserted`` as the second header, change the first
  ``Subject`` to ``[milter] <old subject>``, add ``X-Milter-Added`` at the end;
* ``rcpts``: add ``milter-added@<local domain>``, delete recipients whose local part starts
  with ``drop``;
* ``body``: replace the body with ``MILTER_BODY``; ``unterminated-body``: with
  ``MILTER_BODY_UNTERMINATED``, which does not end with a newline;
* ``quarantine``: quarantine the message (which also puts it on hold).

Used by the tests (their fixtures are in ``tests/conftest.py``) and by ``bench/``.  If
Postfix fails to start, the error carries the mail log so the reason is visible.
"""

from __future__ import annotations

import email.policy
import os
import pwd
import re
import signal
import smtplib
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from email.message import EmailMessage
from pathlib import Path

__all__ = [
    "LOCAL_DOMAIN",
    "MILTER_BODY",
    "MILTER_BODY_UNTERMINATED",
    "PostfixInstance",
    "TestMilter",
]

LOCAL_DOMAIN = "spoolscan.test"
MILTER_BODY = b"This body was replaced by the test milter.\r\nSecond line.\r\n"
MILTER_BODY_UNTERMINATED = b"Replaced body whose last line has no newline:\r\nlast line"
MASTER_CF = Path("/etc/postfix/master.cf")
NOBODY_UID = NOBODY_GID = 65534
DEFAULT_MAILBOXES = ("rcpt", "alice", "bob")
HEADER_CHECKS = (
    "/^Received:/ HOLD",
    # header_checks edits (these do *not* create pointer records: cleanup applies them
    # while writing; only milter edits do).
    "/^Subject:.*prepend-me/ PREPEND X-Prepended: by header_checks",
    "/^X-Replace-Me:/ REPLACE X-Replaced: by header_checks",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _allow_traversal(path: Path) -> None:
    """Let Postfix's unprivileged processes reach ``path``: pytest makes its temp dirs 0700.

    Adds only the search bit (o+x) to our own ancestor directories that lack it.
    """
    uid = os.getuid()
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid and not st.st_mode & 0o001:
            directory.chmod(st.st_mode & 0o7777 | 0o001)


# --------------------------------------------------------------------------- test milter

# Sendmail milter protocol, version 6 (libmilter/mfdef.h).
_SMFIF_ALL = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20  # add/chg headers, body, rcpts, quarantine


class _MilterHandler(socketserver.BaseRequestHandler):
    """One MTA connection: answers every step with 'continue' and edits at end of message."""

    def setup(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rcpts: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []

    def recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = self.request.recv(size - len(data))
            if not more:
                raise EOFError
            data += more
        return data

    def reply(self, command: bytes, data: bytes = b"") -> None:
        self.request.sendall(struct.pack(">I", len(data) + 1) + command + data)

    def handle(self) -> None:
        try:
            while True:
                (size,) = struct.unpack(">I", self.recv_exact(4))
                packet = self.recv_exact(size)
                if not self.dispatch(packet[:1], packet[1:]):
                    return
        except (EOFError, ConnectionError):
            return

    def dispatch(self, command: bytes, data: bytes) -> bool:
        if command == b"O":  # option negotiation: v6, our actions, every step with a reply
            self.reply(b"O", struct.pack(">III", 6, _SMFIF_ALL, 0))
        elif command == b"D":  # macros: no reply
            pass
        elif command in (b"A", b"K"):  # abort message / new connection follows: no reply
            self.reset()
        elif command == b"Q":
            return False
        elif command == b"R":
            self.rcpts.append(data.split(b"\0")[0])
            self.reply(b"c")
        elif command == b"L":
            name, value = (data.split(b"\0") + [b"", b""])[:2]
            self.headers.append((name, value))
            self.reply(b"c")
        elif command == b"E":
            self.end_of_message()
            self.reset()
        else:  # connect, helo, mail, data, eoh, body chunk, unknown
            self.reply(b"c")
        return True

    def end_of_message(self) -> None:
        words: set[bytes] = set()
        for name, value in self.headers:
            if name.lower() == b"x-test-milter":
                words.update(value.lower().split())
        if b"headers" in words:
            self.reply(b"i", struct.pack(">I", 1) + b"X-Milter-Inserted\0second header\0")
            subject = next((v for n, v in self.headers if n.lower() == b"subject"), None)
            if subject is not None:
                new = b"[milter]" + (subject if subject.startswith(b" ") else b" " + subject)
                self.reply(b"m", struct.pack(">I", 1) + b"Subject\0" + new + b"\0")
            self.reply(b"h", b"X-Milter-Added\0last header\0")
        if b"rcpts" in words:
            self.reply(b"+", f"<milter-added@{LOCAL_DOMAIN}>".encode() + b"\0")
            for rcpt in self.rcpts:
                if rcpt.strip(b"<>").lower().startswith(b"drop"):
                    self.reply(b"-", rcpt + b"\0")
        if b"body" in words:
            self.reply(b"b", MILTER_BODY)
        if b"unterminated-body" in words:
            self.reply(b"b", MILTER_BODY_UNTERMINATED)
        if b"quarantine" in words:
            self.reply(b"q", b"test milter quarantine\0")
        self.reply(b"a")


class _ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class TestMilter:
    """The test milter on a loopback port, served by threads of this process."""

    __test__ = False  # not a test class, despite the name

    def __init__(self) -> None:
        self._server = _ThreadingServer(("127.0.0.1", 0), _MilterHandler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="test-milter", daemon=True
        )

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- Postfix


def _master_cf(smtp_port: int) -> str:
    """Debian's master.cf with smtpd on a loopback port and no chroot anywhere."""
    lines = []
    for line in MASTER_CF.read_text().splitlines():
        fields = line.split()
        is_service = line[:1] not in ("", "#", " ", "\t") and len(fields) >= 8
        if is_service:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{smtp_port}"
            fields[4] = "n"  # chroot: the jail would lack our temp paths
            line = " ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


class PostfixInstance:
    """A private Postfix under ``root``; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        long_queue_ids: bool = False,
        milter: bool = False,
        mailboxes: Iterable[str] = DEFAULT_MAILBOXES,
        hostname: str = "mx.spoolscan.test",
        header_checks: Iterable[str] = HEADER_CHECKS,
    ) -> None:
        self.root = root
        self.config_dir = root / "conf"
        self.queue_dir = root / "spool"
        self.data_dir = root / "data"
        self.vmail_dir = root / "vmail"
        self.log_path = root / "postfix.log"
        self.long_queue_ids = long_queue_ids
        self.hostname = hostname
        self.local_domain = LOCAL_DOMAIN
        self.mailboxes = list(dict.fromkeys(mailboxes))
        self.header_checks = list(header_checks)
        self.smtp_port = _free_port()
        self.use_milter = milter
        self.milter: TestMilter | None = None  # running only while Postfix runs
        self.extra_params: dict[str, str] = {}  # postconf() changes, kept across restarts
        self._master_pid: int | None = None

    # ----------------------------------------------------------------- configuration

    def main_cf(self) -> str:
        conf = self.config_dir
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "myhostname": self.hostname,
            "mydomain": self.local_domain,
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "localhost",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:local delivery is disabled in tests",
            # Nothing leaves the machine: bounces to example.com fail at once.
            "default_transport": "error:no outbound mail in tests",
            "virtual_mailbox_domains": self.local_domain,
            "virtual_mailbox_base": self.vmail_dir,
            "virtual_mailbox_maps": f"texthash:{conf}/vmailbox",
            "virtual_uid_maps": f"static:{NOBODY_UID}",
            "virtual_gid_maps": f"static:{NOBODY_GID}",
            "header_checks": f"regexp:{conf}/header_checks",
            # Keep bounces (which quote the original headers) out of hold.
            "nested_header_checks": "",
            "maillog_file": self.log_path,
            "maillog_file_prefixes": f"/var, /tmp, {self.root}",
            "smtputf8_enable": "yes",
            "enable_long_queue_ids": "yes" if self.long_queue_ids else "no",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP spoolscan-test",
            "message_size_limit": str(50 * 1024 * 1024),
            "virtual_mailbox_limit": "0",  # must not be below message_size_limit
        }
        if self.milter is not None:
            settings.update(
                smtpd_milters=self.milter.address,
                milter_protocol="6",
                # A broken test milter must show up as failures, not be skipped silently.
                milter_default_action="tempfail",
            )
        settings.update(self.extra_params)
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _write_vmailbox(self) -> None:
        # virtual(8) forbids $1 substitution in regexp maps, so users are listed; any other
        # user of the local domain lands in the catch-all mailbox.
        lines = [f"{user}@{self.local_domain} {user}/Maildir/" for user in self.mailboxes]
        lines.append(f"@{self.local_domain} catchall/Maildir/")
        (self.config_dir / "vmailbox").write_text("\n".join(lines) + "\n")

    def write_config(self) -> None:
        for directory in (self.config_dir, self.queue_dir, self.data_dir, self.vmail_dir):
            directory.mkdir(parents=True, exist_ok=True)
        _allow_traversal(self.root)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        os.chown(self.vmail_dir, NOBODY_UID, NOBODY_GID)
        (self.config_dir / "master.cf").write_text(_master_cf(self.smtp_port))
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "header_checks").write_text("\n".join(self.header_checks) + "\n")
        self._write_vmailbox()

    # ----------------------------------------------------------------- running

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.config_dir), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no mail log written)"

    def _failure(self, what: str, detail: str = "") -> RuntimeError:
        check = self._postfix("check")
        return RuntimeError(
            f"{what} (instance {self.root})\n{detail}\n"
            f"--- postfix check (exit {check.returncode}) ---\n{check.stdout}{check.stderr}\n"
            f"--- {self.log_path} ---\n{self.log_text()}"
        )

    @property
    def running(self) -> bool:
        return self._master_pid is not None

    def start(self, timeout: float = 30) -> None:
        """Write the configuration and start Postfix; returns once smtpd answers."""
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (master runs as root)")
        if self.use_milter and self.milter is None:
            self.milter = TestMilter()
            self.milter.start()
        self.write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            raise self._failure(
                "postfix start failed",
                f"exit {result.returncode}\n{result.stdout}{result.stderr}",
            )
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid_text = pid_file.read_text().strip() if pid_file.exists() else ""
            if self._master_pid is None and pid_text.isdigit():
                # From now on stop() can end this master, whatever happens next.
                self._master_pid = int(pid_text)
            if self._master_pid is not None and self._smtp_answers():
                return
            time.sleep(0.05)
        raise self._failure(f"Postfix did not accept SMTP on port {self.smtp_port} in {timeout}s")

    def _smtp_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as sock:
                return sock.recv(4).startswith(b"220")
        except OSError:
            return False

    def stop(self, timeout: float = 15) -> None:
        """Stop Postfix and wait until its master has exited (then stop the milter)."""
        try:
            if self._master_pid is not None:
                self._postfix("stop")
                self._wait_exit(self._master_pid, timeout)
                self._master_pid = None
        finally:
            if self.milter is not None:
                self.milter.stop()
                self.milter = None

    @staticmethod
    def _wait_exit(pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)  # our own master: it ignored "postfix stop"

    def reload(self) -> None:
        """Re-read the configuration (``postfix reload``); new processes use it."""
        result = self._postfix("reload")
        if result.returncode != 0:
            raise self._failure("postfix reload failed", result.stdout + result.stderr)
        time.sleep(0.5)  # idle daemons exit and get replaced asynchronously

    def postconf(self, **params: object) -> None:
        """Set main.cf parameters (``postconf -e``; kept across restarts), reload if running."""
        if not params:
            return
        self.extra_params.update({key: str(value) for key, value in params.items()})
        args = [f"{key}={value}" for key, value in params.items()]
        result = subprocess.run(
            ["postconf", "-c", str(self.config_dir), "-e", *args],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"postconf -e {args} failed: {result.stderr}")
        if self.running:
            self.reload()

    # ----------------------------------------------------------------- mail

    def send(
        self,
        message: bytes | EmailMessage,
        sender: str = "sender@example.com",
        recipients: Iterable[str] | None = None,
        *,
        smtputf8: bool | None = None,
        timeout: float = 30,
    ) -> str:
        """Send one message over SMTP and return its queue ID (from the DATA reply).

        Raw bytes are sent as they are, with line ends normalised to CRLF.  ``smtputf8``
        defaults to on when an address is not ASCII; 8-bit content is announced with
        ``BODY=8BITMIME``.
        """
        rcpts = list(recipients) if recipients is not None else [f"rcpt@{self.local_domain}"]
        if smtputf8 is None:
            smtputf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
        if isinstance(message, EmailMessage):
            policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
            data = message.as_bytes(policy=policy)
        else:
            data = re.sub(rb"\r?\n", b"\r\n", bytes(message))
        options = []
        if not data.isascii():
            options.append("BODY=8BITMIME")
        if smtputf8:
            options.append("SMTPUTF8")
        for attempt in range(3):
            # A 4xx before DATA is "try again later" (a test milter thread not scheduled in
            # time on a loaded machine): what an SMTP client does, a few times only, so a
            # broken milter still fails the test.
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=timeout) as smtp:
                smtp.ehlo("client.example.org")
                if smtputf8:
                    smtp.command_encoding = "utf-8"
                code, reply = smtp.mail(sender, options)
                if 400 <= code < 500 and attempt < 2:
                    time.sleep(1.0)
                    continue
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, reply, sender)
                for rcpt in rcpts:
                    code, reply = smtp.rcpt(rcpt)
                    if code not in (250, 251):
                        raise smtplib.SMTPRecipientsRefused({rcpt: (code, reply)})
                code, reply = smtp.data(data)
                break
        match = re.search(rb"queued as ([A-Za-z0-9_]+)", reply)
        if match is None:
            raise RuntimeError(f"no queue ID in the DATA reply: {code} {reply!r}")
        return match.group(1).decode()

    def _hold_files(self) -> Iterator[Path]:
        hold = self.queue_dir / "hold"
        if hold.is_dir():
            yield from (p for p in hold.rglob("*") if p.is_file())

    def held_ids(self) -> list[str]:
        """Queue IDs of all files under hold/ (flat or hashed), sorted."""
        return sorted(p.name for p in self._hold_files())

    def held_path(self, queue_id: str) -> Path:
        """The hold file of ``queue_id``; ``FileNotFoundError`` if it is not on hold."""
        for path in self._hold_files():
            if path.name == queue_id:
                return path
        raise FileNotFoundError(f"{queue_id} is not in {self.queue_dir / 'hold'}")

    def wait_held(self, n: int, timeout: float = 10) -> list[str]:
        """Wait until at least ``n`` files are on hold, all finished (mode 0700)."""
        deadline = time.monotonic() + timeout
        while True:
            files = list(self._hold_files())
            ready = [p for p in files if p.stat().st_mode & 0o700 == 0o700]
            if len(files) >= n and len(ready) == len(files):
                return sorted(p.name for p in files)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(ready)}/{len(files)} ready files on hold after {timeout}s, "
                    f"wanted {n}\n--- mail log ---\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.05)

    def add_mailbox(self, user: str) -> Path:
        """Give ``user@<local domain>`` a Maildir of its own (reloads if running)."""
        if user not in self.mailboxes:
            self.mailboxes.append(user)
            self._write_vmailbox()
            if self.running:
                self.reload()
        return self.maildir_for(user)

    def maildir_for(self, user: str) -> Path:
        """The Maildir that ``user@<local domain>`` is delivered to (catch-all if unlisted)."""
        box = user if user in self.mailboxes else "catchall"
        return self.vmail_dir / box / "Maildir"

    def delivered(self, user: str) -> list[Path]:
        """Message files delivered to ``user`` so far (new/ and cur/)."""
        maildir = self.maildir_for(user)
        return sorted(
            p for sub in ("new", "cur") if (maildir / sub).is_dir()
            for p in (maildir / sub).iterdir()
        )

    def wait_delivered(self, user: str, n: int, timeout: float = 15) -> list[Path]:
        """Wait until ``user``'s Maildir holds at least ``n`` messages."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.delivered(user)
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(found)} messages in {self.maildir_for(user)} after {timeout}s, "
                    f"wanted {n}\n--- mail log ---\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.05)

    def postcat(self, queue_id: str, *options: str) -> bytes:
        """``postcat -c CONF OPTIONS -q ID`` output as bytes (default options: ``-bh``)."""
        result = subprocess.run(
            ["postcat", "-c", str(self.config_dir), *(options or ("-bh",)), "-q", queue_id],
            capture_output=True, check=False, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"postcat failed: {result.stderr.decode(errors='replace')}")
        return result.stdout
