"""Operating `spoolscan run`: reloads, signals, logs, metrics, systemd notifications."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import allow_traversal, wait_until, write_config
from mail import deliver, eicar_message, make_maildir, message

from spoolscan.config import Config

# These are about the process, not the database: SQLite is enough.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def maildir_source(name: str, root: Path, **options: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
    return f"""
[[source]]
name = "{name}"
type = "maildir"
paths = ["{root}/*/Maildir"]
quarantine = "folder"
sweep_interval = "1s"
{extra}"""


def mailbox(root: Path, user: str) -> Path:
    return make_maildir(root / user / "Maildir")


def quarantined(box: Path) -> list[Path]:
    folder = box / ".Quarantine" / "new"
    return list(folder.iterdir()) if folder.is_dir() else []


class Running:
    """`spoolscan run` in a child process; stderr collected in a file."""

    def __init__(self, config_file: Path, tmp: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.err_path = tmp / "stderr.log"
        self.err = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spoolscan", "--config", str(config_file), *args, "run"],
            stderr=self.err, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        wait_until(lambda: text in self.stderr(), timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=90)
        self.err.close()
        return code


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    root = tmp_path / "vmail"
    root.mkdir()
    allow_traversal(root)
    return root


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    started: list[Running] = []

    def _start(config_file: Path, *args: str, **kw: object) -> Running:
        r = Running(config_file, tmp_path, *args, **kw)  # type: ignore[arg-type]
        started.append(r)
        r.wait_for_log("spoolscan started")
        return r

    yield _start
    for r in started:
        r.stop()


# --- SIGHUP -----------------------------------------------------------------------------


def test_sighup_starts_watching_a_source_added_to_the_file(config: Config, tmp_path: Path,
                                                           spool: Path, start) -> None:
    one, two = spool / "one", spool / "two"
    first, second = mailbox(one, "a"), mailbox(two, "b")
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one))
    run = start(config_file)
    deliver(first, eicar_message())
    wait_until(lambda: len(quarantined(first)) == 1)

    write_config(config_file, config, maildir_source("one", one) + maildir_source("two", two))
    run.proc.send_signal(signal.SIGHUP)
    run.wait_for_log("reloaded")
    deliver(second, eicar_message())
    wait_until(lambda: len(quarantined(second)) == 1)
    assert run.stop() == 0


def test_sighup_stops_watching_a_removed_source(config: Config, tmp_path: Path,
                                                spool: Path, start) -> None:
    one, two = spool / "one", spool / "two"
    first, second = mailbox(one, "a"), mailbox(two, "b")
    config_file = write_config(tmp_path / "s.toml", config,
                               maildir_source("one", one) + maildir_source("two", two))
    run = start(config_file)
    write_config(config_file, config, maildir_source("one", one))
    run.proc.send_signal(signal.SIGHUP)
    run.wait_for_log("reloaded")
    kept = deliver(second, eicar_message())
    deliver(first, eicar_message())
    wait_until(lambda: len(quarantined(first)) == 1)
    time.sleep(2)  # two sweep intervals of the removed source
    assert kept.exists() and quarantined(second) == []
    assert run.stop() == 0


def test_a_broken_file_on_sighup_keeps_the_running_configuration(
        config: Config, tmp_path: Path, spool: Path, start) -> None:
    one = spool / "one"
    box = mailbox(one, "a")
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one))
    run = start(config_file)
    config_file.write_text(config_file.read_text() + "\n[policy\nbroken = \n")
    run.proc.send_signal(signal.SIGHUP)
    run.wait_for_log("still running with the previous configuration")
    deliver(box, eicar_message())
    wait_until(lambda: len(quarantined(box)) == 1)
    assert run.stop() == 0


# --- SIGTERM ----------------------------------------------------------------------------


def test_sigterm_in_the_middle_of_a_burst_exits_0_and_loses_nothing(
        config: Config, tmp_path: Path, spool: Path, start) -> None:
    one = spool / "one"
    box = mailbox(one, "a")
    for i in range(150):
        deliver(box, eicar_message(subject=f"burst {i}"))
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one))
    run = start(config_file)
    wait_until(lambda: len(quarantined(box)) >= 1)
    assert run.stop() == 0
    left = list((box / "new").iterdir())
    assert len(left) + len(quarantined(box)) == 150
    assert "stopped:" in run.stderr()


# --- logs -------------------------------------------------------------------------------


def test_json_log_lines_are_one_object_each_with_the_message_fields(
        config: Config, tmp_path: Path, spool: Path) -> None:
    one = spool / "one"
    box = mailbox(one, "a")
    deliver(box, eicar_message())
    deliver(box, message(subject="clean"))
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one))
    done = subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                           "--log-format", "json", "run", "--once"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    verdicts = [r for r in lines if r.get("verdict")]
    assert sorted(r["verdict"] for r in verdicts) == ["clean", "infected"]
    infected = next(r for r in verdicts if r["verdict"] == "infected")
    assert infected["level"] == "warning" and infected["source"] == "one"


def test_syslog_target_sends_mail_facility_lines_with_priorities(
        config: Config, tmp_path: Path, spool: Path) -> None:
    one = spool / "one"
    box = mailbox(one, "a")
    deliver(box, eicar_message())
    deliver(box, message(subject="clean"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev_log = tmp_path / "dev-log"
    listener.bind(str(dev_log))
    os.chmod(dev_log, 0o666)  # the unprivileged worker logs too
    listener.settimeout(0.2)
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one)
                               + f'\n[log]\ntarget = "syslog"\nsyslog_socket = "{dev_log}"\n')
    done = subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                           "run", "--once"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    received = []
    while True:
        try:
            received.append(listener.recv(65536).decode())
        except TimeoutError:
            break
    listener.close()
    mail_facility = 2
    priorities = {}
    for line in received:
        pri = int(line[1:line.index(">")])
        assert pri >> 3 == mail_facility, line
        assert "spoolscan[" in line
        if "verdict=" in line:
            priorities["infected" if "infected" in line else "clean"] = pri & 7
    assert priorities == {"infected": 4, "clean": 6}  # warning, info


# --- metrics ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_count_what_the_worker_did(config: Config, tmp_path: Path, spool: Path,
                                           start) -> None:
    one = spool / "one"
    box = mailbox(one, "a")
    for i in range(3):
        deliver(box, eicar_message(subject=f"bad {i}"))
    for i in range(2):
        deliver(box, message(subject=f"good {i}"))
    port = free_port()
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one)
                               + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    start(config_file)
    wait_until(lambda: len(quarantined(box)) == 3)

    def counted() -> dict[str, float]:
        try:
            return scrape(port)
        except OSError:
            return {}

    wait_until(lambda: sum(v for k, v in counted().items()
                           if k.startswith("spoolscan_messages_total")) == 5)
    values = scrape(port)
    infected = sum(v for k, v in values.items()
                   if k.startswith("spoolscan_messages_total") and 'verdict="infected"' in k)
    assert infected == 3
    assert values["spoolscan_clamd_up"] == 1
    assert values["spoolscan_in_pipeline"] == 0


# --- systemd ----------------------------------------------------------------------------


def test_under_systemd_it_says_ready_pings_the_watchdog_and_says_stopping(
        config: Config, tmp_path: Path, spool: Path, start) -> None:
    one = spool / "one"
    mailbox(one, "a")
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    os.chmod(notify, 0o666)  # as systemd's: the worker sends after dropping privileges
    listener.settimeout(30)
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one))
    run = start(config_file, env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000"})
    got: list[str] = []

    def receive_until(field: str) -> None:
        while not any(field in m for m in got):
            got.append(listener.recv(4096).decode())

    receive_until("READY=1")
    receive_until("WATCHDOG=1")
    assert any("STATUS=" in m for m in got)
    run.proc.send_signal(signal.SIGTERM)
    receive_until("STOPPING=1")
    assert run.stop() == 0
    listener.close()


def test_metrics_during_a_hold_burst_agree_with_the_store_and_show_a_stopped_clamd(
        config: Config, store, postfix, tmp_path: Path) -> None:
    from dataclasses import replace

    from conftest import running
    from sqlalchemy import text

    from spoolscan.config import SourceConfig
    from spoolscan.metrics import Metrics
    from spoolscan.runner import build_worker
    from spoolscan.testing.clamd import ClamdInstance

    private = ClamdInstance(tmp_path / "clamd-private")
    private.start()
    src = SourceConfig(name="postfix", type="postfix-hold",
                       config_directory=str(postfix.config_dir), sweep_interval=0.5)
    cfg = replace(config, sources=(src,),
                  clamd=replace(config.clamd, socket=str(private.socket_path)),
                  policy=replace(config.policy, retry_delay=0.2, max_attempts=1000))
    metrics = Metrics()
    worker = build_worker(cfg, store, metrics=metrics)
    metrics.watch(worker)

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    def store_count(verdict: str) -> int:
        with store.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM scans WHERE verdict = :v"),
                                    {"v": verdict}).scalar_one())

    try:
        with running(worker):
            for i in range(12):
                body = eicar_message(subject=f"bad {i}") if i % 4 == 0 else \
                    message(subject=f"burst {i}")
                postfix.send(body, recipients=["rcpt@spoolscan.test"])
            wait_until(lambda: postfix.held_ids() == [] and worker.in_pipeline() == 0)
            for verdict in ("clean", "infected"):
                counted = sum(
                    value("spoolscan_messages_total", source="postfix", verdict=verdict,
                          action=action) for action in ("release", "quarantine", "none"))
                assert counted == store_count(verdict)
            assert value("spoolscan_clamd_up") == 1
            assert value("spoolscan_hold_backlog", source="postfix") == 0

            private.stop()
            for i in range(3):
                postfix.send(message(subject=f"while clamd is down {i}"),
                             recipients=["rcpt@spoolscan.test"])
                wait_until(lambda n=i + 1: value("spoolscan_hold_backlog",
                                                 source="postfix") == n)
            wait_until(lambda: value("spoolscan_clamd_up") == 0)
            first = value("spoolscan_hold_oldest_seconds", source="postfix")
            time.sleep(1.5)
            assert value("spoolscan_hold_oldest_seconds", source="postfix") > first
    finally:
        private.stop()


# --- cron -------------------------------------------------------------------------------


def shipped_cron_commands() -> list[list[str]]:
    """The spoolscan commands of cron/spoolscan.cron, without the binary's path."""
    import shlex

    crontab = Path(__file__).parents[1] / "cron" / "spoolscan.cron"
    commands = []
    for line in crontab.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            words = shlex.split(line)[6:]  # five time fields, the user
            assert words[0].endswith("/spoolscan"), line
            commands.append(words[1:])
    return commands


def test_the_shipped_crontab_commands_print_nothing_when_there_is_nothing_to_do(
        config: Config, tmp_path: Path, spool: Path) -> None:
    one = spool / "one"
    box = mailbox(one, "a")
    deliver(box, message(subject="seen before"))
    config_file = write_config(tmp_path / "s.toml", config, maildir_source("one", one))
    base = [sys.executable, "-m", "spoolscan", "--config", str(config_file)]
    subprocess.run([*base, "run", "--once"], check=True, capture_output=True, timeout=120)
    commands = shipped_cron_commands()
    assert len(commands) >= 2
    for _ in range(2):  # the first run may rescan; the second has nothing to do
        for command in commands:
            done = subprocess.run([*base, *command], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, (command, done.stderr)
    for command in commands:
        done = subprocess.run([*base, *command], capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), command
