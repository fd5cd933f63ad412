"""Retention on SQLite and PostgreSQL: by age, never a study with an instance
waiting to be forwarded or stored since the run began, deletions not
forwarded but in the change feed; and to a free-space target on a real small
disk (a tmpfs)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select, update

from appliance.config import ForwardConfig, IngestConfig, RetentionConfig
from appliance.forward.routes import Routes
from appliance.index.schema import changefeed, forward_entry, instance, study
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Origin
from appliance.retention import Retention
from appliance.storage.filesystem import FilesystemBlobStore
from tests.helpers import part10_of, small_study
from tests.integration.test_observability import small_disk

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


@dataclasses.dataclass
class Site:
    engine: Engine
    index: SqlIndex
    storage: FilesystemBlobStore
    ingest: IngestService

    def store(self, ds: Dataset) -> None:
        result = self.ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("dicomweb"))
        assert result.stored, result

    def age(self, study_uid: str, days: float) -> None:
        """Make everything stored in the study *days* old."""
        when = NOW - dt.timedelta(days=days)
        with self.engine.begin() as conn:
            study_id = conn.execute(
                select(study.c.id).where(study.c.study_instance_uid == study_uid)
            ).scalar_one()
            conn.execute(update(study).where(study.c.id == study_id).values(updated_at=when))
            conn.execute(
                update(instance).where(instance.c.study_fk == study_id).values(updated_at=when)
            )

    def retention(self, **keys: int) -> Retention:
        return Retention(RetentionConfig(**keys), self.engine, self.index, self.storage)

    def studies(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(study.c.study_instance_uid)).scalars())


def make_site(engine: Engine, root: Path, *destinations: ForwardConfig) -> Site:
    index = SqlIndex(engine)
    storage = FilesystemBlobStore(root)
    return Site(
        engine, index, storage, IngestService(storage, index, IngestConfig(), Routes(destinations))
    )


def test_old_studies_go_and_the_rest_stay(index_engine: Engine, tmp_path: Path) -> None:
    site = make_site(index_engine, tmp_path / "blobs")
    old, recent = small_study(3, "RET-OLD"), small_study(2, "RET-NEW")
    for ds in [*old, *recent]:
        site.store(ds)
    site.age(old[0].StudyInstanceUID, 40)
    site.age(recent[0].StudyInstanceUID, 10)
    blobs_before = {p for p in (tmp_path / "blobs").rglob("*") if p.is_file()}

    dry = site.retention(max_age_days=30).run(dry_run=True)
    assert dry.deleted == [old[0].StudyInstanceUID]
    assert len(site.studies()) == 2

    report = site.retention(max_age_days=30).run()
    assert report.deleted == [old[0].StudyInstanceUID]
    assert (report.studies, report.instances) == (1, 3)
    assert site.studies() == {recent[0].StudyInstanceUID}
    blobs_after = {p for p in (tmp_path / "blobs").rglob("*") if p.is_file()}
    assert len(blobs_before - blobs_after) == 3
    with index_engine.connect() as conn:
        deletes = conn.execute(
            select(changefeed.c.sop_instance_uid).where(changefeed.c.action == "delete")
        ).scalars()
        assert set(deletes) == {ds.SOPInstanceUID for ds in old}


def test_a_study_waiting_to_be_forwarded_is_kept_and_deletions_are_not_forwarded(
    index_engine: Engine, tmp_path: Path
) -> None:
    cloud = dataclasses.replace(ForwardConfig(), name="cloud", url="http://127.0.0.1:9/x")
    site = make_site(index_engine, tmp_path / "blobs", cloud)
    waiting = small_study(2, "RET-WAIT")
    for ds in waiting:
        site.store(ds)
    site.age(waiting[0].StudyInstanceUID, 100)

    report = site.retention(max_age_days=30).run()
    assert report.kept_busy == 1
    assert report.studies == 0
    assert site.studies() == {waiting[0].StudyInstanceUID}

    with index_engine.begin() as conn:  # the upstream took them
        conn.execute(update(forward_entry).values(state="delivered"))
    report = site.retention(max_age_days=30).run()
    assert report.studies == 1
    assert site.studies() == set()
    with index_engine.connect() as conn:
        actions = set(conn.execute(select(forward_entry.c.action)).scalars())
    assert actions == {"store"}  # no delete queued for the cloud


def test_an_instance_stored_since_the_run_began_keeps_its_study(
    index_engine: Engine, tmp_path: Path
) -> None:
    site = make_site(index_engine, tmp_path / "blobs")
    study_ = small_study(2, "RET-LATE")
    site.store(study_[0])
    site.age(study_[0].StudyInstanceUID, 100)
    site.store(study_[1])  # arrives as the run is under way (stored "now")
    with index_engine.begin() as conn:  # the study row as the run's page read it
        conn.execute(update(study).values(updated_at=NOW - dt.timedelta(days=100)))
    report = site.retention(max_age_days=30).run(now=NOW - dt.timedelta(seconds=5))
    assert report.kept_busy == 1
    assert len(site.studies()) == 1


def test_the_oldest_go_until_the_free_space_target_is_met(
    index_engine: Engine, tmp_path: Path
) -> None:
    """Four studies of 6 MB on a 40 MB tmpfs; the target 8 to 9 MB more than
    what is free: the two oldest go, the newer two stay."""
    with small_disk(tmp_path / "disk", 40) as disk:
        site = make_site(index_engine, disk / "blobs")
        studies = [small_study(3, f"RET-FREE-{n}", size=1024) for n in range(4)]
        for number, one in enumerate(studies):
            for ds in one:
                site.store(ds)
            site.age(one[0].StudyInstanceUID, 40 - number)  # the first is the oldest
        target_mb = -(-(site.storage.free_bytes() + 8 * 2**20) // 2**20)  # rounded up
        report = site.retention(free_target_mb=target_mb).run()
        assert report.deleted == [studies[0][0].StudyInstanceUID, studies[1][0].StudyInstanceUID]
        assert report.short_of_target is None
        assert site.storage.free_bytes() >= target_mb * 2**20
        assert site.studies() == {studies[2][0].StudyInstanceUID, studies[3][0].StudyInstanceUID}

        # a target it cannot reach: everything idle goes, and it says so
        report = site.retention(free_target_mb=100).run()
        assert report.studies == 2
        assert report.short_of_target is not None


def test_the_command_reports_and_dry_run_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance.cli import main
    from appliance.index import migrate
    from appliance.index.engine import create_index_engine

    url = f"sqlite:///{tmp_path / 'index.db'}"
    engine = create_index_engine(url)
    migrate.upgrade(engine)
    site = make_site(engine, tmp_path / "blobs")
    old = small_study(2, "RET-CLI")
    for ds in old:
        site.store(ds)
    site.age(old[0].StudyInstanceUID, 90)
    monkeypatch.chdir(tmp_path)
    for key, value in {
        "APPLIANCE_INDEX_URL": url,
        "APPLIANCE_STORAGE_PATH": str(tmp_path / "blobs"),
        "APPLIANCE_RETENTION_MAX_AGE_DAYS": "30",
    }.items():
        monkeypatch.setenv(key, value)
    assert main(["retention", "run", "--dry-run"]) == 0
    assert "would delete 1 study, 2 instance(s)" in capsys.readouterr().out
    assert site.studies() == {old[0].StudyInstanceUID}
    assert main(["retention", "run", "--json"]) == 0
    assert '"studies": 1' in capsys.readouterr().out
    assert site.studies() == set()
    monkeypatch.setenv("APPLIANCE_RETENTION_MAX_AGE_DAYS", "0")
    assert main(["retention", "run"]) == 0
    assert "retention is off" in capsys.readouterr().out
    engine.dispose()
