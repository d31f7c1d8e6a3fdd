"""Business rules inside the running relay: cross-sell logged per recipient, one-click unsubscribe over
real HTTP then suppression, a follow-up that comes due (moved clock) and reaches the sink, hot reload of a
good and of a broken rule edit."""

from __future__ import annotations

import shutil
import time
import urllib.parse
import urllib.request
from email import message_from_bytes
from email.policy import compat32, default
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, RelayThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
DAY = 86400.0


@pytest.fixture
def shop(tmp_path, db_url, sink):
    """A relay with copies of the shipped rules and skins (tests edit them) and a movable clock."""
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    shutil.copytree(ROOT / "skins", tmp_path / "skins")
    offset = {"s": 0.0}
    settings = make_settings(tmp_path, db_url, sink.port, paths={"rules": "rules", "skins": "skins"})
    r = RelayThread(settings, clock=lambda: time.time() + offset["s"]).start()
    r.offset = offset
    yield r
    r.stop()


def newsletter(n: int = 1) -> bytes:
    return (
        f"From: Maison Lumiere <news@maison-lumiere.example>\r\nTo: camille@example.org\r\n"
        f"Subject: Newsletter {n}\r\nList-Id: <news.maison-lumiere.example>\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n<h1>Nouveautés</h1><p>Le lin lavé.</p>\r\n"
    ).encode()


def send(relay, raw: bytes, rcpt: str = "camille@example.org", sender: str = "shop@maison-lumiere.example"):
    with relay.smtp() as c:
        c.sendmail(sender, [rcpt], raw)


def test_order_confirmation_gets_a_cross_sell_block_logged_per_recipient(shop, sink):
    send(shop, (FIXTURES / "order_confirmation_30k.eml").read_bytes())
    shop.wait_for(lambda: shop.statuses("camille@example.org") == ["sent"], what="sent")
    html = message_from_bytes(sink.messages[0].data, policy=default).get_body(("html",)).get_content()
    assert 'data-relay-block="complementary"' in html
    entry = shop.store.history("camille@example.org")[0]
    assert entry["blocks"] == ["complementary"] and entry["products"]
    assert entry["kind"] == "order_confirmation" and entry["versions"]["rules"]
    assert all(p not in ("", None) for p in entry["products"])


def test_one_click_unsubscribe_suppresses_marketing_not_transactional(shop, sink):
    send(shop, newsletter(1))
    shop.wait_for(lambda: len(sink.messages) == 1, what="first newsletter")
    msg = message_from_bytes(sink.messages[0].data, policy=default)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = msg["List-Unsubscribe"].split(",")[0].strip("<> ")
    assert url.startswith(f"http://{shop.settings.http.listen}/unsubscribe?t=")
    # RFC 8058: a POST with List-Unsubscribe=One-Click, no cookies, no confirmation page
    body = urllib.parse.urlencode({"List-Unsubscribe": "One-Click"}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as r:
        assert r.status == 200
    send(shop, newsletter(2))
    shop.wait_for(lambda: shop.statuses("camille@example.org")[0] == "suppressed", what="suppressed")
    send(
        shop,
        b"From: shop@maison-lumiere.example\r\nTo: camille@example.org\r\n"
        b"Subject: Votre mot de passe\r\n\r\nLien de reinitialisation.\r\n",
    )
    shop.wait_for(lambda: len(sink.messages) == 2, what="transactional still sent")
    assert "mot de passe" in message_from_bytes(sink.messages[1].data, policy=default)["Subject"]
    assert [m["subject"] for m in shop.store.history("camille@example.org")] == [
        "Votre mot de passe",
        "Newsletter 2",
        "Newsletter 1",
    ]


def test_unsubscribe_page_get_then_post(shop):
    from relay.rules import load_or_create_secret, make_token

    token = make_token(load_or_create_secret(shop.settings.paths.secret), "paul@example.org", time.time())
    url = f"http://{shop.settings.http.listen}/unsubscribe?t={urllib.parse.quote(token)}"
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "paul@example.org" in page and "<form" in page
    urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=10)
    assert shop.relay.ledger.is_suppressed("paul@example.org")
    bad = f"http://{shop.settings.http.listen}/unsubscribe?t=forged"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=10)
    assert e.value.code == 400


def test_follow_up_becomes_due_and_is_delivered(shop, sink):
    send(shop, (FIXTURES / "order_confirmation_30k.eml").read_bytes())
    shop.wait_for(lambda: len(sink.messages) == 1, what="order confirmation")
    shop.wait_for(lambda: shop.relay.ledger.followups_for("camille@example.org"), what="follow-up scheduled")
    time.sleep(2.5)
    assert len(sink.messages) == 1  # not before its time
    shop.offset["s"] = 3 * DAY + 60
    shop.wait_for(lambda: len(sink.messages) == 2, timeout=60, what="follow-up delivered")
    follow = message_from_bytes(sink.messages[1].data, policy=default)
    assert "accompagner" in follow["Subject"]
    entry = shop.store.history("camille@example.org")[0]
    assert entry["source"] == "relay-followup" and entry["status"] in ("sent", "queued")


def test_hot_reload_good_edit_then_broken_edit(shop, sink):
    rules = shop.settings.paths.rules / "10-classify.toml"
    text = rules.read_text()
    rules.write_text(text.replace("'mot de passe', ", "'mot de passe', 'code secret', "))
    time.sleep(2.2)  # the pipeline looks for edits every 2 s
    send(
        shop,
        b"From: shop@maison-lumiere.example\r\nTo: camille@example.org\r\n"
        b"Subject: Votre code secret\r\n\r\n1234\r\n",
    )
    shop.wait_for(lambda: shop.statuses("camille@example.org") == ["sent"], what="sent")
    assert shop.store.history("camille@example.org")[0]["kind"] == "password_reset"
    rules.write_text(text + '\n[[rule]]\nname = "broken"\nunknown_key = 1\n')
    time.sleep(2.2)
    send(shop, newsletter(3))
    shop.wait_for(
        lambda: shop.statuses("camille@example.org") == ["sent", "sent"],
        what="still delivered with the last good rules",
    )
    assert shop.store.history("camille@example.org")[0]["kind"] == "newsletter"
    metrics = urllib.request.urlopen(f"http://{shop.settings.http.listen}/metrics", timeout=5).read().decode()
    assert 'relay_reload_failures_total{kind="rules"}' in metrics


def test_follow_up_of_a_signed_order_finds_the_products_when_due(shop, sink):
    """A signed order confirmation is forwarded untouched (no block): its ordered products are read from
    the stored original when the follow-up comes due, not on the delivery hot path."""
    order = (FIXTURES / "order_confirmation_30k.eml").read_bytes()
    parsed = message_from_bytes(order, policy=compat32)
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in parsed.items()
        if k.lower() not in ("content-type", "content-transfer-encoding", "mime-version")
    ).encode()
    inner = f"Content-Type: {' '.join(parsed['Content-Type'].split())}\r\n\r\n".encode()
    signed = (
        head + b'MIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol="application/pkcs7-signature";'
        b' micalg=sha-256; boundary="sig"\r\n\r\n--sig\r\n'
        + inner
        + order.split(b"\r\n\r\n", 1)[1]
        + b"\r\n--sig\r\nContent-Type: application/pkcs7-signature\r\n\r\n"
        + b"MIAGCSqGSIb3DQEHAqCAMIACAQE=\r\n--sig--\r\n"
    )
    send(shop, signed)
    shop.wait_for(lambda: shop.statuses("camille@example.org") == ["sent"], what="signed order sent")
    assert sink.messages[0].data.endswith(signed.split(b"\r\n\r\n", 1)[1])  # untouched
    # the follow-up is scheduled by the after-sent bookkeeping, written just after the outcome
    shop.wait_for(lambda: shop.relay.ledger.followups_for("camille@example.org"), what="follow-up scheduled")
    (f,) = shop.relay.ledger.followups_for("camille@example.org")
    assert f.payload["ordered_pending"] is True and f.payload["ordered"] == []
    shop.offset["s"] = 3 * DAY + 60
    shop.wait_for(lambda: len(sink.messages) == 2, timeout=60, what="follow-up delivered")
    follow = message_from_bytes(sink.messages[1].data, policy=default)
    html = follow.get_body(("html",)).get_content()
    assert "accompagner" in follow["Subject"]
    assert "Nous espérons que votre" in html  # it knows what the signed order contained


@pytest.mark.parametrize("rollout", ['mode = "shadow"', "canary = 0"])
def test_skin_in_shadow_or_canary_sends_the_original_and_logs_why(shop, sink, rollout):
    toml = shop.settings.paths.skins / "boutique" / "skin.toml"
    toml.write_text(toml.read_text().replace("[skin]\n", f"[skin]\n{rollout}\n", 1))
    time.sleep(2.2)  # picked up by the running relay
    raw = (FIXTURES / "order_confirmation_30k.eml").read_bytes()
    send(shop, raw)
    shop.wait_for(lambda: shop.statuses("camille@example.org") == ["sent"], what="sent")
    got = sink.messages[0].data
    assert b"X-Relay-Skin" not in got and got.endswith(raw.split(b"\r\n\r\n", 1)[1])
    entry = shop.store.history("camille@example.org")[0]
    assert "original sent" in entry["rollout"]
    assert entry["products"] == []  # nothing was shown, so nothing counts against the caps
    if "shadow" in rollout:
        assert entry["skin_shadow"]["action"] == "rewrapped" and entry["skin_shadow"]["skin"] == "boutique"
