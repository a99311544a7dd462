"""Fuzzing the parsers of untrusted input (Hypothesis): any input gives a result or the
module's own error, never another exception, never a hang, in bounded memory.

* the Postfix queue-file reader, seeded with real queue files from the test Postfix
  (pointer records from the test milter, long lines, 8-bit text...): truncation at every
  offset, bit flips, inserted and duplicated ranges, huge record lengths, pointer loops;
* Maildir file names and the storage rule for text;
* the content hash and the header values read with it;
* the clamd reply parser.

``make test`` runs a few hundred examples per target (derandomized, so CI is
reproducible); ``make fuzz`` runs ``SPOOLSCAN_FUZZ_EXAMPLES`` (100,000) per target with
random seeds and prints examples per second at the end.
"""

from __future__ import annotations

import io
import os
import re
import time
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_queuefile import KINDS, ptr, rec_header

from spoolscan.clamd import parse_reply
from spoolscan.content import content_hash
from spoolscan.fsutil import UnsafeFile, check_name
from spoolscan.mailbox import Location, unique_part
from spoolscan.model import Verdict
from spoolscan.postfix import queuefile
from spoolscan.postfix.queuefile import QueueFile, QueueFileError
from spoolscan.text import escape, printable, unescape

EXAMPLES = int(os.environ.get("SPOOLSCAN_FUZZ_EXAMPLES", "300"))
FUZZING = "SPOOLSCAN_FUZZ_EXAMPLES" in os.environ
# Hypothesis slows down as one run grows very long: a long fuzz is many runs of at most
# 5,000 examples, each from a fresh random seed.
BATCH = min(EXAMPLES, 5000)
BATCHES = pytest.mark.parametrize("batch", range(max(1, -(-EXAMPLES // BATCH))))
SETTINGS = settings(max_examples=BATCH, deadline=None, database=None,
                    derandomize=not FUZZING,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
MEMORY_LIMIT = 32 * 1024 * 1024  # bytes a single example may allocate at its peak
TIME_LIMIT = 5.0  # seconds a single example may take

#: target name → [examples, seconds in the target, first start, last end] (monotonic);
#: printed by conftest's terminal summary
RESULTS: dict[str, list[float]] = {}


def measured(name: str) -> Callable:  # type: ignore[type-arg]
    """Count examples and time per target, and hold each example to the time limit."""

    def wrap(check: Callable) -> Callable:  # type: ignore[type-arg]
        def run(*args: object) -> None:
            started = time.monotonic()
            check(*args)
            ended = time.monotonic()
            elapsed = ended - started
            stats = RESULTS.setdefault(name, [0, 0.0, started, ended])
            stats[0] += 1
            stats[1] += elapsed
            stats[3] = ended
            assert elapsed < TIME_LIMIT, f"{name}: one example took {elapsed:.1f}s"
        return run
    return wrap


# --- the queue-file reader -------------------------------------------------------------------


@pytest.fixture(scope="session")
def seeds(postfix_instance) -> list[bytes]:
    """Real queue files: one of each kind of message the queue-file tests know."""
    ids = [postfix_instance.send(**make()) for make in KINDS.values()]
    postfix_instance.wait_held(len(ids))
    return [postfix_instance.held_path(qid).read_bytes() for qid in ids]


def _read_all(data: bytes) -> None:
    """Open ``data`` as a queue file and read all its content: QueueFileError or a result."""
    fd = os.memfd_create("queuefile")
    os.write(fd, data)
    os.fchmod(fd, 0o700)  # ready, as cleanup leaves it
    try:
        qf = QueueFile.from_fd(os.dup(fd), "hold/ABCDEF", check_content=False)
    except QueueFileError:
        return
    finally:
        os.close(fd)
    with qf, qf.content() as stream:
        try:
            while stream.read(64 * 1024):
                pass
        except QueueFileError:
            return


def _bounded(data: bytes) -> None:
    tracemalloc.start()
    try:
        _read_all(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak} bytes at the peak"


def _record_starts(data: bytes) -> list[int]:
    """Offsets of the records, as far as they can be walked."""
    starts, pos = [], 0
    while pos < len(data) and len(starts) < 10_000:
        starts.append(pos)
        length, shift, i = 0, 0, pos + 1
        while i < len(data):
            byte = data[i]
            length |= (byte & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if not byte & 0x80:
                break
        pos = i + length
    return starts


def mutate(data: bytes, ops: list[tuple]) -> bytes:  # type: ignore[type-arg]
    buf = bytearray(data)
    for op, a, b, extra in ops:
        if not buf:
            break
        a %= len(buf)
        if op == "flip":
            buf[a] ^= 1 << (b % 8)
        elif op == "insert":
            buf[a:a] = extra
        elif op == "duplicate":
            length = b % 256
            buf[a:a] = buf[a:a + length]
        elif op == "truncate":
            del buf[a:]
        elif op == "huge_length":  # a record claiming to be enormous
            starts = _record_starts(bytes(buf))
            start = starts[b % len(starts)]
            buf[start + 1:start + 2] = rec_header("x", 0x7FFFFFFF)[1:]
        elif op == "pointer_loop":  # a pointer to itself (or to an earlier record)
            starts = _record_starts(bytes(buf))
            start = starts[b % len(starts)]
            target = starts[a % len(starts)] if starts else 0
            buf[start:start] = ptr(min(target, start))
    return bytes(buf)


OPS = st.lists(st.tuples(st.sampled_from(["flip", "insert", "duplicate", "truncate",
                                          "huge_length", "pointer_loop"]),
                         st.integers(0, 1 << 20), st.integers(0, 1 << 20),
                         st.binary(max_size=64)), min_size=1, max_size=8)


def test_queue_files_cut_at_every_offset_are_refused_cleanly(seeds):
    for seed in seeds:
        for end in range(len(seed)):
            _read_all(seed[:end])


@BATCHES
@SETTINGS
@given(index=st.integers(0, 1000), ops=OPS)
def test_mutated_queue_files_give_a_result_or_a_queue_file_error(seeds, batch, index, ops):
    measured("queue file reader")(_bounded)(mutate(seeds[index % len(seeds)], ops))


def _read_result(data: bytes, read_chunk: int, shortcuts: bool) -> tuple:  # type: ignore[type-arg]
    """What reading ``data`` as a queue file gives with buffers of ``read_chunk`` bytes,
    with or without the reader's in-buffer shortcuts: the envelope and content, or the
    error message."""
    saved = queuefile.READ_CHUNK, queuefile.SHORTCUTS
    queuefile.READ_CHUNK, queuefile.SHORTCUTS = read_chunk, shortcuts
    fd = os.memfd_create("queuefile")
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o700)
        try:
            qf = QueueFile.from_fd(os.dup(fd), "hold/ABCDEF", check_content=False)
            with qf, qf.content() as stream:
                return ("ok", qf.envelope, stream.read())
        except QueueFileError as exc:
            return ("error", str(exc))
    finally:
        os.close(fd)
        queuefile.READ_CHUNK, queuefile.SHORTCUTS = saved


@BATCHES
@SETTINGS
@given(index=st.integers(0, 1000), ops=OPS, small=st.integers(1, 16))
def test_a_queue_file_reads_the_same_whatever_the_buffer_size(seeds, batch, index, ops,
                                                              small):
    """The reader's shortcuts for records wholly inside its buffer agree with the
    record-by-record path, on valid and broken files, whatever the buffer size."""
    data = mutate(seeds[index % len(seeds)], ops) if index % 4 else seeds[index % len(seeds)]
    expected = _read_result(data, queuefile.READ_CHUNK, shortcuts=False)
    assert _read_result(data, queuefile.READ_CHUNK, shortcuts=True) == expected
    assert _read_result(data, small, shortcuts=True) == expected


@BATCHES
@SETTINGS
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_are_not_a_queue_file(batch, data):
    measured("queue file reader (random bytes)")(_bounded)(b"C" + data)


# --- Maildir names and the storage rule ---------------------------------------------------------


NAMES = st.binary(min_size=0, max_size=300).map(os.fsdecode)


@BATCHES
@SETTINGS
@given(name=NAMES, folder=st.sampled_from(["", ".Sent", ".A.b"]),
       sub=st.sampled_from(["new", "cur", "tmp"]))
def test_maildir_names_parse_or_are_refused(batch, name, folder, sub):
    def check() -> None:
        unique = unique_part(name)
        assert ":" not in unique and name.startswith(unique)
        try:
            check_name(name)
        except UnsafeFile:
            assert (not name or name in (".", "..") or "/" in name or "\x00" in name
                    or len(os.fsencode(name)) > 255)
            return
        root = "/var/vmail/example.org/u/Maildir"
        path = "/".join(p for p in (root, folder, sub, name) if p)
        loc = Location.from_path(path, root)
        if loc is not None:
            assert (loc.folder, loc.subdir, loc.name) == (folder, sub, name)
            assert loc.path == path and loc.identity.endswith("/" + unique)
        else:
            assert sub == "tmp" or name.startswith(".")
        stored = escape(loc.identity if loc else name)
        stored.encode("utf-8")
        assert "\x00" not in stored and unescape(stored) == (loc.identity if loc else name)
        shown = printable(name)
        assert shown.isprintable() and "\n" not in shown

    measured("Maildir names")(check)()


# --- the content hash ---------------------------------------------------------------------


HEADERS = st.lists(st.sampled_from([b"Return-Path: <a@b.c>\n", b"Delivered-To: x@y.z\n",
                                    b"X-Original-To: <>\n", b"Subject: s\n",
                                    b"Delivered-To: not an address\n", b"\n"]), max_size=6)


@BATCHES
@SETTINGS
@given(head=HEADERS, body=st.binary(max_size=4096), chunk=st.integers(1, 70_000))
def test_the_content_hash_is_total_and_independent_of_read_sizes(batch, head, body, chunk):
    data = b"".join(head) + body

    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return self.inner.read(min(n, chunk) if n and n > 0 else chunk)

    def check() -> None:
        digest, size, headers = content_hash(io.BytesIO(data))
        assert size == len(data) and re.fullmatch(r"[0-9a-f]{64}", digest)
        assert content_hash(Trickle()) == (digest, size, headers)  # type: ignore[arg-type]
        for value in (headers.subject, headers.message_id, headers.header_from):
            assert value is None or (isinstance(value, str) and len(value) <= 1000)

    measured("content hash")(check)()



# --- the header values read with the hash ---------------------------------------------------


# Pieces of header lines as mail brings them: encoded-words (well and badly formed, known
# and unknown charsets), folding, 8-bit bytes, controls, and anything at all.
HEADER_PIECES = st.lists(st.one_of(
    st.sampled_from([b"Subject:", b"From:", b"Message-ID:", b"subject :", b" ", b"\t",
                     b"\r\n", b"\n", b"\r\n ", b"=?utf-8?q?", b"=?utf-8?b?", b"?=",
                     b"=?x-unknown?q?a?=", b"=?iso-8859-1?q?=E9?=", b"=?utf-8?b?w?=",
                     b"=FF", b"=0D=0A", b"\x00", b"\xff\xfe", b"\x1b[31m", b"<a@b>"]),
    st.binary(max_size=40)), max_size=40)


@BATCHES
@SETTINGS
@given(pieces=HEADER_PIECES)
def test_header_values_are_total_and_bounded(batch, pieces):
    from spoolscan.content import HEADER_VALUE_LIMIT, parse_headers

    def check() -> None:
        found = parse_headers(b"".join(pieces))
        for value in (found.subject, found.message_id, found.header_from):
            assert value is None or (isinstance(value, str)
                                     and len(value) <= HEADER_VALUE_LIMIT)
            if value is not None:
                assert unescape(escape(value)) == value  # storable, losslessly

    measured("header values")(check)()

# --- the clamd reply parser ---------------------------------------------------------------


REPLIES = st.one_of(
    st.text(max_size=200),
    st.builds(lambda p, m: f"{p}: {m}", st.sampled_from(["stream", "fd[3]", "x"]),
              st.text(max_size=80)),
    st.builds(lambda a, b: a + b, st.sampled_from(["stream: OK", "stream: X FOUND",
                                                   "fd[5]: OK"]), st.text(max_size=20)),
)


@BATCHES
@SETTINGS
@given(reply=REPLIES)
def test_only_a_strict_ok_reply_is_clean(batch, reply):
    def check() -> None:
        result = parse_reply(reply, "stream")
        assert isinstance(result.verdict, Verdict)
        if result.verdict == Verdict.CLEAN:
            assert reply == "stream: OK"
        if result.verdict == Verdict.INFECTED:
            assert reply.startswith("stream: ") and reply.endswith(" FOUND")
            assert "\n" not in reply and " " not in reply[8:-6]

    measured("clamd replies")(check)()
