"""The rules ledger: suppressions, the offers log and sends log behind the caps, scheduled follow-ups.

Tables: relay.store.schema (created by migration 0002). Addresses are keyed lower-cased. Times are UTC
epoch seconds (float). Every method is one short transaction and works on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from relay.store.database import StoreError, transaction
from relay.store.schema import address_key, followups, offers, rule_sends, suppressions

PENDING, DONE, CANCELLED = "pending", "done", "cancelled"

# The statements a worker runs for every message, built once: building a SQLAlchemy statement costs
# more than SQLite takes to run it (offer_counts went from about 300 to 95 us).
_IS_SUPPRESSED = select(suppressions.c.address_key).where(suppressions.c.address_key == bindparam("k"))
_OFFER_COUNTS = (
    select(offers.c.product, func.count())
    .where(and_(offers.c.address_key == bindparam("k"), offers.c.at >= bindparam("since")))
    .group_by(offers.c.product)
)
_MARKETING_COUNT = (
    select(func.count())
    .select_from(rule_sends)
    .where(
        and_(
            rule_sends.c.address_key == bindparam("k"),
            rule_sends.c.category == "marketing",
            rule_sends.c.at >= bindparam("since"),
        )
    )
)
_INSERT_OFFERS, _INSERT_SEND = insert(offers), insert(rule_sends)


@dataclass(frozen=True)
class Suppression:
    address: str
    reason: str
    source: str
    created_at: float


@dataclass(frozen=True)
class Followup:
    id: int
    address: str
    name: str
    queue_id: str  # the message that triggered it
    due_at: float
    status: str
    payload: dict[str, Any] = field(default_factory=dict)


def _send_row(address: str, queue_id: str, category: str, at: float, kind: str | None,
              rules_version: str | None) -> dict:
    return dict(address_key=address_key(address), queue_id=queue_id, category=category, kind=kind,
                rules_version=rules_version, at=at)


def _offer_rows(address: str, queue_id: str, products: Iterable[str], at: float, block: str) -> list[dict]:
    k = address_key(address)
    return [
        dict(address_key=k, queue_id=queue_id, block=block, product=p, at=at) for p in dict.fromkeys(products)
    ]


def _followup_row(address: str, name: str, queue_id: str, due_at: float, payload: dict | None,
                  now: float) -> dict:
    return dict(
        address_key=address_key(address),
        address=address.strip(),
        name=name,
        queue_id=queue_id,
        due_at=due_at,
        status=PENDING,
        payload=json.dumps(payload or {}, ensure_ascii=False),
        created_at=now,
        updated_at=now,
    )


class LedgerWrites:
    """The after-send writes of a group of recipients, gathered without touching the database; the same
    calls as Ledger's, so ``RuleDecision.record`` fills it. ``Ledger.write`` stores it in three
    statements, so a worker holds SQLite's write lock for those alone, not for the Python around them."""

    def __init__(self) -> None:
        self.sends: list[dict] = []
        self.offers: list[dict] = []
        self.followups: list[dict] = []

    def record_send(self, address: str, queue_id: str, category: str, at: float, *, kind: str | None = None,
                    rules_version: str | None = None) -> None:
        self.sends.append(_send_row(address, queue_id, category, at, kind, rules_version))

    def record_offers(self, address: str, queue_id: str, products: Iterable[str], at: float,
                      block: str = "") -> None:
        self.offers.extend(_offer_rows(address, queue_id, products, at, block))

    def schedule_followup(self, address: str, name: str, queue_id: str, due_at: float, *,
                          payload: dict[str, Any] | None = None, now: float) -> None:
        self.followups.append(_followup_row(address, name, queue_id, due_at, payload, now))


class Ledger:
    """What the rules remember per recipient. ``Ledger(engine)`` on a migrated database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()
        dialect = sqlite_insert if engine.dialect.name == "sqlite" else pg_insert
        # a follow-up this message already scheduled for this address is not scheduled twice
        self._insert_followups = dialect(followups).on_conflict_do_nothing(
            index_elements=["queue_id", "address_key", "name"]
        )
        self._insert_followup = self._insert_followups.returning(followups.c.id)  # its id, or None

    def write(self, writes: LedgerWrites) -> None:
        """Stores gathered after-send writes in one short transaction."""

        def tx(conn):  # noqa: ANN001, ANN202
            if writes.sends:
                conn.execute(_INSERT_SEND, writes.sends)
            if writes.offers:
                conn.execute(_INSERT_OFFERS, writes.offers)
            if writes.followups:
                conn.execute(self._insert_followups, writes.followups)

        if writes.sends or writes.offers or writes.followups:
            self._run(tx)

    def batch(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` (which makes ledger calls) in one transaction: one commit for a worker's group."""

        def body(conn):  # noqa: ANN001, ANN202
            self._local.conn = conn
            try:
                fn()
            finally:
                self._local.conn = None

        try:
            transaction(self.engine, body)
        except SQLAlchemyError as e:
            raise StoreError(f"ledger: {e.__class__.__name__}: {e}") from e

    def _run(self, fn):  # noqa: ANN001, ANN202
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return fn(conn)
        try:
            return transaction(self.engine, fn)
        except IntegrityError:
            raise
        except SQLAlchemyError as e:
            raise StoreError(f"ledger: {e.__class__.__name__}: {e}") from e

    # -- suppressions ---------------------------------------------------------------------------------

    def add_suppression(self, address: str, *, reason: str = "manual", source: str = "", now: float) -> bool:
        """Suppress marketing to ``address`` and cancel its pending follow-ups. False if already there."""
        k = address_key(address)

        def tx(conn):  # noqa: ANN001, ANN202
            conn.execute(
                update(followups)
                .where(and_(followups.c.address_key == k, followups.c.status == PENDING))
                .values(status=CANCELLED, updated_at=now, result=f"unsubscribed ({reason})")
            )
            if conn.execute(
                select(suppressions.c.address_key).where(suppressions.c.address_key == k)
            ).first():
                return False
            conn.execute(
                insert(suppressions).values(
                    address_key=k, address=address.strip(), reason=reason[:64], source=source, created_at=now
                )
            )
            return True

        try:
            return self._run(tx)
        except IntegrityError:  # a concurrent add of the same address
            return False

    def remove_suppression(self, address: str) -> bool:
        return bool(
            self._run(
                lambda c: (
                    c.execute(
                        delete(suppressions).where(suppressions.c.address_key == address_key(address))
                    ).rowcount
                )
            )
        )

    def is_suppressed(self, address: str) -> bool:
        k = address_key(address)
        return self._run(lambda c: c.execute(_IS_SUPPRESSED, {"k": k}).first()) is not None

    def list_suppressions(self, *, like: str | None = None, limit: int = 1000) -> list[Suppression]:
        q = select(suppressions).order_by(suppressions.c.created_at.desc(), suppressions.c.address_key)
        if like:
            q = q.where(suppressions.c.address_key.contains(like.lower(), autoescape=True))
        rows = self._run(lambda c: c.execute(q.limit(limit)).all())
        return [Suppression(r.address, r.reason, r.source, r.created_at) for r in rows]

    # -- offers and sends (caps) ---------------------------------------------------------------------------

    def record_offers(
        self, address: str, queue_id: str, products: Iterable[str], at: float, block: str = ""
    ) -> None:
        rows = _offer_rows(address, queue_id, products, at, block)
        if rows:
            self._run(lambda c: c.execute(_INSERT_OFFERS, rows))

    def offer_count(self, address: str, product: str, since: float) -> int:
        return self._run(
            lambda c: c.execute(
                select(func.count())
                .select_from(offers)
                .where(
                    and_(
                        offers.c.address_key == address_key(address),
                        offers.c.product == product,
                        offers.c.at >= since,
                    )
                )
            ).scalar_one()
        )

    def offer_counts(self, address: str, since: float) -> dict[str, int]:
        """Offers per product to ``address`` since ``since`` (one query for a whole block)."""
        k = address_key(address)
        rows = self._run(lambda c: c.execute(_OFFER_COUNTS, {"k": k, "since": since}).all())
        return {r[0]: int(r[1]) for r in rows}

    def offers_for(self, address: str, limit: int = 200) -> list[tuple[str, str, str, float]]:
        """(queue_id, block, product, at) offered to ``address``, newest first (for `relay history`)."""
        rows = self._run(
            lambda c: c.execute(
                select(offers.c.queue_id, offers.c.block, offers.c.product, offers.c.at)
                .where(offers.c.address_key == address_key(address))
                .order_by(offers.c.at.desc(), offers.c.id.desc())
                .limit(limit)
            ).all()
        )
        return [(r[0], r[1], r[2], float(r[3])) for r in rows]

    def record_send(
        self,
        address: str,
        queue_id: str,
        category: str,
        at: float,
        *,
        kind: str | None = None,
        rules_version: str | None = None,
    ) -> None:
        row = _send_row(address, queue_id, category, at, kind, rules_version)
        self._run(lambda c: c.execute(_INSERT_SEND, row))

    def marketing_count(self, address: str, since: float) -> int:
        k = address_key(address)
        return self._run(lambda c: c.execute(_MARKETING_COUNT, {"k": k, "since": since}).scalar_one())

    # -- follow-ups ---------------------------------------------------------------------------------------

    def schedule_followup(
        self,
        address: str,
        name: str,
        queue_id: str,
        due_at: float,
        *,
        payload: dict[str, Any] | None = None,
        now: float,
    ) -> int | None:
        """Schedule; None when this message already scheduled this follow-up for this address."""
        values = _followup_row(address, name, queue_id, due_at, payload, now)
        return self._run(lambda c: c.execute(self._insert_followup, values).scalar())

    def due_followups(self, now: float, limit: int = 100) -> list[Followup]:
        rows = self._run(
            lambda c: c.execute(
                select(followups)
                .where(and_(followups.c.status == PENDING, followups.c.due_at <= now))
                .order_by(followups.c.due_at, followups.c.id)
                .limit(limit)
            ).all()
        )
        return [_followup(r) for r in rows]

    def followups_for(self, address: str) -> list[Followup]:
        rows = self._run(
            lambda c: c.execute(
                select(followups)
                .where(followups.c.address_key == address_key(address))
                .order_by(followups.c.id)
            ).all()
        )
        return [_followup(r) for r in rows]

    def mark_followup_done(self, followup_id: int, now: float, result: str = "queued") -> bool:
        """Done (e.g. queued as a new message). False if it was no longer pending (another worker took it)."""
        return self._set_status(followup_id, DONE, now, result)

    def cancel_followup(self, followup_id: int, now: float, reason: str = "cancelled") -> bool:
        return self._set_status(followup_id, CANCELLED, now, reason)

    def retry_followup(self, followup_id: int, due_at: float, now: float, reason: str = "retry") -> bool:
        """Back to pending at ``due_at`` (e.g. enqueueing failed after the follow-up was claimed)."""
        return bool(
            self._run(
                lambda c: (
                    c.execute(
                        update(followups)
                        .where(followups.c.id == followup_id)
                        .values(status=PENDING, due_at=due_at, updated_at=now, result=reason)
                    ).rowcount
                )
            )
        )

    def set_followup_result(self, followup_id: int, result: str, now: float) -> None:
        self._run(
            lambda c: c.execute(
                update(followups).where(followups.c.id == followup_id).values(result=result, updated_at=now)
            )
        )

    def cancel_followups(self, address: str, now: float, reason: str = "cancelled") -> int:
        return self._run(
            lambda c: (
                c.execute(
                    update(followups)
                    .where(
                        and_(followups.c.address_key == address_key(address), followups.c.status == PENDING)
                    )
                    .values(status=CANCELLED, updated_at=now, result=reason)
                ).rowcount
            )
        )

    def _set_status(self, followup_id: int, status: str, now: float, result: str) -> bool:
        return bool(
            self._run(
                lambda c: (
                    c.execute(
                        update(followups)
                        .where(and_(followups.c.id == followup_id, followups.c.status == PENDING))
                        .values(status=status, updated_at=now, result=result)
                    ).rowcount
                )
            )
        )


def _followup(r: Any) -> Followup:
    try:
        payload = json.loads(r.payload or "{}")
    except ValueError:
        payload = {}
    return Followup(int(r.id), r.address, r.name, r.queue_id, float(r.due_at), r.status, payload)
