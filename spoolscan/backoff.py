"""Back-off: when a message that could not be finished is tried again.

The only retry arithmetic in spoolscan: failed scans (``unchecked``, ``error``, unreadable
files) and failed actions (postsuper refused, quarantine store full) all wait
``retry_delay`` after the first failure, doubling with each further failure, capped at
one hour.  After ``max_attempts`` the message is flagged ``stuck`` and still tried at the
longest back-off, so mail kept while clamd was down flows once it is back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from spoolscan.config import PolicyConfig
from spoolscan.model import State

MAX_DELAY = 3600.0  # seconds


def retry_delay(policy: PolicyConfig, attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th consecutive failure."""
    seconds = policy.retry_delay * (2 ** max(0, min(attempts, 32) - 1))
    return timedelta(seconds=min(seconds, MAX_DELAY))


@dataclass(frozen=True)
class Retry:
    """The state after a failure, and when to try again."""

    state: State  # RETRY, or STUCK once max_attempts is reached
    attempts: int  # consecutive failures, this one included
    next_attempt_at: datetime

    @property
    def stuck(self) -> bool:
        return self.state == State.STUCK


def after_failure(policy: PolicyConfig, failures_before: int, now: datetime) -> Retry:
    """The retry plan after one more failure (``failures_before`` already happened)."""
    attempts = failures_before + 1
    if attempts >= policy.max_attempts:
        return Retry(State.STUCK, attempts, now + retry_delay(policy, policy.max_attempts))
    return Retry(State.RETRY, attempts, now + retry_delay(policy, attempts))
