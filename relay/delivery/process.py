"""A delivery worker process: its own event loop, engine and upstream pool; exits with its parent."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal

from relay import memory
from relay.config import Settings

log = logging.getLogger(__name__)

WORKER_NICENESS = 10


def build_worker(settings: Settings, store=None):
    """The worker with its upstream (SMTP pool or outbox) and pipeline, from the settings."""
    from relay.delivery.pipeline import Pipeline
    from relay.delivery.upstream import OutboxUpstream, SmtpUpstream
    from relay.delivery.worker import Worker
    from relay.store.database import make_engine
    from relay.store.queue import Store

    if store is None:
        store = Store(make_engine(settings.database.url, pool_size=2, durable=False))
    if settings.upstream.host:
        upstream = SmtpUpstream(settings.upstream, settings.smtp.hostname)
    else:
        upstream = OutboxUpstream(settings.paths.outbox)
    from relay.store.ledger import Ledger

    return Worker(settings, store, upstream, Pipeline(settings, Ledger(store.engine)))


async def run_worker(
    settings: Settings, stop: asyncio.Event, parent_pid: int | None = None, wake_fd: int | None = None
) -> None:
    worker = build_worker(settings)
    gc.freeze()  # skins, rules, catalog and libraries: long-lived, not worth the collector's scans
    log.info("delivery worker ready (pid %d)", os.getpid())
    loop = asyncio.get_running_loop()
    if wake_fd is not None:

        def on_wake() -> None:
            try:
                os.read(wake_fd, 4096)
            except (BlockingIOError, OSError):
                pass
            worker.wake()

        os.set_blocking(wake_fd, False)
        loop.add_reader(wake_fd, on_wake)

    async def watch_parent():
        while parent_pid is not None and not stop.is_set():
            if os.getppid() != parent_pid:  # the relay died (kill -9): leases make our claims safe
                log.error("parent %d gone; worker exiting", parent_pid)
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_parent())
    try:
        await worker.run(stop)
    finally:
        watcher.cancel()
        if wake_fd is not None:
            loop.remove_reader(wake_fd)
        worker.store.engine.dispose()


def main(settings: Settings, index: int, parent_pid: int, log_level: int, wake=None) -> None:
    """Entry point of a worker process (multiprocessing spawn target)."""
    memory.return_big_blocks()
    try:
        # Intake answers clients while they wait; delivery is background work. On a busy machine the
        # scheduler should give the intake process the CPU first (its 250 latency), the workers after.
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s worker-{index} %(levelname)s %(name)s: %(message)s"
    )

    async def _main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop, parent_pid, wake.fileno() if wake is not None else None)

    run_loop(_main())


def run_loop(coro) -> None:
    """uvloop when installed (a third less CPU per message), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
