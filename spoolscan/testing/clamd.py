"""A private clamd with a signature database built on the spot: for the demo (`make run`),
the tests and the benchmarks.

No signatures are downloaded (there is no network): the database holds an EICAR body
signature and the MD5 of ClamAV's test file ``clam.exe``, which catches all the samples
shipped by Debian's ``clamav-testfiles``.  It can also publish a versioned ``daily.cud`` to
simulate a signature update offline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
EICAR_NDB = (
    "Spoolscan.Test.EICAR-NDB:0:*:"
    + EICAR.hex()
)
CLAMEXE_HDB = "aa15bcf478d165efd2065190eb473bcb:544:Spoolscan.Test.ClamExe"
TESTFILES_DIR = Path("/usr/share/clamav-testfiles")


def clamd_binary() -> str:
    for candidate in ("clamd", "/usr/sbin/clamd"):
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError("clamd is not installed: run `make deps` "
                       "(apt-get install clamav-daemon)")


class ClamdInstance:
    """clamd running in the foreground on a private Unix socket under ``root``."""

    def __init__(self, root: Path, *, stream_max: str = "3M", max_file: str = "2M",
                 extra_conf: str = "") -> None:
        self.root = root
        self.db_dir = root / "db"
        self.socket_path = root / "clamd.sock"
        self.log_path = root / "clamd.log"
        self.conf_path = root / "clamd.conf"
        self.stream_max = stream_max
        self.max_file = max_file
        self.extra_conf = extra_conf
        self.process: subprocess.Popen[bytes] | None = None

    def write_database(self, extra_ndb: tuple[str, ...] = ()) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        (self.db_dir / "spoolscan-test.ndb").write_text("\n".join((EICAR_NDB, *extra_ndb)) + "\n")
        (self.db_dir / "spoolscan-test.hdb").write_text(CLAMEXE_HDB + "\n")

    def write_conf(self) -> None:
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        user = "User root\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(
            f"LocalSocket {self.socket_path}\n"
            "LocalSocketMode 666\n"  # the worker runs unprivileged (privilege separation)
            "Foreground yes\n"
            f"DatabaseDirectory {self.db_dir}\n"
            f"TemporaryDirectory {tmp}\n"
            f"PidFile {self.root / 'clamd.pid'}\n"
            f"LogFile {self.log_path}\n"
            "LogTime yes\n"
            "LogClean yes\n"
            "LogFileMaxSize 0\n"  # no rotation: scan_count() reads one file
            f"{user}"
            f"StreamMaxLength {self.stream_max}\n"
            f"MaxFileSize {self.max_file}\n"
            "AlertExceedsMax yes\n"
            "SelfCheck 3600\n"
            "DisableCache yes\n"
            "MaxThreads 8\n"
            + self.extra_conf
        )

    def start(self, timeout: float = 60.0) -> None:
        if not (self.db_dir / "spoolscan-test.ndb").exists():
            self.write_database()
        self.write_conf()
        if self.socket_path.exists():
            self.socket_path.unlink()
        with open(self.root / "clamd.stderr", "ab") as stderr:
            self.process = subprocess.Popen(
                [clamd_binary(), f"--config-file={self.conf_path}"],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"clamd exited with {self.process.returncode}: "
                                   + self.diagnostics())
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError("clamd did not answer PING in time: " + self.diagnostics())

    def diagnostics(self) -> str:
        text = ""
        for p in (self.root / "clamd.stderr", self.log_path):
            if p.exists():
                text += p.read_text(errors="replace")[-2000:]
        return text

    def ping(self) -> bool:
        try:
            return self.command(b"PING", timeout=1.0) == b"PONG"
        except OSError:
            return False

    def command(self, cmd: bytes, timeout: float = 5.0) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket_path))
            s.sendall(b"z" + cmd + b"\0")
            data = b""
            while not data.endswith(b"\0"):
                part = s.recv(4096)
                if not part:
                    break
                data += part
            return data.rstrip(b"\0")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def scan_count(self) -> int:
        """How many scans clamd logged (LogClean yes logs clean ones too)."""
        if not self.log_path.exists():
            return 0
        text = self.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines()
                   if line.endswith((": OK", " FOUND")) or line.endswith("ERROR"))

    # --- signature updates, simulated offline -------------------------------------

    def publish_daily(self, version: int, extra_ndb: tuple[str, ...] = ()) -> None:
        """Replace the database with a versioned, unsigned ``daily.cud`` and RELOAD.

        clamd's VERSION then reports ``ClamAV x.y.z/<version>/<date>``.
        """
        build = self.root / f"build-{version}"
        if build.exists():
            shutil.rmtree(build)
        build.mkdir()
        (build / "daily.ndb").write_text("\n".join((EICAR_NDB, *extra_ndb)) + "\n")
        (build / "daily.hdb").write_text(CLAMEXE_HDB + "\n")
        (build / "COPYING").write_text("spoolscan test signatures\n")
        subprocess.run(
            ["sigtool", "--build=daily.cud", "--unsigned", f"--cvd-version={version}",
             f"--datadir={build}"],
            cwd=build, input=b"spoolscan-tests\n", check=True, capture_output=True,
        )
        staged = self.db_dir / ".daily.cud.new"
        shutil.copy(build / "daily.cud", staged)
        os.replace(staged, self.db_dir / "daily.cud")
        for stale in ("spoolscan-test.ndb", "spoolscan-test.hdb"):
            (self.db_dir / stale).unlink(missing_ok=True)
        if self.process is not None:
            self.command(b"RELOAD")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if f"/{version}/".encode() in self.command(b"VERSION"):
                    return
                time.sleep(0.1)
            raise RuntimeError(f"clamd did not load daily version {version}")


def ndb_line(name: str, marker: bytes) -> str:
    """A body signature matching ``marker`` anywhere in the content."""
    return f"{name}:0:*:{marker.hex()}"
