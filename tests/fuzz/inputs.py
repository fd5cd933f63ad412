"""Hostile inputs shared by the hypothesis tests and the atheris harnesses:
raw DICOM elements (any VR, any bytes, nested sequences, private tags, odd
character sets) and the code under test, called as the edges call it."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

from hypothesis import strategies as st

#: Explicit VR Little Endian VRs with a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
VRS = sorted(
    {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH", "SL"}
    | {"SS", "ST", "TM", "UI", "UL", "US"}
    | LONG_VRS
)
CHARACTER_SETS = [
    "",
    "ISO_IR 100",
    "ISO_IR 192",
    "ISO 2022 IR 87",
    "\\ISO 2022 IR 149",
    "GB18030",
    "ISO_IR 6\\ISO 2022 IR 13",
    "BOGUS",
    "ISO_IR 100\\\\\\",
]
#: Tags seen in real data sets (names, dates, UIDs, private blocks) and in
#: the index's keys, so values land where parsers look.
TAGS = [
    0x00080005,
    0x00080016,
    0x00080018,
    0x00080020,
    0x00080030,
    0x00080050,
    0x00080060,
    0x00080090,
    0x00081030,
    0x0008103E,
    0x00100010,
    0x00100020,
    0x00100030,
    0x00100040,
    0x00090010,
    0x00091001,
    0x00111010,
    0x0020000D,
    0x0020000E,
    0x00200010,
    0x00200011,
    0x00200013,
    0x00280008,
    0x00280010,
    0x00280011,
    0x00280100,
    0x00400275,
    0x0040A730,
    0x00431028,
    0x7FE00008,
]

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["'", '"', ";--", "%", "_", "\\", "*", "?", "../../etc/passwd", "\x00"]),
    st.text(alphabet="0123456789.", max_size=80),
)
RAW = st.one_of(st.binary(max_size=64), TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")))


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One element, Explicit VR Little Endian, with *value* as given (an odd
    length, non-ASCII bytes in a text VR...)."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value) & 0xFFFF) + value


def item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


@st.composite
def data_sets(draw: Any, depth: int = 0) -> bytes:
    """The elements of a data set (ascending tags), some sequences of
    nested data sets."""
    tags = sorted(set(draw(st.lists(st.sampled_from(TAGS), max_size=8))))
    out = b""
    for tag in tags:
        vr = draw(st.sampled_from(VRS))
        if vr == "SQ" and depth < 4:
            items = draw(st.lists(data_sets(depth + 1), max_size=2))
            out += element(tag, "SQ", b"".join(item(body) for body in items))
        elif tag == 0x00080005:
            out += element(tag, "CS", draw(st.sampled_from(CHARACTER_SETS)).encode())
        else:
            out += element(tag, vr, draw(RAW))
    return out


def part10(body: bytes, syntax: str = "1.2.840.10008.1.2.1") -> bytes:
    """A Part 10 file whose data set is *body*."""

    def meta_element(element_: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0"
        return struct.pack("<HH2sH", 0x0002, element_, vr, len(value)) + value

    meta = (
        meta_element(0x0001, b"OB", b"")[:6]
        + b"\0\0"
        + struct.pack("<I", 2)
        + b"\0\x01"
        + meta_element(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.7")
        + meta_element(0x0003, b"UI", b"1.2.3.4")
        + meta_element(0x0010, b"UI", syntax.encode())
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(meta))
    return b"\0" * 128 + b"DICM" + group_length + meta + body


def render_metadata(data: bytes) -> Any:
    """WADO-RS metadata of the Part 10 bytes *data*, as the view renders it
    (parsed back from its JSON text); ApplianceError if refused."""
    from dicomweb.metadata import instance_json, read_header, serialise

    stream = io.BytesIO(data)
    header = read_header(stream)
    return json.loads(serialise(instance_json(header, lambda path: "bulk/" + path)))
