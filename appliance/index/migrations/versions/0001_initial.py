"""The initial index: patient, study, series (+ request attributes), instance,
change feed.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "changefeed",
        sa.Column("sequence", ID, autoincrement=True, nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("sequence", name=op.f("pk_changefeed")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_changefeed_sop_instance_uid"), "changefeed", ["sop_instance_uid"], unique=False
    )
    op.create_table(
        "patient",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("patient_name", sa.String(length=1024), nullable=False),
        sa.Column("patient_name_norm", sa.String(length=1024), nullable=False),
        sa.Column("patient_birth_date", sa.String(length=64), nullable=False),
        sa.Column("patient_sex", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            name=op.f("uq_patient_patient_id_issuer_of_patient_id"),
        ),
    )
    op.create_index(
        op.f("ix_patient_patient_name_norm"), "patient", ["patient_name_norm"], unique=False
    )
    op.create_table(
        "study",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("patient_fk", ID, nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=64), nullable=False),
        sa.Column("study_time", sa.String(length=64), nullable=False),
        sa.Column("study_time_key", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("study_id", sa.String(length=64), nullable=False),
        sa.Column("study_description", sa.String(length=1024), nullable=False),
        sa.Column("referring_physician_name", sa.String(length=1024), nullable=False),
        sa.Column("referring_physician_name_norm", sa.String(length=1024), nullable=False),
        sa.Column("timezone_offset_from_utc", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("patient_name", sa.String(length=1024), nullable=False),
        sa.Column("patient_name_norm", sa.String(length=1024), nullable=False),
        sa.Column("patient_birth_date", sa.String(length=64), nullable=False),
        sa.Column("patient_sex", sa.String(length=64), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_fk"], ["patient.id"], name=op.f("fk_study_patient_fk_patient")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_study_study_instance_uid")),
    )
    op.create_index(op.f("ix_study_accession_number"), "study", ["accession_number"], unique=False)
    op.create_index(op.f("ix_study_patient_fk"), "study", ["patient_fk"], unique=False)
    op.create_index(op.f("ix_study_patient_id"), "study", ["patient_id"], unique=False)
    op.create_index(
        op.f("ix_study_patient_name_norm"), "study", ["patient_name_norm"], unique=False
    )
    op.create_index(op.f("ix_study_study_date"), "study", ["study_date"], unique=False)
    op.create_table(
        "series",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("study_fk", ID, nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=64), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=1024), nullable=False),
        sa.Column("body_part_examined", sa.String(length=64), nullable=False),
        sa.Column("performed_procedure_step_start_date", sa.String(length=64), nullable=False),
        sa.Column("performed_procedure_step_start_time", sa.String(length=64), nullable=False),
        sa.Column("performed_procedure_step_start_time_key", sa.String(length=64), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_fk"], ["study.id"], name=op.f("fk_series_study_fk_study")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
    )
    op.create_index(op.f("ix_series_modality"), "series", ["modality"], unique=False)
    op.create_index(op.f("ix_series_study_fk"), "series", ["study_fk"], unique=False)
    op.create_table(
        "instance",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("series_fk", ID, nullable=False),
        sa.Column("study_fk", ID, nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("bits_allocated", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("specific_character_set", sa.String(length=64), nullable=False),
        sa.Column("blob_key", sa.String(length=128), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_fk"], ["series.id"], name=op.f("fk_instance_series_fk_series")
        ),
        sa.ForeignKeyConstraint(
            ["study_fk"], ["study.id"], name=op.f("fk_instance_study_fk_study")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance")),
        sa.UniqueConstraint("blob_key", name=op.f("uq_instance_blob_key")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instance_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instance_series_fk"), "instance", ["series_fk"], unique=False)
    op.create_index(op.f("ix_instance_sop_class_uid"), "instance", ["sop_class_uid"], unique=False)
    op.create_index(op.f("ix_instance_study_fk"), "instance", ["study_fk"], unique=False)
    op.create_table(
        "request_attribute",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("series_fk", ID, nullable=False),
        sa.Column("scheduled_procedure_step_id", sa.String(length=64), nullable=False),
        sa.Column("requested_procedure_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_fk"], ["series.id"], name=op.f("fk_request_attribute_series_fk_series")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_attribute")),
    )
    op.create_index(
        op.f("ix_request_attribute_requested_procedure_id"),
        "request_attribute",
        ["requested_procedure_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_request_attribute_scheduled_procedure_step_id"),
        "request_attribute",
        ["scheduled_procedure_step_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_request_attribute_series_fk"), "request_attribute", ["series_fk"], unique=False
    )


def downgrade() -> None:
    for table in ("changefeed", "instance", "request_attribute", "series", "study", "patient"):
        op.drop_table(table)
