"""A one-line progress bar for long runs, on a terminal only."""

from __future__ import annotations

import time
from typing import TextIO

_WIDTH = 24


class ProgressBar:
    """Draws ``label [#####.....] 45% 900/2000 812/s extra`` on ``stream`` (stderr), at
    most five times a second; does nothing unless ``stream`` is a terminal."""

    def __init__(self, stream: TextIO, total: int | None = None, label: str = "") -> None:
        self.stream = stream
        self.total = total
        self.label = label
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self.offset = 0  # added to every count given to update()
        self._last = 0.0

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        done += self.offset
        rate = done / max(now - self.started, 1e-6)
        if self.total:
            share = min(1.0, done / self.total)
            filled = int(share * _WIDTH)
            bar = f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {share:4.0%} {done}/{self.total}"
        else:
            bar = f"{done}"
        text = " ".join(p for p in (self.label, bar, f"{rate:.0f}/s", extra) if p)
        self.stream.write(f"\r\x1b[K{text}")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
