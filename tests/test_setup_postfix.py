"""`spoolscan setup postfix` against a private Postfix: install, hold, uninstall."""

from pathlib import Path

import pytest
from mail import message

from spoolscan.postfix.setup import TABLE_NAME, setup_postfix
from spoolscan.testing.postfix import PostfixInstance


@pytest.fixture
def plain_postfix(tmp_path: Path):
    """A private Postfix that does not hold mail (no header_checks)."""
    instance = PostfixInstance(tmp_path / "pf", header_checks=())
    instance.start()
    instance.postconf(header_checks="")
    yield instance
    instance.stop()


def header_checks(pf) -> str:
    import subprocess

    return subprocess.run(["postconf", "-c", str(pf.config_dir), "-h", "header_checks"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_dry_run_changes_nothing(plain_postfix, capsys):
    assert setup_postfix(str(plain_postfix.config_dir), uninstall=False, dry_run=True,
                         yes=False) == 0
    assert header_checks(plain_postfix) == ""
    assert "postconf" in capsys.readouterr().out


def test_declining_changes_nothing(plain_postfix):
    code = setup_postfix(str(plain_postfix.config_dir), uninstall=False, dry_run=False,
                         yes=False, ask=lambda _: "n")
    assert code == 1 and header_checks(plain_postfix) == ""


def test_setup_makes_postfix_hold_mail_and_uninstall_undoes_it(plain_postfix):
    conf = plain_postfix.config_dir
    assert setup_postfix(str(conf), uninstall=False, dry_run=False, yes=True) == 0
    assert TABLE_NAME in header_checks(plain_postfix)
    assert list(conf.glob("main.cf.spoolscan-*"))  # backed up
    qid = plain_postfix.send(message(subject="held by setup"))
    assert plain_postfix.wait_held(1) == [qid]
    # Running it again is a no-op.
    assert setup_postfix(str(conf), uninstall=False, dry_run=False, yes=True) == 0

    assert setup_postfix(str(conf), uninstall=True, dry_run=False, yes=True) == 0
    assert header_checks(plain_postfix) == ""
    assert not (conf / TABLE_NAME).exists()


def test_existing_header_checks_are_kept(plain_postfix):
    conf = plain_postfix.config_dir
    (conf / "site_checks").write_text("/^Subject: spam/ REJECT\n")
    plain_postfix.postconf(header_checks=f"regexp:{conf}/site_checks")
    setup_postfix(str(conf), uninstall=False, dry_run=False, yes=True)
    assert header_checks(plain_postfix) == \
        f"regexp:{conf}/{TABLE_NAME}, regexp:{conf}/site_checks"
    setup_postfix(str(conf), uninstall=True, dry_run=False, yes=True)
    assert header_checks(plain_postfix) == f"regexp:{conf}/site_checks"
