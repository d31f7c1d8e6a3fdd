"""The MIME parse of a message (stdlib, compat32), lean for big ones.

The stdlib parser turns every body into str, line by line: a 25 MB PDF costs ~100 MB of transient
line strings and keeps a 25 MB str that the rewrap only copies back out, encoded as it was. In a
message of ``LEAN_FROM`` bytes or more, each run of base64-alphabet lines of ``LEAN_RUN`` bytes or more
is swapped for one token line before the stdlib parses it. Such a run holds no ':' (no header field), no
leading blank (no continuation) and no '-' (no boundary delimiter), so the token changes nothing the
parser sees. The part keeps where its run lies in the raw bytes: ``get_payload()`` puts the original
text back the first time anything reads it, and ``_mime.raw_part`` copies the bytes straight into the
output without ever making a str of them.
"""

from __future__ import annotations

import email
import os
import re
from email.message import Message

LEAN_FROM = 1024 * 1024
LEAN_RUN = 64 * 1024

# Whole lines, possessive: linear, and no backtracking state (a backtracking repeat kept ~180 bytes per
# line on the regex engine's stack: 59 MB for a 25 MB attachment)
_RUN = re.compile(rb"(?m)^(?:[A-Za-z0-9+/=]++\r?\n)++")


class LeanMessage(Message):
    """A part whose payload may still hold tokens standing for spans of the raw message."""

    raw: bytes = b""
    spans: tuple[tuple[str, int, int], ...] = ()  # (token, start, end) in ``raw``, in payload order

    def get_payload(self, i=None, decode=False):  # noqa: ANN001 - the stdlib's signature
        if self.spans:
            self.restore()
        return super().get_payload(i, decode)

    def restore(self) -> None:
        payload = self._payload
        for token, start, end in self.spans:
            payload = payload.replace(token, self.raw[start:end].decode("ascii"), 1)
        self._payload, self.spans = payload, ()

    def body_pieces(self) -> list[bytes | tuple[int, int]]:
        """The still-encoded body as bytes pieces and (start, end) spans of ``raw``, in order."""
        data = self._payload.encode("ascii", "surrogateescape")
        pieces: list[bytes | tuple[int, int]] = []
        for token, start, end in self.spans:
            before, data = data.split(token.encode("ascii"), 1)
            pieces += [before, (start, end)]
        pieces.append(data)
        return pieces


def parse_message(raw: bytes, *, lean_from: int = LEAN_FROM, lean_run: int = LEAN_RUN) -> Message:
    """``email.message_from_bytes(raw)``, with the big base64 runs of a big message left in ``raw``."""
    if len(raw) < lean_from:
        return email.message_from_bytes(raw)
    nonce = "RelaySpan" + os.urandom(8).hex()
    pieces: list[bytes] = []
    spans: dict[str, tuple[int, int]] = {}
    last = 0
    for m in _RUN.finditer(raw):
        start, end = m.span()
        end -= 2 if raw[end - 2 : end] == b"\r\n" else 1  # the last line end stays: it may be a delimiter's
        if end - start < lean_run:
            continue
        token = f"{nonce}n{len(spans)}"
        pieces += [raw[last:start], token.encode("ascii")]
        spans[token] = (start, end)
        last = end
    if not spans:
        return email.message_from_bytes(raw)
    pieces.append(raw[last:])
    msg = email.message_from_bytes(b"".join(pieces), _class=LeanMessage)
    token_re = re.compile(re.escape(nonce) + r"n\d+")
    for part in msg.walk():
        if any(nonce in str(v) for v in part.values()):
            return email.message_from_bytes(raw)  # cannot happen (see above); never risk a wrong header
        for name in ("preamble", "epilogue"):
            text = getattr(part, name)
            if text and nonce in text:
                setattr(part, name, token_re.sub(lambda t: _text(raw, spans[t.group()]), text))
        if isinstance(part._payload, str) and nonce in part._payload:  # noqa: SLF001
            part.raw = raw
            part.spans = tuple((t, *spans[t]) for t in token_re.findall(part._payload))  # noqa: SLF001
    return msg


def _text(raw: bytes, span: tuple[int, int]) -> str:
    return raw[span[0] : span[1]].decode("ascii")
