"""`spoolscan report`: the canned reports run on SQLite and PostgreSQL."""

import csv
import io
import json

import pytest
from mail import eicar_message, message

from spoolscan.cli import main
from spoolscan.reports import REPORTS


@pytest.fixture
def scanned(capsys, config_file, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.eml").write_bytes(message())
    (tmp_path / "in" / "b.eml").write_bytes(eicar_message())
    main(["--config", str(config_file), "scan", str(tmp_path / "in")])
    capsys.readouterr()
    return config_file


def report(capsys, config_file, *args):
    code = main(["--config", str(config_file), "report", *args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_every_report_runs(capsys, scanned, name):
    code, out = report(capsys, scanned, name)
    assert code == 0 and "row" in out


def test_summary_counts_verdicts(capsys, scanned):
    _, out = report(capsys, scanned, "summary", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {(r["verdict"], r["scans"]) for r in rows} == {("clean", "1"), ("infected", "1")}


def test_infected_report_as_json(capsys, scanned):
    _, out = report(capsys, scanned, "infected", "--format", "json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["signature"] == "Spoolscan.Test.EICAR-NDB.UNOFFICIAL"


def test_since_excludes_older_scans(capsys, scanned):
    _, out = report(capsys, scanned, "summary", "--since", "1s", "--format", "csv")
    import time

    time.sleep(1.2)
    _, later = report(capsys, scanned, "summary", "--since", "1s", "--format", "csv")
    assert len(later.splitlines()) == 1  # the header only


def test_sql_format_prints_the_query(capsys, scanned):
    _, out = report(capsys, scanned, "infected", "--format", "sql")
    assert "FROM v_scans" in out


def test_html_output_to_a_file(capsys, scanned, tmp_path):
    target = tmp_path / "r.html"
    report(capsys, scanned, "signatures", "--format", "html", "--output", str(target))
    assert "<table" in target.read_text()
