"""The content hash: equal for copies of one delivery, different for any real change."""

import io

from mail import message

from spoolscan.content import content_hash

BASE = message(subject="list post", body="Hello list.\n")


def digest(data: bytes) -> str:
    return content_hash(io.BytesIO(data))[0]


def delivered(data: bytes, rcpt: str) -> bytes:
    return (f"Return-Path: <list-bounces@example.net>\nDelivered-To: {rcpt}\n"
            f"X-Original-To: <{rcpt}>\n").encode() + data


def test_copies_for_different_recipients_hash_the_same():
    assert digest(delivered(BASE, "a@example.org")) == digest(delivered(BASE, "b@example.org"))


def test_copy_hashes_like_the_undelivered_message():
    assert digest(delivered(BASE, "a@example.org")) == digest(BASE)


def test_crlf_delivery_headers_are_left_out_too():
    a = b"Delivered-To: a@example.org\r\n" + BASE
    b = b"Delivered-To: b@example.org\r\n" + BASE
    assert digest(a) == digest(b)


def test_changed_subject_changes_the_hash():
    other = BASE.replace(b"Subject: list post", b"Subject: list p0st")
    assert digest(delivered(other, "a@example.org")) != digest(delivered(BASE, "a@example.org"))


def test_changed_body_changes_the_hash():
    assert digest(BASE + b"x") != digest(BASE)


def test_changed_mime_header_changes_the_hash():
    with_attachment = message(attachment=b"data", filename="a.txt")
    renamed = with_attachment.replace(b'filename="a.txt"', b'filename="a.exe"')
    assert digest(renamed) != digest(with_attachment)


def test_trace_header_with_text_is_hashed():
    # Only single addresses are left out: text a signature could match is always hashed.
    a = b"Delivered-To: some text here\n" + BASE
    b = b"Delivered-To: other text here\n" + BASE
    assert digest(a) != digest(b)


def test_folded_trace_header_is_hashed():
    a = b"Delivered-To: a@example.org\n  continued\n" + BASE
    b = b"Delivered-To: a@example.org\n  different\n" + BASE
    assert digest(a) != digest(b)


def test_trace_header_after_another_header_is_hashed():
    a = b"Subject: x\nDelivered-To: a@example.org\n\nbody\n"
    b = b"Subject: x\nDelivered-To: b@example.org\n\nbody\n"
    assert digest(a) != digest(b)


def test_size_is_the_full_content_size():
    data = delivered(BASE, "a@example.org")
    assert content_hash(io.BytesIO(data))[1] == len(data)


def test_large_content_is_hashed_in_chunks():
    data = b"Subject: big\n\n" + b"x" * (3 * 1024 * 1024)
    digest_, size = content_hash(io.BytesIO(data))
    assert size == len(data)


def test_the_hash_does_not_depend_on_how_the_stream_is_read():
    """A queue file's content stream returns one record at a time: short reads."""
    data = b"Return-Path: <a@example.org>\nDelivered-To: b@example.org\nSubject: x\n\nbody\n"

    class OneByteAtATime(io.RawIOBase):
        def __init__(self) -> None:
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return self.inner.read(1)

    assert content_hash(OneByteAtATime()) == content_hash(io.BytesIO(data))
