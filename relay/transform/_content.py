"""Content: decode parts and headers, clean the original HTML, plain text <-> HTML.

Hot path (one order confirmation): css-inline on the original HTML only when it has <style>,
one nh3 (html5ever, Rust) pass that both extracts the body content and sanitises it, and one
lxml parse of the sanitised fragment for the visible text (preheader, text part).
"""

from __future__ import annotations

import codecs
import re
from email.header import decode_header
from email.message import Message
from html import escape, unescape
from typing import Any

import css_inline
import nh3
from lxml import etree

# --------------------------------------------------------------------------- charsets

_CHARSET_ALIASES = {
    # WHATWG: these labels mean windows-1252 in practice (smart quotes, euro sign in 0x80-0x9f)
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "windows-1252": "cp1252",
    "x-cp1252": "cp1252",
    "cp-1252": "cp1252",
    "utf8": "utf-8",
    "x-unknown": "utf-8",
    "unknown-8bit": "utf-8",
    "ks_c_5601-1987": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "iso-8859-8-i": "iso-8859-8",
}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", re.I)


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def decode_bytes(data: bytes, charset: str | None, *, html: bool = False) -> str:
    """Decode without mojibake: declared charset (WHATWG aliases), else UTF-8, else Windows-1252."""
    codec = _codec(charset)
    if codec is None and html:
        m = _META_CHARSET.search(data[:4096])
        if m:
            codec = _codec(m.group(1).decode("ascii", "replace"))
    if codec in (None, "ascii", "cp1252", "utf-8"):
        # undeclared / ASCII / latin1 labels: genuine UTF-8 is common under a wrong label
        if codec != "cp1252" or _looks_utf8(data):
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return _cp1252(data)
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode(codec, "replace")


def _looks_utf8(data: bytes) -> bool:
    # only bother when there is 8-bit data that could be a UTF-8 lead byte
    return re.search(rb"[\xc2-\xf4][\x80-\xbf]", data) is not None


def _cp1252(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:  # 0x81 0x8d 0x8f 0x90 0x9d: undefined in cp1252, map as latin-1
        return "".join(data[i : i + 1].decode("cp1252", "ignore") or chr(data[i]) for i in range(len(data)))


def part_text(part: Message) -> str:
    """Decoded text of a leaf part (any CTE, any charset)."""
    payload = part.get_payload(decode=True)
    if payload is None:
        payload = b""
    elif isinstance(payload, str):
        payload = payload.encode("ascii", "surrogateescape")
    text = decode_bytes(payload, part.get_param("charset"), html=part.get_content_subtype() == "html")
    params = {k.lower(): v.lower() for k, v in (part.get_params() or [])[1:] if isinstance(v, str)}
    if params.get("format") == "flowed" and part.get_content_subtype() == "plain":
        text = unflow(text, delsp=params.get("delsp") == "yes")
    return text


def unflow(text: str, *, delsp: bool) -> str:
    """RFC 3676 format=flowed: join soft-broken lines."""
    out: list[str] = []
    buf = ""
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith(" "):
            line = line[1:]  # space-stuffing
        if line.endswith(" ") and line != "-- ":
            buf += line[:-1] if delsp else line
        else:
            out.append(buf + line)
            buf = ""
    if buf:
        out.append(buf)
    return "\n".join(out)


# --------------------------------------------------------------------------- headers

_ENCODED_WORD = "=?"


def decode_header_value(value: str) -> str:
    """RFC 2047 and raw 8-bit header values to str; folding removed."""
    if not value:
        return ""
    value = re.sub(r"\r?\n(?=[ \t])", "", value)
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in value):  # raw 8-bit bytes (surrogateescape)
        value = decode_bytes(value.encode("ascii", "surrogateescape"), None)
    if _ENCODED_WORD not in value:
        return value.strip()
    try:
        parts = decode_header(value)
    except Exception:
        return value.strip()
    out: list[str] = []
    prev_encoded = False
    for chunk, cs in parts:
        if isinstance(chunk, bytes):
            text = decode_bytes(chunk, cs) if cs else chunk.decode("ascii", "replace")
            encoded = cs is not None
        else:
            text, encoded = chunk, False
        if out and not (encoded and prev_encoded) and not text.startswith(" ") and not out[-1].endswith(" "):
            text = " " + text
        out.append(text)
        prev_encoded = encoded
    return "".join(out).strip()


# --------------------------------------------------------------------------- HTML in

_XML_DECL = re.compile(r"^\s*<\?xml[^>]*>", re.I)
_HAS_STYLE = re.compile(r"<style", re.I)
_CONTENT_INLINER = css_inline.CSSInliner(
    inline_style_tags=True, keep_style_tags=False, keep_link_tags=False, load_remote_stylesheets=False
)
_TAGS = set(nh3.ALLOWED_TAGS) | {"font", "center", "big", "tfoot", "section", "main"}
_GLOBAL_ATTRS = {"style", "align", "valign", "width", "height", "bgcolor", "dir", "lang", "title", "border"}
_ATTRS: dict[str, set[str]] = {k: set(v) for k, v in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRS["*"] = _GLOBAL_ATTRS
for _t in ("table", "td", "th", "tr", "tbody", "thead", "tfoot"):
    _ATTRS.setdefault(_t, set()).update(
        {"cellpadding", "cellspacing", "colspan", "rowspan", "nowrap", "background"}
    )
_ATTRS["a"] = {"href", "hreflang", "target", "name"}
_ATTRS["img"] = {"src", "alt", "align", "height", "width", "border", "hspace", "vspace"}
_ATTRS["font"] = {"color", "face", "size"}
_ATTRS["ol"] = {"start", "type"}
_ATTRS["ul"] = {"type"}
_URL_SCHEMES = {"http", "https", "mailto", "tel", "cid", "sms"}
_CLEAN_CONTENT = {
    "script", "style", "title", "noscript", "template", "iframe", "object", "svg", "math", "head"
}  # fmt: skip
_DANGEROUS_CSS = re.compile(r"expression\s*\(|javascript:|vbscript:|behavior\s*:|-moz-binding|@import", re.I)


_DANGER_WORDS = ("expression", "javascript:", "vbscript:", "behavior", "-moz-binding", "@import")


def _style_filter(tag: str, attr: str, value: str) -> str | None:
    if _DANGEROUS_CSS.search(value):
        return None
    return value


_CLEANER_OPTIONS: dict[str, Any] = dict(
    tags=_TAGS,
    clean_content_tags=_CLEAN_CONTENT,
    attributes=_ATTRS,
    url_schemes=_URL_SCHEMES,
    link_rel=None,
    strip_comments=True,
)
# built once: nh3.clean() converts the allow-lists and builds ammonia's sanitizer at every call
# (0.23 ms of the 1.3 ms it takes for the 30 KB order confirmation)
_CLEANER = nh3.Cleaner(**_CLEANER_OPTIONS)
_CLEANER_FILTERED = nh3.Cleaner(attribute_filter=_style_filter, **_CLEANER_OPTIONS)


def sanitize_html(fragment: str) -> str:
    """nh3 (ammonia) with an e-mail-friendly allow-list: no script, no on* handlers, no
    javascript:/data: URLs, no forms, no iframes; inline styles kept minus CSS expressions."""
    out = _CLEANER.clean(fragment)
    low = out.lower()  # cheap substring screen first: an IGNORECASE alternation over 40 KB costs 1 ms
    if any(w in low for w in _DANGER_WORDS) and _DANGEROUS_CSS.search(out):  # rare: filtered second pass
        out = _CLEANER_FILTERED.clean(fragment)
    return out


def clean_original_html(html: str) -> str:
    """The original HTML part -> safe body-content fragment, its own <style> rules inlined."""
    html = _XML_DECL.sub("", html, count=1)
    if _HAS_STYLE.search(html):
        try:
            html = _CONTENT_INLINER.inline(html)
        except Exception:  # invalid CSS: the rules are lost, the content is not
            pass
    return sanitize_html(html)


# --------------------------------------------------------------------------- plain text -> HTML

_URL_RE = re.compile(
    r"""(?P<url>(?:https?://|www\.)[^\s<>"']+)|(?P<mail>\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b)""",
    re.I,
)
_TRAIL = ".,;:!?)]}'\""


def _linkify(line: str) -> str:
    out: list[str] = []
    pos = 0
    for m in _URL_RE.finditer(line):
        start, end = m.span()
        token = m.group(0)
        if m.group("url"):
            while token and token[-1] in _TRAIL:
                if token[-1] == ")" and token.count("(") >= token.count(")"):
                    break
                token = token[:-1]
            end = start + len(token)
            href = token if "://" in token else "http://" + token
        else:
            href = "mailto:" + token
        out.append(escape(line[pos:start], quote=False))
        out.append(f'<a href="{escape(href)}">{escape(token, quote=False)}</a>')
        pos = end
    out.append(escape(line[pos:], quote=False))
    return "".join(out)


_MULTISPACE = re.compile(r"(?<= ) |^ ")


def text_to_html(text: str) -> str:
    """Plain text -> HTML paragraphs; line breaks kept, runs of spaces kept, URLs made links."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    paragraphs = re.split(r"\n[ \t]*\n", text.strip("\n"))
    out: list[str] = []
    for para in paragraphs:
        if not para.strip():
            continue
        lines = [_MULTISPACE.sub("&nbsp;", _linkify(line.rstrip())) for line in para.split("\n")]
        out.append("<p>" + "<br>\n".join(lines) + "</p>")
    return "\n".join(out)


# --------------------------------------------------------------------------- HTML -> plain text

_PARA = frozenset(
    ["p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "blockquote", "pre", "hr", "dl",
     "address", "figure", "form"]
)  # fmt: skip
_BLOCK = (
    frozenset(
        [
            "article",
            "aside",
            "center",
            "dd",
            "div",
            "dt",
            "fieldset",
            "figcaption",
            "footer",
            "header",
            "li",
            "main",
            "nav",
            "section",
            "tbody",
            "thead",
            "tfoot",
            "tr",
            "caption",
        ]
    )
    | _PARA
)
_SKIP = frozenset({"script", "style", "head", "title", "noscript", "template"})
_HIDDEN = re.compile(r"display\s*:\s*none|mso-hide\s*:\s*all", re.I)
_WS = re.compile(r"[ \t\r\n\f\v\u200b\u200c\u200d\u2060\ufeff\u034f]+")


def html_to_text(html: str, *, fragment: bool = True, links: bool = True) -> str:
    """Readable text of an HTML document or fragment: blocks on their own lines, paragraphs
    apart, list items with '- ', table cells side by side, link targets after their text,
    hidden elements (display:none, mso-hide) left out."""
    if not html.strip():
        return ""
    try:
        root = etree.fromstring(f"<div>{html}</div>" if fragment else html, _HTML_PARSER)
    except (etree.ParserError, ValueError, etree.XMLSyntaxError):
        root = None
    if root is None:
        return _WS.sub(" ", re.sub(r"<[^>]+>", " ", html)).replace("\u00a0", " ").strip()
    return tree_to_text(root, links=links)


_HTML_PARSER = etree.HTMLParser(
    remove_blank_text=False, remove_comments=True, remove_pis=True, no_network=True, default_doctype=False
)
_CELL = "\x00"  # cell separator, survives whitespace collapsing


def tree_to_text(root, *, links: bool = True) -> str:
    out: list[str] = []
    buf: list[str] = []  # inline text of the current block, collapsed once at the next break
    pending = 0  # line breaks owed before the next text
    pre_depth = 0
    skip_depth = 0

    def flush() -> None:
        nonlocal pending
        if not buf:
            return
        text = _WS.sub(" ", "".join(buf)).strip(" ")
        buf.clear()
        if not text or text == _CELL:
            return
        if pending and out:
            out.append("\n" * pending)
        pending = 0
        out.append(text)

    def brk(n: int) -> None:
        nonlocal pending
        flush()
        if n > pending:
            pending = n

    def raw_text(text: str) -> None:  # inside <pre>
        nonlocal pending
        flush()
        if pending and out:
            out.append("\n" * pending)
        pending = 0
        out.append(text)

    # iterwalk does not visit comments: drop them first, their tails merge into the text
    etree.strip_tags(root, etree.Comment, etree.ProcessingInstruction)
    add = buf.append
    for event, el in etree.iterwalk(root, events=("start", "end")):
        tag = el.tag
        if event == "start":
            if skip_depth:
                skip_depth += 1
                continue
            style = el.get("style")
            if (
                tag in _SKIP
                or (style and ("none" in style or "mso-hide" in style) and _HIDDEN.search(style))
                or el.get("hidden") is not None
            ):
                skip_depth = 1
                continue
            if tag in _BLOCK:
                brk(2 if tag in _PARA else 1)
                if tag == "li":
                    add("- ")
                elif tag == "hr":
                    add("-" * 40)
                    brk(2)
                elif tag == "pre":
                    pre_depth += 1
            elif tag == "br":
                had = bool(buf) or not out
                brk(1 if had else pending + 1)
            elif tag == "td" or tag == "th":
                add(_CELL)
            text = el.text
            if text:
                if pre_depth:
                    raw_text(text)
                else:
                    add(text)
        else:
            if skip_depth:
                skip_depth -= 1
                if skip_depth:
                    continue
            else:
                if tag == "a" and links:
                    href = el.get("href")
                    if href and href.startswith(("http://", "https://")):
                        label = "".join(el.itertext()).strip()
                        if label and label.rstrip("/") not in href and href not in label:
                            add(f" ({href})")
                if tag in _BLOCK:
                    if tag == "pre":
                        pre_depth -= 1
                    brk(2 if tag in _PARA else 1)
            tail = el.tail
            if tail and el is not root:
                if pre_depth:
                    raw_text(tail)
                else:
                    add(tail)
    flush()
    return _tidy("".join(out))


_SPACES_AROUND_NL = re.compile(r"[ \t]*\n[ \t]*")
_MANY_NL = re.compile(r"\n{3,}")


def _tidy(text: str) -> str:
    text = text.replace(_CELL + _CELL, _CELL).replace(_CELL, "  ").replace("\u00a0", " ")
    text = _SPACES_AROUND_NL.sub("\n", text)
    text = _MANY_NL.sub("\n\n", text)
    return text.strip()


def normalize_ws(text: str) -> str:
    return _WS.sub(" ", text.replace("\u00a0", " ")).strip()


_TAG_RE = re.compile(r"<[^>]*>")


def preheader_of(html: str, limit: int = 100) -> str:
    """First ~``limit`` characters of visible text of a *sanitised* fragment (no script/style
    left), cut at a word boundary. A regex is enough here and costs nothing."""
    text = normalize_ws(unescape(_TAG_RE.sub(" ", html[: limit * 40])))
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + "…"
