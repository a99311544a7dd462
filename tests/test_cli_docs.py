"""The man page and the shell completion are generated from the argument parser."""

from pathlib import Path

from spoolscan.cli import build_parser, main
from spoolscan.manpage import render

SHIPPED = Path(__file__).parents[1] / "docs" / "spoolscan.1"


def test_the_shipped_man_page_is_the_one_the_parser_generates():
    assert SHIPPED.read_text() == render(build_parser()), "run `make man`"


def test_the_man_page_names_every_command_and_the_exit_codes():
    page = render(build_parser())
    for command in ("scan", "run", "rescan", "report", "quarantine release", "doctor"):
        assert f".SS {command}" in page
    assert ".SH EXIT STATUS" in page and "SIGHUP" in page


def test_bash_completion_knows_the_commands(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete" in script and "quarantine" in script and "--if-signatures-changed" in script
