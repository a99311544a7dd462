"""spoolscan: scan mail where it rests (Postfix hold queue, Maildir stores) with clamd."""

__version__ = "0.1.0"
