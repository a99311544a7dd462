"""The content hash: equal for copies of one delivery, different for any real change."""

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from mail import message

from spoolscan.content import HEADER_VALUE_LIMIT, Headers, content_hash, parse_headers

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
    digest_, size, headers = content_hash(io.BytesIO(data))
    assert size == len(data) and headers.subject == "big"


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


# --- the headers read with the hash ----------------------------------------------------


def headers(data: bytes) -> Headers:
    return content_hash(io.BytesIO(data)).headers


def test_subject_message_id_and_from_come_with_the_hash():
    found = headers(delivered(message(subject="Quarterly report", sender="ann@example.net"),
                              "b@example.org"))
    assert found.subject == "Quarterly report"
    assert found.header_from == "ann@example.net"
    assert found.message_id and found.message_id.startswith("<")


def test_encoded_words_are_decoded_and_folded_lines_unfolded():
    found = parse_headers(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n =?utf-8?b?IGF1cyBCZXJu?="
                          b"\r\nFrom: =?iso-8859-1?q?Ren=E9?= <rene@example.net>\r\n"
                          b"Message-ID:\r\n\t<abc@example.net>\r\n\r\nSubject: body\r\n")
    assert found == Headers(subject="Grüße aus Bern", message_id="<abc@example.net>",
                            header_from="René <rene@example.net>")


def test_the_first_field_counts_and_the_body_is_not_read_as_header():
    found = parse_headers(b"Subject: first\nSubject: second\n\nFrom: not a header\n")
    assert found == Headers(subject="first")


def test_broken_encodings_keep_the_raw_value_and_never_raise():
    raw = {
        b"=?no-such-charset?q?x?=": "=?no-such-charset?q?x?=",
        b"=?utf-8?b?####?=": "=?utf-8?b?####?=",
        b"=?utf-8?q?=FF?=": "=?utf-8?q?=FF?=",
        b"=?utf-8?b?w?=": "=?utf-8?b?w?=",
        # Raw 8-bit text is kept as it is (not RFC 2047; nothing is guessed).
        b"caf\xc3\xa9 =?utf-8?q?x?=": "café =?utf-8?q?x?=",
        b"\xff\xfe <script>": "\udcff\udcfe <script>",
    }
    for value, expected in raw.items():
        assert parse_headers(b"Subject: " + value + b"\n\n").subject == expected


def test_values_are_capped_and_the_rest_is_still_hashed():
    long = b"Subject: " + b"x" * 5000 + b"\n\nbody\n"
    assert len(headers(long).subject or "") == HEADER_VALUE_LIMIT
    assert digest(long) != digest(long.replace(b"x" * 5000, b"x" * 4999 + b"y"))


def test_no_header_section_gives_no_values():
    assert headers(b"") == Headers()
    assert headers(b"\nSubject: in the body\n") == Headers()
    assert headers(b"just text without a colon\n") == Headers()


def _received(host: str, qid: str, rcpt: str, date: str,
              client: str = "from client.example (localhost [127.0.0.1])") -> bytes:
    return (f"Received: {client}\n\tby {host} (Postfix) with ESMTP id {qid}\n"
            f"\tfor <{rcpt}>; {date}\n").encode()


def test_postfix_own_received_field_hashes_without_its_host_parts():
    from spoolscan.content import content_hash

    body = b"Subject: s\nFrom: a@example.net\n\nsame\n"
    one = _received("mx1.example.org", "4AbC12", "a@example.org",
                    "Wed,  2 Dec 2026 02:00:00 +0000 (UTC)") + body
    two = _received("mx2.example.org", "9ZZZ3AB", "a@example.org",
                    "Wed,  2 Dec 2026 02:00:07 +0000 (UTC)") + body
    delivered = b"Return-Path: <a@example.net>\nDelivered-To: a@example.org\n" + two
    h = [content_hash(io.BytesIO(x)).sha256 for x in (one, two, delivered)]
    assert h[0] == h[1] == h[2]
    # The client's part (HELO, address) counts; so does any other Received field.
    other = _received("mx1.example.org", "4AbC12", "a@example.org",
                      "Wed,  2 Dec 2026 02:00:00 +0000 (UTC)",
                      client="from evil.example (evil [192.0.2.1])") + body
    assert content_hash(io.BytesIO(other)).sha256 != h[0]
    assert content_hash(io.BytesIO(body)).sha256 != h[0]
    not_postfix = one.replace(b"(Postfix)", b"(Exim)")
    assert content_hash(io.BytesIO(not_postfix)).sha256 != h[0]
    odd = _received("mx1.example.org", "4AbC12", "a@example.org", "X5O!P%@AP[4\\PZX54(P^)") + body
    assert content_hash(io.BytesIO(odd)).sha256 != h[0]  # odd date characters: all hashed


def test_the_recipient_in_postfix_own_received_field_is_hashed():
    """An address extension is the sender's text: a copy to user+<anything> must not be
    served the verdict of a copy to user+<something else>."""
    from spoolscan.content import content_hash

    body = b"Subject: s\n\nsame\n"
    date = "Wed,  2 Dec 2026 02:00:00 +0000 (UTC)"
    plain = _received("mx1.example.org", "4AbC12", "victim+aaaa@example.org", date) + body
    payload = _received("mx1.example.org", "4AbC12",
                        "victim+X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR@example.org", date) + body
    assert content_hash(io.BytesIO(plain)).sha256 != content_hash(io.BytesIO(payload)).sha256


def test_only_postfix_own_spacing_and_name_count_as_its_received_field():
    from spoolscan.content import content_hash

    body = b"Subject: s\n\nsame\n"
    date = "Wed,  2 Dec 2026 02:00:00 +0000 (UTC)"
    one = _received("mx1.example.org", "4AbC12", "a@example.org", date) + body
    two = _received("mx2.example.org", "5XyZ99", "a@example.org", date) + body
    assert content_hash(io.BytesIO(one)).sha256 == content_hash(io.BytesIO(two)).sha256
    for odd in (two.replace(b"Received:", b"received:"),
                two.replace(b"\n\tby", b"\r\x0bby"),
                two.replace(b"\n\tby", b"\n\t\r by"),
                two.replace(b") with", b")\x0cwith")):
        assert content_hash(io.BytesIO(odd)).sha256 != content_hash(io.BytesIO(one)).sha256
    # A message whose first field looks like the hashed form of Postfix's field is not it.
    forged = b"Received: from client.example (localhost [127.0.0.1]) by (Postfix)\n" + body
    assert content_hash(io.BytesIO(forged)).sha256 != content_hash(io.BytesIO(one)).sha256


def _headers_line_by_line(head: bytes) -> Headers:
    """The header rules read one line at a time, as plainly as they are stated: the
    reference ``parse_headers`` (one regular expression) must agree with."""
    import re

    from spoolscan.content import RELEASE_TOKEN, decode_value

    wanted = {b"subject": "subject", b"message-id": "message_id", b"from": "header_from",
              b"x-spoolscan-release": "release_token"}
    found: dict[str, bytes] = {}
    current = None
    end = re.search(rb"\n\r?\n", head)
    section = head[:end.start()].rstrip(b"\r") if end else head
    for line in re.split(rb"\r?\n", section):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                found[current] += line
            continue
        current = None
        colon = line.find(b":")
        if colon <= 0:
            continue
        key = wanted.get(line[:colon].strip(b" \t").lower())
        if key is not None and key not in found:
            found[key] = line[colon + 1:]
            current = key
    values = {key: decode_value(raw) for key, raw in found.items()}
    token = values.pop("release_token", None)
    if token is not None and RELEASE_TOKEN.fullmatch(token):
        values["release_token"] = token
    return Headers(**values)


FIELD_PIECES = st.lists(st.one_of(
    st.sampled_from([b"Subject:", b"From:", b"Message-ID:", b"subject \t:", b"FROM :",
                     b"X-Spoolscan-Release: ", b"0123456789abcdef0123456789abcdef",
                     b"From x:", b" ", b"\t", b":", b"\r", b"\n", b"\r\n", b"\r\n ", b"\n\t",
                     b"\r\r\n", b"\n\n", b"\r\n\r\n", b"=?utf-8?q?a?=", b"<a@b>", b"x",
                     b"\xff"]),
    st.binary(max_size=12)), max_size=30)


@settings(max_examples=3000, deadline=None)
@given(pieces=FIELD_PIECES)
def test_headers_are_found_as_the_line_by_line_rules_say(pieces):
    head = b"".join(pieces)
    assert parse_headers(head) == _headers_line_by_line(head)


def test_header_edge_cases_agree_with_the_line_by_line_rules():
    for head in (b"", b"\n", b"\r\n", b"\nSubject: x\n\n", b"\r\nSubject: x",
                 b"Subject: a\r\r\nFrom: b\r\r", b"Subject: a\r\n b\r\n\tc\r\nFrom:\r\n x",
                 b"X: a\n Subject: b\nSubject: c", b"\rSubject: x", b"Subject: a\rFrom: b",
                 b"Subject: first\nSubject: second\n more\n\nFrom: body"):
        assert parse_headers(head) == _headers_line_by_line(head), head
