"""Queue operations on the real store (SQLite and PostgreSQL): fair claims, leases, quarantine, purge."""

from __future__ import annotations

import time

import pytest

from relay.store.database import make_engine, migrate
from relay.store.queue import NewMessage, Outcome, Store, new_queue_id


@pytest.fixture
def store(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    yield Store(engine)
    engine.dispose()


def _enqueue(store: Store, n: int, now: float, prefix: str) -> None:
    store.enqueue(
        [
            NewMessage(
                queue_id=new_queue_id(now),
                mail_from="shop@boutique.example",
                recipients=(f"{prefix}{i}@x.org",),
                raw=b"Subject: t\r\n\r\nx\r\n",
                source="test",
                client_addr="127.0.0.1",
                received_at=now,
            )
            for i in range(n)
        ]
    )


def test_retries_never_starve_fresh_mail_and_get_a_share(store):
    now = time.time()
    _enqueue(store, 40, now - 100, "old")
    claims = store.claim("w1", 40, lease=60, now=now - 99)
    store.record(
        "w1",
        [
            Outcome(c.id, c.queue_id, c.address, "deferred", "451 later", next_attempt_at=now - 1)
            for c in claims
        ],
    )
    _enqueue(store, 40, now, "new")
    batch = store.claim("w2", 8, lease=60, now=now)
    fresh = [c for c in batch if c.address.startswith("new")]
    retries = [c for c in batch if c.address.startswith("old")]
    assert len(fresh) >= 6 and len(retries) >= 2, (len(fresh), len(retries))


def test_a_claim_is_exclusive_and_a_lapsed_lease_is_recovered_then_quarantined(store):
    now = time.time()
    _enqueue(store, 1, now, "c")
    assert len(store.claim("w1", 10, lease=5, now=now)) == 1
    assert store.claim("w2", 10, lease=5, now=now) == []  # leased: nobody else gets it
    for crash in range(1, 4):
        assert store.recover_expired(max_crashes=3, now=now + 10 * crash) == 1
        if crash < 3:
            assert len(store.claim("w1", 10, lease=5, now=now + 10 * crash)) == 1
    entry = store.history("c0@x.org")[0]
    assert entry["status"] == "failed" and "quarantined" in entry["upstream_reply"]
    assert [e["kind"] for e in entry["events"]][-1] == "quarantined"


def test_an_outcome_from_a_worker_that_lost_its_lease_is_not_written(store):
    now = time.time()
    _enqueue(store, 1, now, "l")
    (c,) = store.claim("w1", 1, lease=1, now=now)
    store.recover_expired(max_crashes=5, now=now + 5)
    (c2,) = store.claim("w2", 1, lease=60, now=now + 5)
    assert store.record("w1", [Outcome(c.id, c.queue_id, c.address, "sent", "250 late")]) == 0
    assert store.record("w2", [Outcome(c2.id, c2.queue_id, c2.address, "sent", "250 ok")]) == 1


def test_purge_keeps_pending_mail(store):
    now = time.time()
    _enqueue(store, 2, now - 1000, "p")
    (c, _) = store.claim("w", 2, lease=60, now=now - 999)
    store.record("w", [Outcome(c.id, c.queue_id, c.address, "sent", "250 ok")])
    assert store.purge(before=now) == 1
    assert store.counts() == {"active": 1}


def test_migrations_build_exactly_the_schema(store):
    """alembic's autogenerate finds nothing to change: the migrations and relay.store.schema agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from relay.store.schema import metadata

    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_a_migrated_store_is_recognised_without_alembic(store, db_url):
    """SCHEMA_HEAD is alembic's own head, and a restart on a migrated store (a fresh interpreter, as
    `relay serve` is) does not import alembic; an older store is still upgraded."""
    import subprocess
    import sys

    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from relay.store.database import MIGRATIONS, SCHEMA_HEAD, at_head

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD
    assert at_head(store.engine)
    code = (
        "import sys\nfrom relay.store.database import make_engine, migrate\n"
        f"migrate(make_engine({db_url!r}))\nprint(sorted(m for m in sys.modules if m.startswith('alembic')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
    from alembic import command

    with store.engine.begin() as conn:  # a store from before 0002
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert not at_head(store.engine)
    migrate(store.engine)
    assert at_head(store.engine)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM offers")).scalar_one() == 0


def test_timeline_and_ledger_key_addresses_alike(store):
    """One normaliser for every address_key column: a bracketed, mixed-case address finds the same rows."""
    from relay.store.ledger import Ledger

    now = time.time()
    _enqueue(store, 1, now, "Mixed")
    ledger = Ledger(store.engine)
    ledger.add_suppression("<MIXED0@X.org>", now=now)
    assert [e["recipient"] for e in store.history(" <mixed0@x.ORG> ")] == ["Mixed0@x.org"]
    assert ledger.is_suppressed("mixed0@x.org")


def test_big_and_small_messages_in_one_group_read_back_intact(store):
    """On SQLite a message of BLOB_STREAM_FROM bytes or more goes through the blob API (in the group's
    transaction); on PostgreSQL through the plain insert. Either way the bytes come back as they went in."""
    import os

    from relay.store import queue as queue_mod

    now = time.time()
    big = os.urandom(queue_mod.BLOB_STREAM_FROM) + b"\r\n.\r\n\x00end"
    read_buffer = bytearray(b"Received: by relay\r\n" + big)  # how intake hands over a big message
    raws = [b"Subject: small\r\n\r\nhi\r\n", big, b"Subject: small 2\r\n\r\nho\r\n", read_buffer]
    batch = [
        NewMessage(queue_id=new_queue_id(now), mail_from="shop@example.org", recipients=("a@example.org",),
                   raw=raw, source="test", client_addr="127.0.0.1", helo="h", message_id=f"<{i}@x>",
                   subject="s", received_at=now)
        for i, raw in enumerate(raws)
    ]
    store.enqueue(batch)
    got = [store.raw(m.queue_id) for m in batch]
    assert got == [bytes(m.raw) for m in batch] and all(type(g) is bytes for g in got)
    assert store.raw("nope") is None


def _rows_of(store: Store, queue_ids: list[str]) -> dict[str, list[tuple]]:
    """Every stored column of the messages, recipients and events of these queue ids (ids left out)."""
    from sqlalchemy import select

    from relay.store.schema import events, messages, recipients

    out = {}
    with store.engine.connect() as conn:
        for table in (messages, recipients, events):
            cols = [c for c in table.c if c.name != "id"]
            rows = conn.execute(select(*cols).where(table.c.queue_id.in_(queue_ids))).all()
            out[table.name] = sorted(
                (tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows), key=repr
            )
    return out


def _group(now: float) -> list[NewMessage]:
    """A group as intake hands it over: several messages, several recipients each, awkward text
    (a percent-hack address, quotes, non-ASCII, a long HELO that is cut to 255)."""
    return [
        NewMessage(queue_id=new_queue_id(now), mail_from=f"shop%{i}@boutique.example",
                   recipients=tuple(f"Client{j}.{i}@Example.ORG" for j in range(i + 1)),
                   raw=bytearray(b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n%s %d 'x'\r\n" * (i + 1)),
                   source="shop'web", client_addr="::1", helo="h" * 300, message_id=f"<{i}%d@x>",
                   subject=f"Commande n° {i} « 50 % »", received_at=now + i)
        for i in range(4)
    ]  # fmt: skip


def test_postgresql_writes_a_group_in_one_statement_the_same_as_row_by_row(store, monkeypatch):
    """PostgreSQL: a group goes to the server as one statement (data-modifying CTEs, one round trip);
    a group too big for one statement's bound values goes row-wise. Both store the same rows (and on
    SQLite, where this test runs too, the row-wise path stores them the same way)."""
    from sqlalchemy import event

    from relay.store import queue as queue_mod

    sent: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    now = 1_700_000_000.0
    one = _group(now)
    store.enqueue(one)
    statements_one = len(sent)
    monkeypatch.setattr(queue_mod, "_PG_MAX_PARAMS", 0)  # every group too big: the row-wise path
    sent.clear()
    rowwise = _group(now)
    store.enqueue(rowwise)
    if store.postgres:
        assert (statements_one, len(sent)) == (1, 3)

    def rows(group: list[NewMessage]) -> dict[str, list[tuple]]:
        index = {m.queue_id: k for k, m in enumerate(group)}  # the groups differ by their queue ids only
        got = _rows_of(store, list(index))
        return {t: sorted((tuple(index.get(v, v) for v in r) for r in got[t]), key=repr) for t in got}

    a, b = rows(one), rows(rowwise)
    assert a == b
    assert [len(a[t]) for t in ("messages", "recipients", "events")] == [4, 10, 10]
    assert all(len(r[5]) == 255 for r in a["messages"])  # helo cut
    assert {r[2] for r in a["recipients"]} == {r[1].lower() for r in a["recipients"]}  # address_key
    assert store.raw(one[3].queue_id) == bytes(one[3].raw)
    assert len(store.claim("w", 100, lease=60, now=now + 10)) == 20
