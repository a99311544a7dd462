"""Specification of spoolscan.postfix.commands: wrappers around postsuper/postqueue/postconf.

Behaviour is checked against a real private Postfix; error handling against small fake
programs (``bin_dir``), since a real Postfix will not fail on demand.
"""

from __future__ import annotations

import logging
import re
import stat
from email.message import EmailMessage
from pathlib import Path

import pytest

from spoolscan.postfix import commands
from spoolscan.postfix.commands import InvalidQueueId, PostfixCommandError
from spoolscan.testing.postfix import LOCAL_DOMAIN, PostfixInstance

INSTANCES = ["postfix_instance", "postfix_long_ids"]


def _message(subject: str, to: str = f"rcpt@{LOCAL_DOMAIN}") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(f"{subject}\n")
    return msg


def _hold(instance: PostfixInstance, subject: str, **kwargs) -> str:
    queue_id = instance.send(_message(subject), **kwargs)
    assert queue_id in instance.held_ids()
    return queue_id


def _in_queue(instance: PostfixInstance, queue: str, queue_id: str) -> bool:
    return any(p.name == queue_id for p in (instance.queue_dir / queue).rglob("*"))


def _released(instance: PostfixInstance, queue_id: str) -> bool:
    """Out of hold and on its way: in deferred/ (where postsuper -H puts it), or already
    picked up by qmgr's periodic deferred scan."""
    return queue_id not in instance.held_ids() and (
        _in_queue(instance, "deferred", queue_id)
        or _in_queue(instance, "active", queue_id)
        # delivered and removed by qmgr (postsuper -d would log "postsuper[...]: ID: removed")
        or re.search(rf"postfix/qmgr\[\d+\]: {queue_id}: removed", instance.log_text()) is not None
    )


def fake_program(bin_dir: Path, name: str, script: str) -> Path:
    """A stand-in for a Postfix command; it logs its arguments and stdin to files."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{bin_dir}/{name}.args"\n'
        f'cat > "{bin_dir}/{name}.stdin"\n'
        + script + "\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --------------------------------------------------------------------------- real Postfix


def test_queue_directory_is_read_from_the_instance_config(postfix_instance):
    assert commands.queue_directory(postfix_instance.config_dir) == postfix_instance.queue_dir


@pytest.mark.parametrize("instance_name", INSTANCES)
def test_release_returns_the_id_and_the_message_leaves_hold(request, instance_name):
    instance = request.getfixturevalue(instance_name)
    queue_id = _hold(instance, "release me")
    assert commands.release(instance.config_dir, [queue_id]) == {queue_id}
    assert _released(instance, queue_id)


def test_release_of_an_unknown_id_returns_an_empty_set(postfix_instance):
    assert commands.release(postfix_instance.config_dir, ["ABCDEF123"]) == set()


def test_release_returns_only_the_ids_that_were_on_hold(postfix_instance):
    held = _hold(postfix_instance, "mixed batch")
    result = commands.release(postfix_instance.config_dir, ["ABCDEF123", held, "0123456789"])
    assert result == {held}


def test_a_second_release_of_the_same_id_returns_an_empty_set(postfix_instance):
    queue_id = _hold(postfix_instance, "released twice")
    assert commands.release(postfix_instance.config_dir, [queue_id]) == {queue_id}
    assert commands.release(postfix_instance.config_dir, [queue_id]) == set()


def test_release_of_many_ids_in_one_batch(postfix_long_ids):
    ids = [_hold(postfix_long_ids, f"batch {i}") for i in range(5)]
    assert commands.release(postfix_long_ids.config_dir, ids) == set(ids)
    assert not set(ids) & set(postfix_long_ids.held_ids())


@pytest.mark.parametrize("instance_name", INSTANCES)
def test_delete_returns_the_id_and_removes_the_file(request, instance_name):
    instance = request.getfixturevalue(instance_name)
    queue_id = _hold(instance, "delete me")
    path = instance.held_path(queue_id)
    assert commands.delete(instance.config_dir, [queue_id]) == {queue_id}
    assert not path.exists()


def test_delete_of_an_unknown_id_returns_an_empty_set(postfix_instance):
    assert commands.delete(postfix_instance.config_dir, ["ABCDEF123"]) == set()


def test_delete_limited_to_hold_leaves_released_mail_alone(postfix_instance):
    queue_id = _hold(postfix_instance, "released before delete")
    commands.release(postfix_instance.config_dir, [queue_id])
    assert commands.delete(postfix_instance.config_dir, [queue_id], queues=["hold"]) == set()
    assert _released(postfix_instance, queue_id)


def test_list_queue_reports_a_held_message(postfix_long_ids):
    queue_id = _hold(postfix_long_ids, "listed")
    entries = {e["queue_id"]: e for e in commands.list_queue(postfix_long_ids.config_dir)}
    assert entries[queue_id]["queue_name"] == "hold"
    assert entries[queue_id]["sender"] == "sender@example.com"
    assert entries[queue_id]["recipients"] == [{"address": f"rcpt@{LOCAL_DOMAIN}"}]


def test_release_then_flush_delivers_to_the_maildir(postfix_long_ids):
    before = len(postfix_long_ids.delivered("alice"))
    queue_id = _hold(postfix_long_ids, "deliver me", recipients=[f"alice@{LOCAL_DOMAIN}"])
    assert commands.release(postfix_long_ids.config_dir, [queue_id]) == {queue_id}
    assert commands.flush(postfix_long_ids.config_dir, [queue_id]) == {queue_id}
    delivered = postfix_long_ids.wait_delivered("alice", before + 1)
    assert any(b"Subject: deliver me" in p.read_bytes() for p in delivered)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad_id", [
    "bad/id", "../hold/X", "", "ABC 123", "ABC\n123", "ABC123!", "-d", "x" * 256, "Ä1",
])
def test_an_invalid_id_is_rejected_before_anything_runs(tmp_path, bad_id):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postsuper", "exit 0")
    fake_program(bin_dir, "postqueue", "exit 0")
    for call in (commands.release, commands.delete, commands.flush):
        with pytest.raises(InvalidQueueId):
            call(tmp_path, ["GOOD1", bad_id], bin_dir=bin_dir)
    assert not list(bin_dir.glob("*.args")), "a command ran despite an invalid ID"


def test_a_single_string_is_not_taken_for_a_list_of_ids(tmp_path):
    with pytest.raises(TypeError):
        commands.release(tmp_path, "ABC123", bin_dir=tmp_path)


def test_no_ids_means_no_command(tmp_path):
    assert commands.release(tmp_path, [], bin_dir=tmp_path / "nothing-here") == set()
    assert commands.delete(tmp_path, [], bin_dir=tmp_path / "nothing-here") == set()
    assert commands.flush(tmp_path, [], bin_dir=tmp_path / "nothing-here") == set()


def test_an_unknown_queue_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown queue"):
        commands.delete(tmp_path, ["ABC123"], queues=["hold; rm -rf /"], bin_dir=tmp_path)


# --------------------------------------------------------------------------- fake programs


def test_postsuper_gets_the_ids_on_stdin_one_per_line(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postsuper", "exit 0")
    commands.release("/etc/pf2", ["A1", "B2", "A1"], bin_dir=bin_dir)
    assert (bin_dir / "postsuper.args").read_text().split() == ["-c", "/etc/pf2", "-H", "-"]
    assert (bin_dir / "postsuper.stdin").read_text() == "A1\nB2\n"


def test_only_confirmed_ids_that_were_asked_for_count(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postsuper", (
        "echo 'postsuper: A1: released from hold' >&2\n"
        "echo 'postsuper: OTHER: released from hold' >&2\n"
        "echo 'postsuper: B2: placed on hold' >&2\n"
        "echo 'postsuper: Released from hold: 2 messages' >&2"
    ))
    assert commands.release(tmp_path, ["A1", "B2"], bin_dir=bin_dir) == {"A1"}


def test_postsuper_warnings_are_logged(tmp_path, caplog):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postsuper", "echo 'postsuper: warning: something odd' >&2")
    with caplog.at_level(logging.WARNING, logger="spoolscan.postfix.commands"):
        commands.delete(tmp_path, ["A1"], bin_dir=bin_dir)
    assert "something odd" in caplog.text


def test_a_missing_program_says_what_to_do(tmp_path):
    with pytest.raises(PostfixCommandError, match=r"postsuper not found in .*bin_dir"):
        commands.release(tmp_path, ["A1"], bin_dir=tmp_path)


def test_a_fatal_postsuper_error_raises_with_postfix_message_and_advice(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postsuper", (
        "echo 'postsuper: fatal: use of this command is reserved for the superuser' >&2\n"
        "exit 1"
    ))
    with pytest.raises(PostfixCommandError, match=r"exit 1.*superuser.*run as root"):
        commands.release(tmp_path, ["A1"], bin_dir=bin_dir)


def test_list_queue_when_postfix_is_down_says_to_start_it(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postqueue", (
        "echo 'postqueue: fatal: Queue report unavailable - mail system is down' >&2\nexit 69"
    ))
    with pytest.raises(PostfixCommandError, match=r"start Postfix \(postfix -c .* start\)"):
        commands.list_queue(tmp_path, bin_dir=bin_dir)


def test_list_queue_rejects_output_that_is_not_json_lines(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postqueue", "echo '-Queue ID-  --Size--'")
    with pytest.raises(PostfixCommandError, match="not JSON"):
        commands.list_queue(tmp_path, bin_dir=bin_dir)


def test_a_bad_config_dir_raises_with_advice():
    with pytest.raises(PostfixCommandError, match=r"main\.cf.*check the Postfix configuration"):
        commands.queue_directory("/nonexistent/postfix-config")


def test_flush_logs_failures_and_carries_on(tmp_path, caplog):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postqueue", (
        'case "$*" in *BAD1*) echo "postqueue: fatal: oops" >&2; exit 1;; esac'
    ))
    with caplog.at_level(logging.WARNING, logger="spoolscan.postfix.commands"):
        assert commands.flush(tmp_path, ["BAD1", "GOOD1"], bin_dir=bin_dir) == {"GOOD1"}
    assert "BAD1" in caplog.text and "oops" in caplog.text


def test_a_hanging_command_times_out(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "postsuper", "exec sleep 10")
    with pytest.raises(PostfixCommandError, match="did not finish within"):
        commands.release(tmp_path, ["A1"], bin_dir=bin_dir, timeout=0.5)
