"""spoolscan(1), written from the argument parser so that it cannot drift from ``--help``.

``make man`` writes ``docs/spoolscan.1``; ``man -l docs/spoolscan.1`` shows it.  The
sections that are not in the parser (exit status, files, environment, signals) are here.
"""

from __future__ import annotations

import argparse
import sys

from spoolscan import __version__

EXTRA_SECTIONS = {
    "EXIT STATUS": [
        ("0", "nothing found: every message clean, nothing to do, or the action succeeded"),
        ("1", "something found: infected or unchecked mail (scan), new detections "
              "(rescan), a failed check (doctor), a schema that is not current (db status)"),
        ("2", "an error: a usage error, a configuration error, clamd or the database "
              "unreachable (as clamdscan)"),
    ],
    "SIGNALS": [
        ("SIGTERM, SIGINT", "run: finish the messages in flight (scan, commit, act), then "
                            "exit 0; held mail not yet scanned stays on hold"),
        ("SIGHUP", "run: re-read the configuration file (sources added, removed or changed, "
                   "policy, schedule, logging); a file that does not load is logged and the "
                   "running configuration kept"),
    ],
    "FILES": [
        ("/etc/spoolscan/spoolscan.toml", "the configuration (every key is documented in "
                                          "spoolscan.example.toml)"),
        ("/var/lib/spoolscan", "the SQLite database and the quarantine store (default)"),
    ],
    "ENVIRONMENT": [
        ("SPOOLSCAN_CONFIG", "the configuration file when --config is not given"),
        ("SPOOLSCAN_DATABASE_URL", "overrides [database] url"),
        ("NOTIFY_SOCKET, WATCHDOG_USEC", "set by systemd: readiness, status and watchdog "
                                         "notifications (Type=notify)"),
    ],
    "SEE ALSO": [("", "postsuper(1), postqueue(1), clamd(8), clamdscan(1); docs/operations.md, "
                      "docs/security.md, docs/schema.md and docs/scaling.md (many hosts) in the "
                      "source distribution")],
}


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()).removeprefix("usage: ")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:  # argparse has no public iterator over its actions
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(action.option_strings)
            if action.nargs != 0:
                choices = "{" + ",".join(map(str, action.choices)) + "}" \
                    if action.choices else action.dest.upper()
                names += " " + str(action.metavar or choices)
        else:
            names = str(action.metavar or action.dest)
        lines += [".TP", f"\\fB{_roff(names)}\\fR", _roff(action.help or "")]
    return lines


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            title = f"{prefix} {name}".strip()
            lines += [f".SS {_roff(title)}", _roff(sub.description or helps.get(name, "")),
                      ".PP", f"\\fB{_roff(_usage(sub))}\\fR"]
            lines += _options(sub)
            lines += _commands(sub, title)
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    """The man page for ``parser`` (the spoolscan command), as roff.  No date in it: the
    page is the same for the same parser (a test checks the shipped one is current)."""
    lines = [
        f'.TH SPOOLSCAN 1 "" "spoolscan {__version__}" "User Commands"',
        ".SH NAME", "spoolscan \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS", f"\\fB{_roff(_usage(parser))}\\fR",
        ".SH DESCRIPTION", _roff(parser.epilog or ""),
        ".SH OPTIONS", "Global options are accepted before or after the command.",
        *_options(parser),
        ".SH COMMANDS", *_commands(parser, ""),
    ]
    for section, items in EXTRA_SECTIONS.items():
        lines.append(f".SH {section}")
        for term, text in items:
            lines += ([".TP", f"\\fB{_roff(term)}\\fR", _roff(text)] if term
                      else [_roff(text)])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from spoolscan.cli import build_parser

    sys.stdout.write(render(build_parser()))
