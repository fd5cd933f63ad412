"""WADO-RS metadata cache: each instance's DICOM JSON (``metadata_cache``).

The table starts empty and fills on metadata requests, so the upgrade is
quick on any index; the downgrade loses nothing but cached copies.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "metadata_cache",
        sa.Column("instance_fk", ID, autoincrement=False, nullable=False),
        sa.Column("blob_key", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("json", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_fk"],
            ["instance.id"],
            name=op.f("fk_metadata_cache_instance_fk_instance"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_fk", name=op.f("pk_metadata_cache")),
        sa.UniqueConstraint("blob_key", name=op.f("uq_metadata_cache_blob_key")),
    )


def downgrade() -> None:
    op.drop_table("metadata_cache")
