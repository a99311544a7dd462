"""``python -m spoolscan``: the spoolscan command."""

from spoolscan.cli import entry

entry()
