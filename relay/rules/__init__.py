"""Business rules: rule files in rules/ -> per-message, per-recipient decisions (see rules/README.md).

Public face: RuleBook.load(...).decide(MessageFacts.from_raw(...), recipient, ledger, now) -> RuleDecision.
"""

from .book import FollowupRequest, RuleBook, RuleDecision, render_followup
from .catalog import Catalog, Product
from .check import check
from .errors import RuleError
from .facts import MessageFacts
from .tokens import BadToken, list_unsubscribe_headers, load_or_create_secret, make_token, verify_token

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
