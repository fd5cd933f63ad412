"""DICOMcast: the change-feed cursor and the studies to publish to FHIR.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "feed_cursor",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("sequence", ID, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_feed_cursor")),
    )
    op.create_table(
        "fhir_study",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.String(length=1024), nullable=True),
        sa.Column("imaging_study", sa.String(length=128), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", name=op.f("pk_fhir_study")),
    )
    op.create_index(
        op.f("ix_fhir_study_state_next_attempt_at"),
        "fhir_study",
        ["state", "next_attempt_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_fhir_study_state_next_attempt_at"), table_name="fhir_study")
    op.drop_table("fhir_study")
    op.drop_table("feed_cursor")
