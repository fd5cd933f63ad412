"""Data partitions (issue 11): the ``data_partition`` table with the default
partition (key 1, ``Microsoft.Default``), a ``partition_key`` on every
patient, study, series and instance row (and on the change feed, the
forwarding outbox and the Storage Commitment requests), and UIDs unique per
partition instead of overall.

Every row stored before belongs to the default partition (the column's
default).  On SQLite the four tables are rebuilt (a unique constraint cannot
be changed in place); :func:`appliance.index.migrate.upgrade` turns foreign
keys off around it, as SQLite's documentation asks, so the rebuild neither
cascades nor trips over the rows that reference them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: table -> (its old unique constraint, its columns), the same with the partition
_UNIQUE = {
    "patient": (
        "uq_patient_patient_id_issuer_of_patient_id",
        ["patient_id", "issuer_of_patient_id"],
    ),
    "study": ("uq_study_study_instance_uid", ["study_instance_uid"]),
    "series": ("uq_series_series_instance_uid", ["series_instance_uid"]),
    "instance": ("uq_instance_sop_instance_uid", ["sop_instance_uid"]),
}


#: the tables that name instances by UID and get a partition_key alone
_ALSO = ("changefeed", "forward_entry", "commitment_report")


def _partition_column() -> sa.Column[int]:
    return sa.Column("partition_key", ID, nullable=False, server_default="1")


def _new_name(table: str, columns: list[str]) -> str:
    return "uq_" + table + "_" + "_".join([*columns, "partition_key"])


def upgrade() -> None:
    table = op.create_table(
        "data_partition",
        sa.Column("key", ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_data_partition")),
        sa.UniqueConstraint("name", name=op.f("uq_data_partition_name")),
    )
    op.bulk_insert(
        table, [{"key": 1, "name": "Microsoft.Default", "created_at": dt.datetime.now(dt.UTC)}]
    )
    for name, (old, columns) in _UNIQUE.items():
        with op.batch_alter_table(name) as batch:
            batch.add_column(_partition_column())
            batch.drop_constraint(old, type_="unique")
            batch.create_unique_constraint(
                op.f(_new_name(name, columns)), [*columns, "partition_key"]
            )
    for name in _ALSO:
        with op.batch_alter_table(name) as batch:
            batch.add_column(_partition_column())


def downgrade() -> None:
    # only possible while no UID is stored in two partitions
    for name in reversed(_ALSO):
        with op.batch_alter_table(name) as batch:
            batch.drop_column("partition_key")
    for name, (old, columns) in reversed(_UNIQUE.items()):
        with op.batch_alter_table(name) as batch:
            batch.drop_constraint(op.f(_new_name(name, columns)), type_="unique")
            batch.create_unique_constraint(op.f(old), columns)
            batch.drop_column("partition_key")
    op.drop_table("data_partition")
