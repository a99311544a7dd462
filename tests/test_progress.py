"""The progress bar: drawn on a terminal, silent elsewhere."""

import io

from spoolscan.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_the_share_done_on_a_terminal():
    out = Terminal()
    bar = ProgressBar(out, total=200, label="scan")
    bar.update(100, "3 infected", force=True)
    text = out.getvalue()
    assert "scan [############............]  50% 100/200" in text and "3 infected" in text


def test_without_a_total_it_counts():
    out = Terminal()
    ProgressBar(out, label="rescan").update(42, force=True)
    assert "rescan 42 " in out.getvalue()


def test_nothing_is_drawn_when_not_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(out, total=10)
    bar.update(5, force=True)
    bar.clear()
    assert out.getvalue() == ""
