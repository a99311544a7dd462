"""The ``spoolscan`` command.

Exit codes, as clamdscan's: 0 success / all clean; 1 something found (scan: infected or
unchecked; rescan: new detections) or a check failed (doctor); 2 an error (a usage error,
a bad configuration, the database or clamd unavailable, a scan that could not complete).

Global options (``--config``, ``-v``, ``-q``, ``--log-format``) go before or after the
command: ``spoolscan doctor --config X`` works.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from spoolscan import __version__
from spoolscan.config import Config, ConfigError, load_config

log = logging.getLogger("spoolscan")

EXIT_OK, EXIT_FOUND, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 2


def _open_store(config: Config, auto_create: bool = True):  # type: ignore[no-untyped-def]
    """Open the configured store; an empty SQLite database is migrated on first use."""
    from spoolscan.store.db import (
        StoreError,
        create_engine_for,
        redact_url,
        schema_status,
        upgrade,
        upgrade_apart,
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
        if not upgrade_apart(config.database.url):
            upgrade(engine)
    elif current != head:
        raise StoreError(f"the database is at schema revision {current or 'none'}, this "
                         f"spoolscan needs {head}: run `spoolscan db upgrade`")
    return Store(engine)


def cmd_scan(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.clamdpool import client_for
    from spoolscan.ondemand import scan_paths
    from spoolscan.scan import ScanService

    store = None if args.no_store else _open_store(config)
    client = client_for(config.clamd, max_size=config.policy.max_size)
    service = ScanService(client=client, store=store, use_cache=not args.no_cache,
                          snapshot_dir=config.quarantine.directory)
    try:
        return scan_paths(service, args.paths, concurrency=config.clamd.concurrency,
                          as_json=args.json, sources=config.sources, policy=config.policy,
                          broker=args.broker, infected_only=args.infected,
                          summary=not args.no_summary)
    finally:
        if store is not None:
            store.close()


def cmd_version(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.clamd import ClamdError
    from spoolscan.clamdpool import client_for

    client = client_for(config.clamd)
    info: dict[str, str | None] = {"spoolscan": __version__, "clamd": None,
                                   "endpoint": config.clamd.endpoint, "fingerprint": None}
    try:
        info["fingerprint"] = client.fingerprint()
        info["clamd"] = client.version()
        code = EXIT_OK
    except ClamdError as exc:
        info["error"] = str(exc)
        code = EXIT_ERROR
    if args.json:
        print(json.dumps(info))
        return code
    print(f"spoolscan {__version__}")
    if code != EXIT_OK:
        print(f"clamd: unavailable: {info['error']}")
        return code
    print(f"clamd {info['clamd']} ({config.clamd.endpoint})")
    print(f"signature fingerprint {info['fingerprint']}")
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
        return run(config, store, once=args.once, broker=args.broker,
                   on_reload=lambda new: _setup_logs(args, new))
    finally:
        store.close()


def cmd_rescan(args: argparse.Namespace, config: Config) -> int:
    from datetime import timedelta

    from spoolscan.config import parse_duration
    from spoolscan.rescan import print_summary, rescan, rescan_host
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
        if args.if_signatures_changed and not store.needs_rescan(fingerprint, rescan_host()):
            if not args.quiet:  # from cron: no mail when there is nothing to say
                print(f"signatures unchanged since the last rescan ({fingerprint}): "
                      "nothing to do")
            return EXIT_OK
        window = None if args.all else parse_duration(args.since or
                                                      config.schedule.rescan_window)
        since = None if window is None else utcnow() - timedelta(seconds=window)
        worker.start(watch=False)
        try:
            summary = rescan(worker, since=since, source=args.source, progress=sys.stderr)
        finally:
            worker.stop()
        if not (args.quiet and summary.candidates == 0):
            print_summary(summary)
        if summary.errors:
            return EXIT_ERROR
        return EXIT_FOUND if summary.detections else EXIT_OK
    finally:
        store.close()


def cmd_report(args: argparse.Namespace, config: Config) -> int:
    import shutil

    from spoolscan.reports.produce import produce
    from spoolscan.reports.query import time_range
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
                elif args.q_command == "release" and args.dry_run:
                    where = q.release(store, config, entry, args.broker, dry_run=True)
                    _done(args, message_id, "would be released",
                          f"would be released to {printable(where)}", to=where)
                elif args.q_command == "release":
                    where = q.release(store, config, entry, args.broker)
                    _done(args, message_id, "released", f"released to {printable(where)}",
                          to=where)
                elif args.q_command == "delete":
                    q.delete(store, config, entry, args.broker)
                    _done(args, message_id, "deleted", "deleted")
            except (q.QuarantineError, OSError) as exc:
                if args.json:
                    print(json.dumps({"id": message_id, "ok": False, "error": str(exc)}))
                print(f"spoolscan: {printable(str(exc))}", file=sys.stderr)
                status = EXIT_ERROR
        return status
    finally:
        store.close()


def _done(args: argparse.Namespace, message_id: int, result: str, text: str,
          **fields: object) -> None:
    """One line per message acted on: text, or a JSON object with ``--json``."""
    if args.json:
        print(json.dumps({"id": message_id, "ok": True, "result": result, **fields}))
    else:
        print(f"{message_id}: {text}")


def cmd_completion(args: argparse.Namespace, config: Config) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    from spoolscan.doctor import run_checks

    return run_checks(config, as_json=args.json)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2, as clamdscan's do (1 means "found something")."""

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
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="warnings and errors only; no output when nothing happened")
    parser.add_argument("--log-format", choices=("text", "json"),
                        help="log lines as text or one JSON object per line "
                             "(default: [log] format)")
    parser.add_argument("--log-target", choices=("stderr", "syslog", "journal"),
                        help="where log lines go (default: [log] target)")
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
    p.add_argument("-i", "--infected", action="store_true",
                   help="print only messages that are not clean (infected, unchecked, "
                        "errors), as clamdscan --infected")
    p.add_argument("--no-summary", action="store_true",
                   help="no summary at the end (as clamdscan --no-summary)")
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
                       ("release", "deliver it after all: a Maildir message goes back "
                                   "where it was, held mail is re-injected with its "
                                   "envelope and released once (docs/operations.md)"),
                       ("delete", "delete the quarantined copy")):
        qp = qsub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        qp.add_argument("ids", nargs="+", type=int, metavar="ID",
                        help="message id (first column of `quarantine list`)")
        qp.add_argument("--json", action="store_true", help="one JSON object per ID")
        if name == "release":
            qp.add_argument("--dry-run", action="store_true",
                            help="say where each message would go; change nothing")
    qp = qsub.add_parser("purge", help="delete quarantined copies older than the retention")
    qp.add_argument("--older-than-days", type=int, metavar="N",
                    help="default: [quarantine] retention_days")
    p.set_defaults(func=cmd_quarantine)

    p = sub.add_parser("version", help="spoolscan and clamd versions, signature fingerprint")
    p.add_argument("--json", action="store_true", help="as one JSON object")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("db", help="database schema management")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    dbsub.add_parser("upgrade", help="create or migrate the schema (Alembic upgrade head)")
    dbsub.add_parser("status", help="show the schema revision; exit 1 if not current")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print the completion script for SHELL, generated from "
                                   "this parser. bash: spoolscan completion bash > "
                                   "/etc/bash_completion.d/spoolscan; zsh: spoolscan "
                                   "completion zsh > \"${fpath[1]}/_spoolscan\".")
    p.add_argument("shell", choices=("bash", "zsh", "tcsh"), metavar="SHELL",
                   help="bash, zsh or tcsh")
    p.set_defaults(func=cmd_completion)

    p = sub.add_parser("doctor", help="check configuration, clamd, database, Postfix, "
                                      "permissions",
                       description="Run every check (configuration, privileges, clamd and "
                                   "its AlertExceedsMax, whether signature updates can be "
                                   "seen, the database, the quarantine directory, each "
                                   "source: Maildirs matched, the Postfix HOLD rule and "
                                   "rules that would shadow it) and print one line each, "
                                   "with a fix for each problem. Exit 0 if all pass "
                                   "(warnings allowed), 1 if one fails, 2 if the "
                                   "configuration is invalid.")
    p.add_argument("--json", action="store_true", help="the findings as a JSON array")
    p.set_defaults(func=cmd_doctor)
    return parser


#: Commands that read mail: started as root, they run it as [privileges] user (privsep).
PRIVSEP_COMMANDS = frozenset({"run", "rescan", "scan", "quarantine"})


def entry() -> None:
    """The ``spoolscan`` command (console script, ``python -m spoolscan``)."""
    sys.exit(main(privsep=True))


_GLOBAL_FLAGS = frozenset({"-v", "--verbose", "-q", "--quiet", "-vv", "-vvv"})
_GLOBAL_VALUES = frozenset({"--config", "--log-format", "--log-target"})


def _hoist_global_options(argv: Sequence[str]) -> list[str]:
    """The global options moved before the command, wherever they were written (argparse
    only accepts them first); nothing after ``--`` is touched."""
    front: list[str] = []
    rest: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--":
            rest += items[i:]
            break
        name = item.split("=", 1)[0]
        if item in _GLOBAL_FLAGS:
            front.append(item)
        elif name in _GLOBAL_VALUES:
            front.append(item)
            if "=" not in item and i + 1 < len(items):
                front.append(items[i + 1])
                i += 1
        else:
            rest.append(item)
        i += 1
    return front + rest


def main(argv: Sequence[str] | None = None, *, privsep: bool = False) -> int:
    """Run one command.  ``privsep``: when root, split off the privileged helper and run
    the command as ``[privileges] user`` (the command line does; in-process callers keep
    their own privileges)."""

    parser = build_parser()
    args = parser.parse_args(_hoist_global_options(sys.argv[1:] if argv is None else argv))
    args.broker = None
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, force=True)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}")
    from spoolscan.store import StoreError
    from spoolscan.store.url import url_password

    secret = url_password(config.database.url)
    _setup_logs(args, config)
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
    except BrokenPipeError:  # `spoolscan quarantine list | head`: not an error
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return EXIT_OK
    except EOFError:  # a question answered by the end of input
        return _fail("no answer (end of input); nothing was changed", secret)
    except Exception as exc:
        # Never exit 1 ("found something") because of a failure; -v shows the traceback.
        log.debug("unexpected error", exc_info=True)
        return _fail(f"error: {exc.__class__.__name__}: {exc}", secret)


def _setup_logs(args: argparse.Namespace, config: Config) -> None:
    """Logging as the configuration says, the command line's options winning."""
    from spoolscan import logs
    from spoolscan.store.url import url_password

    logs.setup(config.log, verbose=args.verbose, quiet=args.quiet,
               secret=url_password(config.database.url),
               json_format=args.log_format == "json", target=args.log_target)


def _fail(message: str, secret: str | None = None) -> int:
    """Print an error (one safe line, no secret) and return the error exit status."""
    from spoolscan.text import printable

    if secret:
        message = message.replace(secret, "***")
    print(f"spoolscan: {printable(message)}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    entry()
