"""`spoolscan doctor` and `spoolscan version`."""

from dataclasses import replace

from conftest import write_config

from spoolscan.cli import main


def test_doctor_passes_with_a_working_setup(capsys, config_file):
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


def test_doctor_checks_a_postfix_source(capsys, config, postfix, tmp_path):
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
