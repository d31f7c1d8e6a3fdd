"""Faults: the store full, read-only, locked or unreachable -> 451 and never 250; upstream slow or dropping
connections -> deferred and retried. Real failures, not mocks: SQLite's own limits, a TCP proxy cut in
front of PostgreSQL, an upstream that stalls or hangs up."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest
from sqlalchemy import event

from relay.app import free_port
from tests.conftest import PgDatabase, RelayThread, Sink, _pg_available, make_settings, message


def _send(relay) -> tuple[int, bytes]:
    with relay.smtp() as c:
        c.ehlo()
        c.mail("shop@boutique.example")
        c.rcpt("fault@example.org")
        return c.data(message(body="x" * 70 + "\r\n") * 50)


def _on_connect(relay, *pragmas: str) -> None:
    """Applies pragmas to every new SQLite connection of the relay, then drops the pooled ones."""
    engine = relay.store.engine

    @event.listens_for(engine, "connect")
    def _apply(dbapi_conn, _record):
        for p in pragmas:
            dbapi_conn.execute(p)

    engine.dispose()


@pytest.fixture
def sqlite_relay(tmp_path, sink):
    r = RelayThread(make_settings(tmp_path, f"sqlite:///{tmp_path}/relay.db", sink.port)).start()
    yield r
    r.stop()


def test_sqlite_disk_full_answers_451(sqlite_relay):
    assert _send(sqlite_relay)[0] == 250
    page_count = sqlite_relay.store.engine.connect().exec_driver_sql("PRAGMA page_count").scalar()
    _on_connect(sqlite_relay, f"PRAGMA max_page_count={page_count + 2}")
    code, msg = _send(sqlite_relay)
    assert code == 451 and msg.startswith(b"4.3.0")
    assert sum(sqlite_relay.store.counts().values()) == 1  # only the first message is in the queue


def test_sqlite_read_only_answers_451(sqlite_relay):
    _on_connect(sqlite_relay, "PRAGMA query_only=ON")
    code, msg = _send(sqlite_relay)
    assert code == 451 and msg.startswith(b"4.3.0")


def test_sqlite_locked_for_a_while_waits_then_accepts(sqlite_relay, tmp_path):
    """Another writer holds the lock for 1.5 s: intake waits (busy timeout) instead of failing."""
    holder = sqlite3.connect(tmp_path / "relay.db", timeout=5, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.5, holder.rollback)
    release.start()
    started = time.monotonic()
    code, _ = _send(sqlite_relay)
    assert code == 250 and time.monotonic() - started >= 1.0
    release.join()
    holder.close()


class TcpProxy:
    """A loopback TCP proxy we can cut and restore: PostgreSQL 'stops' without touching the server."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.links: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.links |= {writer, up_w}
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    def up(self) -> None:
        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def down(self) -> None:
        async def stop():
            self.server.close()
            for w in self.links:
                w.close()
            self.links.clear()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.postgres
def test_postgres_unreachable_answers_451_then_recovers(tmp_path, sink):
    if not _pg_available():
        if __import__("os").environ.get("CI") == "true":
            pytest.fail("PostgreSQL must be reachable under CI")
        pytest.skip("PostgreSQL not reachable")
    db = PgDatabase()
    proxy = TcpProxy(5432)
    proxy.up()
    url = db.url.replace(":5432/", f":{proxy.port}/")
    r = RelayThread(make_settings(tmp_path, url, sink.port)).start()
    try:
        assert _send(r)[0] == 250
        proxy.down()
        code, msg = _send(r)
        assert code == 451 and msg.startswith(b"4.3.0")
        health = f"http://{r.settings.http.listen}/healthz"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(health, timeout=10)
        assert e.value.code == 503 and "store unavailable" in json.loads(e.value.read())["reason"]
        proxy.up()
        r.wait_for(lambda: _send(r)[0] == 250, timeout=20, what="intake back after the store returns")
        r.wait_for(lambda: len(sink.messages) == 2, timeout=20, what="both accepted messages delivered")
    finally:
        r.stop()
        proxy.close()
        db.drop()


def test_upstream_slow_beyond_data_timeout_is_deferred_then_sent(relay_factory):
    sink = Sink().start()
    sink.handler.delay = 3.0
    try:
        r = relay_factory(sink.port, upstream={"data_timeout": 1, "command_timeout": 1})
        with r.smtp() as c:
            c.sendmail("shop@boutique.example", ["slow@example.org"], message())
        r.wait_for(lambda: r.statuses("slow@example.org") == ["deferred"], timeout=20, what="deferred")
        assert "Timeout" in r.store.history("slow@example.org")[0]["upstream_reply"]
        sink.handler.delay = 0
        r.wait_for(lambda: r.statuses("slow@example.org") == ["sent"], timeout=20, what="sent later")
    finally:
        sink.stop()


def test_upstream_dropping_connections_is_deferred_then_sent(relay_factory):
    """An upstream that accepts TCP and hangs up at once, then a real one on the same port."""
    port = free_port()
    import socket

    srv = socket.create_server(("127.0.0.1", port))
    stop = threading.Event()

    def hang_up():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except TimeoutError:
                continue

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    r = relay_factory(port)
    with r.smtp() as c:
        c.sendmail("shop@boutique.example", ["drop@example.org"], message())
    r.wait_for(lambda: r.statuses("drop@example.org") == ["deferred"], timeout=20, what="deferred")
    stop.set()
    t.join()
    srv.close()
    sink = Sink(port).start()
    try:
        r.wait_for(lambda: len(sink.messages) == 1, timeout=20, what="delivered once upstream is back")
    finally:
        sink.stop()


def test_smtplib_client_sees_no_250_for_unstored(sqlite_relay):
    """The sum of the above from a client's side: smtplib raises, the message is not counted as sent."""
    _on_connect(sqlite_relay, "PRAGMA query_only=ON")
    with sqlite_relay.smtp() as c, pytest.raises(smtplib.SMTPDataError):
        c.sendmail("shop@boutique.example", ["x@example.org"], message())
