"""Property-based fuzzing (hypothesis) of the parsers that face the network:
whatever the input, only the project's documented errors
(:class:`~appliance.errors.ApplianceError` and its subclasses) escape, and
every output is well-formed (JSON that parses, parts that round-trip, a
response identifier pydicom can encode).

A crash hypothesis finds is kept below as an ``@example`` (the regression
test) after it is fixed.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import decode

from appliance.dicomio import extract_record, read_header
from appliance.errors import ApplianceError
from dicomweb.multipart import LimitedReader, MultipartReader
from tests.conftest import make_config, started_server
from tests.fuzz import inputs
from tests.helpers import part10_of, small_study

pytestmark = pytest.mark.fuzz

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------
# the STOW-RS multipart parser


def read_parts(body: bytes, boundary: str, *, chunk_size: int = 7) -> list[bytes]:
    """The parts' contents, read as STOW-RS reads them (small chunks, so a
    delimiter falls across reads)."""
    with MultipartReader(
        LimitedReader(io.BytesIO(body), 1 << 20), boundary, chunk_size=chunk_size, max_parts=50
    ) as reader:
        return [part.body.read() for part in reader]


BOUNDARY = st.text(alphabet="abcXYZ0189'()+_,-./:=? ", min_size=1, max_size=70).filter(
    lambda b: not b.endswith(" ")
)


@FUZZ
@given(body=st.binary(max_size=400), boundary=BOUNDARY, chunk=st.integers(1, 64))
@example(body=b"--b\r\n\r\nx\r\n--b--", boundary="b", chunk=1)
@example(body=b"--b--\r\n", boundary="b", chunk=3)
def test_multipart_of_any_bytes_is_parsed_or_refused(
    body: bytes, boundary: str, chunk: int
) -> None:
    with contextlib.suppress(ApplianceError):
        read_parts(body, boundary, chunk_size=chunk)


@FUZZ
@given(
    contents=st.lists(st.binary(max_size=200), min_size=1, max_size=6),
    boundary=BOUNDARY,
    chunk=st.integers(1, 64),
    preamble=st.sampled_from([b"", b"preamble\r\n"]),
    epilogue=st.sampled_from([b"", b"\r\n", b"\r\nepilogue"]),
)
def test_well_formed_multipart_round_trips(
    contents: list[bytes], boundary: str, chunk: int, preamble: bytes, epilogue: bytes
) -> None:
    delimiter = b"--" + boundary.encode()
    # RFC 2046 5.1.1: the boundary must not occur in the contents
    contents = [c.replace(delimiter[2:], b"") for c in contents]
    body = preamble + b"".join(
        delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n" + c + b"\r\n" for c in contents
    )
    body += delimiter + b"--" + epilogue
    if any(b"\r\n" + delimiter in b"\r\n" + c for c in contents):
        return
    assert read_parts(body, boundary, chunk_size=chunk) == contents


# --------------------------------------------------------------------------
# DICOM JSON of odd data sets, and the ingest's header reader


@FUZZ
@given(
    body=inputs.data_sets(), syntax=st.sampled_from(["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
)
# found by this test: StudyInstanceUID sent with the VR US and an odd length
# made pydicom raise BytesLengthException out of ingest (a 500 / 0xC211)
@example(
    body=b"\x08\x00\x05\x00CS\x00\x00\x08\x00\x16\x00AE\x00\x00 \x00\r\x00US\t\x00" + b"\x00" * 10,
    syntax="1.2.840.10008.1.2.1",
)
def test_odd_data_sets_render_as_json_or_are_refused(body: bytes, syntax: str) -> None:
    data = inputs.part10(body, syntax)
    try:
        rendered = inputs.render_metadata(data)
    except ApplianceError:
        rendered = None
    if rendered is not None:
        assert isinstance(rendered, dict)
        for tag, member in rendered.items():
            assert len(tag) == 8
            assert "vr" in member
    with contextlib.suppress(ApplianceError):
        extract_record(read_header(io.BytesIO(data)))


@FUZZ
@given(cut=st.integers(0, 2000), junk=st.binary(max_size=16), at=st.integers(0, 2000))
# found by this test: a File Meta Group Length cut to one byte made pydicom
# raise BytesLengthException out of ingest and out of the metadata renderer
@example(cut=0, junk=b"\x00\x00\x00\x00\x00\x00\x01\x00", at=133)
def test_a_damaged_instance_is_read_or_refused(cut: int, junk: bytes, at: int) -> None:
    data = part10_of(small_study(1)[0])
    damaged = data[:at] + junk + data[at + len(junk) : max(cut, at + len(junk))]
    for read in (
        lambda: extract_record(read_header(io.BytesIO(damaged))),
        lambda: inputs.render_metadata(damaged),
    ):
        with contextlib.suppress(ApplianceError):
            read()


# --------------------------------------------------------------------------
# QIDO-RS parameters, through the real view


@pytest.fixture(scope="module")
def qido(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    from dicomweb.app import create_app

    tmp = tmp_path_factory.mktemp("fuzz-qido")
    for server in started_server(make_config(Path(tmp))):
        for ds in small_study(2):
            server.services.ingest.store_part10(io.BytesIO(part10_of(ds)), _origin())
        yield create_app(server.config, server.services)


def _origin() -> Any:
    from appliance.model import Origin

    return Origin("import")


QIDO_KEYS = st.sampled_from(
    [
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "Modality",
        "00100020",
        "0020000D",
        "limit",
        "offset",
        "includefield",
        "fuzzymatching",
        "ReferencedSOPSequence.ReferencedSOPInstanceUID",
        "RequestAttributesSequence.ScheduledProcedureStepID",
        "InstanceNumber",
        "SeriesNumber",
        "00080005",
        "x",
        "",
    ]
)
QIDO_VALUES = st.one_of(
    inputs.TEXT,
    st.sampled_from(
        [
            "19990101-",
            "-2020",
            "1-2-3",
            "20200230",
            "*",
            "?",
            "a\\b",
            "1,2",
            "-1",
            "99999999999999999999",
        ]
    ),
)


@FUZZ
@given(
    path=st.sampled_from(
        ["/v1/studies", "/v1/series", "/v1/instances", "/v1/studies/1.2.3/series"]
    ),
    params=st.lists(st.tuples(st.one_of(QIDO_KEYS, st.text(max_size=20)), QIDO_VALUES), max_size=6),
)
@example(path="/v1/studies", params=[("StudyDate", "-")])
def test_qido_parameters_never_500(qido: Flask, path: str, params: list[tuple[str, str]]) -> None:
    query = urllib.parse.urlencode(params, errors="surrogatepass") if params else ""
    with qido.test_client() as client:
        response = client.get(f"{path}?{query}")
    assert response.status_code in (200, 400), (params, response.data[:300])
    body = json.loads(response.data)
    if response.status_code == 200:
        assert isinstance(body, list)
    else:
        assert body["error"]


# --------------------------------------------------------------------------
# C-FIND identifiers, decoded from bytes as pynetdicom decodes them


FIND_KEYS = [
    ("QueryRetrieveLevel", "CS"),
    ("PatientID", "LO"),
    ("PatientName", "PN"),
    ("StudyInstanceUID", "UI"),
    ("SeriesInstanceUID", "UI"),
    ("SOPInstanceUID", "UI"),
    ("StudyDate", "DA"),
    ("StudyTime", "TM"),
    ("Modality", "CS"),
    ("ModalitiesInStudy", "CS"),
    ("SpecificCharacterSet", "CS"),
    ("InstanceNumber", "IS"),
    ("NumberOfStudyRelatedInstances", "IS"),
    ("AccessionNumber", "SH"),
    ("SOPClassesInStudy", "UI"),
    ("StudyDescription", "LO"),
]


@st.composite
def identifiers(draw: Any) -> bytes:
    """An identifier's bytes (Implicit VR Little Endian, as C-FIND carries
    it): known keys with hostile values, a few raw private or odd ones."""
    ds = Dataset()
    for keyword, _vr in draw(st.lists(st.sampled_from(FIND_KEYS), max_size=7, unique=True)):
        if keyword == "QueryRetrieveLevel":
            value = draw(st.sampled_from(["PATIENT", "STUDY", "SERIES", "IMAGE", "", "BOGUS"]))
        elif keyword == "SpecificCharacterSet":
            value = draw(st.sampled_from(inputs.CHARACTER_SETS))
        else:
            value = draw(inputs.TEXT)
        try:
            setattr(ds, keyword, value)
        except (ValueError, TypeError, OverflowError):
            continue  # pydicom will not hold it (e.g. IS ":"); the raw keys below still come
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    try:
        write_dataset(buffer, ds)
    except Exception:  # noqa: BLE001 - a value pydicom cannot write: send it raw
        buffer = DicomBytesIO()
    raw = buffer.getvalue()
    odd_tags = st.sampled_from([0x00091001, 0x00431028, 0x7FE00008])
    for tag in sorted(draw(st.lists(odd_tags, max_size=2, unique=True))):
        value = draw(st.binary(max_size=12))
        raw += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    return raw


@FUZZ
@given(raw=identifiers(), model=st.sampled_from(["PATIENT", "STUDY"]))
def test_c_find_identifiers_map_or_are_refused(qido: Flask, raw: bytes, model: str) -> None:
    from dicomweb.app import current_services
    from dimse_bridge.identifiers import InformationModel, parse_find, response_identifier

    information_model = next(m for m in InformationModel if m.name.startswith(model))
    with qido.app_context():
        service = current_services().query
        try:
            identifier = decode(io.BytesIO(raw), True, True)
        except Exception:  # noqa: BLE001 - pynetdicom refuses these before the handler
            return
        try:
            find = parse_find(identifier, information_model, service)
            result = service.search(find.query())
        except ApplianceError:
            return
        for match in result.matches:
            response = response_identifier(find, match, "DICOM_EDGE")
            out = DicomBytesIO()
            out.is_little_endian, out.is_implicit_VR = True, True
            write_dataset(out, response)


# --------------------------------------------------------------------------
# the seed corpus, crash inputs included: every one is read or refused


CORPUS = Path(__file__).parent / "corpus"


@pytest.mark.parametrize("path", sorted(CORPUS.glob("part10/*")), ids=lambda path: path.name)
def test_corpus_part10_inputs_are_read_or_refused(path: Path) -> None:
    """crash-* files are inputs atheris found crashing (kept as regression
    tests): crash-unknown-vr-in-file-meta, a File Meta element of the VR
    "SI", made pydicom raise NotImplementedError out of ingest;
    crash-unknown-vr-in-series-uid, a SeriesInstanceUID of the VR "U\\x01"
    (read by pydicom, the walk refusing it), made the record's raw decoding
    ask pydicom for the element, whose conversion raised NotImplementedError
    out of ingest; crash-nan-float-in-metadata, an FL value NaN, made the
    metadata's JSON text fail (a 500 of WADO-RS metadata)."""
    data = path.read_bytes()
    with contextlib.suppress(ApplianceError):
        extract_record(read_header(io.BytesIO(data)))
    with contextlib.suppress(ApplianceError):
        inputs.render_metadata(data)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("multipart/*")), ids=lambda path: path.name)
def test_corpus_multipart_inputs_are_parsed_or_refused(path: Path) -> None:
    data = path.read_bytes()
    # the harness's layout: a boundary, a chunk size, then the body
    with contextlib.suppress(ApplianceError):
        read_parts(data[9:], "b", chunk_size=max(1, data[8] % 64))


def test_non_finite_floats_are_the_standards_strings_in_metadata() -> None:
    """PS3.18 F.2.3 (CP-2275): NaN and the infinities of FL and FD are the
    JSON strings "NaN", "inf" and "-inf" (JSON numbers cannot hold them)."""
    import math

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.1"
    ds.add_new(0x00189087, "FD", [math.nan, math.inf, -math.inf, 1.5])  # Diffusion b-value
    ds.add_new(0x00189089, "FD", [0.0, 1.0, 0.0])  # Diffusion Gradient Orientation
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    rendered = inputs.render_metadata(out.getvalue())
    assert rendered["00189087"] == {"vr": "FD", "Value": ["NaN", "inf", "-inf", 1.5]}
    assert rendered["00189089"] == {"vr": "FD", "Value": [0.0, 1.0, 0.0]}
