"""`spoolscan quarantine`: list, show, release and delete what the worker quarantined."""

import json
from dataclasses import replace

import pytest
from mail import deliver, eicar_message, make_maildir, message

from spoolscan.cli import main
from spoolscan.config import SourceConfig
from spoolscan.runner import build_worker


@pytest.fixture
def quarantined(config, store, tmp_path):
    root = make_maildir(tmp_path / "vmail" / "alice" / "Maildir")
    bad = deliver(root, eicar_message(), subdir="cur", flags="S")
    deliver(root, message())
    src = SourceConfig(name="mailboxes", type="maildir",
                       paths=(str(tmp_path / "vmail" / "*" / "Maildir"),))
    cfg = replace(config, sources=(src,))
    build_worker(cfg, store).run_once()
    assert not bad.exists()
    return bad


def q(capsys, config_file, *args):
    code = main(["--config", str(config_file), "quarantine", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_shows_the_quarantined_message(capsys, config_file, quarantined):
    code, out, _ = q(capsys, config_file, "list", "--json")
    (entry,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert entry["signature"] == "Spoolscan.Test.EICAR-NDB.UNOFFICIAL"
    assert entry["original_path"] == str(quarantined)


def test_show_prints_the_headers(capsys, config_file, quarantined):
    _, out, _ = q(capsys, config_file, "list", "--json")
    message_id = json.loads(out.splitlines()[0])["id"]
    code, out, _ = q(capsys, config_file, "show", str(message_id))
    assert code == 0 and "Subject: invoice" in out


def test_release_puts_it_back_with_its_flags_and_it_stays(capsys, config, config_file, store,
                                                          quarantined):
    _, out, _ = q(capsys, config_file, "list", "--json")
    message_id = json.loads(out.splitlines()[0])["id"]
    code, out, _ = q(capsys, config_file, "release", str(message_id))
    assert code == 0 and quarantined.exists()
    _, out, _ = q(capsys, config_file, "list", "--json")
    assert out == ""
    # The worker does not quarantine it again.
    src = SourceConfig(name="mailboxes", type="maildir",
                       paths=(str(quarantined.parents[2] / "*" / "Maildir"),))
    build_worker(replace(config, sources=(src,)), store).run_once()
    assert quarantined.exists()


def test_delete_removes_the_copy(capsys, config_file, quarantined):
    _, out, _ = q(capsys, config_file, "list", "--json")
    entry = json.loads(out.splitlines()[0])
    code, _, _ = q(capsys, config_file, "delete", str(entry["id"]))
    assert code == 0
    from pathlib import Path

    assert not Path(entry["quarantine_path"]).exists()
    assert q(capsys, config_file, "list", "--json")[1] == ""


def test_unknown_id_is_an_error(capsys, config_file, quarantined):
    code, _, err = q(capsys, config_file, "show", "999999")
    assert code == 2 and "not in quarantine" in err


def test_release_and_delete_answer_in_json_one_object_per_id(capsys, config_file,
                                                             quarantined):
    _, out, _ = q(capsys, config_file, "list", "--json")
    message_id = json.loads(out.splitlines()[0])["id"]
    code, out, _ = q(capsys, config_file, "release", "--json", str(message_id), "999999")
    ok, missing = (json.loads(line) for line in out.splitlines())
    assert code == 2
    assert ok == {"id": message_id, "ok": True, "result": "released",
                  "to": str(quarantined)}
    assert missing["id"] == 999999 and missing["ok"] is False and missing["error"]
