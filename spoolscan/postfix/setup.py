"""`spoolscan setup postfix`: make Postfix put incoming mail on hold, or undo it.

Like an installer should: it shows every command before running it, asks first (unless
``--yes``), backs up main.cf, and ``--uninstall`` puts things back.  It only adds a
header_checks table of its own (``spoolscan_header_checks``: ``/^Received:/ HOLD``) in
front of whatever header_checks the site already has.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TABLE_NAME = "spoolscan_header_checks"
RULE = "/^Received:/ HOLD\n"
HEADER = ("# Written by `spoolscan setup postfix`: hold every message that has a Received:\n"
          "# header until spoolscan has scanned it. Remove with "
          "`spoolscan setup postfix --uninstall`.\n")


@dataclass(frozen=True)
class Plan:
    config_dir: Path
    current: str  # header_checks now
    wanted: str  # header_checks afterwards
    table: Path
    write_table: bool
    remove_table: bool

    @property
    def changes(self) -> bool:
        return self.current != self.wanted or self.write_table or self.remove_table

    def commands(self) -> list[str]:
        out = []
        if self.write_table:
            out.append(f"write {self.table}: {RULE.strip()}")
        if self.current != self.wanted:
            out.append(f"cp {self.config_dir / 'main.cf'} "
                       f"{self.config_dir / 'main.cf'}.spoolscan-<timestamp>")
            out.append(f"postconf -c {self.config_dir} -e 'header_checks = {self.wanted}'")
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


def plan(config_dir: Path, uninstall: bool) -> Plan:
    current = _postconf(config_dir, "-h", "header_checks")
    table = config_dir / TABLE_NAME
    ours = f"regexp:{table}"
    others = [e for e in _entries(current) if e != ours]
    if uninstall:
        return Plan(config_dir, current, ", ".join(others), table, False, table.exists())
    wanted = ", ".join([ours, *others])
    write = not table.exists() or table.read_text() != HEADER + RULE
    return Plan(config_dir, current, wanted, table, write, False)


def apply(p: Plan) -> None:
    if p.write_table:
        p.table.write_text(HEADER + RULE)
        p.table.chmod(0o644)
    if p.current != p.wanted:
        main_cf = p.config_dir / "main.cf"
        shutil.copy2(main_cf, main_cf.with_name(f"main.cf.spoolscan-{int(time.time())}"))
        _postconf(p.config_dir, "-e", f"header_checks = {p.wanted}")
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
