"""`spoolscan scan`: verdicts, JSON shape, exit codes, the store, the cache."""

import json
import os
import subprocess
import sys

from mail import deliver, eicar_message, make_maildir, message
from sqlalchemy import text

from spoolscan.cli import main
from spoolscan.store.repo import Store

JSON_FIELDS = {"path", "verdict", "signature", "sha256", "size", "duration_ms", "cached"}


def run_scan(capsys, config_file, *args):
    code = main(["--config", str(config_file), "scan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def mixed_maildir(root):
    """Clean, infected and oversize mail, in the inbox and a Maildir++ folder."""
    make_maildir(root, folders=(".Lists",))
    paths = {
        "clean": deliver(root, message()),
        "infected": deliver(root, eicar_message(), subdir="cur", flags="S"),
        "oversize": deliver(root, message(body="y" * (3 * 1024 * 1024 + 100))),
        "folder-infected": deliver(root, eicar_message("list"), folder=".Lists"),
    }
    # `spoolscan scan` reads every regular file under the paths it is given: nothing can
    # hide in tmp/ or next to new/ and cur/ (the worker, by contrast, never looks in tmp/).
    paths["in-tmp"] = root / "tmp" / "in-progress"
    paths["in-tmp"].write_bytes(eicar_message())
    paths["marker"] = root / ".Lists" / "maildirfolder"
    return paths


def test_json_over_a_maildir_gives_each_verdict_and_exit_1(capsys, config_file, tmp_path,
                                                          db_url):
    paths = mixed_maildir(tmp_path / "Maildir")
    code, out, _ = run_scan(capsys, config_file, "--json", str(tmp_path / "Maildir"))
    results = {r["path"]: r for r in json_lines(out)}
    assert code == 1
    assert len(results) == 6
    verdicts = {name: results[str(p)]["verdict"] for name, p in paths.items()}
    assert verdicts == {"clean": "clean", "infected": "infected", "oversize": "unchecked",
                        "folder-infected": "infected", "in-tmp": "infected",
                        "marker": "clean"}
    for r in results.values():
        assert set(r) >= JSON_FIELDS
    assert results[str(paths["infected"])]["signature"] == "Spoolscan.Test.EICAR-NDB.UNOFFICIAL"
    assert results[str(paths["clean"])]["signature"] is None
    assert results[str(paths["clean"])]["sha256"] and results[str(paths["clean"])]["size"] > 0

    store = Store.open(db_url)
    with store.engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT location, verdict FROM v_scans")).all())
    store.close()
    assert rows == {str(p): verdicts[name] for name, p in paths.items()}


def test_all_clean_exits_0(capsys, config_file, tmp_path):
    make_maildir(tmp_path / "M")
    deliver(tmp_path / "M", message())
    code, out, _ = run_scan(capsys, config_file, str(tmp_path / "M"))
    assert code == 0
    assert ": OK" in out and "1 clean" in out


def test_clamd_unreachable_exits_2(capsys, config, tmp_path):
    from dataclasses import replace

    from conftest import write_config

    broken = replace(config, clamd=replace(config.clamd, socket=str(tmp_path / "none.sock")))
    path = write_config(tmp_path / "broken.toml", broken)
    (tmp_path / "f.eml").write_bytes(message())
    code, out, _ = run_scan(capsys, path, str(tmp_path / "f.eml"))
    assert code == 2
    assert "ERROR (cannot connect to clamd" in out


def test_missing_path_exits_2(capsys, config_file, tmp_path):
    code, out, _ = run_scan(capsys, config_file, str(tmp_path / "nope"))
    assert code == 2


def test_second_identical_file_is_served_from_the_cache(capsys, config_file, tmp_path, clamd):
    a, b = tmp_path / "a.eml", tmp_path / "b.eml"
    a.write_bytes(eicar_message("same"))
    run_scan(capsys, config_file, "--json", str(a))
    before = clamd.scan_count()
    b.write_bytes(a.read_bytes())
    code, out, _ = run_scan(capsys, config_file, "--json", str(b))
    (result,) = json_lines(out)
    assert code == 1
    assert result["cached"] is True and result["verdict"] == "infected"
    assert clamd.scan_count() == before  # clamd was not asked again


def test_no_cache_scans_again(capsys, config_file, tmp_path, clamd):
    a = tmp_path / "a.eml"
    a.write_bytes(message(subject="nocache"))
    run_scan(capsys, config_file, str(a))
    code, out, _ = run_scan(capsys, config_file, "--json", "--no-cache", str(a))
    assert json_lines(out)[0]["cached"] is False


def test_copies_in_one_run_cost_one_clamd_scan(capsys, config_file, tmp_path, clamd):
    content = message(subject="one scan only")
    (tmp_path / "copies").mkdir()
    for i in range(20):
        (tmp_path / "copies" / f"copy{i}.eml").write_bytes(content)
    before = clamd.scan_count()
    code, out, _ = run_scan(capsys, config_file, "--json", str(tmp_path / "copies"))
    assert code == 0 and len(json_lines(out)) == 20
    assert clamd.scan_count() - before == 1


def test_no_store_writes_nothing(capsys, config_file, tmp_path, db_url):
    (tmp_path / "x.eml").write_bytes(message())
    run_scan(capsys, config_file, "--no-store", str(tmp_path / "x.eml"))
    store = Store.open(db_url)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM scans")).scalar() == 0
    store.close()


def test_symlinks_inside_a_directory_are_not_followed(capsys, config_file, tmp_path):
    outside = tmp_path / "outside.eml"
    outside.write_bytes(eicar_message())
    inbox = tmp_path / "dir"
    inbox.mkdir()
    os.symlink(outside, inbox / "link.eml")
    (inbox / "real.eml").write_bytes(message())
    code, out, _ = run_scan(capsys, config_file, "--json", str(inbox))
    assert [r["path"] for r in json_lines(out)] == [str(inbox / "real.eml")]
    assert code == 0


def test_odd_maildir_names_are_scanned(capsys, config_file, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    odd = deliver(root, eicar_message(), subdir="cur", flags="FRS",
                  unique="1700000000.M1P2.host: with spaces, ünïcode,S=5")
    code, out, _ = run_scan(capsys, config_file, "--json", str(root))
    assert json_lines(out)[0]["path"] == str(odd) and code == 1


def test_config_error_exits_2_and_names_the_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[clamd]\nconcurrency = 0\n")
    code = main(["--config", str(bad), "scan", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "[clamd] concurrency must be a positive integer, got 0" in err


def test_console_script_runs(config_file, tmp_path):
    (tmp_path / "m.eml").write_bytes(eicar_message())
    result = subprocess.run([sys.executable, "-m", "spoolscan", "--config", str(config_file),
                             "scan", str(tmp_path / "m.eml")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Spoolscan.Test.EICAR-NDB.UNOFFICIAL FOUND" in result.stdout


def test_cached_verdicts_are_stamped_with_the_signature_fingerprint(capsys, config_file,
                                                                    tmp_path, db_url):
    (tmp_path / "copies").mkdir()
    content = message(subject="stamped")
    for i in range(5):
        (tmp_path / "copies" / f"c{i}.eml").write_bytes(content)
    run_scan(capsys, config_file, str(tmp_path / "copies"))
    store = Store.open(db_url)
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT cached, fingerprint FROM scans")).all()
    store.close()
    assert len(rows) == 5 and any(cached for cached, _ in rows)
    assert all(fp and fp.startswith("ClamAV") for _, fp in rows)


def test_usage_errors_exit_2_as_clamdscan(capsys, config_file):
    import pytest as _pytest

    with _pytest.raises(SystemExit) as exit_:
        main(["--config", str(config_file), "rescan", "--since", "soon"])
    assert exit_.value.code == 2
    assert "not a duration" in capsys.readouterr().err


def test_a_message_of_a_configured_source_is_recorded_once(capsys, config, tmp_path, store):
    """`spoolscan scan` of mail a Maildir source tracks uses that source's row, so the
    worker (and a rescan) do not see the message twice."""
    from conftest import write_config

    from spoolscan.runner import build_worker

    root = make_maildir(tmp_path / "vmail" / "u" / "Maildir")
    path = deliver(root, message())
    config_file = write_config(tmp_path / "src.toml", config, extra=(
        f'\n[[source]]\nname = "mailboxes"\ntype = "maildir"\n'
        f'paths = ["{tmp_path}/vmail/*/Maildir"]\n'))
    code, _, _ = run_scan(capsys, config_file, str(root))
    assert code == 0
    from spoolscan.config import load_config

    build_worker(load_config(config_file), store).run_once()
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT source, identity, state FROM messages")).all()
    assert [tuple(r) for r in rows] == [
        ("mailboxes", f"{root}/{path.name}", "done")]


def test_infected_and_no_summary_print_only_what_is_not_clean(capsys, config_file, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    deliver(root, message())
    bad = deliver(root, eicar_message())
    code, out, _ = run_scan(capsys, config_file, "--infected", "--no-summary", str(root))
    assert code == 1
    (line,) = out.splitlines()
    assert str(bad) in line and "FOUND" in line


def test_infected_and_no_summary_print_nothing_when_all_is_clean(capsys, config_file,
                                                                 tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    deliver(root, message())
    code, out, err = run_scan(capsys, config_file, "-q", "-i", "--no-summary", str(root))
    assert (code, out, err) == (0, "", "")
