"""The delivery worker: claim due recipients, transform, deliver, record the outcome.

Each worker runs in its own process with its own event loop (the transform is CPU work and must never
run on the intake's loop). Claims are leases: renewed while a delivery runs, recovered by any worker
when they lapse, so a worker killed mid-delivery loses nothing (at worst a duplicate, never a loss).
Outcomes are written in groups, many per transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from relay import metrics
from relay.config import Settings
from relay.delivery.retry import DEFER, FAIL, SENT, Reply, classify, expired, next_delay
from relay.delivery.upstream import UpstreamError
from relay.store.queue import Claim, Outcome, Store, worker_name
from relay.store.schema import DEFERRED, FAILED
from relay.store.schema import SENT as SENT_STATUS
from relay.transform.types import Spliced

log = logging.getLogger(__name__)

CLAIM_GATHER = 0.005  # seconds a woken worker waits before claiming, so claims come in batches


@dataclass
class Prepared:
    """What the pipeline made of one message for one recipient."""

    data: bytes | Spliced
    skin: str | None = None
    blocks: tuple[str, ...] = ()
    report: dict | None = None
    error: str | None = None  # the transform failed open: the original is sent, this says why
    status: str | None = None  # e.g. "suppressed": do not send
    defer: str | None = None  # e.g. DKIM signing failed: retry later rather than send unsigned
    dkim: str | None = None  # the original signature's verdict, recorded once per message
    reply: str | None = None  # the log's text for a recipient not sent (e.g. why it is suppressed)
    mail_from: str | None = None  # envelope sender the rules set (bounces to the brand); None: keep it
    after_sent: Callable[..., None] | None = None  # bookkeeping once upstream took it (caps, follow-ups)


Prepare = Callable[[bytes, Claim], Prepared]


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        upstream,
        prepare: Prepare,
        clock: Callable[[], float] = time.time,
        name: str | None = None,
    ):
        self.settings = settings
        self.d = settings.delivery
        self.store = store
        self.upstream = upstream
        self.prepare = prepare
        self.clock = clock
        self.name = name or worker_name()
        self.inflight: dict[int, asyncio.Task] = {}
        self.outcomes: list[Outcome] = []
        self.after_sent: list[Callable[..., None]] = []
        self._raw_cache: OrderedDict[str, bytes] = OrderedDict()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New mail was queued: look now rather than at the next poll."""
        self._wake.set()

    # -- main loop --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        helpers = [
            asyncio.create_task(self._every(0.05, self.flush), name="flush"),
            asyncio.create_task(self._every(self.d.lease / 3, self._renew), name="renew"),
            asyncio.create_task(self._every(min(5.0, self.d.lease / 2), self._recover), name="recover"),
        ]
        try:
            while not stop.is_set():
                self._wake.clear()  # before claiming: a wake-up during the claim is not lost
                free = self.d.concurrency - len(self.inflight)
                want = min(free, self.d.batch_size)
                claims: list[Claim] = []
                if want > 0:
                    try:
                        claims = await asyncio.to_thread(
                            self.store.claim, self.name, want, self.d.lease, self.clock()
                        )
                    except Exception as e:  # noqa: BLE001 - store down: wait and try again
                        log.warning("claim failed: %s", e)
                if claims:
                    await self._prefetch(claims)
                for c in claims:
                    self.inflight[c.id] = asyncio.create_task(self._handle(c))
                # Claim again at once only when a full batch came and slots are left; otherwise sleep
                # until new mail is committed or a delivery frees a slot (both wake us), or the poll.
                if want == 0 or len(claims) < want or free - len(claims) <= 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.d.poll_interval)
                        # Let a few more commits land: one claim for several messages, not one each.
                        await asyncio.sleep(CLAIM_GATHER)
                    except TimeoutError:
                        pass
            await self.drain()
        finally:
            for h in helpers:
                h.cancel()
            await self.flush()
            await self.upstream.close()

    async def drain(self, timeout: float = 5.0) -> None:
        """Waits for deliveries in flight; whatever is left keeps its lease and is recovered later."""
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()), timeout=timeout)
        await self.flush()

    async def _every(self, interval: float, fn) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception as e:  # noqa: BLE001 - a helper loop must survive a store hiccup
                log.warning("%s failed: %s", getattr(fn, "__name__", fn), e)

    async def _renew(self) -> None:
        await asyncio.to_thread(self.store.renew, self.name, list(self.inflight), self.d.lease, self.clock())

    async def _recover(self) -> None:
        n = await asyncio.to_thread(self.store.recover_expired, self.d.max_crashes, self.clock())
        if n:
            metrics.recipients_requeued.inc(n)
            log.warning("recovered %d recipients whose claim had lapsed", n)

    async def flush(self) -> None:
        if not self.outcomes:
            return
        batch, self.outcomes = self.outcomes, []
        try:
            await asyncio.to_thread(self.store.record, self.name, batch, self.clock())
        except Exception:
            self.outcomes[:0] = batch  # keep them; the next flush tries again
            raise
        callbacks, self.after_sent = self.after_sent, []
        record_sent = getattr(self.prepare, "record_sent", None)
        if callbacks and record_sent is not None:
            try:
                await asyncio.to_thread(record_sent, callbacks, self.clock())
            except Exception as e:  # noqa: BLE001 - caps bookkeeping must never hold mail back
                log.error("after-sent bookkeeping of %d recipients failed: %s", len(callbacks), e)

    # -- one recipient ---------------------------------------------------------------------------------

    async def _prefetch(self, claims: list[Claim]) -> None:
        """One query for the raw bytes of a whole batch (not one per recipient)."""
        missing = [c.queue_id for c in claims if c.queue_id not in self._raw_cache]
        try:
            found = await asyncio.to_thread(self.store.raws, missing) if missing else {}
        except Exception as e:  # noqa: BLE001 - each delivery fetches its own then
            log.warning("prefetch failed: %s", e)
            return
        for qid, raw in found.items():
            self._remember(qid, raw)

    def _remember(self, queue_id: str, raw: bytes) -> None:
        if len(raw) < 1_000_000:
            self._raw_cache[queue_id] = raw
            while len(self._raw_cache) > max(64, 2 * self.d.concurrency):
                self._raw_cache.popitem(last=False)

    async def _raw(self, queue_id: str) -> bytes | None:
        raw = self._raw_cache.get(queue_id)
        if raw is None:
            raw = await asyncio.to_thread(self.store.raw, queue_id)
            if raw is not None:
                self._remember(queue_id, raw)
        return raw

    async def _handle(self, claim: Claim) -> None:
        try:
            # Not `self.outcomes.append(await ...)`: that binds the list before the await, and flush()
            # swaps the list meanwhile, which silently lost outcomes (and re-sent their mail later).
            outcome = await self._deliver(claim)
            self.outcomes.append(outcome)
        except Exception as e:  # noqa: BLE001 - never lose the recipient: defer it with the reason
            log.exception("delivery of %s to %s crashed", claim.queue_id, claim.address)
            self.outcomes.append(self._outcome(claim, Reply(451, f"4.3.0 local error: {type(e).__name__}")))
        finally:
            self.inflight.pop(claim.id, None)
            self._wake.set()

    async def _deliver(self, claim: Claim) -> Outcome:
        now = self.clock()
        if expired(claim.received_at, now, self.d) and claim.attempts > 0:
            metrics.recipients_failed.labels(reason="expired").inc()
            return Outcome(
                claim.id,
                claim.queue_id,
                claim.address,
                FAILED,
                "5.4.7 queue lifetime exceeded; last reply kept in the timeline",
                detail="gave up: queue lifetime exceeded",
            )
        raw = await self._raw(claim.queue_id)
        if raw is None:
            return Outcome(
                claim.id, claim.queue_id, claim.address, FAILED, "5.3.0 message missing from store"
            )
        started = time.perf_counter()
        prepared = self.prepare(raw, claim)
        metrics.transform_seconds.observe(time.perf_counter() - started)
        if prepared.status:
            return Outcome(
                claim.id,
                claim.queue_id,
                claim.address,
                prepared.status,
                prepared.reply or prepared.status,
                skin=prepared.skin,
                blocks=prepared.blocks,
                report=prepared.report,
                transform_error=prepared.error,
                dkim=prepared.dkim,
            )
        if prepared.defer:
            return self._outcome(claim, Reply(451, prepared.defer), prepared)
        started = time.perf_counter()
        try:
            mail_from = prepared.mail_from if prepared.mail_from is not None else claim.mail_from
            reply = await self.upstream.send(mail_from, claim.address, prepared.data)
        except UpstreamError as e:
            reply = Reply(451, f"4.4.1 {e}")
        metrics.delivery_seconds.observe(time.perf_counter() - started)
        return self._outcome(claim, reply, prepared)

    def _outcome(self, claim: Claim, reply: Reply, prepared: Prepared | None = None) -> Outcome:
        now = self.clock()
        action = classify(reply, self.d)
        extra = {}
        if prepared is not None:
            extra = {
                "skin": prepared.skin,
                "blocks": prepared.blocks,
                "report": prepared.report,
                "transform_error": prepared.error,
                "dkim": prepared.dkim,
            }
        if action == SENT:
            metrics.recipients_delivered.inc()
            for block in prepared.blocks if prepared else ():
                metrics.crosssell_injected.labels(block=block).inc()
            if prepared is not None and prepared.after_sent is not None:
                self.after_sent.append(prepared.after_sent)
            return Outcome(claim.id, claim.queue_id, claim.address, SENT_STATUS, str(reply), **extra)
        if action == FAIL:
            metrics.recipients_failed.labels(reason="rejected").inc()
            return Outcome(claim.id, claim.queue_id, claim.address, FAILED, str(reply), **extra)
        assert action == DEFER
        if expired(claim.received_at, now, self.d):
            metrics.recipients_failed.labels(reason="expired").inc()
            return Outcome(
                claim.id,
                claim.queue_id,
                claim.address,
                FAILED,
                str(reply),
                detail=f"gave up (queue lifetime exceeded): {reply}",
                **extra,
            )
        metrics.recipients_deferred.inc()
        delay = next_delay(claim.attempts + 1, self.d)
        return Outcome(
            claim.id,
            claim.queue_id,
            claim.address,
            DEFERRED,
            str(reply),
            next_attempt_at=now + delay,
            detail=f"{reply} (retry in {delay:.0f}s)",
            **extra,
        )
