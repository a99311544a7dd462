"""The policy: (scan result, where the message rests, what the store knew) → what to do.

Fail closed by default: ``unchecked`` and ``error`` keep the mail where it is and retry
with back-off (``spoolscan.backoff``); after ``max_attempts`` the message is flagged
``stuck`` and still kept.  Mail is released despite such a verdict only when the
configuration says so (``on_unchecked`` / ``on_error = "release"``).

A message an admin released from quarantine (state ``released``) is never quarantined
again for the signature it was released from, whatever triggers the scan (its arrival
back in the mailbox, a sweep, a rescan, a restart).  A *different* signature is new
information and is acted on as usual.

A held message that carries the ticket of an admin's release from quarantine (the
re-injected copy, see ``spoolscan.quarantine.commands``) is released whatever its verdict:
the store matched the ticket to the envelope it was issued for and consumed it.  Its
delivered copies (same content) are left in the mailboxes, marked released.
"""

from __future__ import annotations

from datetime import datetime

from spoolscan.backoff import after_failure
from spoolscan.config import PolicyConfig
from spoolscan.model import Action, Decision, Prior, ScanResult, State, Verdict


def decide(result: ScanResult, *, held: bool, prior: Prior | None, policy: PolicyConfig,
           now: datetime) -> Decision:
    """Decide what to do with a message after ``result``.

    ``held``: the message waits in the Postfix hold queue (clean mail is released), as
    opposed to resting in a mailbox (clean mail is left alone).  ``prior``: the stored
    row before this scan (None for a message never seen).
    """
    kept = Action.HOLD if held else Action.LEAVE
    if prior is not None and prior.release is not None:
        # The copy an admin re-injected to release it from quarantine (held), or that
        # copy delivered (in a mailbox): let through whatever this scan says, the admin
        # saw the verdict and chose.
        r = prior.release
        why = (f"{result.verdict}{f' ({result.signature})' if result.signature else ''}; "
               f"released from quarantine by {r.requested_by} (message {r.original_id}, "
               f"release {r.id})")
        if held:
            return Decision(Action.RELEASE, State.ACTING, why)
        return Decision(Action.LEAVE, State.RELEASED, why)
    released = prior is not None and prior.state == State.RELEASED
    if result.verdict == Verdict.CLEAN:
        if held:
            return Decision(Action.RELEASE, State.ACTING, "clean")
        return Decision(Action.LEAVE, State.RELEASED if released else State.DONE, "clean")

    if result.verdict == Verdict.INFECTED:
        if released and prior is not None and prior.signature == result.signature:
            return Decision(kept, State.RELEASED, f"infected ({result.signature}); released "
                                                  "from quarantine by an admin, left alone")
        choice = Action(policy.on_infected)
        if choice == Action.HOLD:
            return Decision(kept, State.DONE,
                            f"infected ({result.signature}); on_infected = hold")
        return Decision(choice, State.VERDICT, f"infected ({result.signature})")

    choice = Action(policy.on_unchecked if result.verdict == Verdict.UNCHECKED
                    else policy.on_error)
    key = "on_unchecked" if result.verdict == Verdict.UNCHECKED else "on_error"
    why = result.detail or result.signature or result.verdict.value
    if choice == Action.RELEASE:
        if held:
            return Decision(Action.RELEASE, State.ACTING,
                            f"{result.verdict} ({why}); {key} = release")
        return Decision(Action.LEAVE, State.DONE, f"{result.verdict} ({why}); {key} = release")

    retry = after_failure(policy, prior.attempts if prior else 0, now)
    if retry.stuck:
        # Flagged for an admin and kept; still tried now and then at the longest back-off,
        # so that mail stuck because clamd was down flows once it is back.
        where = "held" if held else "in place"
        return Decision(kept, State.STUCK, f"{result.verdict} ({why}); gave up after "
                                           f"{retry.attempts} attempts, kept {where}",
                        next_attempt_at=retry.next_attempt_at)
    return Decision(kept, State.RETRY, f"{result.verdict} ({why}); attempt {retry.attempts} "
                                       f"of {policy.max_attempts}",
                    next_attempt_at=retry.next_attempt_at)
