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
    assert str(err.value) == (f"[clamd] timeout must be a duration such as '30s' (a bare "
                              f"number is seconds), got 'abc' in {path}")


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
                                                 ("2G", 2 * 2**30), ("123B", 123),
                                                 ("50MB", 50 * 2**20), ("4MiB", 4 * 2**20)])
def test_sizes_are_parsed(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("7d", 604800), ("90m", 5400), ("30", 30),
                                                ("2w", 1209600)])
def test_durations_are_parsed(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "-1", "5x", "0", 50, "50", 0])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_a_bare_number_as_a_size_is_refused_with_the_key_named(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[policy]\nmax_size = 50\n")
    with pytest.raises(ConfigError, match=r"\[policy\] max_size must be a size with its unit"):
        load_config(path, environ={})


def test_durations_are_accepted_everywhere_in_one_syntax(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[clamd]\ntimeout = "30s"\n[policy]\nretry_delay = "2m"\n')
    config = load_config(path, environ={})
    assert (config.clamd.timeout, config.policy.retry_delay) == (30.0, 120.0)


@pytest.mark.parametrize(("expr", "why"), [("61 * * * *", "minute"), ("* 24 * * *", "hour"),
                                           ("* * * * funday", "day of week"),
                                           ("*/0 * * * *", "step"), ("* * *", "five fields")])
def test_bad_cron_expressions_are_refused_at_load_with_the_key_named(tmp_path, expr, why):
    path = tmp_path / "c.toml"
    path.write_text(f'[schedule]\nnightly_rescan = "{expr}"\n')
    with pytest.raises(ConfigError, match=r"\[schedule\] nightly_rescan") as err:
        load_config(path, environ={})
    assert why in str(err.value)


def test_good_cron_expressions_pass():
    from spoolscan.config import check_cron

    for expr in ("*/10 * * * *", "30 2 * * 1-5", "0 3 * jan,jul sun", "15 3 1,15 * *",
                 "0 0 * * 7"):
        assert check_cron(expr) == expr
