"""QIDO-RS (PS3.18 10.6) over a real loopback listener: dicomweb-client for
what a client library sends, raw httpx and http.client for malformed
requests.

One appliance per module holds generated studies with controlled values and
two of pydicom's character set files (ISO 2022 Japanese, Cyrillic); tests
that need another configuration or an empty index start their own.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.model import Origin
from appliance.services import Services
from dicomweb.jsonmodel import to_json_dataset
from tests.conftest import LiveServer, make_config, started_server

pytestmark = pytest.mark.integration

DATA = Path(pydicom.__file__).parent / "data"
ORIGIN = Origin("import")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

STUDY_A = "2.25.100"
STUDY_B = "2.25.200"
SERIES_A1 = "2.25.101"  # CT, 3 instances, Request Attributes
SERIES_A2 = "2.25.102"  # MR, 1 instance of 2 frames
SERIES_B1 = "2.25.201"  # MR, 2 instances
SOP = {
    "A1-1": "2.25.1011",
    "A1-2": "2.25.1012",
    "A1-3": "2.25.1013",
    "A2-1": "2.25.1021",
    "B1-1": "2.25.2011",
    "B1-2": "2.25.2012",
}
H31_STUDY = "1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"
RUSS_STUDY = "1.3.6.1.4.1.5962.1.2.0.1175775772.5729.0"
#: The Cyrillic (ISO_IR 144) Patient's Name of chrRuss.dcm, as pydicom decodes it.
RUSS_NAME = str(pydicom.dcmread(DATA / "charset_files" / "chrRuss.dcm").PatientName)

#: Attributes every result carries, per table of PS3.18 10.6.3.3 (Timezone
#: Offset From UTC only when known, so it is not in these lists).
STUDY_TAGS = {
    "00080005",  # SpecificCharacterSet
    "00080020",  # StudyDate
    "00080030",  # StudyTime
    "00080050",  # AccessionNumber
    "00080056",  # InstanceAvailability
    "00080061",  # ModalitiesInStudy
    "00080090",  # ReferringPhysicianName
    "00081190",  # RetrieveURL
    "00100010",  # PatientName
    "00100020",  # PatientID
    "00100030",  # PatientBirthDate
    "00100040",  # PatientSex
    "0020000D",  # StudyInstanceUID
    "00200010",  # StudyID
    "00201206",  # NumberOfStudyRelatedSeries
    "00201208",  # NumberOfStudyRelatedInstances
}
SERIES_TAGS = {
    "00080005",
    "00080060",  # Modality
    "0008103E",  # SeriesDescription
    "00081190",
    "0020000E",  # SeriesInstanceUID
    "00200011",  # SeriesNumber
    "00201209",  # NumberOfSeriesRelatedInstances
    "00400244",  # PerformedProcedureStepStartDate
    "00400245",  # PerformedProcedureStepStartTime
    "00400275",  # RequestAttributesSequence
}
INSTANCE_TAGS = {
    "00080005",
    "00080016",  # SOPClassUID
    "00080018",  # SOPInstanceUID
    "00080056",
    "00081190",
    "00200013",  # InstanceNumber
    "00280008",  # NumberOfFrames
    "00280010",  # Rows
    "00280011",  # Columns
    "00280100",  # BitsAllocated
}
#: Study attributes that are not also series or instance attributes.
STUDY_ONLY = STUDY_TAGS - SERIES_TAGS - INSTANCE_TAGS - {"0020000D"}
SERIES_ONLY = SERIES_TAGS - STUDY_TAGS - INSTANCE_TAGS - {"0020000E"}


# --------------------------------------------------------------------------
# data


def make_instance(study: str, series: str, sop: str, **values: Any) -> bytes:
    """A Part 10 file with the given UIDs and attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
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


STUDY_A_VALUES: dict[str, Any] = {
    "PatientName": "Doe^John",
    "PatientID": "PID-A",
    "PatientBirthDate": "19700101",
    "PatientSex": "M",
    "StudyDate": "20200115",
    "StudyTime": "103000",
    "AccessionNumber": "ACC-A",
    "StudyID": "SID-A",
    "StudyDescription": "Chest CT",
    "ReferringPhysicianName": "Ref^Alpha",
    "TimezoneOffsetFromUTC": "+0100",
}
STUDY_B_VALUES: dict[str, Any] = {
    "PatientName": "Smith^Jane",
    "PatientID": "PID-B",
    "PatientBirthDate": "19800202",
    "PatientSex": "F",
    "StudyDate": "20210620",
    "StudyTime": "080000",
    "AccessionNumber": "ACC-B",
    "StudyID": "SID-B",
    "StudyDescription": "Head MR",
    "ReferringPhysicianName": "Ref^Beta",
}


def generated_files() -> Iterator[bytes]:
    a1 = {
        **STUDY_A_VALUES,
        "SOPClassUID": CT_IMAGE,
        "Modality": "CT",
        "SeriesNumber": 1,
        "SeriesDescription": "Axial",
        "BodyPartExamined": "CHEST",
        "PerformedProcedureStepStartDate": "20200115",
        "PerformedProcedureStepStartTime": "103500",
        "RequestAttributesSequence": request_attributes("SPS-1", "RP-1"),
        "Rows": 512,
        "Columns": 512,
        "BitsAllocated": 16,
    }
    for number in (1, 2, 3):
        yield make_instance(STUDY_A, SERIES_A1, SOP[f"A1-{number}"], InstanceNumber=number, **a1)
    yield make_instance(
        STUDY_A,
        SERIES_A2,
        SOP["A2-1"],
        **STUDY_A_VALUES,
        SOPClassUID=MR_IMAGE,
        Modality="MR",
        SeriesNumber=2,
        SeriesDescription="Localizer",
        PerformedProcedureStepStartDate="20200116",
        PerformedProcedureStepStartTime="090000",
        RequestAttributesSequence=request_attributes("SPS-2", "RP-2"),
        InstanceNumber=1,
        NumberOfFrames=2,
        Rows=256,
        Columns=256,
        BitsAllocated=16,
    )
    for number in (1, 2):
        yield make_instance(
            STUDY_B,
            SERIES_B1,
            SOP[f"B1-{number}"],
            **STUDY_B_VALUES,
            SOPClassUID=MR_IMAGE,
            Modality="MR",
            SeriesNumber=1,
            InstanceNumber=number,
            Rows=128,
            Columns=128,
            BitsAllocated=8,
        )


def start_server(tmp_path: Path, **environ: str) -> Iterator[LiveServer]:
    """An empty appliance on loopback, as the ``live_server`` fixture starts
    it, with extra ``APPLIANCE_*`` settings."""
    yield from started_server(make_config(tmp_path, **environ))


def load(services: Services) -> None:
    for blob in generated_files():
        result = services.ingest.store_part10(io.BytesIO(blob), ORIGIN)
        assert result.status == 0, result
    for name in ("chrH31.dcm", "chrRuss.dcm"):
        with (DATA / "charset_files" / name).open("rb") as f:
            result = services.ingest.store_part10(f, ORIGIN)
        assert result.status == 0, result


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One appliance holding the test data, for every read-only test here."""
    for live in start_server(tmp_path_factory.mktemp("qido")):
        load(live.services)
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(url=server.root)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root, timeout=10) as session:
        yield session


def value(result: dict[str, Any], tag: str) -> Any:
    """The first value of *tag* in a DICOM JSON result, or None."""
    values = result.get(tag, {}).get("Value")
    return values[0] if values else None


def uids(results: list[dict[str, Any]], tag: str) -> set[str]:
    return {value(result, tag) for result in results}


def raw_get(server: LiveServer, target: str) -> tuple[int, dict[str, Any]]:
    """GET *target* sent exactly as written (no client-side dot-segment
    removal, which httpx performs)."""
    parts = urlsplit(server.base_url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def assert_bad_request(response: httpx.Response, *words: str) -> None:
    """A 400 with a JSON reason naming *words*, and no stack trace."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["status"] == 400
    for word in words:
        assert word in body["error"], body
    assert "Traceback" not in response.text


def assert_alive(http: httpx.Client) -> None:
    response = http.get("/studies", params={"limit": 1})
    assert response.status_code == 200


# --------------------------------------------------------------------------
# default return attributes (PS3.18 10.6.3.3)


def test_studies_carry_table_10_6_3_3_attributes(
    client: DICOMwebClient, server: LiveServer
) -> None:
    results = client.search_for_studies()
    assert uids(results, "0020000D") == {STUDY_A, STUDY_B, H31_STUDY, RUSS_STUDY}
    for result in results:
        assert set(result) >= STUDY_TAGS
        assert list(result) == sorted(result), "elements in tag order"
        assert value(result, "00080005") == "ISO_IR 192"
        assert value(result, "00080056") == "ONLINE"
        assert not set(result) & SERIES_ONLY
    study_a = next(r for r in results if value(r, "0020000D") == STUDY_A)
    assert study_a["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert study_a["00201206"] == {"vr": "IS", "Value": [2]}
    assert study_a["00201208"] == {"vr": "IS", "Value": [4]}
    assert study_a["00080201"] == {"vr": "SH", "Value": ["+0100"]}
    assert study_a["00080020"] == {"vr": "DA", "Value": ["20200115"]}
    # dicomweb-client sends a Host header without the port, and the URL is
    # built from the Host the client used: compare the path here, the whole
    # URL below with httpx
    assert value(study_a, "00081190").endswith(f"/v1/studies/{STUDY_A}")
    study_b = next(r for r in results if value(r, "0020000D") == STUDY_B)
    assert "00080201" not in study_b, "TimezoneOffsetFromUTC only when known"


def test_series_of_all_studies_carry_the_study_attributes(
    client: DICOMwebClient, server: LiveServer
) -> None:
    results = client.search_for_series(search_filters={"StudyInstanceUID": STUDY_A})
    assert uids(results, "0020000E") == {SERIES_A1, SERIES_A2}
    for result in results:
        assert set(result) >= SERIES_TAGS | STUDY_TAGS
    a1 = next(r for r in results if value(r, "0020000E") == SERIES_A1)
    assert a1["00400275"] == {
        "vr": "SQ",
        "Value": [
            {
                "00400009": {"vr": "SH", "Value": ["SPS-1"]},
                "00401001": {"vr": "SH", "Value": ["RP-1"]},
            }
        ],
    }
    assert a1["00201209"] == {"vr": "IS", "Value": [3]}
    assert a1["00200011"] == {"vr": "IS", "Value": [1]}
    assert value(a1, "00081190").endswith(f"/v1/studies/{STUDY_A}/series/{SERIES_A1}")


def test_series_of_one_study_leave_out_the_study_attributes(client: DICOMwebClient) -> None:
    results = client.search_for_series(study_instance_uid=STUDY_A)
    assert uids(results, "0020000E") == {SERIES_A1, SERIES_A2}
    for result in results:
        assert set(result) >= SERIES_TAGS
        assert value(result, "0020000D") == STUDY_A, "the study UID names the place"
        assert not set(result) & STUDY_ONLY


def test_instances_by_route(client: DICOMwebClient, server: LiveServer) -> None:
    everywhere = client.search_for_instances()
    assert len(everywhere) == 8
    for result in everywhere:
        assert set(result) >= INSTANCE_TAGS | SERIES_TAGS | STUDY_TAGS

    of_study = client.search_for_instances(study_instance_uid=STUDY_A)
    assert uids(of_study, "00080018") == {SOP[k] for k in ("A1-1", "A1-2", "A1-3", "A2-1")}
    for result in of_study:
        assert set(result) >= INSTANCE_TAGS | SERIES_TAGS
        assert not set(result) & STUDY_ONLY

    of_series = client.search_for_instances(
        study_instance_uid=STUDY_A, series_instance_uid=SERIES_A2
    )
    assert len(of_series) == 1
    (only,) = of_series
    assert set(only) >= INSTANCE_TAGS
    assert not set(only) & (STUDY_ONLY | SERIES_ONLY)
    assert value(only, "0020000D") == STUDY_A
    assert value(only, "0020000E") == SERIES_A2
    assert only["00280008"] == {"vr": "IS", "Value": [2]}
    assert only["00280010"] == {"vr": "US", "Value": [256]}
    assert only["00080016"] == {"vr": "UI", "Value": [MR_IMAGE]}
    assert value(only, "00081190").endswith(
        f"/v1/studies/{STUDY_A}/series/{SERIES_A2}/instances/{SOP['A2-1']}"
    )
    single_frame = next(r for r in everywhere if value(r, "00080018") == SOP["B1-1"])
    assert single_frame["00280008"] == {"vr": "IS"}, "an empty attribute has no Value"


def test_retrieve_url_is_built_from_the_service_root(
    http: httpx.Client, server: LiveServer
) -> None:
    """Retrieve URL (0008,1190): the WADO-RS resource of each result, under
    the service root the client used (PS3.18 10.6.3.3)."""
    root = server.root
    expected = {
        f"/studies?StudyInstanceUID={STUDY_B}": f"{root}/studies/{STUDY_B}",
        f"/studies/{STUDY_B}/series": f"{root}/studies/{STUDY_B}/series/{SERIES_B1}",
        f"/series?SeriesInstanceUID={SERIES_B1}": f"{root}/studies/{STUDY_B}/series/{SERIES_B1}",
        f"/instances?SOPInstanceUID={SOP['B1-1']}": (
            f"{root}/studies/{STUDY_B}/series/{SERIES_B1}/instances/{SOP['B1-1']}"
        ),
    }
    for target, url in expected.items():
        response = http.get(target)
        assert response.status_code == 200
        (result,) = response.json()
        assert result["00081190"] == {"vr": "UR", "Value": [url]}


# --------------------------------------------------------------------------
# matching keys of PS3.18 Table 10.6.1-5, by keyword and by tag

STUDY_KEYS = [
    ("StudyDate", "00080020", "20200115", {STUDY_A}),
    ("StudyTime", "00080030", "103000", {STUDY_A}),
    ("AccessionNumber", "00080050", "ACC-B", {STUDY_B}),
    ("ModalitiesInStudy", "00080061", "CT", {STUDY_A}),
    ("ReferringPhysicianName", "00080090", "Ref^Beta", {STUDY_B}),
    ("PatientName", "00100010", "Smith^Jane", {STUDY_B}),
    ("PatientID", "00100020", "PID-A", {STUDY_A}),
    ("StudyInstanceUID", "0020000D", STUDY_B, {STUDY_B}),
    ("StudyID", "00200010", "SID-A", {STUDY_A}),
]
SERIES_KEYS = [
    ("Modality", "00080060", "CT", {SERIES_A1}),
    ("SeriesInstanceUID", "0020000E", SERIES_A2, {SERIES_A2}),
    ("SeriesNumber", "00200011", "2", {SERIES_A2}),
    ("PerformedProcedureStepStartDate", "00400244", "20200116", {SERIES_A2}),
    ("PerformedProcedureStepStartTime", "00400245", "103500", {SERIES_A1}),
    (
        "RequestAttributesSequence.ScheduledProcedureStepID",
        "00400275.00400009",
        "SPS-2",
        {SERIES_A2},
    ),
    ("RequestAttributesSequence.RequestedProcedureID", "00400275.00401001", "RP-1", {SERIES_A1}),
]
INSTANCE_KEYS = [
    ("SOPClassUID", "00080016", CT_IMAGE, {SOP["A1-1"], SOP["A1-2"], SOP["A1-3"]}),
    ("SOPInstanceUID", "00080018", SOP["B1-2"], {SOP["B1-2"]}),
    ("InstanceNumber", "00200013", "2", {SOP["A1-2"], SOP["B1-2"]}),
]


@pytest.mark.parametrize("by", ["keyword", "tag"])
@pytest.mark.parametrize(("keyword", "tag", "key", "expected"), STUDY_KEYS)
def test_study_matching_keys(
    client: DICOMwebClient, by: str, keyword: str, tag: str, key: str, expected: set[str]
) -> None:
    results = client.search_for_studies(search_filters={keyword if by == "keyword" else tag: key})
    assert uids(results, "0020000D") == expected
    for result in results:
        assert tag in result, "a matching key is returned"


@pytest.mark.parametrize("by", ["keyword", "tag"])
@pytest.mark.parametrize(("keyword", "tag", "key", "expected"), SERIES_KEYS)
def test_series_matching_keys(
    client: DICOMwebClient, by: str, keyword: str, tag: str, key: str, expected: set[str]
) -> None:
    results = client.search_for_series(search_filters={keyword if by == "keyword" else tag: key})
    assert uids(results, "0020000E") == expected
    for result in results:
        assert tag.split(".")[0] in result, "a matching key is returned"


@pytest.mark.parametrize("by", ["keyword", "tag"])
@pytest.mark.parametrize(("keyword", "tag", "key", "expected"), INSTANCE_KEYS)
def test_instance_matching_keys(
    client: DICOMwebClient, by: str, keyword: str, tag: str, key: str, expected: set[str]
) -> None:
    results = client.search_for_instances(search_filters={keyword if by == "keyword" else tag: key})
    assert uids(results, "00080018") == expected


def test_study_keys_select_series_and_instances(client: DICOMwebClient) -> None:
    """Hierarchical search: keys of the levels above (PS3.4 C.4.1.2.1)."""
    series = client.search_for_series(search_filters={"PatientID": "PID-B"})
    assert uids(series, "0020000E") == {SERIES_B1}
    instances = client.search_for_instances(
        study_instance_uid=STUDY_A, search_filters={"Modality": "MR"}
    )
    assert uids(instances, "00080018") == {SOP["A2-1"]}


# --------------------------------------------------------------------------
# wild card, range and UID list matching


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientName": "doe*"}, {STUDY_A}),  # PN: case-insensitive
        ({"AccessionNumber": "ACC-?"}, {STUDY_A, STUDY_B}),
        ({"StudyDescription": "*MR"}, {STUDY_B}),
        ({"PatientName": "*"}, {STUDY_A, STUDY_B, H31_STUDY, RUSS_STUDY}),
        ({"StudyDate": "20200101-20201231"}, {STUDY_A}),
        ({"StudyDate": "-20200630"}, {STUDY_A}),
        ({"StudyDate": "20210101-"}, {STUDY_B}),
        ({"StudyTime": "0800-0900"}, {STUDY_B}),
        ({"PatientBirthDate": "19750101-"}, {STUDY_B}),
        ({"ModalitiesInStudy": "MR"}, {STUDY_A, STUDY_B}),
        ({"ModalitiesInStudy": "CT,OT"}, {STUDY_A, H31_STUDY, RUSS_STUDY}),
        ({"StudyInstanceUID": [STUDY_A, STUDY_B]}, {STUDY_A, STUDY_B}),  # repeated
        ({"StudyInstanceUID": f"{STUDY_A},{H31_STUDY}"}, {STUDY_A, H31_STUDY}),  # comma
        ({"PatientName": RUSS_NAME}, {RUSS_STUDY}),
        ({"PatientName": "Yamada^Tarou"}, {H31_STUDY}),
        ({"PatientID": "NOPE"}, set()),
    ],
)
def test_matching_rules(
    client: DICOMwebClient, filters: dict[str, Any], expected: set[str]
) -> None:
    assert uids(client.search_for_studies(search_filters=filters), "0020000D") == expected


def test_empty_value_is_universal_and_returned(http: httpx.Client) -> None:
    response = http.get("/studies", params={"IssuerOfPatientID": "", "StudyID": "SID-A"})
    assert response.status_code == 200
    (result,) = response.json()
    assert result["00100021"] == {"vr": "LO"}, "asked for, so returned (empty)"


def test_no_match_is_200_with_an_empty_array(http: httpx.Client, tmp_path: Path) -> None:
    response = http.get("/studies", params={"PatientID": "NOBODY"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    assert response.json() == []
    for empty in start_server(tmp_path):
        response = httpx.get(f"{empty.root}/instances")
        assert (response.status_code, response.json()) == (200, [])
        assert DICOMwebClient(url=empty.root).search_for_series() == []


# --------------------------------------------------------------------------
# includefield (PS3.18 8.3.4.3)


def test_includefield_list(client: DICOMwebClient) -> None:
    results = client.search_for_studies(
        search_filters={"StudyInstanceUID": STUDY_A},
        fields=["StudyDescription", "00100021", "PatientAge", "Modality"],
    )
    (result,) = results
    assert result["00081030"] == {"vr": "LO", "Value": ["Chest CT"]}
    assert result["00100021"] == {"vr": "LO"}
    assert "00101010" not in result, "an attribute the index does not hold is ignored"
    assert "00080060" not in result, "a series attribute is not held at the study level"


def test_includefield_comma_separated_and_sequence_path(http: httpx.Client) -> None:
    response = http.get(
        f"/studies/{STUDY_A}/series/{SERIES_A1}/instances",
        params={"includefield": "BodyPartExamined,00400275.00400009", "limit": 1},
    )
    assert response.status_code == 200
    (result,) = response.json()
    assert result["00180015"] == {"vr": "CS", "Value": ["CHEST"]}
    assert value(result, "00400275")["00400009"] == {"vr": "SH", "Value": ["SPS-1"]}


def test_includefield_of_an_unknown_tag_is_ignored(http: httpx.Client) -> None:
    response = http.get(
        "/studies", params={"StudyID": "SID-B", "includefield": ["00091001", "7FE10010"]}
    )
    assert response.status_code == 200
    (result,) = response.json()
    assert "00091001" not in result
    assert "7FE10010" not in result


def test_includefield_all(client: DICOMwebClient) -> None:
    results = client.search_for_instances(
        search_filters={"SOPInstanceUID": SOP["A1-1"]}, fields=["all"]
    )
    (result,) = results
    assert result["00083002"] == {"vr": "UI", "Value": [ExplicitVRLittleEndian]}
    assert value(result, "00180015") == "CHEST"
    assert value(result, "00081030") == "Chest CT"
    assert value(result, "0008103E") == "Axial"
    assert value(result, "00080005") == "ISO_IR 192"
    assert not any(tag.startswith("0002") for tag in result), "no File Meta element"


# --------------------------------------------------------------------------
# paging (PS3.18 8.3.4.4) and fuzzy matching (8.3.4.2)


def test_limit_offset_and_the_warning(http: httpx.Client, server: LiveServer) -> None:
    seen: list[str] = []
    for offset in (0, 3, 6):
        response = http.get("/instances", params={"limit": 3, "offset": offset})
        assert response.status_code == 200
        page = response.json()
        seen.extend(value(result, "00080018") for result in page)
        warning = response.headers.get("warning")
        if offset < 6:
            assert len(page) == 3
            assert warning == (
                f'299 {server.root}: "There are additional results that can be requested."'
            )
        else:
            assert len(page) == 2
            assert warning is None
    assert len(seen) == len(set(seen)) == 8
    beyond = http.get("/instances", params={"offset": 100})
    assert (beyond.status_code, beyond.json()) == (200, [])


def test_client_paging_gets_everything(client: DICOMwebClient) -> None:
    results = client.search_for_instances(limit=2, get_remaining=True)
    assert len(uids(results, "00080018")) == 8


def test_server_maximum(tmp_path: Path) -> None:
    for small in start_server(tmp_path, APPLIANCE_QUERY_MAX_RESULTS="2"):
        load(small.services)
        maximum = (
            f'299 {small.root}: "The number of results exceeded the maximum supported by '
            'the server. Additional results can be requested."'
        )
        for params in ({}, {"limit": 50}):
            response = httpx.get(f"{small.root}/instances", params=params)
            assert response.status_code == 200
            assert len(response.json()) == 2
            assert response.headers.get("warning") == maximum
        response = httpx.get(f"{small.root}/studies", params={"limit": 2, "offset": 2})
        assert len(response.json()) == 2
        assert "warning" not in response.headers


def test_fuzzymatching_is_accepted_and_ignored_with_a_warning(
    http: httpx.Client, client: DICOMwebClient, server: LiveServer
) -> None:
    response = http.get("/studies", params={"fuzzymatching": "true", "PatientName": "Doe^John"})
    assert response.status_code == 200
    assert uids(response.json(), "0020000D") == {STUDY_A}
    assert response.headers.get("warning") == (
        f'299 {server.root}: "The fuzzymatching parameter is not supported. '
        'Only literal matching has been performed."'
    )
    response = http.get("/studies", params={"fuzzymatching": "false"})
    assert response.status_code == 200
    assert "warning" not in response.headers
    assert len(client.search_for_studies(fuzzymatching=True)) == 4
    assert_bad_request(http.get("/studies", params={"fuzzymatching": "yes"}), "fuzzymatching")


# --------------------------------------------------------------------------
# the DICOM JSON Model: PN component groups, UTF-8 (PS3.18 Annex F)


def test_person_name_groups_and_utf8(http: httpx.Client) -> None:
    response = http.get("/studies", params={"StudyInstanceUID": f"{H31_STUDY},{RUSS_STUDY}"})
    assert response.status_code == 200
    raw = response.content
    assert "山田^太郎".encode() in raw, "UTF-8, not escapes nor ISO 2022"
    assert RUSS_NAME.encode() in raw
    by_study = {value(r, "0020000D"): r for r in json.loads(raw.decode("utf-8"))}
    assert by_study[H31_STUDY]["00100010"] == {
        "vr": "PN",
        "Value": [
            {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
        ],
    }
    assert by_study[RUSS_STUDY]["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": RUSS_NAME}]}
    assert value(by_study[H31_STUDY], "00080005") == "ISO_IR 192"


def test_json_model_agrees_with_pydicom() -> None:
    ds = Dataset()
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.InstanceNumber = "7"
    ds.Rows = 512
    ds.StudyDate = ""
    ds.RequestAttributesSequence = request_attributes("SPS-9", "")
    ours = to_json_dataset(
        {
            "StudyDate": "",
            "Rows": 512,
            "InstanceNumber": "007",
            "ModalitiesInStudy": "CT\\MR",
            "PatientName": "Yamada^Tarou=山田^太郎",
            "RequestAttributesSequence": [
                {"ScheduledProcedureStepID": "SPS-9", "RequestedProcedureID": ""}
            ],
        }
    )
    assert ours == ds.to_json_dict()
    assert list(ours) == sorted(ours)


# --------------------------------------------------------------------------
# refusals: 400 with a reason naming the parameter, and the server goes on


@pytest.mark.parametrize(
    ("path", "params", "words"),
    [
        ("/studies", {"Foo": "1"}, ["Foo", "unknown"]),
        ("/studies", {"patientname": "x"}, ["patientname"]),
        ("/studies", {"00091234": "x"}, ["00091234"]),
        ("/studies", {"StudyDate": "2020-2019"}, ["StudyDate"]),
        ("/studies", {"StudyDate": "20200101-20191231"}, ["StudyDate", "after"]),
        ("/studies", {"00080020": "20201301"}, ["00080020", "StudyDate"]),
        ("/studies", {"StudyTime": "25"}, ["StudyTime"]),
        ("/studies", {"StudyInstanceUID": "1.2.*"}, ["StudyInstanceUID"]),
        ("/studies", {"StudyInstanceUID": "1.02"}, ["StudyInstanceUID"]),
        ("/studies", {"limit": "x"}, ["limit"]),
        ("/studies", {"limit": "-1"}, ["limit"]),
        ("/studies", {"limit": "0"}, ["limit"]),
        ("/studies", {"offset": "1.5"}, ["offset"]),
        ("/studies", {"limit": ["1", "2"]}, ["limit"]),
        ("/studies", {"Modality": "CT"}, ["Modality", "SERIES", "ModalitiesInStudy"]),
        ("/series", {"SOPInstanceUID": SOP["A1-1"]}, ["SOPInstanceUID", "IMAGE"]),
        ("/studies", {"PatientAge": "040Y"}, ["PatientAge", "not a supported"]),
        ("/studies", {"NumberOfStudyRelatedSeries": "2"}, ["NumberOfStudyRelatedSeries"]),
        ("/series", {"ReferencedSeriesSequence.SeriesInstanceUID": "1.2"}, ["sequence"]),
        ("/studies", {"PatientID": ["A", "B"]}, ["PatientID", "more than once"]),
        ("/studies", {"PatientID": "A", "00100020": "B"}, ["more than once"]),
        ("/studies", {"SeriesNumber": "x"}, ["SeriesNumber"]),
        ("/instances", {"InstanceNumber": "one"}, ["InstanceNumber"]),
        ("/studies", {"PatientName": "a\0b"}, ["PatientName", "NUL"]),
        (f"/studies/{STUDY_A}/series", {"StudyInstanceUID": STUDY_B}, ["path"]),
        ("/studies", {"includefield": "NoSuchKeyword"}, ["includefield", "NoSuchKeyword"]),
        ("/studies", {"emptyvaluematching": "true"}, ["emptyvaluematching"]),
    ],
)
def test_bad_requests(
    http: httpx.Client, path: str, params: dict[str, Any], words: list[str]
) -> None:
    assert_bad_request(http.get(path, params=params), *words)
    assert_alive(http)


def test_logs_name_parameters_never_values(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Queries carry patient names: our log lines (and error reasons) name
    the parameters only.  werkzeug's own request log in this test server is
    not ours; gunicorn's access log format leaves the query string out."""
    with caplog.at_level(logging.DEBUG):
        found = http.get("/studies", params={"PatientName": "Doe^John", "PatientID": "PID-A"})
        refused = http.get("/studies", params={"PatientBirthDate": "Secret^Value"})
    assert found.status_code == 200
    assert refused.status_code == 400
    assert "Secret" not in refused.json()["error"]
    ours = "\n".join(
        record.getMessage() for record in caplog.records if record.name.startswith("dicomweb")
    )
    assert "PatientName" in ours
    assert "PatientBirthDate" in ours
    for secret in ("Doe", "PID-A", "Secret"):
        assert secret not in ours


def test_accepted_but_harmless_parameters(http: httpx.Client) -> None:
    response = http.get(
        "/studies",
        params={"emptyvaluematching": "false", "multiplevaluematching": "false", "PatientID": ""},
    )
    assert response.status_code == 200
    assert len(response.json()) == 4


@pytest.mark.parametrize(
    "target",
    [
        "/v1/studies/../series",
        "/v1/studies/..%2F..%2Fetc/series",
        "/v1/studies/1.2%00/series",
        "/v1/studies/1.2.3/series/..%00/instances",
        f"/v1/studies/{'1' * 65}/instances",
        "/v1/studies/1.2.abc/series",
    ],
)
def test_bad_uids_in_the_path(server: LiveServer, http: httpx.Client, target: str) -> None:
    status, body = raw_get(server, target)
    assert status == 400, body
    assert body["status"] == 400
    assert_alive(http)


def test_valid_but_unknown_uid_in_the_path_is_an_empty_result(http: httpx.Client) -> None:
    response = http.get("/studies/1.2.3.4/series/5.6.7/instances")
    assert (response.status_code, response.json()) == (200, [])


# --------------------------------------------------------------------------
# content negotiation


@pytest.mark.parametrize(
    ("accept", "status", "media_type"),
    [
        (None, 200, "application/dicom+json"),
        ("*/*", 200, "application/dicom+json"),
        ("application/dicom+json", 200, "application/dicom+json"),
        ("application/dicom+json; charset=utf-8", 200, "application/dicom+json"),
        ("application/json", 200, "application/json"),
        ("application/dicom+json;q=0, */*;q=0.5", 200, "application/json"),
        ('multipart/related; type="application/dicom+xml"', 406, None),
        ("application/dicom+xml", 406, None),
        ("text/html", 406, None),
    ],
)
def test_accept(
    server: LiveServer, accept: str | None, status: int, media_type: str | None
) -> None:
    headers = {} if accept is None else {"Accept": accept}
    with httpx.Client(base_url=server.root, headers=headers, timeout=10) as session:
        if accept is None:
            del session.headers["Accept"]
        response = session.get("/studies", params={"limit": 1})
    assert response.status_code == status, response.text
    if media_type is not None:
        assert response.headers["content-type"] == media_type
        assert len(response.json()) == 1
    else:
        assert "Traceback" not in response.text
