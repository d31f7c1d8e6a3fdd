"""The unsubscribe endpoint over real HTTP (wsgiref on loopback); follow-ups from due to a real SMTP sink."""

from __future__ import annotations

import email
import re
import smtplib
import threading
import urllib.error
import urllib.parse
import urllib.request
from email.policy import default
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from relay.rules import make_token
from relay.web.unsubscribe import UnsubscribeApp

from .conftest import SECRET, T0, facts, msg

DAY = 86400.0
NEWS = msg("Newsletter de novembre", headers="Precedence: bulk\r\n")


class _Quiet(WSGIRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def http(ledger):
    clock = {"now": T0}
    hooked = []
    app = UnsubscribeApp(ledger, SECRET, clock=lambda: clock["now"], on_unsubscribe=hooked.append)
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}", clock, hooked
    server.shutdown()
    server.server_close()


def fetch(url, data=None, content_type="application/x-www-form-urlencoded"):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def unsubscribe_link(book, rcpt, now, base):
    d = book.decide(facts(NEWS), rcpt, None, now)
    url = re.search(r"<(https://[^>]+)>", dict(d.decisions.set_headers)["List-Unsubscribe"]).group(1)
    return base + url[url.index("/unsubscribe") :]


def test_one_click_post_suppresses_marketing_only(book, ledger, http):
    base, _clock, hooked = http
    link = unsubscribe_link(book, "Claire@Example.org", T0, base)
    status, body = fetch(link, b"List-Unsubscribe=One-Click")
    assert status == 200 and "claire@example.org" in body and hooked == ["claire@example.org"]
    assert [s.reason for s in ledger.list_suppressions()] == ["one-click"]
    assert book.decide(facts(NEWS), "claire@example.org", ledger, T0 + 60).suppressed
    order = book.decide(
        facts(msg("Votre commande"), source="127.0.0.1"), "claire@example.org", ledger, T0 + 60
    )
    assert not order.suppressed
    assert fetch(link, b"List-Unsubscribe=One-Click")[0] == 200  # idempotent


def test_get_shows_confirmation_page_then_form_post(book, ledger, http):
    base, _clock, _ = http
    link = unsubscribe_link(book, "bob@example.org", T0, base)
    status, page = fetch(link)
    assert status == 200 and "bob@example.org" in page and '<form method="post"' in page
    assert not ledger.is_suppressed("bob@example.org")  # GET never unsubscribes (link scanners)
    action = re.search(r'action="([^"]+)"', page).group(1).replace("&amp;", "&")
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]+)"', page))
    status, done = fetch(base + action, urllib.parse.urlencode(fields).encode())
    assert status == 200 and "Désinscription confirmée" in done
    assert ledger.is_suppressed("bob@example.org")


def test_bad_forged_and_expired_tokens(ledger, http):
    base, clock, _ = http
    assert fetch(base + "/unsubscribe?t=garbage")[0] == 400
    forged = make_token(b"another-secret", "eve@example.org", T0)
    assert fetch(f"{base}/unsubscribe?t={forged}", b"List-Unsubscribe=One-Click")[0] == 400
    tok = make_token(SECRET, "old@example.org", T0, lifetime=DAY)
    clock["now"] = T0 + 2 * DAY
    assert fetch(f"{base}/unsubscribe?t={tok}", b"List-Unsubscribe=One-Click")[0] == 400
    assert fetch(base + "/elsewhere")[0] == 404
    assert ledger.list_suppressions() == []


def test_followup_becomes_due_and_is_delivered(book, ledger, order_raw, sink):
    rcpt = "camille.durand@example.org"
    d = book.decide(facts(order_raw), rcpt, ledger, T0)
    d.record(ledger, rcpt, "Q0001", T0)
    assert ledger.due_followups(T0 + 2 * DAY) == []
    (due,) = ledger.due_followups(T0 + 3 * DAY, limit=10)
    raw, why = book.prepare_followup(due, ledger, T0 + 3 * DAY)
    assert why == "rendered"
    assert raw == book.prepare_followup(due, ledger, T0 + 3 * DAY)[0]  # pure: same inputs, same bytes
    m = email.message_from_bytes(raw, policy=default)
    assert m["To"] == rcpt and m["X-Relay-Category"] == "marketing" and m["X-Relay-Kind"] == "merci-commande"
    assert m["Subject"].startswith("Bougie parfumée Figuier") and "accompagner" in m["Subject"]
    html = m.get_body(("html",)).get_content()
    assert "Merci encore" in html and "€" in html
    offered = re.findall(r"/produits/([a-z]{2}\d{3})\"", html)
    assert offered and not {o.upper() for o in offered} & set(due.payload["ordered"])
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        s.sendmail("bounces@maison-lumiere.example", [rcpt], raw)
    assert ledger.mark_followup_done(due.id, T0 + 3 * DAY, result="queued Q0002")
    assert sink.messages[0].rcpt_tos == [rcpt] and b"merci-commande" in sink.messages[0].data
    # the follow-up goes back through the rules as marketing: List-Unsubscribe, suppression
    again = book.decide(facts(raw, source="relay-followup"), rcpt, ledger, T0 + 3 * DAY)
    assert again.decisions.category == "marketing" and "List-Unsubscribe" in dict(again.decisions.set_headers)


def test_unsubscribe_cancels_followup_and_prepare_refuses(book, ledger, order_raw):
    rcpt = "camille.durand@example.org"
    d = book.decide(facts(order_raw), rcpt, ledger, T0)
    d.record(ledger, rcpt, "Q0001", T0)
    (due,) = ledger.due_followups(T0 + 3 * DAY)
    ledger.add_suppression(rcpt, reason="one-click", now=T0 + DAY)
    assert ledger.due_followups(T0 + 3 * DAY) == []
    assert book.prepare_followup(due, ledger, T0 + 3 * DAY) == (None, "recipient unsubscribed")


def test_scheduler_tick_queues_once_cancels_and_retries(book, ledger, order_raw):
    from relay.rules.scheduler import run_due_followups

    for i, rcpt in enumerate(["a@example.org", "b@example.org", "c@example.org"]):
        book.decide(facts(order_raw), rcpt, ledger, T0).record(ledger, rcpt, f"Q{i}", T0)
    ledger.add_suppression("b@example.org", now=T0)  # cancels b's follow-up at once
    queued = []

    def enqueue(raw, rcpt, mail_from):
        if rcpt == "c@example.org" and not any(r == "c-failed" for r, *_ in queued):
            queued.append(("c-failed",))
            raise OSError("store down")
        queued.append((rcpt, mail_from, raw))
        return f"QF{len(queued)}"

    now = T0 + 3 * DAY
    assert run_due_followups(book, ledger, enqueue, now) == {"queued": 1, "cancelled": 0, "failed": 1}
    assert [q[0] for q in queued] == ["a@example.org", "c-failed"]
    assert queued[0][1] == "bounces@maison-lumiere.example"  # the sender profile's return_path
    assert run_due_followups(book, ledger, enqueue, now) == {"queued": 0, "cancelled": 0, "failed": 0}
    assert run_due_followups(book, ledger, enqueue, now + 301)["queued"] == 1  # c retried
    (fa,) = ledger.followups_for("a@example.org")
    assert fa.status == "done"
    assert [f.status for f in ledger.followups_for("b@example.org")] == ["cancelled"]
