"""MessageFacts: what the rules look at, built once per message and parsed lazily.

Headers come from a light scan of the header block (no MIME parse). The body (text and HTML) is parsed
only when a rule asks for it: the MIME structure once (stdlib, compat32), the HTML once with lxml (the
same tree serves every CSS selector and the body text). BeautifulSoup + soupsieve, ~25x slower, is the
fallback: for a selector lxml's cssselect cannot evaluate exactly like soupsieve (see ``Selector``), and
for HTML lxml refuses to parse. Either path gives the same values (tests/rules/test_selectors.py).
"""

from __future__ import annotations

import email.header
import email.message
import functools
import ipaddress
import re
from functools import cached_property
from typing import Any

from lxml import etree

from relay.transform._content import part_text  # one charset decoder for rules and rewrap
from relay.transform.parse import parse_message

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
    def message(self) -> email.message.Message:
        """The MIME parse (compat32), done once: the rewrap reads the same tree (it never changes it),
        since the stdlib parser takes about 1 ms for a 20 KB message. A big message's base64 bodies stay
        in ``raw`` until read (``relay.transform.parse``)."""
        return parse_message(self.raw)

    @cached_property
    def _bodies(self) -> tuple[str, str]:
        msg = self.message
        text = html = None
        for part in msg.walk():
            if part.is_multipart():
                continue
            if (part.get("content-disposition") or "").strip().lower().startswith("attachment"):
                continue
            ctype = part.get_content_type()
            if ctype == "text/plain" and text is None:
                text = part_text(part)
            elif ctype == "text/html" and html is None:
                html = part_text(part)
        return text or "", html or ""

    @property
    def html(self) -> str:
        return self._bodies[1]

    @cached_property
    def tree(self) -> Any | None:
        """The HTML body parsed once by lxml (its <html> element); None: no HTML, or lxml refused it."""
        html = self.html
        if not html:
            return None
        import lxml.html

        try:
            return lxml.html.document_fromstring(html)
        except Exception:  # noqa: BLE001 - empty document, XML declaration in a str, NUL bytes...
            return None

    @cached_property
    def soup(self) -> Any:
        """BeautifulSoup tree of the HTML body: only for the soupsieve fallback (~7 ms for 20 KB)."""
        from bs4 import BeautifulSoup

        return BeautifulSoup(self.html, "lxml")

    @cached_property
    def text(self) -> str:
        """The body as text: the text/plain part, else the HTML's text (lxml's text_content, as
        ``lxml.html.fromstring`` would pick the element, read from the one parsed tree)."""
        text, html = self._bodies
        if text or not html:
            return text
        doc = self.tree
        if doc is None:
            return ""
        try:
            return _fromstring_text(doc, html)
        except Exception:  # noqa: BLE001 - as before: odd HTML has no text
            return ""

    @cached_property
    def _odd_class_space(self) -> bool:
        """A class attribute separated by whitespace that XPath's normalize-space does not split on
        (form feed, no-break space...): BeautifulSoup splits on it, so class selectors go to soupsieve."""
        tree = self.tree
        return tree is not None and _ODD_SPACE.search("\n".join(_CLASS_VALUES(tree))) is not None

    @cached_property
    def _lxml_complete(self) -> bool:
        """lxml parsed the HTML and kept all of it. libxml2 drops whatever follows ``</html>`` (a tracking
        pixel some tools append), BeautifulSoup keeps it: such a message is read with BeautifulSoup."""
        if self.tree is None:
            return False
        m = _END_HTML.search(self.html)
        return m is None or not self.html[m.end() :].strip()

    def _lxml_for(self, sel: Selector) -> bool:
        return (
            sel.xpath is not None and self._lxml_complete and not (sel.uses_class and self._odd_class_space)
        )

    @cached_property
    def _has_template(self) -> bool:
        return self.tree is not None and next(self.tree.iter("template"), None) is not None

    def _xpath(self, sel: Selector) -> list[Any]:
        els = sel.xpath(self.tree)
        if self._has_template:  # soupsieve does not look inside a <template> (not part of the document)
            els = [el for el in els if next(el.iterancestors("template"), None) is None]
        return els

    def select_values(self, selector: Selector | str, attribute: str | None = None) -> list[str]:
        """For each element matching ``selector`` in the HTML body (document order): the value of
        ``attribute`` (elements without it are skipped; class-like attributes read as BeautifulSoup lists
        joined by a space), else its text (``get_text(" ", strip=True)``). Cached per message."""
        sel = selector if isinstance(selector, Selector) else compile_selector(selector)
        cache = self.__dict__.setdefault("_values_cache", {})
        key = (sel.css, attribute)
        got = cache.get(key)
        if got is None:
            if not self.html:
                got = []
            elif self._lxml_for(sel):
                els = self._xpath(sel)
                if attribute:
                    got = [v for el in els if (v := _lxml_attr(el, attribute)) is not None]
                else:
                    got = [_lxml_text(el) for el in els]
            else:
                got = soup_values(self.soup, sel.css, attribute)
            cache[key] = got
        return got

    def matches(self, selector: Selector | str) -> bool:
        """Some element of the HTML body matches the CSS selector."""
        sel = selector if isinstance(selector, Selector) else compile_selector(selector)
        cache = self.__dict__.setdefault("_match_cache", {})
        got = cache.get(sel.css)
        if got is None:
            if not self.html:
                got = False
            elif self._lxml_for(sel):
                got = bool(self._xpath(sel))
            else:
                got = bool(self.soup.select(sel.css))
            cache[sel.css] = got
        return got


# ----------------------------------------------------------------------------- CSS selectors

_ODD_SPACE = re.compile(r"[^\S\t\n\r ]")  # whitespace other than the four normalize-space splits on
_END_HTML = re.compile(r"</html[\s/>][^>]*>?", re.I)
_CLASS_VALUES = etree.XPath("//@class", smart_strings=False)
_NON_SPACE = re.compile(r"\S+")  # how BeautifulSoup splits class-like attributes
# BeautifulSoup's HTMLTreeBuilder.DEFAULT_CDATA_LIST_ATTRIBUTES: attributes it reads as lists
_LIST_ATTRS_ANY = frozenset({"class", "accesskey", "dropzone"})
_LIST_ATTRS = {
    "a": frozenset({"rel", "rev"}),
    "link": frozenset({"rel", "rev"}),
    "td": frozenset({"headers"}),
    "th": frozenset({"headers"}),
    "form": frozenset({"accept-charset"}),
    "object": frozenset({"archive"}),
    "area": frozenset({"rel"}),
    "icon": frozenset({"sizes"}),
    "iframe": frozenset({"sandbox"}),
    "output": frozenset({"for"}),
}
_LIST_ATTR_NAMES = _LIST_ATTRS_ANY.union(*_LIST_ATTRS.values())
# tags whose strings BeautifulSoup keeps apart (Script, Stylesheet...): get_text skips them elsewhere
_STRING_CONTAINERS = frozenset({"rt", "rp", "style", "script", "template"})
_STRUCTURAL = frozenset(
    {"first-child", "last-child", "only-child", "first-of-type", "last-of-type", "only-of-type"}
)
_NTH = frozenset({"nth-child", "nth-last-child", "nth-of-type", "nth-last-of-type"})
_ATTR_OPS = frozenset({"exists", "=", "^=", "$=", "*=", "|="})


class Selector:
    """A CSS selector compiled once, at rule load: soupsieve validates it (the reference syntax, as
    before), and when every part of it means exactly the same in lxml's cssselect, its XPath is
    compiled and evaluated on the lxml tree. Other selectors (pseudo-classes beyond the structural
    ones, namespaces, ``~=``, value tests on ``class``/``rel``/``type``-like attributes, the ``i``
    flag...) are evaluated by soupsieve on a BeautifulSoup tree: ``why`` says why."""

    __slots__ = ("css", "xpath", "uses_class", "why")

    def __init__(self, css: str) -> None:
        import soupsieve

        soupsieve.compile(css)  # raises SelectorSyntaxError / ValueError for a bad selector
        self.css = css
        self.xpath: Any = None
        self.uses_class = False
        self.why = ""
        try:
            import cssselect
            from lxml.cssselect import CSSSelector
        except ImportError:  # pragma: no cover - a dependency; without it everything goes to soupsieve
            self.why = "cssselect is not installed"
            return
        try:
            parsed = cssselect.parse(css)
            for s in parsed:
                if s.pseudo_element:
                    raise _Unsupported(f"pseudo-element ::{s.pseudo_element}")
                self._check(s.parsed_tree)
            self.xpath = CSSSelector(css, translator="html")
        except _Unsupported as e:
            self.why = str(e)
        except Exception as e:  # noqa: BLE001 - cssselect's SelectorError / ExpressionError
            self.why = f"cssselect: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    @property
    def engine(self) -> str:
        return "lxml" if self.xpath is not None else "soupsieve"

    def _check(self, node: Any) -> None:
        kind = type(node).__name__
        if kind == "Element":
            if node.namespace is not None:
                raise _Unsupported("namespace prefix")
            return
        if kind in ("Hash", "Class"):
            self.uses_class |= kind == "Class"
            return self._check(node.selector)
        if kind == "Attrib":
            name = node.attrib.lower()
            value = node.value.value if node.value is not None else ""
            if node.namespace is not None or getattr(node, "flag", None):
                raise _Unsupported("attribute namespace or flag")
            if node.operator not in _ATTR_OPS:
                raise _Unsupported(f"attribute operator {node.operator}")
            if node.operator != "exists" and (name in _LIST_ATTR_NAMES or name == "type"):
                raise _Unsupported(f"value test on the {name} attribute")
            if node.operator in ("^=", "$=", "*=") and not value:
                raise _Unsupported("empty attribute value")
            return self._check(node.selector)
        if kind == "CombinedSelector":
            if node.combinator not in (" ", ">", "+", "~"):
                raise _Unsupported(f"combinator {node.combinator!r}")
            self._check(node.selector)
            return self._check(node.subselector)
        if kind == "Pseudo" and node.ident.lower() in _STRUCTURAL:
            return self._check(node.selector)
        if kind == "Function" and node.name.lower() in _NTH:
            if any(str(getattr(t, "value", "")).lower() == "of" for t in node.arguments):
                raise _Unsupported(f":{node.name}(... of S)")
            return self._check(node.selector)
        if kind == "Negation":
            self._check(node.selector)
            return self._check(node.subselector)
        name = getattr(node, "ident", None) or getattr(node, "name", None) or kind
        raise _Unsupported(f"{name} is left to soupsieve")


class _Unsupported(Exception):
    pass


@functools.lru_cache(maxsize=1024)
def compile_selector(css: str) -> Selector:
    """The compiled selector (cached: rules compile theirs at load, reloads reuse them)."""
    return Selector(css)


def soup_values(soup: Any, css: str, attribute: str | None) -> list[str]:
    """What ``MessageFacts.select_values`` gives, read with BeautifulSoup + soupsieve (the fallback,
    and the reference the lxml path is tested against)."""
    els = soup.select(css)
    if attribute:
        return [
            v if isinstance(v, str) else " ".join(v) for el in els if (v := el.get(attribute)) is not None
        ]
    return [el.get_text(" ", strip=True) for el in els]


def _lxml_attr(el: Any, attribute: str) -> str | None:
    v = el.get(attribute)
    if v is not None and (attribute in _LIST_ATTRS_ANY or attribute in _LIST_ATTRS.get(el.tag, ())):
        return " ".join(_NON_SPACE.findall(v))
    return v


def _lxml_text(el: Any) -> str:
    """BeautifulSoup's ``el.get_text(" ", strip=True)`` on an lxml element: text and tails in document
    order, no comments or processing instructions. A string whose innermost enclosing script, style,
    template, rt or rp (BeautifulSoup's string containers) is not ``el``'s own kind is left out."""
    own = el.tag if el.tag in _STRING_CONTAINERS else None
    if own is None:
        if next(el.iterancestors(*_STRING_CONTAINERS), None) is not None:
            return ""
        if next(el.iter(*_STRING_CONTAINERS), None) is None:  # the common case: itertext is exact
            return " ".join(s for x in el.itertext() if (s := x.strip()))
    out: list[str] = []

    def walk(e: Any, ctx: str | None) -> None:  # ctx: the innermost string container around e's text
        if e.tag in _STRING_CONTAINERS:
            ctx = e.tag
        if e.text and ctx == own:
            out.append(e.text)
        for c in e:
            if isinstance(c.tag, str):
                walk(c, ctx)
            if c.tail and ctx == own:
                out.append(c.tail)

    walk(el, None)
    return " ".join(s for x in out if (s := x.strip()))


_FULL_HTML = re.compile(r"^\s*<(?:html|!doctype)", re.I).match  # lxml.html's own test


def _fromstring_text(doc: Any, html: str) -> str:
    """``lxml.html.fromstring(html).text_content()`` from the already parsed document ``doc``."""
    if _FULL_HTML(html):
        return doc.text_content()
    bodies = doc.findall("body") or doc.findall("{http://www.w3.org/1999/xhtml}body")
    if len(bodies) > 1:  # fromstring merges them: let it (never seen from libxml2)
        import lxml.html

        return lxml.html.fromstring(html).text_content()
    if doc.findall("head") or doc.findall("{http://www.w3.org/1999/xhtml}head") or not bodies:
        return doc.text_content()
    body = bodies[0]
    if (
        len(body) == 1
        and (not body.text or not body.text.strip())
        and (not body[-1].tail or not body[-1].tail.strip())
    ):
        return body[0].text_content()
    return body.text_content()
