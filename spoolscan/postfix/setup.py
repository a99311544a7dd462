"""`spoolscan setup postfix`: make Postfix put incoming mail on hold, or undo it.

Like an installer should: it shows every change before making it, asks first (unless
``--yes``), keeps a backup of main.cf, and ``--uninstall`` puts the files back byte for
byte.

**What it changes.**  A table of its own, ``spoolscan_header_checks``
(``/^Received:/ HOLD``), placed **after** the site's own header_checks tables, set in a
marked block appended to main.cf (the last setting of a parameter in main.cf wins, so
the site's line stays untouched and the block alone is removed again).  Postfix searches
the header_checks tables in order and applies the first rule that matches a header: the
site's rules keep deciding what they decided (REJECT, DISCARD, PREPEND...), and a message
none of them acts on is held by ours.  A site rule that matches every ``Received:``
header with another action (``WARN``, ``DUNNO``, ``IGNORE``...) would keep our rule from
ever holding mail: setup finds such rules in the site's regexp/pcre tables and says so.

Releasing quarantined hold mail needs nothing more from Postfix (a re-injected message is
held like any other and recognised by spoolscan), so master.cf is never changed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TABLE_NAME = "spoolscan_header_checks"
RULE = "/^Received:/ HOLD\n"
HEADER = ("# Written by `spoolscan setup postfix`: hold every message that has a Received:\n"
          "# header until spoolscan has scanned it. Remove with "
          "`spoolscan setup postfix --uninstall`.\n")
BEGIN = "# --- spoolscan: hold mail for scanning (spoolscan setup postfix --uninstall " \
        "removes this block) ---\n"
END = "# --- end of spoolscan's block ---\n"
#: Received: headers as Postfix writes them, to test which site rules match them.
SAMPLE_RECEIVED = (
    "Received: from client.example.org (client.example.org [192.0.2.7])\n"
    "\tby mx.example.org (Postfix) with ESMTPS id 4jblqh3lSgzJbSX\n"
    "\tfor <user@example.org>; Tue,  1 Dec 2026 22:30:28 +0000 (UTC)",
    "Received: by mx.example.org (Postfix, from userid 0)\n\tid 0E5802184AA; Tue,  1 Dec 2026"
    " 22:30:28 +0000 (UTC)",
)


@dataclass(frozen=True)
class Shadow:
    """A site rule that takes the decision for Received: headers before ours."""

    table: str
    line_no: int
    line: str


@dataclass(frozen=True)
class Plan:
    config_dir: Path
    current: str  # header_checks now
    wanted: str  # header_checks afterwards
    table: Path
    write_table: bool
    remove_table: bool
    main_cf_before: str
    main_cf_after: str
    shadows: list[Shadow] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return (self.main_cf_before != self.main_cf_after or self.write_table
                or self.remove_table)

    def commands(self) -> list[str]:
        out = []
        main_cf = self.config_dir / "main.cf"
        if self.write_table:
            out.append(f"write {self.table}: {RULE.strip()}")
        if self.main_cf_before != self.main_cf_after:
            out.append(f"cp {main_cf} {main_cf}.spoolscan-<timestamp>")
            if BEGIN in self.main_cf_after:
                out.append(f"append to {main_cf}:\n      {BEGIN.strip()}\n"
                           f"      header_checks = {self.wanted}\n      {END.strip()}")
            else:
                out.append(f"remove spoolscan's block from {main_cf}")
        if self.remove_table:
            out.append(f"rm {self.table}")
        out.append(f"postfix -c {self.config_dir} reload   (if Postfix is running)")
        return out


def _postconf(config_dir: Path, *args: str) -> str:
    result = subprocess.run(["postconf", "-c", str(config_dir), *args], capture_output=True,
                            text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"postconf -c {config_dir} {' '.join(args)} failed: "
                           f"{result.stderr.strip()}")
    return result.stdout.strip()


def _entries(value: str) -> list[str]:
    return [e for e in value.replace(",", " ").split() if e]


def without_block(main_cf: str) -> str:
    """main.cf as it was before setup: spoolscan's block taken out, nothing else."""
    start = main_cf.find(BEGIN)
    if start < 0:
        return main_cf
    end = main_cf.find(END, start)
    return main_cf[:start] + (main_cf[end + len(END):] if end >= 0 else "")


def shadows(tables: list[str]) -> list[Shadow]:
    """Rules of the site's regexp/pcre tables that match the Received: headers Postfix
    writes, with an action that is not HOLD: they decide before our table does."""
    found: list[Shadow] = []
    for entry in tables:
        kind, _, path = entry.partition(":")
        if kind not in ("regexp", "pcre") or not Path(path).is_file():
            continue
        for no, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
            m = re.match(r"\s*/(.*?)/([a-zA-Z]*)\s+(\S+)", line)
            if not m or line.lstrip().startswith("#"):
                continue
            flags = re.IGNORECASE if "i" in m.group(2).lower() or kind == "regexp" else 0
            try:
                pattern = re.compile(m.group(1), flags)
            except re.error:
                continue
            if m.group(3).upper() != "HOLD" and any(pattern.search(s) for s in
                                                   SAMPLE_RECEIVED):
                found.append(Shadow(entry, no, line.strip()))
    return found


def plan(config_dir: Path, uninstall: bool) -> Plan:
    main_cf_path = config_dir / "main.cf"
    before = main_cf_path.read_text()
    original = without_block(before)
    table = config_dir / TABLE_NAME
    ours = f"regexp:{table}"
    if uninstall:
        current = _postconf(config_dir, "-h", "header_checks")
        wanted = ", ".join(e for e in _entries(current) if e != ours)
        return Plan(config_dir, current, wanted, table, False, table.exists(), before,
                    original)
    # The site's own setting: main.cf without our block.
    site = _site_header_checks(config_dir, original)
    others = [e for e in _entries(site) if e != ours]
    wanted = ", ".join([*others, ours])
    after = original
    if after and not after.endswith("\n"):
        after += "\n"
    after += f"{BEGIN}header_checks = {wanted}\n{END}"
    write = not table.exists() or table.read_text() != HEADER + RULE
    return Plan(config_dir, site, wanted, table, write, False, before, after,
                shadows(others))


def _site_header_checks(config_dir: Path, original_main_cf: str) -> str:
    """header_checks as the site's main.cf sets it (without spoolscan's block): the last
    ``header_checks =`` line and its continuation lines (main.cf's syntax)."""
    value: str | None = None
    collecting = False
    for line in original_main_cf.splitlines():
        if collecting and line[:1] in (" ", "\t") and line.strip():
            value = f"{value} {line.strip()}"
            continue
        collecting = False
        m = re.match(r"header_checks\s*=\s*(.*)$", line)
        if m:
            value, collecting = m.group(1).strip(), True
    if value is None:  # not set in main.cf: Postfix's default
        return _postconf(config_dir, "-d", "-h", "header_checks")
    return value


def apply(p: Plan) -> None:
    if p.write_table:
        p.table.write_text(HEADER + RULE)
        p.table.chmod(0o644)
    main_cf = p.config_dir / "main.cf"
    if p.main_cf_before != p.main_cf_after:
        shutil.copy2(main_cf, main_cf.with_name(f"main.cf.spoolscan-{int(time.time())}"))
        staged = main_cf.with_name(".main.cf.spoolscan-new")
        staged.write_text(p.main_cf_after)
        shutil.copymode(main_cf, staged)
        staged.replace(main_cf)
    if p.remove_table:
        p.table.unlink()
    running = subprocess.run(["postfix", "-c", str(p.config_dir), "status"],
                             capture_output=True, text=True).returncode == 0
    if running:
        subprocess.run(["postfix", "-c", str(p.config_dir), "reload"], check=True,
                       capture_output=True, text=True)


def setup_postfix(config_dir: str, *, uninstall: bool, dry_run: bool, yes: bool,
                  ask: Callable[[str], str] = input) -> int:
    """Returns an exit status: 0 done (or nothing to do), 1 declined, 2 error."""
    directory = Path(config_dir)
    try:
        p = plan(directory, uninstall)
    except (RuntimeError, OSError) as exc:
        print(f"spoolscan: {exc}", file=sys.stderr)
        return 2
    if uninstall:
        print(f"To remove spoolscan's hold rule from Postfix ({directory}):")
    else:
        print(f"To make Postfix ({directory}) hold incoming mail for spoolscan:")
    if not p.changes:
        print("  nothing to do: already " + ("removed" if uninstall else "set up"))
        return 0
    print(f"  header_checks: {p.current or '(empty)'}\n           -> {p.wanted or '(empty)'}")
    if not uninstall:
        print("  Postfix applies the first rule that matches a header, table by table: the "
              "site's tables\n  come first and keep deciding what they decide; mail none of "
              "them acts on is held\n  by spoolscan's table, last in the list.")
    for s in p.shadows:
        print(f"  WARNING: {s.table} line {s.line_no} matches every Received: header first "
              f"({s.line!r}):\n  mail it matches is never held, so never scanned. Give "
              "that rule a narrower pattern,\n  or list spoolscan's table before that "
              "table.")
    for cmd in p.commands():
        print(f"  $ {cmd}")
    if uninstall:
        print("Mail already on hold stays there: check `postqueue -p` (IDs marked '!') and "
              "release it with `postsuper -H ALL` once it is scanned.")
    else:
        print("From then on mail waits in the hold queue until `spoolscan run` releases it: "
              "start spoolscan first.")
    if dry_run:
        return 0
    if not yes and ask("Proceed? [y/N] ").strip().lower() not in ("y", "yes"):
        print("nothing changed")
        return 1
    try:
        apply(p)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"spoolscan: setup failed: {exc}", file=sys.stderr)
        return 2
    print("done")
    return 0
