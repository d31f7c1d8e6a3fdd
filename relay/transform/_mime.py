"""MIME analysis (what is the body, what are inline images and attachments, must we pass
through) and a lean writer for the rewrapped structure.

Parsing uses the stdlib compat32 policy (``email.message_from_bytes``' default, ~3x faster
than ``policy.default``). Attachments and inline images are never decoded and re-encoded:
their header fields and encoded body are copied as parsed, so their bytes stay identical.
"""

from __future__ import annotations

import hashlib
import re
from binascii import b2a_qp
from dataclasses import dataclass, field
from email import errors as email_errors
from email.generator import BytesGenerator
from email.message import Message
from email.policy import compat32
from io import BytesIO

from .parse import LeanMessage

# ----------------------------------------------------------------------------- pass-through rules

PASS_TYPES = {
    "multipart/signed": "signed (multipart/signed)",
    "multipart/encrypted": "encrypted (multipart/encrypted)",
    "application/pkcs7-mime": "S/MIME (application/pkcs7-mime)",
    "application/x-pkcs7-mime": "S/MIME (application/x-pkcs7-mime)",
    "application/pgp-encrypted": "PGP encrypted",
    "text/calendar": "calendar invitation (text/calendar)",
    "application/ics": "calendar invitation (application/ics)",
    "multipart/report": "delivery or read report (multipart/report)",
    "message/delivery-status": "delivery report (message/delivery-status)",
    "message/global-delivery-status": "delivery report (message/global-delivery-status)",
    "message/disposition-notification": "read receipt (message/disposition-notification)",
    "message/global-disposition-notification": "read receipt (message/global-disposition-notification)",
    "message/feedback-report": "feedback report",
}
_SERIOUS_DEFECTS = (
    email_errors.NoBoundaryInMultipartDefect,
    email_errors.StartBoundaryNotFoundDefect,
    email_errors.MultipartInvariantViolationDefect,
)
_PGP_INLINE = re.compile(r"^-----BEGIN PGP (?:SIGNED )?MESSAGE-----", re.M)


def structural_passthrough(msg: Message) -> str | None:
    """Reason to forward ``msg`` untouched because of its MIME structure, or None."""
    for part in msg.walk():
        ctype = part.get_content_type()
        reason = PASS_TYPES.get(ctype)
        if reason:
            return reason
        for defect in part.defects:
            if isinstance(defect, _SERIOUS_DEFECTS):
                return f"broken MIME ({type(defect).__name__})"
        if part.get_content_maintype() == "multipart" and not part.is_multipart():
            return "broken MIME (multipart without parts)"
    return None


# ----------------------------------------------------------------------------- analysis

_ATTACH_PARAMS = ("filename", "name")


def _disposition(part: Message) -> str:
    value = part.get("content-disposition")
    if not value:
        return ""
    return str(value).split(";", 1)[0].strip().lower()


def _is_body_candidate(part: Message) -> bool:
    ctype = part.get_content_type()
    if ctype not in ("text/plain", "text/html"):
        return False
    if _disposition(part) == "attachment":
        return False
    return not (part.get_param("filename", header="content-disposition") or part.get_param("name"))


def _cid(part: Message) -> str | None:
    value = part.get("content-id")
    if not value:
        return None
    return str(value).strip().strip("<>").strip() or None


@dataclass
class Analysis:
    html: Message | None = None  # the chosen body part (text/html or text/plain)
    extra_bodies: list[Message] = field(default_factory=list)  # more inline text parts, in order
    related: list[Message] = field(default_factory=list)  # inline images etc. (multipart/related)
    attachments: list[Message] = field(default_factory=list)  # everything else, in order
    # the sender's own text/plain alternative of the chosen HTML body, if any: the text part's content
    plain_alternative: Message | None = None

    @property
    def body(self) -> Message | None:
        return self.html


def analyse(msg: Message) -> Analysis:
    a = Analysis()
    _walk(msg, a, in_related=False)
    # a part with a Content-ID outside any multipart/related is still an inline image when the
    # body refers to it; the caller moves those (it knows the final HTML), see move_cid_parts
    return a


def _walk(part: Message, a: Analysis, *, in_related: bool) -> None:
    ctype = part.get_content_type()
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        children = part.get_payload()
        sub = part.get_content_subtype()
        if sub == "alternative":
            best = _best_alternative(children)
            if best is None:  # nothing readable: keep every alternative as an attachment
                for child in children:
                    _walk(child, a, in_related=in_related)
                return
            _walk(best, a, in_related=in_related)
            for child in children:  # the other alternatives' bodies go, their attachments stay
                if (
                    child is not best
                    and child.get_content_type() == "text/plain"
                    and best.get_content_type() == "text/html"
                    and a.plain_alternative is None
                    and _is_body_candidate(child)
                ):
                    a.plain_alternative = child
                if child is not best:
                    other = Analysis()
                    _walk(child, other, in_related=in_related)
                    a.attachments.extend(other.attachments)
            return
        if sub == "related":
            root = _related_root(part, children)
            _walk(root, a, in_related=in_related)
            for child in children:
                if child is not root:
                    a.related.append(child)
            return
        if sub == "appledouble":
            a.attachments.append(part)
            return
        for child in children:  # mixed, parallel, digest, unknown multipart
            _walk(child, a, in_related=in_related)
        return
    if _is_body_candidate(part):
        if a.html is None:
            a.html = part
        else:
            a.extra_bodies.append(part)
        return
    if ctype.startswith("multipart/"):
        a.attachments.append(part)
        return
    a.attachments.append(part)


def _contains_html(part: Message) -> bool:
    return any(p.get_content_type() == "text/html" and _is_body_candidate(p) for p in part.walk())


def _best_alternative(children: list[Message]) -> Message | None:
    # last alternative is the richest (RFC 2046), prefer one with HTML, then any text/plain
    for child in reversed(children):
        if _contains_html(child):
            return child
    for child in reversed(children):
        if any(_is_body_candidate(p) for p in child.walk()):
            return child
    return None


def _related_root(part: Message, children: list[Message]) -> Message:
    start = part.get_param("start")
    if isinstance(start, str):
        start = start.strip().strip("<>")
        for child in children:
            if _cid(child) == start:
                return child
    return children[0]


def move_cid_parts(a: Analysis, html: str) -> None:
    """Attachments carrying a Content-ID that the HTML references become inline (related)."""
    if "cid:" not in html:
        return
    keep: list[Message] = []
    for part in a.attachments:
        cid = _cid(part)
        if cid and not part.is_multipart() and ("cid:" + cid) in html:
            a.related.append(part)
        else:
            keep.append(part)
    a.attachments = keep


def cids_of(parts: list[Message]) -> set[str]:
    return {c for c in (_cid(p) for p in parts) if c}


# ----------------------------------------------------------------------------- raw copy of parts

_CONTENT_HEADERS = ("content-", "mime-version")


Chunks = list  # of bytes and memoryviews: a part that holds a big body still in the raw message


def raw_part(part: Message, eol: bytes, *, top_level: bool = False) -> bytes | Chunks:
    """The part as bytes: its header fields as parsed and its body still encoded.

    For a leaf part the encoded body is copied verbatim, so the decoded content is byte-identical.
    ``top_level``: the part is the whole message; keep only its Content-* fields.
    A part holding a lean body (``parse.LeanMessage``) comes back as Chunks, a list whose big pieces are
    views of the raw message: the output's one join is their only copy.
    """
    payload = part._payload  # noqa: SLF001 - the still-encoded body is what we want
    is_multi = part.get_content_maintype() == "multipart" and isinstance(payload, list)
    is_rfc822 = (
        isinstance(payload, list) and len(payload) == 1 and part.get_content_type() == "message/rfc822"
    )
    if not (isinstance(payload, str) or is_multi or is_rfc822):
        return _generated(part, eol)  # exotic message/* parts: let the stdlib write them
    out: Chunks = []
    w = out.append

    def add(chunks: bytes | Chunks) -> None:
        if isinstance(chunks, list):
            out.extend(chunks)
        else:
            w(chunks)

    for name, value in part._headers:  # noqa: SLF001 - raw values with their original folding
        if top_level and not name.lower().startswith(_CONTENT_HEADERS):
            continue
        w(_raw_field(name, value, eol))
    w(eol)
    if isinstance(part, LeanMessage) and part.spans:
        raw = part.raw
        for piece in part.body_pieces():
            if isinstance(piece, bytes):
                w(_fix_eol(piece, eol))
            elif _eol_is(raw, *piece, eol):
                w(memoryview(raw)[piece[0] : piece[1]])  # a big body: never a str, never copied here
            else:
                w(_fix_eol(raw[piece[0] : piece[1]], eol))
    elif isinstance(payload, str):
        w(_fix_eol(payload.encode("ascii", "surrogateescape"), eol))
    elif is_rfc822:
        add(raw_part(payload[0], eol))
    else:
        boundary = (part.get_boundary() or "").encode("ascii", "surrogateescape")
        if part.preamble:
            w(_fix_eol(part.preamble.encode("ascii", "surrogateescape"), eol) + eol)
        for child in payload:
            w(b"--" + boundary + eol)
            add(raw_part(child, eol))
            w(eol)
        w(b"--" + boundary + b"--")
        if part.epilogue:
            w(eol + _fix_eol(part.epilogue.encode("ascii", "surrogateescape"), eol))
    if any(isinstance(c, memoryview) for c in out):
        return out
    return b"".join(out)


def _holds(part: bytes | Chunks, marker: bytes) -> bool:
    """``marker in`` the part's bytes. A boundary marker starts with '--' and has no line end; a view holds
    only base64-alphabet lines (no '-') and starts after a line end, and every other seam between pieces
    has a line end on one side: so a marker lies wholly inside one bytes piece."""
    if isinstance(part, list):
        return any(marker in c for c in part if isinstance(c, bytes))
    return marker in part


def _generated(part: Message, eol: bytes) -> bytes:
    buf = BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=compat32.clone(linesep=eol.decode())).flatten(part)
    return buf.getvalue().rstrip(b"\r\n")


def _raw_field(name: str, value: str, eol: bytes) -> bytes:
    data = f"{name}: {value}".encode("ascii", "surrogateescape")
    return _fix_eol(data, eol) + eol


def _eol_is(raw: bytes, start: int, end: int, eol: bytes) -> bool:
    """Every line ending in raw[start:end] is already ``eol`` (counted in place, no copy)."""
    lf, crlf = raw.count(b"\n", start, end), raw.count(b"\r\n", start, end)
    return crlf == 0 if eol == b"\n" else lf == crlf


def _fix_eol(data: bytes, eol: bytes) -> bytes:
    if eol == b"\r\n":
        if b"\n" in data and data.count(b"\n") != data.count(b"\r\n"):
            data = re.sub(rb"\r?\n", b"\r\n", data)
        return data
    if b"\r\n" in data:
        return data.replace(b"\r\n", b"\n")
    return data


# ----------------------------------------------------------------------------- lean writer


def qp_encode(text: str, eol: bytes) -> bytes:
    """UTF-8 quoted-printable body, lines <= 76, ``eol`` line endings."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    out = b2a_qp(data, quotetabs=False, istext=True, header=False)
    if out.endswith(b" ") or out.endswith(b"\t"):  # b2a_qp keeps a final space: encode it
        out = out[:-1] + (b"=20" if out[-1:] == b" " else b"=09")
    if eol != b"\n":
        out = out.replace(b"\n", eol)
    return out


def make_boundary(seed: bytes, level: int, parts: list[bytes | Chunks]) -> str:
    """Deterministic boundary ("=_" can never occur in QP or base64 text), checked against raw parts."""
    digest = hashlib.sha256(seed).hexdigest()[:24]
    n = 0
    while True:
        boundary = f"=_relay_{digest}_{level}" + (f"_{n}" if n else "")
        marker = b"--" + boundary.encode("ascii")
        if not any(_holds(p, marker) for p in parts):
            return boundary
        n += 1


def _multipart(
    sub: str,
    boundary: str,
    parts: list[bytes | Chunks],
    eol: bytes,
    *,
    extra: str = "",
    preamble: bytes = b"",
) -> list[bytes]:
    """The container's chunks (a nested container is a list of chunks): joined once, at the end."""
    head = f'Content-Type: multipart/{sub};{eol.decode()} boundary="{boundary}"{extra}'.encode("ascii")
    delim = b"--" + boundary.encode("ascii")
    chunks = [head, eol, eol]
    if preamble:
        chunks += [preamble, eol]
    for p in parts:
        chunks += [delim, eol, *p, eol] if isinstance(p, list) else [delim, eol, p, eol]
    chunks += [delim, b"--"]
    return chunks


_PREAMBLE = b"This is a multi-part message in MIME format."


def write_message(
    header_fields: list[bytes],
    text_body: bytes,
    html_body: bytes,
    related: list[bytes | Chunks],
    attachments: list[bytes | Chunks],
    *,
    eol: bytes,
    seed: bytes,
    join: bool = True,
) -> bytes | Chunks:
    """Assemble the rewrapped message::

        multipart/mixed                 (only with attachments)
          multipart/alternative
            text/plain; charset=utf-8   (quoted-printable)
            multipart/related           (only with inline parts)
              text/html; charset=utf-8  (quoted-printable)
              inline parts (raw copies)
          attachments (raw copies)

    ``header_fields``: complete top-level fields, each ending with ``eol``; bodies already encoded.
    ``join=False``: the pieces (bytes and views of the raw message), for the caller to send as they are.
    """
    raws = related + attachments
    qp = eol.join(
        (b'Content-Type: text/plain; charset="utf-8"', b"Content-Transfer-Encoding: quoted-printable", b"")
    )
    text_part = qp + eol + text_body
    html_part: bytes | list[bytes] = qp.replace(b"text/plain", b"text/html") + eol + html_body
    if related:
        b_rel = make_boundary(seed, 2, raws)
        html_part = _multipart("related", b_rel, [html_part, *related], eol, extra='; type="text/html"')
    b_alt = make_boundary(seed, 1, raws)
    if attachments:
        alt = _multipart("alternative", b_alt, [text_part, html_part], eol)
        b_mix = make_boundary(seed, 0, raws)
        body = _multipart("mixed", b_mix, [alt, *attachments], eol, preamble=_PREAMBLE)
    else:
        body = _multipart("alternative", b_alt, [text_part, html_part], eol, preamble=_PREAMBLE)
    pieces = [*header_fields, b"MIME-Version: 1.0", eol, *body, eol]
    # one join at most: a big attachment is copied into the output once, or not at all
    return b"".join(pieces) if join else pieces
