"""The one ingest pipeline, on SQLite and PostgreSQL: pydicom's own test
files, duplicate policies, concurrent writers, and what a failure leaves."""

from __future__ import annotations

import datetime as dt
import io
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, func, select

from appliance.config import IngestConfig
from appliance.dicomio import is_valid_uid, normalize_da
from appliance.encoding import find_hazard, read_layout
from appliance.index.schema import changefeed, instance, series, study
from appliance.index.sql import AddOutcome, SqlIndex
from appliance.ingest import IngestResult, IngestService, sweep_orphans
from appliance.model import Origin
from appliance.status import Status
from appliance.storage.filesystem import FilesystemBlobStore

pytestmark = pytest.mark.integration

ORIGIN = Origin("dicomweb", calling_ae="", remote="127.0.0.1")
DATA = Path(pydicom.__file__).parent / "data"
CORPUS = sorted(p for p in DATA.rglob("*.dcm"))


def make_service(engine: Engine, root: Path, policy: str = "keep") -> IngestService:
    return IngestService(
        FilesystemBlobStore(root), SqlIndex(engine), IngestConfig(duplicate_policy=policy)
    )


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


def blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def ct_dataset(
    study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = "PID-1"
    ds.PatientName = "Test^Patient"
    ds.Modality = "CT"
    ds.StudyDate = "20240102"
    ds.StudyTime = "1030"
    ds.InstanceNumber = 1
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def count(engine: Engine, table: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


# ---------------------------------------------------------------- the corpus


def expected_refusal(path: Path) -> Status | None:
    """What a full, independent pydicom read says the pipeline must answer
    for this file: None if it is a valid Part 10 file with the four UIDs."""
    try:
        ds = dcmread(path)  # not forced: a file without the DICM prefix is no Part 10 file
    except pydicom.errors.InvalidDicomError:
        return Status.CANNOT_UNDERSTAND
    if "TransferSyntaxUID" not in ds.file_meta:
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    with path.open("rb") as fh:
        # an element running past the end (MR_truncated.dcm, rtplan_truncated.dcm)
        if find_hazard(fh, read_layout(fh)) is not None:
            return Status.CANNOT_UNDERSTAND
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = ds.get(keyword)
        if not isinstance(value, str) or not is_valid_uid(value):
            return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    return None


def test_every_file_of_pydicoms_corpus(index_engine: Engine, blobs: Path) -> None:
    """Each bundled file is either indexed with the values pydicom reads from
    it, or refused with the status its defect calls for.  Policy "replace",
    because pydicom reuses SOP Instance UIDs across variants of one image."""
    assert len(CORPUS) > 80
    service = make_service(index_engine, blobs, "replace")
    stored = 0
    for path in CORPUS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refusal = expected_refusal(path)
            with path.open("rb") as fh:
                result = service.store_part10(fh, ORIGIN)
        if refusal is not None:
            assert result.status is refusal, (path.name, result.reason)
            assert result.reason
            continue
        assert result.status is Status.SUCCESS, (path.name, result.reason)
        stored += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, stop_before_pixels=True)
        check_index_values(index_engine, blobs, ds, path)
    assert stored >= 45
    # one row and one blob per distinct SOP Instance UID, nothing more
    assert count(index_engine, instance) == len(blob_files(blobs))


def check_index_values(engine: Engine, root: Path, ds: Dataset, path: Path) -> None:
    with engine.connect() as conn:
        row = conn.execute(
            select(instance, series.c.modality, series.c.series_number, study)
            .join(series, series.c.id == instance.c.series_fk)
            .join(study, study.c.id == instance.c.study_fk)
            .where(instance.c.sop_instance_uid == ds.SOPInstanceUID)
        ).one()
    m = row._mapping
    assert m["study_instance_uid"] == ds.StudyInstanceUID, path.name
    assert m["sop_class_uid"] == ds.SOPClassUID
    assert m["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
    assert m["modality"] == ds.get("Modality", "")
    assert m["patient_name"] == str(ds.get("PatientName", "") or "")
    assert m["patient_id"] == (ds.get("PatientID") or "")
    assert m["study_date"] == normalize_da(ds.get("StudyDate") or "")
    assert m["accession_number"] == (ds.get("AccessionNumber") or "")
    if ds.get("Rows") is not None:
        assert m["rows"] == ds.Rows
    if ds.get("InstanceNumber") not in (None, ""):
        assert m["instance_number"] == int(ds.InstanceNumber)
    # the blob is the file's bytes, exactly
    blob = root / m["blob_key"][:2] / m["blob_key"][2:4] / m["blob_key"]
    assert blob.read_bytes() == path.read_bytes()
    assert m["size"] == path.stat().st_size


def test_character_sets_are_indexed_as_unicode(index_engine: Engine, blobs: Path) -> None:
    """pydicom's charset files: PN decoded per Specific Character Set."""
    service = make_service(index_engine, blobs)
    names = {}
    for name in ("chrH31.dcm", "chrRuss.dcm", "chrGerm.dcm", "chrX1.dcm"):
        path = DATA / "charset_files" / name
        with path.open("rb") as fh:
            assert service.store_part10(fh, ORIGIN).status is Status.SUCCESS
        ds = dcmread(path)
        names[ds.SOPInstanceUID] = str(ds.PatientName)
    with index_engine.connect() as conn:
        rows = dict(
            conn.execute(
                select(instance.c.sop_instance_uid, study.c.patient_name).join(
                    study, study.c.id == instance.c.study_fk
                )
            ).all()
        )
    assert rows == names
    assert any("山田" in n for n in rows.values())  # ISO 2022 IR 87 decoded
    assert any("Люк" in n for n in rows.values())  # ISO_IR 144 (Cyrillic) decoded


def test_request_attributes_and_timezone_are_indexed(index_engine: Engine, blobs: Path) -> None:
    from appliance.index.schema import request_attribute

    ds = ct_dataset()
    ds.TimezoneOffsetFromUTC = "+0100"
    items = []
    for step, procedure in (("SPS1", "RP1"), ("SPS2", "RP2")):
        item = Dataset()
        item.ScheduledProcedureStepID = step
        item.RequestedProcedureID = procedure
        items.append(item)
    ds.RequestAttributesSequence = items
    service = make_service(index_engine, blobs)
    assert service.store_part10(io.BytesIO(part10(ds)), ORIGIN).status is Status.SUCCESS
    with index_engine.connect() as conn:
        rows = conn.execute(
            select(
                request_attribute.c.scheduled_procedure_step_id,
                request_attribute.c.requested_procedure_id,
            ).order_by(request_attribute.c.id)
        ).all()
        tz = conn.execute(select(study.c.timezone_offset_from_utc)).scalar_one()
    assert [tuple(r) for r in rows] == [("SPS1", "RP1"), ("SPS2", "RP2")]
    assert tz == "+0100"


# ------------------------------------------------------------ the DIMSE form


def test_bare_dataset_is_stored_byte_for_byte_after_file_meta(
    index_engine: Engine, blobs: Path
) -> None:
    ds = ct_dataset()
    del ds.file_meta
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=True, little_endian=True)
    sent = body.getvalue()
    service = make_service(index_engine, blobs)
    result = service.store_dataset(
        sent,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ImplicitVRLittleEndian,
        origin=Origin("dimse", calling_ae="CT1"),
    )
    assert result.status is Status.SUCCESS, result.reason
    stored = SqlIndex(index_engine).find_instance(ds.SOPInstanceUID)
    assert stored is not None
    assert stored.transfer_syntax_uid == ImplicitVRLittleEndian
    with service.storage.open(stored.blob_key) as fh:
        data = fh.read()
    assert data.endswith(sent)
    assert dcmread(io.BytesIO(data)).file_meta.SourceApplicationEntityTitle == "CT1"


def test_bad_command_uids_are_refused_before_anything_is_written(
    index_engine: Engine, blobs: Path
) -> None:
    service = make_service(index_engine, blobs)
    result = service.store_dataset(
        b"",
        sop_class_uid="1.2.3",
        sop_instance_uid="../../x",
        transfer_syntax_uid=ImplicitVRLittleEndian,
        origin=Origin("dimse"),
    )
    assert result.status is Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert blob_files(blobs) == []


# ---------------------------------------------------------------- duplicates


@pytest.mark.parametrize(
    ("policy", "status", "outcome"),
    [
        ("keep", Status.DUPLICATE_INSTANCE_KEPT, AddOutcome.DUPLICATE_KEPT),
        ("reject", Status.DUPLICATE_SOP_INSTANCE, AddOutcome.DUPLICATE_REJECTED),
        ("replace", Status.SUCCESS, AddOutcome.REPLACED),
    ],
)
def test_duplicate_policies(
    index_engine: Engine, blobs: Path, policy: str, status: Status, outcome: AddOutcome
) -> None:
    first = ct_dataset()
    second = ct_dataset(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    second.InstanceNumber = 2
    service = make_service(index_engine, blobs, policy)
    assert service.store_part10(io.BytesIO(part10(first)), ORIGIN).status is Status.SUCCESS
    result = service.store_part10(io.BytesIO(part10(second)), ORIGIN)
    assert result.status is status
    assert result.outcome is outcome
    assert result.sop_instance_uid == first.SOPInstanceUID
    assert count(index_engine, instance) == 1
    assert len(blob_files(blobs)) == 1
    kept = part10(second) if policy == "replace" else part10(first)
    assert blob_files(blobs)[0].read_bytes() == kept
    with index_engine.connect() as conn:
        states = (
            conn.execute(select(changefeed.c.state).order_by(changefeed.c.sequence)).scalars().all()
        )
        counts = conn.execute(select(study.c.num_series, study.c.num_instances)).one()
    assert states == (["replaced", "current"] if policy == "replace" else ["current"])
    assert tuple(counts) == (1, 1)


def test_replace_can_move_an_instance_to_another_series(index_engine: Engine, blobs: Path) -> None:
    first = ct_dataset()
    item = Dataset()
    item.ScheduledProcedureStepID = "SPS1"
    first.RequestAttributesSequence = [item]  # the emptied series' items go with it
    moved = ct_dataset(first.StudyInstanceUID, generate_uid(), first.SOPInstanceUID)
    service = make_service(index_engine, blobs, "replace")
    service.store_part10(io.BytesIO(part10(first)), ORIGIN)
    assert service.store_part10(io.BytesIO(part10(moved)), ORIGIN).status is Status.SUCCESS
    with index_engine.connect() as conn:
        uids = conn.execute(select(series.c.series_instance_uid)).scalars().all()
        counts = conn.execute(select(study.c.num_series, study.c.num_instances)).one()
    assert uids == [moved.SeriesInstanceUID]  # the emptied series is gone
    assert tuple(counts) == (1, 1)


@pytest.mark.parametrize("policy", ["keep", "replace"])
def test_two_writers_racing_on_one_instance_leave_one_row(
    index_engine: Engine, blobs: Path, policy: str
) -> None:
    """8 threads store the same SOP Instance UID at once, 5 rounds: one row,
    one blob, every answer a success or the duplicate warning."""
    service = make_service(index_engine, blobs, policy)
    for _ in range(5):
        data = part10(ct_dataset())

        def store(data: bytes = data) -> IngestResult:
            return service.store_part10(io.BytesIO(data), ORIGIN)

        results = run_concurrently(8, store)
        assert {r.status for r in results} <= {Status.SUCCESS, Status.DUPLICATE_INSTANCE_KEPT}
        if policy == "keep":
            assert [r.status for r in results].count(Status.SUCCESS) == 1
    assert count(index_engine, instance) == 5
    assert len(blob_files(blobs)) == 5
    with index_engine.connect() as conn:
        assert conn.execute(select(func.sum(study.c.num_instances))).scalar_one() == 5


def test_concurrent_instances_of_one_new_study_keep_counters_right(
    index_engine: Engine, blobs: Path
) -> None:
    """Writers creating the same study and series at once (ON CONFLICT paths)."""
    service = make_service(index_engine, blobs)
    study_uid, series_uids = generate_uid(), [generate_uid(), generate_uid()]
    datas = [part10(ct_dataset(study_uid, series_uids[i % 2])) for i in range(16)]
    it: Iterator[bytes] = iter(datas)
    lock = threading.Lock()

    def store_next() -> Status:
        with lock:
            data = next(it)
        return service.store_part10(io.BytesIO(data), ORIGIN).status

    assert set(run_concurrently(16, store_next)) == {Status.SUCCESS}
    with index_engine.connect() as conn:
        counts = conn.execute(select(study.c.num_series, study.c.num_instances)).one()
        per_series = conn.execute(select(func.sum(series.c.num_instances))).scalar_one()
    assert tuple(counts) == (2, 16)
    assert per_series == 16
    assert count(index_engine, changefeed) == 16


def run_concurrently(n: int, work: object) -> list:  # type: ignore[type-arg]
    barrier = threading.Barrier(n)
    results: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            value = work()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(value)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == n
    return results


# ------------------------------------------------------- failures and sweeps


def test_an_index_refusal_after_the_blob_was_written_removes_the_blob(
    index_engine: Engine, blobs: Path
) -> None:
    """A Series Instance UID reused under another study is refused by the
    index transaction, after the blob is on disk: the blob must go."""
    service = make_service(index_engine, blobs)
    first = ct_dataset()
    assert service.store_part10(io.BytesIO(part10(first)), ORIGIN).status is Status.SUCCESS
    clash = ct_dataset(series_uid=first.SeriesInstanceUID)  # new study, same series
    result = service.store_part10(io.BytesIO(part10(clash)), ORIGIN)
    assert result.status is Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "another study" in result.reason
    assert len(blob_files(blobs)) == 1
    assert count(index_engine, instance) == 1
    assert count(index_engine, changefeed) == 1


def test_an_unreachable_index_fails_cleanly(tmp_path: Path, blobs: Path) -> None:
    """The database file's folder is replaced by a file: the index cannot be
    opened, the client gets a processing failure, nothing is left on disk."""
    from appliance.index.engine import create_index_engine

    (tmp_path / "gone").write_text("not a folder")
    engine = create_index_engine(f"sqlite:///{tmp_path / 'elsewhere' / 'index.db'}")
    (tmp_path / "elsewhere").rmdir()
    (tmp_path / "elsewhere").write_text("not a folder either")
    service = make_service(engine, blobs)
    result = service.store_part10(io.BytesIO(part10(ct_dataset())), ORIGIN)
    assert result.status is Status.PROCESSING_FAILURE
    assert "index" in result.reason
    assert blob_files(blobs) == []


def test_sweep_removes_only_old_unreferenced_blobs(index_engine: Engine, blobs: Path) -> None:
    service = make_service(index_engine, blobs)
    assert service.store_part10(io.BytesIO(part10(ct_dataset())), ORIGIN).status is Status.SUCCESS
    orphan = service.storage.put(io.BytesIO(b"left by a crash before the index commit"))
    assert len(blob_files(blobs)) == 2
    # young orphans may belong to an ingest in progress: kept
    assert sweep_orphans(service.storage, service.index).removed == 0
    swept = sweep_orphans(service.storage, service.index, grace=dt.timedelta(seconds=-5))
    assert (swept.checked, swept.removed, swept.ok) == (2, 1, True)
    assert not service.storage.exists(orphan.key)
    assert len(blob_files(blobs)) == 1
