"""AUTH only under TLS, per-source limits, PROXY protocol: real sockets, a throwaway CA made here."""

from __future__ import annotations

import smtplib
import socket
import ssl
import struct
import subprocess
import sys

import pytest
import trustme

from relay.app import free_port
from relay.intake.auth import hash_password, verify_password
from tests.conftest import message

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path):
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    return {"cert": "relay.pem", "key": "relay.key"}


@pytest.fixture
def client_ctx(ca):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="module")
def shop_hash():
    return hash_password(PASSWORD)


def users(shop_hash, **limits):
    return [{"name": "shop", "password_hash": shop_hash, "source": "shop-platform",
             "allowed_senders": ["@boutique.example"], **limits}]


@pytest.fixture
def secure_relay(relay_factory, sink, tls_files, shop_hash):
    """A relay that trusts no network: every client must authenticate."""
    tls_files = dict(tls_files, implicit_listen=f"127.0.0.1:{free_port()}")
    return relay_factory(sink.port, smtp={"trusted_networks": [], "tls": tls_files,
                                          "users": users(shop_hash, max_recipients=2)})


def test_hash_password_round_trip_and_cli():
    h = hash_password("pässword")
    assert verify_password("pässword".encode(), h) and not verify_password(b"password", h)
    out = subprocess.run([sys.executable, "-m", "relay", "hash-password"], input="s3cret\n",
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("scrypt$") and verify_password(b"s3cret", out)


def test_auth_is_offered_only_after_starttls(secure_relay, client_ctx):
    with secure_relay.smtp() as c:
        c.ehlo("shop")
        assert c.has_extn("starttls") and not c.has_extn("auth")
        code, _ = c.docmd("AUTH", "PLAIN AHNob3AAeA==")
        assert code == 538  # RFC 4954: 5.7.11 encryption required for the mechanism
        c.starttls(context=client_ctx)
        c.ehlo("shop")
        assert c.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]


def test_unauthenticated_untrusted_client_cannot_relay(secure_relay, sink):
    with secure_relay.smtp() as c:
        c.ehlo()
        c.mail("shop@boutique.example")
        code, msg = c.rcpt("anyone@example.com")
        assert code == 530 and msg.startswith(b"5.7.0")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_authenticated_client_sends_and_source_is_the_user(secure_relay, sink, client_ctx, mechanism):
    with secure_relay.smtp() as c:
        c.starttls(context=client_ctx)
        c.ehlo()
        c.user, c.password = "shop", PASSWORD
        code, _ = c.auth(mechanism, getattr(c, f"auth_{mechanism.lower()}"))
        assert code == 235
        c.sendmail("orders@boutique.example", ["camille@example.org"], message())
    secure_relay.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    assert secure_relay.store.history("camille@example.org")[0]["source"] == "shop-platform"


def test_wrong_password_is_refused(secure_relay, client_ctx):
    with secure_relay.smtp() as c:
        c.starttls(context=client_ctx)
        c.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("shop", "wrong")
        assert e.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("nobody", PASSWORD)


def test_implicit_tls_listener(secure_relay, sink, client_ctx):
    listen = secure_relay.settings.smtp.tls.implicit_listen
    with smtplib.SMTP_SSL(listen.host, listen.port, context=client_ctx, timeout=10) as c:
        c.ehlo()
        assert "auth" in c.esmtp_features and "starttls" not in c.esmtp_features
        c.login("shop", PASSWORD)
        c.sendmail("orders@boutique.example", ["tls@example.org"], message())
    secure_relay.wait_for(lambda: len(sink.messages) == 1, what="delivery")


def test_sender_domain_and_recipient_limit_per_user(secure_relay, client_ctx):
    with secure_relay.smtp() as c:
        c.starttls(context=client_ctx)
        c.login("shop", PASSWORD)
        code, msg = c.mail("ceo@other.example")
        assert code == 553 and msg.startswith(b"5.7.1")
        assert c.mail("orders@boutique.example")[0] == 250
        assert c.rcpt("a@example.org")[0] == 250
        assert c.rcpt("b@example.org")[0] == 250
        code, msg = c.rcpt("c@example.org")
        assert code == 452 and msg.startswith(b"4.5.3")


def test_rate_limit_and_session_cap_per_user(relay_factory, sink, tls_files, client_ctx, shop_hash):
    r = relay_factory(sink.port, smtp={"trusted_networks": [], "tls": tls_files,
                                       "users": users(shop_hash, messages_per_minute=3, max_sessions=1)})
    with r.smtp() as c:
        c.starttls(context=client_ctx)
        c.login("shop", PASSWORD)
        for _ in range(3):
            c.sendmail("orders@boutique.example", ["r@example.org"], message())
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("orders@boutique.example", ["r@example.org"], message())
        assert e.value.smtp_code == 451 and b"4.7.1" in e.value.smtp_error
        with r.smtp() as second:
            second.starttls(context=client_ctx)
            second.login("shop", PASSWORD)
            code, msg = second.mail("orders@boutique.example")
            assert code == 451 and b"concurrent sessions" in msg


def _proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    addr = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addr)) + addr


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_gives_the_real_client_address(relay_factory, sink, version):
    r = relay_factory(sink.port, smtp={"proxy_protocol": True, "trusted_networks": ["203.0.113.0/24"]})
    header = (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 2525\r\n" if version == "v1"
              else _proxy_v2("203.0.113.7", "127.0.0.1", 40000, 2525))
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
        s.sendall(header)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        for cmd in (b"EHLO lb\r\n", b"MAIL FROM:<shop@boutique.example>\r\n", b"RCPT TO:<p@example.org>\r\n",
                    b"DATA\r\n"):
            s.sendall(cmd)
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            assert line[:1] in (b"2", b"3"), line
        s.sendall(message() + b".\r\n")
        assert f.readline().startswith(b"250 ")
    r.wait_for(lambda: r.statuses("p@example.org") == ["sent"], what="delivery")
    assert r.store.history("p@example.org")[0]["source"] == "203.0.113.7"


def test_proxy_protocol_required_when_enabled(relay_factory, sink):
    r = relay_factory(sink.port, smtp={"proxy_protocol": True, "proxy_timeout": 1})
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
        s.sendall(b"EHLO direct\r\n")
        assert s.recv(100) == b""  # closed: a client that bypasses the balancer gets nothing
