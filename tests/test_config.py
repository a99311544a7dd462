"""Configuration: defaults, the example file, overrides and error messages."""

from pathlib import Path

import pytest

from spoolscan.config import ConfigError, load_config, parse_duration, parse_size

REPO = Path(__file__).resolve().parent.parent


def test_built_in_defaults_apply_without_a_file(tmp_path):
    config = load_config(None, environ={})
    assert config.database.url.startswith("sqlite:///")
    assert config.clamd.socket == "/var/run/clamav/clamd.ctl"
    assert config.policy.on_error == "hold" and config.policy.on_unchecked == "hold"


def test_example_config_is_valid():
    config = load_config(REPO / "spoolscan.example.toml", environ={})
    assert [s.type for s in config.sources] == ["postfix-hold", "maildir"]
    assert config.policy.max_size == 50 * 1024 * 1024
    assert config.schedule.rescan_window == 7 * 86400


def test_error_names_the_key_the_value_and_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[clamd]\ntimeout = "abc"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value) == (f"[clamd] timeout must be a positive number, got 'abc' "
                              f"in {path}")


def test_unknown_key_is_an_error_that_lists_known_keys(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[policy]\nmax_attemps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_attemps'.*max_attempts"):
        load_config(path, environ={})


def test_invalid_choice_lists_the_choices(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[policy]\non_error = "pass"\n')
    with pytest.raises(ConfigError, match="on_error must be one of 'hold', 'release'"):
        load_config(path, environ={})


def test_broken_toml_is_reported_with_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[clamd\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path, environ={})


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_config_file_comes_from_environment(tmp_path):
    path = tmp_path / "env.toml"
    path.write_text("[clamd]\nconcurrency = 7\n")
    assert load_config(None, environ={"SPOOLSCAN_CONFIG": str(path)}).clamd.concurrency == 7


def test_database_url_is_overridden_by_environment(tmp_path):
    path = tmp_path / "db.toml"
    path.write_text('[database]\nurl = "sqlite:////tmp/a.db"\n')
    config = load_config(path, environ={"SPOOLSCAN_DATABASE_URL": "sqlite:////tmp/b.db"})
    assert config.database.url == "sqlite:////tmp/b.db"


def test_maildir_source_needs_paths(tmp_path):
    path = tmp_path / "src.toml"
    path.write_text('[[source]]\nname = "mb"\ntype = "maildir"\n')
    with pytest.raises(ConfigError, match="paths is required"):
        load_config(path, environ={})


def test_duplicate_source_names_are_rejected(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text('[[source]]\nname = "a"\ntype = "postfix-hold"\n'
                    '[[source]]\nname = "a"\ntype = "postfix-hold"\n')
    with pytest.raises(ConfigError, match="two sources named 'a'"):
        load_config(path, environ={})


@pytest.mark.parametrize(("text", "expected"), [("50M", 50 * 2**20), ("1k", 1024),
                                                 ("2G", 2 * 2**30), (123, 123)])
def test_sizes_are_parsed(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("7d", 604800), ("90m", 5400), ("30", 30),
                                                ("2w", 1209600)])
def test_durations_are_parsed(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "-1", "5x", "0"])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_size(bad)
