"""The admin console: read-only pages over the queue and the customer timeline, as a WSGI application.

Routes (under ``prefix``, default "/admin"):
  GET /admin                                    queue depth, counts by status, the 50 latest messages, search
  GET /admin/timeline?address=A                 one customer's timeline across every source tool
  GET /admin/message/QID                        envelope, original headers, MIME outline, recipients, events
  GET /admin/message/QID/raw                    the stored original, byte for byte (.eml download)
  GET /admin/message/QID/preview?skin=NAME      the original re-rendered with a skin, in a sandboxed frame
  GET /admin/message/QID/preview.html?skin=N    the frame's content, under a CSP that forbids any script

Access: HTTP Basic against ``users`` (name -> scrypt hash from `relay hash-password`). With no users
configured, only loopback clients are served, and only when the Host header is a loopback name (a DNS
rebinding page cannot read the console) and no proxy forwarding header is present (a reverse proxy on
the same host must not turn the world into a loopback client).
Read-only: every method but GET and HEAD gets 405. Pages are rendered by Jinja2 with autoescape on,
from the templates below (kept in this module so an installed wheel carries them).
"""

from __future__ import annotations

import base64
import email
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from email.header import Header, decode_header, make_header
from email.policy import compat32
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from jinja2 import DictLoader, Environment, StrictUndefined
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from relay.intake.auth import hash_password, verify_password
from relay.store.database import StoreError
from relay.store.schema import events, messages, recipients

log = logging.getLogger(__name__)

RECENT = 50  # messages on the overview
TIMELINE = 100  # entries on a timeline page
MAX_PARTS = 200  # MIME parts listed on a message page
MAX_INLINE_IMAGE = 2_000_000  # bytes: larger cid: images are not inlined into the preview
_QID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
_SKIN = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
_PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP", "HTTP_X_FORWARDED_HOST")

PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# The rendered e-mail: no script, no plugin, no form, no fetch; images and inline CSS only.
PREVIEW_CSP = (
    "default-src 'none'; img-src data: cid: https:; style-src 'unsafe-inline'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'self'"
)
RAW_CSP = "default-src 'none'; sandbox"

Start = Callable[..., Any]
Response = tuple[str, list, bytes]  # status, headers, body


# -- read-only queries (SQLAlchemy Core on relay.store.schema; the queue module stays the writer) --------


def _read(engine, fn):
    try:
        with engine.connect() as conn:
            return fn(conn)
    except SQLAlchemyError as e:
        raise StoreError(str(e.orig if getattr(e, "orig", None) else e).strip()) from e


def recent_messages(engine, limit: int = RECENT) -> list[dict]:
    """The latest messages, newest first, each with its recipients (address, status)."""

    def q(conn):
        rows = (
            conn.execute(
                select(
                    messages.c.queue_id,
                    messages.c.received_at,
                    messages.c.mail_from,
                    messages.c.source,
                    messages.c.subject,
                    messages.c.size,
                    messages.c.transform_error,
                )
                .order_by(messages.c.received_at.desc(), messages.c.queue_id.desc())
                .limit(limit)
            )
            .mappings()
            .all()
        )
        out = [dict(r) | {"recipients": []} for r in rows]
        by_id = {m["queue_id"]: m for m in out}
        if by_id:
            for r in conn.execute(
                select(recipients.c.queue_id, recipients.c.address, recipients.c.status)
                .where(recipients.c.queue_id.in_(list(by_id)))
                .order_by(recipients.c.id)
            ).mappings():
                by_id[r["queue_id"]]["recipients"].append({"address": r["address"], "status": r["status"]})
        return out

    return _read(engine, q)


def message_detail(engine, queue_id: str) -> dict | None:
    """One message with its raw bytes, its recipients and every event; None if the id is unknown."""

    def q(conn):
        m = conn.execute(select(messages).where(messages.c.queue_id == queue_id)).mappings().first()
        if m is None:
            return None
        rcpts = (
            conn.execute(
                select(recipients).where(recipients.c.queue_id == queue_id).order_by(recipients.c.id)
            )
            .mappings()
            .all()
        )
        evs = (
            conn.execute(
                select(events.c.at, events.c.address_key, events.c.kind, events.c.detail)
                .where(events.c.queue_id == queue_id)
                .order_by(events.c.at, events.c.id)
            )
            .mappings()
            .all()
        )
        return {"message": dict(m), "recipients": [dict(r) for r in rcpts], "events": [dict(e) for e in evs]}

    return _read(engine, q)


# -- formatting helpers -----------------------------------------------------------------------------------


def _when(t: float | None) -> str:
    if t is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def _pretty_json(text: str | None) -> str:
    if not text:
        return ""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True)
    except ValueError:
        return text


def _blocks(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return [text]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _header_text(value: Any) -> str:
    """A header value for reading: RFC 2047 words decoded, raw 8-bit read as UTF-8 (else cp1252)."""
    try:
        if isinstance(value, Header):  # compat32 hands raw 8-bit bytes over as an unknown-8bit Header
            raw = b"".join(
                s if isinstance(s, bytes) else s.encode("ascii", "surrogateescape")
                for s, _charset in decode_header(value)
            )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252", "replace")
        else:
            text = str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - a broken header is shown as it is, never a failed page
        text = str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates into the page
    return re.sub(r"\r?\n[ \t]*", " ", text)


def _outline(msg: email.message.Message) -> list[dict]:
    """The MIME tree as a flat list with depths: type, charset, disposition, filename, size, defects."""
    out: list[dict] = []

    def walk(part, depth: int) -> None:
        if len(out) >= MAX_PARTS:
            return
        entry = {
            "depth": depth,
            "type": part.get_content_type(),
            "charset": part.get_content_charset() or "",
            "disposition": (part.get("Content-Disposition") or "").split(";")[0].strip().lower(),
            "filename": "",
            "cid": _header_text(part.get("Content-ID") or ""),
            "size": None,
            "defects": [type(d).__name__ for d in getattr(part, "defects", [])],
        }
        try:
            entry["filename"] = _header_text(part.get_filename() or "")
        except Exception:  # noqa: BLE001 - odd RFC 2231 parameters
            entry["filename"] = "?"
        out.append(entry)
        payload = part.get_payload()
        if part.is_multipart() and isinstance(payload, list):
            for child in payload:
                if isinstance(child, email.message.Message):
                    walk(child, depth + 1)
        else:
            try:
                entry["size"] = len(part.get_payload(decode=True) or b"")
            except Exception:  # noqa: BLE001
                entry["size"] = None

    walk(msg, 0)
    return out


def _decoded(part: email.message.Message) -> str:
    data = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def preview_document(message: bytes) -> str:
    """The HTML a mail client would show for ``message``: its HTML part with cid: images as data: URIs,
    or its text part in a <pre>, as one standalone document."""
    from html import escape

    msg = email.message_from_bytes(message, policy=compat32)
    html = text = None
    images: dict[str, str] = {}
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        attached = (part.get("Content-Disposition") or "").strip().lower().startswith("attachment")
        cid = (part.get("Content-ID") or "").strip().strip("<>")
        if cid and ctype.startswith("image/"):
            data = part.get_payload(decode=True) or b""
            if len(data) <= MAX_INLINE_IMAGE:
                images[cid] = f"data:{ctype};base64,{base64.b64encode(data).decode()}"
        elif ctype == "text/html" and html is None and not attached:
            html = _decoded(part)
        elif ctype == "text/plain" and text is None and not attached:
            text = _decoded(part)
    if html is not None:
        return re.sub(
            r"cid:([^\"'\s)>]+)",
            lambda m: images.get(unquote(m.group(1)), m.group(0)),
            html,
            flags=re.IGNORECASE,
        )
    body = escape(text) if text is not None else "(no text or HTML part)"
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        f'<pre style="white-space:pre-wrap;font:14px/1.5 monospace;margin:16px">{body}</pre></body></html>'
    )


# -- access control ---------------------------------------------------------------------------------------


def _loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address((addr or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


class _Refused(Exception):
    def __init__(self, status: str, title: str, text: str, headers: Iterable[tuple[str, str]] = ()):
        super().__init__(title)
        self.status, self.title, self.text, self.headers = status, title, text, list(headers)


# -- templates --------------------------------------------------------------------------------------------

_BASE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{% block title %}{% endblock %} · brand-relay admin</title>
<style>
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2933;
background:#f3f4f6}
a{color:#1d5fa8;text-decoration:none}a:hover{text-decoration:underline}
header{background:#1f2933;color:#fff}
header .bar{max-width:1200px;margin:0 auto;padding:10px 24px;display:flex;align-items:center;gap:24px}
header .brand{font-weight:600;font-size:16px;color:#fff;white-space:nowrap}
header .brand span{color:#9aa5b1;font-weight:400}
header form{margin-left:auto;display:flex;gap:6px}
header input[type=search]{width:300px;padding:6px 10px;border:1px solid #3e4c59;border-radius:4px;
background:#fff;color:#1f2933;font:inherit}
button,.button{padding:6px 14px;border:0;border-radius:4px;background:#3b82c4;color:#fff;font:inherit;
cursor:pointer;display:inline-block}
.button.secondary{background:#e4e7eb;color:#1f2933}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 10px}
.sub{color:#616e7c;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #e4e7eb;border-radius:6px;padding:12px 16px;min-width:130px}
.card .n{font-size:24px;font-weight:600}.card .l{color:#616e7c;font-size:12px;text-transform:uppercase;
letter-spacing:.04em}
.panel{background:#fff;border:1px solid #e4e7eb;border-radius:6px;padding:16px;margin-bottom:16px}
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid #e4e7eb;border-radius:6px}
th,td{text-align:left;padding:7px 10px;border-bottom:1px solid #eef0f2;vertical-align:top}
th{background:#f9fafb;font-weight:600;font-size:12px;color:#52606d;text-transform:uppercase;
letter-spacing:.03em}
tr:last-child td{border-bottom:0}
td.when,td.mono{white-space:nowrap}
.mono,code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#f9fafb;border:1px solid #eef0f2;border-radius:4px;padding:8px;margin:4px 0;
white-space:pre-wrap;word-break:break-word;max-height:360px;overflow:auto}
.subject{font-weight:500}
.muted{color:#7b8794}.small{font-size:12px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
background:#e4e7eb;color:#3e4c59;white-space:nowrap}
.s-sent{background:#d9f2e3;color:#1e6b3c}.s-deferred{background:#fdf0d5;color:#8a5a00}
.s-failed{background:#fbe0e0;color:#a61b1b}.s-queued,.s-active{background:#dde9f8;color:#1d4f8a}
.s-suppressed{background:#ececec;color:#52606d}.s-rewrapped{background:#d9f2e3;color:#1e6b3c}
.s-passthrough{background:#dde9f8;color:#1d4f8a}
.rcpt{display:block;white-space:nowrap}
dl.kv{display:grid;grid-template-columns:180px 1fr;gap:4px 16px;margin:0}
dl.kv dt{color:#616e7c}dl.kv dd{margin:0;word-break:break-word}
.entry{background:#fff;border:1px solid #e4e7eb;border-radius:6px;padding:14px 16px;margin-bottom:12px}
.entry .head{display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}
.entry .head .subject{font-size:15px}
.entry .meta{color:#616e7c;font-size:13px;margin:4px 0 8px}
ul.events{list-style:none;margin:8px 0 0;padding:0;border-left:2px solid #e4e7eb}
ul.events li{padding:2px 0 2px 12px}
.error{background:#fbe0e0;border:1px solid #f3b8b8;color:#7a1414;border-radius:6px;padding:10px 14px;
margin-bottom:16px}
.note{background:#fdf6e3;border:1px solid #f0dfb0;border-radius:6px;padding:10px 14px;margin-bottom:16px}
.actions{display:flex;gap:8px;margin:12px 0 0}
iframe.preview{width:100%;height:900px;border:1px solid #cbd2d9;border-radius:6px;background:#fff}
.hdr td:first-child{white-space:nowrap;color:#52606d;width:200px}
footer{max-width:1200px;margin:0 auto;padding:8px 24px 32px;color:#7b8794;font-size:12px}
select{padding:5px 8px;font:inherit;border:1px solid #cbd2d9;border-radius:4px}
</style></head><body>
<header><div class="bar">
<a class="brand" href="{{ prefix }}">brand-relay <span>admin</span></a>
<a href="{{ prefix }}" style="color:#cbd2d9">Overview</a>
<form method="get" action="{{ prefix }}/timeline" role="search">
<input type="search" name="address" placeholder="Customer address, e.g. claire@example.org"
 value="{{ address or '' }}" aria-label="Customer address">
<button type="submit">Timeline</button></form>
</div></header>
<main>{% block main %}{% endblock %}</main>
<footer>Read-only console. {{ access }}{% if user %} Signed in as <strong>{{ user }}</strong>.{% endif %}
Times in UTC.</footer>
</body></html>"""

_MACROS = """{% macro badge(status) %}<span class="badge s-{{ status }}">{{ status }}</span>{% endmacro %}
{% macro tl(address) %}<a href="{{ prefix }}/timeline?address={{ address|urlencode }}">{{ address }}</a>
{%- endmacro %}
{% macro msg(qid) %}{{ prefix }}/message/{{ qid }}{% endmacro %}"""

_OVERVIEW = """{% extends "base.html" %}{% import "macros.html" as m with context %}
{% block title %}Overview{% endblock %}
{% block main %}
<h1>Overview</h1>
<p class="sub">Queue and delivery log of this relay.</p>
<h2>Queue depth</h2>
<div class="cards">
{% for state, n in depth.items() %}<div class="card"><div class="n">{{ n }}</div>
<div class="l">{{ state }}</div></div>{% endfor %}
</div>
<h2>Recipients by status</h2>
<div class="cards">
{% for state, n in counts %}<div class="card"><div class="n">{{ n }}</div>
<div class="l">{{ m.badge(state) }}</div></div>{% else %}<p class="muted">No messages yet.</p>{% endfor %}
</div>
<h2>Latest {{ recent|length }} messages</h2>
{% if recent %}
<table>
<thead><tr><th>Received</th><th>Subject</th><th>Source</th><th>Sender</th><th>Recipients</th>
<th>Size</th></tr></thead>
<tbody>
{% for r in recent %}<tr>
<td class="when small">{{ r.received_at|when }}</td>
<td><a class="subject" href="{{ m.msg(r.queue_id) }}">{{ r.subject or "(no subject)" }}</a>
{% if r.transform_error %}<br><span class="badge s-failed">transform failed</span>{% endif %}
<br><span class="muted small mono">{{ r.queue_id }}</span></td>
<td>{{ r.source }}</td>
<td class="small">{{ r.mail_from or "<>" }}</td>
<td>{% for x in r.recipients[:5] %}<span class="rcpt">{{ m.badge(x.status) }} {{ m.tl(x.address) }}</span>
{% endfor %}{% if r.recipients|length > 5 %}<span class="muted small">and {{ r.recipients|length - 5 }}
more</span>{% endif %}</td>
<td class="when small">{{ r.size|size }}</td>
</tr>{% endfor %}
</tbody></table>
{% else %}<p class="muted">No messages stored.</p>{% endif %}
{% endblock %}"""

_TIMELINE = """{% extends "base.html" %}{% import "macros.html" as m with context %}
{% block title %}Timeline {{ address }}{% endblock %}
{% block main %}
<h1>Timeline of {{ address }}</h1>
<p class="sub">{{ entries|length }} message{{ "" if entries|length == 1 else "s" }}, newest first,
from every source tool{% if entries|length >= limit %} (the latest {{ limit }}){% endif %}.</p>
{% for e in entries %}
<div class="entry">
<div class="head">{{ m.badge(e.status) }}
<a class="subject" href="{{ m.msg(e.queue_id) }}">{{ e.subject or "(no subject)" }}</a>
<span class="muted small">{{ e.received_at|when }}</span></div>
<div class="meta">source <strong>{{ e.source }}</strong> · from {{ e.mail_from or "<>" }}
· skin <strong>{{ e.skin or "none" }}</strong>
· blocks {% if e.blocks %}{{ e.blocks|join(", ") }}{% else %}none{% endif %}
· attempts {{ e.attempts }} · <span class="mono">{{ e.queue_id }}</span></div>
{% if e.upstream_reply %}<div class="small">Upstream reply: <code>{{ e.upstream_reply }}</code></div>
{% endif %}
{% if e.transform_error %}<div class="small">Transform error (sent unwrapped):
<code>{{ e.transform_error }}</code></div>{% endif %}
<ul class="events">{% for ev in e.events %}<li class="small"><span class="muted">{{ ev.at|when }}</span>
<strong>{{ ev.kind }}</strong> {{ ev.detail or "" }}</li>{% endfor %}</ul>
</div>
{% else %}
<p class="muted">No message for this address.</p>
{% endfor %}
{% endblock %}"""

_MESSAGE = """{% extends "base.html" %}{% import "macros.html" as m with context %}
{% block title %}{{ msg.subject or msg.queue_id }}{% endblock %}
{% block main %}
<h1>{{ msg.subject or "(no subject)" }}</h1>
<p class="sub mono">{{ msg.queue_id }}</p>
<div class="actions">
<a class="button" href="{{ m.msg(msg.queue_id) }}/preview">Preview with a skin</a>
<a class="button secondary" href="{{ m.msg(msg.queue_id) }}/raw">Download original (.eml)</a>
</div>
<h2>Envelope</h2>
<div class="panel"><dl class="kv">
<dt>Received</dt><dd>{{ msg.received_at|when }}</dd>
<dt>Source</dt><dd>{{ msg.source }}</dd>
<dt>Client</dt><dd>{{ msg.client_addr }}{% if msg.helo %} (HELO {{ msg.helo }}){% endif %}</dd>
<dt>MAIL FROM</dt><dd>{{ msg.mail_from or "<>" }}</dd>
<dt>RCPT TO</dt><dd>{% for r in rcpts %}{{ m.tl(r.address) }}{% if not loop.last %}, {% endif %}
{% endfor %}</dd>
<dt>Message-ID</dt><dd class="mono">{{ msg.message_id or "–" }}</dd>
<dt>Size</dt><dd>{{ msg.size|size }}</dd>
<dt>DKIM of the original</dt><dd>{{ msg.dkim or "not signed or not checked" }}</dd>
<dt>Transform</dt><dd>{% if msg.transform_error %}<span class="badge s-failed">failed open</span>
<code>{{ msg.transform_error }}</code>{% else %}no error recorded{% endif %}</dd>
</dl></div>
<h2>Recipients</h2>
<table>
<thead><tr><th>Address</th><th>Status</th><th>Attempts</th><th>Last reply</th><th>Skin / blocks</th>
<th>Updated</th></tr></thead><tbody>
{% for r in rcpts %}<tr>
<td>{{ m.tl(r.address) }}</td><td>{{ m.badge(r.status) }}</td><td>{{ r.attempts }}</td>
<td><code>{{ r.last_reply or "–" }}</code>
{% if r.status in ("deferred", "queued") %}<div class="muted small">next attempt
{{ r.next_attempt_at|when }}</div>{% endif %}</td>
<td>{{ r.skin or "none" }}{% if r.blocks %}<div class="small">{{ r.blocks|join(", ") }}</div>{% endif %}
{% if r.report %}<details><summary class="small">transform report</summary><pre>{{ r.report }}</pre>
</details>{% endif %}</td>
<td class="when small">{{ r.updated_at|when }}</td>
</tr>{% endfor %}
</tbody></table>
<h2>Events</h2>
<table><thead><tr><th>When</th><th>Recipient</th><th>Event</th><th>Detail</th></tr></thead><tbody>
{% for e in events %}<tr><td class="when small">{{ e.at|when }}</td><td class="small">{{ e.address_key }}</td>
<td>{{ m.badge(e.kind) }}</td><td class="small">{{ e.detail or "" }}</td></tr>
{% else %}<tr><td colspan="4" class="muted">No events.</td></tr>{% endfor %}
</tbody></table>
<h2>Headers of the original</h2>
{% if defects %}<div class="note">Parser defects: {{ defects|join(", ") }}</div>{% endif %}
<table class="hdr"><tbody>
{% for name, value in headers %}<tr><td class="mono">{{ name }}</td><td class="small">{{ value }}</td></tr>
{% endfor %}</tbody></table>
<h2>MIME structure</h2>
<table><thead><tr><th>Part</th><th>Charset</th><th>Disposition / file</th><th>Content-ID</th>
<th>Size</th></tr></thead><tbody>
{% for p in parts %}<tr><td class="mono" style="padding-left:{{ 10 + 18 * p.depth }}px">{{ p.type }}
{% if p.defects %}<span class="badge s-deferred">{{ p.defects|join(", ") }}</span>{% endif %}</td>
<td>{{ p.charset }}</td><td>{{ p.disposition }} {{ p.filename }}</td><td class="small mono">{{ p.cid }}</td>
<td class="when small">{{ p.size|size if p.size is not none else "" }}</td></tr>{% endfor %}
</tbody></table>
{% endblock %}"""

_PREVIEW = """{% extends "base.html" %}{% import "macros.html" as m with context %}
{% block title %}Preview {{ msg.subject or msg.queue_id }}{% endblock %}
{% block main %}
<h1>Preview: {{ msg.subject or "(no subject)" }}</h1>
<p class="sub"><a href="{{ m.msg(msg.queue_id) }}">← message {{ msg.queue_id }}</a> · rendered for
{{ recipient or "(no recipient)" }}, without cross-sell blocks, not DKIM-signed</p>
<form method="get" action="{{ m.msg(msg.queue_id) }}/preview" class="panel" style="display:flex;gap:8px;
align-items:center">
<label for="skin">Skin</label>
<select id="skin" name="skin">{% for s in skins %}
<option value="{{ s }}"{% if s == skin %} selected{% endif %}>{{ s }}</option>{% endfor %}
<option value="-"{% if not skin %} selected{% endif %}>(no skin: original)</option>
</select><button type="submit">Render</button>
{% if recorded %}<span class="muted small">recorded for this message: {{ recorded }}</span>{% endif %}
</form>
{% if error %}<div class="error">{{ error }}</div>{% endif %}
{% if report %}<div class="panel"><dl class="kv">
<dt>Result</dt><dd>{{ m.badge(report.action) }} {{ report.reason }}</dd>
<dt>Skin</dt><dd>{{ report.skin or "none" }}{% if report.skin_version %} (version {{ report.skin_version }})
{% endif %}</dd>
<dt>HTML size</dt><dd>{{ report.html_bytes|size }}{% if report.over_budget %}
<span class="badge s-failed">over budget</span>{% endif %}</dd>
</dl></div>{% endif %}
{% if frame %}<iframe class="preview" sandbox referrerpolicy="no-referrer" title="Rendered message"
 src="{{ frame }}"></iframe>{% endif %}
{% endblock %}"""

_ERROR = """{% extends "base.html" %}
{% block title %}{{ title }}{% endblock %}
{% block main %}<h1>{{ title }}</h1><p>{{ text }}</p><p><a href="{{ prefix }}">Back to the overview</a></p>
{% endblock %}"""

TEMPLATES = {
    "base.html": _BASE,
    "macros.html": _MACROS,
    "overview.html": _OVERVIEW,
    "timeline.html": _TIMELINE,
    "message.html": _MESSAGE,
    "preview.html": _PREVIEW,
    "error.html": _ERROR,
}


# -- the application --------------------------------------------------------------------------------------


class AdminApp:
    """WSGI app. ``store``: relay.store.queue.Store; ``settings``: relay.config.Settings;
    ``users``: admin name -> scrypt hash (None or {}: loopback clients only); ``skins_loader``: returns the
    SkinLibrary to preview with (None: load and hot-reload ``settings.paths.skins`` here)."""

    def __init__(
        self,
        store: Any,
        settings: Any,
        *,
        users: dict[str, str] | None = None,
        skins_loader: Callable[[], Any] | None = None,
        prefix: str = "/admin",
    ) -> None:
        self.store = store
        self.settings = settings
        self.users = dict(users or {})
        self.prefix = "/" + prefix.strip("/")
        self.skins_loader = skins_loader or self._own_skins
        self._skins: Any = None
        self._skins_error: str | None = None
        self._skins_lock = threading.Lock()
        self._pepper = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._dummy = hash_password(secrets.token_hex(8)) if self.users else ""
        self._renders: OrderedDict[tuple, tuple] = OrderedDict()
        self._renders_lock = threading.Lock()
        listen = getattr(getattr(settings, "http", None), "listen", None)
        self._hosts = {"localhost"} | ({_host_name(listen.host)} if listen and listen.host else set())
        self._hosts -= {"0.0.0.0", "::", ""}
        self.env = Environment(loader=DictLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined)
        self.env.filters["when"] = _when
        self.env.filters["size"] = _size
        self.env.globals["prefix"] = self.prefix

    def matches(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    # -- WSGI -------------------------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Start):  # noqa: ANN204
        method = environ.get("REQUEST_METHOD", "GET").upper()
        ctx: dict[str, Any] = {"user": None, "access": self._access_text(), "address": None}
        try:
            if method not in ("GET", "HEAD"):
                raise _Refused(
                    "405 Method Not Allowed",
                    "Method not allowed",
                    "The admin console is read-only: only GET and HEAD are accepted.",
                    [("Allow", "GET, HEAD")],
                )
            ctx["user"] = self._authorize(environ)
            status, headers, body = self._route(environ, ctx)
        except _Refused as r:
            status, headers, body = self._error(r.status, r.title, r.text, ctx)
            headers += r.headers
        except StoreError as e:
            log.error("admin: store unavailable: %s", e)
            status, headers, body = self._error(
                "503 Service Unavailable", "Database unavailable", "The queue database did not answer.", ctx
            )
        except Exception:  # noqa: BLE001 - log it; the client gets a plain page, never a traceback
            log.exception("admin: error on %s %s", method, environ.get("PATH_INFO"))
            status, headers, body = self._error(
                "500 Internal Server Error", "Internal error", "The page failed; see the relay's log.", ctx
            )
        headers = [*headers, ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [b""] if method == "HEAD" else [body]

    def _route(self, environ: dict, ctx: dict) -> Response:
        path = environ.get("PATH_INFO", "") or "/"
        if not self.matches(path):
            raise self._not_found("No such page.")
        rest = path[len(self.prefix) :].strip("/")
        query = parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=20)
        if rest == "":
            return self._overview(ctx)
        if rest == "timeline":
            return self._timeline((query.get("address") or [""])[0].strip(), ctx)
        parts = rest.split("/")
        if parts[0] != "message" or len(parts) not in (2, 3) or not _QID.fullmatch(parts[1]):
            raise self._not_found("No such page.")
        qid = parts[1]
        action = parts[2] if len(parts) == 3 else ""
        if action not in ("", "raw", "preview", "preview.html"):
            raise self._not_found("No such page.")
        detail = message_detail(self.store.engine, qid)
        if detail is None:
            raise self._not_found(f"No message with queue id {qid} (it may have been purged).")
        if action == "raw":
            return self._raw(detail)
        if action in ("preview", "preview.html"):
            skin = (query.get("skin") or [""])[0].strip()
            if action == "preview":
                return self._preview(detail, skin, ctx)
            return self._preview_html(detail, skin)
        return self._message(detail, ctx)

    # -- access -----------------------------------------------------------------------------------------

    def _access_text(self) -> str:
        if self.users:
            n = len(self.users)
            return f"Access: HTTP Basic authentication ({n} admin user{'s' if n != 1 else ''})."
        return (
            "Access: loopback only (127.0.0.0/8, ::1), because no admin users are configured; "
            "configure admin users to reach it from elsewhere."
        )

    def _authorize(self, environ: dict) -> str | None:
        """The admin's name (None on loopback without users); raises _Refused with 401 or 403."""
        if not self.users:
            if not _loopback(environ.get("REMOTE_ADDR", "")):
                raise _Refused(
                    "403 Forbidden",
                    "Loopback only",
                    "No admin users are configured, so the console only answers on the loopback interface.",
                )
            if any(environ.get(h) for h in _PROXY_HEADERS):
                raise _Refused(
                    "403 Forbidden",
                    "Loopback only",
                    "This request came through a proxy. Configure admin users to use the console behind one.",
                )
            host = environ.get("HTTP_HOST")
            if host is not None and not self._host_ok(host):
                raise _Refused(
                    "403 Forbidden",
                    "Unexpected host name",
                    "Without admin users the console answers only to loopback host names "
                    "(localhost, 127.0.0.1, [::1]).",
                )
            return None
        auth = [("WWW-Authenticate", 'Basic realm="brand-relay admin", charset="UTF-8"')]
        denied = _Refused("401 Unauthorized", "Sign-in required", "This console needs an admin login.", auth)
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value.strip():
            raise denied
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            raise denied from None
        login, sep, password = decoded.partition(b":")
        name = login.decode("utf-8", "replace")
        encoded = self.users.get(name)
        if not sep or encoded is None:
            verify_password(password, self._dummy)  # the same cost whether the user exists or not
            log.warning("admin: login failed for unknown user %r from %s", name, environ.get("REMOTE_ADDR"))
            raise denied
        token = hmac.new(self._pepper, login + b"\0" + password + b"\0" + encoded.encode(), hashlib.sha256)
        digest = token.digest()
        if digest not in self._verified:
            if not verify_password(password, encoded):
                log.warning("admin: login failed for %r from %s", name, environ.get("REMOTE_ADDR"))
                raise denied
            self._verified.add(digest)
        return name

    def _host_ok(self, host_header: str) -> bool:
        host = _host_name(host_header)
        return host in self._hosts or host.endswith(".localhost") or _loopback(host)

    # -- responses --------------------------------------------------------------------------------------

    @staticmethod
    def _headers(content_type: str, csp: str = PAGE_CSP, frame: str = "DENY") -> list[tuple[str, str]]:
        return [
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", frame),
            ("Referrer-Policy", "no-referrer"),
            ("X-Robots-Tag", "noindex"),
            ("Content-Security-Policy", csp),
        ]

    def _page(self, template: str, ctx: dict, status: str = "200 OK", **values: Any) -> Response:
        html = self.env.get_template(template).render(**ctx, **values).encode("utf-8")
        return status, self._headers("text/html; charset=utf-8"), html

    def _error(self, status: str, title: str, text: str, ctx: dict) -> Response:
        try:
            return self._page("error.html", ctx, status, title=title, text=text)
        except Exception:  # noqa: BLE001 - the last resort is plain text
            log.exception("admin: error page failed")
            return status, self._headers("text/plain; charset=utf-8"), f"{title}\n".encode()

    def _not_found(self, text: str) -> _Refused:
        return _Refused("404 Not Found", "Not found", text)

    # -- pages ------------------------------------------------------------------------------------------

    def _overview(self, ctx: dict) -> Response:
        counts = self.store.counts()
        order = ["queued", "active", "deferred", "sent", "failed", "suppressed"]
        ordered = sorted(counts.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0]))
        return self._page(
            "overview.html",
            ctx,
            depth=self.store.depth(),
            counts=ordered,
            recent=recent_messages(self.store.engine),
        )

    def _timeline(self, address: str, ctx: dict) -> Response:
        if not address:
            raise _Refused("400 Bad Request", "Which address?", "Type a customer's e-mail address to search.")
        ctx = ctx | {"address": address}
        entries = self.store.history(address, limit=TIMELINE)
        return self._page("timeline.html", ctx, entries=entries, limit=TIMELINE)

    def _message(self, detail: dict, ctx: dict) -> Response:
        msg = detail["message"]
        parsed = email.message_from_bytes(msg["raw"], policy=compat32)
        headers = [(name, _header_text(value)) for name, value in parsed.items()]
        rcpts = [
            r | {"blocks": _blocks(r.get("blocks")), "report": _pretty_json(r.get("report"))}
            for r in detail["recipients"]
        ]
        return self._page(
            "message.html",
            ctx,
            msg=msg,
            rcpts=rcpts,
            events=detail["events"],
            headers=headers,
            defects=[type(d).__name__ for d in parsed.defects],
            parts=_outline(parsed),
        )

    def _raw(self, detail: dict) -> Response:
        msg = detail["message"]
        headers = self._headers("message/rfc822", RAW_CSP)
        headers.append(("Content-Disposition", f'attachment; filename="{msg["queue_id"]}.eml"'))
        return "200 OK", headers, bytes(msg["raw"])

    # -- preview ----------------------------------------------------------------------------------------

    def _own_skins(self) -> Any:
        from relay.transform import SkinError, SkinLibrary

        with self._skins_lock:
            try:
                if self._skins is None:
                    self._skins = SkinLibrary.load(self.settings.paths.skins)
                else:
                    self._skins.reload_if_changed()
                self._skins_error = None
            except (SkinError, OSError) as e:
                self._skins_error = f"skins not loaded: {e}"
            return self._skins

    def _library(self) -> tuple[Any, str | None]:
        from relay.transform import SkinLibrary

        try:
            lib = self.skins_loader()
        except Exception as e:  # noqa: BLE001 - a broken skins folder is a message on the page
            log.warning("admin: skins loader failed: %s", e)
            lib, self._skins_error = None, f"skins not loaded: {e}"
        if lib is None:
            error = self._skins_error or "skins are not loaded"
            return SkinLibrary(Path(self.settings.paths.skins), {}, {}), error
        return lib, None

    def _choose_skin(self, detail: dict, requested: str, lib: Any) -> tuple[str | None, str | None]:
        """(skin to render with or None for the original, an error to show)."""
        if requested == "-":
            return None, None
        if requested:
            if not _SKIN.fullmatch(requested) or requested not in lib:
                return None, f"No skin named {requested!r} (have: {', '.join(lib.names()) or 'none'})."
            return requested, None
        recorded = next((r["skin"] for r in detail["recipients"] if r.get("skin")), None)
        name = recorded or self.settings.rewrap.default_skin or None
        if name and name not in lib:
            return None, f"Skin {name!r} is not in the skins folder any more; showing the original."
        return name, None

    def _render(self, detail: dict, skin: str | None, lib: Any) -> tuple[str, Any, str | None]:
        """(preview document, transform report or None, error); cached per message, skin and version."""
        from relay.transform import Decisions, transform

        msg = detail["message"]
        rcpt = detail["recipients"][0]["address"] if detail["recipients"] else "preview@invalid"
        version = None
        if skin:
            try:
                version = lib.version(skin)
            except Exception:  # noqa: BLE001
                version = None
        key = (msg["queue_id"], skin, version, id(lib))
        with self._renders_lock:
            if key in self._renders:
                self._renders.move_to_end(key)
                return self._renders[key]
        error = None
        report = None
        try:
            out, report = transform(
                bytes(msg["raw"]),
                recipient=rcpt,
                queue_id=msg["queue_id"],
                decisions=Decisions(skin=skin),
                skins=lib,
                mail_from=msg["mail_from"],
                html_budget=self.settings.rewrap.html_budget,
            )
        except Exception as e:  # noqa: BLE001 - a skin bug is shown to the admin, with the original
            log.info("admin: preview of %s with skin %r failed: %s", msg["queue_id"], skin, e)
            error = f"Rendering with skin {skin!r} failed: {e}. The original is shown below."
            out = bytes(msg["raw"])
        result = (preview_document(out), report, error)
        with self._renders_lock:
            self._renders[key] = result
            while len(self._renders) > 16:
                self._renders.popitem(last=False)
        return result

    def _preview(self, detail: dict, requested: str, ctx: dict) -> Response:
        lib, lib_error = self._library()
        skin, choose_error = self._choose_skin(detail, requested, lib)
        _doc, report, render_error = self._render(detail, skin, lib)
        qid = detail["message"]["queue_id"]
        frame = f"{self.prefix}/message/{qid}/preview.html?skin={quote(skin or '-', safe='')}"
        errors = [e for e in (lib_error, choose_error, render_error) if e]
        return self._page(
            "preview.html",
            ctx,
            "404 Not Found" if choose_error and requested else "200 OK",
            msg=detail["message"],
            recipient=detail["recipients"][0]["address"] if detail["recipients"] else "",
            skins=lib.names(),
            skin=skin,
            recorded=next((r["skin"] for r in detail["recipients"] if r.get("skin")), None),
            error=" ".join(errors),
            report=report.to_dict() if report is not None else None,
            frame=frame,
        )

    def _preview_html(self, detail: dict, requested: str) -> Response:
        lib, _lib_error = self._library()
        skin, choose_error = self._choose_skin(detail, requested, lib)
        if choose_error and requested:
            raise self._not_found(choose_error)
        doc, _report, _error = self._render(detail, skin, lib)
        headers = self._headers("text/html; charset=utf-8", PREVIEW_CSP, frame="SAMEORIGIN")
        return "200 OK", headers, doc.encode("utf-8", "replace")


def make_app(store: Any, settings: Any, **kw: Any) -> AdminApp:
    return AdminApp(store, settings, **kw)
