"""The Alembic migrations build exactly the tables the code declares."""

from __future__ import annotations

import datetime as dt
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


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_index_of_the_previous_revision_keeps_its_data_through_migrate(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index made and filled at the revision before this version's (as
    the previous release left it), upgraded by ``dicom-appliance migrate``:
    every row is still there and the new tables work on the old data."""
    import io
    from contextlib import ExitStack

    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from sqlalchemy import func, select

    from appliance.cli import main
    from appliance.config import IngestConfig
    from appliance.fhir.queue import StudyQueue
    from appliance.index.schema import changefeed, instance, series, study
    from appliance.index.sql import SqlIndex
    from appliance.ingest import IngestService
    from appliance.model import Origin
    from appliance.storage.filesystem import FilesystemBlobStore
    from tests.conftest import throwaway_pg_database
    from tests.helpers import part10_of, small_study

    with ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'index.db'}"
        else:
            url = stack.enter_context(throwaway_pg_database("upgrade"))
        engine = create_index_engine(url)
        stack.callback(engine.dispose)
        previous = f"{int(migrate.head_revision()) - 1:04d}"
        migrate.upgrade(engine, previous)
        ingest = IngestService(
            FilesystemBlobStore(tmp_path / "blobs"), SqlIndex(engine), IngestConfig()
        )
        ct = dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
        for ds in [ct, *small_study(4, "UPGRADE-1")]:
            result = ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("dicomweb"))
            assert result.stored, result

        def content() -> list[object]:
            with engine.connect() as conn:
                return [
                    conn.execute(select(func.count()).select_from(table)).scalar()
                    for table in (study, series, instance, changefeed)
                ] + sorted(conn.execute(select(instance.c.sop_instance_uid)).scalars())

        before = content()
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("APPLIANCE_INDEX_URL", url)
        assert main(["migrate"]) == 0
        assert migrate.stored_revision(engine) == migrate.head_revision()
        assert content() == before
        assert StudyQueue(engine).pull(dt.timedelta(0)) == 5
        assert main(["migrate"]) == 0  # nothing left to do
