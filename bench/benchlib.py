"""What both benchmark scripts share: a scratch directory the unprivileged worker can use,
CPU and memory figures of live processes from /proc, and py-spy profiles.

Stdlib only (the scripts import it from their own directory).
"""

from __future__ import annotations

import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: The user spoolscan's worker drops to when started as root (``[privileges] user``).
WORKER_USER = "spoolscan"


# --------------------------------------------------------------------------- byte code


def byte_compile(package: Path) -> None:
    """Write the byte code of ``package`` (spoolscan in this checkout) before measuring.

    An installed spoolscan is byte-compiled by pip; a checkout is not, and its unprivileged
    worker cannot write ``__pycache__`` in root's tree (nor can anything run with
    ``PYTHONDONTWRITEBYTECODE``), so every process would compile every module it imports
    again: a start-up cost production does not pay."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})


# --------------------------------------------------------------------------- directories


def scratch_dir(prefix: str) -> Path:
    """A new directory under /tmp for one run.  ``mkdtemp`` makes it 0700; started as root,
    spoolscan's worker runs as ``WORKER_USER`` and must traverse it to reach the clamd
    socket, the quarantine store and the database, so it gets the search bit (0711: others
    can pass through but not list it)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    tmp.chmod(0o711)
    return tmp


def worker_db_dir(path: Path) -> Path:
    """A directory for an SQLite database that the worker may write (SQLite writes its
    journal beside the file): created 0750 and given to ``WORKER_USER``, as an admin does
    with /var/lib/spoolscan.  spoolscan itself refuses a directory the worker cannot write;
    it never takes one over."""
    path.mkdir(mode=0o750, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam(WORKER_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def worker_user_missing() -> str | None:
    """Why spoolscan started as root could not run its worker, or None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(WORKER_USER)
    except KeyError:
        return (f"the system user {WORKER_USER!r} is missing (the worker drops to it): "
                "run scripts/install-deps")
    return None


def privileges_toml() -> str:
    return f'\n[privileges]\nuser = "{WORKER_USER}"\n'


# --------------------------------------------------------------------------- /proc


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own user+sys, waited-for children's user+sys) CPU seconds of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(x) / _TICK for x in fields[11:15])
    return utime + stime, cutime + cstime


@contextmanager
def cpu_per_item(results: dict[str, float], name: str, n: int, other: int | None = None,
                 children: bool = False) -> Iterator[None]:
    """Put in ``results[name]`` the CPU seconds per item (of ``n``) that the block used:
    this process's, plus the process ``other`` and those it waited for, plus (with
    ``children``) the processes this one ran and waited for."""
    def now() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        total = own.ru_utime + own.ru_stime
        if other:
            total += sum(proc_cpu(other))
        if children:
            waited = resource.getrusage(resource.RUSAGE_CHILDREN)
            total += waited.ru_utime + waited.ru_stime
        return total
    before = now()
    yield
    results[name] = (now() - before) / n


def start_helper(policy: object) -> tuple[object, int]:
    """A real spoolscan root helper (forked from this root process) serving ``policy``
    over one privilege-separation socket: (its RemoteBroker, its pid)."""
    from spoolscan.broker import Broker
    from spoolscan.privsep import Helper, RemoteBroker

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the helper
        ours.close()
        try:
            Helper(Broker(), policy).serve(theirs)  # type: ignore[arg-type]
        finally:
            os._exit(0)
    theirs.close()
    return RemoteBroker([ours], pid), pid


def proc_status_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` figure in kB (``VmHWM``, ``VmRSS``); 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def children_named(pid: int, comm: str) -> list[int]:
    """Child processes of ``pid`` whose name (comm) is ``comm``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text.rpartition(")")[2].split()[1])
        if ppid == pid and name == comm:
            found.append(int(entry))
    return found


def spoolscan_helper(worker_pid: int, timeout: float = 10.0) -> int | None:
    """The privileged helper (``spoolscan-priv``) of a ``spoolscan`` worker started as
    root, or None (started unprivileged, or ``user = "root"``: one process)."""
    if os.geteuid() != 0:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        helpers = children_named(worker_pid, "spoolscan-priv")
        if helpers:
            return helpers[0]
        time.sleep(0.05)
    return None


@dataclass
class CpuSnapshot:
    """CPU seconds of spoolscan's processes at one moment."""

    worker: float
    helper: float
    helper_children: float  # postsuper and the like, run (and waited for) by the helper

    @classmethod
    def take(cls, worker: int, helper: int | None) -> CpuSnapshot:
        own, _ = proc_cpu(worker)
        h, hc = proc_cpu(helper) if helper else (0.0, 0.0)
        return cls(own, h, hc)

    def __sub__(self, other: CpuSnapshot) -> CpuSnapshot:
        return CpuSnapshot(self.worker - other.worker, self.helper - other.helper,
                           self.helper_children - other.helper_children)

    @property
    def total(self) -> float:
        return self.worker + self.helper + self.helper_children


# --------------------------------------------------------------------------- py-spy


def py_spy() -> str | None:
    """py-spy beside this interpreter (the virtualenv) or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record --subprocesses --nonblocking --gil --format raw`` attached to a
    running process (or starting a command), stopped with SIGINT; the raw output is folded
    stacks, one line per distinct stack with its sample count.

    ``--gil``: only the thread holding the GIL is sampled, so the samples show where the
    process spends its Python CPU (it is GIL-bound), not where threads wait.  Without it,
    py-spy counts threads blocked in ``recvmsg`` on the helper's sockets as active (its
    idle detection misses them), and they swamp the table.  Time in C code that releases
    the GIL (SQLite, hashing of large buffers, socket I/O) is not counted.
    ``--nonblocking``: the process is not paused for each sample (less disturbance)."""

    def __init__(self, out: Path, *, pid: int | None = None, command: list[str] | None = None,
                 rate: int = 250) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
        self.out = out
        argv = [exe, "record", "--subprocesses", "--nonblocking", "--gil",
                "--format", "raw", "--rate", str(rate), "-o", str(out)]
        argv += ["--pid", str(pid)] if pid is not None else ["--", *(command or [])]
        self.log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        time.sleep(0.5 if pid is not None else 0)  # attached before the load starts

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def wait(self) -> int:
        code = self.proc.wait()
        self.log.close()
        return code


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_PROCESS = re.compile(r'^process (\d+):"')
#: Frames on every stack of a thread or of the main program: left out of "top by total".
_GENERIC = {"Thread._bootstrap (threading.py)", "Thread._bootstrap_inner (threading.py)",
            "Thread.run (threading.py)", "_run_code (<frozen runpy>)",
            "_run_module_as_main (<frozen runpy>)", "<module> (spoolscan/__main__.py)"}


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/spoolscan/", "/lib/python3"):
        i = path.rfind(marker)
        if i >= 0:
            return ("spoolscan/" if marker == "/spoolscan/" else "") + path[i + len(marker):]
    return path


@dataclass
class ProfileTable:
    title: str
    samples: int
    by_self: list[tuple[str, float, float]]  # function, self %, total %
    by_total: list[tuple[str, float, float]]

    def render(self) -> str:
        if not self.samples:
            return f"{self.title}: no samples\n"
        out = [f"{self.title}: {self.samples} samples holding the GIL", "",
               "| top by self | self % | total % |", "|---|---:|---:|"]
        out += [f"| `{f}` | {s:.1f} | {t:.1f} |" for f, s, t in self.by_self]
        out += ["", "| top by total | total % | self % |", "|---|---:|---:|"]
        out += [f"| `{f}` | {t:.1f} | {s:.1f} |" for f, s, t in self.by_total]
        return "\n".join(out) + "\n"


def profile_tables(raw: Path, pids: dict[int, str] | None = None, top: int = 15,
                   by_depth: dict[int, str] | None = None) -> list[ProfileTable]:
    """Top functions per process from py-spy's raw output, the processes named by pid
    (``pids``: pid → label) or by depth in the process tree (``by_depth``: 1 → the process
    py-spy started or attached to, 2 → its children...): self %
    (samples with the function as the innermost frame) and total % (samples with it
    anywhere on the stack), of that process's non-idle samples.  A function is named
    ``name (file)``, every line of it together."""
    pids = dict(pids or {})
    selfc: dict[int, Counter[str]] = defaultdict(Counter)
    totalc: dict[int, Counter[str]] = defaultdict(Counter)
    samples: Counter[int] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        pid = None
        depth = 0
        funcs = []
        for frame in frames:
            m = _PROCESS.match(frame)
            if m:
                pid = int(m.group(1))
                depth += 1
                continue
            f = _FRAME.match(frame)
            funcs.append(f"{f.group('func')} ({_short(f.group('file'))})" if f else frame)
        if by_depth and depth in by_depth and pid not in pids:
            pids[pid] = f"{by_depth[depth]} (pid {pid})"
        if pid not in pids or not funcs:
            continue
        samples[pid] += count
        selfc[pid][funcs[-1]] += count
        for func in set(funcs):
            totalc[pid][func] += count
    tables = []
    for pid, label in pids.items():
        n = samples[pid]
        if not n:
            tables.append(ProfileTable(label, 0, [], []))
            continue

        def row(f: str, pid: int = pid, n: int = n) -> tuple[str, float, float]:
            return f, 100 * selfc[pid][f] / n, 100 * totalc[pid][f] / n

        tables.append(ProfileTable(label, n,
                                   [row(f) for f, _ in selfc[pid].most_common(top)],
                                   [row(f) for f, _ in totalc[pid].most_common(top + 6)
                                    if f not in _GENERIC][:top]))
    return tables
