"""`spoolscan doctor`: every silent misconfiguration, found before it costs mail.

spoolscan fails closed: a wrong setting does not lose mail, it keeps it held or lets a
threat go unnoticed without a word.  Each check prints one line, ``ok``, ``WARN`` or
``FAIL``, and for a problem what to do about it.  Exit status: 0 all ok (warnings
allowed), 1 a check failed, 2 the configuration itself is invalid (from ``cli``).
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import shlex
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from spoolscan.config import Config, SourceConfig

OK, WARN, FAIL = "ok", "WARN", "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | WARN | FAIL
    message: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.status:5} {self.message}" if self.status == OK else \
            f"{self.status:5} {self.check}: {self.message}"
        return text + (f"\n      fix: {self.hint}" if self.hint else "")


class Problem(Exception):
    def __init__(self, message: str, hint: str = "", status: str = FAIL) -> None:
        super().__init__(message)
        self.hint = hint
        self.status = status


def read_clamd_conf(path: str) -> dict[str, str] | None:
    """clamd.conf as {option: value} (the last setting wins), None if unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            options[key] = value.strip()
    return options


def _size(value: str) -> int | None:
    m = re.fullmatch(r"(\d+)([KkMm]?)", value.strip())
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


# --- the checks -------------------------------------------------------------------------------


def check_privileges(config: Config) -> str:
    if os.geteuid() != 0:
        return f"not root: commands run as uid {os.geteuid()} (no privilege separation)"
    name = config.privileges.user
    if name == "root":
        raise Problem('[privileges] user = "root": the code that reads mail runs as root',
                      'create a system user and name it: adduser --system --group '
                      'spoolscan; user = "spoolscan"', WARN)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise Problem(f"[privileges] user {name!r} does not exist",
                      f"adduser --system --group --home /var/lib/spoolscan {name}") from None
    return f"the worker runs as {name} (uid {pw.pw_uid}); a root helper does the rest"


def check_clamd(config: Config) -> str:
    from spoolscan.clamd import ClamdError
    from spoolscan.clamdpool import ClamdPool, client_for

    client = client_for(config.clamd)
    try:
        fingerprint = client.fingerprint()
        if isinstance(client, ClamdPool):
            states = client.states()
            text = ", ".join(f"{name} {state}" for name, state, _ in states)
            if any(state != "up" for _, state, _ in states):
                raise Problem(f"clamd pool: {text} (pool signatures {fingerprint})",
                              "start the servers that are down; update the signatures of "
                              "those behind (they get no scans until they catch up)")
            return f"clamd pool answers: {text}: {fingerprint}"
        return f"clamd answers at {config.clamd.endpoint}: {fingerprint}"
    except ClamdError as exc:
        raise Problem(str(exc), "is clamav-daemon running? check [clamd] socket/address and "
                                "that spoolscan's user may use the socket") from None


def check_clamd_conf(config: Config) -> Iterator[Finding]:
    path = config.clamd.config_file
    conf = read_clamd_conf(path)
    if conf is None:
        yield Finding("clamd.conf", WARN, f"cannot read {path}: AlertExceedsMax and the "
                      "limits are not checked", "set [clamd] config_file to clamd's "
                      "configuration file")
        return
    if conf.get("AlertExceedsMax", "no").lower() not in ("yes", "true", "1"):
        yield Finding("clamd.conf", FAIL, f"{path}: AlertExceedsMax is off: clamd reports "
                      "content over its limits (MaxFileSize, MaxScanSize...) as clean",
                      f"set 'AlertExceedsMax yes' in {path} and restart clamd")
    else:
        yield Finding("clamd.conf", OK, f"{path}: AlertExceedsMax yes (over-limit content "
                      "is unchecked, never clean)")
    stream_max = _size(conf.get("StreamMaxLength", "100M"))
    if stream_max is not None and stream_max < config.policy.max_size:
        yield Finding("clamd.conf", WARN, f"StreamMaxLength ({stream_max} bytes) is below "
                      f"[policy] max_size ({config.policy.max_size}): messages in between "
                      "are unchecked", "raise StreamMaxLength or lower max_size")
    threads = conf.get("MaxThreads")
    if threads and threads.isdigit() and int(threads) <= config.clamd.concurrency:
        yield Finding("clamd.conf", WARN, f"MaxThreads {threads} is not above [clamd] "
                      f"concurrency {config.clamd.concurrency}: scans queue in clamd",
                      "raise MaxThreads (or lower concurrency)")


def check_fingerprint(config: Config) -> str:
    """Retroactive detection needs a fingerprint that changes when the signatures do."""
    from spoolscan.clamd import ClamdError
    from spoolscan.clamdpool import client_for

    try:
        version = client_for(config.clamd).version()
    except ClamdError:
        return "clamd does not answer: the fingerprint is checked once it does"
    if "/" in version:
        return f"signature updates are visible: {version}"
    # Custom databases only: only the digest of the database directory can change.
    conf = read_clamd_conf(config.clamd.config_file) or {}
    clamd_dir = conf.get("DatabaseDirectory")
    ours = config.clamd.database_directory
    signatures = [e for e in os.listdir(ours)] if os.path.isdir(ours) else []
    if clamd_dir and os.path.realpath(clamd_dir) != os.path.realpath(ours):
        raise Problem(f"clamd numbers no official database (VERSION: {version!r}) and "
                      f"[clamd] database_directory ({ours}) is not clamd's ({clamd_dir}): "
                      "signature changes are never seen, rescans never run",
                      f'set database_directory = "{clamd_dir}"')
    if not signatures:
        raise Problem(f"clamd numbers no official database and {ours} holds no signature "
                      "files: signature changes are never seen, rescans never run",
                      "set [clamd] database_directory to clamd's DatabaseDirectory")
    return (f"custom signatures only (VERSION {version!r}): changes in {ours} are seen "
            "through its digest")


def check_database(config: Config) -> str:
    from spoolscan.store.db import check_schema, create_engine_for

    engine = create_engine_for(config.database.url)
    try:
        check_schema(engine)
    except Exception as exc:
        raise Problem(str(exc), "spoolscan db upgrade") from None
    finally:
        engine.dispose()
    return f"database {engine.url.render_as_string(hide_password=True)} is up to date"


def check_quarantine(config: Config) -> str:
    directory = Path(config.quarantine.directory)
    user = config.privileges.user
    make = (f"install -d -m 0700 -o {user} {directory}   (spoolscan run creates it at "
            "start)")
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise Problem(f"quarantine directory {directory} does not exist", make) from None
    if not stat.S_ISDIR(st.st_mode):
        raise Problem(f"{directory} is not a directory (a symlink?)", make)
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise Problem(f"quarantine directory {directory} is mode "
                      f"{stat.S_IMODE(st.st_mode):04o}: others can read quarantined mail",
                      f"chmod 0700 {directory}")
    return f"quarantine directory {directory} exists, mode 0700"


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
                                 "fuse.glusterfs", "fuse.sshfs", "9p", "afs", "lustre"})


def filesystem_type(path: str, mounts: str = "/proc/mounts") -> str | None:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    best, kind = "", None
    try:
        with open(mounts) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return None
    return kind


def check_maildir_source(src: SourceConfig, config: Config | None = None) -> str:
    from spoolscan.broker import Broker

    roots, refused = Broker().mailbox_roots(src.paths)
    if not roots:
        raise Problem(f"no Maildir matches {list(src.paths)}"
                      + (f" ({len(refused)} refused: {refused[0]})" if refused else ""),
                      "check the globs in paths (each must end at a directory with cur/ "
                      "and new/)")
    mine = [r for r in roots if src.in_shard(r)]
    network = sorted({kind for r in roots[:50]
                      if (kind := filesystem_type(r)) in NETWORK_FILESYSTEMS})
    if network and not src.sweep_only:
        raise Problem(f"source {src.name}: mailboxes on a network filesystem "
                      f"({', '.join(network)}): inotify sees only this host's own changes",
                      "set sweep_only = true (and a shard per host) for this source", WARN)
    if (src.shard is not None and config is not None
            and not config.database.url.startswith("postgresql")):
        raise Problem(f"source {src.name}: shard {src.shard[0]}/{src.shard[1]} with a "
                      "database of this host only: the other shares' hosts do not share "
                      "verdicts or rescans with it",
                      "use one PostgreSQL database for all the hosts", WARN)
    shard = (f", {len(mine)} in shard {src.shard[0]}/{src.shard[1]}"
             if src.shard is not None else "")
    return (f"source {src.name}: {len(roots)} Maildir root(s) match {list(src.paths)}"
            + shard + (f", {len(refused)} refused" if refused else "")
            + (", sweeps only" if src.sweep_only else ""))


def check_hold_source(src: SourceConfig) -> Iterator[Finding]:
    from spoolscan.postfix.setup import SAMPLE_RECEIVED, shadows

    name = f"source {src.name}"
    try:
        out = subprocess.run(["postconf", "-c", src.config_directory, "-h", "queue_directory",
                              "header_checks"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        yield Finding(name, FAIL, "postconf not found", "is Postfix installed?")
        return
    if out.returncode != 0:
        yield Finding(name, FAIL, f"postconf -c {src.config_directory} failed: "
                      f"{out.stderr.strip()}", "check config_directory")
        return
    queue_dir, header_checks = (out.stdout.splitlines() + ["", ""])[:2]
    hold = Path(queue_dir) / "hold"
    if not os.access(hold, os.R_OK | os.X_OK):
        yield Finding(name, FAIL, f"{hold} is not readable", "run spoolscan as root")
        return
    tables = [e for e in header_checks.replace(",", " ").split() if e]
    holding = [t for t in tables if _holds_received(t, SAMPLE_RECEIVED)]
    if not holding:
        yield Finding(name, FAIL, "Postfix puts nothing on hold: no header_checks rule HOLDs "
                      f"the Received: header (header_checks = {header_checks or 'empty'})",
                      "spoolscan setup postfix")
        return
    for s in shadows(tables[:tables.index(holding[0])]):
        yield Finding(name, FAIL, f"{s.table} line {s.line_no} ({s.line!r}) decides for "
                      "every Received: header before the HOLD rule: that mail is never "
                      "held, never scanned", "give that rule a narrower pattern")
    yield Finding(name, OK, f"{name}: hold queue {hold} readable, {holding[0]} holds "
                            "mail with a Received: header")


def _holds_received(table: str, samples: tuple[str, ...]) -> bool:
    kind, _, path = table.partition(":")
    if kind not in ("regexp", "pcre"):
        return False
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        m = re.match(r"\s*/(.*?)/([a-zA-Z]*)\s+HOLD\b", line, re.IGNORECASE)
        if m:
            try:
                if any(re.search(m.group(1), s, re.IGNORECASE) for s in samples):
                    return True
            except re.error:
                continue
    return False


def check_notify(config: Config) -> str:
    n = config.notify
    if not (n.admin or n.recipients):
        return "notifications off (no [notify] admin)"
    program = shlex.split(n.sendmail)[0] if n.sendmail.strip() else ""
    if not (program and os.access(program, os.X_OK)):
        raise Problem(f"[notify] sendmail {n.sendmail!r} is not an executable program: no "
                      "notice can be sent", "install an MTA's sendmail (Postfix has one) or "
                      "set [notify] sendmail to its path")
    if n.templates:
        missing = [t for t in ("admin.txt", "recipient.txt", "digest.txt")
                   if not (Path(n.templates) / t).is_file()]
        if len(missing) == 3:
            raise Problem(f"[notify] templates {n.templates}: none of admin.txt, "
                          "recipient.txt, digest.txt is there (the built-in ones are used)",
                          "check the directory, or remove the setting", WARN)
    who = ", ".join(n.admin) or "the recipients only"
    return f"notices of {', '.join(n.events)} to {who} through {program}" + (
        f", at most {n.max_per_hour} an hour each" if not n.digest else
        f", in a digest every {n.digest:g}s")


# --- running them ---------------------------------------------------------------------------------


def findings(config: Config) -> list[Finding]:
    out = [Finding("config", OK, f"configuration {config.path or '(built-in defaults)'} "
                                 "is valid (schedule, durations and sizes included)")]
    simple: list[tuple[str, Callable[[], str]]] = [
        ("privileges", lambda: check_privileges(config)),
        ("clamd", lambda: check_clamd(config)),
        ("fingerprint", lambda: check_fingerprint(config)),
        ("database", lambda: check_database(config)),
        ("quarantine", lambda: check_quarantine(config)),
        ("notify", lambda: check_notify(config)),
    ]
    for name, check in simple:
        out.append(_run(name, check))
        if name == "clamd" and out[-1].status == OK:
            out.extend(check_clamd_conf(config))
    for src in config.sources:
        if src.type == "maildir":
            out.append(_run(f"source {src.name}",
                            functools.partial(check_maildir_source, src, config)))
        else:
            out.extend(check_hold_source(src))
    return out


def _run(name: str, check: Callable[[], str]) -> Finding:
    try:
        return Finding(name, OK, check())
    except Problem as exc:
        return Finding(name, exc.status, str(exc), exc.hint)
    except Exception as exc:
        return Finding(name, FAIL, f"{exc.__class__.__name__}: {exc}")


def run_checks(config: Config, as_json: bool = False) -> int:
    found = findings(config)
    if as_json:
        print(json.dumps([asdict(f) for f in found], indent=2))
    else:
        for f in found:
            print(f.line())
    return 1 if any(f.status == FAIL for f in found) else 0
