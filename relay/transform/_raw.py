"""Byte-level header handling: split, edit and re-join a message's header block without
re-serialising anything else (pass-through messages stay byte-exact but for the edits)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from .types import Spliced

_NAME_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_QUEUE_ID_OK = re.compile(r"^[\x21-\x7e]{1,200}$")


def _separator(raw: bytes) -> tuple[int, int] | None:
    """(end of the header block, start of the body), or None when no empty line ends the header."""
    if raw.startswith(b"\r\n"):
        return 0, 2
    if raw.startswith(b"\n"):
        return 0, 1
    i = raw.find(b"\n\r\n")
    j = raw.find(b"\n\n")
    if i == -1 and j == -1:
        return None
    if j == -1 or (i != -1 and i < j):
        return i + 1, i + 3
    return j + 1, j + 2


def split_message(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """Return (header_block, separator, body).

    ``header_block`` ends with its last line's line ending (or is empty), ``separator`` is the
    empty line (b"\\r\\n", b"\\n" or b"" when the message has no body).
    """
    cut = _separator(raw)
    if cut is None:
        if raw.endswith(b"\n"):
            return raw, b"", b""
        eol = b"\r\n" if b"\r\n" in raw else b"\n"
        return raw + eol, b"", b""
    head_end, body_start = cut
    return raw[:head_end], raw[head_end:body_start], raw[body_start:]


def header_block(raw: bytes) -> bytes:
    """``split_message(raw)[0]`` without copying the body (a 25 MB message's body, several times over)."""
    cut = _separator(raw)
    return split_message(raw)[0] if cut is None else raw[: cut[0]]


def detect_eol(header_block: bytes) -> bytes:
    return b"\r\n" if b"\r\n" in header_block[:4096] else b"\n"


def header_fields(header_block: bytes) -> list[tuple[str | None, bytes]]:
    """Split a header block into fields: (lower-cased name or None, raw bytes incl. folding and EOL)."""
    fields: list[tuple[str | None, bytes]] = []
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, data = fields[-1]
            fields[-1] = (name, data + line)
            continue
        m = _NAME_RE.match(line)
        name = m.group(1).decode("ascii").lower() if m else None
        fields.append((name, line))
    return fields


def field_value(data: bytes) -> str:
    """The unfolded value of a raw field, as str (8-bit bytes kept via surrogateescape)."""
    value = data.split(b":", 1)[1] if b":" in data else data
    value = re.sub(rb"\r?\n(?=[ \t])", b"", value).strip(b" \t\r\n")
    return value.decode("ascii", "surrogateescape")


def check_queue_id(queue_id: str) -> str:
    if not _QUEUE_ID_OK.match(queue_id or ""):
        raise ValueError(f"invalid queue_id for X-Relay-Id: {queue_id!r}")
    return queue_id


def sanitize_queue_id(queue_id: object) -> str:
    text = re.sub(r"[^\x21-\x7e]", "_", str(queue_id))[:200]
    return text or "unknown"


def edit_headers(
    raw: bytes,
    *,
    drop: Callable[[str], bool],
    prepend: Iterable[tuple[str, str]] = (),
    spliced: bool = False,
) -> bytes | Spliced:
    """Drop the fields whose lower-cased name satisfies ``drop`` and prepend new fields.

    Everything else (other fields, their folding, the body) is copied byte for byte.
    ``spliced``: the body stays a view of ``raw`` (for a big message: no copy of it).
    """
    cut = _separator(raw) if spliced else None
    if cut is not None:
        head, sep, body = raw[: cut[0]], raw[cut[0] : cut[1]], memoryview(raw)[cut[1] :]
    else:
        head, sep, body = split_message(raw)
    eol = detect_eol(head) if head else (sep or b"\r\n")
    out = [f"{n}: {v}".encode("ascii") + eol for n, v in prepend]
    for name, data in header_fields(head):
        if name is not None and drop(name):
            continue
        out.append(data)
    if cut is not None:
        return Spliced([b"".join(out), sep, body])
    return b"".join(out) + sep + body
