"""The rewrap inside the relay: shipped skins, DKIM re-signing verified by dkimpy, fail-open to the sink."""

from __future__ import annotations

import base64
import email
import shutil
import subprocess
import urllib.request
from email.policy import default
from pathlib import Path

import dkim
import pytest

from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[2]


def _parse(data: bytes):
    return email.message_from_bytes(data, policy=default)


def test_order_confirmation_is_rewrapped_with_shipped_skin(relay_factory, sink):
    r = relay_factory(sink.port, paths={"skins": str(ROOT / "skins")}, rewrap={"default_skin": "boutique"})
    raw = (FIXTURES / "order_confirmation_30k.eml").read_bytes()
    with r.smtp() as c:
        c.sendmail("shop@maison-lumiere.example", ["camille@example.org"], raw)
    r.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    msg = _parse(sink.messages[0].data)
    assert msg["X-Relay-Skin"] == "boutique"
    assert msg.get_content_type() in ("multipart/alternative", "multipart/mixed", "multipart/related")
    html = msg.get_body(("html",)).get_content()
    assert "Maison Lumi" in html and "<script" not in html.lower()
    r.wait_for(lambda: r.statuses("camille@example.org") == ["sent"], what="sent recorded")
    assert r.store.history("camille@example.org")[0]["skin"] == "boutique"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test key")
def test_rewrapped_mail_is_dkim_signed_and_verifies(relay_factory, sink, tmp_path):
    pem = subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout
    der = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem, capture_output=True, check=True
    ).stdout
    (tmp_path / "dkim.pem").write_bytes(pem)
    r = relay_factory(
        sink.port,
        paths={"skins": str(ROOT / "skins")},
        rewrap={"dkim": [{"domain": "maison-lumiere.example", "selector": "relay", "key_file": "dkim.pem"}]},
    )
    raw = (FIXTURES / "order_confirmation_30k.eml").read_bytes()
    with r.smtp() as c:
        c.sendmail("shop@maison-lumiere.example", ["camille@example.org"], raw)
    r.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    out = sink.messages[0].data
    assert out.count(b"DKIM-Signature:") == 1

    def dns(name, timeout=5):
        if name == b"relay._domainkey.maison-lumiere.example.":
            return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
        return None

    assert dkim.verify(out, dnsfunc=dns)


def test_a_broken_skin_fails_open_and_is_counted(relay_factory, sink):
    r = relay_factory(
        sink.port, paths={"skins": str(FIXTURES / "skins")}, rewrap={"default_skin": "explosive"}
    )
    raw = (
        b"From: shop@boutique.example\r\nTo: a@example.org\r\nSubject: BOOM order\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>Votre commande</p>\r\n"
    )
    with r.smtp() as c:
        c.sendmail("shop@boutique.example", ["a@example.org"], raw)
    r.wait_for(lambda: len(sink.messages) == 1, what="delivery of the original")
    got = sink.messages[0].data
    assert got.endswith(b"<p>Votre commande</p>\r\n") and b"X-Relay-Skin" not in got
    r.wait_for(lambda: r.statuses("a@example.org") == ["sent"], what="sent")
    assert "ZeroDivisionError" in r.store.history("a@example.org")[0]["transform_error"]
    text = urllib.request.urlopen(f"http://{r.settings.http.listen}/metrics", timeout=5).read().decode()
    assert 'relay_transform_failures_total{reason="exception"}' in text  # process-wide: counts accumulate


def test_signed_message_passes_through_byte_exact(relay_factory, sink):
    r = relay_factory(sink.port, paths={"skins": str(ROOT / "skins")})
    raw = (FIXTURES / "signed_smime_8bit.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    with r.smtp() as c:
        c.sendmail("shop@boutique.example", ["a@example.org"], raw)
    r.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    got = sink.messages[0].data
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert got.endswith(body) and b"X-Relay-Skin" not in got
