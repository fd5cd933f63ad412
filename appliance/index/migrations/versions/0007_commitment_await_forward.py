"""Storage Commitment tied to forwarding: the destination a report awaits.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("commitment_report") as batch:
        batch.add_column(sa.Column("await_destination", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("commitment_report") as batch:
        batch.drop_column("await_destination")
