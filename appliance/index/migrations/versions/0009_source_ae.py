"""The Calling AE Title each instance came from (stats per sending AE,
forward replay by calling AE title).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # instances stored before are from an unknown sender: "" (reindex reads
    # it back from the File Meta this appliance wrote)
    with op.batch_alter_table("instance") as batch:
        batch.add_column(
            sa.Column("source_ae", sa.String(length=16), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("source_ae")
