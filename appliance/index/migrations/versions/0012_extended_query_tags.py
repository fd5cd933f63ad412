"""Extended query tags (issue 11): the tags, their re-index operations, one
typed value table per VR family, and the values that failed validation.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TZ = sa.DateTime(timezone=True)


def _value_table(name: str, *columns: sa.Column[object]) -> None:
    match = columns[-1].name
    op.create_table(
        name,
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("tag_key", ID, nullable=False),
        sa.Column("study_fk", ID, nullable=False),
        sa.Column("series_fk", ID, nullable=False),
        sa.Column("instance_fk", ID, nullable=False),
        *columns,
        sa.ForeignKeyConstraint(
            ["instance_fk"],
            ["instance.id"],
            name=op.f(f"fk_{name}_instance_fk_instance"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tag_key"],
            ["extended_query_tag.key"],
            name=op.f(f"fk_{name}_tag_key_extended_query_tag"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{name}")),
    )
    for column in ("study_fk", "series_fk", "instance_fk"):
        op.create_index(op.f(f"ix_{name}_{column}"), name, [column], unique=False)
    # PostgreSQL: the pattern operator class serves a LIKE prefix as well as
    # "=" (as migration 0004 does for the standard keys)
    ops = {match: "varchar_pattern_ops"} if match == "value_norm" else {}
    op.create_index(
        op.f(f"ix_{name}_tag_key_{match}"),
        name,
        ["tag_key", match],
        unique=False,
        postgresql_ops=ops,
    )


def upgrade() -> None:
    op.create_table(
        "extended_query_tag",
        sa.Column("key", ID, autoincrement=True, nullable=False),
        sa.Column("path", sa.String(length=8), nullable=False),
        sa.Column("vr", sa.String(length=2), nullable=False),
        sa.Column("private_creator", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("query_status", sa.String(length=16), nullable=False),
        sa.Column("error_count", sa.Integer(), nullable=False),
        sa.Column("operation_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_extended_query_tag")),
        sa.UniqueConstraint("path", name=op.f("uq_extended_query_tag_path")),
    )
    op.create_table(
        "eqt_operation",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("tag_paths", sa.String(length=1024), nullable=False),
        sa.Column("cursor", ID, nullable=False),
        sa.Column("end_id", ID, nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eqt_operation")),
    )
    op.create_index(op.f("ix_eqt_operation_status"), "eqt_operation", ["status"], unique=False)
    _value_table(
        "eqt_string",
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.Column("value_norm", sa.String(length=1024), nullable=False),
    )
    _value_table("eqt_long", sa.Column("value", sa.BigInteger(), nullable=False))
    _value_table("eqt_double", sa.Column("value", sa.Float(), nullable=False))
    _value_table(
        "eqt_datetime",
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.Column("value_key", sa.String(length=64), nullable=False),
    )
    op.create_table(
        "eqt_error",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("tag_key", ID, nullable=False),
        sa.Column("instance_fk", ID, nullable=False),
        sa.Column("message", sa.String(length=256), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_fk"],
            ["instance.id"],
            name=op.f("fk_eqt_error_instance_fk_instance"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tag_key"],
            ["extended_query_tag.key"],
            name=op.f("fk_eqt_error_tag_key_extended_query_tag"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eqt_error")),
        sa.UniqueConstraint(
            "tag_key", "instance_fk", name=op.f("uq_eqt_error_tag_key_instance_fk")
        ),
    )
    op.create_index(op.f("ix_eqt_error_instance_fk"), "eqt_error", ["instance_fk"], unique=False)


def downgrade() -> None:
    for name in ("eqt_error", "eqt_datetime", "eqt_double", "eqt_long", "eqt_string"):
        op.drop_table(name)
    op.drop_table("eqt_operation")
    op.drop_table("extended_query_tag")
