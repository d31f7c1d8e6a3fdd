"""Big messages go upstream in slices (relay.delivery.streamdata): the same bytes on the wire as
aiosmtplib's data(), the same answers, without the whole-message copies."""

from __future__ import annotations

import asyncio

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, SMTPProtocol, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery import streamdata
from relay.delivery.upstream import OutboxUpstream, SmtpUpstream
from relay.transform import Spliced
from tests.conftest import make_settings


def _aiosmtplib_wire(data: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"x" * 40, b"=\r\n"]), max_size=80),
    st.integers(min_value=1, max_value=90),
)
def test_the_slices_make_aiosmtplib_s_wire_form(pieces, size):
    data = b"".join(pieces)
    assert b"".join(streamdata.wire_slices(data, size)) == _aiosmtplib_wire(data)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"x" * 40, b"=\r\n"]), max_size=80),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
    st.integers(min_value=1, max_value=90),
)
def test_spliced_pieces_make_the_same_wire_form(pieces, cuts, size):
    """A message in pieces (views of a buffer, cut anywhere: inside a CRLF, before a dot) goes on the wire
    exactly as the joined bytes would."""
    data = b"".join(pieces)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    view = memoryview(data)
    spliced = Spliced([view[a:b] for a, b in zip(points, points[1:], strict=False)])
    assert b"".join(streamdata.wire_slices(spliced, size)) == _aiosmtplib_wire(data)


def test_aiosmtplib_still_has_the_flow_control_it_relies_on():
    assert hasattr(SMTPProtocol, "_drain_helper")  # else send_data quietly falls back to data()


def _big_message(size: int = 3_000_000) -> bytes:
    head = b"From: shop@maison-lumiere.example\r\nTo: camille@example.org\r\nSubject: catalogue\r\n\r\n"
    lines = [b".leading dot", b"bare lf follows\n", b"lone cr\rthen text", b"x" * 70, b"..two dots"]
    block = b"".join(line + b"\r\n" for line in lines)
    return head + block * (size // len(block) + 1) + b"no final line end"


def _send(tmp_path, sink, data: bytes, monkeypatch, stream_from: int) -> object:
    monkeypatch.setattr(streamdata, "STREAM_FROM", stream_from)
    up = SmtpUpstream(make_settings(tmp_path, "sqlite://", sink.port).upstream, "relay.test")

    async def go():
        try:
            return await up.send("shop@maison-lumiere.example", "camille@example.org", data)
        finally:
            await up.close()

    return asyncio.run(go())


def test_a_big_message_arrives_as_aiosmtplib_would_send_it(tmp_path, sink, monkeypatch):
    data = _big_message()
    streamed = _send(tmp_path, sink, data, monkeypatch, stream_from=1)
    whole = _send(tmp_path, sink, data, monkeypatch, stream_from=len(data) + 1)
    assert streamed.code == whole.code == 250
    assert len(sink.messages) == 2
    assert sink.messages[0].data == sink.messages[1].data
    assert sink.messages[0].data.startswith(b"From: shop@")


def test_a_refusal_at_the_end_of_data_is_the_reply(tmp_path, sink, monkeypatch):
    sink.handler.fail_all_with = "552 5.3.4 Message too big for this mailbox"
    reply = _send(tmp_path, sink, _big_message(1_500_000), monkeypatch, stream_from=1)
    assert reply.code == 552 and "too big" in reply.text


def test_the_connection_is_reused_after_a_streamed_message(tmp_path, sink, monkeypatch):
    monkeypatch.setattr(streamdata, "STREAM_FROM", 1)
    up = SmtpUpstream(make_settings(tmp_path, "sqlite://", sink.port).upstream, "relay.test")
    opened = []
    real = aiosmtplib.SMTP.connect

    async def counting(self, *a, **kw):
        opened.append(1)
        return await real(self, *a, **kw)

    monkeypatch.setattr(aiosmtplib.SMTP, "connect", counting)

    async def go():
        try:
            data = _big_message(1_200_000)
            return [await up.send("shop@x.example", f"c{i}@example.org", data) for i in range(3)]
        finally:
            await up.close()

    assert [r.code for r in asyncio.run(go())] == [250, 250, 250]
    assert len(opened) == 1 and len(sink.messages) == 3


def test_a_spliced_message_is_delivered_as_its_joined_bytes(tmp_path, sink, monkeypatch):
    data = _big_message(1_500_000)
    view = memoryview(data)
    spliced = Spliced([data[:100], view[100:700_001], view[700_001:]])
    reply = _send(tmp_path, sink, spliced, monkeypatch, stream_from=1)
    assert reply.code == 250
    _send(tmp_path, sink, data, monkeypatch, stream_from=len(data) + 1)
    assert sink.messages[0].data == sink.messages[1].data


def test_the_outbox_writes_a_spliced_message_as_its_joined_bytes(tmp_path):
    data = b"X-Relay-Id: Q123\r\nSubject: x\r\n\r\n" + b"QUJD\r\n" * 1000
    view = memoryview(data)
    up = OutboxUpstream(tmp_path / "out")
    reply = asyncio.run(up.send("a@example.org", "b@example.org", Spliced([data[:5], view[5:40], view[40:]])))
    assert reply.code == 250
    [eml] = (tmp_path / "out").glob("*.eml")
    assert "Q123" in eml.name
    assert eml.read_bytes().split(b"\r\n", 2)[2] == data  # after Return-Path and Delivered-To
