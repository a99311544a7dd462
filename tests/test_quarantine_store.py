"""The quarantine store's own files: what a write killed midway leaves is cleaned up."""

from __future__ import annotations

import io
from pathlib import Path

from spoolscan.fsutil import temp_name
from spoolscan.quarantine.store import MESSAGE, META, QuarantineStore


def test_a_write_killed_midway_leaves_nothing_once_the_message_is_quarantined_or_removed(
        tmp_path: Path):
    qstore = QuarantineStore(str(tmp_path / "quarantine"))
    qstore.prepare()
    path = qstore.path_for(7, 11)
    entry = Path(path).parent
    entry.mkdir(parents=True, mode=0o700)
    leftover = entry / temp_name()  # a SIGKILL while the copy was being written
    leftover.write_bytes(b"half a mess")

    assert qstore.put(path, io.BytesIO(b"Subject: x\n\nbody\n"), {"queue_id": "ABC"}) == 17
    assert sorted(p.name for p in entry.iterdir()) == sorted([MESSAGE, META])

    (entry / temp_name()).write_bytes(b"another")
    assert qstore.remove(path)
    assert not entry.exists()
