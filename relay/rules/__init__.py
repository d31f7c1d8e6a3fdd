"""Business rules: rule files in rules/ -> per-message, per-recipient decisions (see rules/README.md).

Public face: RuleBook.load(...).decide(MessageFacts.from_raw(...), recipient, ledger, now) -> RuleDecision.

The book, the catalog and the message facts load on first use (PEP 562): the relay's main process needs
only the unsubscribe tokens, and importing the rest would cost it Jinja2, lxml and the transform
(~14 MB of RSS) that only the delivery workers use.
"""

from importlib import import_module

from .check import check
from .errors import RuleError
from .tokens import BadToken, list_unsubscribe_headers, load_or_create_secret, make_token, verify_token

_LAZY = {
    "FollowupRequest": ".book",
    "RuleBook": ".book",
    "RuleDecision": ".book",
    "render_followup": ".book",
    "Catalog": ".catalog",
    "Product": ".catalog",
    "MessageFacts": ".facts",
}

__all__ = [
    "BadToken",
    "Catalog",
    "FollowupRequest",
    "MessageFacts",
    "Product",
    "RuleBook",
    "RuleDecision",
    "RuleError",
    "check",
    "list_unsubscribe_headers",
    "load_or_create_secret",
    "make_token",
    "render_followup",
    "verify_token",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
