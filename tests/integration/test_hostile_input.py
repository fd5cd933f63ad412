"""Hostile input at the protocol edges (issue 9, "Hostile input").

Each vector gets a bounded answer (a DICOM status, a 4xx with a reason) and
the service answers the next, ordinary request: forged element lengths and
deeply nested sequences by STOW-RS and C-STORE, a multipart body of very
many tiny parts, and injection (SQL metacharacters, path separators, NUL,
over-long and non-UTF-8 values) at every URL and query entry point.
"""

from __future__ import annotations

import re
import struct
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from appliance.status import Status
from tests.conftest import (
    LiveAppliance,
    LiveServer,
    appliance_config,
    make_config,
    started_appliance,
    started_server,
)
from tests.helpers import part10_of, small_study, stow

pytestmark = pytest.mark.integration

CANNOT_UNDERSTAND = int(Status.CANNOT_UNDERSTAND)  # 0xC000
FAILURE_REASON = "00081197"
FAILED_SOP_SEQUENCE = "00081198"


# --------------------------------------------------------------------------
# hostile Part 10 files


def _with_element(element: bytes) -> tuple[bytes, str]:
    """A small CT instance with *element* inserted before its Pixel Data;
    the bytes and its Study Instance UID."""
    ds = small_study(1)[0]
    raw = part10_of(ds)
    at = raw.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010), explicit VR little endian
    return raw[:at] + element + raw[at:], str(ds.StudyInstanceUID)


def forged_length(vr: bytes, length: int) -> bytes:
    """A private element (0011,1010) whose header claims *length* bytes
    (the file holds a few)."""
    creator = b"\x11\x00\x10\x00LO\x04\x00ACME"
    if vr in (b"OB", b"UN", b"UT", b"SQ"):
        header = struct.pack("<HH2sHI", 0x0011, 0x1010, vr, 0, length)
    else:
        header = struct.pack("<HH2sH", 0x0011, 0x1010, vr, length)
    return creator + header + b"abcd"


def nested(depth: int, *, defined: bool) -> bytes:
    """Content Sequence (0040,A730) nested *depth* levels deep, each level
    one item holding the next sequence."""
    if defined:
        inner = b""
        for _ in range(depth):
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
        return inner
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


HOSTILE_FILES = {
    "OB claims 0xFFFFFFF0": lambda: forged_length(b"OB", 0xFFFFFFF0),
    "OB claims 0xFFFFFFFE": lambda: forged_length(b"OB", 0xFFFFFFFE),
    "UN claims 2^31": lambda: forged_length(b"UN", 0x80000000),
    "UT claims 2^31-1": lambda: forged_length(b"UT", 0x7FFFFFFF),
    "SQ claims 2^31-16": lambda: forged_length(b"SQ", 0x7FFFFFF0),
    "LO claims 0xFFFE": lambda: forged_length(b"LO", 0xFFFE),
    "10,000 undefined-length levels": lambda: nested(10_000, defined=False),
    "10,000 defined-length levels": lambda: nested(10_000, defined=True),
    "65 levels": lambda: nested(65, defined=False),
}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAppliance]:
    """Both edges live over one empty store, shared by this module's tests."""
    yield from started_appliance(appliance_config(tmp_path_factory.mktemp("hostile")))


def _still_serving(server: LiveServer) -> None:
    """An ordinary STOW-RS and QIDO-RS still succeed."""
    ds = small_study(1)[0]
    assert stow(server.base_url, part10_of(ds)).status_code == 200
    found = httpx.get(f"{server.root}/studies", params={"StudyInstanceUID": ds.StudyInstanceUID})
    assert found.status_code == 200
    assert len(found.json()) == 1


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_stow_refuses_forged_lengths_and_deep_nesting(appliance: LiveAppliance, name: str) -> None:
    data, study = _with_element(HOSTILE_FILES[name]())
    started = time.monotonic()
    response = stow(appliance.base_url, data)
    assert time.monotonic() - started < 10
    assert response.status_code == 409, response.text
    failed = response.json()[FAILED_SOP_SEQUENCE]["Value"][0]
    assert failed[FAILURE_REASON]["Value"] == [CANNOT_UNDERSTAND]
    # nothing of it was kept
    assert httpx.get(f"{appliance.root}/studies/{study}/metadata").status_code == 404
    _still_serving(appliance)


def _fuzz_findings() -> list[bytes]:
    """The instances fuzzing (tests/fuzz) found escaping ingest with an
    exception pydicom raised (BytesLengthException): now refused."""
    from tests.fuzz import inputs

    wrong_vr_uid = inputs.part10(
        b"\x08\x00\x05\x00CS\x00\x00\x08\x00\x16\x00AE\x00\x00 \x00\r\x00US\t\x00" + b"\x00" * 10
    )
    data = part10_of(small_study(1)[0])
    short_group_length = data[:133] + b"\x00\x00\x00\x00\x00\x00\x01\x00"
    return [wrong_vr_uid, short_group_length]


def test_fuzz_findings_are_refused_by_stow_rs(appliance: LiveAppliance) -> None:
    for data in _fuzz_findings():
        response = stow(appliance.base_url, data)
        assert response.status_code == 409, response.text
        reason = response.json()[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"][0]
        assert reason >> 12 in (0xA, 0xC), hex(reason)
    _still_serving(appliance)


def test_atheris_finding_is_answered_by_stow_rs(appliance: LiveAppliance) -> None:
    """A File Meta element of the unknown VR "SI" (found by atheris, kept in
    tests/fuzz/corpus/part10) made ingest raise NotImplementedError, a 500:
    the instance is now read (its File Meta is not the appliance's own, so
    no sending AE is taken from it)."""
    path = Path(__file__).parent.parent / "fuzz/corpus/part10/crash-unknown-vr-in-file-meta"
    response = stow(appliance.base_url, path.read_bytes())
    assert response.status_code in (200, 409), response.text
    _still_serving(appliance)


def test_nesting_within_the_limit_is_stored_and_rendered(appliance: LiveAppliance) -> None:
    data, study = _with_element(nested(60, defined=False))
    assert stow(appliance.base_url, data).status_code == 200
    metadata = httpx.get(f"{appliance.root}/studies/{study}/metadata")
    assert metadata.status_code == 200
    assert "0040A730" in metadata.json()[0]


@pytest.mark.parametrize("name", ["UN claims 2^31", "10,000 undefined-length levels"])
def test_c_store_refuses_forged_lengths_and_deep_nesting(
    appliance: LiveAppliance, tmp_path: Path, name: str
) -> None:
    """pynetdicom sends a file given by path as its bytes, undecoded: the
    data set reaches the appliance as forged; C-STORE answers 0xC000
    (PS3.4 Table B.2-1, Error: Cannot Understand) and the association
    carries on."""
    data, study = _with_element(HOSTILE_FILES[name]())
    path = tmp_path / "hostile.dcm"
    path.write_bytes(data)
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", appliance.dimse_port, ae_title=appliance.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        assert status.Status == CANNOT_UNDERSTAND
        ordinary = small_study(1)[0]
        ordinary.SOPClassUID = CTImageStorage
        assert assoc.send_c_store(ordinary).Status == Status.SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    assert httpx.get(f"{appliance.root}/studies/{study}/metadata").status_code == 404


# --------------------------------------------------------------------------
# a multipart body of very many parts


@pytest.fixture
def few_parts_server(tmp_path: Path) -> Iterator[LiveServer]:
    yield from started_server(make_config(tmp_path, APPLIANCE_HTTP_MAX_PARTS="5"))


def test_more_parts_than_max_parts_is_413_with_what_was_stored(
    few_parts_server: LiveServer,
) -> None:
    instances = [part10_of(ds) for ds in small_study(6)]
    response = stow(few_parts_server.base_url, *instances)
    assert response.status_code == 413
    assert "http.max_parts (5)" in response.json()["error"]
    assert "5 instance(s)" in response.json()["error"]
    _still_serving(few_parts_server)


def test_a_million_tiny_parts_are_cut_off_at_max_parts(live_server: LiveServer) -> None:
    """1,000,000 parts of one byte (12 MB): the default http.max_parts
    (10,000) stops the request after 10,000 refusals, in bounded time."""
    boundary = "b"
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    body = b"--b\r\n\r\nx\r\n" * 1_000_000 + b"--b--\r\n"
    started = time.monotonic()
    try:
        response = httpx.post(
            f"{live_server.root}/studies",
            content=body,
            headers={"Content-Type": content_type},
            timeout=120,
        )
    except httpx.TransportError:
        response = None  # the server may answer and close before the body is sent
    elapsed = time.monotonic() - started
    assert elapsed < 60
    if response is not None:
        assert response.status_code == 413
        assert "http.max_parts (10000)" in response.json()["error"]
    _still_serving(live_server)


# --------------------------------------------------------------------------
# injection at every entry point

HOSTILE_VALUES = [
    "'",
    '"',
    ";",
    "--",
    "%",
    "_",
    "\\",
    "*",
    "../",
    "../../etc/passwd",
    "a/b",
    "\x00",
    "1.2\x00.3",
    "1.2'; DROP TABLE instance;--",
    "1." + "2" * 80,
    "x" * 10_000,
    "%00",
    "%2e%2e",
    "\u00e9\u4e2d",
]


def _quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


PATH_TEMPLATES = [
    ("GET", "/studies/{v}"),
    ("GET", "/studies/{v}/metadata"),
    ("GET", "/studies/{v}/series"),
    ("GET", "/studies/{v}/thumbnail"),
    ("GET", "/studies/{st}/series/{v}"),
    ("GET", "/studies/{st}/series/{v}/instances"),
    ("GET", "/studies/{st}/series/{se}/instances/{v}"),
    ("GET", "/studies/{st}/series/{se}/instances/{v}/metadata"),
    ("GET", "/studies/{st}/series/{se}/instances/{si}/frames/{v}"),
    ("GET", "/studies/{st}/series/{se}/instances/{si}/bulk/{v}"),
    ("DELETE", "/studies/{v}"),
    ("DELETE", "/studies/{st}/series/{se}/instances/{v}"),
    ("POST", "/studies/{v}"),
    ("POST", "/forward/{v}/retry"),
]
QUERY_TEMPLATES = [
    "/studies?PatientID={v}",
    "/studies?PatientName={v}",
    "/studies?StudyInstanceUID={v}",
    "/studies?00100020={v}",
    "/studies?StudyDate={v}",
    "/studies?ModalitiesInStudy={v}",
    "/series?Modality={v}",
    "/instances?SOPInstanceUID={v}",
    "/studies?limit={v}",
    "/studies?offset={v}",
    "/studies?includefield={v}",
    "/studies?fuzzymatching={v}",
    "/studies?{v}=1",
    "/changefeed?offset={v}",
    "/changefeed?limit={v}",
    "/changefeed?startTime={v}",
    "/changefeed?endTime={v}",
    "/changefeed?includemetadata={v}",
]


@pytest.fixture(scope="module")
def stored(appliance: LiveAppliance) -> tuple[str, str, str]:
    ds = small_study(1)[0]
    assert stow(appliance.base_url, part10_of(ds)).status_code == 200
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.mark.parametrize("template", PATH_TEMPLATES, ids=lambda t: f"{t[0]} {t[1]}")
def test_hostile_uids_in_url_paths_get_400_or_404(
    appliance: LiveAppliance, stored: tuple[str, str, str], template: tuple[str, str]
) -> None:
    method, path = template
    st, se, si = stored
    with httpx.Client(base_url=appliance.root, timeout=30) as client:
        for value in [*HOSTILE_VALUES, "%FF"]:
            quoted = value if value == "%FF" else _quoted(value)
            url = path.format(v=quoted, st=st, se=se, si=si)
            response = client.request(
                method, url, headers={"Content-Type": "application/dicom"}, content=b"x"
            )
            assert response.status_code in (400, 404, 405, 409, 415), (url[:120], response.text)
            assert "Traceback" not in response.text
    assert_nothing_outside_storage(appliance)


@pytest.mark.parametrize("template", QUERY_TEMPLATES)
def test_hostile_query_keys_and_values_are_never_a_500(
    appliance: LiveAppliance, stored: tuple[str, str, str], template: str
) -> None:
    with httpx.Client(base_url=appliance.root, timeout=30) as client:
        for value in [*HOSTILE_VALUES, "%FF", "%C3%28"]:
            quoted = value if value.startswith("%") and len(value) > 3 else _quoted(value)
            if value in ("%FF", "%C3%28"):
                quoted = value  # raw bytes that are not UTF-8
            response = client.get(template.format(v=quoted))
            assert response.status_code in (200, 204, 400), (template, value[:40], response.text)
            assert "Traceback" not in response.text
            if response.status_code == 200 and "={v}" in template and value not in ("*", "\\"):
                # '%' and '_' are literal characters (escaped in LIKE), not wild
                # cards: no stored study has them in its values.  ('*' is the
                # DICOM wild card; a lone '\\' is an empty list of values, PS3.5
                # 6.4, i.e. Universal Matching, PS3.4 C.2.2.2.3.)
                assert response.json() == [], (template, value[:40])


def test_a_sop_instance_uid_that_is_a_path_is_refused(appliance: LiveAppliance) -> None:
    """A data set whose UIDs are path fragments is refused (0xA900 family:
    the UIDs are invalid, PS3.5 9.1) and never becomes a file."""
    for value in ("../../etc/passwd", "1.2.3/../../x", "1.2.3\\..\\x", "1." + "2" * 80):
        ds = small_study(1)[0]
        ds.SOPInstanceUID = value
        ds.file_meta.MediaStorageSOPInstanceUID = value
        response = stow(appliance.base_url, part10_of(ds))
        assert response.status_code == 409, response.text
        reason = response.json()[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"][0]
        assert reason >> 8 in (0xA9, 0xC0), hex(reason)
    assert_nothing_outside_storage(appliance)


def assert_nothing_outside_storage(app: LiveServer) -> None:
    """Every file under the test's folder is the index, a blob in the
    storage folder or a day of the audit trail (no ``passwd``, nothing
    written by a hostile name)."""
    root = Path(app.config.storage.path).parent
    for path in root.rglob("*"):
        if path.is_file():
            assert (
                path.name.startswith("index.db")
                or path.is_relative_to(app.config.storage.path)
                or (
                    path.parent == app.config.audit.path
                    and re.fullmatch(r"audit-\d{4}-\d{2}-\d{2}\.jsonl", path.name)
                )
            ), path
            assert "passwd" not in str(path)


def test_the_blobs_are_opaque_keys(appliance: LiveAppliance, stored: tuple[str, str, str]) -> None:
    """No stored blob's path holds a UID: keys come from the index, not
    from what a sender wrote."""
    st, _, si = stored
    blobs = [p for p in Path(appliance.config.storage.path).rglob("*") if p.is_file()]
    assert blobs
    for blob in blobs:
        assert si not in str(blob)
        assert st not in str(blob)
        dcmread(blob, stop_before_pixels=True)


DIMSE_VALUES = [
    "'",
    "1.2'; DROP TABLE instance;--",
    "%",
    "_",
    "../../etc/passwd",
    "1.2\\..\\3",
    "1." + "2" * 80,
    "x" * 1000,
]


@pytest.mark.parametrize("service", ["C-FIND", "C-GET", "C-MOVE"])
def test_hostile_keys_in_dimse_queries_get_a_dicom_status(
    appliance: LiveAppliance, stored: tuple[str, str, str], service: str
) -> None:
    """C-FIND, C-GET and C-MOVE with hostile Study Instance UIDs and Patient
    IDs: each ends with a DICOM status (a refusal, or no match), never
    pynetdicom's "unhandled exception" 0xC211/0xC311 nor a match of
    everything; the association stays usable."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    model = {
        "C-FIND": StudyRootQueryRetrieveInformationModelFind,
        "C-GET": StudyRootQueryRetrieveInformationModelGet,
        "C-MOVE": StudyRootQueryRetrieveInformationModelMove,
    }[service]
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", appliance.dimse_port, ae_title=appliance.ae_title)
    assert assoc.is_established
    try:
        for key in ("StudyInstanceUID", "PatientID"):
            for value in DIMSE_VALUES:
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "STUDY"
                identifier.StudyInstanceUID = value if key == "StudyInstanceUID" else ""
                if key == "PatientID":
                    identifier.PatientID = value
                if service == "C-FIND":
                    responses = list(assoc.send_c_find(identifier, model))
                elif service == "C-GET":
                    responses = list(assoc.send_c_get(identifier, model))
                else:
                    responses = list(assoc.send_c_move(identifier, "NOWHERE", model))
                statuses = [int(status.Status) for status, _ in responses if status]
                assert statuses, (service, key, value[:30])
                final = statuses[-1]
                assert final not in (0xC211, 0xC311), (service, key, value[:30], hex(final))
                assert final >> 12 in (0x0, 0xA, 0xC), hex(final)
                # never a match: no stored study has these values
                assert not {0xFF00, 0xFF01} & set(statuses)
        assert assoc.is_established
    finally:
        assoc.release()
        ae.shutdown()
