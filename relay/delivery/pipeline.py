"""What the worker does to a message before sending it: today the relay-id stamp, then the rewrap.

Kept apart from the worker loop so the same call serves `relay preview` and the admin console.
"""

from __future__ import annotations

import re

from relay.delivery.worker import Prepared
from relay.store.queue import Claim

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_RELAY_ID = re.compile(rb"^X-Relay-Id:[^\n]*\n(?:[ \t][^\n]*\n)*", re.IGNORECASE | re.MULTILINE)


def stamp_relay_id(raw: bytes, queue_id: str) -> bytes:
    """Sets exactly one X-Relay-Id header, touching no other byte of the message."""
    m = _HEADER_END.search(raw)
    head, body = (raw[: m.start() + 1], raw[m.start() + 1 :]) if m else (raw, b"")
    head = _RELAY_ID.sub(b"", head)
    return f"X-Relay-Id: {queue_id}\r\n".encode() + head + body


class Pipeline:
    """Callable the worker uses: (raw, claim) -> Prepared."""

    def __call__(self, raw: bytes, claim: Claim) -> Prepared:
        return Prepared(data=stamp_relay_id(raw, claim.queue_id))
