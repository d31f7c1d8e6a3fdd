"""Per-source limits: messages per minute (sliding window) and concurrent sessions per AUTH user."""

from __future__ import annotations

import time
from collections import defaultdict, deque


class RateLimiter:
    """At most ``limit`` events per 60 s per key; memory bounded by the active keys."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._events: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, key: str, limit: int) -> bool:
        now = self.clock()
        q = self._events[key]
        while q and now - q[0] >= 60.0:
            q.popleft()
        if len(q) >= limit:
            return False
        q.append(now)
        return True


class SessionCounter:
    def __init__(self):
        self.counts: dict[str, int] = defaultdict(int)

    def acquire(self, key: str, limit: int | None) -> bool:
        if limit is not None and self.counts[key] >= limit:
            return False
        self.counts[key] += 1
        return True

    def release(self, key: str) -> None:
        self.counts[key] -= 1
        if self.counts[key] <= 0:
            del self.counts[key]
