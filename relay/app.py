"""Wires the parts and runs them: intake and HTTP in this process, delivery in worker processes.

Start: migrate the store, recover claims, open the listeners, start the workers. Stop (SIGTERM/SIGINT):
refuse new sessions, let SMTP transactions in flight finish, stop the workers, exit 0 within 10 s.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable

from relay import metrics
from relay.config import ConfigError, Settings, read_dkim_keys
from relay.delivery.process import WorkerProcess
from relay.intake.server import IntakeHandler, RelaySMTP
from relay.rules.tokens import load_or_create_secret
from relay.store.committer import GroupCommitter
from relay.store.database import is_sqlite, make_engine, migrate
from relay.store.ledger import Ledger
from relay.store.queue import Store
from relay.web.http import HttpApp, HttpServer

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 10.0


class Relay:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock  # the follow-up scheduler's clock (tests move it forward)
        self.engine = make_engine(settings.database.url)
        self.store = Store(self.engine)
        self.ledger = Ledger(self.engine)
        self.committer = GroupCommitter(self.store)
        self.handler = IntakeHandler(settings.smtp, self.committer)
        self.server: asyncio.base_events.Server | None = None
        self.tls_server: asyncio.base_events.Server | None = None
        self.tls_context = tls_context(settings.smtp.tls) if settings.smtp.tls else None
        self.http: HttpServer | None = None
        self.processes: list[WorkerProcess] = []
        self._thread_wake: int | None = None  # workers = 0: write end of the worker thread's wake-up pipe
        self.committer.on_commit = self._wake_workers
        self._thread_worker: tuple[threading.Thread, asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._supervisor: asyncio.Task | None = None
        self.stopping = False

    # -- start ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        read_dkim_keys(s)  # a missing key file stops the start (ConfigError), not the first signing
        await asyncio.to_thread(migrate, self.engine)
        if is_sqlite(self.engine):
            # One instance owns a SQLite file: claims left by its previous life are void now.
            n = await asyncio.to_thread(
                self.store.recover_expired, s.delivery.max_crashes, None, all_active=True
            )
            if n:
                log.warning("requeued %d recipients claimed before the last stop", n)
        # created once here, before any worker reads it (a race would give them different secrets)
        load_or_create_secret(s.paths.secret)
        self.committer.start()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol,
            host=s.smtp.listen.host,
            port=s.smtp.listen.port,
            reuse_address=True,
            backlog=512,
        )
        if s.smtp.tls and s.smtp.tls.implicit_listen:
            listen = s.smtp.tls.implicit_listen
            self.tls_server = await loop.create_server(
                lambda: self._protocol(implicit_tls=True),
                host=listen.host,
                port=listen.port,
                reuse_address=True,
                backlog=512,
                ssl=self.tls_context,
            )
        if s.http.listen:
            self.http = HttpServer(
                s.http.listen.host,
                s.http.listen.port,
                HttpApp(self.store.depth, self.health, mounts=[self._unsubscribe_app(), self._admin_app()]),
            )
            self.http.start()
        self._start_workers()
        self._supervisor = asyncio.create_task(self._supervise())
        log.info(
            "relay ready: smtp %s, http %s, %d worker process(es), upstream %s, store %s",
            s.smtp.listen,
            s.http.listen or "off",
            s.delivery.workers,
            f"{s.upstream.host}:{s.upstream.port}" if s.upstream.host else f"outbox {s.paths.outbox}",
            self.engine.url.render_as_string(hide_password=True),
        )

    def _admin_app(self):
        from relay.web.admin import AdminApp

        return AdminApp(self.store, self.settings, users=dict(self.settings.http.admin_users))

    def _unsubscribe_app(self):
        from relay.web.unsubscribe import UnsubscribeApp

        def unsubscribed(address: str) -> None:
            metrics.unsubscribes.inc()
            log.info("unsubscribed: %s", address)

        secret = load_or_create_secret(self.settings.paths.secret)
        return UnsubscribeApp(self.ledger, secret, on_unsubscribe=unsubscribed)

    def _protocol(self, implicit_tls: bool = False) -> RelaySMTP:
        s = self.settings.smtp
        return RelaySMTP(
            self.handler,
            hostname=s.hostname,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=s.command_timeout,
            ident="brand-relay ESMTP",
            tls_context=None if implicit_tls else self.tls_context,
            authenticator=self.handler.authenticator,
            # AUTH only over TLS: after STARTTLS, or from the first byte on the implicit-TLS listener
            auth_require_tls=not implicit_tls,
            proxy_protocol_timeout=s.proxy_timeout if s.proxy_protocol else None,
        )

    @property
    def smtp_port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def _start_workers(self) -> None:
        n = self.settings.delivery.workers
        if n == 0:
            self._start_thread_worker()
            return
        for i in range(n):
            self.processes.append(self._spawn(i))

    def _spawn(self, index: int) -> WorkerProcess:
        # worker 0 also runs the follow-up scheduler, with the rule book it holds anyway
        return WorkerProcess(self.settings, index, logging.getLogger().level, followups=index == 0)

    def _wake_workers(self) -> None:
        """Called after each intake commit: idle workers claim at once instead of at their next poll."""
        for p in self.processes:
            p.wake()
        if self._thread_wake is not None:
            try:
                os.write(self._thread_wake, b"\0")
            except OSError:
                pass  # the pipe is full: the worker will look anyway

    def _start_thread_worker(self) -> None:
        """workers = 0: one delivery loop in a thread of this process (development and tests)."""
        from relay.delivery.process import run_worker

        ready = threading.Event()
        holder: dict = {}

        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        self._thread_wake = wake_w

        def target():
            loop = asyncio.new_event_loop()
            stop = asyncio.Event()
            holder.update(loop=loop, stop=stop)
            ready.set()
            loop.run_until_complete(
                run_worker(self.settings, stop, wake_fd=wake_r, followups=True, clock=self.clock)
            )
            loop.close()
            os.close(wake_r)

        t = threading.Thread(target=target, name="relay-worker", daemon=True)
        t.start()
        ready.wait()
        self._thread_worker = (t, holder["loop"], holder["stop"])

    async def _supervise(self) -> None:
        """Restarts a worker process that died (a crash must not stop delivery)."""
        while not self.stopping:
            await asyncio.sleep(1.0)
            for i, p in enumerate(self.processes):
                if not p.is_alive() and not self.stopping:
                    log.error("worker %d (pid %s) exited with %s; restarting", i, p.pid, p.exitcode)
                    metrics.mark_process_dead(p.pid)
                    p.close()
                    self.processes[i] = self._spawn(i)

    def health(self) -> str | None:
        try:
            self.store.ping()
        except Exception as e:  # noqa: BLE001
            return f"store unavailable: {e}"
        if self._thread_worker is not None and not self._thread_worker[0].is_alive():
            return "delivery worker thread stopped"
        dead = [p.name for p in self.processes if not p.is_alive()]
        if dead:
            return f"worker process(es) not running: {', '.join(dead)}"
        if self.stopping:
            return "shutting down"
        return None

    # -- stop -------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        started = time.monotonic()
        log.info("stopping: no new sessions; finishing transactions in flight")
        for server in (self.server, self.tls_server):
            if server is not None:
                server.close()
        await self.handler.drain(timeout=SHUTDOWN_BUDGET * 0.5)
        if self._supervisor:
            self._supervisor.cancel()
        for p in self.processes:
            p.terminate()
        if self._thread_worker is not None:
            thread, loop, stop = self._thread_worker
            loop.call_soon_threadsafe(stop.set)
            await asyncio.to_thread(
                thread.join, max(0.5, SHUTDOWN_BUDGET * 0.8 - (time.monotonic() - started))
            )
        for p in self.processes:
            await asyncio.to_thread(p.join, max(0.2, SHUTDOWN_BUDGET * 0.8 - (time.monotonic() - started)))
            if p.is_alive():
                log.warning("worker %s did not stop in time; killing it (its claims are recovered)", p.pid)
                p.kill()
                p.join(1)
            p.close()
            metrics.mark_process_dead(p.pid)
        await asyncio.to_thread(self.committer.stop)
        if self.committer.groups:
            log.info(
                "intake committed %d messages in %d transactions",
                self.committer.committed,
                self.committer.groups,
            )
        if self._thread_wake is not None:
            os.close(self._thread_wake)
            self._thread_wake = None
        if self.http:
            self.http.stop()
        self.engine.dispose()
        log.info("stopped in %.1fs", time.monotonic() - started)


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Runs the relay until SIGTERM or SIGINT."""
    relay = Relay(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await relay.start()
    # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's scans, whose
    # full passes over the imported libraries otherwise add milliseconds to a random 250.
    gc.freeze()
    if ready:
        ready.set()
    await stop.wait()
    await relay.stop()


def tls_context(tls) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(str(tls.cert), "smtp.tls", f"cannot load certificate and key: {e}") from None
    return ctx


_PORTS_GIVEN: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on later (tests, bench), taken below the kernel's ephemeral range: a port from
    bind(0) comes from that range, and until the listener binds it the kernel can hand it to any
    outgoing connection (to PostgreSQL, to a sink) as its source port: EADDRINUSE at random."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = 10_000 if ephemeral_low > 12_000 else 1024
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, ephemeral_low)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    with socket.socket() as s:  # the range is crowded: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
