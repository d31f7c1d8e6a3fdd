"""RuleBook: rule files in rules/ -> per-message, per-recipient decisions. See rules/README.md."""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import logging
import re
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup

from relay.transform.types import Block, Decisions

from . import tokens
from .catalog import Catalog, Product
from .crosssell import Finder, find_ordered, pick
from .errors import RuleError
from .facts import MessageFacts, Selector, compile_selector

log = logging.getLogger(__name__)

WEEK = 7 * 86400.0
DAY = 86400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")
_NO_SET = ("content-", "x-relay-", "mime-version", "dkim-signature", "received", "return-path")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def in_canary(name: str, recipient: str, percent: float) -> bool:
    """Whether ``recipient`` is in the ``percent`` canary of rule or skin ``name``: stable per address,
    independent between names."""
    h = int.from_bytes(hashlib.sha256(f"{name}\0{recipient.lower()}".encode()).digest()[:4], "big")
    return (h % 10000) < percent * 100


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FollowupRequest:
    """A follow-up the worker schedules in the ledger (``RuleDecision.record`` does it)."""

    name: str
    due_at: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class RuleDecision:
    decisions: Decisions
    suppressed: bool = False  # do not send to this recipient (status "suppressed")
    suppress_reason: str = ""
    products_offered: tuple[str, ...] = ()  # product ids in the blocks (record them once sent)
    followups: tuple[FollowupRequest, ...] = ()
    mail_from: str | None = None  # envelope sender to use for bounces; None: keep the original
    original_headers: tuple[tuple[str, str], ...] = ()  # values of headers the decision replaces
    matched: tuple[str, ...] = ()  # rules applied, in order
    shadow: Decisions | None = None  # what shadow rules would have decided (log it, do not send it)
    shadow_rules: tuple[str, ...] = ()
    canary: tuple[tuple[str, bool], ...] = ()  # (rule, recipient in the canary?) for canary rules
    versions: dict[str, str] = field(default_factory=dict)  # {"rules": hash, "catalog": hash}
    notes: tuple[str, ...] = ()  # why a block or header was left out, for the log

    def record(self, ledger: Any, recipient: str, queue_id: str, now: float) -> None:
        """After the recipient was handed to delivery: log the send (marketing caps), the offers (product
        caps) and schedule the follow-ups. Does nothing for a suppressed decision."""
        if self.suppressed:
            return
        d = self.decisions
        ledger.record_send(
            recipient, queue_id, d.category, now, kind=d.kind, rules_version=self.versions.get("rules")
        )
        for b in d.blocks:
            ledger.record_offers(recipient, queue_id, b.products, now, block=b.name)
        for f in self.followups:
            ledger.schedule_followup(recipient, f.name, queue_id, f.due_at, payload=f.payload, now=now)


# ----------------------------------------------------------------------------- compiled rule files


@dataclass
class BlockSpec:
    name: str
    template: jinja2.Template
    file: str
    priority: int = 0
    promotional: bool = True
    max_products: int = 3
    heading: str = ""
    finders: tuple[Finder, ...] = ()
    same_type: bool = True
    fallback: bool = True


@dataclass
class FollowupSpec:
    name: str
    delay: float
    template: jinja2.Template
    subject: jinja2.Template
    file: str
    category: str = "marketing"
    from_header: str | None = None
    products: str = "complements"  # complements | ordered | none
    max_products: int = 3
    block: str | None = None


@dataclass
class SenderSpec:
    from_name: str | None = None
    from_address: str | None = None
    reply_to: str | None = None
    organization: str | None = None
    return_path: str | None = None


Pred = Callable[[MessageFacts, str, dict], bool]


@dataclass
class Rule:
    name: str
    file: str
    line: int
    preds: tuple[Pred, ...]
    needs_html: bool
    sets: dict[str, Any]
    mode: str = "live"
    canary: float | None = None
    stop: bool = False

    def matches(self, facts: MessageFacts, recipient: str, state: dict) -> bool:
        return all(p(facts, recipient, state) for p in self.preds)

    def in_canary(self, recipient: str) -> bool:
        return self.canary is None or in_canary(self.name, recipient, self.canary)


@dataclass
class _State:
    rules: list[Rule]
    blocks: dict[str, BlockSpec]
    followups: dict[str, FollowupSpec]
    senders: dict[str, SenderSpec]
    catalog: Catalog | None
    catalog_path: Path | None
    settings: dict[str, Any]
    caps: dict[str, Any]
    unsubscribe: dict[str, Any]
    version: str
    signature: tuple


FIELDS = ("category", "kind", "skin", "allow_promotions", "sender", "blocks", "followups")


class RuleBook:
    """The compiled rules of one directory. ``decide`` is thread-safe; ``reload_if_changed`` swaps in a new
    version atomically and keeps the last good one when an edit is broken."""

    def __init__(
        self,
        root: Path,
        state: _State,
        *,
        secret: bytes | None,
        public_url: str | None,
        on_error: Callable[[RuleError], None] | None,
        catalog_override: Path | None,
    ) -> None:
        self.root = root
        self._state = state
        self.secret = secret
        self.public_url = public_url
        self.on_error = on_error
        self.catalog_override = catalog_override
        self.errors: list[RuleError] = []
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        secret: bytes | None = None,
        public_url: str | None = None,
        catalog: Path | str | None = None,
        on_error: Callable[[RuleError], None] | None = None,
    ) -> RuleBook:
        """Compile every ``*.toml`` in ``path`` (name order), the block and follow-up templates, the catalog.

        ``secret``: HMAC key of the unsubscribe tokens; ``public_url``: the http listener as seen from outside
        (e.g. "https://relay.example.com"); both needed for List-Unsubscribe. ``catalog`` overrides
        ``[catalog] file``. ``on_error(RuleError)`` is called when a hot reload is refused (metrics hook).
        Raises RuleError(file, line, message).
        """
        root = Path(path)
        cat = Path(catalog) if catalog else None
        return cls(
            root,
            _compile(root, cat),
            secret=secret,
            public_url=public_url,
            on_error=on_error,
            catalog_override=cat,
        )

    @property
    def version(self) -> str:
        return self._state.version

    @property
    def catalog(self) -> Catalog | None:
        return self._state.catalog

    @property
    def caps(self) -> dict[str, Any]:
        return dict(self._state.caps)

    def rule_names(self) -> list[str]:
        return [r.name for r in self._state.rules]

    # -- hot reload ----------------------------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Reload when a file changed (mtime/size). True: a new version serves. False: nothing changed, or
        the edit is broken (logged with file:line, passed to ``on_error``, kept in ``errors``; the last good
        version keeps serving; a broken edit is reported once)."""
        with self._lock:
            sig = _signature(self.root, self.catalog_override or self._state.catalog_path)
            if sig == self._state.signature or (self.errors and getattr(self, "_bad_sig", None) == sig):
                return False
            try:
                state = _compile(self.root, self.catalog_override)
            except RuleError as e:
                self._bad_sig = sig
                self.errors = [e]
                log.error("rules reload refused, keeping version %s: %s", self._state.version, e)
                if self.on_error:
                    try:
                        self.on_error(e)
                    except Exception:  # noqa: BLE001 - a metrics hook must not break reloads
                        log.exception("rules on_error hook failed")
                return False
            old = self._state.version
            self._state = state
            self.errors = []
            log.info("rules reloaded: %s -> %s", old, state.version)
            return True

    # -- decide --------------------------------------------------------------------------------------

    def decide(
        self,
        facts: MessageFacts,
        recipient: str,
        ledger: Any | None = None,
        now: float = 0.0,
        *,
        wrap: bool = True,
    ) -> RuleDecision:
        """The decisions for one message and one recipient. Pure but for ledger reads (suppression, caps).
        ``wrap=False``: the message will be forwarded untouched (signed, a report...), so no block is
        rendered; classification, suppression, sending parameters and follow-ups still apply."""
        st = self._state
        ev = _evaluate(st, facts, recipient, include_shadow=False)
        res = self._finish(st, ev, facts, recipient, ledger, now, wrap)
        if ev["shadow_matched"]:
            sev = _evaluate(st, facts, recipient, include_shadow=True)
            shadow = self._finish(st, sev, facts, recipient, ledger, now, wrap)
            return _replace(res, shadow=shadow.decisions, shadow_rules=tuple(ev["shadow_matched"]))
        return res

    def _finish(
        self,
        st: _State,
        ev: dict,
        facts: MessageFacts,
        recipient: str,
        ledger: Any,
        now: float,
        wrap: bool = True,
    ) -> RuleDecision:
        s = st.settings
        category = ev.get("category") or s["default_category"]
        kind = ev.get("kind")
        skin = ev["skin"] if "skin" in ev else s["default_skin"]
        marketing = category == "marketing"
        notes: list[str] = []
        versions = {"rules": st.version}
        if st.catalog is not None:
            versions["catalog"] = st.catalog.version

        suppressed, reason = False, ""
        if marketing and ledger is not None:
            if ledger.is_suppressed(recipient):
                suppressed, reason = True, "unsubscribed"
            else:
                m = st.caps.get("marketing_per_week")
                if m is not None and ledger.marketing_count(recipient, now - WEEK) >= m:
                    suppressed, reason = True, f"marketing cap ({m} per 7 days)"

        headers: dict[str, str] = {}
        originals: list[tuple[str, str]] = []
        mail_from = None
        sender = st.senders.get(ev.get("sender") or s.get("default_sender") or "")
        if sender is not None:
            mail_from = sender.return_path
            from_value = facts.header("from") or ""
            pairs = getaddresses([from_value]) if from_value else []
            name, addr = pairs[0] if pairs else ("", "")
            new_name = sender.from_name or name
            new_addr = sender.from_address or addr
            if new_addr and (new_name, new_addr) != (name, addr):
                headers["From"] = formataddr((new_name, new_addr), charset="utf-8")
            if sender.reply_to:
                headers["Reply-To"] = ", ".join(
                    formataddr(pair, charset="utf-8") for pair in getaddresses([sender.reply_to])
                )
            if sender.organization:
                headers["Organization"] = sender.organization
        for k, v in ev["headers"].items():
            headers[k] = v
        if marketing:
            secret, url = self.secret, self.public_url or st.unsubscribe.get("public_url")
            if secret and url:
                for k, v in tokens.list_unsubscribe_headers(
                    secret,
                    url,
                    recipient,
                    now,
                    mailto=st.unsubscribe.get("mailto"),
                    lifetime=st.unsubscribe.get("lifetime", tokens.DEFAULT_LIFETIME),
                ):
                    headers[k] = v
            else:
                notes.append("no List-Unsubscribe: unsubscribe secret or public URL not configured")
        for k in headers:
            for v in facts.header_values(k):
                originals.append((k, v))
        if mail_from:
            originals.append(("envelope-from", facts.mail_from))

        blocks: list[Block] = []
        offered: list[str] = []
        ordered_all: list[Product] = []
        if not suppressed:
            allow = marketing or bool(ev.get("allow_promotions"))
            names = ev.get("blocks") or ()
            if names and not wrap:
                notes.append(f"blocks {', '.join(names)} left out: the message is forwarded untouched")
                names = ()
            counts = None
            for bname in names:
                spec = st.blocks[bname]
                if spec.promotional and not allow:
                    notes.append(
                        f"block {bname} left out: promotional block in a {category} message "
                        "(the rule does not set allow_promotions)"
                    )
                    continue
                if st.catalog is None:
                    notes.append(f"block {bname} left out: no catalog")
                    continue
                if counts is None:
                    counts = self._offer_counts(st, ledger, recipient, now)
                block, ordered = _render_block(st, spec, facts, recipient, counts, notes)
                ordered_all.extend(p for p in ordered if p not in ordered_all)
                if block is not None:
                    blocks.append(block)
                    offered.extend(p for p in block.products if p not in offered)

        followups = []
        for fname in ev.get("followups") or ():
            spec = st.followups[fname]
            if spec.category == "marketing" and ledger is not None and ledger.is_suppressed(recipient):
                notes.append(f"follow-up {fname} not scheduled: recipient unsubscribed")
                continue
            finds = bool(spec.block and spec.block in st.blocks and st.catalog is not None)
            # A message forwarded untouched had no block, so nothing parsed its body yet: leave that to
            # the follow-up's own time (prepare_followup reads the stored original then), off the hot path.
            pending = finds and not ordered_all and not wrap
            if finds and not ordered_all and wrap:
                ordered_all = find_ordered(facts, st.blocks[spec.block].finders, st.catalog)
            followups.append(
                FollowupRequest(
                    fname,
                    now + spec.delay,
                    {
                        "ordered": [p.id for p in ordered_all],
                        "ordered_pending": pending,
                        "offered": offered,
                        "kind": kind,
                        "subject": facts.subject,
                        "mail_from": mail_from or facts.mail_from,
                        "from": facts.header("from") or "",
                        "rule_version": st.version,
                        "sender": ev.get("sender") or s.get("default_sender") or "",
                    },
                )
            )

        decisions = Decisions(
            skin=skin or None,
            category=category,
            kind=kind,
            blocks=tuple(blocks),
            set_headers=tuple(headers.items()),
        )
        return RuleDecision(
            decisions=decisions,
            suppressed=suppressed,
            suppress_reason=reason,
            products_offered=tuple(offered),
            followups=tuple(followups),
            mail_from=mail_from,
            original_headers=tuple(originals),
            matched=tuple(ev["matched"]),
            canary=tuple(ev["canary"]),
            versions=versions,
            notes=tuple(notes),
        )

    @staticmethod
    def _offer_counts(st: _State, ledger: Any, recipient: str, now: float) -> dict[str, int] | None:
        n = st.caps.get("product_offers")
        if ledger is None or n is None:
            return None
        return ledger.offer_counts(recipient, now - st.caps.get("product_days", 30) * DAY)

    # -- follow-ups ------------------------------------------------------------------------------------

    def prepare_followup(
        self,
        followup: Any,
        ledger: Any | None,
        now: float,
        original: Callable[[str], bytes | None] | None = None,
    ) -> tuple[bytes | None, str]:
        """Render a due ``Followup`` (ledger row) into raw bytes, or (None, reason) when it must be cancelled
        (unknown now, recipient unsubscribed, marketing cap reached). The message carries X-Relay-Category and
        X-Relay-Kind so the normal pipeline applies skin, unsubscribe headers and suppression again."""
        st = self._state
        spec = st.followups.get(followup.name)
        if spec is None:
            return None, f"follow-up {followup.name!r} no longer defined"
        if spec.category == "marketing" and ledger is not None:
            if ledger.is_suppressed(followup.address):
                return None, "recipient unsubscribed"
            m = st.caps.get("marketing_per_week")
            if m is not None and ledger.marketing_count(followup.address, now - WEEK) >= m:
                return None, f"marketing cap ({m} per 7 days)"
        payload = followup.payload or {}
        if payload.get("ordered_pending") and original is not None and st.catalog is not None:
            raw = original(followup.queue_id)  # ``original(queue_id)``: the triggering message, if kept
            if raw is not None and spec.block in st.blocks:
                facts = MessageFacts.from_raw(raw, source="", mail_from="")
                found = find_ordered(facts, st.blocks[spec.block].finders, st.catalog)
                payload = {**payload, "ordered": [p.id for p in found], "ordered_pending": False}
        products: list[Product] = []
        if st.catalog is not None and spec.products != "none":
            ordered = [p for i in payload.get("ordered", []) if (p := st.catalog.get(i))]
            if spec.products == "ordered":
                products = ordered[: spec.max_products]
            else:
                counts = self._offer_counts(st, ledger, followup.address, now)
                cap = st.caps.get("product_offers")
                products = pick(
                    st.catalog,
                    ordered,
                    limit=spec.max_products,
                    allowed=None if counts is None else (lambda p: counts.get(p.id, 0) < cap),
                )
        sender = st.senders.get(payload.get("sender") or "")
        from_header = spec.from_header
        if not from_header and sender and sender.from_address:
            from_header = formataddr((sender.from_name or "", sender.from_address), charset="utf-8")
        from_header = from_header or payload.get("from") or ""
        ctx = {
            "recipient": followup.address,
            "products": products,
            "payload": payload,
            "ordered": [p for i in payload.get("ordered", []) if st.catalog and (p := st.catalog.get(i))],
        }
        raw = render_followup(
            spec.template,
            spec.subject,
            from_header=from_header,
            recipient=followup.address,
            context=ctx,
            now=now,
            category=spec.category,
            kind=spec.name,
            message_id=f"followup-{followup.id}-{followup.queue_id}",
        )
        return raw, "rendered"


def _replace(res: RuleDecision, **kw: Any) -> RuleDecision:
    import dataclasses

    return dataclasses.replace(res, **kw)


# ----------------------------------------------------------------------------- evaluation


def _evaluate(st: _State, facts: MessageFacts, recipient: str, *, include_shadow: bool) -> dict:
    ev: dict[str, Any] = {"headers": {}, "matched": [], "shadow_matched": [], "canary": []}
    if st.settings["request_headers"]:
        req = facts.request
        if req.get("category"):
            ev["category"] = req["category"].lower()
        if req.get("kind"):
            ev["kind"] = req["kind"].lower()
        if req.get("use-skin"):
            ev["skin"] = req["use-skin"]
    for rule in st.rules:
        if rule.canary is not None:
            inside = rule.in_canary(recipient)
            ev["canary"].append((rule.name, inside))
            if not inside:
                continue
        if rule.mode == "shadow" and not include_shadow:
            if rule.matches(facts, recipient, ev):
                ev["shadow_matched"].append(rule.name)
            continue
        if not rule.matches(facts, recipient, ev):
            continue
        ev["matched"].append(rule.name)
        for k, v in rule.sets.items():
            if k == "headers":
                for hk, hv in v.items():
                    ev["headers"].setdefault(hk, hv)
            elif k not in ev:
                ev[k] = v
        if rule.stop:
            break
    return ev


def _render_block(
    st: _State,
    spec: BlockSpec,
    facts: MessageFacts,
    recipient: str,
    counts: dict[str, int] | None,
    notes: list[str],
) -> tuple[Block | None, list[Product]]:
    cat = st.catalog
    assert cat is not None
    ordered = find_ordered(facts, spec.finders, cat) if spec.finders else []
    cap = st.caps.get("product_offers")
    allowed = None if counts is None or cap is None else (lambda p: counts.get(p.id, 0) < cap)
    products = pick(
        cat,
        ordered,
        limit=spec.max_products,
        same_type=spec.same_type,
        fallback_featured=spec.fallback,
        allowed=allowed,
    )
    if not products:
        notes.append(f"block {spec.name} left out: no product to offer (stock, caps)")
        return None, ordered
    try:
        html = spec.template.render(
            products=products, ordered=ordered, heading=spec.heading, block=spec.name, recipient=recipient
        )
    except Exception as e:  # noqa: BLE001 - a broken block template drops the block, never the message
        log.exception("block %s: template failed", spec.name)
        notes.append(f"block {spec.name} left out: template error {type(e).__name__}: {e}")
        return None, ordered
    return Block(
        name=spec.name, html=str(Markup(html)), priority=spec.priority, products=tuple(p.id for p in products)
    ), ordered


# ----------------------------------------------------------------------------- follow-up rendering


def render_followup(
    template: jinja2.Template,
    subject: jinja2.Template | str,
    *,
    from_header: str,
    recipient: str,
    context: dict[str, Any],
    now: float,
    category: str = "marketing",
    kind: str | None = None,
    message_id: str | None = None,
    domain: str | None = None,
) -> bytes:
    """A complete message (HTML + text alternative) from a follow-up template.

    Pure: same inputs, same bytes."""
    from email.message import EmailMessage
    from email.policy import SMTP
    from email.utils import formatdate

    import lxml.html

    html = template.render(**context)
    subj = subject.render(**context) if isinstance(subject, jinja2.Template) else subject
    subj = " ".join(str(subj).split())
    try:
        text = lxml.html.fromstring(html).text_content() if html.strip() else ""
    except Exception:  # noqa: BLE001
        text = ""
    text = "\n".join(line.strip() for line in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    if domain is None:
        addrs = getaddresses([from_header])
        domain = addrs[0][1].rsplit("@", 1)[-1] if addrs and "@" in addrs[0][1] else "relay.invalid"
    digest = hashlib.sha256(f"{message_id}\0{recipient}\0{now}".encode()).hexdigest()[:24]
    msg = EmailMessage(policy=SMTP)
    msg["From"] = from_header
    msg["To"] = recipient
    msg["Subject"] = subj
    msg["Date"] = formatdate(now, localtime=False)
    msg["Message-ID"] = f"<{digest}@{domain}>"
    msg["X-Relay-Category"] = category
    if kind:
        msg["X-Relay-Kind"] = kind
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    msg.set_boundary(f"=_relay_{digest}")  # deterministic output
    return msg.as_bytes(policy=SMTP)


# ----------------------------------------------------------------------------- loading


def _signature(root: Path, catalog: Path | None) -> tuple:
    items = []
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file() and not p.name.startswith((".", "README")):
            try:
                stt = p.stat()
            except OSError:
                continue
            items.append((str(p.relative_to(root)), stt.st_mtime_ns, stt.st_size))
    if catalog is not None and not catalog.is_relative_to(root):
        try:
            stt = catalog.stat()
            items.append((str(catalog), stt.st_mtime_ns, stt.st_size))
        except OSError:
            items.append((str(catalog), 0, -1))
    return tuple(items)


def _version(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files, key=lambda x: str(x.relative_to(root))):
        data = p.read_bytes()
        rel = str(p.relative_to(root)).encode()
        h.update(rel + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:12]


class _Locator:
    """Finds the line of a table or key in a TOML file, for semantic errors."""

    _HDR = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, file: Path, text: str) -> None:
        self.file = str(file)
        self.lines = text.splitlines()
        self.headers = [
            (i + 1, m.group(1), m.group(2).replace(" ", "").replace('"', ""))
            for i, line in enumerate(self.lines)
            if (m := self._HDR.match(line))
        ]

    def rule_line(self, index: int) -> int:
        rules = [ln for ln, br, name in self.headers if br == "[[" and name == "rule"]
        return rules[index] if index < len(rules) else 0

    def table_line(self, name: str) -> int:
        for ln, _br, n in self.headers:
            if n == name:
                return ln
        for i, line in enumerate(self.lines):  # dotted keys or inline tables
            if re.match(rf"^\s*{re.escape(name.split('.')[0])}\b", line):
                return i + 1
        return 0

    def key_line(self, start: int, key: str) -> int:
        if start <= 0:
            return 0
        for i in range(start, len(self.lines)):
            line = self.lines[i]
            if i >= start and re.match(r"^\s*\[\[\s*rule\s*\]\]", line):
                break
            if re.match(rf"^\s*{re.escape(key)}\s*=", line) or re.search(
                rf"[{{,]\s*{re.escape(key)}\s*=", line
            ):
                return i + 1
        return start

    def error(self, line: int, message: str) -> RuleError:
        return RuleError(self.file, line, message)


def _toml_error(file: Path, e: tomllib.TOMLDecodeError) -> RuleError:
    line = getattr(e, "lineno", None)
    if line is None:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else 0
    msg = getattr(e, "msg", None) or re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
    return RuleError(str(file), line, f"TOML: {msg}")


def _duration(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
        return float(v)
    if isinstance(v, str) and (m := _DURATION.match(v)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"not a duration: {v!r} (e.g. 3d, 12h, 30m, or seconds)")


def _env(root: Path) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        autoescape=True,
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def safe_url(u: Any) -> str:
        u = str(u or "").strip()
        return u if re.match(r"^https?://", u, re.I) else ""

    env.filters["url"] = safe_url
    return env


def _compile(root: Path, catalog_override: Path | None) -> _State:
    if not root.is_dir():
        raise RuleError(str(root), 0, "rules directory not found")
    files = sorted(p for p in root.glob("*.toml") if p.is_file() and not p.name.startswith("."))
    settings: dict[str, Any] = {
        "default_skin": "default",
        "default_category": "transactional",
        "request_headers": True,
        "default_sender": None,
    }
    caps: dict[str, Any] = {}
    unsub: dict[str, Any] = {}
    sources: dict[str, list[str]] = {}
    raw_blocks: dict[str, tuple[dict, _Locator]] = {}
    raw_followups: dict[str, tuple[dict, _Locator]] = {}
    senders: dict[str, SenderSpec] = {}
    catalog_cfg: dict[str, Any] = {}
    raw_rules: list[tuple[dict, _Locator, int]] = []
    seen_single: dict[str, str] = {}

    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RuleError(str(f), 0, f"cannot read: {e}") from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise _toml_error(f, e) from None
        loc = _Locator(f, text)
        for top, value in doc.items():
            if top == "rule":
                if not isinstance(value, list):
                    raise loc.error(loc.table_line("rule"), "use [[rule]] (an array of tables)")
                for i, r in enumerate(value):
                    raw_rules.append((r, loc, i))
            elif top in ("settings", "caps", "unsubscribe", "catalog"):
                if top in seen_single:
                    raise loc.error(loc.table_line(top), f"[{top}] already defined in {seen_single[top]}")
                seen_single[top] = f.name
                if not isinstance(value, dict):
                    raise loc.error(loc.table_line(top), f"[{top}] must be a table")
                _read_single(top, value, loc, settings, caps, unsub, catalog_cfg)
            elif top in ("sources", "block", "followup", "sender"):
                if not isinstance(value, dict):
                    raise loc.error(loc.table_line(top), f"[{top}] must be a table")
                for name, item in value.items():
                    where = loc.table_line(f"{top}.{name}") or loc.table_line(top)
                    if not _NAME.match(name):
                        raise loc.error(where, f"bad {top} name {name!r}")
                    bucket = {
                        "sources": sources,
                        "block": raw_blocks,
                        "followup": raw_followups,
                        "sender": senders,
                    }[top]
                    if name in bucket:
                        raise loc.error(where, f"{top} {name!r} defined twice")
                    if top == "sources":
                        if isinstance(item, str):
                            item = [item]
                        if not isinstance(item, list) or not all(isinstance(x, str) for x in item):
                            raise loc.error(where, f"sources.{name}: expected a list of networks or users")
                        sources[name] = item
                    elif top == "sender":
                        senders[name] = _sender(item, loc, where, name)
                    else:
                        if not isinstance(item, dict):
                            raise loc.error(where, f"[{top}.{name}] must be a table")
                        bucket[name] = (item, loc)  # type: ignore[assignment]
            else:
                raise loc.error(loc.table_line(top), f"unknown table or key {top!r}")

    # catalog
    cat_path: Path | None = catalog_override
    if cat_path is None and catalog_cfg.get("file"):
        cat_path = (root / catalog_cfg["file"]).resolve()
    catalog = Catalog.load(cat_path, catalog_cfg.get("relations")) if cat_path else None

    env = _env(root)
    blocks = {n: _block(n, item, loc, env, root, catalog) for n, (item, loc) in raw_blocks.items()}
    followups = {
        n: _followup(n, item, loc, env, root, blocks, catalog) for n, (item, loc) in raw_followups.items()
    }
    if settings["default_sender"] and settings["default_sender"] not in senders:
        raise RuleError(
            str(files[0]) if files else str(root),
            0,
            f"settings.default_sender: no [sender.{settings['default_sender']}]",
        )

    rules: list[Rule] = []
    names: set[str] = set()
    for item, loc, i in raw_rules:
        rule = _rule(item, loc, i, sources, blocks, followups, senders)
        if rule.name in names:
            raise loc.error(rule.line, f"rule name {rule.name!r} used twice")
        names.add(rule.name)
        rules.append(rule)

    hashed = [
        *files,
        *(p for p in (root / "blocks").rglob("*") if p.is_file()),
        *(p for p in (root / "followups").rglob("*") if p.is_file()),
    ]
    return _State(
        rules=rules,
        blocks=blocks,
        followups=followups,
        senders=senders,
        catalog=catalog,
        catalog_path=cat_path,
        settings=settings,
        caps=caps,
        unsubscribe=unsub,
        version=_version(root, hashed),
        signature=_signature(root, cat_path),
    )


def _read_single(
    top: str, value: dict, loc: _Locator, settings: dict, caps: dict, unsub: dict, catalog_cfg: dict
) -> None:
    line = loc.table_line(top)

    def want(k: str, v: Any, kind: type | tuple, what: str) -> Any:
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            raise loc.error(loc.key_line(line, k) if line else 0, f"{top}.{k}: expected {what}, got {v!r}")
        return v

    for k, v in value.items():
        if top == "settings":
            if k in ("default_skin", "default_category", "default_sender"):
                settings[k] = want(k, v, str, "a string")
            elif k == "request_headers":
                settings[k] = want(k, v, bool, "true or false")
            else:
                raise loc.error(loc.key_line(line, k), f"settings.{k}: unknown key")
        elif top == "caps":
            if k in ("product_offers", "marketing_per_week"):
                caps[k] = want(k, v, int, "an integer")
            elif k == "product_days":
                caps[k] = float(want(k, v, (int, float), "a number of days"))
            else:
                raise loc.error(loc.key_line(line, k), f"caps.{k}: unknown key")
        elif top == "unsubscribe":
            if k in ("mailto", "public_url"):
                unsub[k] = want(k, v, str, "a string")
            elif k == "lifetime_days":
                unsub["lifetime"] = float(want(k, v, (int, float), "a number of days")) * DAY
            else:
                raise loc.error(loc.key_line(line, k), f"unsubscribe.{k}: unknown key")
        elif top == "catalog":
            if k == "file":
                catalog_cfg[k] = want(k, v, str, "a path")
            elif k == "relations":
                if not isinstance(v, dict) or not all(isinstance(x, list) for x in v.values()):
                    raise loc.error(loc.table_line("catalog.relations"), "catalog.relations: id = [ids...]")
                catalog_cfg[k] = v
            else:
                raise loc.error(loc.key_line(line, k), f"catalog.{k}: unknown key")


def _sender(item: Any, loc: _Locator, line: int, name: str) -> SenderSpec:
    if not isinstance(item, dict):
        raise loc.error(line, f"[sender.{name}] must be a table")
    spec = SenderSpec()
    for k, v in item.items():
        if k not in SenderSpec.__dataclass_fields__:
            raise loc.error(loc.key_line(line, k), f"sender.{name}.{k}: unknown key")
        if not isinstance(v, str) or "\r" in v or "\n" in v:
            raise loc.error(loc.key_line(line, k), f"sender.{name}.{k}: expected a one-line string")
        setattr(spec, k, v)
    return spec


def _template(
    env: SandboxedEnvironment, root: Path, rel: str, loc: _Locator, line: int
) -> tuple[jinja2.Template, str]:
    path = root / rel
    if not path.is_file():
        raise loc.error(line, f"template not found: {path}")
    try:
        return env.get_template(rel), str(path)
    except jinja2.TemplateSyntaxError as e:
        raise RuleError(str(path), e.lineno or 0, f"template: {e.message}") from None


def _block(
    name: str, item: dict, loc: _Locator, env: SandboxedEnvironment, root: Path, catalog: Catalog | None
) -> BlockSpec:
    line = loc.table_line(f"block.{name}")
    known = {
        "template",
        "priority",
        "promotional",
        "max_products",
        "heading",
        "find",
        "same_type",
        "fallback",
    }
    for k in item:
        if k not in known:
            raise loc.error(loc.key_line(line, k), f"block.{name}.{k}: unknown key")
    tpl, file = _template(env, root, f"blocks/{item.get('template', name + '.html')}", loc, line)
    finders = []
    for j, fd in enumerate(item.get("find", [])):
        if not isinstance(fd, dict) or not (set(fd) <= {"selector", "attribute", "pattern"}) or not fd:
            raise loc.error(
                loc.key_line(line, "find"), f"block.{name}.find[{j}]: a table of selector, attribute, pattern"
            )
        try:
            pat = re.compile(fd["pattern"], re.I) if fd.get("pattern") else None
        except re.error as e:
            raise loc.error(loc.key_line(line, "find"), f"block.{name}.find[{j}].pattern: {e}") from None
        sel = _check_selector(fd["selector"], loc, loc.key_line(line, "find")) if fd.get("selector") else None
        finders.append(
            Finder(selector=fd.get("selector"), attribute=fd.get("attribute"), pattern=pat, compiled=sel)
        )
    fallback = item.get("fallback", "featured")
    if fallback not in ("featured", "none"):
        raise loc.error(loc.key_line(line, "fallback"), f"block.{name}.fallback: featured or none")
    spec = BlockSpec(
        name=name,
        template=tpl,
        file=file,
        priority=int(item.get("priority", 0)),
        promotional=bool(item.get("promotional", True)),
        max_products=int(item.get("max_products", 3)),
        heading=str(item.get("heading", "")),
        finders=tuple(finders),
        same_type=bool(item.get("same_type", True)),
        fallback=fallback == "featured",
    )
    if catalog is not None:  # render once with sample products: a template error shows now, not per message
        try:
            tpl.render(
                products=catalog.featured()[: spec.max_products],
                ordered=[],
                heading=spec.heading,
                block=name,
                recipient="client@example.org",
            )
        except Exception as e:  # noqa: BLE001
            raise RuleError(file, _tb_line(e, file), f"template: {type(e).__name__}: {e}") from None
    return spec


def _followup(
    name: str,
    item: dict,
    loc: _Locator,
    env: SandboxedEnvironment,
    root: Path,
    blocks: dict[str, BlockSpec],
    catalog: Catalog | None,
) -> FollowupSpec:
    line = loc.table_line(f"followup.{name}")
    known = {"delay", "template", "subject", "from", "category", "products", "max_products", "block"}
    for k in item:
        if k not in known:
            raise loc.error(loc.key_line(line, k), f"followup.{name}.{k}: unknown key")
    try:
        delay = _duration(item.get("delay"))
    except ValueError as e:
        raise loc.error(loc.key_line(line, "delay"), f"followup.{name}.delay: {e}") from None
    tpl, file = _template(env, root, f"followups/{item.get('template', name + '.html')}", loc, line)
    if "subject" not in item or not isinstance(item["subject"], str):
        raise loc.error(line, f"followup.{name}: subject (a string, may use {{{{ }}}}) is required")
    try:
        subj = SandboxedEnvironment(autoescape=False, undefined=jinja2.ChainableUndefined).from_string(
            item["subject"]
        )
    except jinja2.TemplateSyntaxError as e:
        raise loc.error(loc.key_line(line, "subject"), f"followup.{name}.subject: {e.message}") from None
    products = item.get("products", "complements")
    if products not in ("complements", "ordered", "none"):
        raise loc.error(
            loc.key_line(line, "products"), f"followup.{name}.products: complements, ordered or none"
        )
    if item.get("block") and item["block"] not in blocks:
        raise loc.error(loc.key_line(line, "block"), f"followup.{name}.block: no [block.{item['block']}]")
    spec = FollowupSpec(
        name=name,
        delay=delay,
        template=tpl,
        subject=subj,
        file=file,
        category=str(item.get("category", "marketing")),
        from_header=item.get("from"),
        products=products,
        max_products=int(item.get("max_products", 3)),
        block=item.get("block"),
    )
    try:
        sample = catalog.featured()[:2] if catalog else []
        tpl.render(recipient="client@example.org", products=sample, ordered=sample, payload={})
    except Exception as e:  # noqa: BLE001
        raise RuleError(file, _tb_line(e, file), f"template: {type(e).__name__}: {e}") from None
    return spec


def _tb_line(e: BaseException, file: str) -> int:
    tb = e.__traceback__
    line = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == file:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _check_selector(selector: str, loc: _Locator, line: int) -> Selector:
    """Validated (soupsieve's syntax, as always) and compiled once: lxml XPath or soupsieve fallback."""
    try:
        return compile_selector(selector)
    except Exception as e:  # noqa: BLE001 - soupsieve's SelectorSyntaxError and ValueError
        raise loc.error(line, f"bad CSS selector {selector!r}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- rules and matching

_MATCH_KEYS = {
    "source",
    "mail_from",
    "recipient",
    "header",
    "subject",
    "body",
    "html",
    "category",
    "kind",
    "any",
    "not",
}
_RULE_KEYS = {
    "name",
    "match",
    "category",
    "kind",
    "skin",
    "blocks",
    "allow_promotions",
    "sender",
    "headers",
    "followups",
    "mode",
    "canary",
    "stop",
    "description",
}


def _strs(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise ValueError(f"expected a string or a list of strings, got {v!r}")


def _regexes(v: Any) -> list[re.Pattern[str]]:
    out = []
    for s in _strs(v):
        try:
            out.append(re.compile(s, re.I))
        except re.error as e:
            raise ValueError(f"bad regular expression {s!r}: {e}") from None
    return out


def _source_pred(values: list[str], sources: dict[str, list[str]]) -> Pred:
    names: set[str] = set()
    nets: list[Any] = []

    def add(v: str, depth: int = 0) -> None:
        if v in sources and depth == 0:
            for x in sources[v]:
                add(x, 1)
            return
        try:
            nets.append(ipaddress.ip_network(v.strip("[]"), strict=False))
        except ValueError:
            names.add(v.lower())

    for v in values:
        add(v)

    def pred(f: MessageFacts, r: str, st: dict) -> bool:
        if f.source.lower() in names:
            return True
        return any(ip in n for ip in f.source_ips for n in nets if ip.version == n.version)

    return pred


def _addr_pred(values: list[str], get: Callable[[MessageFacts, str], str]) -> Pred:
    globs, domains = [], []
    for v in values:
        v = v.lower().strip()
        if "@" in v or any(c in v for c in "*?["):
            globs.append(v)
        else:
            domains.append(v.lstrip("."))

    def pred(f: MessageFacts, r: str, st: dict) -> bool:
        a = get(f, r).strip().strip("<>").lower()
        dom = a.rsplit("@", 1)[-1] if "@" in a else ""
        if any(dom == d or dom.endswith("." + d) for d in domains):
            return True
        return any(fnmatch.fnmatchcase(a, g) for g in globs)

    return pred


def _match(m: Any, sources: dict[str, list[str]], path: str) -> tuple[list[Pred], bool]:
    """Predicates for a match table; the bool: some predicate needs the HTML body parsed."""
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a table")
    preds: list[Pred] = []
    needs_html = False
    for k, v in m.items():
        if k not in _MATCH_KEYS:
            raise KeyError(f"{path}.{k}: unknown match key (have: {', '.join(sorted(_MATCH_KEYS))})")
        try:
            if k == "source":
                preds.append(_source_pred(_strs(v), sources))
            elif k == "mail_from":
                preds.append(_addr_pred(_strs(v), lambda f, r: f.mail_from))
            elif k == "recipient":
                preds.append(_addr_pred(_strs(v), lambda f, r: r))
            elif k == "header":
                if not isinstance(v, dict):
                    raise ValueError("expected a table: header-name = regex")
                for hname, pat in v.items():
                    rx = _regexes(pat)
                    preds.append(
                        lambda f, r, st, h=hname.lower(), rx=rx: any(
                            x.search(val) for val in f.header_values(h) for x in rx
                        )
                    )
            elif k == "subject":
                rx = _regexes(v)
                preds.append(lambda f, r, st, rx=rx: any(x.search(f.subject) for x in rx))
            elif k == "body":
                rx = _regexes(v)
                preds.append(lambda f, r, st, rx=rx: any(x.search(f.text) for x in rx))
            elif k == "html":
                sels = [_check_selector(s, _Locator(Path(""), ""), 0) for s in _strs(v)]
                preds.append(lambda f, r, st, sels=sels: any(f.matches(s) for s in sels))
                needs_html = True
            elif k in ("category", "kind"):
                vals = {x.lower() for x in _strs(v)}
                preds.append(lambda f, r, st, k=k, vals=vals: (st.get(k) or "").lower() in vals)
            elif k == "any":
                if not isinstance(v, list) or not v:
                    raise ValueError("expected a list of match tables")
                alts = []
                for j, sub in enumerate(v):
                    p, nh = _match(sub, sources, f"{path}.any[{j}]")
                    alts.append(p)
                    needs_html |= nh
                preds.append(lambda f, r, st, alts=alts: any(all(p(f, r, st) for p in a) for a in alts))
            elif k == "not":
                p, nh = _match(v, sources, f"{path}.not")
                needs_html |= nh
                preds.append(lambda f, r, st, p=p: not all(x(f, r, st) for x in p))
        except RuleError as e:
            raise ValueError(f"{path}.{k}: {e.message}") from None
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(path) else f"{path}.{k}: {e}") from None
    return preds, needs_html


def _rule(
    item: Any, loc: _Locator, index: int, sources: dict, blocks: dict, followups: dict, senders: dict
) -> Rule:
    line = loc.rule_line(index)
    if not isinstance(item, dict):
        raise loc.error(line, "[[rule]] must be a table")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise loc.error(
            loc.key_line(line, "name") if "name" in item else line,
            "rule needs a name (letters, digits, - _ .)",
        )
    for k in item:
        if k not in _RULE_KEYS:
            raise loc.error(loc.key_line(line, k), f"rule {name}: unknown key {k!r}")

    def bad(key: str, msg: str) -> RuleError:
        return loc.error(loc.key_line(line, key), f"rule {name}: {msg}")

    try:
        preds, needs_html = _match(item.get("match", {}), sources, "match")
    except (ValueError, KeyError) as e:
        key = str(e).strip("'\"").split(":")[0].split(".")[-1].split("[")[0]
        raise bad(key if key != "match" else "match", str(e).strip("'\"")) from None
    sets: dict[str, Any] = {}
    for k in ("category", "kind", "sender"):
        if k in item:
            if not isinstance(item[k], str) or not item[k]:
                raise bad(k, f"{k}: expected a non-empty string")
            sets[k] = item[k].lower() if k != "sender" else item[k]
    if "sender" in sets and sets["sender"] not in senders:
        raise bad("sender", f"no [sender.{sets['sender']}]")
    if "skin" in item:
        if item["skin"] is False or item["skin"] == "":
            sets["skin"] = None
        elif isinstance(item["skin"], str):
            sets["skin"] = item["skin"]
        else:
            raise bad("skin", 'skin: a skin name, or "" for no wrap')
    if "allow_promotions" in item:
        if not isinstance(item["allow_promotions"], bool):
            raise bad("allow_promotions", "allow_promotions: true or false")
        sets["allow_promotions"] = item["allow_promotions"]
    for k, known, what in (("blocks", blocks, "block"), ("followups", followups, "followup")):
        if k in item:
            try:
                vals = _strs(item[k])
            except ValueError as e:
                raise bad(k, f"{k}: {e}") from None
            for v in vals:
                if v not in known:
                    raise bad(k, f"no [{what}.{v}] defined")
            sets[k] = tuple(vals)
    if "headers" in item:
        hs = item["headers"]
        if not isinstance(hs, dict):
            raise bad("headers", 'headers: a table of Header-Name = "value"')
        for hk, hv in hs.items():
            if not _HEADER_NAME.match(hk) or hk.lower().startswith(_NO_SET):
                raise bad("headers", f"header {hk!r} cannot be set by a rule")
            if not isinstance(hv, str) or "\r" in hv or "\n" in hv:
                raise bad("headers", f"header {hk}: a one-line string")
        sets["headers"] = dict(hs)
    mode = item.get("mode", "live")
    if mode not in ("live", "shadow"):
        raise bad("mode", "mode: live or shadow")
    canary = item.get("canary")
    if canary is not None and (
        isinstance(canary, bool) or not isinstance(canary, (int, float)) or not 0 <= canary <= 100
    ):
        raise bad("canary", "canary: a percentage of recipients, 0 to 100")
    stop = item.get("stop", False)
    if not isinstance(stop, bool):
        raise bad("stop", "stop: true or false")
    return Rule(
        name=name,
        file=loc.file,
        line=line,
        preds=tuple(preds),
        needs_html=needs_html,
        sets=sets,
        mode=mode,
        canary=float(canary) if canary is not None else None,
        stop=stop,
    )
