"""The ``spoolscan`` command.

Exit codes: 0 success / all clean; 1 something found (scan: infected or unchecked) or a
check failed (doctor); 2 error (scan could not complete, bad configuration, database or
clamd unavailable); 64 usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from spoolscan import __version__
from spoolscan.config import Config, ConfigError, load_config

log = logging.getLogger("spoolscan")

EXIT_OK, EXIT_FOUND, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 64


class _SafeFormatter(logging.Formatter):
    """One line per message: control characters and undecodable bytes that came from
    mail or from file names are escaped (spoolscan.text), so they cannot forge log lines;
    a secret (the database password) never appears."""

    def __init__(self, *args: object, secret: str | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.secret = secret

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        from spoolscan.text import printable

        safe = logging.makeLogRecord(record.__dict__)
        safe.message = printable(record.message)
        return self._scrub(super().formatMessage(safe))

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]  # noqa: N802
        return self._scrub(super().formatException(ei))

    def _scrub(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text


def _setup_logging(verbose: int, quiet: bool, secret: str | None = None) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("%(asctime)s spoolscan[%(process)d]: %(levelname)s "
                                        "%(message)s", datefmt="%b %d %H:%M:%S",
                                        secret=secret))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if not verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _open_store(config: Config, auto_create: bool = True):  # type: ignore[no-untyped-def]
    """Open the configured store; an empty SQLite database is migrated on first use."""
    from spoolscan.store.db import (
        StoreError,
        create_engine_for,
        redact_url,
        schema_status,
        upgrade,
    )
    from spoolscan.store.repo import Store

    engine = create_engine_for(config.database.url)
    try:
        current, head = schema_status(engine)
    except Exception as exc:
        raise StoreError(f"cannot open the database ({redact_url(config.database.url)}): "
                         f"{exc}") from exc
    if current is None and auto_create and engine.dialect.name == "sqlite":
        log.info("creating the database schema in %s", engine.url.database)
        upgrade(engine)
    elif current != head:
        raise StoreError(f"the database is at schema revision {current or 'none'}, this "
                         f"spoolscan needs {head}: run `spoolscan db upgrade`")
    return Store(engine)


def cmd_scan(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.clamd import ClamdClient
    from spoolscan.ondemand import scan_paths
    from spoolscan.scan import ScanService

    store = None if args.no_store else _open_store(config)
    client = ClamdClient(config.clamd, max_size=config.policy.max_size)
    service = ScanService(client=client, store=store, use_cache=not args.no_cache,
                          snapshot_dir=config.quarantine.directory)
    try:
        return scan_paths(service, args.paths, concurrency=config.clamd.concurrency,
                          as_json=args.json, sources=config.sources, policy=config.policy,
                          broker=args.broker)
    finally:
        if store is not None:
            store.close()


def cmd_version(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.clamd import ClamdClient, ClamdError

    print(f"spoolscan {__version__}")
    client = ClamdClient(config.clamd)
    try:
        print(f"clamd {client.version()} ({config.clamd.endpoint})")
        print(f"signature fingerprint {client.fingerprint()}")
    except ClamdError as exc:
        print(f"clamd: unavailable: {exc}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_db(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.store.db import create_engine_for, schema_status, upgrade

    engine = create_engine_for(config.database.url)
    safe_url = engine.url.render_as_string(hide_password=True)
    if args.db_command == "upgrade":
        upgrade(engine)
        current, _ = schema_status(engine)
        print(f"database {safe_url} is at schema revision {current}")
    else:
        current, head = schema_status(engine)
        print(f"database {safe_url}: revision {current or 'none'} (code: {head})")
        return EXIT_OK if current == head else EXIT_FOUND
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.runner import run

    store = _open_store(config)
    try:
        return run(config, store, once=args.once, broker=args.broker)
    finally:
        store.close()


def cmd_rescan(args: argparse.Namespace, config: Config) -> int:
    from datetime import timedelta

    from spoolscan.config import parse_duration
    from spoolscan.rescan import print_summary, rescan
    from spoolscan.runner import build_worker, prepare
    from spoolscan.store.repo import utcnow

    if args.source:
        config.source(args.source)  # raises ConfigError for an unknown name
    store = _open_store(config)
    prepare(config)
    worker = build_worker(config, store, only=args.source, broker=args.broker)
    try:
        fingerprint = worker.service.fingerprints.refresh()
        if fingerprint is None:
            print("spoolscan: clamd does not answer; nothing rescanned", file=sys.stderr)
            return EXIT_ERROR
        if args.if_signatures_changed and not store.needs_rescan(fingerprint):
            print(f"signatures unchanged since the last rescan ({fingerprint}): nothing to do")
            return EXIT_OK
        window = None if args.all else parse_duration(args.since or
                                                      config.schedule.rescan_window)
        since = None if window is None else utcnow() - timedelta(seconds=window)
        worker.start(watch=False)
        try:
            summary = rescan(worker, since=since, source=args.source, progress=sys.stderr)
        finally:
            worker.stop()
        print_summary(summary)
        if summary.errors:
            return EXIT_ERROR
        return EXIT_FOUND if summary.detections else EXIT_OK
    finally:
        store.close()


def cmd_report(args: argparse.Namespace, config: Config) -> int:
    import shutil

    from spoolscan.reports import produce, time_range
    from spoolscan.store.repo import utcnow

    fmt = args.format or ("json" if args.jsonl else "table")
    if args.jsonl and fmt != "json":
        print("spoolscan: --jsonl goes with --format json", file=sys.stderr)
        return EXIT_USAGE
    now = utcnow()
    try:
        window = time_range(args.since, args.until, now)
    except ValueError as exc:
        print(f"spoolscan: --since/--until: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.name == "all" and fmt in ("csv", "json"):
        print(f"spoolscan: --format {fmt} takes one report; `all` goes with table, html or "
              "sql", file=sys.stderr)
        return EXIT_USAGE
    # The table wraps long values at the terminal's width; into a file or a pipe, or
    # with --wide, each row stays on one line, however long.
    width = None
    if fmt == "table" and not args.wide and not args.output and sys.stdout.isatty():
        width = shutil.get_terminal_size().columns
    store = None if fmt == "sql" else _open_store(config, auto_create=False)
    try:
        text = produce(store, args.name, fmt, window, jsonl=args.jsonl, width=width, now=now)
    finally:
        if store is not None:
            store.close()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_setup(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.postfix.setup import setup_postfix

    directory = args.config_directory
    if directory is None:
        holds = [s for s in config.sources if s.type == "postfix-hold"]
        directory = holds[0].config_directory if holds else "/etc/postfix"
    return setup_postfix(directory, uninstall=args.uninstall, dry_run=args.dry_run,
                         yes=args.yes)


def cmd_quarantine(args: argparse.Namespace, config: Config) -> int:
    from datetime import timedelta

    from spoolscan.config import parse_duration
    from spoolscan.quarantine import commands as q
    from spoolscan.store.repo import utcnow
    from spoolscan.text import printable

    store = _open_store(config, auto_create=False)
    try:
        if args.q_command == "list":
            since = (utcnow() - timedelta(seconds=parse_duration(args.since))
                     if args.since else None)
            found = q.entries(store, since)
            for entry in found:
                print(q.dump(entry) if args.json else q.format_entry(entry))
            if not args.json:
                print(f"({len(found)} message(s) in quarantine)")
            return EXIT_OK
        if args.q_command == "purge":
            days = (args.older_than_days if args.older_than_days is not None
                    else config.quarantine.retention_days)
            print(f"deleted {q.purge(store, config, days, args.broker)} quarantined "
                  "message(s) older than "
                  f"{days} days")
            return EXIT_OK
        status = EXIT_OK
        for message_id in args.ids:
            try:
                entry = q.get(store, message_id)
                if args.q_command == "show":
                    if args.json:
                        print(q.dump(entry))
                    else:
                        for line in entry.describe():
                            print(line)
                        print("\n" + q.headers(config, entry, args.broker) + "\n")
                elif args.q_command == "release":
                    where = q.release(store, config, entry, args.broker)
                    print(f"{message_id}: released to {printable(where)}")
                elif args.q_command == "delete":
                    q.delete(store, config, entry, args.broker)
                    print(f"{message_id}: deleted")
            except (q.QuarantineError, OSError) as exc:
                print(f"spoolscan: {exc}", file=sys.stderr)
                status = EXIT_ERROR
        return status
    finally:
        store.close()


def cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.doctor import run_checks

    return run_checks(config)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE): 1 and 2 mean something else to scripts."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _duration(text: str) -> str:
    from spoolscan.config import parse_duration

    try:
        parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (examples: 7d, 12h, 30m)") from None
    return text


def _when(text: str) -> str:
    from spoolscan.reports.query import parse_when
    from spoolscan.store.repo import utcnow

    try:
        parse_when(text, utcnow())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration or a date: {text!r} (examples: 7d, 12h, 2026-12-01, "
            "2026-12-01T08:00:00+01:00)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spoolscan",
        description="Scan mail where it rests — the Postfix hold queue and Maildir stores — "
                    "with clamd, and keep every verdict in SQL.",
        epilog="Configuration: --config FILE, else $SPOOLSCAN_CONFIG, else "
               "/etc/spoolscan/spoolscan.toml, else built-in defaults. "
               "$SPOOLSCAN_DATABASE_URL overrides [database] url.",
    )
    parser.add_argument("--config", metavar="FILE", help="configuration file (TOML)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"spoolscan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", help="scan files, directories and Maildirs now",
                       description="Scan files, directories (recursively) and Maildirs (new/ "
                                   "and cur/ of every folder). Exit 0 all clean, 1 infected "
                                   "or unchecked found, 2 an error occurred (as clamdscan).")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per message (path, verdict, signature, "
                        "sha256, size, duration_ms, cached)")
    p.add_argument("--no-store", action="store_true", help="do not record verdicts in the "
                                                           "database")
    p.add_argument("--no-cache", action="store_true",
                   help="scan even content already scanned under the same signatures")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("run", help="the worker: watch the configured sources and act",
                       description="Watch every configured [[source]] (the Postfix hold "
                                   "queue, Maildir stores), scan what arrives, release / "
                                   "quarantine / keep, and run the scheduled rescans. Stops "
                                   "on SIGTERM after finishing the scans in flight.")
    p.add_argument("--once", action="store_true",
                   help="process what is there now (and what arrives meanwhile), then exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("rescan", help="rescan stored mail under the current signatures",
                       description="Rescan messages seen within the window that have no "
                                   "verdict under clamd's current signatures; new detections "
                                   "are quarantined and marked retroactive. Resumable. Exit "
                                   "0 nothing found, 1 new detections, 2 errors.")
    p.add_argument("--source", metavar="NAME", help="only this configured source")
    p.add_argument("--since", metavar="AGE", type=_duration,
                   help="window, e.g. 7d, 12h (default: [schedule] rescan_window)")
    p.add_argument("--all", action="store_true", help="every stored message, whatever age")
    p.add_argument("--if-signatures-changed", action="store_true",
                   help="do nothing unless the signatures changed since the last rescan")
    p.set_defaults(func=cmd_rescan)

    from spoolscan.reports import ALIASES, FORMATS, REPORTS

    names = list(REPORTS)
    p = sub.add_parser("report", help="print a canned report (" + ", ".join(names) + ", all)",
                       description="Reports over the SQL views of docs/sql.md, the same "
                                   "query on SQLite and PostgreSQL. "
                                   + "; ".join(f"{r.name}: {r.title}" for r in REPORTS.values())
                                   + "; all: every report (table, html, sql). Aliases: "
                                   + ", ".join(f"{a} = {n}" for a, n in ALIASES.items())
                                   + ". Timestamps are ISO 8601 in UTC. --format sql prints "
                                     "the query with the time range written in, to paste "
                                     "into sqlite3 or psql.")
    p.add_argument("name", choices=[*names, *ALIASES, "all"], metavar="NAME",
                   help="one of: " + ", ".join([*names, "all"]))
    p.add_argument("--since", default="7d", metavar="WHEN", type=_when,
                   help="start of the range: a duration back from now (7d, 12h) or an ISO "
                        "date or time (2026-12-01, 2026-12-01T08:00; UTC unless a zone is "
                        "given); default 7d")
    p.add_argument("--until", metavar="WHEN", type=_when,
                   help="end of the range (excluded), as --since; default now")
    p.add_argument("--format", choices=FORMATS,
                   help="table (the default), csv, json (one array), html (one page with "
                        "charts), sql (the query)")
    p.add_argument("--jsonl", action="store_true",
                   help="with --format json: one object per line instead of an array")
    p.add_argument("--wide", action="store_true",
                   help="table: one line per row even on a terminal (no wrapping)")
    p.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("setup", help="configure Postfix to hold mail for spoolscan",
                       description="Show, then (after confirmation) apply the Postfix "
                                   "changes spoolscan needs: a header_checks table with "
                                   "/^Received:/ HOLD. main.cf is backed up first.")
    setup_sub = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    sp = setup_sub.add_parser("postfix", help="hold incoming mail until spoolscan scans it")
    sp.add_argument("--config-directory", metavar="DIR",
                    help="Postfix config directory (default: the postfix-hold source's, "
                         "else /etc/postfix)")
    sp.add_argument("--dry-run", action="store_true", help="show what would change, change "
                                                           "nothing")
    sp.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sp.add_argument("--uninstall", action="store_true", help="remove spoolscan's hold rule")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("quarantine", help="list, show, release, delete, purge quarantined "
                                          "mail")
    qsub = p.add_subparsers(dest="q_command", metavar="ACTION", required=True)
    qp = qsub.add_parser("list", help="messages in quarantine, newest first")
    qp.add_argument("--since", metavar="AGE", type=_duration,
                    help="only those quarantined within AGE")
    qp.add_argument("--json", action="store_true")
    for name, what in (("show", "details and headers"),
                       ("release", "put a Maildir message back where it was"),
                       ("delete", "delete the quarantined copy")):
        qp = qsub.add_parser(name, help=what)
        qp.add_argument("ids", nargs="+", type=int, metavar="ID",
                        help="message id (first column of `quarantine list`)")
        qp.add_argument("--json", action="store_true")
    qp = qsub.add_parser("purge", help="delete quarantined copies older than the retention")
    qp.add_argument("--older-than-days", type=int, metavar="N",
                    help="default: [quarantine] retention_days")
    p.set_defaults(func=cmd_quarantine)

    p = sub.add_parser("version", help="spoolscan and clamd versions, signature fingerprint")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("db", help="database schema management")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    dbsub.add_parser("upgrade", help="create or migrate the schema (Alembic upgrade head)")
    dbsub.add_parser("status", help="show the schema revision; exit 1 if not current")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("doctor", help="check configuration, clamd, database, Postfix, "
                                      "permissions",
                       description="Run every check and print one line each. Exit 0 if all "
                                   "pass, 1 if any fails.")
    p.set_defaults(func=cmd_doctor)
    return parser


#: Commands that read mail: started as root, they run it as [privileges] user (privsep).
PRIVSEP_COMMANDS = frozenset({"run", "rescan", "scan", "quarantine"})


def entry() -> None:
    """The ``spoolscan`` command (console script, ``python -m spoolscan``)."""
    sys.exit(main(privsep=True))


def main(argv: Sequence[str] | None = None, *, privsep: bool = False) -> int:
    """Run one command.  ``privsep``: when root, split off the privileged helper and run
    the command as ``[privileges] user`` (the command line does; in-process callers keep
    their own privileges)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.broker = None
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose, args.quiet)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}")
    from spoolscan.store.db import StoreError, url_password

    secret = url_password(config.database.url)
    _setup_logging(args.verbose, args.quiet, secret)
    try:
        if (privsep and os.geteuid() == 0 and args.command in PRIVSEP_COMMANDS
                and config.privileges.user != "root"):
            from spoolscan import privsep as separation

            args.broker = separation.start(
                config, scan_paths=args.paths if args.command == "scan" else ())
        return int(args.func(args, config))
    except StoreError as exc:
        return _fail(f"database error: {exc}", secret)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", secret)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Never exit 1 ("found something") because of a failure; -v shows the traceback.
        log.debug("unexpected error", exc_info=True)
        return _fail(f"error: {exc.__class__.__name__}: {exc}", secret)


def _fail(message: str, secret: str | None = None) -> int:
    """Print an error (one safe line, no secret) and return the error exit status."""
    from spoolscan.text import printable

    if secret:
        message = message.replace(secret, "***")
    print(f"spoolscan: {printable(message)}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    entry()
