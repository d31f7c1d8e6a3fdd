"""A delivery worker process: its own event loop, engine and upstream pool; exits with its parent.

Started as ``python -m relay.delivery`` with its settings pickled on stdin and a wake-up pipe, not with
multiprocessing: its spawn method also starts a resource-tracker process (13 MB of RSS, for semaphores
the relay never makes) and re-imports the parent's ``__main__`` in every child.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from relay import memory
from relay.config import Settings

log = logging.getLogger(__name__)

WORKER_NICENESS = 10
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the relay package


def build_worker(settings: Settings, store=None):
    """The worker with its upstream (SMTP pool or outbox) and pipeline, from the settings."""
    from relay.delivery.pipeline import Pipeline
    from relay.delivery.upstream import OutboxUpstream, SmtpUpstream
    from relay.delivery.worker import Worker
    from relay.store.database import make_engine
    from relay.store.ledger import Ledger
    from relay.store.queue import Store

    if store is None:
        store = Store(make_engine(settings.database.url, pool_size=2, durable=False))
    if settings.upstream.host:
        upstream = SmtpUpstream(settings.upstream, settings.smtp.hostname)
    else:
        upstream = OutboxUpstream(settings.paths.outbox)
    return Worker(settings, store, upstream, Pipeline(settings, Ledger(store.engine)))


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    parent_pid: int | None = None,
    wake_fd: int | None = None,
    *,
    followups: bool = False,
    clock: Callable[[], float] = time.time,
) -> None:
    """Delivers until ``stop``; ``followups``: this worker also runs the follow-up scheduler (on
    ``clock``, which tests move forward)."""
    from relay.delivery.followups import schedule_followups
    from relay.store.database import make_engine
    from relay.store.ledger import Ledger
    from relay.store.queue import Store

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

    helpers = [asyncio.create_task(watch_parent())]
    engines = [worker.store.engine]
    if followups:
        # its own engine: the worker's skips SQLite's fsync, and a follow-up is marked done before it
        # is queued, so both commits must survive a power cut as the intake's do
        store = Store(make_engine(settings.database.url, pool_size=1))
        engines.append(store.engine)
        scheduler = schedule_followups(
            worker.prepare,
            Ledger(store.engine),
            store,
            settings.smtp.hostname,
            stop,
            clock=clock,
            on_queued=worker.wake,
        )
        helpers.append(asyncio.create_task(scheduler))
    try:
        await worker.run(stop)
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if wake_fd is not None:
            loop.remove_reader(wake_fd)
        for engine in engines:
            engine.dispose()


class WorkerProcess:
    """One worker child: started at once, woken through its pipe, supervised by the relay."""

    def __init__(self, settings: Settings, index: int, log_level: int, followups: bool):
        self.name = f"relay-worker-{index}"
        wake_r, self.wake_fd = os.pipe()
        os.set_blocking(self.wake_fd, False)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay.delivery", str(index), str(os.getpid()), str(wake_r)],
                stdin=subprocess.PIPE,
                pass_fds=(wake_r,),
                env=env,
            )
        finally:
            os.close(wake_r)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(pickle.dumps((settings, log_level, followups)))
            self.proc.stdin.close()
        except BrokenPipeError:  # it died at once; the supervisor sees it exit and starts another
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.returncode

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def wake(self) -> None:
        try:
            os.write(self.wake_fd, b"\0")
        except OSError:
            pass  # the pipe is full (the worker will look anyway) or the worker is gone

    def terminate(self) -> None:
        if self.is_alive():
            self.proc.send_signal(signal.SIGTERM)

    def join(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self.proc.kill()

    def close(self) -> None:
        """Frees the wake pipe; the process must have exited or be left to its own watch on the parent."""
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1


def main(
    settings: Settings, index: int, parent_pid: int, log_level: int, wake_fd: int, followups: bool
) -> None:
    """A worker process's life, from ``python -m relay.delivery``."""
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
        await run_worker(settings, stop, parent_pid, wake_fd, followups=followups)

    run_loop(_main())


def run_loop(coro) -> None:
    """uvloop when installed (a third less CPU per message), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
