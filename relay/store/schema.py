"""Table definitions: the queue (messages, recipients) and the timeline (events).

Times are UTC epoch seconds (float): the same type, ordering and index behaviour on SQLite and PostgreSQL.
Recipient states are explicit, as in Postfix's queues: queued (fresh) -> active (claimed by a worker,
lease in claimed_until) -> sent | deferred (retry at next_attempt_at) | failed | suppressed.
"""

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()


def address_key(address: str) -> str:
    """How an address is keyed in every address_key column (timeline, suppressions, caps, follow-ups)."""
    return address.strip().strip("<>").lower()


# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for a long-lived log.
BigId = BigInteger().with_variant(Integer(), "sqlite")

QUEUED, ACTIVE, DEFERRED, SENT, FAILED, SUPPRESSED = (
    "queued",
    "active",
    "deferred",
    "sent",
    "failed",
    "suppressed",
)
PENDING = (QUEUED, DEFERRED, ACTIVE)
FINAL = (SENT, FAILED, SUPPRESSED)

messages = Table(
    "messages",
    metadata,
    Column("queue_id", String(32), primary_key=True),
    Column("received_at", Double, nullable=False),
    Column("mail_from", Text, nullable=False),
    Column("source", String(255), nullable=False),
    Column("client_addr", String(64), nullable=False),
    Column("helo", String(255), nullable=False, default=""),
    Column("message_id", Text, nullable=False, default=""),
    Column("subject", Text, nullable=False, default=""),
    Column("size", Integer, nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("dkim", String(16), nullable=True),
    Column("transform_error", Text, nullable=True),
    Index("ix_messages_received_at", "received_at"),
    Index("ix_messages_message_id", "message_id", postgresql_using="hash"),
)

recipients = Table(
    "recipients",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("queue_id", String(32), ForeignKey("messages.queue_id", ondelete="CASCADE"), nullable=False),
    Column("address", Text, nullable=False),
    Column("address_key", String(320), nullable=False),  # lower-cased, for the timeline
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Double, nullable=False),
    Column("claimed_until", Double, nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("crashes", Integer, nullable=False, default=0),
    Column("last_reply", Text, nullable=True),
    Column("updated_at", Double, nullable=False),
    Column("skin", String(64), nullable=True),
    Column("blocks", Text, nullable=True),  # JSON list of block names
    Column("report", Text, nullable=True),  # JSON transform report
    Index("ix_recipients_due", "status", "next_attempt_at"),
    Index("ix_recipients_address", "address_key", "id"),
    Index("ix_recipients_queue_id", "queue_id"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("queue_id", String(32), nullable=False),
    Column("address_key", String(320), nullable=False),
    Column("at", Double, nullable=False),
    Column("kind", String(24), nullable=False),
    Column("detail", Text, nullable=True),
    Index("ix_events_address", "address_key", "at"),
    Index("ix_events_queue_id", "queue_id"),
)

# -- what the rules remember per recipient (relay.store.ledger): suppressions, offers, sends, follow-ups

suppressions = Table(
    "suppressions",
    metadata,
    Column("address_key", String(320), primary_key=True),
    Column("address", Text, nullable=False),
    Column("reason", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("created_at", Double, nullable=False),
)
offers = Table(
    "offers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("address_key", String(320), nullable=False),
    Column("queue_id", String(32), nullable=False),
    Column("block", String(64), nullable=False),
    Column("product", String(128), nullable=False),
    Column("at", Double, nullable=False),
    Index("ix_offers_address_product", "address_key", "product", "at"),
    Index("ix_offers_queue_id", "queue_id"),
)
rule_sends = Table(
    "rule_sends",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("address_key", String(320), nullable=False),
    Column("queue_id", String(32), nullable=False),
    Column("category", String(32), nullable=False),
    Column("kind", String(64), nullable=True),
    Column("rules_version", String(32), nullable=True),
    Column("at", Double, nullable=False),
    Index("ix_rule_sends_address", "address_key", "category", "at"),
    Index("ix_rule_sends_queue_id", "queue_id"),
)
followups = Table(
    "followups",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("address_key", String(320), nullable=False),
    Column("address", Text, nullable=False),
    Column("name", String(64), nullable=False),
    Column("queue_id", String(32), nullable=False),
    Column("due_at", Double, nullable=False),
    Column("status", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("result", Text, nullable=True),
    UniqueConstraint("queue_id", "address_key", "name", name="uq_followups_origin"),
    Index("ix_followups_due", "status", "due_at"),
    Index("ix_followups_address", "address_key", "status"),
)
