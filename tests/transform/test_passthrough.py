"""Messages that must never be rewrapped: byte-exact but for X-Relay-Id and request headers."""

from __future__ import annotations

import re

import pytest

from relay.transform import Decisions, read_request_headers
from relay.transform._raw import split_message

from .conftest import header_count, load, run

CASES = [
    ("signed_smime_8bit.eml", "shop@example.com", "signed (multipart/signed)"),
    ("smime_encrypted.eml", "shop@example.com", "S/MIME (application/pkcs7-mime)"),
    ("calendar_invite.eml", "shop@example.com", "calendar invitation (text/calendar)"),
    ("dsn_report.eml", "shop@example.com", "auto-submitted (auto-replied)"),
    ("read_receipt_mdn.eml", "camille@example.org", "delivery or read report (multipart/report)"),
    ("auto_reply.eml", "shop@example.com", "auto-submitted (auto-replied (vacation))"),
    ("bounce_plain.eml", "", "bounce (empty reverse path)"),
    ("already_wrapped.eml", "shop@example.com", "already wrapped (X-Relay-Skin: default)"),
    ("broken_mime_no_boundary.eml", "shop@example.com", "broken MIME (StartBoundaryNotFoundDefect)"),
]


def _expected(raw: bytes, queue_id: str) -> bytes:
    """The input with X-Relay-* request headers (not X-Relay-Skin) removed and X-Relay-Id on top."""
    head, sep, body = split_message(raw)
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    kept = [
        line
        for line in re.split(rb"(?<=\n)(?=[^ \t])", head)
        if line
        and not (line.lower().startswith(b"x-relay-") and not line.lower().startswith(b"x-relay-skin:"))
    ]
    return b"X-Relay-Id: " + queue_id.encode() + eol + b"".join(kept) + sep + body


@pytest.mark.parametrize("name, mail_from, reason", CASES)
def test_passthrough_byte_exact(name, mail_from, reason, skins):
    raw = load(name)
    out, report = run(raw, skins, mail_from=mail_from)
    assert report.action == "passthrough"
    assert report.reason == reason
    assert report.blocks == [] and report.html_bytes == 0
    assert out == _expected(raw, "Q-0001")
    assert header_count(out, "X-Relay-Id") == 1


def test_signed_8bit_body_untouched(skins):
    raw = load("signed_smime_8bit.eml")
    out, _ = run(raw, skins)
    assert out.endswith(split_message(raw)[2])
    assert "générales évoluent".encode() in out
    assert header_count(out, "X-Relay-Use-Skin") == 0


def test_already_wrapped_replaces_old_relay_id(skins):
    out, _ = run(load("already_wrapped.eml"), skins)
    assert header_count(out, "X-Relay-Id") == 1 and b"X-Relay-Id: Q-0001" in out
    assert b"old-queue-id-1" not in out and b"X-Relay-Skin: default" in out
    assert header_count(out, "X-Relay-Category") == 0


def test_no_wrap_request_and_none_skin(skins):
    raw = load("latin1_text_qp.eml").replace(b"MIME-Version", b"X-Relay-No-Wrap: yes\r\nMIME-Version", 1)
    out, report = run(raw, skins)
    assert report.action == "passthrough" and report.reason == "X-Relay-No-Wrap requested"
    assert header_count(out, "X-Relay-No-Wrap") == 0
    out, report = run(load("latin1_text_qp.eml"), skins, decisions=Decisions(skin=None))
    assert report.action == "passthrough" and report.reason == "no skin chosen"
    assert out == b"X-Relay-Id: Q-0001\r\n" + load("latin1_text_qp.eml")


def test_dmarc_strict_without_key_untouched(skins):
    raw = load("forwarded_rfc822_dkim.eml")
    out, report = run(raw, skins, dmarc_strict_domains=frozenset({"maison-lumiere.example"}))
    assert report.action == "passthrough" and report.dkim == "untouched"
    assert out == b"X-Relay-Id: Q-0001\r\n" + raw
    # a subdomain of a strict organisational domain too
    raw2 = raw.replace(b"achats@maison-lumiere.example", b"achats@news.maison-lumiere.example")
    assert (
        run(raw2, skins, dmarc_strict_domains=frozenset({"maison-lumiere.example"}))[1].action
        == "passthrough"
    )


def test_nested_calendar_and_signed_detected(skins):
    raw = load("calendar_invite.eml")
    assert b"multipart/alternative" in raw  # text/calendar is nested, not top-level
    assert run(raw, skins)[1].action == "passthrough"


def test_read_request_headers():
    raw = load("text_only_utf8_lf.eml")
    assert read_request_headers(raw) == {"category": "transactional", "kind": "shipping"}
    assert read_request_headers(load("hostile_html.eml")) == {"no-wrap": "no", "use-skin": "plain"}


def test_disposition_notification_request_is_rewrapped(skins):
    raw = load("latin1_text_qp.eml").replace(
        b"MIME-Version", b"Disposition-Notification-To: logistique@maison-lumiere.example\r\nMIME-Version", 1
    )
    out, report = run(raw, skins)
    assert report.action == "rewrapped"
    assert b"Disposition-Notification-To: logistique@maison-lumiere.example" in out
