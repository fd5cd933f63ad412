"""The Alembic migrations build exactly the tables the code declares."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text

from appliance.errors import SchemaNotCurrent
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.schema import metadata

pytestmark = pytest.mark.integration


def test_migrated_database_matches_the_declared_schema(index_engine: Engine) -> None:
    with index_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert migrate.current_revision(index_engine) == migrate.head_revision()
    assert migrate.stored_revision(index_engine) == migrate.head_revision()
    migrate.require_current(index_engine)


def test_the_expected_revision_is_the_newest_script() -> None:
    """SCHEMA_REVISION (what workers check, without Alembic) is the head of
    the migration scripts."""
    assert migrate.head_revision() == migrate.SCHEMA_REVISION


def test_an_older_revision_is_refused_naming_it(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    migrate.upgrade(engine, "0003")
    assert migrate.stored_revision(engine) == "0003"
    with pytest.raises(SchemaNotCurrent, match="at revision 0003 but this version needs"):
        migrate.require_current(engine)
    engine.dispose()


def test_an_empty_database_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'sub' / 'index.db'}")
    with pytest.raises(SchemaNotCurrent, match="dicom-appliance migrate"):
        migrate.require_current(engine)
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # idempotent
    migrate.require_current(engine)
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()
