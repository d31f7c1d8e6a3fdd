"""Upstream TLS and AUTH: STARTTLS and implicit TLS to an aiosmtpd sink with a throwaway CA (trustme)."""

from __future__ import annotations

import ssl

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from relay.app import free_port
from tests.conftest import SinkHandler, message


class AuthSinkHandler(SinkHandler):
    pass


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"relay" and auth_data.password == b"pw"
    return AuthResult(success=ok)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def server_ctx(ca):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_upstream_tls_with_auth(relay_factory, server_ctx, ca_file, mode):
    handler = AuthSinkHandler()
    port = free_port()
    kwargs = {"tls_context": server_ctx} if mode == "starttls" else {"ssl_context": server_ctx}
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=_authenticator,
        auth_required=True,
        require_starttls=mode == "starttls",
        # aiosmtpd only counts STARTTLS as TLS; on an implicit-TLS port it is TLS already
        auth_require_tls=mode == "starttls",
        **kwargs,
    )
    controller.start()
    try:
        r = relay_factory(
            port, upstream={"tls": mode, "ca_file": ca_file, "username": "relay", "password": "pw"}
        )
        with r.smtp() as c:
            c.sendmail("shop@boutique.example", ["tls@example.org"], message())
        r.wait_for(lambda: len(handler.messages) == 1, what="delivery over TLS with AUTH")
        r.wait_for(lambda: r.statuses("tls@example.org") == ["sent"], what="sent")
    finally:
        controller.stop()


def test_upstream_certificate_not_trusted_is_deferred(relay_factory, server_ctx):
    handler = AuthSinkHandler()
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, tls_context=server_ctx, require_starttls=True
    )
    controller.start()
    try:
        r = relay_factory(port, upstream={"tls": "starttls"})  # the system CAs do not know our test CA
        with r.smtp() as c:
            c.sendmail("shop@boutique.example", ["untrusted@example.org"], message())
        r.wait_for(lambda: r.statuses("untrusted@example.org") == ["deferred"], what="deferred")
        assert "CERTIFICATE_VERIFY_FAILED" in r.store.history("untrusted@example.org")[0]["upstream_reply"]
        assert handler.messages == []
    finally:
        controller.stop()
