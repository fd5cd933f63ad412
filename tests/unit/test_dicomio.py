"""UID validation (PS3.5 9.1) including hostile values, and header reading."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.dicomio import (
    extract_record,
    is_valid_uid,
    normalize_da,
    part10_prefix,
    read_header,
    tm_key,
    validate_uid,
)
from appliance.encoding import Layout, find_hazard
from appliance.errors import InvalidInstance, UnreadableInstance
from appliance.status import Status

GOOD = [
    "1.2.840.10008.1.2",
    "0",
    "1.0.2",
    "2.25.329800735698586629295641978511506172918",
    "1." + "1" * 62,  # 64 characters
]

HOSTILE = [
    "",  # empty
    "../../etc/passwd",  # a path
    "..",
    "1.2/3",
    "1.2\x00.3",  # embedded NUL
    "1.2.3 ",  # padding that survived
    "1.2." + "1" * 61,  # 65 characters
    "1..2",  # empty component
    ".1.2",
    "1.2.",
    "1.02",  # leading zero
    "1.2.3a",
    "1.2\\1.3",  # a multi-value
    "１.２",  # non-ASCII digits  # noqa: RUF001
]


@pytest.mark.parametrize("uid", GOOD)
def test_good_uids(uid: str) -> None:
    assert validate_uid(uid, "SOPInstanceUID") == uid
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", HOSTILE)
def test_hostile_uids_are_refused(uid: str) -> None:
    with pytest.raises(InvalidInstance) as info:
        validate_uid(uid, "SOPInstanceUID")
    assert info.value.status is Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOPInstanceUID" in info.value.reason
    assert not is_valid_uid(uid)


@pytest.mark.parametrize("value", [None, 5, ["1.2", "1.3"]])
def test_missing_or_multi_valued_uids_are_refused(value: object) -> None:
    with pytest.raises(InvalidInstance, match="missing or not a single value"):
        validate_uid(value, "StudyInstanceUID")


def _part10(ds: Dataset) -> io.BytesIO:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf


def _dataset(**values: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientName = "Doe^Jane"
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_uid_inside_a_file_is_refused() -> None:
    stream = _part10(_dataset(StudyInstanceUID="../../x"))
    with pytest.raises(InvalidInstance, match="StudyInstanceUID"):
        extract_record(read_header(stream))


def test_missing_study_uid_is_refused() -> None:
    ds = _dataset()
    del ds.StudyInstanceUID
    with pytest.raises(InvalidInstance, match="StudyInstanceUID is missing"):
        extract_record(read_header(_part10(ds)))


@pytest.mark.parametrize("data", [b"", b"not dicom at all", b"\x00" * 128 + b"DICN"])
def test_garbage_cannot_be_understood(data: bytes) -> None:
    with pytest.raises(UnreadableInstance) as info:
        read_header(io.BytesIO(data))
    assert info.value.status is Status.CANNOT_UNDERSTAND


@pytest.mark.parametrize("length", [140, 300])
def test_truncated_file_is_refused_with_a_reason(length: int) -> None:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    with open(path, "rb") as fh:
        data = fh.read(length)
    with pytest.raises(InvalidInstance) as info:
        extract_record(read_header(io.BytesIO(data)))
    assert info.value.status is Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "UID" in info.value.reason


def test_a_file_cut_inside_an_element_cannot_be_understood() -> None:
    """The data set's elements are walked by length first: one that runs
    past the end is refused (0xC000) before pydicom reads anything."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    with open(path, "rb") as fh:
        data = fh.read(1000)
    with pytest.raises(UnreadableInstance) as info:
        read_header(io.BytesIO(data))
    assert info.value.status is Status.CANNOT_UNDERSTAND
    assert "past the end" in info.value.reason


def test_header_is_read_without_pixel_data() -> None:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    with open(path, "rb") as fh:
        ds = read_header(fh)
    assert "PixelData" not in ds
    record = extract_record(ds)
    full = dcmread(path)
    assert record.instance.sop_instance_uid == full.SOPInstanceUID
    assert record.instance.rows == full.Rows
    assert record.instance.transfer_syntax_uid == full.file_meta.TransferSyntaxUID
    assert record.patient.patient_name == str(full.PatientName)


def test_part10_prefix_makes_a_readable_file() -> None:
    ds = _dataset()
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=True, little_endian=True)
    prefix = part10_prefix(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2", "MODALITY")
    assert prefix[128:132] == b"DICM"
    parsed = dcmread(io.BytesIO(prefix + body.getvalue()))
    assert parsed.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert parsed.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize(
    ("value", "expected"),
    [("20240102", "20240102"), ("2024.01.02", "20240102"), ("", ""), ("junk", "junk")],
)
def test_normalize_da(value: str, expected: str) -> None:
    assert normalize_da(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10", "100000.000000"),
        ("1030", "103000.000000"),
        ("103015", "103015.000000"),
        ("103015.5", "103015.500000"),
        ("10:30:15", "103015.000000"),
        ("", ""),
        ("25x", ""),
    ],
)
def test_tm_key(value: str, expected: str) -> None:
    assert tm_key(value) == expected


@pytest.mark.parametrize("source_ae", ["", "MODALITY", "CT1"])
def test_part10_prefix_is_what_pydicom_writes(source_ae: str) -> None:
    """The hand-encoded File Meta is byte for byte pydicom's."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    from appliance.dicomio import IMPLEMENTATION_VERSION_NAME

    for sop_class, sop_instance, syntax in [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.33.44.555", "1.2.840.10008.1.2.4.50"),
    ]:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_instance
        meta.TransferSyntaxUID = syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        if source_ae:
            meta.SourceApplicationEntityTitle = source_ae
        buffer = DicomBytesIO()
        buffer.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buffer, meta, enforce_standard=True)
        assert part10_prefix(sop_class, sop_instance, syntax, source_ae) == buffer.getvalue()


def test_the_fast_header_reader_indexes_pydicoms_corpus_as_pydicom_does() -> None:
    """read_header's own walk (most files) gives the record pydicom's full
    read gives, file for file, refusals included; the files it leaves to
    pydicom are read by it."""
    import warnings
    from pathlib import Path

    import pydicom

    from appliance.dicomio import _read_indexed
    from appliance.encoding import read_layout

    def _layout(data: bytes) -> Layout:
        return read_layout(io.BytesIO(data))

    def outcome(read: Callable[[], Dataset | None]) -> object:
        try:
            ds = read()
            return None if ds is None else extract_record(ds)
        except Exception:  # noqa: BLE001 - refused, for whatever reason
            return "refused"

    walked, hazardous = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted((Path(pydicom.__file__).parent / "data").rglob("*.dcm")):
            data = path.read_bytes()
            expected = outcome(lambda data=data: dcmread(io.BytesIO(data), stop_before_pixels=True))
            try:
                hazard = find_hazard(io.BytesIO(data), _layout(data))
            except Exception:  # noqa: BLE001 - no File Meta: pydicom's verdict stands
                hazard = None
            if hazard is not None:
                # cut short or too deep: refused whatever pydicom makes of it
                hazardous.append(path.name)
                expected = "refused"
            fast = outcome(lambda data=data: _read_indexed(io.BytesIO(data), _layout(data)))
            if fast not in (None, "refused") and hazard is None:
                walked += 1
                assert fast == expected, path.name
            assert outcome(lambda data=data: read_header(io.BytesIO(data))) == expected, path.name
    assert walked > 60
    assert hazardous == ["MR_truncated.dcm", "rtplan_truncated.dcm"]


def test_the_sending_ae_is_read_back_only_from_a_file_meta_of_ours() -> None:
    """A C-STORE's blob (File Meta written by part10_prefix) names its
    Calling AE Title, which reindex reads back; another writer's Source
    Application Entity Title (a file sent by STOW-RS) is not a sender."""
    ds = dcmread(get_testdata_file("CT_small.dcm"), force=True)  # type: ignore[arg-type]
    body = io.BytesIO()
    ds.save_as(body, enforce_file_format=True)
    data_set = body.getvalue()[132 + 12 + ds.file_meta.FileMetaInformationGroupLength :]
    ours = part10_prefix(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "CT_ROOM_1")
    record = extract_record(read_header(io.BytesIO(ours + data_set)))
    assert record.instance.source_ae == "CT_ROOM_1"
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE"
    theirs = io.BytesIO()
    ds.save_as(theirs, enforce_file_format=True)
    theirs.seek(0)
    assert extract_record(read_header(theirs)).instance.source_ae == ""


# --------------------------------------------------------------------------
# the record's values decoded from raw elements, as pydicom decodes them


def _records(data: bytes) -> tuple[object, object] | None:
    """The record of *data* with the raw values decoded by extract_record
    and by pydicom (each from its own header read), or None if the header
    or the record cannot be read (then both paths refuse it alike)."""
    outcomes = []
    for fast in (True, False):
        try:
            outcomes.append(extract_record(read_header(io.BytesIO(data)), fast=fast))
        except (InvalidInstance, UnreadableInstance) as exc:
            outcomes.append(f"{type(exc).__name__}: {exc.reason}")
    return outcomes[0], outcomes[1]


def test_raw_values_are_decoded_as_pydicom_decodes_them_in_its_test_files() -> None:
    """Every file of pydicom's test data (many transfer syntaxes, character
    sets, implicit and explicit VR, big endian) gives the same record
    either way."""
    from pathlib import Path

    import pydicom.data

    # the files pydicom ships (get_testdata_files would also try to download
    # the ones it does not, which takes 15 s to fail with no network)
    shipped = Path(pydicom.data.__file__).parent
    files = [*(shipped / "test_files").rglob("*"), *(shipped / "charset_files").rglob("*")]
    compared = 0
    for path in sorted(files):
        if not path.is_file() or path.suffix.lower() not in ("", ".dcm"):
            continue
        data = path.read_bytes()
        fast, slow = _records(data)
        assert fast == slow, path.name
        compared += not isinstance(fast, str)
    assert compared > 50


def _instance(**values: object) -> bytes:
    ds = _dataset(**values)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # set here: the File Meta cannot take an empty SOP Class UID from the data set
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    "values",
    [
        {"PatientName": "Müller^Jürgen", "SpecificCharacterSet": "ISO_IR 100"},
        {"PatientName": "Müller^Jürgen", "SpecificCharacterSet": "ISO_IR 192"},
        {"PatientName": "Yamada^Tarou=山田^太郎", "SpecificCharacterSet": "ISO_IR 192"},
        {"PatientName": "Doe^John", "PatientID": "", "AccessionNumber": "A 1"},
        {"StudyDescription": "  leading spaces", "Modality": "CT"},
        {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": "Yamada^Tarou"},
        {"SeriesNumber": "  7 ", "InstanceNumber": "+12", "Rows": 512, "Columns": 256},
        {"InstanceNumber": "99999999999", "NumberOfFrames": "3"},
        {"ImageType": ["ORIGINAL", "PRIMARY"], "Modality": "MR", "BodyPartExamined": ""},
        {"StudyTime": "101010.123456 ", "StudyDate": "2024.01.02"},
        {"SOPClassUID": ""},
        {"StudyInstanceUID": ["1.2", "1.3"]},
    ],
)
def test_raw_values_are_decoded_as_pydicom_decodes_them(values: dict[str, object]) -> None:
    fast, slow = _records(_instance(**values))
    assert fast == slow
