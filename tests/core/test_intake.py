"""Intake policy over real sockets: EHLO, relay refusal, limits, store faults -> 451, never a false 250."""

from __future__ import annotations

import smtplib
import socket

import pytest
from sqlalchemy import text

from tests.conftest import message


def test_ehlo_advertises_only_what_is_supported(relay):
    with relay.smtp() as c:
        code, text_ = c.ehlo("shop.example")
    lines = text_.decode().splitlines()
    assert code == 250 and lines[0] == "relay.test"
    assert sorted(lines[1:]) == sorted(["SIZE 26214400", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"])


def test_replies_carry_enhanced_status_codes(relay):
    with relay.smtp() as c:
        c.ehlo()
        assert c.mail("shop@boutique.example") == (250, b"2.1.0 Sender ok")
        assert c.rcpt("a@example.org") == (250, b"2.1.5 Recipient ok")
        code, msg = c.docmd("DATA", "extra")  # aiosmtpd's own syntax reply gets a code too
        assert code == 501 and msg.startswith(b"5.5.4 ")


def test_untrusted_client_is_refused_at_rcpt(relay_factory, sink):
    r = relay_factory(sink.port, smtp={"trusted_networks": ["10.9.8.0/24"]})
    with r.smtp() as c:
        c.ehlo()
        assert c.mail("spammer@example.net")[0] == 250
        code, msg = c.rcpt("victim@example.com")
        assert code == 530 and msg.startswith(b"5.7.0")
        code, _ = c.docmd("DATA")
        assert code == 503  # no accepted recipient: nothing can be relayed
    assert r.store.depth() == {"queued": 0, "active": 0, "deferred": 0}


def test_size_limit_at_mail_and_at_data(relay_factory, sink):
    r = relay_factory(sink.port, smtp={"max_message_size": 10_000})
    with r.smtp() as c:
        c.ehlo()
        code, msg = c.mail("shop@boutique.example", ["SIZE=20000"])
        assert code == 552 and msg.startswith(b"5.3.4")
    with r.smtp() as c:
        # a client that announces no SIZE: the limit is enforced on the data itself
        c.ehlo()
        c.mail("shop@boutique.example")
        c.rcpt("a@example.org")
        code, msg = c.data(message(body="x" * 70 + "\r\n") * 300)
        assert code == 552 and msg.startswith(b"5.3.4")
    assert r.store.depth()["queued"] == 0


def test_recipient_limit(relay_factory, sink):
    r = relay_factory(sink.port, smtp={"max_recipients": 3})
    with r.smtp() as c:
        c.ehlo()
        c.mail("shop@boutique.example")
        for i in range(3):
            assert c.rcpt(f"r{i}@example.org")[0] == 250
        code, msg = c.rcpt("r3@example.org")
        assert code == 452 and msg.startswith(b"4.5.3")


def test_store_failure_answers_451_and_never_250(relay, sink):
    with relay.store.engine.begin() as conn:
        conn.execute(text("DROP TABLE events"))  # a real fault: the commit cannot succeed
    with relay.smtp() as c, pytest.raises(smtplib.SMTPDataError) as e:
        c.sendmail("shop@boutique.example", ["a@example.org"], message())
    assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.3.0")
    assert b"events" not in e.value.smtp_error  # no internals leaked
    with relay.store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar() == 0


def test_unexpected_error_is_451_without_leaking(relay, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(relay.relay.handler, "source", boom)
    with relay.smtp() as c, pytest.raises(smtplib.SMTPDataError) as e:
        c.sendmail("shop@boutique.example", ["a@example.org"], message())
    assert e.value.smtp_code == 451 and b"secret" not in e.value.smtp_error


def test_smtputf8_and_8bit_message_stored_byte_exact(relay, sink):
    body = "Prénom: Zoë — «merci» 😀\r\n"
    raw = message(subject="Livraison prévue", body=body)
    with relay.smtp() as c:
        c.ehlo()
        c.sendmail("shop@boutique.example", ["zoë@exemple.fr"], raw, mail_options=["SMTPUTF8"])
    relay.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    assert sink.messages[0].rcpt_tos == ["zoë@exemple.fr"]
    assert sink.messages[0].data.endswith(raw.split(b"\r\n\r\n", 1)[1])
    assert relay.store.history("ZOË@exemple.fr")[0]["subject"] == "Livraison prévue"


def test_session_cap_gives_421(relay_factory, sink):
    r = relay_factory(sink.port, smtp={"max_sessions": 2})
    held = [r.smtp(), r.smtp()]
    try:
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
            assert s.recv(200).startswith(b"421 4.3.2")
    finally:
        for c in held:
            c.quit()


def test_bare_lf_dot_does_not_end_the_message(relay, sink):
    """SMTP smuggling (CVE-2023-51764 family): only <CRLF>.<CRLF> ends DATA."""
    smuggled = (b"Subject: first\r\n\r\nbody\n.\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<x@example.org>\r\n"
                b"DATA\r\nSubject: second\r\n\r\nsmuggled\r\n")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        f = s.makefile("rb")
        f.readline()
        for cmd in (b"EHLO t\r\n", b"MAIL FROM:<shop@boutique.example>\r\n", b"RCPT TO:<a@example.org>\r\n",
                    b"DATA\r\n"):
            s.sendall(cmd)
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
        s.sendall(smuggled + b".\r\n")
        assert f.readline().startswith(b"250 2.0.0")
        s.sendall(b"QUIT\r\n")
    relay.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    import time

    time.sleep(0.3)
    assert len(sink.messages) == 1 and b"smuggled" in sink.messages[0].data
