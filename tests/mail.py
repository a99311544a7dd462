"""Test messages: built with the standard library, written as Maildir files."""

from __future__ import annotations

import itertools
import os
from email.message import EmailMessage
from pathlib import Path

from spoolscan.testing.clamd import EICAR

_counter = itertools.count()


def message(subject: str = "hello", body: str = "Just a clean message.\n",
            attachment: bytes | None = None, filename: str = "file.bin",
            sender: str = "alice@example.net", to: str = "bob@example.org",
            headers: dict[str, str] | None = None) -> bytes:
    msg = EmailMessage()
    for name, value in (headers or {}).items():
        msg[name] = value
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{next(_counter)}.{os.getpid()}@test.example>"
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream",
                           filename=filename)
    return bytes(msg)


def eicar_message(subject: str = "invoice") -> bytes:
    return message(subject=subject, body="See attachment.\n", attachment=EICAR,
                   filename="eicar.com")


def make_maildir(root: Path, folders: tuple[str, ...] = (),
                 owner: tuple[int, int] | None = None) -> Path:
    """A Maildir (and Maildir++ folders); ``owner``: (uid, gid) to give it to."""
    for folder in ("", *folders):
        base = root / folder if folder else root
        for sub in ("tmp", "new", "cur"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        if folder:
            (base / "maildirfolder").touch()
    if owner is not None:
        chown_tree(root, *owner)
    return root


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def deliver(maildir: Path, content: bytes, *, subdir: str = "new", flags: str = "",
            folder: str = "", unique: str | None = None) -> Path:
    """Deliver like an MDA: write to tmp/, then rename into new/ or cur/."""
    base = maildir / folder if folder else maildir
    unique = unique or f"1700000000.M{next(_counter)}P{os.getpid()}.test,S={len(content)}"
    tmp = base / "tmp" / unique
    tmp.write_bytes(content)
    st = os.stat(maildir)  # an MDA writes as the mailbox owner
    os.chown(tmp, st.st_uid, st.st_gid)
    name = unique + (f":2,{flags}" if subdir == "cur" else "")
    target = base / subdir / name
    os.rename(tmp, target)
    return target
