"""Listing, deleting and the change feed in the core, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, func, select

from appliance.config import IngestConfig
from appliance.delete import DeleteService
from appliance.errors import NotFound
from appliance.index.schema import instance, patient, request_attribute, series, study
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Origin
from appliance.retrieve import RetrieveService
from appliance.status import Status
from appliance.storage.filesystem import FilesystemBlobStore

pytestmark = pytest.mark.integration

ORIGIN = Origin("dicomweb")


class Site:
    def __init__(self, engine: Engine, root: Path, policy: str = "keep") -> None:
        self.engine = engine
        self.root = root
        self.index = SqlIndex(engine)
        self.storage = FilesystemBlobStore(root)
        self.ingest = IngestService(self.storage, self.index, IngestConfig(policy))
        self.retrieve = RetrieveService(self.index, self.storage)
        self.deleter = DeleteService(self.index, self.storage)

    def store(
        self,
        study_uid: str,
        series_uid: str,
        *,
        sop_uid: str | None = None,
        series_number: int | None = None,
        instance_number: int | None = None,
        patient_id: str = "P1",
        items: int = 0,
    ) -> str:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = sop_uid or generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = patient_id
        if series_number is not None:
            ds.SeriesNumber = series_number
        if instance_number is not None:
            ds.InstanceNumber = instance_number
        if items:
            entries = []
            for i in range(items):
                item = Dataset()
                item.ScheduledProcedureStepID = f"SPS{i}"
                entries.append(item)
            ds.RequestAttributesSequence = entries
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        result = self.ingest.store_part10(io.BytesIO(buf.getvalue()), ORIGIN)
        assert result.status in (Status.SUCCESS, Status.DUPLICATE_INSTANCE_KEPT), result.reason
        return str(ds.SOPInstanceUID)

    def count(self, table: object) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]

    def blobs(self) -> int:
        return sum(1 for p in self.root.rglob("*") if p.is_file())


@pytest.fixture
def site(index_engine: Engine, tmp_path: Path) -> Site:
    return Site(index_engine, tmp_path / "blobs")


def test_instances_come_in_series_then_instance_number_order(site: Site) -> None:
    st, se1, se2 = generate_uid(), generate_uid(), generate_uid()
    late = site.store(st, se2, series_number=2, instance_number=1)
    b = site.store(st, se1, series_number=1, instance_number=2)
    a = site.store(st, se1, series_number=1, instance_number=1)
    unnumbered = site.store(st, se1, series_number=1)
    got = [i.sop_instance_uid for i in site.retrieve.instances(st)]
    assert got == [a, b, unnumbered, late]
    assert [i.sop_instance_uid for i in site.retrieve.instances(st, se2)] == [late]
    (one,) = site.retrieve.instances(st, se1, b)
    assert one.series_instance_uid == se1
    assert one.updated_at is not None
    with site.retrieve.open(one) as fh:
        assert fh.read(132)[128:] == b"DICM"
    with site.retrieve.open_range(one, 128, 4) as fh:
        assert fh.read() == b"DICM"


@pytest.mark.parametrize(
    "where",
    [
        ("2.25.1", None, None),
        ("STUDY", "2.25.2", None),
        ("STUDY", "SERIES", "2.25.3"),
    ],
)
def test_unknown_uids_are_not_found(site: Site, where: tuple[str, str | None, str | None]) -> None:
    st, se = generate_uid(), generate_uid()
    site.store(st, se)
    study_uid, series_uid, sop_uid = where
    study_uid = st if study_uid == "STUDY" else study_uid
    series_uid = se if series_uid == "SERIES" else series_uid
    with pytest.raises(NotFound):
        site.retrieve.instances(study_uid, series_uid, sop_uid)
    with pytest.raises(NotFound):
        site.deleter.delete(study_uid, series_uid, sop_uid)
    assert site.count(instance) == 1


def test_deleting_instances_keeps_counts_and_drops_empty_parents(site: Site) -> None:
    st, se1, se2 = generate_uid(), generate_uid(), generate_uid()
    i1 = site.store(st, se1, items=2)
    i2 = site.store(st, se1)
    i3 = site.store(st, se2)
    other_study = site.store(generate_uid(), generate_uid(), patient_id="P2")
    assert site.blobs() == 4

    site.deleter.delete(st, se1, i1)
    with site.engine.connect() as conn:
        assert conn.execute(
            select(study.c.num_series, study.c.num_instances).where(
                study.c.study_instance_uid == st
            )
        ).one() == (2, 2)
    assert site.blobs() == 3

    site.deleter.delete(st, se1, i2)  # the series is now empty: gone, items too
    assert site.count(series) == 2
    assert site.count(request_attribute) == 0
    with site.engine.connect() as conn:
        assert conn.execute(
            select(study.c.num_series, study.c.num_instances).where(
                study.c.study_instance_uid == st
            )
        ).one() == (1, 1)

    removed = site.deleter.delete(st)  # the study, and its patient P1
    assert [r.sop_instance_uid for r in removed] == [i3]
    assert site.count(study) == 1
    with site.engine.connect() as conn:
        assert conn.execute(select(patient.c.patient_id)).scalars().all() == ["P2"]
    assert site.blobs() == 1
    assert [
        i.sop_instance_uid
        for i in site.retrieve.instances(
            site.retrieve.index.find_instance(other_study).study_instance_uid
        )
    ] == [other_study]  # type: ignore[union-attr]


def test_change_feed_records_create_replace_and_delete(
    index_engine: Engine, tmp_path: Path
) -> None:
    site = Site(index_engine, tmp_path / "blobs", policy="replace")
    st, se = generate_uid(), generate_uid()
    a = site.store(st, se)
    b = site.store(st, se)
    site.store(st, se, sop_uid=a)  # replaced
    feed = site.index.changes(after=0, limit=100)
    assert [(e.sop_instance_uid, e.action, e.state) for e in feed] == [
        (a, "create", "replaced"),
        (b, "create", "current"),
        (a, "create", "current"),
    ]
    site.deleter.delete(st, se, a)
    feed = site.index.changes(after=0, limit=100)
    assert [(e.sop_instance_uid, e.action, e.state) for e in feed] == [
        (a, "create", "deleted"),
        (b, "create", "current"),
        (a, "create", "deleted"),
        (a, "delete", "deleted"),
    ]
    sequences = [e.sequence for e in feed]
    assert sequences == sorted(sequences)
    # offset is exclusive; limit caps
    assert [e.sequence for e in site.index.changes(after=sequences[1], limit=1)] == [sequences[2]]
    latest = site.index.latest_change()
    assert latest is not None
    assert latest.sequence == sequences[-1]
    assert latest.study_instance_uid == st


def test_empty_feed(site: Site) -> None:
    assert site.index.changes(after=0, limit=10) == []
    assert site.index.latest_change() is None


def test_a_polling_reader_never_misses_an_entry(site: Site) -> None:
    """Writers commit concurrently while a reader polls "after the last
    sequence I saw": every entry that ends up in the feed must have been
    seen.  Without ordered commits (PostgreSQL) a later sequence number can
    become visible first and the reader would step over the earlier one."""
    stop = threading.Event()
    seen: list[int] = []

    def read() -> None:
        last = 0
        while True:
            done = stop.is_set()
            for entry in site.index.changes(after=last, limit=1000):
                seen.append(entry.sequence)
                last = entry.sequence
            if done:
                return

    def write(n: int) -> None:
        study_uid = generate_uid()
        for _ in range(n):
            site.store(study_uid, generate_uid())

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(15,)) for _ in range(6)]
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    stop.set()
    reader.join(timeout=60)
    everything = [e.sequence for e in site.index.changes(after=0, limit=10_000)]
    assert len(everything) == 90
    assert seen == everything
