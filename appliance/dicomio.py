"""Reading DICOM headers and checking what the index relies on.

Only the header is parsed (``stop_before_pixels``), never the pixel data; the
bytes themselves are stored exactly as received.
"""

from __future__ import annotations

import re
import struct
from typing import IO, Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from appliance import __version__
from appliance.encoding import LONG_VRS, Layout, LayoutError, find_hazard, read_layout
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


#: What pydicom raises reading a truncated or corrupt header (besides
#: InvalidDicomError, "not DICOM at all", and RecursionError).
HEADER_ERRORS: tuple[type[Exception], ...] = (
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    BytesLengthException,  # an element of a wrong length (found by fuzzing)
    NotImplementedError,  # e.g. an unknown VR in the File Meta (found by fuzzing)
    struct.error,
)


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
    """Parse a Part 10 stream for what the index keeps (:func:`extract_record`).

    The common case is read by :func:`_read_indexed`: the File Meta, then
    the data set's elements walked by tag and length only as far as the last
    indexed attribute, keeping the indexed ones undecoded (pydicom decodes
    a value when :func:`extract_record` asks for it, with the data set's
    character set).  Anything it does not expect (a deflated data set, a
    damaged or unusual encoding) is read by pydicom up to the pixel data, as
    is every file whose header the fast path could not read.

    Raises
    ------
    UnreadableInstance
        if the bytes are not a DICOM Part 10 file, or hold an element whose
        length runs past the end or sequences nested too deeply
        (:func:`~appliance.encoding.find_hazard`).
    """
    start = source.tell()
    try:
        layout: Layout | None = read_layout(source)
    except (LayoutError, OSError, ValueError, struct.error):
        layout = None
    ds = None
    if layout is not None:
        hazard = find_hazard(source, layout)
        if hazard is not None:
            raise UnreadableInstance(hazard)
        try:
            ds = _read_indexed(source, layout)
        except (LayoutError, OSError, ValueError, struct.error):
            ds = None
    if ds is not None:
        return ds
    source.seek(start)
    try:
        ds = dcmread(source, stop_before_pixels=True, defer_size=_DEFER_SIZE)
    except RecursionError:
        # a deflated data set is not walked before pydicom reads it
        raise UnreadableInstance("sequences are nested too deeply to be read") from None
    except InvalidDicomError as exc:
        raise UnreadableInstance(f"not a DICOM Part 10 file: {exc}") from None
    except HEADER_ERRORS as exc:
        raise UnreadableInstance(f"the DICOM header could not be parsed: {exc}") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise InvalidInstance("the File Meta Information lacks TransferSyntaxUID (0002,0010)")
    return ds


#: The top-level attributes :func:`extract_record` reads.
INDEXED_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "TimezoneOffsetFromUTC",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "BodyPartExamined",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
_INDEXED_TAGS = frozenset(int(tag_for_keyword(k) or 0) for k in INDEXED_KEYWORDS)
#: Elements come in ascending tag order (PS3.5 7.1): nothing indexed follows.
_LAST_INDEXED = max(_INDEXED_TAGS)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER = 0xFFFEE0DD


def _read_indexed(source: IO[bytes], layout: Layout) -> Dataset | None:
    """The File Meta and the indexed top-level elements of the Part 10
    stream *source* (whose layout is *layout*) as a Dataset of raw
    (undecoded) elements, or None if the file is not one this reader
    handles (pydicom reads those)."""
    syntax = UID(layout.transfer_syntax)
    if not syntax.is_transfer_syntax or syntax.is_deflated or not layout.sop_instance_uid:
        return None
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    order = "<" if little else ">"
    tag_format, u16, u32 = (
        struct.Struct(order + "HH"),
        struct.Struct(order + "H"),
        struct.Struct(order + "I"),
    )
    end = layout.offset + layout.size
    position = layout.offset
    source.seek(position)
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    while position < end:
        header = source.read(8)
        if len(header) < 8:
            return None
        group, element = tag_format.unpack_from(header)
        tag = group << 16 | element
        if tag > _LAST_INDEXED:
            break
        vr: str | None = None
        if implicit:
            (length,) = u32.unpack_from(header, 4)
            position += 8
        else:
            raw_vr = header[4:6]
            if not (raw_vr.isalpha() and raw_vr.isupper()):
                return None  # not encoded as the transfer syntax says
            vr = raw_vr.decode("ascii")
            if raw_vr in LONG_VRS:
                extra = source.read(4)
                if len(extra) < 4:
                    return None
                (length,) = u32.unpack(extra)
                position += 12
            else:
                (length,) = u16.unpack_from(header, 6)
                position += 8
        value_at = position
        if length == _UNDEFINED_LENGTH:
            if tag != 0x00400275 or vr not in (None, "SQ"):
                return None  # undefined length in anything but a wanted sequence
            position = _sequence_end(source, tag_format, u32, position, end)
            length = position - 8 - value_at  # without its delimitation item
        elif position + length > end:
            return None  # cut short
        else:
            position += length
        if tag in _INDEXED_TAGS:
            source.seek(value_at)
            value = source.read(length)
            if len(value) < length:
                return None
            elements[BaseTag(tag)] = RawDataElement(
                BaseTag(tag), vr, length, value, value_at, implicit, little
            )
        source.seek(position)
    ds = Dataset(elements)
    ds.set_original_encoding(implicit, little)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(layout.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(layout.sop_instance_uid)
    meta.TransferSyntaxUID = syntax
    if layout.implementation_version_name:
        meta.ImplementationVersionName = layout.implementation_version_name
    if layout.source_ae:
        meta.SourceApplicationEntityTitle = layout.source_ae
    ds.file_meta = meta
    return ds


def _sequence_end(
    source: IO[bytes], tag_format: struct.Struct, u32: struct.Struct, position: int, end: int
) -> int:
    """The position after the Sequence Delimitation Item of the
    undefined-length sequence whose value starts at *position* (items of
    defined length only; else ValueError, and pydicom reads the file)."""
    source.seek(position)
    while position + 8 <= end:
        header = source.read(8)
        group, element = tag_format.unpack_from(header)
        (length,) = u32.unpack_from(header, 4)
        position += 8
        if group << 16 | element == _SEQUENCE_DELIMITER:
            return position
        if length == _UNDEFINED_LENGTH:
            raise ValueError("an undefined-length item")
        position += length
        source.seek(position)
    raise ValueError("a sequence without its delimitation item")


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


def extract_record(ds: Dataset, *, fast: bool = True) -> InstanceRecord:
    """Read and check what the index needs from a parsed header.

    The values of elements still raw (undecoded, as :func:`read_header`'s
    fast path leaves them) in the common encodings are decoded here
    (:class:`_RawValues`); pydicom decodes every other one (*fast* False:
    pydicom decodes all of them, which gives the same record).

    Raises
    ------
    InvalidInstance
        if a required UID is missing or malformed (PS3.5 9.1), or if the
        data set's SOP Instance UID differs from the File Meta's.
    """
    read = _RawValues(ds) if fast else _PydicomValues(ds)
    study_uid = validate_uid(read.uid("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = validate_uid(read.uid("SeriesInstanceUID"), "SeriesInstanceUID")
    sop_uid = validate_uid(read.uid("SOPInstanceUID"), "SOPInstanceUID")
    sop_class = validate_uid(read.uid("SOPClassUID"), "SOPClassUID")
    ts = validate_uid(_value(ds.file_meta, "TransferSyntaxUID"), "TransferSyntaxUID")
    source_ae = _source_ae(ds)
    text, number = read.text, read.int
    # The data set's SOP Instance UID is authoritative: a File Meta that
    # disagrees (seen in files edited by older tools) is not a reason to refuse.
    return InstanceRecord(
        patient=PatientAttributes(
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
            patient_name=text("PatientName"),
            patient_birth_date=normalize_da(text("PatientBirthDate")),
            patient_sex=text("PatientSex"),
        ),
        study=StudyAttributes(
            study_instance_uid=study_uid,
            study_date=normalize_da(text("StudyDate")),
            study_time=text("StudyTime"),
            accession_number=text("AccessionNumber"),
            study_id=text("StudyID"),
            study_description=text("StudyDescription"),
            referring_physician_name=text("ReferringPhysicianName"),
            timezone_offset_from_utc=text("TimezoneOffsetFromUTC"),
        ),
        series=SeriesAttributes(
            series_instance_uid=series_uid,
            modality=text("Modality"),
            series_number=number("SeriesNumber"),
            series_description=text("SeriesDescription"),
            body_part_examined=text("BodyPartExamined"),
            performed_procedure_step_start_date=normalize_da(
                text("PerformedProcedureStepStartDate")
            ),
            performed_procedure_step_start_time=text("PerformedProcedureStepStartTime"),
            request_attributes=_request_attributes(ds),
        ),
        instance=InstanceAttributes(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=ts,
            instance_number=number("InstanceNumber"),
            rows=number("Rows"),
            columns=number("Columns"),
            bits_allocated=number("BitsAllocated"),
            number_of_frames=number("NumberOfFrames"),
            specific_character_set=text("SpecificCharacterSet"),
            source_ae=source_ae,
            # only a C-STORE's File Meta is written here with the sender's title
            source_protocol="dimse" if source_ae else "",
        ),
    )


class _PydicomValues:
    """The indexed values of a data set, as pydicom decodes them."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def uid(self, keyword: str) -> Any:
        return _value(self.ds, keyword)

    def text(self, keyword: str) -> str:
        return _text(self.ds, keyword)

    def int(self, keyword: str) -> int | None:
        return _int(self.ds, keyword)


#: Tags of :data:`INDEXED_KEYWORDS`, with the VR of an implicit-VR element.
_TAG_VR = {
    keyword: (int(tag_for_keyword(keyword) or 0), dictionary_VR(tag_for_keyword(keyword) or 0))
    for keyword in INDEXED_KEYWORDS
}
#: VRs whose values are in the default character repertoire (PS3.5 6.1.2).
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
#: VRs whose values are in the data set's Specific Character Set.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
#: Specific Character Sets of one byte code that Python decodes as one codec
#: (no code extension, PS3.3 C.12.1.1.2): others are left to pydicom.
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
#: :meth:`_RawValues._raw`'s answer for a value pydicom must decode.
_SLOW = object()


class _RawValues(_PydicomValues):
    """The indexed values of a data set whose elements :func:`read_header`
    left raw, decoded here when they are of the common kinds (a single
    value of a text VR in ASCII, Latin-1 or UTF-8; a US or an IS number),
    else by pydicom (:class:`_PydicomValues`): pydicom's conversion of each
    raw element was the largest part of the ingest's CPU time.  The values
    are the same either way (a test compares both over pydicom's test
    files)."""

    def __init__(self, ds: Dataset) -> None:
        super().__init__(ds)
        charset = self._raw("SpecificCharacterSet", "ascii")
        self.codec = _CODECS.get(charset) if isinstance(charset, str) else None

    def _raw(self, keyword: str, codec: str | None) -> Any:
        """The single text value of *keyword* (None if absent), or _SLOW."""
        tag, implicit_vr = _TAG_VR[keyword]
        element = self.ds.get_item(tag, keep_deferred=True)
        if element is None:
            return None
        if not isinstance(element, RawDataElement) or element.value is None:
            # converted already, or a deferred (or unreadable) value: pydicom's
            # rules and _value's handling of what it cannot convert
            return _SLOW
        vr = element.VR or implicit_vr
        if vr in _ASCII_VRS:
            codec = "ascii"
        elif vr not in _CHARSET_VRS or codec is None:
            return _SLOW
        raw = element.value
        if b"\\" in raw or (vr == "PN" and b"=" in raw):
            return _SLOW  # several values, or PN component groups: pydicom's rules
        try:
            value = raw.decode(codec)
        except UnicodeDecodeError:
            return _SLOW
        trimmed = value.rstrip(" \0")
        if not trimmed.isprintable() or trimmed != trimmed.lstrip():
            return _SLOW  # control characters or leading spaces: pydicom's rules
        return trimmed

    def uid(self, keyword: str) -> Any:
        found = self._raw(keyword, "ascii")
        return super().uid(keyword) if found is _SLOW else found

    def text(self, keyword: str) -> str:
        found = self._raw(keyword, self.codec)
        if found is _SLOW:
            return super().text(keyword)
        return "" if found is None else str(found)

    def int(self, keyword: str) -> int | None:
        tag, implicit_vr = _TAG_VR[keyword]
        element = self.ds.get_item(tag, keep_deferred=True)
        if element is None:
            return None
        if isinstance(element, RawDataElement) and element.value is not None:
            vr = element.VR or implicit_vr
            if vr == "US" and len(element.value) == 2:
                return int.from_bytes(
                    element.value, "little" if element.is_little_endian else "big"
                )
            if vr == "IS":
                found = self._raw(keyword, "ascii")
                if found is None or found == "":
                    return None
                if isinstance(found, str) and found.lstrip("+-").isdigit():
                    number = int(found)
                    return number if -(2**31) <= number < 2**31 else None
        return super().int(keyword)


def _source_ae(ds: Dataset) -> str:
    """The Calling AE Title a C-STORE brought *ds* from: the File Meta's
    Source Application Entity Title (0002,0016) when this appliance wrote
    the File Meta (its Implementation Version Name), else "" (a file sent
    by STOW-RS or imported carries the meta of whoever wrote it)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return ""
    # _value: a File Meta element of an unknown VR made pydicom raise
    # NotImplementedError out of ingest (found by fuzzing)
    version = str(_value(meta, "ImplementationVersionName") or "")
    if not version.startswith(IMPLEMENTATION_VERSION_NAME.split("_")[0] + "_"):
        return ""
    return str(_value(meta, "SourceApplicationEntityTitle") or "").strip()[:16]


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


#: What pydicom raises converting a raw value it cannot read: a corrupt IS,
#: a UID sent with the VR US and an odd length (found by fuzzing:
#: BytesLengthException escaped ingest), an unknown VR.
_CONVERSION_ERRORS = (
    # a sequence in place of a value, cut short: pydicom's reader raises
    # OSError (found by fuzzing: InstanceNumber of the VR SQ)
    OSError,
    ValueError,
    TypeError,
    LookupError,
    BytesLengthException,
    NotImplementedError,
    struct.error,
)


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except _CONVERSION_ERRORS:
        # a value pydicom cannot convert; index it as absent (a required UID
        # is then refused as missing)
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
