"""Many hosts on one store: shards and sweep-only mailboxes, rescans split with leases,
three hosts with three Postfix instances sharing one verdict cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import running, wait_until
from mail import deliver, eicar_message, make_maildir, message

from spoolscan.config import ConfigError, SourceConfig, parse_config
from spoolscan.runner import build_worker


def test_shard_config():
    cfg = parse_config({"source": [{"name": "m", "type": "maildir", "paths": ["/x/*"],
                                    "shard": "2/4", "sweep_only": True}]})
    assert cfg.sources[0].shard == (2, 4) and cfg.sources[0].sweep_only
    for bad in ("0/4", "5/4", "2", "a/b", 2):
        with pytest.raises(ConfigError, match="shard"):
            parse_config({"source": [{"name": "m", "type": "maildir", "paths": ["/x/*"],
                                      "shard": bad}]})
    with pytest.raises(ConfigError, match="only for a maildir"):
        parse_config({"source": [{"name": "p", "type": "postfix-hold", "shard": "1/2"}]})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_shards_split_the_mailboxes_and_each_host_owns_only_its_share(config, store, tmp_path):
    root = tmp_path / "vmail"
    for i in range(24):
        make_maildir(root / f"user{i}" / "Maildir")
    pattern = str(root / "*" / "Maildir")
    shares = []
    for k in range(1, 5):
        src = SourceConfig(name="mailboxes", type="maildir", paths=(pattern,), shard=(k, 4))
        source = build_worker(replace(config, sources=(src,)), store).sources["mailboxes"]
        shares.append(set(source.roots()))
        for r in source.roots():
            assert source.owns({"identity": f"{r}/.Lists/unique1"})
    assert sum(len(s) for s in shares) == 24 and len(set().union(*shares)) == 24
    assert all(shares)  # a stable hash spreads 24 mailboxes over 4 shares
    other = next(iter(shares[1]))
    assert not source.owns({"identity": f"{other}/unique2"})  # not in shard 4's share
    assert not source.owns({"identity": "/elsewhere/Maildir/unique3"})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sweep_only_mailboxes_are_found_without_inotify(config, store, tmp_path):
    box = make_maildir(tmp_path / "vmail" / "alice" / "Maildir")
    src = SourceConfig(name="mailboxes", type="maildir", sweep_interval=0.3, sweep_only=True,
                       paths=(str(tmp_path / "vmail" / "*" / "Maildir"),))
    worker = build_worker(replace(config, sources=(src,)), store)
    with running(worker):
        bad = deliver(box, eicar_message())
        good = deliver(box, message(subject="stays"))
        wait_until(lambda: not bad.exists(), 15)
        assert worker.sources["mailboxes"].watched() == []
    assert good.exists()
