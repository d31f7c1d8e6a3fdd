"""smtplib -> relay -> aiosmtpd sink, on SQLite and PostgreSQL: per-recipient outcomes, retries, restart."""

from __future__ import annotations

import json
import urllib.request

from tests.conftest import Sink, message


def test_message_is_delivered_with_relay_id_and_trace(relay, sink):
    with relay.smtp() as c:
        code, text = c.ehlo()
        c.sendmail("shop@boutique.example", ["claire@example.org"], message())
    relay.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    got = sink.messages[0]
    assert got.mail_from == "shop@boutique.example"
    assert got.rcpt_tos == ["claire@example.org"]
    headers = got.data.split(b"\r\n\r\n", 1)[0]
    assert headers.count(b"X-Relay-Id: ") == 1
    assert b"Received: from " in headers and b"by relay.test (brand-relay)" in headers
    assert got.data.endswith(b"Merci pour votre commande.\r\n")
    relay.wait_for(lambda: relay.statuses("claire@example.org") == ["sent"], what="sent status")
    entry = relay.store.history("Claire@Example.org")[0]
    assert entry["subject"] == "Votre commande n°1042"
    assert entry["upstream_reply"].startswith("250")
    queue_id = headers.split(b"X-Relay-Id: ")[1].split(b"\r\n")[0].decode()
    assert entry["queue_id"] == queue_id
    assert [e["kind"] for e in entry["events"]] == ["received", "sent"]


def test_each_recipient_gets_its_own_outcome(relay, sink):
    rcpts = ["ok@example.org", "reject-me@example.org", "defer-me@example.org"]
    with relay.smtp() as c:
        c.sendmail("shop@boutique.example", rcpts, message(to="ok@example.org"))
    relay.wait_for(lambda: relay.statuses("ok@example.org") == ["sent"], what="ok sent")
    relay.wait_for(lambda: relay.statuses("reject-me@example.org") == ["failed"], what="reject failed")
    relay.wait_for(lambda: relay.statuses("defer-me@example.org") == ["deferred"], what="defer deferred")
    failed = relay.store.history("reject-me@example.org")[0]
    assert failed["upstream_reply"].startswith("550 ") and "No such user" in failed["upstream_reply"]
    deferred = relay.store.history("defer-me@example.org")[0]
    assert deferred["upstream_reply"].startswith("451 ")
    assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["ok@example.org"]
    # the deferred one is retried with back-off (attempts grow), never sent, never dropped
    relay.wait_for(lambda: relay.store.history("defer-me@example.org")[0]["attempts"] >= 3, timeout=40,
                   what="retries")
    assert relay.statuses("defer-me@example.org") in (["deferred"], ["queued"])


def test_upstream_down_then_up(relay_factory, tmp_path):
    sink = Sink()  # not started: connections are refused
    r = relay_factory(sink.port)
    with r.smtp() as c:
        c.sendmail("shop@boutique.example", ["paul@example.org"], message(to="paul@example.org"))
    r.wait_for(lambda: r.statuses("paul@example.org") == ["deferred"], what="deferred while down")
    assert "connect" in r.store.history("paul@example.org")[0]["upstream_reply"]
    sink.start()
    try:
        r.wait_for(lambda: r.statuses("paul@example.org") == ["sent"], timeout=20, what="sent once up")
        assert len(sink.messages) == 1
    finally:
        sink.stop()


def test_restart_resumes_a_full_queue(relay_factory):
    sink = Sink()
    first = relay_factory(sink.port, delivery={"retry_base": 60, "retry_max": 60})
    rcpts = [f"r{i}@example.org" for i in range(30)]
    with first.smtp() as c:
        for rcpt in rcpts:
            c.sendmail("shop@boutique.example", [rcpt], message(to=rcpt))
    first.wait_for(lambda: first.store.depth()["deferred"] == 30, what="all deferred")
    first.stop()
    sink.start()
    try:
        second = relay_factory(sink.port)
        second.store.retry_now(["all"])
        second.wait_for(lambda: len(sink.messages) == 30, timeout=30, what="all delivered after restart")
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(rcpts)
    finally:
        sink.stop()


def test_reply_rules_override_classification(relay_factory, sink):
    r = relay_factory(sink.port, delivery={"reply_rules": [{"code": 550, "match": "no such user",
                                                           "action": "defer"}]})
    with r.smtp() as c:
        c.sendmail("shop@boutique.example", ["reject-rate@example.org"], message())
    r.wait_for(lambda: r.statuses("reject-rate@example.org") == ["deferred"], what="550 deferred by rule")


def test_queue_lifetime_fails_for_good(relay_factory, sink):
    r = relay_factory(sink.port, delivery={"queue_lifetime": 1.0})
    with r.smtp() as c:
        c.sendmail("shop@boutique.example", ["defer-long@example.org"], message())
    r.wait_for(lambda: r.statuses("defer-long@example.org") == ["failed"], timeout=15, what="expired")
    entry = r.store.history("defer-long@example.org")[0]
    assert any("lifetime" in (e["detail"] or "") for e in entry["events"])


def test_metrics_and_health(relay, sink):
    with relay.smtp() as c:
        c.sendmail("shop@boutique.example", ["m@example.org", "reject@example.org"], message())
    relay.wait_for(lambda: len(sink.messages) == 1, what="delivery")
    relay.wait_for(lambda: relay.statuses("reject@example.org") == ["failed"], what="failure")
    http = relay.settings.http.listen
    text = urllib.request.urlopen(f"http://{http}/metrics", timeout=5).read().decode()
    for name in ("relay_messages_received_total", "relay_recipients_delivered_total",
                 "relay_recipients_failed_total", "relay_recipients_deferred_total", "relay_queue_depth",
                 "relay_transform_seconds_bucket", "relay_delivery_seconds_bucket", "relay_smtp_sessions",
                 "relay_crosssell_injected_total"):
        assert name in text, name
    assert "example.org" not in text  # never an address as a label
    health = json.loads(urllib.request.urlopen(f"http://{http}/healthz", timeout=5).read())
    assert health == {"status": "ok", "reason": None}
