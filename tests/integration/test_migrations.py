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


#: An index made by the previous version (schema 0008, before the sending
#: AE was kept): CT_small stored by STOW-RS and four generated instances by
#: C-STORE from OLD_SCANNER, with their blobs.
PREVIOUS_INDEX = Path(__file__).parents[1] / "data" / "index-0008"


def test_an_index_made_by_the_previous_version_keeps_its_data_through_migrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous version's own index file, upgraded by ``dicom-appliance
    migrate``: every row is still there, what the old schema did not keep is
    empty (not guessed), and the appliance stores and answers on it."""
    import io
    import shutil

    from sqlalchemy import func, select

    from appliance.cli import main
    from appliance.config import IngestConfig
    from appliance.fhir.queue import StudyQueue
    from appliance.index.schema import changefeed, instance, series, study
    from appliance.index.sql import SqlIndex
    from appliance.ingest import IngestService
    from appliance.model import Origin
    from appliance.storage.filesystem import FilesystemBlobStore
    from tests.helpers import part10_of, small_study

    shutil.copytree(PREVIOUS_INDEX, tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'data' / 'index.db'}"
    engine = create_index_engine(url)
    assert migrate.stored_revision(engine) == "0008"

    def content() -> list[object]:
        with engine.connect() as conn:
            return [
                conn.execute(select(func.count()).select_from(table)).scalar()
                for table in (study, series, instance, changefeed)
            ] + sorted(conn.execute(select(instance.c.sop_instance_uid)).scalars())

    before = content()
    assert before[:4] == [2, 2, 5, 5]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPLIANCE_INDEX_URL", url)
    monkeypatch.setenv("APPLIANCE_STORAGE_PATH", str(tmp_path / "data" / "blobs"))
    assert main(["migrate"]) == 0
    assert migrate.stored_revision(engine) == migrate.head_revision()
    assert content() == before
    with engine.connect() as conn:
        assert set(conn.execute(select(instance.c.source_ae)).scalars()) == {""}
    assert StudyQueue(engine).pull(dt.timedelta(0)) == 5
    storage = FilesystemBlobStore(tmp_path / "data" / "blobs")
    ingest = IngestService(storage, SqlIndex(engine), IngestConfig())
    new = small_study(1, "AFTER-UPGRADE")[0]
    result = ingest.store_part10(io.BytesIO(part10_of(new)), Origin("dimse", calling_ae="NEW"))
    assert result.stored, result
    assert main(["verify"]) == 0  # every row has its blob, every blob its row
    engine.dispose()


def test_migrations_go_down_and_up_again_with_data_on_postgresql(tmp_path: Path) -> None:
    """On PostgreSQL (whose index cannot be shipped as a file): an index
    filled at this revision, taken down to the previous one and up again,
    keeps every row."""
    import io

    from sqlalchemy import func, select

    from appliance.config import IngestConfig
    from appliance.index.schema import changefeed, instance, series, study
    from appliance.index.sql import SqlIndex
    from appliance.ingest import IngestService
    from appliance.model import Origin
    from appliance.storage.filesystem import FilesystemBlobStore
    from tests.conftest import throwaway_pg_database
    from tests.helpers import part10_of, small_study

    with throwaway_pg_database("updown") as url:
        engine = create_index_engine(url)
        try:
            migrate.upgrade(engine)
            ingest = IngestService(
                FilesystemBlobStore(tmp_path / "blobs"), SqlIndex(engine), IngestConfig()
            )
            for ds in small_study(3, "UPDOWN"):
                origin = Origin("dimse", calling_ae="PG_SCANNER")
                assert ingest.store_part10(io.BytesIO(part10_of(ds)), origin).stored

            def content() -> list[object]:
                with engine.connect() as conn:
                    return [
                        conn.execute(select(func.count()).select_from(table)).scalar()
                        for table in (study, series, instance, changefeed)
                    ]

            before = content()
            previous = f"{int(migrate.head_revision()) - 1:04d}"
            migrate.downgrade(engine, previous)
            assert migrate.stored_revision(engine) == previous
            migrate.upgrade(engine)
            assert content() == before
        finally:
            engine.dispose()


def test_sqlite_rebuilds_keep_the_rows_that_reference_the_rebuilt_tables(
    tmp_path: Path,
) -> None:
    """Migration 0013 rebuilds patient, study, series and instance on SQLite
    (their unique constraints change); the rows referencing them (metadata
    cache, extended-tag values, request attributes) survive it both ways,
    foreign keys being off while tables are rebuilt, and on again after."""
    import io

    from sqlalchemy import func, insert, select

    from appliance.config import load_config
    from appliance.index.schema import (
        eqt_string,
        instance,
        metadata_cache,
        request_attribute,
        series,
        study,
    )
    from appliance.model import Origin
    from appliance.reindex import Reindexer
    from appliance.services import build_services
    from tests.helpers import part10_of, small_study

    url = f"sqlite:///{tmp_path / 'index.db'}"
    engine = create_index_engine(url)
    migrate.upgrade(engine)
    config = load_config(
        environ={"APPLIANCE_INDEX_URL": url, "APPLIANCE_STORAGE_PATH": str(tmp_path / "blobs")},
        cwd=tmp_path,
    )
    services = build_services(config)
    try:
        services.extended.add([{"path": "ManufacturerModelName", "level": "Series"}])
        for ds in small_study(3, "REBUILD"):
            ds.ManufacturerModelName = "Scanner Z9"
            item = type(ds)()
            item.ScheduledProcedureStepID = "SPS1"
            item.RequestedProcedureID = "RP1"
            ds.RequestAttributesSequence = [item]
            assert services.ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("import")).stored
        reindex = Reindexer(
            services.engine, services.index, services.storage, services.extended, settle_seconds=0
        )
        reindex.run_pending()
    finally:
        services.close()
    with engine.begin() as conn:
        first = conn.execute(select(instance.c.id, instance.c.blob_key)).first()
        assert first is not None
        conn.execute(
            insert(metadata_cache).values(
                instance_fk=first.id, blob_key=first.blob_key, version="v", json=b"[]"
            )
        )

    def content() -> list[int]:
        with engine.connect() as conn:
            return [
                int(conn.execute(select(func.count()).select_from(table)).scalar_one())
                for table in (
                    study,
                    series,
                    instance,
                    metadata_cache,
                    eqt_string,
                    request_attribute,
                )
            ]

    before = content()
    assert before == [1, 1, 3, 1, 3, 1]
    migrate.downgrade(engine, "0012")
    with engine.connect() as conn:
        counted = [
            conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()  # noqa: S608
            for name in ("metadata_cache", "eqt_string", "request_attribute")
        ]
    assert counted == before[3:]
    migrate.upgrade(engine)
    assert content() == before
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        assert set(conn.execute(select(instance.c.partition_key)).scalars()) == {1}
    engine.dispose()
