"""C-FIND SCP (PS3.4 C.4.1) over a live DIMSE listener on loopback.

dcmtk's findscu is the real peer for the main flows (both information
models, every level, non-ASCII queries in Latin-1, UTF-8 and ISO 2022 IR 87
given as raw bytes, C-CANCEL); pynetdicom's SCU is used where a test needs
exact statuses, Error Comment and decoded identifiers, and to send an
identifier no encoder would write.

One appliance per module holds generated studies with controlled values,
pydicom's character set files and a 150-instance series for C-CANCEL;
tests that need another configuration start their own.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND

from appliance.errors import IndexUnavailable
from appliance.model import Origin
from appliance.services import Services
from tests.conftest import LiveAppliance, appliance_config, dcmtk, started_appliance

pytestmark = pytest.mark.integration

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
FINDSCU_MODEL = {PATIENT_ROOT: "-P", STUDY_ROOT: "-S"}

PENDING, PENDING_WARNING = 0xFF00, 0xFF01
SUCCESS, CANCEL = 0x0000, 0xFE00
OUT_OF_RESOURCES, DOES_NOT_MATCH, UNABLE_TO_PROCESS = 0xA700, 0xA900, 0xC000

CHARSETS = Path(pydicom.__file__).parent / "data" / "charset_files"
ORIGIN = Origin("import")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"

STUDY_A, STUDY_B, STUDY_C = "2.25.100", "2.25.200", "2.25.300"
SERIES_A1, SERIES_A2, SERIES_B1, SERIES_C1 = "2.25.101", "2.25.102", "2.25.201", "2.25.301"
SOP_A1 = ["2.25.1011", "2.25.1012", "2.25.1013"]
SOP_A2 = "2.25.1021"
BULK_STUDY, BULK_SERIES, BULK_COUNT = "2.25.900", "2.25.901", 150
STOW_STUDY = "2.25.700"


def original_name(name: str) -> str:
    """The Patient's Name of a pydicom character set file, decoded."""
    return str(pydicom.dcmread(CHARSETS / name).PatientName)


# --------------------------------------------------------------------------
# data


def part10(study: str, series: str, sop: str, **values: Any) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def request_attributes(step: str, procedure: str) -> list[Dataset]:
    item = Dataset()
    item.ScheduledProcedureStepID = step
    item.RequestedProcedureID = procedure
    return [item]


PATIENT_A = {
    "PatientName": "Doe^John",
    "PatientID": "PID-A",
    "PatientBirthDate": "19700101",
    "PatientSex": "M",
}
STUDY_A_VALUES = {
    **PATIENT_A,
    "StudyDate": "20200115",
    "StudyTime": "103000",
    "AccessionNumber": "ACC-A",
    "StudyID": "SID-A",
    "StudyDescription": "Chest CT",
    "ReferringPhysicianName": "Ref^Alpha",
    "TimezoneOffsetFromUTC": "+0100",
}
STUDY_B_VALUES = {
    "PatientName": "Smith^Jane",
    "PatientID": "PID-B",
    "PatientSex": "F",
    "StudyDate": "20210620",
    "StudyTime": "080000",
    "AccessionNumber": "ACC-B",
    "StudyDescription": "Head MR",
}
#: The second study of patient A: no description, no accession number.
STUDY_C_VALUES = {**PATIENT_A, "StudyDate": "20220301", "StudyTime": "140000"}


def generated() -> Iterator[bytes]:
    for number, sop in enumerate(SOP_A1, start=1):
        yield part10(
            STUDY_A,
            SERIES_A1,
            sop,
            **STUDY_A_VALUES,
            SOPClassUID=CT_IMAGE,
            Modality="CT",
            SeriesNumber=1,
            SeriesDescription="Axial",
            RequestAttributesSequence=request_attributes("SPS-1", "RP-1"),
            InstanceNumber=number,
            Rows=512,
            Columns=512,
            BitsAllocated=16,
        )
    yield part10(
        STUDY_A,
        SERIES_A2,
        SOP_A2,
        **STUDY_A_VALUES,
        SOPClassUID=MR_IMAGE,
        Modality="MR",
        SeriesNumber=2,
        RequestAttributesSequence=request_attributes("SPS-2", "RP-2"),
        InstanceNumber=1,
        NumberOfFrames=2,
        Rows=256,
        Columns=256,
    )
    for number in (1, 2):
        yield part10(
            STUDY_B,
            SERIES_B1,
            f"2.25.201{number}",
            **STUDY_B_VALUES,
            SOPClassUID=MR_IMAGE,
            Modality="MR",
            InstanceNumber=number,
        )
    yield part10(
        STUDY_C, SERIES_C1, "2.25.3011", **STUDY_C_VALUES, SOPClassUID=US_IMAGE, Modality="US"
    )
    for number in range(BULK_COUNT):
        yield part10(
            BULK_STUDY,
            BULK_SERIES,
            f"2.25.901{number:04d}",
            PatientID="BULK",
            SOPClassUID=SC_IMAGE,
            Modality="OT",
        )


def load(services: Services) -> None:
    for blob in generated():
        result = services.ingest.store_part10(io.BytesIO(blob), ORIGIN)
        assert result.status.category.value in ("success", "warning"), result
    for path in sorted(CHARSETS.glob("chr*.dcm")):
        if path.name.startswith("chrSQ"):
            continue  # no study: not storable
        with path.open("rb") as f:
            result = services.ingest.store_part10(f, ORIGIN)
        assert result.status.category.value in ("success", "warning"), (path.name, result)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAppliance]:
    """One appliance holding the test data, for every test here that does
    not change its configuration."""
    for live in started_appliance(appliance_config(tmp_path_factory.mktemp("find"))):
        load(live.services)
        yield live


# --------------------------------------------------------------------------
# peers


@dataclasses.dataclass
class Found:
    """The responses of one C-FIND."""

    pending: list[tuple[int, Dataset]]
    final: Dataset

    @property
    def status(self) -> int:
        return int(self.final.Status)

    @property
    def identifiers(self) -> list[Dataset]:
        return [identifier for _, identifier in self.pending]

    def values(self, keyword: str) -> list[Any]:
        return [identifier.get(keyword) for identifier in self.identifiers]


def query(level: str, charset: str | list[str] | None = None, **keys: Any) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def associate(appliance: LiveAppliance, *contexts: str, transfer_syntax: Any = None) -> Association:
    ae = AE(ae_title="PYNETDICOM")
    for context in contexts or (STUDY_ROOT, PATIENT_ROOT):
        if transfer_syntax is None:
            ae.add_requested_context(context)
        else:
            ae.add_requested_context(context, [transfer_syntax])
    assoc = ae.associate(appliance.dimse_host, appliance.dimse_port, ae_title=appliance.ae_title)
    assert assoc.is_established
    return assoc


def find_on(assoc: Association, identifier: Dataset, model: str = STUDY_ROOT) -> Found:
    pending: list[tuple[int, Dataset]] = []
    final: Dataset | None = None
    for status, response in assoc.send_c_find(identifier, model):
        assert "Status" in status, "no response from the SCP"
        if status.Status in (PENDING, PENDING_WARNING):
            assert response is not None
            pending.append((int(status.Status), response))
        else:
            final = status
    assert final is not None
    return Found(pending, final)


def find(appliance: LiveAppliance, identifier: Dataset, model: str = STUDY_ROOT) -> Found:
    """One C-FIND on a new association (pynetdicom SCU)."""
    assoc = associate(appliance, model)
    try:
        return find_on(assoc, identifier, model)
    finally:
        assoc.release()


def tag_set(identifier: Dataset) -> set[str]:
    return {element.keyword for element in identifier if element.tag.group != 0x0002}


def as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list):
        return list(value)
    return [value]


@dataclasses.dataclass
class Findscu:
    """The outcome of one findscu run: its exit code, the response
    identifiers it extracted (``-X``), and its report of the statuses."""

    returncode: int
    responses: list[Dataset]
    final: str
    output: str


_RUNS = itertools.count()


def findscu(
    appliance: LiveAppliance,
    out: Path,
    model: str,
    *keys: str | bytes,
    extra: Sequence[str] = (),
) -> Findscu:
    """dcmtk's findscu (``-v -X``) with ``-k`` *keys* (bytes are passed to it
    unchanged: a value in a character set other than the locale's)."""
    directory = out / f"findscu-{next(_RUNS)}"
    directory.mkdir()
    command: list[str | bytes] = [dcmtk("findscu"), "-v", FINDSCU_MODEL[model]]
    command += ["-aet", "FINDSCU", "-aec", appliance.ae_title, "-X", "-od", str(directory)]
    for key in keys:
        command += ["-k", key]
    command += [*extra, appliance.dimse_host, str(appliance.dimse_port)]
    run = subprocess.run(command, capture_output=True, timeout=60, check=False)
    output = (run.stdout + run.stderr).decode("latin-1")
    final = re.search(r"Received Final Find Response \(([^)]*)\)", output)
    responses = [pydicom.dcmread(path) for path in sorted(directory.glob("rsp*.dcm"))]
    return Findscu(run.returncode, responses, final.group(1) if final else "", output)


# --------------------------------------------------------------------------
# dcmtk findscu: both models, every level


@pytest.mark.interop
def test_findscu_study_root_study_level_returns_only_the_requested_keys(
    appliance: LiveAppliance, tmp_path: Path
) -> None:
    run = findscu(
        appliance,
        tmp_path,
        STUDY_ROOT,
        "QueryRetrieveLevel=STUDY",
        "PatientName=doe*",
        "StudyInstanceUID",
        "StudyDate",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    )
    assert run.returncode == 0, run.output
    assert run.final == "Success", run.output
    by_study = {ds.StudyInstanceUID: ds for ds in run.responses}
    assert set(by_study) == {STUDY_A, STUDY_C}  # one response per study
    requested = {
        "QueryRetrieveLevel",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    }
    for ds in run.responses:
        # every value ASCII: no Specific Character Set (PS3.4 C.4.1.1.3.2)
        assert tag_set(ds) == requested
        assert ds.QueryRetrieveLevel == "STUDY"
        assert str(ds.PatientName) == "Doe^John"
    a, c = by_study[STUDY_A], by_study[STUDY_C]
    assert (a.StudyDate, a.StudyDescription) == ("20200115", "Chest CT")
    assert as_list(a.ModalitiesInStudy) == ["CT", "MR"]
    assert (a.NumberOfStudyRelatedSeries, a.NumberOfStudyRelatedInstances) == (2, 4)
    assert c.StudyDescription == ""  # the index has no value: returned empty
    assert as_list(c.ModalitiesInStudy) == ["US"]
    assert (c.NumberOfStudyRelatedSeries, c.NumberOfStudyRelatedInstances) == (1, 1)


@pytest.mark.interop
def test_findscu_patient_root_every_level(appliance: LiveAppliance, tmp_path: Path) -> None:
    patients = findscu(
        appliance,
        tmp_path,
        PATIENT_ROOT,
        "QueryRetrieveLevel=PATIENT",
        "PatientID=PID-A",
        "PatientName",
        "PatientBirthDate",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    )
    assert patients.final == "Success", patients.output
    [patient] = patients.responses
    assert (str(patient.PatientName), patient.PatientBirthDate) == ("Doe^John", "19700101")
    counts = (
        patient.NumberOfPatientRelatedStudies,
        patient.NumberOfPatientRelatedSeries,
        patient.NumberOfPatientRelatedInstances,
    )
    assert counts == (2, 3, 5)

    studies = findscu(
        appliance,
        tmp_path,
        PATIENT_ROOT,
        "QueryRetrieveLevel=STUDY",
        "PatientID=PID-A",
        "StudyInstanceUID",
        "StudyDate=20200101-20201231",
    )
    assert studies.final == "Success", studies.output
    assert [ds.StudyInstanceUID for ds in studies.responses] == [STUDY_A]

    series = findscu(
        appliance,
        tmp_path,
        PATIENT_ROOT,
        "QueryRetrieveLevel=SERIES",
        "PatientID=PID-A",
        f"StudyInstanceUID={STUDY_A}",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    )
    assert series.final == "Success", series.output
    found = {(ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber) for ds in series.responses}
    assert found == {(SERIES_A1, "CT", 1), (SERIES_A2, "MR", 2)}
    assert {ds.NumberOfSeriesRelatedInstances for ds in series.responses} == {3, 1}

    images = findscu(
        appliance,
        tmp_path,
        PATIENT_ROOT,
        "QueryRetrieveLevel=IMAGE",
        "PatientID=PID-A",
        f"StudyInstanceUID={STUDY_A}",
        f"SeriesInstanceUID={SERIES_A1}",
        "SOPInstanceUID",
        "InstanceNumber",
    )
    assert images.final == "Success", images.output
    assert sorted(ds.SOPInstanceUID for ds in images.responses) == SOP_A1
    assert sorted(ds.InstanceNumber for ds in images.responses) == [1, 2, 3]


@pytest.mark.interop
def test_findscu_study_root_series_and_image_levels(
    appliance: LiveAppliance, tmp_path: Path
) -> None:
    series = findscu(
        appliance,
        tmp_path,
        STUDY_ROOT,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={STUDY_A}\\{STUDY_B}",
        "SeriesInstanceUID",
        "Modality=MR",
    )
    assert series.final == "Success", series.output
    assert sorted(ds.SeriesInstanceUID for ds in series.responses) == [SERIES_A2, SERIES_B1]

    images = findscu(
        appliance,
        tmp_path,
        STUDY_ROOT,
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={STUDY_A}",
        f"SeriesInstanceUID={SERIES_A2}",
        "SOPInstanceUID",
        "SOPClassUID",
        "Rows",
        "NumberOfFrames",
    )
    assert images.final == "Success", images.output
    [image] = images.responses
    assert (image.SOPInstanceUID, image.SOPClassUID) == (SOP_A2, MR_IMAGE)
    assert (image.Rows, image.NumberOfFrames) == (256, 2)


@pytest.mark.interop
def test_findscu_refusals_name_the_reason(appliance: LiveAppliance, tmp_path: Path) -> None:
    # Study Root has no PATIENT level (PS3.4 C.6.2)
    run = findscu(appliance, tmp_path, STUDY_ROOT, "QueryRetrieveLevel=PATIENT", "PatientID")
    assert run.final.startswith("Error: DataSetDoesNotMatchSOPClass"), run.output
    assert run.responses == []
    # hierarchical search: the study's UID is needed for a SERIES query
    run = findscu(
        appliance, tmp_path, STUDY_ROOT, "QueryRetrieveLevel=SERIES", "Modality=CT", extra=["-d"]
    )
    assert "DIMSE Status                  : 0xa900" in run.output, run.output  # -d prints it so
    assert run.responses == []
    [comment] = [line for line in run.output.splitlines() if "ErrorComment" in line]
    assert "StudyInstanceUID needed above SERIES level" in comment
    # the next association is served
    run = findscu(appliance, tmp_path, STUDY_ROOT, "QueryRetrieveLevel=STUDY", "PatientID=PID-B")
    assert run.final == "Success", run.output
    assert len(run.responses) == 1


@pytest.mark.interop
def test_findscu_cancel(appliance: LiveAppliance, tmp_path: Path) -> None:
    run = findscu(
        appliance,
        tmp_path,
        STUDY_ROOT,
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={BULK_STUDY}",
        f"SeriesInstanceUID={BULK_SERIES}",
        "SOPInstanceUID",
        extra=["--cancel", "1"],
    )
    assert run.final.startswith("Cancel"), run.output
    assert 1 <= len(run.responses) < BULK_COUNT


# --------------------------------------------------------------------------
# dcmtk findscu: values in other character sets, sent as their bytes


@pytest.mark.interop
def test_findscu_latin1_query(appliance: LiveAppliance, tmp_path: Path) -> None:
    run = findscu(
        appliance,
        tmp_path,
        STUDY_ROOT,
        "SpecificCharacterSet=ISO_IR 100",
        "QueryRetrieveLevel=STUDY",
        b"PatientName=" + "*rôme".encode("latin-1"),
        "PatientID",
    )
    assert run.final == "Success", run.output
    [response] = run.responses
    assert response.SpecificCharacterSet == "ISO_IR 100"
    assert str(response.PatientName) == original_name("chrFren.dcm")


@pytest.mark.interop
def test_findscu_iso2022_japanese_query(appliance: LiveAppliance, tmp_path: Path) -> None:
    # "*=山田*": any name whose ideographic group starts with 山田, in ISO
    # 2022 IR 87 (ESC $ B ... ESC ( B), as a Japanese SCU sends it
    run = findscu(
        appliance,
        tmp_path,
        STUDY_ROOT,
        "SpecificCharacterSet=\\ISO 2022 IR 87",
        "QueryRetrieveLevel=STUDY",
        b"PatientName=*=" + "山田".encode("iso2022_jp") + b"*",
        "PatientID",
    )
    assert run.final == "Success", run.output
    by_id = {response.PatientID: response for response in run.responses}
    assert set(by_id) == {"H31EXAMPLE", "H32EXAMPLE"}
    # chrH31's name fits the request's character set and is sent in it
    assert as_list(by_id["H31EXAMPLE"].SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert str(by_id["H31EXAMPLE"].PatientName) == original_name("chrH31.dcm")
    # chrH32's half-width katakana are not in ISO 2022 IR 87: UTF-8
    assert by_id["H32EXAMPLE"].SpecificCharacterSet == "ISO_IR 192"
    assert str(by_id["H32EXAMPLE"].PatientName) == original_name("chrH32.dcm")


@pytest.mark.interop
def test_findscu_utf8_query(appliance: LiveAppliance, tmp_path: Path) -> None:
    run = findscu(
        appliance,
        tmp_path,
        STUDY_ROOT,
        "SpecificCharacterSet=ISO_IR 192",
        "QueryRetrieveLevel=STUDY",
        "PatientName=*=王*".encode(),
        "PatientID",
    )
    assert run.final == "Success", run.output
    names = {response.PatientID: str(response.PatientName) for response in run.responses}
    assert names == {
        "X1EXAMPLE": original_name("chrX1.dcm"),
        "X2EXAMPLE": original_name("chrX2.dcm"),
    }
    assert {response.SpecificCharacterSet for response in run.responses} == {"ISO_IR 192"}


# --------------------------------------------------------------------------
# matching rules (PS3.4 C.2.2.2), pynetdicom SCU


@pytest.mark.parametrize(
    ("model", "level", "keys", "unique", "expected"),
    [
        # C.2.2.2.1 Single Value Matching
        (STUDY_ROOT, "STUDY", {"PatientID": "PID-B"}, "StudyInstanceUID", {STUDY_B}),
        (STUDY_ROOT, "STUDY", {"AccessionNumber": "ACC-A"}, "StudyInstanceUID", {STUDY_A}),
        # ... case-insensitive for PN
        (
            STUDY_ROOT,
            "STUDY",
            {"PatientName": "DOE^JOHN"},
            "StudyInstanceUID",
            {STUDY_A, STUDY_C},
        ),
        # C.2.2.2.4 Wild Card Matching
        (STUDY_ROOT, "STUDY", {"PatientName": "Sm?th*"}, "StudyInstanceUID", {STUDY_B}),
        (STUDY_ROOT, "STUDY", {"StudyDescription": "*CT"}, "StudyInstanceUID", {STUDY_A}),
        # C.2.2.2.5 Range Matching, DA and TM
        (
            STUDY_ROOT,
            "STUDY",
            {"StudyDate": "20210101-20221231"},
            "StudyInstanceUID",
            {STUDY_B, STUDY_C},
        ),
        (
            STUDY_ROOT,
            "STUDY",
            {"PatientID": "PID-*", "StudyTime": "-0900"},
            "StudyInstanceUID",
            {STUDY_B},
        ),
        # C.2.2.2.2 List of UID Matching
        (
            STUDY_ROOT,
            "STUDY",
            {"StudyInstanceUID": f"{STUDY_A}\\{STUDY_C}"},
            "StudyInstanceUID",
            {STUDY_A, STUDY_C},
        ),
        # C.2.2.2.3 Universal Matching: empty and "*"
        (
            STUDY_ROOT,
            "STUDY",
            {"PatientID": "PID-*", "StudyDescription": "", "AccessionNumber": "*"},
            "StudyInstanceUID",
            {STUDY_A, STUDY_B, STUDY_C},
        ),
        # ModalitiesInStudy (C.6.1.1.3.1), a list
        (
            STUDY_ROOT,
            "STUDY",
            {"PatientID": "PID-*", "ModalitiesInStudy": "CT\\US"},
            "StudyInstanceUID",
            {STUDY_A, STUDY_C},
        ),
        # SERIES: IS as a number, Sequence Matching (C.2.2.2.6)
        (
            STUDY_ROOT,
            "SERIES",
            {"StudyInstanceUID": STUDY_A, "SeriesNumber": "002"},
            "SeriesInstanceUID",
            {SERIES_A2},
        ),
        (
            STUDY_ROOT,
            "SERIES",
            {
                "StudyInstanceUID": STUDY_A,
                "RequestAttributesSequence": request_attributes("SPS-1", ""),
            },
            "SeriesInstanceUID",
            {SERIES_A1},
        ),
        # IMAGE
        (
            STUDY_ROOT,
            "IMAGE",
            {"StudyInstanceUID": STUDY_A, "SeriesInstanceUID": SERIES_A1, "InstanceNumber": "2"},
            "SOPInstanceUID",
            {SOP_A1[1]},
        ),
        (
            STUDY_ROOT,
            "IMAGE",
            {
                "StudyInstanceUID": STUDY_A,
                "SeriesInstanceUID": SERIES_A1,
                "SOPInstanceUID": f"{SOP_A1[0]}\\{SOP_A1[2]}",
            },
            "SOPInstanceUID",
            {SOP_A1[0], SOP_A1[2]},
        ),
        # Patient Root
        (PATIENT_ROOT, "PATIENT", {"PatientName": "*oe^*"}, "PatientID", {"PID-A"}),
        (
            PATIENT_ROOT,
            "STUDY",
            {"PatientID": "PID-A", "StudyTime": "1200-"},
            "StudyInstanceUID",
            {STUDY_C},
        ),
    ],
)
def test_matching(
    appliance: LiveAppliance,
    model: str,
    level: str,
    keys: dict[str, Any],
    unique: str,
    expected: set[str],
) -> None:
    found = find(appliance, query(level, **{unique: "", **keys}), model)
    assert found.status == SUCCESS
    values = found.values(unique)
    assert len(values) == len(set(values)), "one response per entity"
    assert set(values) == expected
    assert {status for status, _ in found.pending} == {PENDING}


def test_requested_keys_only_and_filled(appliance: LiveAppliance) -> None:
    keys = {
        "PatientID": "PID-A",
        "StudyInstanceUID": STUDY_A,
        "PatientName": "",
        "PatientBirthDate": "",
        "StudyTime": "",
        "ReferringPhysicianName": "",
        "TimezoneOffsetFromUTC": "",
        "RetrieveAETitle": "",
        "InstanceAvailability": "",
    }
    found = find(appliance, query("STUDY", **keys))
    assert found.status == SUCCESS
    [(status, identifier)] = found.pending
    assert status == PENDING
    assert tag_set(identifier) == {"QueryRetrieveLevel", *keys}
    assert str(identifier.PatientName) == "Doe^John"
    assert (identifier.PatientBirthDate, identifier.StudyTime) == ("19700101", "103000")
    assert str(identifier.ReferringPhysicianName) == "Ref^Alpha"
    assert identifier.TimezoneOffsetFromUTC == "+0100"
    assert identifier.RetrieveAETitle == appliance.ae_title
    assert identifier.InstanceAvailability == "ONLINE"


def test_unsupported_keys_are_returned_empty_with_ff01(appliance: LiveAppliance) -> None:
    found = find(
        appliance,
        query(
            "STUDY",
            PatientID="PID-B",
            StudyInstanceUID="",
            StationName="NOT-MATCHED",  # not held: its value is ignored
            NumberOfStudyRelatedInstances="99",  # returned, not matchable
            Modality="",  # a SERIES key, empty: returned empty
            OtherPatientIDsSequence=[],
        ),
    )
    assert found.status == SUCCESS
    [(status, identifier)] = found.pending
    assert status == PENDING_WARNING  # PS3.4 C.4.1.1.4
    assert identifier.StudyInstanceUID == STUDY_B
    assert identifier.StationName == ""
    assert identifier.Modality == ""
    assert identifier.NumberOfStudyRelatedInstances == 2
    assert len(identifier.OtherPatientIDsSequence) == 0


def test_series_level_values(appliance: LiveAppliance) -> None:
    found = find(
        appliance,
        query(
            "SERIES",
            StudyInstanceUID=STUDY_A,
            SeriesInstanceUID="",
            SeriesDescription="",
            NumberOfSeriesRelatedInstances="",
            RequestAttributesSequence=[],
        ),
    )
    assert found.status == SUCCESS
    by_series = {ds.SeriesInstanceUID: ds for ds in found.identifiers}
    a1, a2 = by_series[SERIES_A1], by_series[SERIES_A2]
    assert (a1.SeriesDescription, a1.NumberOfSeriesRelatedInstances) == ("Axial", 3)
    assert (a2.SeriesDescription, a2.NumberOfSeriesRelatedInstances) == ("", 1)
    # an empty sequence asks for every item attribute held
    [item] = a1.RequestAttributesSequence
    assert (item.ScheduledProcedureStepID, item.RequestedProcedureID) == ("SPS-1", "RP-1")

    # an item naming one attribute gets only that one
    wanted = Dataset()
    wanted.RequestedProcedureID = ""
    found = find(
        appliance,
        query(
            "SERIES",
            StudyInstanceUID=STUDY_A,
            SeriesInstanceUID=SERIES_A2,
            RequestAttributesSequence=[wanted],
        ),
    )
    [identifier] = found.identifiers
    [item] = identifier.RequestAttributesSequence
    assert tag_set(item) == {"RequestedProcedureID"}
    assert item.RequestedProcedureID == "RP-2"


def test_image_level_values(appliance: LiveAppliance) -> None:
    found = find(
        appliance,
        query(
            "IMAGE",
            StudyInstanceUID=STUDY_A,
            SeriesInstanceUID=SERIES_A1,
            SOPInstanceUID=SOP_A1[0],
            SOPClassUID="",
            Rows=None,
            BitsAllocated=None,
            NumberOfFrames="",
            AvailableTransferSyntaxUID="",
        ),
    )
    [identifier] = found.identifiers
    assert identifier.SOPClassUID == CT_IMAGE
    assert (identifier.Rows, identifier.BitsAllocated) == (512, 16)
    assert identifier.NumberOfFrames is None  # not in the instance: empty
    assert identifier.AvailableTransferSyntaxUID == ExplicitVRLittleEndian


# --------------------------------------------------------------------------
# Specific Character Set, both directions, pynetdicom SCU


@pytest.mark.parametrize(
    ("charset", "name", "expected"),
    [
        ("ISO_IR 100", "*rôme", {"chrFren.dcm": "ISO_IR 100"}),
        ("ISO_IR 100", "äneas*", {"chrGerm.dcm": "ISO_IR 100"}),  # case-insensitive
        ("ISO_IR 144", "Люк*", {"chrRuss.dcm": "ISO_IR 144"}),
        ("ISO_IR 192", "*=王*", {"chrX1.dcm": "ISO_IR 192", "chrX2.dcm": "ISO_IR 192"}),
        (
            ["", "ISO 2022 IR 87"],
            "*=山田*",
            {"chrH31.dcm": ["", "ISO 2022 IR 87"], "chrH32.dcm": "ISO_IR 192"},
        ),
        (["", "ISO 2022 IR 149"], "*=洪*", {"chrI2.dcm": ["", "ISO 2022 IR 149"]}),
        (None, "Buc*", {"chrFren.dcm": "ISO_IR 192"}),
    ],
)
def test_character_sets(
    appliance: LiveAppliance, charset: Any, name: str, expected: dict[str, Any]
) -> None:
    found = find(appliance, query("STUDY", charset, PatientName=name, PatientID=""))
    assert found.status == SUCCESS
    ids = {pydicom.dcmread(CHARSETS / file).PatientID: file for file in expected}
    got = {identifier.PatientID: identifier for identifier in found.identifiers}
    assert set(got) == set(ids)
    for patient_id, identifier in got.items():
        file = ids[patient_id]
        assert str(identifier.PatientName) == original_name(file)
        assert as_list(identifier.SpecificCharacterSet) == as_list(expected[file])


def test_non_ascii_result_for_an_ascii_query_is_utf8(appliance: LiveAppliance) -> None:
    found = find(appliance, query("STUDY", "ISO_IR 100", PatientID="SCSRUSS", PatientName=""))
    [identifier] = found.identifiers
    assert identifier.SpecificCharacterSet == "ISO_IR 192"
    assert str(identifier.PatientName) == original_name("chrRuss.dcm")
    # an all-ASCII response has no Specific Character Set, whatever was asked
    found = find(appliance, query("STUDY", "ISO_IR 100", PatientID="PID-B", PatientName=""))
    [identifier] = found.identifiers
    assert "SpecificCharacterSet" not in identifier


# --------------------------------------------------------------------------
# failures


#: pydicom warns (quoting the value) when the tests build the malformed
#: requests below; the SCP's answer is what is tested.
MALFORMED = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR", "ignore:Unknown encoding", "ignore:A value of type"
)


@MALFORMED
@pytest.mark.parametrize(
    ("model", "level", "keys", "reason"),
    [
        (STUDY_ROOT, None, {"PatientID": "x"}, "QueryRetrieveLevel"),
        (STUDY_ROOT, "FOO", {"PatientID": ""}, "QueryRetrieveLevel"),
        (STUDY_ROOT, "PATIENT", {"PatientID": ""}, "no PATIENT level"),
        (STUDY_ROOT, "SERIES", {"SeriesInstanceUID": ""}, "StudyInstanceUID"),
        (
            STUDY_ROOT,
            "IMAGE",
            {"StudyInstanceUID": STUDY_A, "SOPInstanceUID": ""},
            "SeriesInstanceUID",
        ),
        (PATIENT_ROOT, "STUDY", {"PatientID": "PID-*", "StudyInstanceUID": ""}, "PatientID"),
        (STUDY_ROOT, "STUDY", {"Modality": "CT"}, "Modality"),
        (STUDY_ROOT, "STUDY", {"StudyInstanceUID": "1.2.*"}, "StudyInstanceUID"),
        (STUDY_ROOT, "STUDY", {"StudyDate": "20201345"}, "StudyDate"),
        (
            STUDY_ROOT,
            "STUDY",
            {"SpecificCharacterSet": "ISO_IR 999", "PatientName": "x"},
            "Specific Character Set",
        ),
        (
            STUDY_ROOT,
            "SERIES",
            {
                "StudyInstanceUID": STUDY_A,
                "RequestAttributesSequence": [
                    *request_attributes("a", "b"),
                    *request_attributes("c", "d"),
                ],
            },
            "RequestAttributesSequence",
        ),
    ],
)
def test_identifier_does_not_match(
    appliance: LiveAppliance, model: str, level: str | None, keys: dict[str, Any], reason: str
) -> None:
    identifier = query(level or "STUDY", **keys)
    if level is None:
        del identifier.QueryRetrieveLevel
    found = find(appliance, identifier, model)
    assert found.pending == []
    assert found.status == DOES_NOT_MATCH
    comment = found.final.ErrorComment
    assert reason in comment
    assert len(comment) <= 64
    assert comment.isascii()


@MALFORMED
def test_offending_element_is_named(appliance: LiveAppliance) -> None:
    found = find(appliance, query("STUDY", StudyDate="2020-01-01-"))
    assert found.status == DOES_NOT_MATCH
    assert found.final.OffendingElement == 0x00080020


def undecodable_find(assoc: Association, identifier: bytes) -> int:
    """Send a C-FIND-RQ whose identifier is *identifier* as is, and return
    the final status.  pynetdicom's ``send_c_find`` only sends what pydicom
    can write, so this pauses the requestor's reactor and uses the DIMSE
    provider the way ``send_c_find`` does (pynetdicom 3 internals)."""
    request = C_FIND()
    request.MessageID = 9
    request.AffectedSOPClassUID = STUDY_ROOT
    request.Priority = 2
    request.Identifier = io.BytesIO(identifier)
    context_id = assoc.accepted_contexts[0].context_id
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context_id)
        while True:
            _, response = assoc.dimse.get_msg(block=True)
            assert response is not None, "no response from the SCP"
            if response.Status not in (PENDING, PENDING_WARNING):
                return int(response.Status)
    finally:
        assoc._reactor_checkpoint.set()


def test_undecodable_identifier_then_the_association_goes_on(appliance: LiveAppliance) -> None:
    assoc = associate(appliance, STUDY_ROOT, transfer_syntax=ImplicitVRLittleEndian)
    try:
        # Implicit VR LE: Query/Retrieve Level "STUDY ", then Rows (US) of
        # one byte, which no US value can be (PS3.5 6.2)
        garbage = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x28\x00\x10\x00\x01\x00\x00\x00x"
        assert undecodable_find(assoc, garbage) == UNABLE_TO_PROCESS
        found = find_on(assoc, query("STUDY", PatientID="PID-B"))
        assert found.status == SUCCESS
        assert len(found.pending) == 1
    finally:
        assoc.release()
    assert find(appliance, query("STUDY", PatientID="PID-B")).status == SUCCESS


def test_index_failure_is_unable_to_process(
    appliance: LiveAppliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_: Any) -> Any:
        raise IndexUnavailable("the index query failed: OperationalError")

    monkeypatch.setattr(appliance.services.query, "search", failing)
    found = find(appliance, query("STUDY", PatientID="PID-B"))
    assert found.status == UNABLE_TO_PROCESS
    assert "index" in found.final.ErrorComment


# --------------------------------------------------------------------------
# C-CANCEL, the cap, cross-protocol, logs


def test_cancel_after_the_first_response(appliance: LiveAppliance) -> None:
    # pynetdicom drops a C-CANCEL that arrives before it starts serving the
    # request (Association._serve_request), so it is sent after the first
    # pending response, as an SCU does.  Responses already queued for
    # sending when the C-CANCEL is read still arrive.
    assoc = associate(appliance, STUDY_ROOT)
    statuses: list[int] = []
    try:
        identifier = query(
            "IMAGE", StudyInstanceUID=BULK_STUDY, SeriesInstanceUID=BULK_SERIES, SOPInstanceUID=""
        )
        for status, _ in assoc.send_c_find(identifier, STUDY_ROOT, msg_id=5):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(5, assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    assert statuses[-1] == CANCEL
    assert set(statuses[:-1]) == {PENDING}
    assert 1 <= len(statuses) - 1 < BULK_COUNT
    # the association's next C-FIND is answered in full
    assert find(appliance, query("STUDY", PatientID="PID-B")).status == SUCCESS


def test_cap_ends_with_out_of_resources(tmp_path: Path) -> None:
    config = appliance_config(tmp_path, APPLIANCE_QUERY_MAX_RESULTS="3")
    for live in started_appliance(config):
        for number in range(5):
            study = f"2.25.5{number}"
            blob = part10(
                study, f"{study}.1", f"{study}.1.1", PatientID="CAP", SOPClassUID=SC_IMAGE
            )
            live.services.ingest.store_part10(io.BytesIO(blob), ORIGIN)
        found = find(live, query("STUDY", PatientID="CAP", StudyInstanceUID=""))
        assert len(found.pending) == 3
        assert found.status == OUT_OF_RESOURCES
        assert "more than 3 matches" in found.final.ErrorComment
        # exactly the maximum: Success
        uids = "\\".join(f"2.25.5{number}" for number in range(3))
        found = find(live, query("STUDY", PatientID="CAP", StudyInstanceUID=uids))
        assert (len(found.pending), found.status) == (3, SUCCESS)


def test_stow_rs_then_c_find(appliance: LiveAppliance) -> None:
    blob = part10(
        STOW_STUDY,
        f"{STOW_STUDY}.1",
        f"{STOW_STUDY}.1.1",
        PatientID="STOW-1",
        PatientName="Web^Stored",
        SOPClassUID=SC_IMAGE,
        Modality="OT",
    )
    boundary = "find-test-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response = httpx.post(
        f"{appliance.root}/studies", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    found = find(appliance, query("STUDY", PatientName="web^*", StudyInstanceUID=""))
    assert found.values("StudyInstanceUID") == [STOW_STUDY]


def test_one_log_line_without_patient_data(
    appliance: LiveAppliance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dimse_bridge")
    found = find(appliance, query("STUDY", PatientName="Smith^Jane", PatientID=""))
    assert len(found.pending) == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "association released" not in caplog.text:
        time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dimse_bridge")]
    [line] = [line for line in lines if line.startswith("C-FIND")]
    assert "Study Root STUDY keys=['PatientName', 'PatientID']" in line
    assert "1 match(es)" in line
    assert not any("Smith" in line or "PID-B" in line for line in lines)
    assert any("C-FIND success 1" in line for line in lines)  # the association's summary


def test_abort_mid_answer_is_logged_as_interrupted(
    appliance: LiveAppliance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dimse_bridge")
    assoc = associate(appliance, STUDY_ROOT)
    identifier = query(
        "IMAGE", StudyInstanceUID=BULK_STUDY, SeriesInstanceUID=BULK_SERIES, SOPInstanceUID=""
    )
    for status, _ in assoc.send_c_find(identifier, STUDY_ROOT):
        assert status.Status == PENDING
        assoc.abort()
        break
    # the line is written when pynetdicom lets go of the aborted handler,
    # which on a loaded machine (the whole suite on two cores) takes seconds
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "C-FIND interrupted" not in caplog.text:
        time.sleep(0.05)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C-FIND from")]
    assert "interrupted" in line
    assert find(appliance, query("STUDY", PatientID="PID-B")).status == SUCCESS
