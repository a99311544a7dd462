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
    before = (plain_postfix.config_dir / "main.cf").read_bytes()
    assert setup_postfix(str(plain_postfix.config_dir), uninstall=False, dry_run=True,
                         yes=False) == 0
    assert header_checks(plain_postfix) == ""
    assert (plain_postfix.config_dir / "main.cf").read_bytes() == before
    assert "append to" in capsys.readouterr().out


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


def test_the_sites_rules_still_fire_ours_too_and_uninstall_restores_the_bytes(
        plain_postfix, capsys):
    conf = plain_postfix.config_dir
    (conf / "site_checks").write_text("/^Subject:.*spam/ REJECT no spam here\n"
                                      "/^Subject:.*tagme/ PREPEND X-Site: tagged\n")
    plain_postfix.postconf(header_checks=f"regexp:{conf}/site_checks")
    main_cf = (conf / "main.cf").read_bytes()
    table = (conf / "site_checks").read_bytes()

    assert setup_postfix(str(conf), uninstall=False, dry_run=False, yes=True) == 0
    # The site's table first, ours last: the site's rules decide first.
    assert header_checks(plain_postfix) == \
        f"regexp:{conf}/site_checks, regexp:{conf}/{TABLE_NAME}"
    assert "WARNING" not in capsys.readouterr().out
    with pytest.raises(Exception, match="no spam here"):  # the site's REJECT still fires
        plain_postfix.send(message(subject="buy spam"))
    qid = plain_postfix.send(message(subject="please tagme"))
    assert plain_postfix.wait_held(1) == [qid]  # ...and ours holds what they let through
    assert b"X-Site: tagged" in plain_postfix.postcat(qid)

    assert setup_postfix(str(conf), uninstall=True, dry_run=False, yes=True) == 0
    assert (conf / "main.cf").read_bytes() == main_cf  # byte for byte
    assert (conf / "site_checks").read_bytes() == table
    assert not (conf / TABLE_NAME).exists()


def test_a_site_rule_that_would_keep_mail_from_being_held_is_named(plain_postfix, capsys):
    conf = plain_postfix.config_dir
    (conf / "site_checks").write_text("# log every relay\n/^Received:/ WARN relayed\n")
    plain_postfix.postconf(header_checks=f"regexp:{conf}/site_checks")
    assert setup_postfix(str(conf), uninstall=False, dry_run=True, yes=False) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "site_checks line 2" in out and "never held" in out
