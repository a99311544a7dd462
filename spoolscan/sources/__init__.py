"""Where messages rest: one module per source, on a shared base (``base``).

* ``hold``: the Postfix hold queue (release, quarantine);
* ``maildir``: Maildir mailboxes (quarantine, delete).
"""

from __future__ import annotations

from spoolscan.broker import Broker
from spoolscan.config import Config, SourceConfig
from spoolscan.sources.base import Source
from spoolscan.store.repo import Store


def build_source(src: SourceConfig, config: Config, store: Store, broker: Broker) -> Source:
    """The Source object for one ``[[source]]`` table."""
    if src.type == "maildir":
        from spoolscan.sources.maildir import MaildirSource

        return MaildirSource(src, config, store, broker)
    if src.type == "postfix-hold":
        from spoolscan.sources.hold import HoldSource

        return HoldSource(src, config, store, broker)
    raise ValueError(f"unknown source type {src.type!r}")
