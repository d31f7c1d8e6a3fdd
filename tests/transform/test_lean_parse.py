"""The lean parse of big messages (relay.transform.parse): base64 bodies stay in the raw bytes."""

from __future__ import annotations

import base64
import email
import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.transform import Decisions, Spliced, joined
from relay.transform.parse import LEAN_FROM, LeanMessage, parse_message

from .conftest import run


def _big(eol: bytes = b"\r\n", pdf_size: int = 1_500_000) -> tuple[bytes, bytes]:
    pdf = os.urandom(pdf_size)
    enc = base64.b64encode(pdf)
    body = eol.join(enc[i : i + 76] for i in range(0, len(enc), 76))
    head = eol.join(
        [
            b"From: Maison Lumiere <shop@maison-lumiere.example>",
            b"To: camille@example.org",
            b"Subject: Votre facture",
            b"Message-ID: <lean-1@maison-lumiere.example>",
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/mixed; boundary="b1"',
            b"",
            b"preamble",
            b"--b1",
            b"Content-Type: text/html; charset=utf-8",
            b"",
            b"<p>Bonjour Camille, votre facture est jointe.</p>",
            b"--b1",
            b'Content-Type: application/pdf; name="facture.pdf"',
            b"Content-Transfer-Encoding: base64",
            b"",
            b"",
        ]
    )
    return head + body + eol + b"--b1--" + eol, pdf


def test_a_big_attachment_is_never_made_a_str_and_arrives_intact(skins):
    raw, pdf = _big()
    assert len(raw) >= LEAN_FROM
    msg = parse_message(raw)
    attachment = [p for p in msg.walk() if p.get_content_type() == "application/pdf"][0]
    assert isinstance(attachment, LeanMessage) and attachment.spans
    assert len(attachment._payload) < 100  # a token stands for 2 MB of base64
    out, report = run(raw, skins, decisions=Decisions(skin="plain"), parse=lambda: msg)
    assert report.action == "rewrapped"
    assert attachment.spans, "the rewrap read the attachment as text"
    got = [p.get_payload(decode=True) for p in email.message_from_bytes(out).walk()
           if p.get_content_type() == "application/pdf"]
    assert [hashlib.sha256(g).digest() for g in got] == [hashlib.sha256(pdf).digest()]
    plain = run(raw, skins, decisions=Decisions(skin="plain"), parse=lambda: email.message_from_bytes(raw))
    assert out == plain[0]


def test_reading_the_payload_puts_the_original_back():
    raw, pdf = _big()
    part = [p for p in parse_message(raw).walk() if p.get_content_type() == "application/pdf"][0]
    assert part.get_payload(decode=True) == pdf
    assert not part.spans
    assert part.get_payload() == email.message_from_bytes(raw).get_payload(1).get_payload()


def test_line_ends_of_the_span_are_unified_with_the_message_s():
    """LF base64 lines in a CRLF message: the output has CRLF throughout, as with the plain parse."""
    raw, _ = _big(eol=b"\n")
    raw = raw.replace(b"\nSubject:", b"\r\nSubject:", 1)  # a CRLF in the head: the message's eol is CRLF
    from relay.transform import _mime

    lean = [p for p in parse_message(raw).walk() if p.get_content_type() == "application/pdf"][0]
    plain = [p for p in email.message_from_bytes(raw).walk() if p.get_content_type() == "application/pdf"][0]
    for eol in (b"\r\n", b"\n"):
        chunks = _mime.raw_part(lean, eol)
        assert isinstance(chunks, list) or eol == b"\r\n"  # CRLF in LF-only lines: fixed, so copied
        joined = b"".join(chunks) if isinstance(chunks, list) else chunks
        assert joined == _mime.raw_part(plain, eol)


def test_runs_in_the_preamble_and_epilogue_are_restored_at_once():
    raw, _ = _big()
    filler = b"\r\n".join([b"QUJD" * 19] * 2000)  # 150 KB of base64-looking lines
    raw = raw.replace(b"preamble", filler, 1).replace(b"--b1--\r\n", b"--b1--\r\n" + filler + b"\r\n")
    lean, plain = parse_message(raw), email.message_from_bytes(raw)
    assert (lean.preamble, lean.epilogue) == (plain.preamble, plain.epilogue)


def test_a_small_message_takes_the_plain_parse():
    raw = b"From: a@example.org\r\nSubject: x\r\n\r\n" + b"QUJD\r\n" * 100
    assert type(parse_message(raw)) is email.message.Message


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"A: b", b"\r\n", b"\n", b" c", b"x", b"\r"]), max_size=12))
def test_header_block_is_split_message_s_head(pieces):
    from relay.transform._raw import header_block, split_message

    raw = b"".join(pieces)
    assert header_block(raw) == split_message(raw)[0]


def _b64_lines(data: bytes, eol: bytes) -> bytes:
    enc = base64.b64encode(data)
    return eol.join(enc[i : i + 76] for i in range(0, len(enc), 76))


_leaf = st.one_of(
    st.builds(lambda d: ("application/pdf", "base64", d), st.binary(min_size=0, max_size=400)),
    st.builds(lambda t: ("text/plain", "8bit", t.encode()), st.text("ab .\r\n-=:é", max_size=60)),
    st.builds(lambda t: ("text/html", "base64", t.encode()), st.text("<p>ab </p>é", max_size=60)),
)


@st.composite
def _mime_messages(draw) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    n = [0]

    def part(depth: int) -> bytes:
        if depth < 2 and draw(st.booleans()):
            n[0] += 1
            b = f"b{n[0]}".encode()
            kids = [part(depth + 1) for _ in range(draw(st.integers(1, 3)))]
            pre = draw(st.sampled_from([b"", b"QUJD", b"preamble text"]))
            epi = draw(st.sampled_from([b"", b"QUJD" + eol + b"RUZH", b"bye"]))
            parts = b"".join(b"--" + b + eol + k + eol for k in kids)
            body = pre + eol + parts + b"--" + b + b"--" + eol + epi
            return b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"" + eol + eol + body
        ctype, cte, data = draw(_leaf)
        body = _b64_lines(data, eol) if cte == "base64" else data
        head = f"Content-Type: {ctype}; charset=utf-8".encode()
        head += eol + f"Content-Transfer-Encoding: {cte}".encode()
        return head + eol + eol + body

    return b"From: a@example.org" + eol + b"Subject: x" + eol + b"MIME-Version: 1.0" + eol + part(0)


@settings(max_examples=150, deadline=None)
@given(_mime_messages())
def test_the_lean_parse_reads_random_structures_as_the_stdlib_does(skins, raw):
    plain = email.message_from_bytes(raw)
    lean = parse_message(raw, lean_from=0, lean_run=1)
    decisions = Decisions(skin="plain")
    assert run(raw, skins, decisions=decisions, parse=lambda: lean) == run(
        raw, skins, decisions=decisions, parse=lambda: plain
    )
    assert lean.as_bytes() == plain.as_bytes()  # every payload read back through get_payload()
    again = parse_message(raw, lean_from=0, lean_run=1)
    spliced, _ = run(raw, skins, decisions=decisions, parse=lambda: again, spliced=True)
    assert joined(spliced) == run(raw, skins, decisions=decisions, parse=lambda: plain)[0]


def test_a_big_message_comes_back_spliced_when_asked_and_arrives_intact(skins):
    """``spliced=True``: the big base64 body is a view of the raw message (never copied), for the rewrap
    and for a pass-through alike; the pieces join to exactly the bytes of the plain call."""
    raw, pdf = _big()
    for decisions in (Decisions(skin="plain"), Decisions(skin=None)):
        out, report = run(raw, skins, decisions=decisions, spliced=True)
        assert isinstance(out, Spliced), report
        views = [p for p in out.pieces if isinstance(p, memoryview)]
        assert views and all(v.obj is raw for v in views)
        assert sum(len(v) for v in views) > len(pdf)  # the base64 of the PDF, not copied
        assert len(out) == len(joined(out)) and out.prefix(30) == joined(out)[:30]
        assert joined(out) == run(raw, skins, decisions=decisions)[0]
    small = b"From: a@example.org\r\nSubject: x\r\n\r\nhello\r\n"
    assert isinstance(run(small, skins, spliced=True)[0], bytes)  # small messages stay plain bytes


def test_the_lean_parse_of_a_big_attachment_allocates_next_to_nothing():
    """Measured with tracemalloc, not a clock: no str of the body, no per-line state in the regex engine
    (the first pattern kept ~180 bytes per line on sre's stack: 59 MB for a 25 MB attachment)."""
    import tracemalloc

    raw, _ = _big(pdf_size=4_000_000)  # 5.4 MB of base64 in 71,000 lines
    tracemalloc.start()
    try:
        msg = parse_message(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert any(isinstance(p, LeanMessage) and p.spans for p in msg.walk())
    assert peak < 1_000_000, peak
