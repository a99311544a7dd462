"""The clamd client against a real clamd: every verdict type."""

import io
import os
import socket
import threading
from pathlib import Path

import pytest
from mail import eicar_message, message

from spoolscan.clamd import ClamdClient, parse_reply
from spoolscan.config import ClamdConfig
from spoolscan.model import Verdict
from spoolscan.testing.clamd import EICAR, TESTFILES_DIR, ClamdInstance

CLEAN, INFECTED, UNCHECKED, ERROR = (Verdict.CLEAN, Verdict.INFECTED, Verdict.UNCHECKED,
                                     Verdict.ERROR)
TESTFILES = sorted(p for p in TESTFILES_DIR.iterdir() if p.is_file())


@pytest.fixture
def scanner(clamd_config):
    return ClamdClient(clamd_config, max_size=8 * 1024 * 1024)


def test_clean_mail_is_clean(scanner):
    assert scanner.scan_stream(io.BytesIO(message())).verdict == CLEAN


def test_eicar_in_a_base64_attachment_is_infected(scanner):
    verdict = scanner.scan_stream(io.BytesIO(eicar_message()))
    assert verdict.verdict == INFECTED
    assert verdict.signature == "Spoolscan.Test.EICAR-NDB.UNOFFICIAL"


def test_the_testfiles_package_ships_44_samples():
    assert len(TESTFILES) == 44


@pytest.mark.parametrize("sample", TESTFILES, ids=lambda p: p.name)
def test_each_clamav_testfile_is_infected(scanner, sample):
    with open(sample, "rb") as fh:
        verdict = scanner.scan_stream(fh)
    assert (verdict.verdict, verdict.signature) == (INFECTED,
                                                    "Spoolscan.Test.ClamExe.UNOFFICIAL")


def test_each_clamav_testfile_attached_to_mail_is_infected(scanner):
    # Base64 grows a sample by a third: the largest would pass MaxFileSize (2M) and be
    # "unchecked" instead; those are covered by the size-limit tests.
    small = [p for p in TESTFILES if p.stat().st_size < 1024 * 1024 and "emax" not in p.name]
    assert len(small) >= 38
    missed = [p.name for p in small
              if scanner.scan_stream(io.BytesIO(message(attachment=p.read_bytes(),
                                                        filename=p.name))).verdict != INFECTED]
    assert missed == []


def test_file_descriptor_scan_finds_eicar(scanner, tmp_path):
    path = tmp_path / "eicar.eml"
    path.write_bytes(eicar_message())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 100000)  # the offset does not matter: clamd reads the whole file
        assert scanner.scan_fd(fd).verdict == INFECTED
    finally:
        os.close(fd)


def test_stream_over_stream_max_length_is_unchecked(scanner):
    big = message(body="x" * (3 * 1024 * 1024 + 10))
    verdict = scanner.scan_stream(io.BytesIO(big))
    assert verdict.verdict == UNCHECKED
    assert "size limit" in verdict.detail


def test_file_over_max_file_size_is_unchecked_not_clean(scanner, tmp_path):
    # MaxFileSize is 2M: clamd stops scanning there; AlertExceedsMax makes it say so.
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(5 * 1024 * 1024 // 2))
    fd = os.open(path, os.O_RDONLY)
    try:
        verdict = scanner.scan_fd(fd)
    finally:
        os.close(fd)
    assert verdict.verdict == UNCHECKED
    assert verdict.signature.startswith("Heuristics.Limits.Exceeded")


def test_content_over_max_size_is_unchecked_without_scanning(clamd_config):
    scanner = ClamdClient(clamd_config, max_size=100)
    verdict = scanner.scan_stream(io.BytesIO(b"x" * 200), size=200)
    assert verdict.verdict == UNCHECKED and "max_size" in verdict.detail


def test_stopped_clamd_gives_error(tmp_path):
    instance = ClamdInstance(tmp_path)
    instance.start()
    scanner = ClamdClient(ClamdConfig(socket=str(instance.socket_path), timeout=5))
    assert scanner.scan_stream(io.BytesIO(b"x")).verdict == CLEAN
    instance.stop()
    verdict = scanner.scan_stream(io.BytesIO(eicar_message()))
    assert verdict.verdict == ERROR
    assert "cannot connect to clamd" in verdict.detail


class SilentServer:
    """A Unix socket that accepts and then answers ``reply`` (or nothing at all);
    ``trickle``: one byte at a time, this many seconds apart."""

    def __init__(self, path: Path, reply: bytes | None, trickle: float = 0.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.reply = reply
        self.trickle = trickle
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while not data.endswith(b"\0\0\0\0"):  # the end of an INSTREAM
            part = conn.recv(65536)
            if not part:  # pyclamd's connection test: connects, closes
                return
            data += part
        try:
            if self.trickle:
                import time

                for byte in self.reply or b"":
                    conn.sendall(bytes([byte]))
                    time.sleep(self.trickle)
            else:
                conn.sendall(self.reply or b"")
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_clamd_that_never_answers_gives_error_within_the_timeout(tmp_path):
    import time

    server = SilentServer(tmp_path / "s.sock", None)
    try:
        scanner = ClamdClient(ClamdConfig(socket=str(tmp_path / "s.sock"), timeout=1))
        started = time.monotonic()
        verdict = scanner.scan_stream(io.BytesIO(b"hello"))
        assert verdict.verdict == ERROR and "timed out" in verdict.detail
        assert time.monotonic() - started < 3  # pyclamd alone would retry for 5x the timeout
    finally:
        server.close()


def test_garbage_reply_gives_error(tmp_path):
    server = SilentServer(tmp_path / "g.sock", b"WHAT IS THIS\0")
    try:
        scanner = ClamdClient(ClamdConfig(socket=str(tmp_path / "g.sock"), timeout=2))
        verdict = scanner.scan_stream(io.BytesIO(b"hello"))
        assert verdict.verdict == ERROR and "unexpected reply" in verdict.detail
    finally:
        server.close()


@pytest.mark.parametrize(("reply", "verdict", "signature"), [
    ("stream: OK", CLEAN, None),
    ("fd[7]: OK", CLEAN, None),
    ("stream: Eicar-Test-Signature FOUND", INFECTED, "Eicar-Test-Signature"),
    ("fd[12]: Name.X FOUND", INFECTED, "Name.X"),
    ("stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND", UNCHECKED,
     "Heuristics.Limits.Exceeded.MaxFileSize"),
    ("INSTREAM size limit exceeded. ERROR", UNCHECKED, None),
    ("stream: Can't allocate memory ERROR", ERROR, None),
    ("", ERROR, None),
    # Anything but one strict line is no answer, never clean.
    ("/a: b/c: Name.X FOUND", ERROR, None),  # a path reply: we never ask for one
    ("stream: Eicar FOUND stream: OK", ERROR, None),
    ("stream: x: Eicar FOUND: OK", ERROR, None),
    ("stream: OK\nstream: Eicar FOUND", ERROR, None),
    ("stream: OK ", ERROR, None),
    ("stream:OK", ERROR, None),
    ("STREAM: OK", ERROR, None),
])
def test_replies_map_to_verdicts(reply, verdict, signature):
    parsed = parse_reply(reply)
    assert (parsed.verdict, parsed.signature) == (verdict, signature)


def test_scanner_is_safe_to_share_between_threads(scanner):
    infected = eicar_message()
    clean = message()
    wrong: list[str] = []

    def work(i: int) -> None:
        for j in range(25):
            data, expected = (infected, INFECTED) if (i + j) % 2 else (clean, CLEAN)
            got = scanner.scan_stream(io.BytesIO(data)).verdict
            if got != expected:
                wrong.append(f"{expected} -> {got}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_fingerprint_of_custom_databases_includes_a_digest(scanner):
    assert scanner.fingerprint().startswith("ClamAV ") and "+db:" in scanner.fingerprint()


def test_fingerprint_follows_a_signature_update(tmp_path):
    instance = ClamdInstance(tmp_path)
    instance.start()
    try:
        scanner = ClamdClient(ClamdConfig(socket=str(instance.socket_path),
                                           database_directory=str(instance.db_dir)))
        instance.publish_daily(27001)
        first = scanner.fingerprint()
        instance.publish_daily(27002)
        second = scanner.fingerprint()
        assert "/27001/" in first and "/27002/" in second
    finally:
        instance.stop()


def test_eicar_bytes_are_the_standard_68():
    assert len(EICAR) == 68


def test_fingerprint_changes_with_local_signatures_beside_the_official_ones(tmp_path):
    instance = ClamdInstance(tmp_path)
    instance.start()
    try:
        instance.publish_daily(27001)
        scanner = ClamdClient(ClamdConfig(socket=str(instance.socket_path),
                                           database_directory=str(instance.db_dir)))
        before = scanner.fingerprint()
        (instance.db_dir / "local.ndb").write_text("Local.Sig:0:*:6c6f63616c\n")
        after = scanner.fingerprint()
        assert "/27001/" in before and "/27001/" in after and before != after
    finally:
        instance.stop()


@pytest.mark.parametrize("reply", [b"stream: OK", b"stream: OK\n", b"stream: O"])
def test_a_reply_without_its_terminator_is_not_clean(tmp_path, reply):
    server = SilentServer(tmp_path / "t.sock", reply)  # closes without the NUL
    try:
        client = ClamdClient(ClamdConfig(socket=str(tmp_path / "t.sock"), timeout=2))
        result = client.scan_stream(io.BytesIO(b"hello"))
        assert result.verdict == ERROR and "terminator" in result.detail
    finally:
        server.close()


def test_a_reply_trickled_byte_by_byte_is_cut_at_the_deadline(tmp_path):
    import time

    server = SilentServer(tmp_path / "d.sock", b"stream: OK\0", trickle=0.25)
    try:
        client = ClamdClient(ClamdConfig(socket=str(tmp_path / "d.sock"), timeout=1))
        started = time.monotonic()
        result = client.scan_stream(io.BytesIO(b"hello"))
        elapsed = time.monotonic() - started
        assert result.verdict == ERROR and "timed out" in result.detail
        assert elapsed < 1.5  # one deadline for the whole scan, not one per byte
    finally:
        server.close()


def test_fingerprint_is_content_based_equal_across_directories(tmp_path):
    """Two hosts with the same signatures (other names, mtimes, inodes) share it."""
    import os

    from spoolscan.clamd import content_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "local.ndb").write_text("Local.Sig:0:*:6c6f63616c\n")
    (b / "other-name.ndb").write_text("Local.Sig:0:*:6c6f63616c\n")
    os.utime(b / "other-name.ndb", (1, 1))
    custom = "ClamAV 1.4.6"
    assert content_fingerprint(custom, str(a)) == content_fingerprint(custom, str(b))
    # The daily number names the official part, with the engine; clamd's clock does not
    # count, an older engine does (it may detect less).
    one = content_fingerprint("ClamAV 1.4.6/27001/Fri Nov 27 20:36:49 2026", str(a))
    two = content_fingerprint("ClamAV 1.4.6/27001/Fri Nov 27 21:36:49 2026", str(b))
    assert one == two and "/27001/" in one and "+db:" in one
    assert content_fingerprint("ClamAV 1.4.5/27001/Fri Nov 27 21:36:49 2026", str(b)) != one
    (b / "daily.cud").write_bytes(b"not digested: the number says it")
    assert content_fingerprint("ClamAV 1.4.6/27001/x", str(b)) == one
    (b / "other-name.ndb").write_text("Local.Sig:0:*:6c6f63616d\n")
    assert content_fingerprint(custom, str(a)) != content_fingerprint(custom, str(b))


def test_fingerprint_digests_are_cached_by_file_identity(tmp_path, monkeypatch):
    import builtins

    from spoolscan.clamd import database_digest

    (tmp_path / "x.hdb").write_text("aa15bcf478d165efd2065190eb473bcb:544:X\n")
    first = database_digest(str(tmp_path))
    opened: list[str] = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open",
                        lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert database_digest(str(tmp_path)) == first and opened == []
