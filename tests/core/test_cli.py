"""The `relay` command as users run it: history and queue against a running `relay serve`, config errors.

The relay is the real subprocess (two worker processes) in front of an aiosmtpd sink, on SQLite and on
PostgreSQL; every CLI call is its own `python -m relay` process, as it would be next to a live relay.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import smtplib
from pathlib import Path

import pytest

from tests.conftest import Sink, message
from tests.core.test_lifecycle import (
    ROOT,
    RelayProcess,
    open_store,
    queue_id_of,
    relay_config,
    relay_ids,
    run_cli,
    wait_until,
    write_config,
)

STATUSES = {"queued", "sent", "deferred", "failed", "suppressed"}


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture
def serving(tmp_path, db_url, sink):
    """`relay serve` with retries far away (300 s), so deferred entries wait for `relay queue retry`."""
    config = relay_config(tmp_path, db_url, sink.port, delivery={"retry_base": 300.0, "retry_max": 600.0})
    relay = RelayProcess(config)
    try:
        yield relay.start()
    finally:
        relay.cleanup()


def send(port: int, rcpt: str, subject: str) -> tuple[str, str]:
    """One message over smtplib; returns (queue id from the 250, Message-ID sent)."""
    raw = message(subject=subject, to=rcpt)
    message_id = re.search(rb"^Message-ID: (<[^>]+>)", raw, re.MULTILINE).group(1).decode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo()
        c.mail("shop@boutique.example")
        code, text = c.rcpt(rcpt)
        assert code == 250, text
        code, text = c.data(raw)
        assert code == 250, text
    return queue_id_of(text.decode()), message_id


def cli_ok(*args: str) -> str:
    r = run_cli(*args)
    assert r.returncode == 0, f"relay {' '.join(args)} exited {r.returncode}:\n{r.stderr}"
    return r.stdout


def test_history_and_queue_while_serving(serving, sink, db_url):
    cfg = str(serving.config)
    first, first_mid = send(serving.port, "claire@example.org", "Première commande n°1")
    second, second_mid = send(serving.port, "Claire@Example.org", "Commande expédiée n°1")
    rejected, _ = send(serving.port, "reject-x@example.org", "Mot de passe")
    deferred, _ = send(serving.port, "defer-x@example.org", "Livraison")
    store = open_store(db_url)
    try:

        def status(address: str) -> list[str]:
            return [e["status"] for e in store.history(address)]

        wait_until(lambda: status("claire@example.org") == ["sent", "sent"], 20, "claire's two sent")
        wait_until(lambda: status("reject-x@example.org") == ["failed"], 10, "550 recorded as failed")
        wait_until(lambda: status("defer-x@example.org") == ["deferred"], 10, "451 recorded as deferred")
        assert store.history("reject-x@example.org")[0]["upstream_reply"].startswith("550")

        # -- relay history --json: newest first, the public fields
        entries = json.loads(cli_ok("history", "CLAIRE@example.org", "--json", "--config", cfg))
        assert isinstance(entries, list) and len(entries) == 2
        assert [e["queue_id"] for e in entries] == [second, first]
        for e in entries:
            for key in (
                "queue_id",
                "message_id",
                "subject",
                "received_at",
                "status",
                "skin",
                "blocks",
                "upstream_reply",
            ):
                assert key in e, key
            assert e["status"] in STATUSES and e["status"] == "sent"
            assert isinstance(e["blocks"], list)
            assert e["upstream_reply"].startswith("250")
            dt.datetime.fromisoformat(e["received_at"])
        assert entries[0]["subject"] == "Commande expédiée n°1" and entries[0]["message_id"] == second_mid
        assert entries[1]["subject"] == "Première commande n°1" and entries[1]["message_id"] == first_mid
        assert entries[0]["received_at"] >= entries[1]["received_at"]

        # -- plain relay history: one readable block per message, newest first
        text = cli_ok("history", "claire@example.org", "--config", cfg)
        assert text.index(second) < text.index(first)
        assert "Commande expédiée n°1" in text and "Première commande n°1" in text and "sent" in text
        nobody = cli_ok("history", "nobody@example.org", "--config", cfg)
        assert "no messages for nobody@example.org" in nobody

        # -- relay queue: deferred and failed entries, with their queue ids and last replies
        listing = cli_ok("queue", "--config", cfg)
        assert deferred in listing and rejected in listing
        assert "defer-x@example.org" in listing and "451" in listing
        assert "reject-x@example.org" in listing and "550" in listing
        assert first not in listing and second not in listing  # sent: out of the queue

        # -- relay queue retry <queue id>: a deferred one is due now, delivered once the sink accepts
        sink.handler.fail_all_with = "451 4.3.0 Try again later"
        later, _ = send(serving.port, "later@example.org", "Votre facture")
        wait_until(lambda: status("later@example.org") == ["deferred"], 10, "deferred by the sink")
        sink.handler.fail_all_with = None
        entry = store.history("later@example.org")[0]
        assert entry["attempts"] == 1 and entry["upstream_reply"].startswith("451")
        assert not any(r["due"] for r in store.listing(("deferred",)))  # next tries in 300 s
        assert "1 recipient(s) due now" in cli_ok("queue", "retry", later, "--config", cfg)
        wait_until(lambda: later in relay_ids(sink), 10, "retried message delivered")
        wait_until(lambda: status("later@example.org") == ["sent"], 10, "retried message recorded sent")
        assert relay_ids(sink).count(later) == 1
        assert "defer-x@example.org" not in [r for m in sink.messages for r in m.rcpt_tos]

        # -- relay queue delete <queue id>: out of the queue, kept in the timeline as failed
        assert "1 recipient(s) deleted" in cli_ok("queue", "delete", deferred, "--config", cfg)
        rows = json.loads(cli_ok("queue", "--state", "all", "--json", "--config", cfg))
        assert {(r["queue_id"], r["status"]) for r in rows} == {(rejected, "failed"), (deferred, "failed")}
        gone = store.history("defer-x@example.org")[0]
        assert gone["status"] == "failed" and "deleted" in gone["upstream_reply"]
    finally:
        store.engine.dispose()
    assert serving.proc.poll() is None, "the relay must keep running while the CLI works on its store"
    serving.send_signal(signal.SIGTERM)
    assert serving.wait(10) == 0, serving.log()


def test_queue_commands_without_ids_are_refused(tmp_path):
    cfg = write_config(tmp_path / "relay.toml", {"database": {"url": f"sqlite:///{tmp_path}/relay.db"}})
    for action in ("retry", "delete"):
        r = run_cli("queue", action, "--config", str(cfg))
        assert r.returncode != 0 and f"relay queue {action}" in r.stderr


def test_check_names_an_unknown_key_and_the_file(tmp_path):
    good = write_config(
        tmp_path / "good.toml",
        {"smtp": {"listen": "127.0.0.1:2525"}, "paths": {"skins": str(ROOT / "skins")}},
    )
    r = run_cli("check", "--config", str(good))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr

    bad = write_config(tmp_path / "bad.toml", {"smtp": {"listen": "127.0.0.1:2525", "max_sesions": 10}})
    r = run_cli("check", "--config", str(bad))
    assert r.returncode != 0
    assert "smtp.max_sesions" in r.stderr and str(bad) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("upstream", {"tls": "sometimes"}, "upstream.tls"),
        ("delivery", {"workers": "two"}, "delivery.workers"),
        ("smtp", {"listen": "127.0.0.1:99999"}, "smtp.listen"),
    ],
    ids=["choice", "type", "port"],
)
def test_serve_refuses_a_bad_value_naming_key_and_file(tmp_path, section, values, key):
    bad = write_config(tmp_path / "bad.toml", {section: values, "http": {"listen": ""}})
    r = run_cli("serve", "--config", str(bad), timeout=20)
    assert r.returncode != 0
    assert key in r.stderr and str(bad) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "var").exists(), "nothing started, nothing created"


def test_preview_writes_eml_and_html(tmp_path):
    src = Path(__file__).resolve().parents[1] / "fixtures" / "order_confirmation_30k.eml"
    cfg = tmp_path / "relay.toml"
    skins = Path(__file__).resolve().parents[2] / "skins"
    cfg.write_text(f'[paths]\nskins = "{skins}"\n')
    eml, html = tmp_path / "out.eml", tmp_path / "out.html"
    r = run_cli("preview", str(src), "--config", str(cfg), "--skin", "boutique", "-o", str(eml))
    assert r.returncode == 0, r.stderr
    assert b"X-Relay-Skin: boutique" in eml.read_bytes() and "rewrapped" in r.stderr
    r = run_cli("preview", str(src), "--config", str(cfg), "--skin", "boutique", "-o", str(html))
    assert r.returncode == 0 and html.read_text().lstrip().lower().startswith("<!doctype html")
    r = run_cli("preview", str(src), "--config", str(cfg), "--skin", "nope")
    assert r.returncode == 2 and "no skin 'nope'" in r.stderr
    r = run_cli("preview", str(tmp_path / "missing.eml"), "--config", str(cfg))
    assert r.returncode == 2 and "missing.eml" in r.stderr


def test_replay_rerenders_a_logged_message_with_another_skin(tmp_path):
    root = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        f'[paths]\nskins = "{root / "skins"}"\nrules = "{root / "rules"}"\n'
        f'[database]\nurl = "sqlite:///{tmp_path}/relay.db"\n'
    )
    from relay import config
    from relay.store.database import make_engine, migrate
    from relay.store.queue import NewMessage, Store

    engine = make_engine(config.load(cfg).database.url)
    migrate(engine)
    raw = (root / "tests" / "fixtures" / "order_confirmation_30k.eml").read_bytes()
    Store(engine).enqueue(
        [
            NewMessage(
                "REPLAYME",
                "shop@maison-lumiere.example",
                ("camille@example.org",),
                raw,
                "127.0.0.1",
                "127.0.0.1",
            )
        ]
    )
    engine.dispose()
    out = tmp_path / "replay.eml"
    r = run_cli("replay", "REPLAYME", "--config", str(cfg), "--skin", "default", "-o", str(out))
    assert r.returncode == 0, r.stderr
    import email
    from email.policy import default

    replayed = email.message_from_bytes(out.read_bytes(), policy=default)
    assert replayed["X-Relay-Skin"] == "default"
    assert 'data-relay-block="complementary"' in replayed.get_body(("html",)).get_content()
    assert "rules=order-confirmation" in r.stderr
    r = run_cli("replay", "NOPE", "--config", str(cfg))
    assert r.returncode == 2 and "no message NOPE" in r.stderr


def test_purge_removes_only_old_finished_mail(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/relay.db"\n')
    from relay import config
    from relay.store.database import make_engine, migrate
    from relay.store.queue import NewMessage, Outcome, Store

    engine = make_engine(config.load(cfg).database.url)
    migrate(engine)
    store = Store(engine)
    old = 1_000_000.0
    store.enqueue(
        [
            NewMessage(
                q, "s@x.org", (f"{q}@x.org",), b"Subject: x\r\n\r\nx\r\n", "t", "127.0.0.1", received_at=old
            )
            for q in ("OLDSENT", "OLDPENDING")
        ]
    )
    (c,) = [c for c in store.claim("w", 10, 60, now=old + 1) if c.queue_id == "OLDSENT"]
    store.record("w", [Outcome(c.id, c.queue_id, c.address, "sent", "250 ok")])
    engine.dispose()
    r = run_cli("purge", "--config", str(cfg), "--days", "30")
    assert r.returncode == 0 and r.stdout.startswith("1 message(s)"), r.stderr
    assert run_cli("purge", "--config", str(cfg), "--days", "0").returncode == 2
