"""The retry schedule and the reading of upstream replies, as data and pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import DeliverySettings

SENT, DEFER, FAIL = "sent", "defer", "fail"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


def classify(reply: Reply, settings: DeliverySettings) -> str:
    """sent | defer | fail for one recipient's reply; configured overrides come first."""
    for rule in settings.reply_rules:
        if rule.applies(reply.code, reply.text):
            return rule.action
    if 200 <= reply.code < 300:
        return SENT
    if 500 <= reply.code < 600:
        return FAIL
    return DEFER  # 4xx, and anything unexpected: a retry is never wrong, a bounce can be


def next_delay(attempts: int, settings: DeliverySettings) -> float:
    """Seconds until the next try after ``attempts`` failed tries: exponential, capped."""
    return min(settings.retry_max, settings.retry_base * settings.retry_factor ** max(0, attempts - 1))


def expired(received_at: float, now: float, settings: DeliverySettings) -> bool:
    return now - received_at >= settings.queue_lifetime
