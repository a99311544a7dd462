"""Configuration: a TOML file read into frozen dataclasses, with environment overrides.

Lookup order for the file: ``--config FILE``, then ``$SPOOLSCAN_CONFIG``, then
``/etc/spoolscan/spoolscan.toml``, then the built-in defaults.  ``$SPOOLSCAN_DATABASE_URL``
overrides ``[database] url`` and ``$SPOOLSCAN_CLAMD_SOCKET`` / ``$SPOOLSCAN_CLAMD_ADDRESS``
override where clamd is reached.

Every error names the key and the file, so an admin can fix it without reading code.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/spoolscan/spoolscan.toml")

VERDICT_ACTIONS_INFECTED = ("quarantine", "delete", "hold")
VERDICT_ACTIONS_UNSAFE = ("hold", "release")
SOURCE_TYPES = ("postfix-hold", "maildir")
MAILDIR_QUARANTINE_MODES = ("folder", "store")


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the file."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:////var/lib/spoolscan/spoolscan.db"


@dataclass(frozen=True)
class ClamdConfig:
    socket: str | None = "/var/run/clamav/clamd.ctl"
    address: str | None = None  # "host:port"; when set, used instead of socket
    # A pool: socket paths and "host:port" entries; when set, used instead of both.
    servers: tuple[str, ...] = ()
    timeout: float = 30.0  # seconds, per scan
    concurrency: int = 4  # scans in flight
    # Where clamd keeps its signatures.  Only used to fingerprint custom databases that
    # clamd's VERSION reply does not number (no daily.* file).
    database_directory: str = "/var/lib/clamav"
    # clamd's own configuration, read by `spoolscan doctor` (AlertExceedsMax, limits).
    config_file: str = "/etc/clamav/clamd.conf"

    @property
    def endpoint(self) -> str:
        """Human-readable description of where clamd is reached."""
        if self.servers:
            return "pool " + ", ".join(_endpoint(s) for s in self.servers)
        return f"tcp:{self.address}" if self.address else f"unix:{self.socket}"

    @property
    def members(self) -> tuple[str, ...]:
        """The clamd servers: ``servers``, else the one of ``address`` or ``socket``."""
        if self.servers:
            return self.servers
        return (self.address,) if self.address else (self.socket or "",)


def _endpoint(server: str) -> str:
    return f"unix:{server}" if server.startswith("/") else f"tcp:{server}"


@dataclass(frozen=True)
class QuarantineConfig:
    directory: str = "/var/lib/spoolscan/quarantine"
    retention_days: int = 30


@dataclass(frozen=True)
class PolicyConfig:
    local_domains: tuple[str, ...] = ()
    on_infected: str = "quarantine"
    on_unchecked: str = "hold"
    on_error: str = "hold"
    max_attempts: int = 5
    max_size: int = 50 * 1024 * 1024
    retry_delay: float = 60.0  # first retry after this many seconds, doubling each time


@dataclass(frozen=True)
class SourceConfig:
    name: str
    type: str
    config_directory: str = "/etc/postfix"  # postfix-hold
    paths: tuple[str, ...] = ()  # maildir: globs of Maildir roots
    quarantine: str = "store"  # maildir: store (the admin-only store) | folder (.Quarantine)
    sweep_interval: float = 30.0  # seconds between full sweeps (missed events, backlog)
    # maildir on a network store: no inotify (it sees only this host's changes), sweeps only
    sweep_only: bool = False
    # maildir: (k, n) = this host takes the k-th of n shares of the mailboxes, by a stable
    # hash of the mailbox path ("2/4"); None: all of them
    shard: tuple[int, int] | None = None

    def in_shard(self, root: str) -> bool:
        """Whether the mailbox at ``root`` is in this host's share."""
        if self.shard is None:
            return True
        k, n = self.shard
        digest = hashlib.sha256(root.rstrip("/").encode("utf-8", "surrogateescape"))
        return int.from_bytes(digest.digest()[:8], "big") % n == k - 1


@dataclass(frozen=True)
class ScheduleConfig:
    signature_check: str = "*/10 * * * *"
    nightly_rescan: str = "30 2 * * *"
    rescan_window: float = 7 * 86400.0  # seconds
    # PostgreSQL: how long a host's claim on a batch of rescan contents lasts; a host that
    # dies holding one loses it after this long and another host takes it over.
    rescan_lease: float = 300.0  # seconds
    purge: str = "15 3 * * *"


LOG_TARGETS = ("auto", "stderr", "syslog", "journal")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "notice", "warning", "error")
SYSLOG_FACILITIES = ("mail", "daemon", "user", *(f"local{i}" for i in range(8)))
NOTIFY_EVENTS = ("infected", "retroactive", "stuck", "outbound")


@dataclass(frozen=True)
class LogConfig:
    # auto: stderr on a terminal, the journal under systemd, else syslog.
    target: str = "auto"
    facility: str = "mail"  # syslog: beside Postfix's lines in mail.log
    format: str = "text"  # text | json (one object per line, for log shippers)
    level: str = "info"
    syslog_socket: str = "/dev/log"  # target = "syslog": where the syslog daemon listens


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "127.0.0.1:9466": Prometheus metrics served there


@dataclass(frozen=True)
class NotifyConfig:
    admin: tuple[str, ...] = ()  # who is told (nobody: no notices)
    events: tuple[str, ...] = NOTIFY_EVENTS
    recipients: bool = False  # also tell the recipients of quarantined inbound mail
    digest: float = 0.0  # seconds between digests; 0: one notice per event
    max_per_hour: int = 60  # per admin; beyond it, one digest says what was held back
    sender: str = "postmaster"  # the notices' envelope sender and From
    sendmail: str = "/usr/sbin/sendmail"
    templates: str | None = None  # a directory whose files replace the built-in templates


@dataclass(frozen=True)
class PrivilegesConfig:
    # Started as root, spoolscan keeps a small privileged helper and runs everything that
    # reads mail (parsing, hashing, clamd, the database) as this user.  "root" keeps it
    # all in one root process (not recommended).
    user: str = "spoolscan"


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    clamd: ClamdConfig = field(default_factory=ClamdConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sources: tuple[SourceConfig, ...] = ()
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    privileges: PrivilegesConfig = field(default_factory=PrivilegesConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    path: str | None = None  # the file this came from, None for built-in defaults

    def source(self, name: str) -> SourceConfig:
        for src in self.sources:
            if src.name == name:
                return src
        known = ", ".join(s.name for s in self.sources) or "none configured"
        raise ConfigError(f"no source named {name!r} (sources: {known})")


# --- value parsers -------------------------------------------------------------------------

_SIZE_UNITS = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: object) -> int:
    """'50M' → 52428800 ('50K', '2G', '512B'; 'MB', 'MiB' too).  A bare number is refused:
    50 could mean 50 bytes or 50 MB, and silently meaning bytes lets everything through
    as "too large".  Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGB])(?:i?B)?\s*", value if isinstance(value, str) else "",
                     re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(value)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_duration(value: object) -> float:
    """'7d' → 604800.0, '90m', '30s', '2w'; a bare number is seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(value)
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(value)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
                ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                  "sep", "oct", "nov", "dec")),
                ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))


def check_cron(expr: object) -> str:
    """A five-field crontab(5) expression, checked field by field (numbers in range,
    ``*``, ``a-b``, ``/step``, lists, month and weekday names); ValueError naming what
    is wrong otherwise.  Checked when the configuration is read, so that a bad schedule
    is an error at start with the key named, not a crash later."""
    if not isinstance(expr, str) or len(expr.split()) != 5:
        raise ValueError(f"{expr!r}: five fields are needed (minute hour day month weekday)")
    for text, (what, low, high, names) in zip(expr.split(), _CRON_FIELDS, strict=True):
        for part in text.split(","):
            rng, slash, step = part.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                raise ValueError(f"{what}: bad step in {part!r}")
            if rng == "*":
                continue
            bounds = rng.split("-")
            if len(bounds) > 2 or not all(
                    (b.isdigit() and low <= int(b) <= high) or b.lower()[:3] in names
                    for b in bounds):
                raise ValueError(f"{what}: {part!r} is not in {low}-{high}"
                                 + (" or a name" if names else ""))
    return expr


# --- loading -------------------------------------------------------------------------------


class _Section:
    """Reads one TOML table, remembering which keys were used, for precise error messages."""

    def __init__(self, name: str, data: Mapping[str, Any], where: str) -> None:
        self.name = name
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"[{self.name}] {key} {problem} in {self.where}")

    def get(self, key: str, default: Any, parse: Any, expect: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        raw = self.data[key]
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            why = str(exc)
            detail = f" ({why})" if why and why not in (str(raw), repr(raw)) else ""
            raise self.fail(key, f"must be {expect}, got {raw!r}{detail}") from None

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(v: object) -> str:
            if v not in choices:
                raise ValueError(v)
            return str(v)

        return self.get(key, default, parse, "one of " + ", ".join(repr(c) for c in choices))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise ConfigError(
                f"[{self.name}] unknown key {unknown[0]!r} in {self.where} (known keys: {known})"
            )


def _string(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(v)
    return v


def _optional_string(v: object) -> str | None:
    if v == "" or v is None:
        return None
    return _string(v)


def _positive_number(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError(v)
    return float(v)


def _positive_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(v)
    return v


def _string_list(v: object) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(v)
    return tuple(v)


def _address(v: object) -> str | None:
    s = _optional_string(v)
    if s is not None:
        host, sep, port = s.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(v)
    return s


def _servers(v: object) -> tuple[str, ...]:
    servers = _string_list(v)
    for server in servers:
        if not server.startswith("/"):
            _address(server)
    if not servers or len(set(servers)) != len(servers):
        raise ValueError(v)
    return servers


def _shard(v: object) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", v if isinstance(v, str) else "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(v)
    return int(m.group(1)), int(m.group(2))


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError(v)
    return v


def _events(v: object) -> tuple[str, ...]:
    events = _string_list(v)
    if not set(events) <= set(NOTIFY_EVENTS):
        raise ValueError(v)
    return events


def _duration_or_zero(v: object) -> float:
    if v == 0 or v == "0":
        return 0.0
    return parse_duration(v)


def _domains(v: object) -> tuple[str, ...]:
    return tuple(d.lower().lstrip("@") for d in _string_list(v))


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table in {where}")
    return value


def parse_config(data: Mapping[str, Any], where: str = "built-in defaults") -> Config:
    """Build a validated Config from parsed TOML data."""
    unknown = sorted(set(data) - {"database", "clamd", "quarantine", "policy", "source",
                                   "schedule", "privileges", "log", "metrics",
                                   "notify"})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] in {where}")

    s = _Section("database", _table(data, "database", where), where)
    database = DatabaseConfig(url=s.get("url", DatabaseConfig.url, _string, "a database URL"))
    s.finish()

    s = _Section("clamd", _table(data, "clamd", where), where)
    clamd = ClamdConfig(
        socket=s.get("socket", ClamdConfig.socket, _optional_string, "a socket path"),
        address=s.get("address", None, _address, "'host:port'"),
        servers=s.get("servers", (), _servers, "a list of distinct socket paths (absolute) "
                      "and 'host:port' addresses"),
        timeout=s.get("timeout", ClamdConfig.timeout, parse_duration,
                      "a duration such as '30s' (a bare number is seconds)"),
        concurrency=s.get("concurrency", ClamdConfig.concurrency, _positive_int,
                          "a positive integer"),
        database_directory=s.get("database_directory", ClamdConfig.database_directory,
                                 _string, "a directory path"),
        config_file=s.get("config_file", ClamdConfig.config_file, _string, "a file path"),
    )
    s.finish()
    if clamd.servers and ("socket" in s.data or "address" in s.data):
        raise ConfigError(f"[clamd] servers replaces socket and address: set one of them "
                          f"in {where}")
    if not clamd.socket and not clamd.address and not clamd.servers:
        raise ConfigError(f"[clamd] needs socket or address in {where}")

    s = _Section("quarantine", _table(data, "quarantine", where), where)
    quarantine = QuarantineConfig(
        directory=s.get("directory", QuarantineConfig.directory, _string, "a directory path"),
        retention_days=s.get("retention_days", QuarantineConfig.retention_days, _positive_int,
                             "a positive integer"),
    )
    s.finish()

    s = _Section("policy", _table(data, "policy", where), where)
    policy = PolicyConfig(
        local_domains=s.get("local_domains", (), _domains, "a list of domain names"),
        on_infected=s.choice("on_infected", "quarantine", VERDICT_ACTIONS_INFECTED),
        on_unchecked=s.choice("on_unchecked", "hold", VERDICT_ACTIONS_UNSAFE),
        on_error=s.choice("on_error", "hold", VERDICT_ACTIONS_UNSAFE),
        max_attempts=s.get("max_attempts", PolicyConfig.max_attempts, _positive_int,
                           "a positive integer"),
        max_size=s.get("max_size", PolicyConfig.max_size, parse_size,
                       "a size with its unit, such as '50M' or '512K'"),
        retry_delay=s.get("retry_delay", PolicyConfig.retry_delay, parse_duration,
                          "a duration such as '60s' or '5m'"),
    )
    s.finish()

    raw_sources = data.get("source", [])
    if not isinstance(raw_sources, list):
        raise ConfigError(f"[[source]] must be an array of tables in {where}")
    sources: list[SourceConfig] = []
    for i, raw in enumerate(raw_sources):
        s = _Section(f"source {i + 1}", raw, where)
        name = s.get("name", None, _string, "a name")
        if name is None:
            raise s.fail("name", "is required")
        s.name = f"source {name!r}"
        kind = s.choice("type", "", SOURCE_TYPES)
        src = SourceConfig(
            name=name,
            type=kind,
            config_directory=s.get("config_directory", SourceConfig.config_directory, _string,
                                   "a directory path"),
            paths=s.get("paths", (), _string_list, "a list of paths or globs"),
            quarantine=s.choice("quarantine", "store", MAILDIR_QUARANTINE_MODES),
            sweep_interval=s.get("sweep_interval", SourceConfig.sweep_interval, parse_duration,
                                 "a duration such as '30s'"),
            sweep_only=s.get("sweep_only", False, _bool, "true or false"),
            shard=s.get("shard", None, _shard, "'k/n' with 1 <= k <= n, such as '2/4'"),
        )
        s.finish()
        if not kind:
            raise s.fail("type", "is required (one of " + ", ".join(SOURCE_TYPES) + ")")
        if kind == "maildir" and not src.paths:
            raise s.fail("paths", "is required for a maildir source")
        if kind != "maildir" and (src.sweep_only or src.shard is not None):
            raise s.fail("sweep_only" if src.sweep_only else "shard",
                         "is only for a maildir source")
        if any(o.name == name for o in sources):
            raise ConfigError(f"two sources named {name!r} in {where}")
        sources.append(src)

    s = _Section("schedule", _table(data, "schedule", where), where)
    schedule = ScheduleConfig(
        signature_check=s.get("signature_check", ScheduleConfig.signature_check, check_cron,
                              "a five-field cron expression"),
        nightly_rescan=s.get("nightly_rescan", ScheduleConfig.nightly_rescan, check_cron,
                             "a five-field cron expression"),
        rescan_window=s.get("rescan_window", ScheduleConfig.rescan_window, parse_duration,
                            "a duration such as '7d'"),
        purge=s.get("purge", ScheduleConfig.purge, check_cron, "a five-field cron expression"),
        rescan_lease=s.get("rescan_lease", ScheduleConfig.rescan_lease, parse_duration,
                           "a duration such as '5m'"),
    )
    s.finish()

    s = _Section("privileges", _table(data, "privileges", where), where)
    privileges = PrivilegesConfig(
        user=s.get("user", PrivilegesConfig.user, _string, "a user name"))
    s.finish()

    s = _Section("log", _table(data, "log", where), where)
    log = LogConfig(
        target=s.choice("target", LogConfig.target, LOG_TARGETS),
        facility=s.choice("facility", LogConfig.facility, SYSLOG_FACILITIES),
        format=s.choice("format", LogConfig.format, LOG_FORMATS),
        level=s.choice("level", LogConfig.level, LOG_LEVELS),
        syslog_socket=s.get("syslog_socket", LogConfig.syslog_socket, _string, "a path"),
    )
    s.finish()

    s = _Section("metrics", _table(data, "metrics", where), where)
    metrics = MetricsConfig(listen=s.get("listen", None, _address, "'host:port'"))
    s.finish()

    s = _Section("notify", _table(data, "notify", where), where)
    notify = NotifyConfig(
        admin=s.get("admin", (), _string_list, "a list of addresses"),
        events=s.get("events", NOTIFY_EVENTS, _events, "a list of: "
                     + ", ".join(NOTIFY_EVENTS)),
        recipients=s.get("recipients", False, _bool, "true or false"),
        digest=s.get("digest", 0.0, _duration_or_zero, "a duration such as '1h', or 0"),
        max_per_hour=s.get("max_per_hour", NotifyConfig.max_per_hour, _positive_int,
                           "a positive integer"),
        sender=s.get("sender", NotifyConfig.sender, _string, "an address"),
        sendmail=s.get("sendmail", NotifyConfig.sendmail, _string, "a program path"),
        templates=s.get("templates", None, _optional_string, "a directory path"),
    )
    s.finish()

    return Config(database=database, clamd=clamd, quarantine=quarantine, policy=policy,
                  sources=tuple(sources), schedule=schedule, privileges=privileges,
                  log=log, metrics=metrics, notify=notify)


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load the configuration following the documented lookup order and env overrides.

    An explicitly named file (argument or ``$SPOOLSCAN_CONFIG``) must exist; the default
    path is used only if present.
    """
    env = os.environ if environ is None else environ
    explicit = path if path is not None else env.get("SPOOLSCAN_CONFIG") or None
    if explicit is not None:
        file = Path(explicit)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist (from --config or "
                              "$SPOOLSCAN_CONFIG)")
    elif DEFAULT_CONFIG_PATH.is_file():
        file = DEFAULT_CONFIG_PATH
    else:
        file = None

    if file is None:
        config = parse_config({})
    else:
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        config = replace(parse_config(data, str(file)), path=str(file))

    if url := env.get("SPOOLSCAN_DATABASE_URL"):
        config = replace(config, database=DatabaseConfig(url=url))
    if sock := env.get("SPOOLSCAN_CLAMD_SOCKET"):
        config = replace(config, clamd=replace(config.clamd, socket=sock, address=None,
                                               servers=()))
    elif addr := env.get("SPOOLSCAN_CLAMD_ADDRESS"):
        try:
            _address(addr)
        except ValueError:
            raise ConfigError(
                f"$SPOOLSCAN_CLAMD_ADDRESS must be 'host:port', got {addr!r}") from None
        config = replace(config, clamd=replace(config.clamd, address=addr, servers=()))
    return config
