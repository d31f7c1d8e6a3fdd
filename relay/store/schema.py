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
)

metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for a long-lived log.
BigId = BigInteger().with_variant(Integer(), "sqlite")

QUEUED, ACTIVE, DEFERRED, SENT, FAILED, SUPPRESSED = (
    "queued", "active", "deferred", "sent", "failed", "suppressed",
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
