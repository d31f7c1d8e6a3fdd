"""The group committer: an idle SQLite store commits at once on the caller's thread; a locked one still
gets every message committed, through the commit thread and its retries, and nothing twice."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

from relay.store.committer import GroupCommitter
from relay.store.database import make_engine, migrate
from relay.store.queue import NewMessage, Store, new_queue_id


def _message(i: int, raw: bytes = b"Subject: x\r\n\r\nbody\r\n") -> NewMessage:
    return NewMessage(
        queue_id=new_queue_id(time.time()),
        mail_from="shop@boutique.example",
        recipients=(f"c{i}@example.org",),
        raw=raw,
        source="127.0.0.1",
        client_addr="127.0.0.1",
    )


def _stored(path) -> int:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT count(*) FROM messages").fetchone()[0]


def test_idle_sqlite_store_commits_inline(tmp_path, db_url):
    engine = make_engine(db_url)
    migrate(engine)
    committer = GroupCommitter(Store(engine))
    committer.start()
    woken = []
    committer.on_commit = lambda: woken.append(1)
    try:
        asyncio.run(committer.commit(_message(1)))
    finally:
        committer.stop()
    assert committer.committed == 1 and len(woken) == 1
    assert committer.inline_commits == (1 if db_url.startswith("sqlite") else 0)  # PostgreSQL: the thread


def test_a_big_message_is_committed_by_the_thread_not_on_the_event_loop(tmp_path):
    from relay.store.committer import INLINE_BELOW

    path = tmp_path / "relay.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    store = Store(engine)
    committer = GroupCommitter(store)
    committer.start()
    big = _message(3, raw=b"Subject: x\r\n\r\n" + b"QUJD\r\n" * (INLINE_BELOW // 6 + 1))
    try:
        asyncio.run(committer.commit(big))
    finally:
        committer.stop()
    assert committer.inline_commits == 0 and committer.committed == 1
    assert store.raw(big.queue_id) == big.raw


def test_locked_store_falls_back_to_the_thread_and_commits_once(tmp_path):
    path = tmp_path / "relay.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    committer = GroupCommitter(Store(engine))
    committer.start()
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another writer (a worker) holds the write lock
    released = threading.Timer(0.3, blocker.execute, args=("COMMIT",))
    released.start()
    try:
        started = time.monotonic()
        asyncio.run(committer.commit(_message(2)))
        waited = time.monotonic() - started
    finally:
        released.join()
        blocker.close()
        committer.stop()
    assert committer.inline_commits == 0 and committer.committed == 1
    assert waited >= 0.25  # it waited for the lock instead of failing or skipping the write
    assert _stored(path) == 1
