"""The operator dashboard's data (issue 10): the protocol each instance came
by, an index for "received per hour", and the log of DIMSE associations.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # instances stored before came by an unknown protocol: "" (reindex reads
    # "dimse" back from a File Meta this appliance wrote for a C-STORE)
    with op.batch_alter_table("instance") as batch:
        batch.add_column(
            sa.Column("source_protocol", sa.String(length=16), nullable=False, server_default="")
        )
    # instances received per hour: a range of created_at
    op.create_index(op.f("ix_instance_created_at"), "instance", ["created_at"], unique=False)
    op.create_table(
        "association_log",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("tls", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=200), nullable=False),
        sa.Column("stored", sa.Integer(), nullable=False),
        sa.Column("store_failed", sa.Integer(), nullable=False),
        sa.Column("finds", sa.Integer(), nullable=False),
        sa.Column("retrieves", sa.Integer(), nullable=False),
        sa.Column("echoes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_association_log")),
    )
    op.create_index(
        op.f("ix_association_log_started_at"), "association_log", ["started_at"], unique=False
    )


def downgrade() -> None:
    op.drop_table("association_log")
    op.drop_index(op.f("ix_instance_created_at"), table_name="instance")
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("source_protocol")
