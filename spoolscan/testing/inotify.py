"""Lowering the kernel's inotify queue length for a test, one test at a time.

``fs.inotify.max_queued_events`` is machine-wide and read when an inotify instance is
made.  Tests that lower it to provoke an overflow hold a lock for the short while it is
lowered: two of them overlapping (``make test`` runs test files in parallel) would
otherwise restore each other's lowered value and leave it low for everything after.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
_LOCK = Path("/tmp/spoolscan-tests-inotify.lock")


@contextlib.contextmanager
def lowered_queue(events: int) -> Iterator[str]:
    """``max_queued_events`` set to ``events`` inside the block (inotify instances made
    there keep it), restored after; yields the value it had."""
    with open(_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = MAX_QUEUED_EVENTS.read_text().strip()
        MAX_QUEUED_EVENTS.write_text(f"{events}\n")
        try:
            yield saved
        finally:
            MAX_QUEUED_EVENTS.write_text(saved + "\n")
