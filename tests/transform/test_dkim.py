"""DKIM: re-sign rewrapped output and verify it with dkimpy; strip; strict DMARC; verify_dkim."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import dkim
import pytest

from relay.transform import Decisions, DkimKey, DkimSigningError, transform_fail_open, verify_dkim

from .conftest import header_count, load, parse, run

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test key")


@pytest.fixture(scope="module")
def keypair():
    """(PEM private key, DNS TXT record) of a fresh 2048-bit RSA key."""
    pem = subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout
    der = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem, capture_output=True, check=True
    ).stdout
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


@pytest.fixture(scope="module")
def dnsfunc(keypair):
    def lookup(name, timeout=5):
        if name == b"relay2025._domainkey.maison-lumiere.example.":
            return keypair[1]
        return None

    return lookup


@pytest.fixture(scope="module")
def keys(keypair):
    return {"maison-lumiere.example": DkimKey("maison-lumiere.example", "relay2025", keypair[0])}


@pytest.mark.parametrize(
    "name",
    [
        "forwarded_rfc822_dkim.eml",
        "order_confirmation_30k.eml",
        "related_inline_images.eml",
        "text_only_utf8_lf.eml",
    ],
)
def test_rewrap_is_signed_and_verifies(name, skins, keys, dnsfunc):
    out, report = run(load(name), skins, dkim_keys=keys)
    assert report.action == "rewrapped" and report.dkim == "signed"
    assert header_count(out, "DKIM-Signature") == 1 and out.startswith(b"DKIM-Signature:")
    sig = parse(out)["DKIM-Signature"]
    assert "c=relaxed/relaxed" in sig and "d=maison-lumiere.example" in sig and "s=relay2025" in sig
    signed = re.search(r"h=([^;]+)", sig).group(1).replace(" ", "").split(":")
    assert signed.count("from") == 2 and {"subject", "date", "message-id", "to", "content-type"} <= set(
        signed
    )
    assert dkim.verify(out, dnsfunc=dnsfunc)
    assert verify_dkim(out, dnsfunc=dnsfunc) == "pass"
    # tampering breaks it
    assert verify_dkim(out.replace(b"\nSubject: ", b"\nSubject: Re: ", 1), dnsfunc=dnsfunc) == "fail"
    assert verify_dkim(out[:-40] + b"tampered body bytes" + out[-21:], dnsfunc=dnsfunc) == "fail"


def test_key_beats_dmarc_strict(skins, keys, dnsfunc):
    out, report = run(
        load("forwarded_rfc822_dkim.eml"),
        skins,
        dkim_keys=keys,
        dmarc_strict_domains=frozenset({"maison-lumiere.example"}),
    )
    assert report.action == "rewrapped" and report.dkim == "signed"
    assert verify_dkim(out, dnsfunc=dnsfunc) == "pass"


def test_signing_failure_raises_and_is_not_swallowed(skins):
    bad = {"maison-lumiere.example": DkimKey("maison-lumiere.example", "relay2025", b"not a key")}
    with pytest.raises(DkimSigningError):
        run(load("forwarded_rfc822_dkim.eml"), skins, dkim_keys=bad)
    with pytest.raises(DkimSigningError):
        transform_fail_open(
            load("forwarded_rfc822_dkim.eml"),
            recipient="a@b.example",
            queue_id="Q",
            decisions=Decisions(skin="plain"),
            skins=skins,
            dkim_keys=bad,
        )


def test_passthrough_keeps_original_signature_valid(skins, keys, dnsfunc):
    # a message signed by its origin, then passed through (auto-reply): still verifies
    raw = load("auto_reply.eml")
    signed = dkim.sign(
        raw,
        b"relay2025",
        b"maison-lumiere.example",
        keys["maison-lumiere.example"].private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    signed += raw
    assert verify_dkim(signed, dnsfunc=dnsfunc) == "pass"
    out, report = run(signed, skins, dkim_keys=keys)
    assert report.action == "passthrough" and report.dkim == "untouched"
    assert verify_dkim(out, dnsfunc=dnsfunc) == "pass"


def test_verify_dkim_none_fail_temperror(keys):
    assert verify_dkim(load("latin1_text_qp.eml")) == "none"

    def nokey(name, timeout=5):
        return None

    def timeout_(name, timeout=5):
        raise dkim.DnsTimeoutError("timed out")

    def broken(name, timeout=5):
        raise OSError("network unreachable")

    stale = load("forwarded_rfc822_dkim.eml")
    assert verify_dkim(stale, dnsfunc=nokey) == "fail"
    assert verify_dkim(stale, dnsfunc=timeout_) == "temperror"
    assert verify_dkim(stale, dnsfunc=broken) == "temperror"
