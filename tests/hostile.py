"""A hostile mailbox owner for the tests: a spare uid with a Maildir of its own, a tree of
root's files it would like spoolscan to touch, and a way to run its commands.

The attacks run as that uid for real (``setpriv``), so the kernel lets them do exactly
what a local user could do: plant symlinks, FIFOs and hard links in their own mailbox,
swap directories for symlinks.  ``snapshot()`` records everything about a tree (type,
mode, owner, size, content digest, symlink target) so that a test can show that nothing
outside the mailbox and the quarantine store was created, changed or deleted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mail import chown_tree, make_maildir

from spoolscan.testing.clamd import EICAR

UID = GID = 4242  # no passwd entry needed: setpriv takes numbers


@dataclass
class Arena:
    """Everything a test needs: the attacker's mailbox, root's files, our store."""

    base: Path  # root-owned 0755; holds all of the below
    home: Path  # the attacker's home (theirs)
    maildir: Path  # their Maildir (theirs)
    sentinel: Path  # root's files the attacker targets (with symlinks, swaps...)
    store: Path  # spoolscan's quarantine directory

    def as_owner(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``script`` (sh) as the mailbox owner, in their home."""
        return subprocess.run(
            ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--",
             "/bin/sh", "-c", script],
            cwd=self.home, capture_output=True, text=True, check=check, timeout=30)

    def outside(self) -> dict[str, tuple]:
        """A snapshot of everything in the arena but the mailbox and the store."""
        return snapshot(self.base, skip=(self.home, self.store))


def make_arena() -> Arena:
    base = Path(tempfile.mkdtemp(prefix="spoolscan-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    home = base / "home" / "mallory"
    maildir = make_maildir(home / "Maildir", folders=(".Lists",))
    chown_tree(home, UID, GID)
    os.chmod(home, 0o700)
    sentinel = base / "sentinel"
    (sentinel / "run-parts").mkdir(parents=True)
    (sentinel / "run-parts" / "00-existing").write_text("#!/bin/sh\ntrue\n")
    (sentinel / "ssh").mkdir()
    (sentinel / "ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA root@host\n")
    os.chmod(sentinel / "ssh" / "authorized_keys", 0o600)
    # A root file whose content is "infected": spoolscan must never move or delete it,
    # whatever name or link leads to it.
    (sentinel / "infected-victim").write_bytes(b"Subject: root's file\n\n" + EICAR + b"\n")
    os.chmod(sentinel / "infected-victim", 0o600)
    for directory in (sentinel, sentinel / "run-parts", sentinel / "ssh"):
        os.chmod(directory, 0o755)
    return Arena(base, home, maildir, sentinel, base / "quarantine")


def remove_arena(arena: Arena) -> None:
    subprocess.run(["umount", "-q", str(arena.store)], check=False, capture_output=True)
    shutil.rmtree(arena.base, ignore_errors=True)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Type, mode, owner, size, inode, content digest and link target of everything
    under ``root`` (symlinks not followed), the paths in ``skip`` left out."""
    out: dict[str, tuple] = {}
    for path in _walk(root, skip):
        st = os.lstat(path)
        entry: tuple = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, st.st_ino)
        if stat.S_ISREG(st.st_mode):
            entry += (st.st_size, st.st_nlink, hashlib.sha256(path.read_bytes()).hexdigest())
        elif stat.S_ISLNK(st.st_mode):
            entry += (os.readlink(path),)
        out[str(path.relative_to(root))] = entry
    return out


def _walk(root: Path, skip: tuple[Path, ...]) -> Iterator[Path]:
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            if here / name not in skip:
                yield here / name


def files_under(root: Path) -> list[str]:
    """Relative paths of the regular files under ``root`` (symlinks not followed)."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(str(path.relative_to(root)))
    return sorted(found)
