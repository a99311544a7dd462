"""`make run`: the worker on an embedded default — SQLite, a local clamd, a demo Maildir.

Creates (again, each time) two demo mailboxes under $SPOOLSCAN_DEMO_DIR (default
/tmp/spoolscan-demo) with a handful of clean messages and a few carrying EICAR or one of
the ``clamav-testfiles`` samples, uses the system clamd if it answers (else starts a
private one with a small built signature database), then:

1. ``spoolscan scan`` over the mailboxes (what is in there, exit status like clamdscan);
2. ``spoolscan run --once`` with a Maildir source: infected mail moves to the quarantine
   store, every verdict and action is stored in SQLite;
3. prints what the store now says (the ``v_scans`` view), the quarantine and a report;
4. writes the HTML report (``spoolscan report all --format html``) and prints its path.

Run ``python -m spoolscan.demo --forever`` to keep the worker running (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from spoolscan.cli import main as spoolscan
from spoolscan.store.db import create_engine_for, upgrade
from spoolscan.testing.clamd import EICAR, TESTFILES_DIR, ClamdInstance

SYSTEM_SOCKET = "/var/run/clamav/clamd.ctl"


def _message(subject: str, body: str, attachment: tuple[str, bytes] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "newsletter@example.net"
    msg["To"] = "alice@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash(subject))}@demo.spoolscan>"
    msg.set_content(body)
    if attachment:
        name, data = attachment
        msg.add_attachment(data, maintype="application", subtype="octet-stream",
                           filename=name)
    return bytes(msg)


def build_mailboxes(root: Path) -> list[Path]:
    """Two Maildirs (one with a Maildir++ folder) with clean and infected mail."""
    boxes: list[Path] = []
    samples = [p for p in ("clam.zip", "clam.pdf") if (TESTFILES_DIR / p).exists()]
    for user in ("alice", "bob"):
        box = root / "vmail" / user / "Maildir"
        if box.exists():
            shutil.rmtree(box)
        for folder in ("", ".Lists"):
            for sub in ("tmp", "new", "cur"):
                (box / folder / sub).mkdir(parents=True, exist_ok=True)
        (box / ".Lists" / "maildirfolder").touch()
        mails = [
            ("new", "", _message("Lunch on Friday?", "Shall we meet at noon?\n")),
            ("cur", ":2,S", _message("Minutes of the meeting", "Attached, as promised.\n",
                                     ("minutes.txt", b"1. Budget\n2. Roadmap\n"))),
            ("new", "", _message("Your invoice", "Please open the attachment.\n",
                                 ("invoice.com", EICAR))),
            (".Lists/new", "", _message("[list] weekly digest", "Nothing new this week.\n")),
        ]
        if samples:
            name = samples[len(boxes) % len(samples)]
            mails.append(("cur", ":2,RS", _message("Scanned document", "See attached.\n",
                                                    (name, (TESTFILES_DIR / name).read_bytes()))))
        for i, (sub, info, data) in enumerate(mails):
            unique = f"{1_700_000_000 + i}.M{i}P{os.getpid()}.demo,S={len(data)}"
            (box / sub / (unique + info)).write_bytes(data)
        boxes.append(box)
    return boxes


def write_config(root: Path, socket_path: str, db_dir: str) -> Path:
    config = root / "spoolscan.toml"
    config.write_text(f"""# Written by `make run` (spoolscan.demo).
[database]
url = "sqlite:///{root / 'spoolscan.db'}"

[clamd]
socket = "{socket_path}"
database_directory = "{db_dir}"

[quarantine]
directory = "{root / 'quarantine'}"

[policy]
local_domains = ["example.org"]

[[source]]
name = "mailboxes"
type = "maildir"
paths = ["{root}/vmail/*/Maildir"]
quarantine = "store"
sweep_interval = "30s"
""")
    return config


def last_scan_id(root: Path) -> int:
    db_path = root / "spoolscan.db"
    if not db_path.exists():
        return 0
    with sqlite3.connect(db_path) as db:
        try:
            return db.execute("SELECT coalesce(max(id), 0) FROM scans").fetchone()[0]
        except sqlite3.OperationalError:  # no schema yet
            return 0


def print_store(root: Path, after: int) -> None:
    with sqlite3.connect(root / "spoolscan.db") as db:
        rows = db.execute(
            "SELECT location, verdict, coalesce(signature, ''), coalesce(action, ''), "
            "\"trigger\", cached FROM v_scans WHERE source = 'mailboxes' AND scan_id > ? "
            "ORDER BY scan_id", (after,)
        ).fetchall()
    print(f"\n{'message (under vmail/)':66} {'verdict':9} {'action':10} signature")
    for location, verdict, signature, action, _trigger, _cached in rows:
        short = location.replace(str(root) + "/vmail/", "").replace("/Maildir/", ": ")
        print(f"{short:66} {verdict:9} {action:10} {signature}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spoolscan.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forever", action="store_true",
                        help="keep the worker running after the demo (Ctrl-C stops it)")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("SPOOLSCAN_DEMO_DIR", "/tmp/spoolscan-demo"))
    root.mkdir(parents=True, exist_ok=True)

    private: ClamdInstance | None = None
    probe = ClamdInstance(root / "clamd")
    probe.socket_path = Path(SYSTEM_SOCKET)
    if Path(SYSTEM_SOCKET).exists() and probe.ping():
        socket_path, db_dir = SYSTEM_SOCKET, "/var/lib/clamav"
        print(f"using the system clamd at {SYSTEM_SOCKET}")
    else:
        private = ClamdInstance(root / "clamd")
        private.start()
        socket_path, db_dir = str(private.socket_path), str(private.db_dir)
        print(f"started a private clamd at {socket_path} (demo signatures: EICAR, clam.exe)")
    try:
        boxes = build_mailboxes(root)
        config = write_config(root, socket_path, db_dir)
        # A store left by an earlier demo may be at an older schema revision.
        engine = create_engine_for(f"sqlite:///{root / 'spoolscan.db'}")
        upgrade(engine)
        engine.dispose()
        print(f"demo mailboxes: {', '.join(str(b) for b in boxes)}\nconfig: {config}\n")

        print("$ spoolscan scan --no-store", " ".join(str(b) for b in boxes))
        code = spoolscan(["--config", str(config), "-q", "scan", "--no-store",
                          *map(str, boxes)])
        print(f"(exit status {code}: 0 clean, 1 infected found, 2 error)\n")

        print("$ spoolscan run --once   # the worker: scan, quarantine, record")
        before = last_scan_id(root)
        started = time.monotonic()
        code = spoolscan(["--config", str(config), "run", "--once"])
        print(f"(exit status {code}, {time.monotonic() - started:.1f}s)")
        print_store(root, before)
        print("\n$ spoolscan quarantine list")
        spoolscan(["--config", str(config), "quarantine", "list"])
        print("\n$ spoolscan report threats")
        spoolscan(["--config", str(config), "report", "threats", "--since", "1d"])
        report = root / "report.html"
        print(f"\n$ spoolscan report all --format html --output {report}")
        spoolscan(["--config", str(config), "report", "all", "--format", "html",
                   "--since", "1d", "--output", str(report)])
        print(f"\nThe store is {root / 'spoolscan.db'}; try:\n"
              f"  sqlite3 {root / 'spoolscan.db'} \"SELECT * FROM v_scans\"\n"
              f"  .venv/bin/spoolscan --config {config} report summary --format sql\n"
              f"  make run ARGS=--forever      # the same, then keep watching (Ctrl-C)\n"
              f"\nThe HTML report (open it in a browser): {report}")
        if args.forever:
            return spoolscan(["--config", str(config), "run"])
        return 0
    finally:
        if private is not None:
            private.stop()


if __name__ == "__main__":
    sys.exit(main())
