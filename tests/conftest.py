"""Shared fixtures: a real aiosmtpd sink as upstream, real SQLite and PostgreSQL stores, the relay itself.

The PostgreSQL variants run whenever the server answers; under CI=true a missing server fails the run
instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import smtplib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from relay import config
from relay.app import Relay, free_port

PG_ADMIN = os.environ.get("RELAY_TEST_PG", "host=127.0.0.1 port=5432 dbname=test")
FIXTURES = Path(__file__).parent / "fixtures"


# -- upstream sink ---------------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class SinkHandler:
    """Answers by recipient: 'reject*' 550, 'defer*' 451, 'slow*' waits; everything else 250."""

    messages: list[Received] = field(default_factory=list)
    fail_all_with: str | None = None
    delay: float = 0.0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        if local.startswith("reject"):
            return "550 5.1.1 No such user here"
        if local.startswith("defer"):
            return "451 4.2.0 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_all_with:
            return self.fail_all_with
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: stored"

    def for_rcpt(self, rcpt: str) -> list[Received]:
        return [m for m in self.messages if rcpt in m.rcpt_tos]


class Sink:
    def __init__(self, port: int | None = None):
        self.handler = SinkHandler()
        self.port = port or free_port()
        self.controller: Controller | None = None

    def start(self) -> Sink:
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


# -- databases -------------------------------------------------------------------------------------------


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        return True
    except Exception:
        return False


class PgDatabase:
    """A throwaway database on the local PostgreSQL server."""

    def __init__(self):
        import psycopg

        self.name = f"relay_t_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.name}"')
        params = dict(p.split("=", 1) for p in PG_ADMIN.split())
        host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
        self.url = f"postgresql+psycopg://{host}:{port}/{self.name}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/relay.db"
        return
    if not _pg_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN}; CI must run the PostgreSQL variants")
        pytest.skip("PostgreSQL not reachable")
    db = PgDatabase()
    yield db.url
    db.drop()


# -- the relay -------------------------------------------------------------------------------------------


def make_settings(tmp_path: Path, db_url: str, upstream_port: int | None, **sections) -> config.Settings:
    """Settings for a test relay: free loopback ports, fast retries, one delivery worker thread."""
    data = {
        "smtp": {"listen": f"127.0.0.1:{free_port()}", "hostname": "relay.test"},
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "connect_timeout": 2,
                     "command_timeout": 10, "data_timeout": 30} if upstream_port else {},
        "delivery": {"workers": 0, "poll_interval": 0.05, "retry_base": 0.3, "retry_max": 2, "lease": 3},
        "database": {"url": db_url},
        "paths": {"outbox": "outbox", "state": "state"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.from_mapping(data, "<test>", tmp_path)


class RelayThread:
    """The relay on its own event loop in a thread, so tests can use blocking smtplib against it."""

    def __init__(self, settings: config.Settings, clock=time.time):
        self.settings = settings
        self.clock = clock
        self.relay: Relay | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RelayThread:
        ready = threading.Event()
        error: list[BaseException] = []

        def run():
            self.loop = asyncio.new_event_loop()
            self.relay = Relay(self.settings, clock=lambda: self.clock())
            try:
                self.loop.run_until_complete(self.relay.start())
            except BaseException as e:  # noqa: BLE001
                error.append(e)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
            self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(30)
        if error:
            raise error[0]
        return self

    def stop(self) -> None:
        if self.loop and self.relay and self._thread and self._thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self.relay.stop(), self.loop)
            fut.result(20)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    @property
    def port(self) -> int:
        return self.settings.smtp.listen.port

    @property
    def store(self):
        assert self.relay
        return self.relay.store

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=30)

    def wait_for(self, predicate, timeout: float = 15.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def statuses(self, address: str) -> list[str]:
        return [e["status"] for e in self.store.history(address)]


@pytest.fixture
def relay_factory(tmp_path, db_url):
    started: list[RelayThread] = []

    def factory(upstream_port: int | None, **sections) -> RelayThread:
        r = RelayThread(make_settings(tmp_path, db_url, upstream_port, **sections)).start()
        started.append(r)
        return r

    yield factory
    for r in started:
        r.stop()


@pytest.fixture
def relay(relay_factory, sink):
    return relay_factory(sink.port)


def message(subject: str = "Votre commande n°1042", to: str = "claire@example.org",
            body: str = "Bonjour Claire,\r\nMerci pour votre commande.\r\n") -> bytes:
    return (
        f"From: Boutique <shop@boutique.example>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@boutique.example>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0100\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        f"\r\n{body}"
    ).encode()
