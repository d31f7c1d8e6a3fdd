"""What the log keeps of a message's headers: Message-ID and Subject as printable text.

Shared by the intake (every message it accepts) and the follow-up scheduler (every message the rules
write), so both show alike in the timeline; kept free of SMTP and rules imports for that reason.
"""

from __future__ import annotations

import re
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def summary(raw: bytes) -> tuple[str, str]:
    """Message-ID and decoded Subject for the log; never fails on broken headers."""
    m = _HEADER_END.search(raw, 0, 256 * 1024)
    head = raw[: m.end()] if m else raw[: 256 * 1024]
    try:
        parsed = BytesHeaderParser(policy=compat32).parsebytes(head)
        headers = {k.lower(): v for k, v in reversed(list(parsed.raw_items()))}  # first occurrence wins
        message_id = unescape_8bit(headers.get("message-id", "")).strip()[:998]
        subject_raw = unescape_8bit(headers.get("subject", ""))
        try:
            subject = str(make_header(decode_header(subject_raw)))
        except Exception:  # noqa: BLE001 - undecodable encoded-words: keep them as sent
            subject = subject_raw
        return printable(message_id, 998), printable(" ".join(subject.split()), 998)
    except Exception:  # noqa: BLE001
        return "", ""


def printable(value: str, limit: int = 255) -> str:
    """For the log columns: what a client sent, minus what a database or a terminal must not get."""
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in value)[:limit]


def unescape_8bit(value: str) -> str:
    """Raw 8-bit header bytes (RFC 6532 UTF-8, or a legacy tool's Windows-1252) as text."""
    if value.isascii():
        return value
    data = value.encode("ascii", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")
