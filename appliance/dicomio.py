"""Reading DICOM headers and checking what the index relies on.

Only the header is parsed (``stop_before_pixels``), never the pixel data; the
bytes themselves are stored exactly as received.
"""

from __future__ import annotations

import re
import struct
from typing import IO, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from appliance import __version__
from appliance.errors import InvalidInstance, UnreadableInstance
from appliance.model import (
    InstanceAttributes,
    InstanceRecord,
    PatientAttributes,
    RequestAttributes,
    SeriesAttributes,
    StudyAttributes,
)

#: PS3.5 9.1: a UID is dot-separated components of digits, a component has no
#: leading zero unless it is "0" itself, at most 64 characters in all.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_LENGTH = 64

IMPLEMENTATION_VERSION_NAME = f"DCMAPPL_{__version__}"[:16]

#: Values larger than this are not read while parsing a header.
_DEFER_SIZE = 64 * 1024


def validate_uid(value: object, keyword: str) -> str:
    """Return *value* as a UID string or raise :class:`InvalidInstance`.

    PS3.5 9.1: only digits and dots, no empty or zero-padded component, at
    most 64 characters.  A trailing NUL (the PS3.5 6.2 padding of UI) has been
    stripped by the parser already; anything else, including an embedded NUL,
    a path fragment such as ``../`` or an empty value, is refused.
    """
    if not isinstance(value, str):
        raise InvalidInstance(f"{keyword} is missing or not a single value")
    if not value:
        raise InvalidInstance(f"{keyword} is empty")
    if len(value) > UID_MAX_LENGTH:
        raise InvalidInstance(f"{keyword} is longer than 64 characters (PS3.5 9.1)")
    if _UID_RE.fullmatch(value) is None:
        raise InvalidInstance(f"{keyword} is not a valid UID (PS3.5 9.1)")
    return value


def is_valid_uid(value: str) -> bool:
    """True if *value* is a well-formed UID (PS3.5 9.1)."""
    return len(value) <= UID_MAX_LENGTH and _UID_RE.fullmatch(value) is not None


def read_header(source: IO[bytes]) -> Dataset:
    """Parse a Part 10 stream up to the pixel data.

    Raises
    ------
    UnreadableInstance
        if the bytes are not a DICOM Part 10 file.
    """
    try:
        ds = dcmread(source, stop_before_pixels=True, defer_size=_DEFER_SIZE)
    except InvalidDicomError as exc:
        raise UnreadableInstance(f"not a DICOM Part 10 file: {exc}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # pydicom raises a variety of these on truncated or corrupt headers
        raise UnreadableInstance(f"the DICOM header could not be parsed: {exc}") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise InvalidInstance("the File Meta Information lacks TransferSyntaxUID (0002,0010)")
    return ds


def part10_prefix(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """The preamble, prefix and File Meta Information (PS3.10 7.1) to put in
    front of a bare data set received over DIMSE, so every blob is a Part 10
    file.

    Encoded here rather than by pydicom's writer (it is on the path of every
    C-STORE): Explicit VR Little Endian elements, UI values padded with a NUL
    and text values with a space to an even length (PS3.5 6.2), and the
    File Meta Information Group Length computed over them.  The UIDs must
    have been checked (:func:`validate_uid`).
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid.encode("ascii"), b"\0")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid.encode("ascii"), b"\0")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid.encode("ascii"), b"\0")),
        _meta_element(0x0012, b"UI", _IMPLEMENTATION_CLASS_UID),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
    ]
    title = source_ae.strip()
    if title:
        # AE: default character repertoire (PS3.5 6.2); anything else is replaced
        elements.append(
            _meta_element(0x0016, b"AE", _padded(title.encode("ascii", "replace"), b" "))
        )
    body = b"".join(elements)
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return _PREAMBLE + group_length + body


_PREAMBLE = b"\0" * 128 + b"DICM"
_IMPLEMENTATION_CLASS_UID = PYDICOM_IMPLEMENTATION_UID.encode("ascii") + (
    b"\0" if len(PYDICOM_IMPLEMENTATION_UID) % 2 else b""
)


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH", 2, element) + vr + struct.pack("<HI", 0, len(value)) + value
    return struct.pack("<HH", 2, element) + vr + struct.pack("<H", len(value)) + value


def extract_record(ds: Dataset) -> InstanceRecord:
    """Read and check what the index needs from a parsed header.

    Raises
    ------
    InvalidInstance
        if a required UID is missing or malformed (PS3.5 9.1), or if the
        data set's SOP Instance UID differs from the File Meta's.
    """
    study_uid = validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    sop_class = validate_uid(ds.get("SOPClassUID"), "SOPClassUID")
    ts = validate_uid(ds.file_meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
    # The data set's SOP Instance UID is authoritative: a File Meta that
    # disagrees (seen in files edited by older tools) is not a reason to refuse.
    return InstanceRecord(
        patient=PatientAttributes(
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=normalize_da(_text(ds, "PatientBirthDate")),
            patient_sex=_text(ds, "PatientSex"),
        ),
        study=StudyAttributes(
            study_instance_uid=study_uid,
            study_date=normalize_da(_text(ds, "StudyDate")),
            study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            study_id=_text(ds, "StudyID"),
            study_description=_text(ds, "StudyDescription"),
            referring_physician_name=_text(ds, "ReferringPhysicianName"),
            timezone_offset_from_utc=_text(ds, "TimezoneOffsetFromUTC"),
        ),
        series=SeriesAttributes(
            series_instance_uid=series_uid,
            modality=_text(ds, "Modality"),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            body_part_examined=_text(ds, "BodyPartExamined"),
            performed_procedure_step_start_date=normalize_da(
                _text(ds, "PerformedProcedureStepStartDate")
            ),
            performed_procedure_step_start_time=_text(ds, "PerformedProcedureStepStartTime"),
            request_attributes=_request_attributes(ds),
        ),
        instance=InstanceAttributes(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=ts,
            instance_number=_int(ds, "InstanceNumber"),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            bits_allocated=_int(ds, "BitsAllocated"),
            number_of_frames=_int(ds, "NumberOfFrames"),
            specific_character_set=_text(ds, "SpecificCharacterSet"),
        ),
    )


def _request_attributes(ds: Dataset) -> tuple[RequestAttributes, ...]:
    """The items of the Request Attributes Sequence (0040,0275), keeping the
    two values QIDO-RS matches on (PS3.18 Table 10.6.1-5)."""
    items = _value(ds, "RequestAttributesSequence")
    if not items:
        return ()
    return tuple(
        RequestAttributes(
            scheduled_procedure_step_id=_text(item, "ScheduledProcedureStepID"),
            requested_procedure_id=_text(item, "RequestedProcedureID"),
        )
        for item in items
        if isinstance(item, Dataset)
    )


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, LookupError):
        # a value pydicom cannot convert (e.g. a corrupt IS); index it as absent
        return None


def _text(ds: Dataset, keyword: str) -> str:
    """A string attribute as text, multiple values joined by backslash."""
    value = _value(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    # keep within a signed 32-bit column (IS is at most 12 characters, PS3.5 6.2)
    return number if -(2**31) <= number < 2**31 else None


def normalize_da(value: str) -> str:
    """PS3.5 6.2 DA as ``YYYYMMDD``; the retired ``YYYY.MM.DD`` form is
    converted; anything else is kept as it was."""
    if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", value):
        return value.replace(".", "")
    return value


def tm_key(value: str) -> str:
    """A TM value as a fixed-width ``HHMMSS.FFFFFF`` string so that text order
    is time order (PS3.5 6.2: trailing components may be omitted; the retired
    ``HH:MM:SS`` form is accepted).  Returns ``""`` for an unusable value."""
    value = value.strip().replace(":", "")
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", value)
    if m is None:
        return ""
    hh, mm, ss, frac = m.groups()
    return f"{hh}{mm or '00'}{ss or '00'}.{(frac or '').ljust(6, '0')}"
