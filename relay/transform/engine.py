"""The rewrap: raw message bytes + decisions -> new bytes + Report. Pure: no network, no clock
(DKIM signing's t= tag is dkimpy's own clock read, see README.md)."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Callable, Mapping
from email.message import Message
from email.utils import getaddresses
from typing import Any

from markupsafe import Markup, escape

from . import _content as content_mod
from . import _mime, _raw
from . import dkim as dkim_mod
from .parse import LEAN_FROM, parse_message
from .skins import Skin, SkinLibrary
from .types import Decisions, DkimKey, DkimSigningError, Report, Spliced, TransformTimeout

# ----------------------------------------------------------------------------- control headers

#: Request headers a legacy tool may set to steer the relay; all are stripped before delivery.
REQUEST_HEADERS = {
    "x-relay-use-skin": "skin to use (the rules engine decides; the transform itself uses Decisions.skin)",
    "x-relay-category": "category, e.g. transactional / marketing (read by the rules engine)",
    "x-relay-kind": "kind, e.g. order_confirmation / password_reset (read by the rules engine)",
    "x-relay-no-wrap": '"yes": forward without rewrapping (honoured by the transform itself)',
}
#: Marker added on rewrapped output. On an *incoming* message it means "already wrapped": pass through.
SKIN_MARKER = "x-relay-skin"
RELAY_ID = "x-relay-id"

_TRUE = {"1", "yes", "true", "on"}


def read_request_headers(raw: bytes) -> dict[str, str]:
    """The X-Relay-* request headers of a raw message, lower-cased names without the prefix,
    e.g. ``{"use-skin": "boutique", "no-wrap": "yes"}`` (for the rules engine)."""
    head = _raw.header_block(raw)
    out: dict[str, str] = {}
    for name, data in _raw.header_fields(head):
        if name in REQUEST_HEADERS and name[8:] not in out:
            out[name[8:]] = _raw.field_value(data)
    return out


def _drop_on_passthrough(name: str) -> bool:
    # every X-Relay-* but the X-Relay-Skin marker; an old X-Relay-Id is replaced by ours
    return name.startswith("x-relay-") and name != SKIN_MARKER


_DROP_ON_REWRAP = frozenset(
    {
        "content-type", "content-transfer-encoding", "mime-version", "content-disposition",
        "content-id", "content-description", "content-md5",
        "dkim-signature", "arc-seal", "arc-message-signature", "arc-authentication-results",
        "x-google-dkim-signature", "domainkey-signature",
    }
)  # fmt: skip
_NO_SET = frozenset(
    {"content-type", "content-transfer-encoding", "mime-version", RELAY_ID, SKIN_MARKER, "dkim-signature"}
)
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")
_SIGNATURE_HEADERS = ("dkim-signature",)


def _passthrough(raw: bytes, queue_id: str, spliced: bool = False) -> bytes | Spliced:
    return _raw.edit_headers(
        raw,
        drop=_drop_on_passthrough,
        prepend=[("X-Relay-Id", queue_id)],
        spliced=spliced and len(raw) >= LEAN_FROM,
    )


def _encode_set_header(name: str, value: str, eol: bytes) -> bytes:
    if not _HEADER_NAME.match(name) or name.lower() in _NO_SET or name.lower().startswith("x-relay-"):
        raise ValueError(f"header not settable: {name!r}")
    if "\r" in value or "\n" in value:
        raise ValueError(f"CR/LF in header value for {name}")
    if value.isascii() and len(name) + len(value) < 990:
        return f"{name}: {value}".encode("ascii") + eol
    from email.header import Header

    enc = Header(value, "utf-8", header_name=name).encode(linesep=eol.decode())
    return f"{name}: {enc}".encode("ascii") + eol


# ----------------------------------------------------------------------------- transform


def _from_domain(value: str | None) -> str | None:
    if not value:
        return None
    addrs = getaddresses([value])
    for _, addr in addrs:
        if "@" in addr:
            return addr.rsplit("@", 1)[1].strip().strip(">").lower() or None
    return None


def _auto_submitted(fields: dict[str, list[str]]) -> str | None:
    auto = fields.get("auto-submitted")
    if auto and any(v.split(";", 1)[0].strip().lower() not in ("no", "") for v in auto):
        return f"auto-submitted ({auto[0]})"
    if fields.get("x-autoreply") or fields.get("x-autorespond"):
        return "auto-reply (X-Autoreply)"
    prec = fields.get("precedence")
    if prec and prec[0].strip().lower() == "auto_reply":
        return "auto-reply (Precedence: auto_reply)"
    return None


def _render_blocks(blocks: list) -> Markup:
    return Markup("".join(f'<div data-relay-block="{escape(b.name)}">{b.html}</div>' for b in blocks))


def _header_reason(
    values: dict[str, list[str]], mail_from: str | None, keys: Mapping[str, DkimKey], strict: frozenset[str]
) -> str | None:
    """Why a message must pass through untouched, judged on its headers alone (no MIME parse)."""
    if mail_from is not None and mail_from.strip() in ("", "<>"):
        return "bounce (empty reverse path)"
    if SKIN_MARKER in values:
        return f"already wrapped (X-Relay-Skin: {values[SKIN_MARKER][0]})"
    no_wrap = values.get("x-relay-no-wrap")
    if no_wrap and no_wrap[0].strip().lower() in _TRUE:
        return "X-Relay-No-Wrap requested"
    auto = _auto_submitted(values)
    if auto:
        return auto
    ctype = (values.get("content-type") or ["text/plain"])[0].split(";", 1)[0].strip().lower()
    if ctype in _mime.PASS_TYPES:
        return _mime.PASS_TYPES[ctype]
    from_domain = _from_domain((values.get("from") or [None])[0])
    if dkim_mod.key_for(from_domain, keys) is None and from_domain and _strict(from_domain, strict):
        return f"DMARC quarantine/reject for {from_domain} and no DKIM key"
    return None


def passthrough_reason(
    raw: bytes,
    mail_from: str | None,
    dkim_keys: Mapping[str, DkimKey] | None = None,
    dmarc_strict_domains: frozenset[str] = frozenset(),
) -> str | None:
    """The header-level reason ``transform`` will forward ``raw`` untouched, or None (then it may still
    pass it through for its MIME structure). Cheap: lets the caller skip work only a rewrap needs."""
    head = _raw.header_block(raw)
    values: dict[str, list[str]] = {}
    for name, data in _raw.header_fields(head):
        if name is not None:
            values.setdefault(name, []).append(_raw.field_value(data))
    return _header_reason(values, mail_from, dkim_keys or {}, dmarc_strict_domains)


def transform(
    raw: bytes,
    *,
    recipient: str,
    queue_id: str,
    decisions: Decisions,
    skins: SkinLibrary,
    mail_from: str | None = None,
    dkim_keys: Mapping[str, DkimKey] | None = None,
    dmarc_strict_domains: frozenset[str] = frozenset(),
    html_budget: int = 102_000,
    parse: Callable[[], Message] | None = None,
    spliced: bool = False,
) -> tuple[bytes | Spliced, Report]:
    """Rewrap ``raw`` in the chosen skin for ``recipient``; see README.md for every rule.

    ``mail_from``: the envelope sender; "" or "<>" is a bounce (passed through); None = unknown.
    ``parse``: returns the caller's compat32 parse of ``raw`` (the rules parsed it already); it is
    read, never changed. Called only when the message gets past the header checks.
    ``spliced``: a big message (LEAN_FROM bytes or more) may come back as ``Spliced`` pieces, its big
    bodies views of ``raw``, for delivery to send without joining them (DKIM signing joins them).
    Raises on internal errors (use ``transform_fail_open`` in the delivery path) and
    DkimSigningError when a configured key cannot sign (defer the message).
    """
    _raw.check_queue_id(queue_id)
    keys = dkim_keys or {}
    head = _raw.header_block(raw)
    fields = _raw.header_fields(head)
    values: dict[str, list[str]] = {}
    for name, data in fields:
        if name is not None:
            values.setdefault(name, []).append(_raw.field_value(data))
    has_sig = any(n in values for n in _SIGNATURE_HEADERS)

    def passthrough(reason: str, skin: str | None = None) -> tuple[bytes | Spliced, Report]:
        return _passthrough(raw, queue_id, spliced), Report(
            action="passthrough", reason=reason, skin=skin, dkim="untouched" if has_sig else "none"
        )

    # --- never rewrap: decided on headers alone, no MIME parse
    reason = _header_reason(values, mail_from, keys, dmarc_strict_domains)
    if reason:
        return passthrough(reason)
    if decisions.skin is None:
        return passthrough("no skin chosen")
    key = dkim_mod.key_for(_from_domain((values.get("from") or [None])[0]), keys)
    skin = skins.get(decisions.skin)  # UnknownSkin: fail open upstream

    # --- parse (compat32) and look for structures we must not touch
    msg = parse() if parse is not None else parse_message(raw)
    reason = _mime.structural_passthrough(msg)
    if reason:
        return passthrough(reason, None)
    analysis = _mime.analyse(msg)
    body_html, plain_texts = _body(analysis)
    bodies = ([analysis.html] if analysis.html is not None else []) + analysis.extra_bodies
    if bodies and all(p.get_content_subtype() != "html" for p in bodies):
        body_html = skin.style_fragment(body_html)  # relay-built HTML takes the skin's typography
    _mime.move_cid_parts(analysis, body_html)

    # --- render
    eol = _raw.detect_eol(head) if head else b"\r\n"
    subject = content_mod.decode_header_value((values.get("subject") or [""])[0])
    header_ctx = _header_context(values)
    context: dict[str, Any] = {
        "content": Markup(body_html),
        "subject": subject,
        "recipient": recipient,
        "preheader": content_mod.preheader_of(body_html),
        "brand": skin.brand,
        "headers": header_ctx,
        "category": decisions.category,
        "kind": decisions.kind,
        "queue_id": queue_id,
        "skin": skin.name,
    }
    active = list(decisions.blocks)
    dropped: list[str] = []
    html = _render(skin, context, active)
    size = len(html.encode("utf-8"))
    while size > html_budget and active:
        # drop the lowest priority (the later one on ties) until the estimated saving covers the excess
        excess = size - html_budget
        saved = 0
        while active and saved < excess:
            victim = min(reversed(active), key=lambda b: b.priority)
            active.remove(victim)
            dropped.append(victim.name)
            saved += len(victim.html.encode("utf-8"))
        html = _render(skin, context, active)
        size = len(html.encode("utf-8"))
    text = _text_part(skin, context, active, body_html, plain_texts, html)

    # --- headers and MIME
    out_fields: list[bytes] = [b"X-Relay-Id: " + queue_id.encode("ascii") + eol]
    set_names = {n.lower() for n, _ in decisions.set_headers}
    present: set[str] = {RELAY_ID}
    for name, data in fields:
        if name is None:
            continue  # e.g. an mbox "From " line
        if name in _DROP_ON_REWRAP or name.startswith("x-relay-") or name in set_names:
            continue
        out_fields.append(_fix(data, eol))
        present.add(name)
    for name, value in decisions.set_headers:
        out_fields.append(_encode_set_header(name, value, eol))
        present.add(name.lower())
    out_fields.append(b"X-Relay-Skin: " + skin.name.encode("ascii", "replace") + eol)
    present.update({"mime-version", "content-type"})

    related = [_mime.raw_part(p, eol) for p in analysis.related]
    top_level_leaf = not msg.is_multipart()
    attachments = [
        _mime.raw_part(p, eol, top_level=top_level_leaf and p is msg) for p in analysis.attachments
    ]
    seed = queue_id.encode("ascii") + b"\0" + (values.get("message-id") or [""])[0].encode("ascii", "replace")
    out = _mime.write_message(
        out_fields,
        _mime.qp_encode(text, eol),
        _mime.qp_encode(html, eol),
        related,
        attachments,
        eol=eol,
        seed=seed,
        join=False,
    )
    if key is None and spliced and any(isinstance(p, memoryview) for p in out):
        out = Spliced(out)
    else:
        out = b"".join(out)
    dkim_state = "stripped" if has_sig else "none"
    if key is not None:
        out = dkim_mod.sign(out, key, present, linesep=eol)
        dkim_state = "signed"
    report = Report(
        action="rewrapped",
        reason="",
        skin=skin.name,
        blocks=[b.name for b in active],
        dropped_blocks=dropped,
        over_budget=size > html_budget,
        html_bytes=size,
        dkim=dkim_state,
        skin_version=skin.version,
    )
    return out, report


def _strict(domain: str, strict: frozenset[str]) -> bool:
    if not strict:
        return False
    labels = domain.split(".")
    return any(".".join(labels[i:]) in strict for i in range(len(labels) - 1))


def _fix(data: bytes, eol: bytes) -> bytes:
    return _mime._fix_eol(data, eol)  # noqa: SLF001


def _body(a: _mime.Analysis) -> tuple[str, list[str | None]]:
    """Safe HTML of the body parts (the chosen one and any further inline text parts) and,
    per part, its plain text: the original for text parts, the sender's own text/plain alternative
    for an HTML body that had one (truer to the sender than a conversion, and 1 ms cheaper), else
    None (converted from the HTML only when needed)."""
    htmls: list[str] = []
    texts: list[str | None] = []
    for part in ([a.html] if a.html is not None else []) + a.extra_bodies:
        text = content_mod.part_text(part)
        if part.get_content_subtype() == "html":
            safe = content_mod.clean_original_html(text)
            htmls.append(safe)
            alt = a.plain_alternative if part is a.html else None
            texts.append(
                content_mod.part_text(alt).replace("\r\n", "\n").strip("\n") if alt is not None else None
            )
        else:
            htmls.append(content_mod.text_to_html(text))
            texts.append(text.replace("\r\n", "\n").strip("\n"))
    return "\n".join(htmls), texts


_HEADER_SKIP = frozenset(
    {
        "received",
        "dkim-signature",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
        "x-google-dkim-signature",
        "authentication-results",
    }
)


class HeaderView(Mapping):
    """The original headers for templates: lower-cased name -> decoded value (first occurrence),
    decoded on first access."""

    def __init__(self, values: dict[str, list[str]]) -> None:
        self._raw = {
            n: v[0] for n, v in values.items() if n not in _HEADER_SKIP and not n.startswith("x-relay-")
        }
        self._decoded: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        key = name.lower()
        try:
            return self._decoded[key]
        except KeyError:
            value = self._decoded[key] = content_mod.decode_header_value(self._raw[key])
            return value

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def _header_context(values: dict[str, list[str]]) -> HeaderView:
    return HeaderView(values)


def _render(skin: Skin, context: dict[str, Any], blocks: list) -> str:
    context["crosssell"] = _render_blocks(blocks)
    context["blocks"] = [b.name for b in blocks]
    return skin.render_html(context)


def _text_part(
    skin: Skin, context: dict[str, Any], blocks: list, body_html: str, plain: list[str | None], html: str
) -> str:
    if skin.text is None:
        return content_mod.html_to_text(html, fragment=False)
    if plain and all(t is not None for t in plain):
        content_text = "\n\n".join(t for t in plain if t is not None)
    else:
        content_text = content_mod.html_to_text(body_html)
    crosssell_text = content_mod.html_to_text(str(context["crosssell"])) if blocks else ""
    ctx = dict(context, content=content_text, crosssell=crosssell_text)
    return skin.render_text(ctx) or ""


# ----------------------------------------------------------------------------- fail open


@contextlib.contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based limit; only in the main thread (signals are delivered there) and only when no
    other ITIMER_REAL is armed. Elsewhere the transform runs without a limit."""
    usable = (
        seconds
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TransformTimeout(f"transform exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def transform_fail_open(
    raw: bytes, *, time_limit: float = 2.0, **kw: Any
) -> tuple[bytes | Spliced, Report]:
    """``transform`` that never raises (but for DkimSigningError: defer the message).

    On any exception or when ``time_limit`` seconds pass, returns the original bytes with only
    X-Relay-Id set and the request headers stripped, and Report(action="failed", reason=...).
    The limit uses SIGALRM: it works in the main thread of a worker process; in other threads
    there is no limit. A runaway inside one C call (e.g. css-inline) ends when that call returns.
    """
    queue_id = kw.get("queue_id", "")
    decisions = kw.get("decisions")
    try:
        with _time_limit(time_limit):
            return transform(raw, **kw)
    except DkimSigningError:
        raise
    except Exception as e:  # noqa: BLE001 - fail open is the point
        reason = f"{type(e).__name__}: {e}"[:500]
    qid = _raw.sanitize_queue_id(queue_id)
    try:
        out = _passthrough(raw, qid, kw.get("spliced", False))
    except Exception:  # noqa: BLE001
        out = b"X-Relay-Id: " + qid.encode("ascii") + b"\r\n" + raw
    return out, Report(
        action="failed",
        reason=reason,
        skin=getattr(decisions, "skin", None),
        dkim="untouched",
    )
