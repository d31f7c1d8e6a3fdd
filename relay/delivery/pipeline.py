"""What the worker does to a message before sending it: decide, rewrap, stamp.

Kept apart from the worker loop so the same call serves `relay preview` and tests. The transform is
fail-open: a broken skin or a runaway template sends the original (with X-Relay-Id), records why, and
counts it; only a DKIM signing failure defers, since sending unsigned would be worse than waiting.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import replace

from relay import metrics
from relay.config import Settings, read_dkim_keys
from relay.delivery.worker import Prepared
from relay.rules import MessageFacts, RuleBook, RuleDecision, RuleError, load_or_create_secret
from relay.rules.book import in_canary
from relay.store.ledger import LedgerWrites
from relay.store.queue import Claim
from relay.store.schema import SUPPRESSED
from relay.transform import (
    Decisions,
    DkimKey,
    DkimSigningError,
    SkinError,
    SkinLibrary,
    passthrough_reason,
    transform_fail_open,
    verify_dkim,
)
from relay.transform._raw import header_block

log = logging.getLogger(__name__)

RELOAD_EVERY = 2.0  # seconds between checks of the skins folder for edits
FACTS_CACHE = 64  # messages whose parsed facts are kept for their other recipients...
FACTS_CACHE_BYTES = 64 * 1024 * 1024  # ...up to this much raw message in all
KEEP_PARSE_BELOW = 4 * 1024 * 1024  # a bigger message's MIME tree is dropped after each recipient


def load_dkim_keys(settings: Settings) -> dict[str, DkimKey]:
    return {
        k.domain: DkimKey(domain=k.domain, selector=k.selector, private_key=pem)
        for k, pem in read_dkim_keys(settings)
    }


class Pipeline:
    """Callable the worker uses: (raw, claim) -> Prepared. Rules decide, the transform rewraps."""

    def __init__(self, settings: Settings, ledger=None, clock=time.monotonic, wallclock=time.time):
        self.settings = settings
        self.ledger = ledger
        self.clock = clock
        self.wallclock = wallclock
        self.dkim_keys = load_dkim_keys(settings)
        self.strict = frozenset(settings.rewrap.dmarc_strict_domains)
        self.skins: SkinLibrary | None = None
        self.skins_error: str | None = None
        self.book: RuleBook | None = None
        self.rules_error: str | None = None
        self._checked = 0.0
        self._verified: dict[str, str] = {}
        self._facts: OrderedDict[str, MessageFacts] = OrderedDict()
        self._facts_bytes = 0
        self._load_skins()
        self._load_rules()

    # -- the admin-edited files: loaded once, reloaded on edit, the last good version kept ---------------

    def _load_skins(self) -> None:
        try:
            self.skins = SkinLibrary.load(self.settings.paths.skins)
            self.skins_error = None
        except (SkinError, OSError) as e:
            error = f"skins not loaded: {e}"
            if error != self.skins_error:  # once per distinct problem, not at every reload check
                metrics.reload_failures.labels(kind="skins").inc()
                log.error("%s; messages are forwarded unwrapped until it is fixed", error)
            self.skins_error = error

    def _load_rules(self) -> None:
        rules = self.settings.paths.rules
        if not rules.is_dir():
            self.rules_error = None
            return
        try:
            self.book = RuleBook.load(
                rules,
                secret=load_or_create_secret(self.settings.paths.secret),
                public_url=self.settings.http.base_url,
                on_error=_count_rules_error,
            )
            self.rules_error = None
        except RuleError as e:
            self.rules_error = f"rules not loaded: {e}"
            metrics.reload_failures.labels(kind="rules").inc()
            log.error("%s; the default skin applies until it is fixed", self.rules_error)

    def refresh(self) -> None:
        """Picks up edits in skins/ and rules/ at most every RELOAD_EVERY seconds."""
        if self.clock() - self._checked < RELOAD_EVERY:
            return
        self._checked = self.clock()
        if self.skins is None:
            self._load_skins()
        else:
            before = set(self.skins.errors) if hasattr(self.skins, "errors") else set()
            try:
                if self.skins.reload_if_changed():
                    log.info("skins reloaded from %s", self.settings.paths.skins)
            except Exception as e:  # noqa: BLE001 - the last good skins keep serving
                log.error("skin reload refused: %s", e)
            if hasattr(self.skins, "errors") and set(self.skins.errors) - before:
                metrics.reload_failures.labels(kind="skins").inc()
        if self.book is None:
            self._load_rules()
        else:
            self.book.reload_if_changed()

    # -- per message -------------------------------------------------------------------------------------

    def dkim_result(self, raw: bytes, queue_id: str) -> str | None:
        """The original signature's verdict, once per message, before the rewrap breaks it."""
        if not self.settings.rewrap.verify_dkim or queue_id in self._verified:
            return None
        head = header_block(raw)
        result = "none" if b"dkim-signature:" not in head.lower() else verify_dkim(raw)
        self._verified[queue_id] = result
        if len(self._verified) > 1000:
            self._verified.pop(next(iter(self._verified)))
        return result

    def facts(self, raw: bytes, claim: Claim) -> MessageFacts:
        """Parsed once per message, shared by its recipients."""
        facts = self._facts.get(claim.queue_id)
        if facts is None:
            facts = MessageFacts.from_raw(
                raw, source=claim.source, mail_from=claim.mail_from, client_addr=claim.client_addr or None
            )
            self._facts[claim.queue_id] = facts
            self._facts_bytes += len(raw)
            while len(self._facts) > 1 and (
                len(self._facts) > FACTS_CACHE or self._facts_bytes > FACTS_CACHE_BYTES
            ):
                self._facts_bytes -= len(self._facts.popitem(last=False)[1].raw)
        return facts

    def decide(self, raw: bytes, claim: Claim) -> RuleDecision | None:
        if self.book is None:
            return None
        wrap = passthrough_reason(raw, claim.mail_from, self.dkim_keys, self.strict) is None
        facts, book, now = self.facts(raw, claim), self.book, self.wallclock()
        if self.ledger is None:
            return book.decide(facts, claim.address, None, now, wrap=wrap)
        out: list[RuleDecision] = []
        # the ledger reads of one decision (suppression, caps) share one connection and transaction
        self.ledger.batch(lambda: out.append(book.decide(facts, claim.address, self.ledger, now, wrap=wrap)))
        return out[0]

    def _transform(self, raw: bytes, claim: Claim, decisions: Decisions):
        facts = self.facts(raw, claim)
        return transform_fail_open(
            raw,
            time_limit=self.settings.delivery.transform_time_limit,
            recipient=claim.address,
            queue_id=claim.queue_id,
            decisions=decisions,
            skins=self.skins or _EMPTY,
            mail_from=claim.mail_from,
            dkim_keys=self.dkim_keys,
            dmarc_strict_domains=self.strict,
            html_budget=self.settings.rewrap.html_budget,
            parse=lambda: facts.message,  # one MIME parse for the rules and every rewrap of the message
            spliced=True,  # a big message is sent in pieces, not joined into a second copy
        )

    def __call__(self, raw: bytes, claim: Claim) -> Prepared:
        dkim = self.dkim_result(raw, claim.queue_id)
        self.refresh()
        errors = [e for e in (self.skins_error, self.rules_error) if e]
        try:
            rd = self.decide(raw, claim)
        except Exception as e:  # noqa: BLE001 - rules fail open too: the default skin, no blocks
            log.exception("rules failed for %s", claim.queue_id)
            metrics.transform_failures.labels(reason="rules").inc()
            errors.append(f"rules failed: {type(e).__name__}: {e}"[:500])
            rd = None
        if rd is not None and rd.suppressed:
            metrics.recipients_suppressed.inc()
            return Prepared(
                data=b"",
                status=SUPPRESSED,
                reply=rd.suppress_reason or "suppressed",
                report={"rules": _rules_log(rd)},
                dkim=dkim,
            )
        decisions = (
            rd.decisions if rd is not None else Decisions(skin=self.settings.rewrap.default_skin or None)
        )
        if self.skins is None:
            decisions = replace(decisions, skin=None)
        decisions, skin_shadow, rollout = self._rollout(decisions, claim.address)
        try:
            data, report = self._transform(raw, claim, decisions)
            shadow = self._transform(raw, claim, rd.shadow)[1] if rd is not None and rd.shadow else None
            skin_trial = self._transform(raw, claim, skin_shadow)[1] if skin_shadow is not None else None
        except DkimSigningError as e:
            metrics.transform_failures.labels(reason="dkim_signing").inc()
            self._forget_parse(raw, claim)
            return Prepared(
                data=raw, defer=f"4.7.0 DKIM signing failed, not sent unsigned: {e}"[:300], dkim=dkim
            )
        self._forget_parse(raw, claim)
        metrics.transform_actions.labels(action=report.action).inc()
        if report.action == "failed":
            reason = "time_limit" if "Timeout" in report.reason else "exception"
            metrics.transform_failures.labels(reason=reason).inc()
            errors.append(report.reason)
        if report.over_budget:
            metrics.transform_failures.labels(reason="over_budget").inc()
        if rd is not None and set(report.blocks) != {b.name for b in rd.decisions.blocks}:
            # only what the customer saw counts for the caps (a block dropped for size, or a pass-through)
            shown = tuple(b for b in rd.decisions.blocks if b.name in report.blocks)
            offered = tuple(dict.fromkeys(p for b in shown for p in b.products))
            rd = replace(rd, decisions=replace(rd.decisions, blocks=shown), products_offered=offered)
        log_entry = report.to_dict()
        if rollout:
            log_entry["rollout"] = rollout
        if skin_trial is not None:
            log_entry["skin_shadow"] = skin_trial.to_dict()
        if rd is not None:
            log_entry["rules"] = _rules_log(rd)
            if shadow is not None:
                log_entry["shadow"] = shadow.to_dict() | {"rules": list(rd.shadow_rules)}
        after_sent = None
        if rd is not None and self.ledger is not None:

            def after_sent(now: float, writes: LedgerWrites, rd=rd, claim=claim) -> None:
                rd.record(writes, claim.address, claim.queue_id, now)

        return Prepared(
            data=data,
            skin=report.skin if report.action == "rewrapped" else None,
            blocks=tuple(report.blocks),
            report=log_entry,
            error="; ".join(errors) or None,
            dkim=dkim,
            mail_from=rd.mail_from if rd is not None else None,
            after_sent=after_sent,
        )

    def _forget_parse(self, raw: bytes, claim: Claim) -> None:
        """A big message's facts are not kept between recipients: its MIME tree can be several times its
        size (a body that is not base64 is held as str, line by line, when parsed), and the facts hold
        the raw message itself, which stayed in the worker's RSS until other mail pushed it out."""
        if len(raw) >= KEEP_PARSE_BELOW:
            facts = self._facts.pop(claim.queue_id, None)
            if facts is not None:
                self._facts_bytes -= len(facts.raw)

    def _rollout(
        self, decisions: Decisions, recipient: str
    ) -> tuple[Decisions, Decisions | None, str | None]:
        """A skin in shadow mode is rendered for the log while the original goes out; a canary skin
        wraps only its share of recipients. Returns (decisions to send, decisions to render for the log,
        what happened)."""
        name = decisions.skin
        if not name or self.skins is None or name not in self.skins:
            return decisions, None, None
        skin = self.skins.get(name)
        if skin.mode == "shadow":
            return replace(decisions, skin=None), decisions, f"skin {name} in shadow mode: original sent"
        if skin.canary < 100 and not in_canary(f"skin:{name}", recipient, skin.canary):
            return replace(decisions, skin=None), None, f"skin {name} canary {skin.canary}%: original sent"
        return decisions, None, None

    def record_sent(self, callbacks: list, now: float) -> None:
        """The after-sent bookkeeping of a group of recipients: gathered first, then written in one short
        ledger transaction."""
        if not callbacks or self.ledger is None:
            return
        writes = LedgerWrites()
        for cb in callbacks:
            cb(now, writes)
        self.ledger.write(writes)


def _rules_log(rd: RuleDecision) -> dict:
    return {
        "matched": list(rd.matched),
        "category": rd.decisions.category,
        "kind": rd.decisions.kind,
        "versions": rd.versions,
        "notes": list(rd.notes),
        "canary": [list(c) for c in rd.canary],
        "original_headers": [list(h) for h in rd.original_headers],
        "products": list(rd.products_offered),
    }


def _count_rules_error(error) -> None:
    metrics.reload_failures.labels(kind="rules").inc()


class _EmptySkins:
    """Stands in when no skin could be loaded: every message passes through."""

    def __contains__(self, name: object) -> bool:
        return False


_EMPTY = _EmptySkins()
