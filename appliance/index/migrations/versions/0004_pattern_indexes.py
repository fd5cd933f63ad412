"""PostgreSQL: the indexes of the columns matched with wild cards use the
``varchar_pattern_ops`` operator class.

QIDO-RS and C-FIND match PatientName, PatientID and AccessionNumber with
``LIKE`` (PS3.4 C.2.2.2.4 Wild Card Matching, e.g. the prefix search
``PatientName=SMI*``).  PostgreSQL uses a B-tree index of the default
operator class for ``LIKE 'smi%'`` only in a database with the ``C``
collation; in any other (``C.UTF-8``, ``en_US.UTF-8``...) such a search
reads the whole table.  An index of ``varchar_pattern_ops`` serves ``LIKE``
prefixes in every collation, and equality as well (PostgreSQL documentation,
"Operator Classes and Operator Families"); these columns are never compared
with ``<`` or ``>`` nor sorted, so the default operator class is replaced
rather than kept beside it (one index per column for the ingest to update).

SQLite needs nothing: with ``case_sensitive_like`` on (see
:mod:`appliance.index.engine`) its plain indexes already serve ``LIKE``
prefixes.  The indexes keep their names, so the upgrade is the same index
rebuilt; it holds a lock on each table while it builds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: (table, column) of the indexes rebuilt.
PATTERN_INDEXES = (
    ("patient", "patient_name_norm"),
    ("study", "patient_name_norm"),
    ("study", "patient_id"),
    ("study", "accession_number"),
)


def _rebuild(pattern_ops: bool) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in PATTERN_INDEXES:
        name = op.f(f"ix_{table}_{column}")
        op.drop_index(name, table_name=table)
        op.create_index(
            name,
            table,
            [column],
            unique=False,
            postgresql_ops={column: "varchar_pattern_ops"} if pattern_ops else {},
        )


def upgrade() -> None:
    _rebuild(pattern_ops=True)


def downgrade() -> None:
    _rebuild(pattern_ops=False)
