"""MessageFacts: what the rules look at, built once per message and parsed lazily.

Headers come from a light scan of the header block (no MIME parse). The body (text and HTML) is parsed
only when a rule asks for it, and BeautifulSoup only when a CSS selector is actually evaluated.
"""

from __future__ import annotations

import email
import email.header
import ipaddress
import re
from functools import cached_property
from typing import Any

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FIELD = re.compile(r"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)$", re.S)
_ENCODED_WORD = "=?"


def _decode_header(value: str) -> str:
    if _ENCODED_WORD not in value:
        return " ".join(value.split())
    try:
        parts = email.header.decode_header(value)
    except Exception:  # noqa: BLE001 - a broken header is still a string to match
        return value
    out = []
    for data, charset in parts:
        if isinstance(data, bytes):
            try:
                out.append(data.decode(charset or "ascii", "replace"))
            except LookupError:
                out.append(data.decode("utf-8", "replace"))
        else:
            out.append(data)
    return " ".join("".join(out).split())


def parse_headers(raw: bytes) -> dict[str, list[str]]:
    """Header fields of a raw message: lower-cased names -> raw (unfolded, undecoded) values in order."""
    m = _HEAD_END.search(raw)
    head = raw[: m.start()] if m else raw
    text = head.decode("utf-8", "surrogateescape")
    fields: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in re.split(r"\r?\n", text):
        if not line:
            continue
        if line[0] in " \t":
            if current is not None:
                current.append(line)
            continue
        fm = _FIELD.match(line)
        if not fm:
            current = None
            continue
        current = [fm.group(2)]
        fields.setdefault(fm.group(1).lower(), []).append(current)  # type: ignore[arg-type]
    return {
        name: [
            "".join(parts).strip().encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            for parts in values
        ]  # type: ignore[misc]
        for name, values in fields.items()
    }


def _part_text(part: Any) -> str:
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset)
    except (LookupError, UnicodeDecodeError):
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return payload.decode("cp1252", "replace")


class MessageFacts:
    """One message as the rules see it. Build with ``from_raw``; every body field is lazy and cached."""

    def __init__(
        self,
        raw: bytes,
        headers: dict[str, list[str]],
        *,
        source: str,
        mail_from: str,
        client_addr: str | None = None,
    ) -> None:
        self.raw = raw
        self.source = source or ""
        self.client_addr = client_addr
        self.mail_from = (mail_from or "").strip().strip("<>")
        self.headers = headers
        self._decoded: dict[str, list[str]] = {}

    @classmethod
    def from_raw(
        cls, raw: bytes, *, source: str, mail_from: str, client_addr: str | None = None
    ) -> MessageFacts:
        """``source``: the AUTH user or the client address (as intake stores it); ``client_addr``: the
        client IP when ``source`` is an AUTH user (so network rules still apply)."""
        return cls(raw, parse_headers(raw), source=source, mail_from=mail_from, client_addr=client_addr)

    # -- headers ------------------------------------------------------------------------------------

    def header_values(self, name: str) -> list[str]:
        """Every value of a header (name case-insensitive), RFC 2047 decoded."""
        name = name.lower()
        got = self._decoded.get(name)
        if got is None:
            got = self._decoded[name] = [_decode_header(v) for v in self.headers.get(name, ())]
        return got

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    @cached_property
    def subject(self) -> str:
        return self.header("subject") or ""

    @cached_property
    def request(self) -> dict[str, str]:
        """X-Relay-* request headers, names without the prefix: {"kind": "order_confirmation"}."""
        return {n[8:]: v[0].strip() for n, v in self.headers.items() if n.startswith("x-relay-") and v}

    @cached_property
    def source_ips(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        out = []
        for value in (self.source, self.client_addr):
            if not value:
                continue
            try:
                ip = ipaddress.ip_address(value.strip("[]"))
            except ValueError:
                continue
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            out.append(ip)
        return tuple(out)

    # -- body (lazy) ----------------------------------------------------------------------------------

    @cached_property
    def _bodies(self) -> tuple[str, str]:
        msg = email.message_from_bytes(self.raw)
        text = html = None
        for part in msg.walk():
            if part.is_multipart():
                continue
            if (part.get("content-disposition") or "").strip().lower().startswith("attachment"):
                continue
            ctype = part.get_content_type()
            if ctype == "text/plain" and text is None:
                text = _part_text(part)
            elif ctype == "text/html" and html is None:
                html = _part_text(part)
        return text or "", html or ""

    @property
    def html(self) -> str:
        return self._bodies[1]

    @cached_property
    def text(self) -> str:
        """The body as text: the text/plain part, else the HTML's text."""
        text, html = self._bodies
        if text or not html:
            return text
        import lxml.html

        try:
            return lxml.html.fromstring(html).text_content()
        except Exception:  # noqa: BLE001 - empty or odd HTML
            return ""

    @cached_property
    def soup(self) -> Any:
        from bs4 import BeautifulSoup

        return BeautifulSoup(self.html, "lxml")

    def select(self, selector: str) -> list[Any]:
        """Elements matching a CSS selector in the HTML body (BeautifulSoup, parsed on first use)."""
        cache = self.__dict__.setdefault("_select_cache", {})
        got = cache.get(selector)
        if got is None:
            got = cache[selector] = self.soup.select(selector) if self.html else []
        return got
