"""Rules ledger: suppressions, offers log, sends log (caps), follow-ups.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("address_key", sa.String(320), primary_key=True),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "offers",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("block", sa.String(64), nullable=False),
        sa.Column("product", sa.String(128), nullable=False),
        sa.Column("at", sa.Double, nullable=False),
    )
    op.create_index("ix_offers_address_product", "offers", ["address_key", "product", "at"])
    op.create_index("ix_offers_queue_id", "offers", ["queue_id"])
    op.create_table(
        "rule_sends",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("category", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(64), nullable=True),
        sa.Column("rules_version", sa.String(32), nullable=True),
        sa.Column("at", sa.Double, nullable=False),
    )
    op.create_index("ix_rule_sends_address", "rule_sends", ["address_key", "category", "at"])
    op.create_index("ix_rule_sends_queue_id", "rule_sends", ["queue_id"])
    op.create_table(
        "followups",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("due_at", sa.Double, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("result", sa.Text, nullable=True),
        sa.UniqueConstraint("queue_id", "address_key", "name", name="uq_followups_origin"),
    )
    op.create_index("ix_followups_due", "followups", ["status", "due_at"])
    op.create_index("ix_followups_address", "followups", ["address_key", "status"])


def downgrade() -> None:
    op.drop_table("followups")
    op.drop_table("rule_sends")
    op.drop_table("offers")
    op.drop_table("suppressions")
