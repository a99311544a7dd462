"""What a sweep remembers while it lists a backlog: bounded, and never losing a message."""

from spoolscan.sources.base import Seen
from spoolscan.sources.hold import _lines


def identities(prefix: str, n: int) -> list[str]:
    return [f"host/{prefix}{i:07X}/1700000000{i:06d}/{i}" for i in range(n)]


def test_every_identity_a_sweep_saw_is_found():
    seen = Seen()
    listed = identities("A", 100_000)
    for identity in listed:
        seen.add(identity)
    assert all(identity in seen for identity in listed)


def test_an_identity_a_sweep_did_not_see_is_rarely_taken_for_seen():
    # Taken for seen, a vanished message is only marked gone by a later sweep.
    seen = Seen()
    for identity in identities("A", 100_000):
        seen.add(identity)
    mistaken = sum(identity in seen for identity in identities("B", 20_000))
    assert mistaken < 20_000 * 0.03


def test_an_identity_taken_for_seen_by_one_sweep_is_not_by_the_next():
    listed = identities("A", 100_000)
    first, second = Seen(), Seen()
    for identity in listed:
        first.add(identity)
        second.add(identity)
    mistaken = [i for i in identities("B", 20_000) if i in first]
    assert sum(i in second for i in mistaken) < len(mistaken) / 4


def test_the_names_of_a_backlog_are_read_one_at_a_time_in_order():
    assert list(_lines("")) == []
    assert list(_lines("0A1B2C3D4E")) == ["0A1B2C3D4E"]
    assert list(_lines("5/5F00D1\nA/A00B2\n0/0C\n")) == ["5/5F00D1", "A/A00B2", "0/0C"]
