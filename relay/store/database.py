"""Engines and migrations: SQLite (WAL, fsync on commit) for one instance, PostgreSQL for many."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA_HEAD = "0002"  # the newest revision in migrations/versions (a test compares it with alembic's)
PG_MIGRATION_LOCK = 7_305_001  # pg_advisory_lock key: instances starting together migrate one at a time


class StoreError(Exception):
    """The store could not do what was asked (unreachable, read-only, full, locked too long)."""


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, pool_size: int = 5, durable: bool = True) -> Engine:
    """An engine with the settings durability needs; creates the SQLite file's folder.

    ``durable=False`` (the delivery workers) lets SQLite skip the fsync at each commit: a power cut may
    then forget a few recent outcomes, and their mail is sent again (a duplicate, never a loss). Intake
    always commits durably: that is what its 250 promises.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # timeout=0: no sleeping busy handler. SQLite's own backs off in 1, 2, 5, 10... ms steps, which
        # cost intake 5-40 ms whenever a worker held the write lock for a fraction of a millisecond;
        # transaction() below retries in 0.1 ms steps instead.
        engine = create_engine(url, connect_args={"timeout": 0, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'd at every commit, so a 250 survives a power cut, not only a crash.
            cur.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            # WAL checkpoints (copying the log back into the database, with its fsync) cost 10-20 ms; the
            # intake must not pay them between a DATA and its 250. The delivery workers' commits run them.
            cur.execute(f"PRAGMA wal_autocheckpoint={0 if durable else 1000}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


BUSY_DEADLINE = 30.0  # seconds a transaction keeps retrying a locked SQLite database before giving up


def _busy(error: OperationalError) -> bool:
    text = str(error.orig).lower()
    return "locked" in text or "busy" in text


def transaction(
    engine: Engine, fn: Callable[[Connection], T], *, busy_deadline: float | None = BUSY_DEADLINE
) -> T:
    """Runs ``fn(conn)`` in one transaction. On SQLite a locked database is retried (the whole
    transaction, so ``fn`` must only touch the database) with short sleeps, up to ``busy_deadline``
    seconds; None: no retry, the lock error is raised at once."""
    delay, started = 0.0001, time.monotonic()
    while True:
        try:
            with engine.begin() as conn:
                return fn(conn)
        except OperationalError as e:
            if engine.dialect.name != "sqlite" or not _busy(e):
                raise
            if busy_deadline is None or time.monotonic() - started > busy_deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 1.5, 0.001)


def at_head(engine: Engine) -> bool:
    """The schema is at SCHEMA_HEAD (one query; False for a new or older database)."""
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except SQLAlchemyError:  # no alembic_version table: a new database
        return False
    return versions == [SCHEMA_HEAD]


def migrate(engine: Engine) -> None:
    """Brings the schema to the newest revision (alembic), run at every start. A database already there
    is recognised by one query without importing alembic, which would stay in the intake process's RSS
    (6 MB) for its whole life."""
    if at_head(engine):
        return
    logging.getLogger("alembic").setLevel(logging.WARNING)  # before import: it logs its plugins then
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
