"""Instance metadata as DICOM JSON (PS3.18 Annex F) and where its bulk data is.

WADO-RS Retrieve Metadata (PS3.18 10.4.1.1.2) answers one DICOM JSON object
per instance.  It must be quick on a large series, so an instance is never
read whole:

- the header is parsed up to the pixel data (``stop_before_pixels``), with
  every top-level value longer than :data:`BULK_THRESHOLD` bytes left
  unread (``defer_size``);
- the pixel data element is not parsed at all: the reader stops in front of
  it, and :func:`read_header` reads its 8 or 12 byte element header to learn
  its VR, length and offset in the blob;
- a binary value (VR OB, OD, OF, OL, OV, OW or UN) longer than
  :data:`BULK_THRESHOLD` bytes, and the pixel data whatever its size, is
  written as a ``BulkDataURI`` (PS3.18 F.2.6) instead of ``InlineBinary``
  (F.2.7), without its bytes having been read.

Bulk data URIs name the value by a *tag path*: the tag as eight hex digits,
and for a value inside a sequence the path through it, ``.`` separated, e.g.
``7FE00010`` or ``00540016.0.00181072`` (item 0 of (0054,0016), its
(0018,1072)).  :func:`locate_bulk` resolves a tag path back to the bytes.

Text values are decoded with the instance's Specific Character Set and
written as UTF-8, so the JSON says ``ISO_IR 192`` in (0008,0005) wherever
the instance had that attribute.  Group Length elements (gggg,0000) and Data
Set Trailing Padding (FFFC,FFFC) are left out: they describe an encoding,
not the data set.  Binary values of an instance stored Big Endian are given
in Little Endian byte order, in ``InlineBinary`` as in bulk data.

Each instance's JSON is cached in the index (:mod:`appliance.index.metadata_cache`)
in the form :func:`metadata_template` makes: the UTF-8 JSON text with the
BulkDataURIs' base, the instance's URL under the request's service root,
left as :data:`BULK_BASE`; :func:`fill_template` puts the base in when the
entry is served.  So a request reads no blob for an instance whose entry is
there, and the service root (the request's host, or ``http.public_url``)
may change between requests.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import secrets
import struct
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import pydicom
from pydicom import dcmread
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID

from appliance.dicomio import HEADER_ERRORS
from appliance.errors import InvalidInstance, NotFound, UnreadableInstance
from appliance.index.sql import StoredInstance
from appliance.retrieve import RetrieveService
from dicomweb.urls import instance_url

#: Binary values longer than this many bytes go out as a BulkDataURI, shorter
#: ones inline (PS3.18 F.2.6/F.2.7 leave the threshold to the origin server).
BULK_THRESHOLD = 1024

#: The value representations whose values are bulk data (PS3.18 F.2.6).
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.3 C.7.6.3).
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
PIXEL_DATA_TAGS = frozenset({PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA})

#: UTF-8, the only character set of JSON text (RFC 8259 8.1; PS3.18 F.2).
UTF8_CHARSET = "ISO_IR 192"

_SPECIFIC_CHARACTER_SET = 0x00080005
_TRAILING_PADDING = 0xFFFCFFFC
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Bytes per word of the binary VRs whose byte order follows the transfer
#: syntax (PS3.5 7.3); OB and UN are byte strings.
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
#: VRs written with a 4-byte length in Explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_PIXEL_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"UN"})
#: The format of cached metadata (:func:`metadata_template`): raise the
#: number with any change to what :func:`instance_json` writes or how it is
#: serialised; pydicom's version is part of it, as its conversions of values
#: are.  Entries of another format are not served (and are rebuilt).
CACHE_VERSION = f"1 pydicom {pydicom.__version__}"
#: Stands for the BulkDataURIs' base in a template: a control character,
#: which JSON text never holds unescaped (RFC 8259 7: strings escape
#: U+0000 to U+001F), so it cannot be mistaken for a value's text; nor is it
#: a part of any other character's UTF-8 encoding.
BULK_BASE = b"\x01"

_TAG_PATH = re.compile(r"[0-9A-Fa-f]{8}(\.[0-9]{1,6}\.[0-9A-Fa-f]{8}){0,8}")


@dataclasses.dataclass(frozen=True)
class PixelLocation:
    """Where the pixel data element's value is in the stored blob.

    Attributes
    ----------
    tag
        (7FE0,0010), (7FE0,0008) or (7FE0,0009).
    vr
        Its VR as encoded (for Implicit VR: OW above 8 bits allocated, else
        OB, PS3.5 A.1; OF, OD for the float pixel data).
    offset
        The position of the value's first byte in the blob.
    length
        The value's length, None for encapsulated pixel data (undefined
        length, PS3.5 A.4): the value then runs from *offset* to the
        sequence delimiter.
    """

    tag: int
    vr: str
    offset: int
    length: int | None


@dataclasses.dataclass(frozen=True)
class InstanceHeader:
    """An instance's data set without its pixel data value.

    Attributes
    ----------
    dataset
        The parsed data set.  Top-level values longer than
        :data:`BULK_THRESHOLD` are deferred: they are read from the stream
        given to :func:`read_header` only if asked for, so that stream must
        stay open while the data set is used.
    transfer_syntax
        The stored Transfer Syntax UID.
    pixel
        Where the pixel data value is; None if there is none or, for a
        deflated instance, when it is in :attr:`dataset` instead.
    """

    dataset: Dataset
    transfer_syntax: UID
    pixel: PixelLocation | None


@dataclasses.dataclass(frozen=True)
class BulkValue:
    """A bulk data value found by :func:`locate_bulk`: either its bytes, or
    its place in the blob.

    Attributes
    ----------
    vr
        The value's VR.
    data
        The value, Little Endian, when it had to be read to be found.
    offset, length
        Else its position in the blob and its length in bytes (length None:
        encapsulated pixel data, up to its sequence delimiter).
    byte_swap
        The word size to swap when the value read from the blob is Big
        Endian (0: nothing to swap).
    """

    vr: str
    data: bytes | None = None
    offset: int | None = None
    length: int | None = None
    byte_swap: int = 0


def read_header(stream: IO[bytes]) -> InstanceHeader:
    """Parse a stored Part 10 instance up to its pixel data.

    Parameters
    ----------
    stream
        The blob, seekable, positioned at its start; kept open by the caller
        while the returned data set is used (deferred values are read from
        it).

    Raises
    ------
    UnreadableInstance
        if the bytes are not a DICOM Part 10 file or the header is corrupt.
    """
    try:
        ds = dcmread(stream, stop_before_pixels=True, defer_size=BULK_THRESHOLD)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is None:
            raise InvalidInstance("the File Meta Information lacks TransferSyntaxUID")
        syntax = UID(syntax)
        if syntax.is_deflated:
            # the data set was inflated into memory: read it whole, pixel
            # data included (deflated instances are small in practice)
            stream.seek(0)
            return InstanceHeader(dcmread(stream), syntax, None)
        pixel = _pixel_location(stream, ds, syntax)
    except InvalidDicomError as exc:
        raise UnreadableInstance(f"the stored blob is not a DICOM file: {exc}") from None
    except HEADER_ERRORS as exc:
        raise UnreadableInstance(f"the stored DICOM header cannot be parsed: {exc}") from None
    except RecursionError:
        raise UnreadableInstance(_TOO_DEEP) from None
    return InstanceHeader(ds, syntax, pixel)


#: The reason for an instance stored before ingest refused deep nesting
#: (appliance.encoding.find_hazard), or brought in by other means.
_TOO_DEEP = "the stored data set's sequences are nested too deeply to be read"


def _rendered(header: InstanceHeader, bulk_uri: Callable[[str], str]) -> dict[str, Any]:
    """:func:`instance_json`, with a refusal instead of a RecursionError."""
    try:
        return instance_json(header, bulk_uri)
    except RecursionError:
        raise UnreadableInstance(_TOO_DEEP) from None


def _pixel_location(stream: IO[bytes], ds: Dataset, syntax: UID) -> PixelLocation | None:
    """Read the element header the parser stopped in front of (PS3.5 7.1)."""
    start = stream.tell()
    head = stream.read(12)
    if len(head) < 8:
        return None
    endian = "<" if syntax.is_little_endian else ">"
    group, element = struct.unpack(f"{endian}HH", head[:4])
    tag = group << 16 | element
    if tag not in PIXEL_DATA_TAGS:
        return None
    # a mislabelled file may be Implicit VR under an Explicit VR syntax (the
    # parser copes the same way): no VR where one should be
    implicit = syntax.is_implicit_VR or head[4:6] not in _PIXEL_VRS
    if implicit:
        (length,) = struct.unpack(f"{endian}I", head[4:8])
        offset = start + 8
        vr = {FLOAT_PIXEL_DATA: "OF", DOUBLE_FLOAT_PIXEL_DATA: "OD"}.get(tag, "")
        if not vr:
            vr = "OW" if _int(ds, "BitsAllocated", 16) > 8 else "OB"
    else:
        vr = head[4:6].decode("ascii", "replace")
        if vr in _LONG_VRS:
            if len(head) < 12:
                return None
            (length,) = struct.unpack(f"{endian}I", head[8:12])
            offset = start + 12
        else:
            (length,) = struct.unpack(f"{endian}H", head[6:8])
            offset = start + 8
    return PixelLocation(tag, vr, offset, None if length == _UNDEFINED_LENGTH else length)


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default))
    except (TypeError, ValueError):
        return default


# ----------------------------------------------------------------- DICOM JSON


def instance_json(header: InstanceHeader, bulk_uri: Callable[[str], str]) -> dict[str, Any]:
    """The DICOM JSON object of one instance (PS3.18 F.2).

    Parameters
    ----------
    header
        From :func:`read_header`; its stream must still be open.
    bulk_uri
        Makes the BulkDataURI of a value from its tag path (see the module
        docstring).

    Returns
    -------
    dict
        Attribute objects by tag (eight upper-case hex digits), in tag order.
    """
    little = header.transfer_syntax.is_little_endian
    out = _dataset_json(header.dataset, (), bulk_uri, little)
    pixel = header.pixel
    if pixel is not None:
        key = f"{pixel.tag:08X}"
        out[key] = {"vr": pixel.vr, "BulkDataURI": bulk_uri(key)}
    return dict(sorted(out.items()))


def _dataset_json(
    ds: Dataset, path: tuple[str, ...], bulk_uri: Callable[[str], str], little: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in list(ds.keys()):
        if tag.element == 0 or tag == _TRAILING_PADDING:
            continue  # Group Length (PS3.5 7.2), padding: encoding details
        key = f"{tag:08X}"
        where = (*path, key)
        raw = ds.get_item(tag, keep_deferred=True)
        if _is_deferred(raw):
            vr = _raw_vr(raw)
            if vr in BULK_VRS:
                # longer than the threshold: a URI, and the bytes stay unread
                out[key] = {"vr": vr, "BulkDataURI": bulk_uri(".".join(where))}
                continue
        try:
            elem = ds[tag]
            out[key] = _element_json(elem, where, bulk_uri, little)
        except Exception:  # noqa: BLE001 - a malformed value must not sink the response
            out[key] = _unreadable_json(raw)
    return out


def _element_json(
    elem: DataElement, where: tuple[str, ...], bulk_uri: Callable[[str], str], little: bool
) -> dict[str, Any]:
    vr = _normal_vr(str(elem.VR))
    if vr == "SQ":
        items = [
            _dataset_json(item, (*where, str(number)), bulk_uri, little)
            for number, item in enumerate(elem.value or ())
        ]
        # F.2.5: an empty sequence has no "Value"
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if vr in BULK_VRS:
        value = elem.value
        if not value:
            return {"vr": vr}
        if not isinstance(value, bytes | bytearray):
            return elem.to_json_dict(None, 0)
        if len(value) > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": bulk_uri(".".join(where))}
        data = bytes(value) if little else to_little_endian(bytes(value), vr)
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode("ascii")}
    if elem.tag == _SPECIFIC_CHARACTER_SET:
        # text below is decoded and written as UTF-8 (F.2: JSON is UTF-8)
        return {"vr": "CS", "Value": [UTF8_CHARSET]}
    return _finite(elem.to_json_dict(None, 0))


#: The JSON strings of the floating point values a JSON number cannot hold
#: (PS3.18 F.2.3, CP-2275: NaN and the infinities of FL, FD and DS).
_NON_FINITE = {"nan": "NaN", "inf": "inf", "-inf": "-inf"}


def _finite(element: dict[str, Any]) -> dict[str, Any]:
    """*element* with each NaN or infinite number of its Value as its
    string (``json.dumps`` refuses them: they are not JSON numbers)."""
    values = element.get("Value")
    if values and any(isinstance(v, float) and not math.isfinite(v) for v in values):
        element["Value"] = [
            _NON_FINITE[repr(v)] if isinstance(v, float) and not math.isfinite(v) else v
            for v in values
        ]
    return element


def _unreadable_json(raw: DataElement | RawDataElement) -> dict[str, Any]:
    """A value pydicom cannot convert: its bytes as UN, or an empty UN."""
    value = raw.value if isinstance(raw, RawDataElement) else None
    if isinstance(value, bytes) and value:
        return {"vr": "UN", "InlineBinary": base64.b64encode(value).decode("ascii")}
    return {"vr": "UN"}


def _is_deferred(raw: DataElement | RawDataElement) -> bool:
    return (
        isinstance(raw, RawDataElement)
        and raw.value is None
        and raw.length not in (0, _UNDEFINED_LENGTH)
    )


def _raw_vr(raw: DataElement | RawDataElement) -> str:
    """The VR of a not yet converted element: as encoded (Explicit VR) or
    from the data dictionary (Implicit VR); UN for an unknown tag."""
    if raw.VR:
        return _normal_vr(str(raw.VR))
    tag = BaseTag(raw.tag)
    if dictionary_has_tag(tag):
        return _normal_vr(dictionary_VR(tag))
    return "UN"


def _normal_vr(vr: str) -> str:
    """One VR for the dictionary's ambiguous ones (``OB or OW``, ``US or SS
    or OW``): OW when it is among them, else the first."""
    if " or " not in vr:
        return vr
    choices = vr.split(" or ")
    return "OW" if "OW" in choices else choices[0]


def to_little_endian(value: bytes, vr: str) -> bytes:
    """A binary value of VR *vr* read Big Endian, in Little Endian order."""
    size = _WORD_SIZE.get(vr, 0)
    if not size or len(value) % size:
        return value
    return np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()


# ------------------------------------------------------------------ bulk data


def is_tag_path(path: str) -> bool:
    """True if *path* is a tag path as :func:`instance_json` writes them."""
    return _TAG_PATH.fullmatch(path) is not None


def locate_bulk(header: InstanceHeader, path: str) -> BulkValue:
    """Find the bulk data value a tag path names.

    Parameters
    ----------
    header
        From :func:`read_header`; its stream must still be open.
    path
        A tag path (checked with :func:`is_tag_path` first).

    Raises
    ------
    NotFound
        if the instance has no such value, or it is not a binary value.
    """
    parts = path.upper().split(".")
    first = int(parts[0], 16)
    little = header.transfer_syntax.is_little_endian
    swap = 0
    pixel = header.pixel
    if len(parts) == 1 and pixel is not None and first == pixel.tag:
        if not little and pixel.length is not None:
            swap = _pixel_word_size(header.dataset, pixel)
        return BulkValue(pixel.vr, offset=pixel.offset, length=pixel.length, byte_swap=swap)
    ds = header.dataset
    raw = ds.get_item(first, keep_deferred=True) if first in ds else None
    if raw is None:
        raise NotFound(f"the instance has no bulk data value at {path}")
    if len(parts) == 1 and isinstance(raw, RawDataElement) and _is_deferred(raw):
        # never so for a deflated instance, which is read whole: value
        # positions are then positions in the inflated copy, not the blob
        vr = _raw_vr(raw)
        if vr not in BULK_VRS:
            raise NotFound(f"the value at {path} is not bulk data")
        if not little:
            swap = _WORD_SIZE.get(vr, 0)
        return BulkValue(vr, offset=raw.value_tell, length=raw.length, byte_swap=swap)
    elem = ds[first]
    for number, tag in zip(parts[1::2], parts[2::2], strict=True):
        try:
            item = elem.value[int(number)]
            elem = item[int(tag, 16)]
        except (IndexError, KeyError, TypeError) as exc:
            raise NotFound(f"the instance has no bulk data value at {path}") from exc
    vr = _normal_vr(str(elem.VR))
    if vr not in BULK_VRS or not isinstance(elem.value, bytes | bytearray):
        raise NotFound(f"the value at {path} is not bulk data")
    data = bytes(elem.value)
    return BulkValue(vr, data=data if little else to_little_endian(data, vr))


def _pixel_word_size(ds: Dataset, pixel: PixelLocation) -> int:
    """Bytes per pixel sample to swap for native Big Endian pixel data."""
    if pixel.tag == FLOAT_PIXEL_DATA:
        return 4
    if pixel.tag == DOUBLE_FLOAT_PIXEL_DATA:
        return 8
    if pixel.vr != "OW":
        return 0  # OB: a byte string
    # OW is a string of 16-bit words (PS3.5 6.2), also for 8-bit samples;
    # 32-bit samples are read as 32-bit words, as pydicom does
    return 4 if _int(ds, "BitsAllocated", 16) == 32 else 2


def instance_metadata(
    retrieve: RetrieveService, root: str, stored: StoredInstance
) -> dict[str, Any]:
    """One stored instance's metadata (PS3.18 Annex F), its bulk data as
    ``BulkDataURI`` under the instance's WADO-RS URL *root*-based."""
    base = bulk_base(root, stored)
    with retrieve.open(stored) as stream:
        header = read_header(stream)
        return _rendered(header, lambda path: base + path)


def bulk_base(root: str, stored: StoredInstance) -> str:
    """The part of the instance's BulkDataURIs before their tag paths."""
    return (
        instance_url(
            root, stored.study_instance_uid, stored.series_instance_uid, stored.sop_instance_uid
        )
        + "/bulk/"
    )


def serialise(obj: dict[str, Any]) -> bytes:
    """A DICOM JSON object as UTF-8 JSON text, as the metadata sends it."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")


def metadata_template(retrieve: RetrieveService, stored: StoredInstance) -> bytes:
    """One stored instance's metadata as :func:`serialise` writes it, but
    with :data:`BULK_BASE` where each BulkDataURI's :func:`bulk_base` is.

    Raises
    ------
    UnreadableInstance
        if the blob's header cannot be parsed.
    """
    # the URIs are built around a random token, which no value of the data
    # set can hold by chance or by design, and the token is swapped for the
    # placeholder once the text is written
    token = secrets.token_hex(16)
    with retrieve.open(stored) as stream:
        header = read_header(stream)
        obj = _rendered(header, lambda path: token + path)
    try:
        text = serialise(obj)
    except RecursionError:
        raise UnreadableInstance(_TOO_DEEP) from None
    return text.replace(token.encode("ascii"), BULK_BASE)


def fill_template(template: bytes, base: bytes) -> bytes:
    """The metadata text of *template* with *base* (from :func:`json_base`)
    in place of :data:`BULK_BASE`."""
    return template.replace(BULK_BASE, base)


def json_base(root: str, stored: StoredInstance) -> bytes:
    """:func:`bulk_base` as it reads inside a JSON string (UTF-8, escaped as
    :func:`serialise` escapes it: each character on its own, so the text of
    base + path is the text of base followed by that of path)."""
    return json.dumps(bulk_base(root, stored), ensure_ascii=False)[1:-1].encode("utf-8")
