"""Queue and timeline: messages, recipients, events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("queue_id", sa.String(32), primary_key=True),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("mail_from", sa.Text, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("client_addr", sa.String(64), nullable=False),
        sa.Column("helo", sa.String(255), nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("dkim", sa.String(16), nullable=True),
        sa.Column("transform_error", sa.Text, nullable=True),
    )
    op.create_index("ix_messages_received_at", "messages", ["received_at"])
    op.create_index("ix_messages_message_id", "messages", ["message_id"], postgresql_using="hash")
    op.create_table(
        "recipients",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("claimed_until", sa.Double, nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("crashes", sa.Integer, nullable=False),
        sa.Column("last_reply", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("skin", sa.String(64), nullable=True),
        sa.Column("blocks", sa.Text, nullable=True),
        sa.Column("report", sa.Text, nullable=True),
    )
    op.create_index("ix_recipients_due", "recipients", ["status", "next_attempt_at"])
    op.create_index("ix_recipients_address", "recipients", ["address_key", "id"])
    op.create_index("ix_recipients_queue_id", "recipients", ["queue_id"])
    op.create_table(
        "events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_events_address", "events", ["address_key", "at"])
    op.create_index("ix_events_queue_id", "events", ["queue_id"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("recipients")
    op.drop_table("messages")
