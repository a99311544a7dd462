"""The policy: (verdict, where the message rests, attempts so far) → what to do.

Fail closed by default: ``unchecked`` and ``error`` keep the mail where it is and retry
with back-off; after ``max_attempts`` the message is flagged ``stuck`` and still kept.
Mail is released despite such a verdict only when the configuration says so
(``on_unchecked`` / ``on_error = "release"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from spoolscan.config import PolicyConfig
from spoolscan.scanner import CLEAN, ERROR, INFECTED, UNCHECKED, Verdict
from spoolscan.store.repo import ACTING, DONE, RETRY, STUCK

# Actions
RELEASE = "release"  # hold queue: postsuper -H, then postqueue -i
QUARANTINE = "quarantine"  # copy away, then remove from where it was
DELETE = "delete"
HOLD = "hold"  # hold queue: keep it held
LEAVE = "leave"  # Maildir: leave it where it is


@dataclass(frozen=True)
class Decision:
    action: str
    state: str  # the message's state once the verdict is committed
    reason: str
    next_attempt_at: datetime | None = None

    @property
    def acts(self) -> bool:
        """True if the source must do something to the mail."""
        return self.action in (RELEASE, QUARANTINE, DELETE)


def retry_delay(policy: PolicyConfig, attempts: int) -> timedelta:
    """Back-off before attempt ``attempts + 1``: retry_delay doubling, capped at 1 hour."""
    seconds = policy.retry_delay * (2 ** max(0, attempts - 1))
    return timedelta(seconds=min(seconds, 3600.0))


def decide(verdict: Verdict, *, held: bool, attempts: int, policy: PolicyConfig,
           now: datetime) -> Decision:
    """Decide what to do with a message after ``verdict``.

    ``held``: the message waits in the Postfix hold queue (clean mail is released), as
    opposed to resting in a mailbox (clean mail is left alone).  ``attempts``: how many
    scans of it have already failed (unchecked/error) before this one.
    """
    kept = HOLD if held else LEAVE
    if verdict.verdict == CLEAN:
        return Decision(RELEASE, ACTING, "clean") if held else Decision(LEAVE, DONE, "clean")

    if verdict.verdict == INFECTED:
        choice = policy.on_infected
        if choice == HOLD:
            return Decision(kept, DONE, f"infected ({verdict.signature}); on_infected = hold")
        return Decision(choice, ACTING, f"infected ({verdict.signature})")

    choice = policy.on_unchecked if verdict.verdict == UNCHECKED else policy.on_error
    key = "on_unchecked" if verdict.verdict == UNCHECKED else "on_error"
    why = verdict.detail or verdict.signature or verdict.verdict
    if choice == RELEASE:
        if held:
            return Decision(RELEASE, ACTING, f"{verdict.verdict} ({why}); {key} = release")
        return Decision(LEAVE, DONE, f"{verdict.verdict} ({why}); {key} = release")

    assert verdict.verdict in (UNCHECKED, ERROR)
    attempts_now = attempts + 1
    if attempts_now >= policy.max_attempts:
        # Flagged for an admin and kept; still tried now and then at the longest back-off,
        # so that mail stuck because clamd was down flows once it is back.
        where = "held" if held else "in place"
        return Decision(kept, STUCK, f"{verdict.verdict} ({why}); gave up after "
                                     f"{attempts_now} attempts, kept {where}",
                        next_attempt_at=now + retry_delay(policy, policy.max_attempts))
    return Decision(kept, RETRY, f"{verdict.verdict} ({why}); attempt {attempts_now} of "
                                 f"{policy.max_attempts}",
                    next_attempt_at=now + retry_delay(policy, attempts_now))
