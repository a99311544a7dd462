"""`spoolscan doctor` and `spoolscan version`."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import write_config

from spoolscan.cli import main
from spoolscan.quarantine.store import QuarantineStore


@pytest.fixture
def healthy(config):
    """What `spoolscan run` makes at start: the quarantine directory."""
    QuarantineStore(config.quarantine.directory).prepare()
    return config


def doctor(capsys, path, *args):
    code = main(["--config", str(path), "doctor", *args])
    return code, capsys.readouterr().out


def test_doctor_passes_with_a_working_setup(capsys, healthy, config_file):
    code = main(["--config", str(config_file), "doctor"])
    out = capsys.readouterr().out
    assert code == 0
    assert "FAIL" not in out and "ok    clamd answers" in out and "is up to date" in out


def test_doctor_names_what_is_wrong(capsys, config, tmp_path):
    broken = replace(config, clamd=replace(config.clamd, socket=str(tmp_path / "no.sock")))
    path = write_config(tmp_path / "broken.toml", broken)
    code = main(["--config", str(path), "doctor"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  clamd: cannot connect to clamd" in out and "is clamav-daemon running?" in out


def test_doctor_checks_a_postfix_source(capsys, healthy, config, postfix, tmp_path):
    path = write_config(tmp_path / "pf.toml", config, extra=f"""
[[source]]
name = "postfix"
type = "postfix-hold"
config_directory = "{postfix.config_dir}"
""")
    code = main(["--config", str(path), "doctor"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "source postfix: hold queue" in out and "header_checks" in out


def test_version_prints_the_signature_fingerprint(capsys, config_file):
    assert main(["--config", str(config_file), "version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spoolscan ") and "signature fingerprint ClamAV" in out


def _broken(tmp_path, config, extra="", **changes):
    cfg = replace(config, **changes) if changes else config
    return write_config(tmp_path / "broken.toml", cfg, extra=extra)


def test_doctor_flags_a_missing_quarantine_directory(capsys, config, tmp_path):
    code, out = doctor(capsys, _broken(tmp_path, config))
    assert code == 1 and "FAIL  quarantine" in out and "does not exist" in out
    assert "fix: install -d -m 0700" in out


def test_doctor_flags_globs_that_match_no_maildir(capsys, healthy, tmp_path):
    path = _broken(tmp_path, healthy, extra=f"""
[[source]]
name = "mailboxes"
type = "maildir"
paths = ["{tmp_path}/nowhere/*/Maildir"]
""")
    code, out = doctor(capsys, path)
    assert code == 1 and "FAIL  source mailboxes: no Maildir matches" in out


def test_doctor_flags_a_postfix_that_holds_nothing(capsys, healthy, postfix, tmp_path):
    (postfix.config_dir / "header_checks").write_text("/^Subject: x/ WARN\n")
    path = _broken(tmp_path, healthy, extra=f"""
[[source]]
name = "postfix"
type = "postfix-hold"
config_directory = "{postfix.config_dir}"
""")
    code, out = doctor(capsys, path)
    assert code == 1 and "Postfix puts nothing on hold" in out
    assert "fix: spoolscan setup postfix" in out


def test_doctor_flags_a_rule_that_shadows_the_hold_rule(capsys, healthy, postfix, tmp_path):
    (postfix.config_dir / "site").write_text("/^Received:/ DUNNO\n")
    postfix.postconf(header_checks=f"regexp:{postfix.config_dir}/site, "
                                   f"regexp:{postfix.config_dir}/header_checks")
    path = _broken(tmp_path, healthy, extra=f"""
[[source]]
name = "postfix"
type = "postfix-hold"
config_directory = "{postfix.config_dir}"
""")
    code, out = doctor(capsys, path)
    assert code == 1 and "site line 1" in out and "never held" in out


def test_doctor_flags_alert_exceeds_max_off(capsys, healthy, tmp_path):
    conf = tmp_path / "clamd.conf"
    conf.write_text(Path(healthy.clamd.config_file).read_text().replace(
        "AlertExceedsMax yes", "AlertExceedsMax no"))
    path = _broken(tmp_path, healthy, clamd=replace(healthy.clamd, config_file=str(conf)))
    code, out = doctor(capsys, path)
    assert code == 1 and "AlertExceedsMax is off" in out


def test_doctor_flags_signatures_whose_changes_cannot_be_seen(capsys, healthy, tmp_path):
    elsewhere = tmp_path / "not-clamds-db"
    elsewhere.mkdir()
    path = _broken(tmp_path, healthy, clamd=replace(healthy.clamd,
                                                    database_directory=str(elsewhere)))
    code, out = doctor(capsys, path)
    assert code == 1 and "rescans never run" in out and "database_directory" in out


def test_doctor_json_and_exit_2_for_an_invalid_configuration(capsys, healthy, config_file,
                                                            tmp_path):
    code, out = doctor(capsys, config_file, "--json")
    findings = json.loads(out)
    assert code == 0 and {f["status"] for f in findings} <= {"ok", "WARN"}
    assert {"check", "status", "message", "hint"} <= set(findings[0])
    bad = tmp_path / "bad.toml"
    bad.write_text("[schedule]\nnightly_rescan = \"99 * * * *\"\n")
    assert main(["doctor", "--config", str(bad)]) == 2  # global options after the command
    assert "nightly_rescan" in capsys.readouterr().err


def test_version_as_json(capsys, config_file):
    assert main(["--config", str(config_file), "version", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"].startswith("ClamAV") and info["spoolscan"]


def test_doctor_flags_notices_that_cannot_be_sent(capsys, healthy, tmp_path):
    path = _broken(tmp_path, healthy, extra="""
[notify]
admin = ["postmaster@example.org"]
sendmail = "/nonexistent/sendmail -t"
""")
    code, out = doctor(capsys, path)
    assert code == 1 and "FAIL  notify" in out and "not an executable program" in out
    assert "fix: install an MTA's sendmail" in out
