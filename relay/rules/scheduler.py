"""Due follow-ups -> new queued messages. One call per scheduler tick; the caller owns the loop and clock."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: enqueue(raw, recipient, mail_from) -> queue_id, e.g. the store's enqueue with source "relay-followup"
Enqueue = Callable[[bytes, str, str], str]


def run_due_followups(
    book: Any,
    ledger: Any,
    enqueue: Enqueue,
    now: float,
    *,
    limit: int = 100,
    retry_after: float = 300.0,
    original: Callable[[str], bytes | None] | None = None,
) -> dict[str, int]:
    """Render and enqueue the follow-ups due at ``now``. At most once: each one is claimed in the ledger
    (pending -> done) before it is enqueued, so two instances never both send it; if enqueueing fails it goes
    back to pending ``retry_after`` seconds later. Returns counts {"queued", "cancelled", "failed"}."""
    counts = {"queued": 0, "cancelled": 0, "failed": 0}
    for f in ledger.due_followups(now, limit):
        try:
            raw, why = book.prepare_followup(f, ledger, now, original)
        except Exception as e:  # noqa: BLE001 - a broken template must not stop the others
            log.exception("follow-up %s for %s: render failed", f.name, f.address)
            ledger.retry_followup(f.id, now + retry_after, now, f"render failed: {type(e).__name__}")
            counts["failed"] += 1
            continue
        if raw is None:
            if ledger.cancel_followup(f.id, now, why):
                counts["cancelled"] += 1
            continue
        if not ledger.mark_followup_done(f.id, now, "queued"):
            continue  # another instance took it
        mail_from = (f.payload or {}).get("mail_from") or ""
        try:
            queue_id = enqueue(raw, f.address, mail_from)
        except Exception as e:  # noqa: BLE001
            log.exception("follow-up %s for %s: enqueue failed", f.name, f.address)
            ledger.retry_followup(f.id, now + retry_after, now, f"enqueue failed: {type(e).__name__}")
            counts["failed"] += 1
            continue
        ledger.set_followup_result(f.id, f"queued {queue_id}", now)
        counts["queued"] += 1
    return counts
