"""The follow-up scheduler's loop: due follow-ups become queued messages, delivered like any other.

It runs in one delivery worker (or the worker thread), with the rule book that worker's pipeline already
holds, rather than in the intake process: the intake then never loads the rules (Jinja2, lxml, the
catalog), which kept ~14 MB of RSS in the main process for a tick every two seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from relay.rules.scheduler import run_due_followups
from relay.store.queue import NewMessage, Store, new_queue_id
from relay.store.summary import summary

log = logging.getLogger(__name__)

EVERY = 2.0  # seconds between ticks
SOURCE = "relay-followup"


def followup_message(raw: bytes, rcpt: str, mail_from: str, hostname: str, now: float) -> NewMessage:
    """A rendered follow-up as a queue entry: one recipient, logged like a message from a client."""
    message_id, subject = summary(raw)
    return NewMessage(
        queue_id=new_queue_id(now),
        mail_from=mail_from,
        recipients=(rcpt,),
        raw=raw,
        source=SOURCE,
        client_addr="127.0.0.1",
        helo=hostname,
        message_id=message_id,
        subject=subject,
        received_at=now,
    )


async def schedule_followups(
    pipeline,
    ledger,
    store: Store,
    hostname: str,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.time,
    on_queued: Callable[[], None] = lambda: None,
    every: float = EVERY,
) -> None:
    """Every ``every`` seconds: pick up rule edits, then render and enqueue what is due at ``clock()``.

    ``pipeline`` supplies the rule book (``.book``, None while no rules load) and its ``refresh()``;
    the book is read-only between reloads, so the tick may run in a thread beside the deliveries.
    ``ledger`` and ``store`` should commit durably: a follow-up is marked done before it is queued.
    ``on_queued`` wakes the delivery loop. Outlives a broken rule or an unreachable store.
    """

    def enqueue(raw: bytes, rcpt: str, mail_from: str) -> str:
        msg = followup_message(raw, rcpt, mail_from, hostname, time.time())
        store.enqueue([msg])
        return msg.queue_id

    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass
        try:
            pipeline.refresh()
            book = pipeline.book
            if book is None:
                continue
            counts = await asyncio.to_thread(
                run_due_followups, book, ledger, enqueue, clock(), original=store.raw
            )
            if counts["queued"]:
                on_queued()
            if any(counts.values()):
                log.info("follow-ups: %s", counts)
        except Exception as e:  # noqa: BLE001 - the scheduler must outlive a broken rule or store
            log.error("follow-up scheduling failed: %s", e)
