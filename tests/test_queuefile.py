"""Specification of spoolscan.postfix.queuefile, the native Postfix queue file reader.

Part 1 compares the reader with Postfix itself on files written by a real (private)
Postfix: the content must equal ``postcat -bh`` byte for byte and the envelope must agree
with ``postqueue -j``.  Part 2 feeds it synthetic and damaged files.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import tracemalloc
from collections.abc import Callable, Iterable
from email.message import EmailMessage
from pathlib import Path

import pytest

from spoolscan.postfix.queuefile import (
    READ_CHUNK,
    QueueFile,
    QueueFileError,
    QueueFileNotReady,
)
from spoolscan.testing.postfix import LOCAL_DOMAIN, MILTER_BODY, PostfixInstance

INSTANCES = ["postfix_instance", "postfix_long_ids"]
RCPT = f"rcpt@{LOCAL_DOMAIN}"


# =========================================================================== part 1: real


def _plain() -> dict:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.com>"
    msg["To"] = RCPT
    msg["Subject"] = "plain message"
    msg.set_content("Hello,\n\nthis is a plain message.\n")
    return {"message": msg}


def _attachment() -> dict:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = RCPT
    msg["Subject"] = "with attachment"
    msg.set_content("See the attachment.\n")
    payload = random.Random(7).randbytes(150_000)
    msg.add_attachment(payload, maintype="application", subtype="octet-stream",
                       filename="data.bin")
    return {"message": msg}


def _long_lines() -> dict:
    lines = [b"x" * 5000, b"y" * 2048, b"z" * 2049, b"w" * 4096, b"short", b"v" * 3000]
    raw = (b"From: sender@example.com\r\nTo: " + RCPT.encode() + b"\r\n"
           b"Subject: long lines\r\nX-Long: " + b"h" * 2500 + b"\r\n\r\n"
           + b"\r\n".join(lines))  # no newline after the last line: Postfix adds one
    return {"message": raw}


def _eight_bit() -> dict:
    raw = ("From: Jörg <jörg@exämple.com>\r\nTo: bjørn@" + LOCAL_DOMAIN + "\r\n"
           "Subject: Grüße aus Köln – ☃\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           "\r\nÄpfel, Birnen und Öl. ☃☃☃\r\n").encode() + b"latin-1 bytes: \xe9\xe8\xff\r\n"
    return {"message": raw, "sender": "jörg@exämple.com",
            "recipients": [f"bjørn@{LOCAL_DOMAIN}", RCPT], "smtputf8": True}


def _many_recipients() -> dict:
    msg = _plain()["message"]
    return {"message": msg, "recipients": [f"r{i:02d}@{LOCAL_DOMAIN}" for i in range(50)]}


def _null_sender() -> dict:
    return {"message": _plain()["message"], "sender": ""}


def _header_checks() -> dict:
    raw = (b"From: sender@example.com\r\nTo: " + RCPT.encode() + b"\r\n"
           b"Subject: please prepend-me\r\nX-Replace-Me: old value\r\n\r\nbody\r\n")
    return {"message": raw}


def _edge_lines() -> dict:
    raw = (b"From: sender@example.com\r\nTo: " + RCPT.encode() + b"\r\nSubject: edges\r\n\r\n"
           b".leading dot\r\n..two dots\r\ntrailing spaces   \r\n\r\n\r\n\ttab\r\nlast")
    return {"message": raw}


def _milter_edits() -> dict:
    msg = _plain()["message"]
    msg["X-Test-Milter"] = "headers rcpts body"
    return {"message": msg, "recipients": [RCPT, f"drop1@{LOCAL_DOMAIN}", f"bob@{LOCAL_DOMAIN}"]}


def _milter_unterminated_body() -> dict:
    msg = _plain()["message"]
    msg["X-Test-Milter"] = "unterminated-body"
    return {"message": msg}


KINDS: dict[str, Callable[[], dict]] = {
    "plain": _plain,
    "attachment": _attachment,
    "long_lines": _long_lines,
    "eight_bit": _eight_bit,
    "many_recipients": _many_recipients,
    "null_sender": _null_sender,
    "header_checks": _header_checks,
    "edge_lines": _edge_lines,
    "milter_edits": _milter_edits,
    "milter_unterminated_body": _milter_unterminated_body,
}
REAL_CASES = [
    pytest.param(instance, kind, id=f"{kind}-{'short' if instance == INSTANCES[0] else 'long'}")
    for instance in INSTANCES
    for kind in KINDS
    # Only the short-ID instance runs the test milter.
    if not (kind.startswith("milter") and instance == "postfix_long_ids")
]


@pytest.fixture(scope="module")
def held() -> Callable[[PostfixInstance, str], str]:
    """``held(instance, kind) -> queue ID``: sends each kind of message once per instance."""
    sent: dict[tuple[int, str], str] = {}

    def get(instance: PostfixInstance, kind: str) -> str:
        key = (id(instance), kind)
        if key not in sent:
            sent[key] = instance.send(**KINDS[kind]())
        return sent[key]

    return get


def _postqueue_entry(instance: PostfixInstance, queue_id: str) -> dict:
    out = subprocess.run(["postqueue", "-c", str(instance.config_dir), "-j"],
                         capture_output=True, check=True).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return next(e for e in entries if e["queue_id"] == queue_id)


def _verbose_postcat(instance: PostfixInstance, queue_id: str) -> str:
    """postcat -v shows pointer records and marks L records as unterminated_text."""
    return instance.postcat(queue_id, "-v", "-e", "-b", "-h").decode(errors="replace")


@pytest.mark.parametrize(("instance_name", "kind"), REAL_CASES)
def test_content_equals_postcat_output(request, held, instance_name, kind):
    instance = request.getfixturevalue(instance_name)
    queue_id = held(instance, kind)
    with QueueFile.open(instance.held_path(queue_id)) as qf, qf.content() as stream:
        assert stream.read() == instance.postcat(queue_id)


@pytest.mark.parametrize(("instance_name", "kind"), REAL_CASES)
def test_message_size_is_the_length_of_the_content(request, held, instance_name, kind):
    instance = request.getfixturevalue(instance_name)
    queue_id = held(instance, kind)
    with QueueFile.open(instance.held_path(queue_id)) as qf:
        assert qf.envelope.message_size == len(instance.postcat(queue_id))


@pytest.mark.parametrize(("instance_name", "kind"), REAL_CASES)
def test_envelope_agrees_with_postqueue(request, held, instance_name, kind):
    instance = request.getfixturevalue(instance_name)
    queue_id = held(instance, kind)
    entry = _postqueue_entry(instance, queue_id)
    with QueueFile.open(instance.held_path(queue_id)) as qf:
        env = qf.envelope
    assert env.queue_id == queue_id
    # postqueue -j shows the null sender as "MAILER-DAEMON"; the queue file has "".
    assert (env.sender or "MAILER-DAEMON") == entry["sender"]
    assert list(env.recipients) == [r["address"] for r in entry["recipients"]]
    assert int(env.arrival_time) == entry["arrival_time"]
    assert env.content_size == entry["message_size"]


@pytest.mark.parametrize("instance_name", INSTANCES)
def test_chunked_reads_return_the_same_bytes_as_one_read(request, held, instance_name):
    instance = request.getfixturevalue(instance_name)
    queue_id = held(instance, "attachment")
    with QueueFile.open(instance.held_path(queue_id)) as qf, qf.content() as stream:
        parts = []
        while chunk := stream.read(977):
            assert len(chunk) <= 977
            parts.append(chunk)
    assert b"".join(parts) == instance.postcat(queue_id)


def test_long_lines_are_stored_as_continuation_records(postfix_long_ids, held):
    queue_id = held(postfix_long_ids, "long_lines")
    assert "unterminated_text:" in _verbose_postcat(postfix_long_ids, queue_id)
    with QueueFile.open(postfix_long_ids.held_path(queue_id)) as qf:
        lines = qf.content().read().split(b"\n")
    assert b"x" * 5000 in lines and b"v" * 3000 in lines


def test_milter_edits_are_read_through_pointer_records(postfix_instance, held):
    queue_id = held(postfix_instance, "milter_edits")
    verbose = _verbose_postcat(postfix_instance, queue_id)
    targets = [int(line.split(":")[1]) for line in verbose.splitlines()
               if line.startswith("pointer_record:")]
    assert any(targets), "expected real (non-zero) pointer records"
    with QueueFile.open(postfix_instance.held_path(queue_id)) as qf:
        content = qf.content().read()
        recipients = qf.envelope.recipients
    header, _, body = content.partition(b"\n\n")
    assert header.split(b"\n")[3] == b"X-Milter-Inserted: second header"
    assert b"\nSubject: [milter] plain message\n" in header
    assert header.endswith(b"\nX-Milter-Added: last header")
    assert body == MILTER_BODY.replace(b"\r\n", b"\n")
    # drop1 was deleted by the milter (a '/' record), milter-added was appended.
    assert recipients == (RCPT, f"bob@{LOCAL_DOMAIN}", f"milter-added@{LOCAL_DOMAIN}")


def test_a_milter_instance_leaves_placeholder_pointers_that_are_skipped(postfix_instance, held):
    queue_id = held(postfix_instance, "plain")
    verbose = _verbose_postcat(postfix_instance, queue_id)
    assert re.search(r"^pointer_record: +0$", verbose, re.MULTILINE)
    with QueueFile.open(postfix_instance.held_path(queue_id)) as qf:
        assert b"this is a plain message." in qf.content().read()


def test_header_checks_edits_appear_in_the_content(postfix_instance, held):
    queue_id = held(postfix_instance, "header_checks")
    with QueueFile.open(postfix_instance.held_path(queue_id)) as qf:
        content = qf.content().read()
    assert b"X-Prepended: by header_checks\nSubject: please prepend-me\n" in content
    assert b"X-Replaced: by header_checks\n" in content
    assert b"X-Replace-Me" not in content


def test_null_sender_is_an_empty_string(postfix_long_ids, held):
    with QueueFile.open(postfix_long_ids.held_path(held(postfix_long_ids, "null_sender"))) as qf:
        assert qf.envelope.sender == ""


def test_utf8_addresses_are_decoded(postfix_long_ids, held):
    with QueueFile.open(postfix_long_ids.held_path(held(postfix_long_ids, "eight_bit"))) as qf:
        assert qf.envelope.sender == "jörg@exämple.com"
        assert qf.envelope.recipients == (f"bjørn@{LOCAL_DOMAIN}", RCPT)


def test_long_queue_ids_are_taken_from_the_file_name(postfix_long_ids, held):
    queue_id = held(postfix_long_ids, "plain")
    assert len(queue_id) >= 12 and "z" in queue_id  # ...usec 'z' inode
    with QueueFile.open(postfix_long_ids.held_path(queue_id)) as qf:
        assert qf.queue_id == queue_id == qf.envelope.queue_id


@pytest.mark.parametrize("instance_name", INSTANCES)
def test_envelope_exposes_smtp_client_attributes(request, held, instance_name):
    instance = request.getfixturevalue(instance_name)
    queue_id = held(instance, "plain")
    with QueueFile.open(instance.held_path(queue_id)) as qf:
        env = qf.envelope
        st = qf.stat
    assert env.client_address == env.log_client_address == "127.0.0.1"
    assert env.helo_name == "client.example.org"
    assert env.attributes["rewrite_context"] == "local"
    assert env.create_time is not None and abs(env.create_time - env.arrival_time) < 5
    assert env.nrcpt == 1
    assert st.st_mode & 0o777 == 0o700


# =========================================================================== part 2: synthetic


def rec(rtype: str, data: bytes | str = b"") -> bytes:
    """One record: type byte, length in 7-bit groups (least significant first), data."""
    if isinstance(data, str):
        data = data.encode()
    return rec_header(rtype, len(data)) + data


def rec_header(rtype: str, length: int) -> bytes:
    out = bytearray(rtype.encode("latin-1"))
    while True:
        low, length = length & 0x7F, length >> 7
        out.append(low | 0x80 if length else low)
        if not length:
            return bytes(out)


def ptr(target: int) -> bytes:
    return rec("p", f"{target:15d}")


ENVELOPE = (
    rec("T", "1700000000 123456"),
    rec("A", "create_time=1700000000"),
    rec("A", "client_address=192.0.2.1"),
    rec("S", "sender@example.com"),
    rec("O", "rcpt@example.org"),
    rec("R", "rcpt@example.org"),
)
CONTENT = (rec("N", "Subject: test"), rec("N", ""), rec("N", "body"))


def size_record_length(fields: int) -> int:
    return len(rec("C", b"0" * (16 * fields - 1)))


def queue_file(
    envelope: Iterable[bytes] = ENVELOPE,
    content: Iterable[bytes] | Callable[[int], Iterable[bytes]] = CONTENT,
    extracted: Iterable[bytes] = (),
    *,
    fields: int = 6,
    tail: bytes = b"",
    end: bytes | None = None,
) -> bytes:
    """A well-formed queue file.  ``content`` may be a function of the data offset (to
    place pointers); ``tail`` is appended after the ``E`` record (pointer targets)."""
    env = b"".join(envelope)
    data_offset = size_record_length(fields) + len(env) + len(rec("M"))
    body = b"".join(content(data_offset) if callable(content) else content)
    values = [len(body), data_offset, 1, 0, len(body), 0][:fields]
    size = rec("C", " ".join(f"{v:15d}" for v in values))
    end_rec = rec("E") if end is None else end
    return size + env + rec("M") + body + rec("X") + b"".join(extracted) + end_rec + tail


@pytest.fixture
def hold_dir(tmp_path: Path) -> Path:
    hold = tmp_path / "hold"
    hold.mkdir()
    return hold


def write(hold_dir: Path, data: bytes, name: str = "ABC123", mode: int = 0o700) -> Path:
    path = hold_dir / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


def read_all(path: Path) -> bytes:
    with QueueFile.open(path) as qf, qf.content() as stream:
        return stream.read()


# --------------------------------------------------------------------------- well-formed


def test_a_minimal_file_yields_its_lines_and_envelope(hold_dir):
    path = write(hold_dir, queue_file())
    with QueueFile.open(path) as qf:
        env = qf.envelope
        assert qf.content().read() == b"Subject: test\n\nbody\n"
    assert env.queue_id == "ABC123"
    assert env.arrival_time == 1700000000.123456
    assert env.sender == "sender@example.com"
    assert env.recipients == ("rcpt@example.org",)
    assert env.client_address == "192.0.2.1"
    assert env.create_time == 1700000000
    assert env.message_size == len(b"Subject: test\n\nbody\n")


def test_continuation_records_join_into_one_line(hold_dir):
    content = (rec("L", "abc"), rec("L", "def"), rec("N", "ghi"), rec("N", "next"))
    assert read_all(write(hold_dir, queue_file(content=content))) == b"abcdefghi\nnext\n"


def test_a_continuation_record_right_before_X_leaves_the_line_open(hold_dir):
    # postcat -bh output has no newline here: its "\\n" at X is never flushed.
    content = (rec("N", "a"), rec("L", "unterminated"))
    path = write(hold_dir, queue_file(content=content))
    with QueueFile.open(path) as qf:
        assert qf.content().read() == b"a\nunterminated"
        assert qf.envelope.message_size == len(b"a\nunterminated")


def test_padding_records_and_placeholder_pointers_are_skipped(hold_dir):
    content = (rec("N", "a"), rec("w", "  0"), rec("p", "0"), ptr(0), rec("N", "b"))
    envelope = (*ENVELOPE, ptr(0), rec("w", "0"))
    assert read_all(write(hold_dir, queue_file(envelope, content))) == b"a\nb\n"


def test_pointers_are_followed_in_the_content(hold_dir):
    # Like a milter-inserted header: a placeholder pointer is patched to point at a record
    # appended after E, which points back to the record after the placeholder.
    plain = queue_file(content=(rec("N", "one"), ptr(0), rec("N", "three")))
    ptr_at = plain.index(ptr(0))
    back_to = ptr_at + len(ptr(0))
    patched = plain[:ptr_at] + ptr(len(plain)) + plain[back_to:]
    data = patched + rec("N", "two") + ptr(back_to)
    assert read_all(write(hold_dir, data)) == b"one\ntwo\nthree\n"


def test_a_size_record_with_five_fields_is_accepted(hold_dir):
    path = write(hold_dir, queue_file(fields=5))
    with QueueFile.open(path) as qf:
        assert qf.content().read() == b"Subject: test\n\nbody\n"


def test_pending_recipients_are_R_records_not_done_or_cancelled(hold_dir):
    envelope = (*ENVELOPE[:4],
                rec("O", "a@example.org"), rec("D", "a@example.org"),   # delivered
                rec("O", "b@example.org"), rec("/", "b@example.org"),   # cancelled
                rec("O", "c@example.org"), rec("R", "c@example.org"))   # pending
    extracted = (rec("R", "from-header@example.org"), rec("D", "done@example.org"))
    path = write(hold_dir, queue_file(envelope, extracted=extracted))
    with QueueFile.open(path) as qf:
        assert qf.envelope.recipients == ("c@example.org", "from-header@example.org")


def test_the_null_sender_is_an_empty_string(hold_dir):
    envelope = (rec("T", "1700000000 5"), rec("S", ""), rec("R", "x@example.org"))
    with QueueFile.open(write(hold_dir, queue_file(envelope))) as qf:
        assert qf.envelope.sender == ""
        assert qf.envelope.arrival_time == 1700000000.000005


def test_unknown_envelope_record_types_are_ignored(hold_dir):
    envelope = (*ENVELOPE, rec("~", "from a future Postfix"), rec("W", f"{0:15d}"))
    with QueueFile.open(write(hold_dir, queue_file(envelope))) as qf:
        assert qf.envelope.recipients == ("rcpt@example.org",)


def test_records_after_E_are_ignored(hold_dir):
    assert read_all(write(hold_dir, queue_file(tail=rec("N", "junk")))).endswith(b"body\n")


def test_the_content_stream_outlives_the_queue_file(hold_dir):
    with QueueFile.open(write(hold_dir, queue_file())) as qf:
        stream = qf.content()
    assert stream.readable()
    buf = bytearray(5)
    assert stream.readinto(memoryview(buf)) == 5 and bytes(buf) == b"Subje"
    assert stream.read() == b"ct: test\n\nbody\n"
    stream.close()


def test_the_content_stream_can_be_rewound_but_not_moved_elsewhere(hold_dir):
    import io

    with QueueFile.open(write(hold_dir, queue_file())) as qf, qf.content() as stream:
        first = stream.read()
        assert stream.tell() == len(first)
        assert stream.seek(0) == 0 and stream.read() == first
        with pytest.raises(io.UnsupportedOperation):
            stream.seek(3)


def test_a_closed_queue_file_has_no_content(hold_dir):
    qf = QueueFile.open(write(hold_dir, queue_file()))
    qf.close()
    with pytest.raises(ValueError):
        qf.content()


def test_memory_does_not_grow_with_message_size(hold_dir):
    line = b"A" * 1000
    content = [rec("N", line)] * 8000 + [rec("N", b"B" * 3_000_000)]  # ~11 MB
    path = write(hold_dir, queue_file(content=content))
    tracemalloc.start()
    try:
        total = 0
        with QueueFile.open(path) as qf, qf.content() as stream:
            while chunk := stream.read(READ_CHUNK):
                total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 8000 * 1001 + 3_000_001
    assert peak < 1_000_000, f"peak {peak} bytes"


# --------------------------------------------------------------------------- hostile


def test_a_file_without_E_is_rejected(hold_dir):
    with pytest.raises(QueueFileError, match=r"no end record 'E'.*incomplete or corrupt"):
        QueueFile.open(write(hold_dir, queue_file(end=b"")))


def test_a_file_not_starting_with_C_is_rejected(hold_dir):
    data = queue_file()
    data = data[size_record_length(6):]  # drop the C record
    with pytest.raises(QueueFileError, match=r"first record is type 'T'"):
        QueueFile.open(write(hold_dir, data))


def test_an_empty_file_is_rejected(hold_dir):
    with pytest.raises(QueueFileError, match="empty file"):
        QueueFile.open(write(hold_dir, b""))


def test_a_pointer_loop_in_the_content_is_rejected(hold_dir):
    data = queue_file(content=lambda data_offset: [rec("N", "a"), ptr(data_offset)])
    with pytest.raises(QueueFileError, match="pointer loop"):
        QueueFile.open(write(hold_dir, data))


def test_a_pointer_loop_in_the_envelope_is_rejected(hold_dir):
    first_envelope_record = size_record_length(6)
    data = queue_file(envelope=(*ENVELOPE, ptr(first_envelope_record)))
    with pytest.raises(QueueFileError, match="pointer loop"):
        QueueFile.open(write(hold_dir, data))


def test_a_pointer_to_itself_is_rejected(hold_dir):
    data = queue_file(content=lambda data_offset: [ptr(data_offset)])
    with pytest.raises(QueueFileError, match="pointer loop"):
        QueueFile.open(write(hold_dir, data))


def test_a_pointer_past_the_end_of_the_file_is_rejected(hold_dir):
    data = queue_file(content=(rec("N", "a"), ptr(10**9)))
    with pytest.raises(QueueFileError, match="points past end of file"):
        QueueFile.open(write(hold_dir, data))


def test_a_malformed_pointer_is_rejected(hold_dir):
    data = queue_file(content=(rec("N", "a"), rec("p", "12ab")))
    with pytest.raises(QueueFileError, match="malformed pointer"):
        QueueFile.open(write(hold_dir, data))


def test_an_absurd_record_length_is_rejected_without_allocating(hold_dir):
    data = queue_file(content=(rec("N", "a"), rec_header("N", 2**40), b"short"))
    with pytest.raises(QueueFileError, match="more than 5 length bytes"):
        QueueFile.open(write(hold_dir, data))


def test_a_length_beyond_the_end_of_the_file_is_truncation(hold_dir):
    data = queue_file(content=(rec("N", "a"), rec_header("N", 2**34), b"short"))
    with pytest.raises(QueueFileError, match=r"wants 17179869184 bytes"):
        QueueFile.open(write(hold_dir, data))


def test_truncation_errors_name_file_offset_type_and_sizes(hold_dir):
    data = queue_file(content=(rec_header("N", 400) + b"x" * 37,))
    offset = data.index(rec_header("N", 400))
    path = write(hold_dir, data[: offset + len(rec_header("N", 400)) + 37])
    with pytest.raises(QueueFileError) as info:
        QueueFile.open(path)
    assert str(info.value) == (
        f"hold/ABC123: truncated record at offset {offset} (type 'N', wants 400 bytes, 37 left)"
    )


def test_truncation_at_every_offset_raises_queue_file_error(postfix_instance, held, hold_dir):
    # A real file with placeholder and real pointers, appended records, w padding.
    real = postfix_instance.held_path(held(postfix_instance, "milter_edits")).read_bytes()
    path = write(hold_dir, b"")
    for cut in range(len(real)):
        path.write_bytes(real[:cut])
        with pytest.raises(QueueFileError):
            read_all(path)
    path.write_bytes(real)
    assert read_all(path) == postfix_instance.postcat(held(postfix_instance, "milter_edits"))


def test_truncation_of_a_long_line_file_raises_queue_file_error(postfix_long_ids, held, hold_dir):
    real = postfix_long_ids.held_path(held(postfix_long_ids, "long_lines")).read_bytes()
    path = write(hold_dir, b"")
    cuts = sorted({*range(0, 1500), *range(1500, len(real), 37), len(real) - 1})
    for cut in cuts:
        path.write_bytes(real[:cut])
        with pytest.raises(QueueFileError):
            read_all(path)


def test_truncation_after_open_raises_from_read(hold_dir):
    content = [rec("N", b"L" * 1000)] * 300
    path = write(hold_dir, queue_file(content=content))
    with QueueFile.open(path) as qf, qf.content() as stream:
        os.truncate(path, 150_000)
        with pytest.raises(QueueFileError, match="truncated record"):
            stream.read()
        with pytest.raises(QueueFileError):  # and it stays failed
            stream.read(10)


def test_content_that_does_not_end_where_C_says_is_rejected(hold_dir):
    data = bytearray(queue_file())
    fields = data[2:97].split()
    fields[0] = b"%15d" % (int(fields[0]) + 1)
    data[2:97] = b" ".join(b"%15d" % int(f) for f in fields)
    with pytest.raises(QueueFileError, match="ends with 'X' at offset 247, but the size record"):
        QueueFile.open(write(hold_dir, bytes(data)))


def test_a_data_offset_that_is_not_after_M_is_rejected(hold_dir):
    data = bytearray(queue_file(fields=6))
    fields = data[2:97].split()
    fields[1] = b"%15d" % (int(fields[1]) - 2)
    data[2:97] = b" ".join(b"%15d" % int(f) for f in fields)
    with pytest.raises(QueueFileError, match="'M' record ends at"):
        QueueFile.open(write(hold_dir, bytes(data)))


def test_a_foreign_record_inside_the_content_is_rejected(hold_dir):
    data = queue_file(content=(rec("N", "a"), rec("R", "x@example.org")))
    with pytest.raises(QueueFileError, match=r"unexpected record type 'R' .* message content"):
        QueueFile.open(write(hold_dir, data))


def test_content_records_inside_the_envelope_are_rejected(hold_dir):
    data = queue_file(envelope=(*ENVELOPE, rec("E")))
    with pytest.raises(QueueFileError, match=r"type 'E' .* in the envelope"):
        QueueFile.open(write(hold_dir, data))


def test_a_file_without_sender_is_rejected(hold_dir):
    envelope = [r for r in ENVELOPE if not r.startswith(b"S")]
    with pytest.raises(QueueFileError, match="no sender record 'S'"):
        QueueFile.open(write(hold_dir, queue_file(envelope)))


def test_a_file_without_arrival_time_is_rejected(hold_dir):
    envelope = [r for r in ENVELOPE if not r.startswith(b"T")]
    with pytest.raises(QueueFileError, match="no arrival time record 'T'"):
        QueueFile.open(write(hold_dir, queue_file(envelope)))


def test_a_file_still_being_written_is_not_ready(hold_dir):
    with pytest.raises(QueueFileNotReady, match="embryonic"):
        QueueFile.open(write(hold_dir, queue_file(), mode=0o600))


def test_a_file_marked_corrupt_is_rejected(hold_dir):
    with pytest.raises(QueueFileError, match="marked corrupt by Postfix") as info:
        QueueFile.open(write(hold_dir, queue_file(), mode=0o400))
    assert not isinstance(info.value, QueueFileNotReady)


@pytest.mark.parametrize("mode", [0o740, 0o710, 0o744])
def test_ready_files_may_carry_the_group_flag_bits(hold_dir, mode):
    with QueueFile.open(write(hold_dir, queue_file(), mode=mode)) as qf:
        assert qf.envelope.sender == "sender@example.com"


def test_a_symlink_is_not_followed(hold_dir):
    target = write(hold_dir, queue_file(), name="REAL1")
    (hold_dir / "LINK1").symlink_to(target)
    with pytest.raises(QueueFileError, match="symbolic link"):
        QueueFile.open(hold_dir / "LINK1")


def test_a_directory_is_rejected(hold_dir):
    (hold_dir / "DIR1").mkdir(mode=0o700)
    with pytest.raises(QueueFileError, match="a directory"):
        QueueFile.open(hold_dir / "DIR1")


def test_a_fifo_is_rejected_without_blocking(hold_dir):
    os.mkfifo(hold_dir / "FIFO1", 0o700)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            QueueFile.open(hold_dir / "FIFO1")
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "open() blocked on a FIFO"
    assert isinstance(outcome[0], QueueFileError)
    assert "not a regular file" in str(outcome[0])


def test_a_missing_file_raises_file_not_found(hold_dir):
    with pytest.raises(FileNotFoundError):
        QueueFile.open(hold_dir / "GONE1")


def test_a_body_replaced_without_final_newline_still_ends_with_one(postfix_instance, held):
    # A milter replaced the body with text that does not end in a newline: cleanup(8)
    # stores that last line as a normal 'N' record, so the content ends with "\n".
    queue_id = held(postfix_instance, "milter_unterminated_body")
    assert "regular_text: last line\n" in _verbose_postcat(postfix_instance, queue_id)
    with QueueFile.open(postfix_instance.held_path(queue_id)) as qf:
        assert qf.content().read().endswith(b"newline:\nlast line\n")


def test_without_the_content_check_bad_content_is_found_while_reading(hold_dir):
    bad = (rec("N", "Subject: test"), rec("R", "not content"), rec("N", "body"))
    path = write(hold_dir, queue_file(content=bad))
    with pytest.raises(QueueFileError):
        QueueFile.open(path)
    with QueueFile.open(path, check_content=False) as qf, qf.content() as stream:
        assert qf.envelope.message_size is None
        with pytest.raises(QueueFileError):
            stream.read()


@pytest.mark.parametrize("lines", [10, 40_000])  # replayed from memory; decoded again
def test_a_rewound_stream_gives_the_same_content_small_or_large(hold_dir, lines):
    from spoolscan.postfix.queuefile import REPLAY_LIMIT

    body = [rec("N", f"line {i} of the message") for i in range(lines)]
    with QueueFile.open(write(hold_dir, queue_file(content=body))) as qf, \
            qf.content() as stream:
        half = stream.read(100)
        stream.seek(0)  # rewound before the end: read from the file again
        first = stream.read()
        assert first.startswith(half)
        assert (len(first) > REPLAY_LIMIT) == (lines > 10)
        stream.seek(0)
        assert stream.read() == first
        stream.seek(0)
        assert stream.read() == first
