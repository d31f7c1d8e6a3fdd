"""Group commit: many intake messages per transaction (and so per fsync), none acknowledged before it.

One thread owns the intake's writes. While it commits one group, new messages gather; the next
transaction takes all of them. At light load each message commits alone (lowest latency); under load the
groups grow by themselves, with no fixed delay. A group that fails is retried message by message, so one
bad row cannot refuse its neighbours.

On SQLite, a message that finds the committer idle is committed at once on the caller's thread: a SQLite
commit is a local write and an fdatasync (~0.5 ms), while handing it to the thread and back costs two
thread wake-ups; the commit thread's alone took 2.5-6 ms at times when both cores were busy delivering.
It tries once, without waiting on a lock; if a worker holds the write lock, or anything else goes wrong,
the message takes the thread's path (with its retries) as before.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future

from relay import memory
from relay.store.database import is_sqlite, transaction
from relay.store.queue import BLOB_STREAM_FROM, NewMessage, Store

log = logging.getLogger(__name__)

# The inline commit runs on the event loop: a big message's write (and fdatasync) would stall every other
# session for its duration, so it takes the thread like any message that finds the committer busy.
INLINE_BELOW = 1024 * 1024

_STOP = object()


class GroupCommitter:
    def __init__(self, store: Store, max_group: int = 256, max_pending: int = 2000):
        self.store = store
        self.max_group = max_group
        self.max_pending = max_pending
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="relay-commit", daemon=True)
        self.groups = 0
        self.committed = 0
        self.on_commit = None  # called after each group with new mail in it (commit thread or inline)
        self.inline = is_sqlite(store.engine)
        self.inline_commits = 0
        self._working = False  # the commit thread holds a group

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes what was handed in, then stops."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    def overloaded(self) -> bool:
        """True when intake should push back (451) rather than grow its memory."""
        return self._pending >= self.max_pending

    async def commit(self, message: NewMessage) -> None:
        """Returns once ``message`` is committed; raises StoreError (or another error) if it was not."""
        if (
            self.inline
            and len(message.raw) < INLINE_BELOW
            and not self._working
            and self._queue.empty()
            and self._commit_now(message)
        ):
            return
        fut: Future = Future()
        with self._lock:
            self._pending += 1
        self._queue.put((message, fut))
        await asyncio.wrap_future(fut)

    def _commit_now(self, message: NewMessage) -> bool:
        """One attempt on this thread, no lock waits; False: leave it to the commit thread."""
        try:
            transaction(self.store.engine, lambda conn: Store._enqueue(conn, [message]), busy_deadline=None)
        except Exception:  # noqa: BLE001 - locked, full, anything: the thread's path retries and reports
            return False
        self.inline_commits += 1
        self.committed += 1
        self._notify()
        return True

    def _notify(self) -> None:
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:  # noqa: BLE001 - a wake-up is a hint, never a reason to fail intake
                log.exception("on_commit hook failed")

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            self._working = True
            group = [first]
            stop = False
            while len(group) < self.max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                group.append(item)
            self._commit(group)
            self._working = False
            # The next get() may block for minutes: hold no message meanwhile (a 25 MB one stayed
            # in the intake's RSS until the next message came).
            group.clear()
            first = item = None
            if stop:
                return

    def _commit(self, group: list[tuple[NewMessage, Future]]) -> None:
        try:
            self.store.enqueue([m for m, _ in group])
            results: list[BaseException | None] = [None] * len(group)
        except BaseException as e:  # noqa: BLE001 - every error must reach its waiting session
            if len(group) == 1:
                results = [e]
            else:
                log.warning("group commit of %d failed (%s); retrying one by one", len(group), e)
                results = []
                for m, _ in group:
                    try:
                        self.store.enqueue([m])
                        results.append(None)
                    except BaseException as e1:  # noqa: BLE001
                        results.append(e1)
        self.groups += 1
        for (_, fut), err in zip(group, results, strict=True):
            if err is None:
                self.committed += 1
                fut.set_result(None)
            else:
                fut.set_exception(err)
        with self._lock:
            self._pending -= len(group)
        if any(err is None for err in results):
            self._notify()
        if any(len(m.raw) >= BLOB_STREAM_FROM for m, _ in group):
            memory.trim()
