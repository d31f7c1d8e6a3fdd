"""The chunked DATA reader and the plain-path address parser give what aiosmtpd's own code gives."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import from_mapping
from relay.intake.data import read_data
from relay.intake.server import IntakeHandler, RelaySMTP

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit: 999 octets and the CRLF


def reference(stream: bytes, size_limit: int | None, line_limit: int = LINE_LIMIT):
    """aiosmtpd 1.4's DATA loop, line by line: (content or None, refusal, bytes left after the end).

    One change: a bare LF ends a line for the length limit (LF-separated pieces are measured).
    """
    pos, lines, total, too_much = 0, [], 0, False
    while True:
        i = stream.find(b"\r\n", pos)
        line, pos = stream[pos : i + 2], i + 2
        if line == b".\r\n":
            break
        total += len(line)
        too_much |= bool(size_limit and total > size_limit)
        lines.append(line)
    if too_much:
        return None, "too_much", stream[pos:]
    if any(len(piece) + 1 > line_limit for piece in b"".join(lines).split(b"\n")):
        return None, "too_long", stream[pos:]
    return b"".join(x[1:] if x.startswith(b".") else x for x in lines), None, stream[pos:]


async def feed_and_read(stream: bytes, cuts: list[int], size_limit: int | None):
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})

    async def feed():
        for a, b in zip(points, points[1:], strict=False):
            reader.feed_data(stream[a:b])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    got = await read_data(reader, size_limit=size_limit, line_limit=LINE_LIMIT)
    await feeder
    return got, await reader.read()


_PIECES = st.sampled_from(
    [b"a", b"Subject: x", b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.", b"\r\n..x", b"\r\n.\n", b" ",
     b"\xc3\xa9", b"x" * 300, b"=\r\n", b"\x00"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(_PIECES, max_size=40).map(b"".join),
    after=st.sampled_from([b"", b"QUIT\r\n", b"RSET\r\nMAIL FROM:<a@b.c>\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=6),
    size_limit=st.sampled_from([None, 50, 400, 100_000]),
)
def test_same_result_as_aiosmtpd_line_by_line(body, after, cuts, size_limit):
    stream = body + b"\r\n.\r\n" + after
    want = reference(stream, size_limit)
    got, left = asyncio.run(feed_and_read(stream, cuts, size_limit))
    assert (got.content, got.refusal) == want[:2]
    assert left == want[2]  # a pipelined next command is left for the command loop


@pytest.mark.parametrize("size", [997, 998, 999, 1000])
def test_line_length_limit_is_aiosmtpd_s(size):
    stream = b"Subject: x\r\n\r\n" + b"y" * size + b"\r\n.\r\n"
    got, _ = asyncio.run(feed_and_read(stream, [], None))
    assert got.refusal == reference(stream, None)[1] == (None if size <= 999 else "too_long")


def test_a_bare_lf_ends_a_line_for_the_length_limit():
    short = b"\n".join([b"z" * 500] * 3)  # one CRLF line of 1502 octets, LF-separated lines of 500
    got, _ = asyncio.run(feed_and_read(b"a\r\n" + short + b"\r\n.\r\n", [7, 900], None))
    assert got.refusal is None and got.content == b"a\r\n" + short + b"\r\n"
    long = b"z" * 1001 + b"\nend"
    got, _ = asyncio.run(feed_and_read(b"a\r\n" + long + b"\r\n.\r\n", [7, 900], None))
    assert got.refusal == "too_long"


def test_size_limit_exactly_met_with_the_end_marker_split():
    body = b"x" * 98 + b"\r\n"  # 100 octets: at the limit, not over it
    for cut in range(95, 106):
        got, _ = asyncio.run(feed_and_read(body + b".\r\n", [cut], 100))
        assert got.content == body, cut


def test_client_gone_before_the_end():
    got, _ = asyncio.run(feed_and_read(b"Subject: x\r\n\r\nhalf a mess", [5], None))
    assert got.closed and got.content is None


def test_a_big_message_over_the_limit_is_not_kept():
    async def run():
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        line = b"q" * 998 + b"\r\n"
        for _ in range(5000):  # 5 MB
            reader.feed_data(line)
        reader.feed_data(b".\r\n")
        return await read_data(reader, size_limit=1_000_000, line_limit=LINE_LIMIT)

    assert asyncio.run(run()).refusal == "too_much"


def test_pipelined_quit_after_the_dot_gets_its_reply(relay, sink):
    """A client that sends QUIT in the same packet as the end of data gets 250, then 221."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO client.example\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"MAIL FROM:<shop@boutique.example>\r\nRCPT TO:<camille@example.org>\r\n")
        assert f.readline().startswith(b"250") and f.readline().startswith(b"250")
        s.sendall(b"DATA\r\n")
        assert f.readline().startswith(b"354")
        s.sendall(b"Subject: pipelined\r\n\r\n..dot-stuffed line\r\n.\r\nQUIT\r\n")
        assert f.readline().startswith(b"250 2.0.0 Ok: queued as ")
        assert f.readline().startswith(b"221")
    relay.wait_for(lambda: len(sink.messages) == 1, what="the message in the sink")
    assert b"\r\n.dot-stuffed line\r\n" in sink.messages[0].data


# -- MAIL/RCPT paths -----------------------------------------------------------------------------------

_LOCAL = st.text(alphabet="abcXYZ019.!#$%&'*+/=?^_`{|}~-\"(), \\@", min_size=0, max_size=12)
_DOMAIN = st.text(alphabet="abcXYZ019.-[]:", min_size=0, max_size=12)
_REST = st.sampled_from(["", " SIZE=100", "  BODY=8BITMIME ", "x", " (comment) SIZE=1", "\tSMTPUTF8", ">"])


@settings(max_examples=500, deadline=None)
@given(local=_LOCAL, domain=_DOMAIN, rest=_REST, angle=st.booleans())
def test_plain_path_fast_parse_matches_aiosmtpd(local, domain, rest, angle):
    path = f"<{local}@{domain}>{rest}" if angle else f"{local}@{domain}{rest}"

    async def both():
        proto = RelaySMTP(IntakeHandler(from_mapping({}).smtp, committer=None), hostname="x")
        try:
            slow = SMTP._getaddr(proto, path)
        except Exception:  # noqa: BLE001 - aiosmtpd's parser raises on some input, e.g. "0@", "0@["
            slow = (None, None)
        return proto._getaddr(path), slow

    fast, slow = asyncio.run(both())
    assert fast == slow


def test_address_that_trips_the_stdlib_parser_gets_a_syntax_error(relay):
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"HELO client.example\r\n")
        assert f.readline().startswith(b"250")
        for bad in (b"0@", b"0@["):
            s.sendall(b"MAIL FROM:" + bad + b"\r\n")
            assert f.readline().startswith(b"553 5.1.3"), bad


def test_short_dir_keeps_every_hook_aiosmtpd_looks_up():
    """RelaySMTP and IntakeHandler list only their hooks in dir(): aiosmtpd must still find them all."""

    async def build():
        handler = IntakeHandler(from_mapping({}).smtp, committer=None)
        return RelaySMTP(handler, hostname="x", authenticator=handler.authenticator), handler

    proto, handler = asyncio.run(build())
    full = object.__dir__(proto)
    assert set(proto._smtp_methods) == {n[5:] for n in full if n.startswith("smtp_")}
    assert set(proto._auth_methods) == {n[5:] for n in full if n.startswith("auth_")}
    assert set(proto._handle_hooks) == {n[7:] for n in object.__dir__(handler) if n.startswith("handle_")}
    assert {"DATA", "MAIL", "RCPT", "EHLO", "PROXY", "exception"} <= set(proto._handle_hooks)


def test_a_big_message_is_handed_over_in_its_read_buffer():
    """From KEEP_BUFFER_FROM on, the buffer the message was read into is the result (bytes() would hold
    a second copy for a moment); the content is the same as for a small message."""
    from relay.intake.data import KEEP_BUFFER_FROM

    body = b"Subject: x\r\n\r\n" + b"..stuffed\r\nQUJD\r\n" * (KEEP_BUFFER_FROM // 14)
    got, rest = asyncio.run(feed_and_read(body + b".\r\nQUIT\r\n", [70_000, 900_000], None))
    assert isinstance(got.content, bytearray) and rest == b"QUIT\r\n"
    assert got.content == body.replace(b"\r\n..", b"\r\n.")
    small, _ = asyncio.run(feed_and_read(b"Subject: x\r\n\r\nhi\r\n.\r\n", [], None))
    assert type(small.content) is bytes and small.content == b"Subject: x\r\n\r\nhi\r\n"
