"""Queue operations: enqueue at intake; claim, renew, record for workers; inspect, retry, delete.

Every method is one short transaction. Claims use FOR UPDATE SKIP LOCKED on PostgreSQL so many instances
share one database; on SQLite the single writer lock gives the same exclusivity.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from relay.store.database import StoreError, transaction
from relay.store.schema import (
    ACTIVE,
    DEFERRED,
    FAILED,
    QUEUED,
    SENT,
    SUPPRESSED,
    address_key,
    events,
    messages,
    recipients,
)

_random = random.Random()  # seeded from os.urandom; ids need uniqueness, not secrecy (and no syscall each)


def new_queue_id(now: float | None = None) -> str:
    """Time-ordered and unique across instances: 11 hex digits of milliseconds + 10 random."""
    ms = int((now if now is not None else time.time()) * 1000)
    return f"{ms:011X}{_random.getrandbits(40):010X}"


def worker_name() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class NewMessage:
    """What intake hands to the store: the raw bytes and the envelope, nothing derived later."""

    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    raw: bytes | bytearray  # a bytearray: a big message in the buffer intake read it into (no copy)
    source: str
    client_addr: str
    helo: str = ""
    message_id: str = ""
    subject: str = ""
    received_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Claim:
    """One recipient of one message, leased to a worker."""

    id: int
    queue_id: str
    address: str
    attempts: int
    mail_from: str
    received_at: float
    source: str = ""
    client_addr: str = ""


@dataclass(frozen=True)
class Outcome:
    """A worker's result for one claimed recipient."""

    id: int
    queue_id: str
    address: str
    status: str  # sent | deferred | failed | suppressed
    reply: str
    next_attempt_at: float | None = None
    skin: str | None = None
    blocks: tuple[str, ...] = ()
    report: dict | None = None
    detail: str | None = None
    transform_error: str | None = None  # recorded on the message: why the transform failed open
    dkim: str | None = None  # recorded on the message: the original signature's verdict


BLOB_STREAM_FROM = 1024 * 1024  # a message this big is written to and read from SQLite with the blob API

_PG_MAX_PARAMS = 30_000  # the protocol allows 65,535 bound values per statement; a bigger group goes row-wise


def _enqueue_rows(batch: Sequence[NewMessage], streamed: set[str]) -> tuple[list[dict], ...]:
    """The rows a group adds to messages, recipients and events (a streamed message's raw goes in
    empty: the blob API writes it)."""
    msgs = [
        {
            "queue_id": m.queue_id,
            "received_at": m.received_at,
            "mail_from": m.mail_from,
            "source": m.source,
            "client_addr": m.client_addr,
            "helo": m.helo[:255],
            "message_id": m.message_id,
            "subject": m.subject,
            "size": len(m.raw),
            "raw": b"" if m.queue_id in streamed else m.raw,
        }
        for m in batch
    ]
    rcpts, evs = [], []
    for m in batch:
        detail = f"from {m.source} ({m.client_addr})"
        for rcpt in m.recipients:
            key = address_key(rcpt)
            rcpts.append({"queue_id": m.queue_id, "address": rcpt, "address_key": key, "status": QUEUED,
                          "attempts": 0, "next_attempt_at": m.received_at, "crashes": 0,
                          "updated_at": m.received_at})  # fmt: skip
            evs.append({"queue_id": m.queue_id, "address_key": key, "at": m.received_at,
                        "kind": "received", "detail": detail})  # fmt: skip
    return msgs, rcpts, evs


def _pg_one_statement(tables: tuple[list[dict], ...]) -> tuple[str, tuple] | None:
    """A group's rows as ONE statement of data-modifying CTEs: the three INSERTs in one round trip
    (an intake commit 6 -> 4 round trips with pre-ping, BEGIN and COMMIT), each of which waited its
    turn for the server process on a busy machine. None when it would bind too many values."""
    msgs, rcpts, evs = tables
    if not rcpts or sum(len(rows) * len(rows[0]) for rows in tables) > _PG_MAX_PARAMS:
        return None
    parts, params = [], []
    for table, rows in zip(("messages", "recipients", "events"), tables, strict=True):
        cols = list(rows[0])
        row = "(" + ", ".join(["%s"] * len(cols)) + ")"
        parts.append(f"INSERT INTO {table} ({', '.join(cols)}) VALUES " + ", ".join([row] * len(rows)))
        params += [r[c] for r in rows for c in cols]
    sql = f"WITH m AS ({parts[0]}), r AS ({parts[1]}) {parts[2]}"
    return sql, tuple(params)


# Statements a worker runs for every batch of outcomes, built once (see Store.record).
_RECORD_OUTCOME = (
    update(recipients)
    .where(
        recipients.c.id == bindparam("b_id"),
        recipients.c.claimed_by == bindparam("b_worker"),
        recipients.c.status == ACTIVE,
    )
    .values(
        status=bindparam("b_status"),
        last_reply=bindparam("b_reply"),
        next_attempt_at=bindparam("b_next"),
        attempts=recipients.c.attempts + 1,
        claimed_until=None,
        claimed_by=None,
        crashes=0,
        updated_at=bindparam("b_now"),
        skin=bindparam("b_skin"),
        blocks=bindparam("b_blocks"),
        report=bindparam("b_report"),
    )
)
_INSERT_EVENT = insert(events)
_NOTE_ON_MESSAGE = (
    update(messages)
    .where(messages.c.queue_id == bindparam("b_qid"))
    .values(
        transform_error=func.coalesce(bindparam("b_err"), messages.c.transform_error),
        dkim=func.coalesce(bindparam("b_dkim"), messages.c.dkim),
    )
)


def _claim_statement(postgres: bool):
    due = (
        select(recipients.c.id)
        .where(
            recipients.c.status == bindparam("c_status"),
            recipients.c.next_attempt_at <= bindparam("c_due"),
        )
        .order_by(recipients.c.next_attempt_at)
        .limit(bindparam("c_n"))
    )
    if postgres:
        due = due.with_for_update(skip_locked=True)
    return (
        update(recipients)
        .where(recipients.c.id.in_(due.scalar_subquery()))
        .values(
            status=ACTIVE,
            claimed_by=bindparam("c_worker"),
            claimed_until=bindparam("c_until"),
            updated_at=bindparam("c_now"),
        )
        .returning(recipients.c.id)
    )


# Store.claim's statements, built once: on SQLite the write lock is held from the first claim UPDATE to
# the commit, so nothing but the statements themselves should run in between.
_CLAIM, _CLAIM_PG = _claim_statement(False), _claim_statement(True)
_CLAIMED_ROWS = (
    select(
        recipients.c.id,
        recipients.c.queue_id,
        recipients.c.address,
        recipients.c.attempts,
        messages.c.mail_from,
        messages.c.received_at,
        messages.c.source,
        messages.c.client_addr,
    )
    .join(messages, messages.c.queue_id == recipients.c.queue_id)
    .where(recipients.c.id.in_(bindparam("c_ids", expanding=True)))
    .order_by(recipients.c.id)
)


class Store:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"

    def _run(self, fn, *args):
        try:
            return transaction(self.engine, lambda conn: fn(conn, *args))
        except SQLAlchemyError as e:
            raise StoreError(str(e.orig if getattr(e, "orig", None) else e).strip()) from e

    # -- intake -----------------------------------------------------------------------------------------

    def enqueue(self, batch: Sequence[NewMessage]) -> None:
        """Commits a group of messages with their recipients and 'received' events in one transaction."""
        self._run(self._enqueue, batch)

    @staticmethod
    def _enqueue(conn, batch: Sequence[NewMessage]) -> None:
        # SQLite keeps a copy of every bound value in its cached statement until the next bind: a big
        # message is written through the blob API instead (no copy, nothing kept after the commit)
        streamed = {
            m.queue_id for m in batch if len(m.raw) >= BLOB_STREAM_FROM and conn.dialect.name == "sqlite"
        }
        msgs, rcpts, evs = tables = _enqueue_rows(batch, streamed)
        if conn.dialect.name == "postgresql":
            statement = _pg_one_statement(tables)
            if statement is not None:
                conn.exec_driver_sql(*statement)
                return
        conn.execute(insert(messages), msgs)
        for m in batch:
            if m.queue_id in streamed:
                _write_blob(conn, m.queue_id, m.raw)
        conn.execute(insert(recipients), rcpts)
        conn.execute(insert(events), evs)

    # -- workers ----------------------------------------------------------------------------------------

    def claim(self, worker: str, limit: int, lease: float, now: float | None = None) -> list[Claim]:
        """Leases due recipients: fresh mail first, but a quarter of the batch always goes to retries."""
        now = time.time() if now is None else now
        return self._run(self._claim, worker, limit, lease, now)

    def _claim(self, conn, worker: str, limit: int, lease: float, now: float) -> list[Claim]:
        claimed: list[int] = []
        retry_share = max(1, limit // 4)
        take = _CLAIM_PG if self.postgres else _CLAIM
        for status, n in ((QUEUED, limit), (DEFERRED, None)):
            n = n if n is not None else max(retry_share, limit - len(claimed))
            params = {"c_status": status, "c_due": now, "c_n": n, "c_worker": worker,
                      "c_until": now + lease, "c_now": now}
            claimed.extend(conn.execute(take, params).scalars().all())
        if not claimed:
            return []
        rows = conn.execute(_CLAIMED_ROWS, {"c_ids": claimed}).all()
        return [Claim(*row) for row in rows]

    def raw(self, queue_id: str) -> bytes | None:
        if self.engine.dialect.name == "sqlite":
            return self._run(_read_sqlite, queue_id)
        return self._run(
            lambda c: c.execute(select(messages.c.raw).where(messages.c.queue_id == queue_id)).scalar()
        )

    def raws(self, queue_ids: Iterable[str], max_bytes: int = 8_000_000) -> dict[str, bytes]:
        """Raw messages of a claim batch in one query (up to ``max_bytes``; larger ones: one by one)."""
        ids = list(dict.fromkeys(queue_ids))
        if not ids:
            return {}

        def q(conn):
            small = conn.execute(
                select(messages.c.queue_id, messages.c.raw).where(
                    messages.c.queue_id.in_(ids), messages.c.size <= max_bytes // max(1, len(ids))
                )
            ).all()
            return {qid: raw for qid, raw in small}

        return self._run(q)

    def renew(self, worker: str, ids: Iterable[int], lease: float, now: float | None = None) -> None:
        ids = list(ids)
        if not ids:
            return
        until = (time.time() if now is None else now) + lease
        self._run(
            lambda c: c.execute(
                update(recipients)
                .where(recipients.c.id.in_(ids), recipients.c.claimed_by == worker)
                .values(claimed_until=until)
            )
        )

    def record(self, worker: str, outcomes: Sequence[Outcome], now: float | None = None) -> int:
        """Writes a group of outcomes; returns how many were still this worker's to write.

        Everything but the statements (JSON, address keys) is prepared before the transaction: on
        SQLite the write lock is held from the first statement to the commit, and intake waits for it.
        """
        if not outcomes:
            return 0
        now = time.time() if now is None else now
        updates = [
            {
                "b_id": o.id,
                "b_worker": worker,
                "b_status": o.status,
                "b_reply": o.reply[:2000],
                "b_next": o.next_attempt_at if o.next_attempt_at is not None else now,
                "b_now": now,
                "b_skin": o.skin,
                "b_blocks": json.dumps(list(o.blocks)) if o.blocks else None,
                "b_report": json.dumps(o.report) if o.report else None,
            }
            for o in outcomes
        ]
        evs = [
            {
                "queue_id": o.queue_id,
                "address_key": address_key(o.address),
                "at": now,
                "kind": o.status,
                "detail": o.detail or o.reply[:2000],
            }
            for o in outcomes
        ]
        notes = [
            {"b_qid": o.queue_id, "b_err": (o.transform_error or "")[:2000] or None, "b_dkim": o.dkim}
            for o in outcomes
            if o.transform_error or (o.dkim and o.dkim != "none")
        ]
        return self._run(self._record, updates, evs, notes)

    @staticmethod
    def _record(conn, updates: list[dict], evs: list[dict], notes: list[dict]) -> int:
        written = conn.execute(_RECORD_OUTCOME, updates).rowcount
        conn.execute(_INSERT_EVENT, evs)
        if notes:
            conn.execute(_NOTE_ON_MESSAGE, notes)
        return written

    def recover_expired(self, max_crashes: int, now: float | None = None, *, all_active: bool = False) -> int:
        """Returns recipients whose worker vanished to the queue; quarantines repeat offenders.

        A claim whose lease ran out means its worker died (or hung) while handling it. Counting those
        per recipient is how a message that crashes workers ends up failed instead of looping forever.
        ``all_active`` releases every claim: only for a single instance restarting on its own SQLite file.
        """
        now = time.time() if now is None else now
        return self._run(self._recover, max_crashes, now, all_active)

    @staticmethod
    def _recover(conn, max_crashes: int, now: float, all_active: bool) -> int:
        cond = recipients.c.status == ACTIVE
        if not all_active:
            cond = and_(cond, recipients.c.claimed_until < now)
        quarantine = recipients.c.crashes + 1 >= max_crashes
        reason = f"quarantined: its worker crashed or stalled {max_crashes} times while handling it"
        rows = conn.execute(
            update(recipients)
            .where(cond)
            .values(
                status=case((quarantine, FAILED), (recipients.c.attempts == 0, QUEUED), else_=DEFERRED),
                last_reply=case((quarantine, reason), else_=recipients.c.last_reply),
                crashes=recipients.c.crashes + 1,
                claimed_until=None,
                claimed_by=None,
                updated_at=now,
            )
            .returning(recipients.c.queue_id, recipients.c.address_key, recipients.c.status)
        ).all()
        if rows:
            conn.execute(
                insert(events),
                [
                    {
                        "queue_id": q,
                        "address_key": a,
                        "at": now,
                        "kind": "quarantined" if s == FAILED else "requeued",
                        "detail": reason if s == FAILED else "claim expired; back in the queue",
                    }
                    for q, a, s in rows
                ],
            )
        return len(rows)

    # -- inspection -------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Raises StoreError unless the queue tables answer a query."""
        self._run(lambda c: c.execute(select(recipients.c.id).limit(1)).all())

    def depth(self) -> dict[str, int]:
        """Recipients per pending state (queued, active, deferred)."""
        rows = self._run(
            lambda c: c.execute(
                select(recipients.c.status, func.count())
                .where(recipients.c.status.in_((QUEUED, ACTIVE, DEFERRED)))
                .group_by(recipients.c.status)
            ).all()
        )
        out = {QUEUED: 0, ACTIVE: 0, DEFERRED: 0}
        out.update({s: n for s, n in rows})
        return out

    def history(self, address: str, limit: int = 100) -> list[dict]:
        """One recipient's timeline, newest first: one entry per message, with its events."""

        def q(conn):
            rows = (
                conn.execute(
                    select(
                        recipients.c.queue_id,
                        recipients.c.status,
                        recipients.c.attempts,
                        recipients.c.last_reply,
                        recipients.c.skin,
                        recipients.c.blocks,
                        recipients.c.report,
                        recipients.c.updated_at,
                        recipients.c.address,
                        messages.c.message_id,
                        messages.c.subject,
                        messages.c.received_at,
                        messages.c.mail_from,
                        messages.c.source,
                        messages.c.transform_error,
                    )
                    .join(messages, messages.c.queue_id == recipients.c.queue_id)
                    .where(recipients.c.address_key == address_key(address))
                    .order_by(recipients.c.id.desc())
                    .limit(limit)
                )
                .mappings()
                .all()
            )
            qids = [r["queue_id"] for r in rows]
            evs: dict[str, list[dict]] = {}
            if qids:
                for e in conn.execute(
                    select(events.c.queue_id, events.c.at, events.c.kind, events.c.detail)
                    .where(events.c.address_key == address_key(address), events.c.queue_id.in_(qids))
                    .order_by(events.c.at, events.c.id)
                ).mappings():
                    evs.setdefault(e["queue_id"], []).append(
                        {"at": e["at"], "kind": e["kind"], "detail": e["detail"]}
                    )
            return [
                {
                    "queue_id": r["queue_id"],
                    "message_id": r["message_id"],
                    "subject": r["subject"],
                    "received_at": r["received_at"],
                    "recipient": r["address"],
                    "mail_from": r["mail_from"],
                    "source": r["source"],
                    # 'active' is an internal lease state: to a reader the message is still queued
                    "status": QUEUED if r["status"] == ACTIVE else r["status"],
                    "attempts": r["attempts"],
                    "skin": r["skin"],
                    "blocks": json.loads(r["blocks"]) if r["blocks"] else [],
                    "upstream_reply": r["last_reply"],
                    "transform_error": r["transform_error"],
                    "updated_at": r["updated_at"],
                    "events": evs.get(r["queue_id"], []),
                    **_shaping(r["report"]),
                }
                for r in rows
            ]

        return self._run(q)

    def listing(self, statuses: Sequence[str], limit: int = 200, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        rows = self._run(
            lambda c: (
                c.execute(
                    select(
                        recipients.c.id,
                        recipients.c.queue_id,
                        recipients.c.address,
                        recipients.c.status,
                        recipients.c.attempts,
                        recipients.c.next_attempt_at,
                        recipients.c.last_reply,
                        messages.c.mail_from,
                        messages.c.subject,
                        messages.c.received_at,
                    )
                    .join(messages, messages.c.queue_id == recipients.c.queue_id)
                    .where(recipients.c.status.in_(statuses))
                    .order_by(recipients.c.next_attempt_at)
                    .limit(limit)
                )
                .mappings()
                .all()
            )
        )
        return [dict(r) | {"due": r["status"] != FAILED and r["next_attempt_at"] <= now} for r in rows]

    def retry_now(self, selector: Sequence[str], now: float | None = None) -> int:
        """Makes deferred (and failed) recipients due now. selector: queue ids, recipient ids or 'all'."""
        now = time.time() if now is None else now
        cond = recipients.c.status.in_((DEFERRED, FAILED))
        if list(selector) != ["all"]:
            cond = and_(cond, _selected(selector))
        values = {"status": DEFERRED, "next_attempt_at": now, "crashes": 0}
        return self._operator_change(cond, values, "retry", "relay queue retry", now)

    def delete(self, selector: Sequence[str], now: float | None = None) -> int:
        """Removes pending recipients from the queue (kept in the log as failed, reason 'deleted')."""
        now = time.time() if now is None else now
        cond = and_(recipients.c.status.in_((QUEUED, DEFERRED, FAILED)), _selected(selector))
        values = {
            "status": FAILED,
            "last_reply": "deleted from the queue by an operator",
            "next_attempt_at": now,
        }
        return self._operator_change(cond, values, "deleted", "relay queue delete", now)

    def _operator_change(self, cond, values: dict, kind: str, detail: str, now: float) -> int:
        """One `relay queue` action: the recipients' new state and a timeline event for each."""

        def q(conn):
            rows = conn.execute(
                update(recipients)
                .where(cond)
                .values(**values, updated_at=now)
                .returning(recipients.c.queue_id, recipients.c.address_key)
            ).all()
            if rows:
                conn.execute(
                    insert(events),
                    [
                        {"queue_id": qid, "address_key": a, "at": now, "kind": kind, "detail": detail}
                        for qid, a in rows
                    ],
                )
            return len(rows)

        return self._run(q)

    def message(self, queue_id: str) -> tuple[dict, list[str]] | None:
        """The stored message (raw and envelope) and its recipients, for replay and the console."""

        def q(conn):
            row = conn.execute(select(messages).where(messages.c.queue_id == queue_id)).mappings().first()
            if row is None:
                return None
            rcpts = (
                conn.execute(
                    select(recipients.c.address)
                    .where(recipients.c.queue_id == queue_id)
                    .order_by(recipients.c.id)
                )
                .scalars()
                .all()
            )
            return dict(row), list(rcpts)

        return self._run(q)

    def counts(self) -> dict[str, int]:
        rows = self._run(
            lambda c: c.execute(select(recipients.c.status, func.count()).group_by(recipients.c.status)).all()
        )
        return {s: n for s, n in rows}

    def purge(self, before: float) -> int:
        """Deletes messages whose recipients are all final and older than ``before`` (log retention)."""

        def q(conn):
            old = (
                select(messages.c.queue_id)
                .where(messages.c.received_at < before)
                .where(
                    ~select(recipients.c.id)
                    .where(
                        recipients.c.queue_id == messages.c.queue_id,
                        recipients.c.status.not_in((SENT, FAILED, SUPPRESSED)),
                    )
                    .exists()
                )
            )
            ids = conn.execute(old).scalars().all()
            if ids:
                conn.execute(delete(events).where(events.c.queue_id.in_(ids)))
                conn.execute(delete(messages).where(messages.c.queue_id.in_(ids)))
            return len(ids)

        return self._run(q)


def _shaping(report_json: str | None) -> dict:
    """What shaped the message, from the stored transform report: category, products, file versions."""
    try:
        report = json.loads(report_json) if report_json else {}
    except ValueError:
        report = {}
    rules = report.get("rules") or {}
    return {
        "category": rules.get("category"),
        "kind": rules.get("kind"),
        "products": rules.get("products", []),
        "rules_matched": rules.get("matched", []),
        "versions": {"skin": report.get("skin_version"), **(rules.get("versions") or {})},
        "transform": report.get("action"),
        "shadow": report.get("shadow"),
        "skin_shadow": report.get("skin_shadow"),
        "rollout": report.get("rollout"),
    }


def _selected(selector: Sequence[str]):
    """Recipients named by queue id or by recipient id (digits)."""
    ids = [int(s) for s in selector if s.isdigit()]
    return or_(recipients.c.queue_id.in_(selector), recipients.c.id.in_(ids))


def _write_blob(conn, queue_id: str, raw: bytes | bytearray) -> None:
    """Writes a message's bytes into its row with SQLite's incremental blob I/O, in this transaction."""
    rowid = conn.execute(
        update(messages)
        .where(messages.c.queue_id == queue_id)
        .values(raw=func.zeroblob(len(raw)))
        .returning(literal_column("rowid"))
    ).scalar_one()
    with conn.connection.driver_connection.blobopen("messages", "raw", rowid) as blob:
        blob.write(raw)


def _read_sqlite(conn, queue_id: str) -> bytes | None:
    """A big message is read with the blob API, straight into one bytes object (a plain SELECT makes
    SQLite assemble the value first, then Python copies it)."""
    row = conn.execute(_READ_SQLITE, {"q": queue_id}).first()
    if row is None:
        return None
    if row.small is not None:
        return row.small
    with conn.connection.driver_connection.blobopen("messages", "raw", row.rowid, readonly=True) as blob:
        return blob.read()


# one statement: the bytes themselves when small, else where the blob API finds them
_READ_SQLITE = select(
    literal_column("rowid").label("rowid"),
    case((messages.c.size < BLOB_STREAM_FROM, messages.c.raw), else_=None).label("small"),
).where(messages.c.queue_id == bindparam("q"))
