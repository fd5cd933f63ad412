"""The byte layout of a stored Part 10 file, read without decoding it.

What the retrieve paths need before they send an instance's bytes as
stored: where the data set starts, the File Meta's UIDs, and whether the
data set's elements are encoded as its transfer syntax says and end where
the file ends.  Everything here seeks past values instead of reading them,
so a 500 MB instance costs a few hundred small reads, never its size in
memory.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import struct
from typing import IO

from pydicom.uid import UID

#: Preamble (128 bytes) and the ``DICM`` prefix (PS3.10 7.1).
PREAMBLE_LENGTH = 128 + 4
#: Explicit VR VRs with a 2-byte reserved field and a 4-byte length
#: (PS3.5 7.1.2, Table 7.1-1).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
#: Deepest nesting of sequences walked and accepted at ingest (real data: a
#: handful; SR content trees a few dozen at most).  pydicom recurses a few
#: frames per level, so this also keeps every parse far from Python's limit.
MAX_SEQUENCE_DEPTH = 64
_MAX_DEPTH = MAX_SEQUENCE_DEPTH


class LayoutError(Exception):
    """The bytes are not a Part 10 file (no ``DICM``, File Meta cut short)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a Part 10 file's data set is, and what its File Meta says.

    Attributes
    ----------
    offset
        The data set's first byte (after preamble, prefix and File Meta).
    size
        The data set's length in bytes (file size minus *offset*).
    transfer_syntax, sop_class_uid, sop_instance_uid
        Transfer Syntax UID, Media Storage SOP Class and Instance UIDs
        (``""`` when absent).
    implementation_version_name, source_ae
        Implementation Version Name and Source Application Entity Title
        (``""`` when absent).
    """

    offset: int
    size: int
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    implementation_version_name: str = ""
    source_ae: str = ""


class Soundness(enum.Enum):
    """What :func:`check_structure` found."""

    #: every element is encoded as the transfer syntax says; the last one
    #: ends where the data set ends
    SOUND = "sound"
    #: the data set has an odd length (PS3.5 7.1.1: every value has an even
    #: length), e.g. a file cut short inside a value
    ODD_LENGTH = "odd length"
    #: an element is not what the transfer syntax says (Implicit VR data
    #: under an explicit syntax), or a value runs past the end (cut short)
    MALFORMED = "malformed"


def read_layout(fp: IO[bytes]) -> Layout:
    """The layout of the Part 10 file *fp* (positioned at its start; a
    seekable binary stream).

    Raises
    ------
    LayoutError
        if *fp* has no ``DICM`` prefix or its File Meta is cut short.
    """
    head = fp.read(PREAMBLE_LENGTH)
    if head[128:] != b"DICM":
        raise LayoutError("no DICM prefix")
    meta: dict[int, bytes] = {}
    offset = PREAMBLE_LENGTH
    while True:
        header = fp.read(8)
        if len(header) < 8:
            if not header:
                break  # a File Meta and no data set
            raise LayoutError("the File Meta is cut short")
        group, element = struct.unpack("<HH", header[:4])
        if group != 0x0002:
            break
        if header[4:6] in LONG_VRS:
            extra = fp.read(4)
            if len(extra) < 4:
                raise LayoutError("the File Meta is cut short")
            (length,) = struct.unpack("<I", extra)
            start = offset + 12
        else:
            (length,) = struct.unpack("<H", header[6:8])
            start = offset + 8
        if element in (0x0002, 0x0003, 0x0010, 0x0013, 0x0016):
            value = fp.read(length)
            if len(value) < length:
                raise LayoutError("the File Meta is cut short")
            meta[element] = value
        else:
            fp.seek(start + length)
        offset = start + length
    end = fp.seek(0, 2)
    if offset > end:
        raise LayoutError("the File Meta is cut short")

    def text(element: int) -> str:
        return meta.get(element, b"").decode("ascii", "replace").strip(" \0")

    return Layout(
        offset,
        end - offset,
        text(0x0010),
        text(0x0002),
        text(0x0003),
        text(0x0013),
        text(0x0016),
    )


def data_set_of(part10: bytes) -> bytes:
    """What follows the File Meta Information of the Part 10 bytes *part10*:
    the data set, which two copies of one instance share whatever their
    File Meta says (raises LayoutError as :func:`read_layout`)."""
    return part10[read_layout(io.BytesIO(part10)).offset :]


def check_structure(fp: IO[bytes], layout: Layout) -> Soundness:
    """Walk the elements of the data set of *fp* (whose layout is *layout*)
    by their tags and lengths, into undefined-length sequences and items,
    without reading any value.

    A deflated data set is not walked (it is one zlib stream): it is sound
    when its length is even.
    """
    syntax = UID(layout.transfer_syntax)
    if not syntax.is_transfer_syntax:
        return Soundness.MALFORMED
    if syntax.is_deflated:
        # a deflated stream has any length; the standard pads it to an even
        # one with a NULL byte (pydicom's writer does), and peers refuse an
        # odd data set fragment (dcmtk: "Odd Fragment Length"), so an
        # unpadded one has to be deflated again before it is sent
        return Soundness.MALFORMED if layout.size % 2 else Soundness.SOUND
    if layout.size % 2:
        return Soundness.ODD_LENGTH
    walker = _Walker(fp, syntax.is_implicit_VR, syntax.is_little_endian)
    end = layout.offset + layout.size
    fp.seek(layout.offset)
    try:
        stop = walker.elements(layout.offset, end, 0)
    except _Malformed:
        return Soundness.MALFORMED
    return Soundness.SOUND if stop == end else Soundness.MALFORMED


class _Malformed(Exception):
    pass


class _CutShort(_Malformed):
    """A value's length runs past the end of what holds it."""


class _TooDeep(_Malformed):
    """Sequences are nested deeper than :data:`MAX_SEQUENCE_DEPTH`."""


def find_hazard(fp: IO[bytes], layout: Layout) -> str | None:
    """Why the data set of *fp* must not be parsed, or None.

    Two things make a reader allocate or recurse without bound, and both are
    refused at ingest (C-STORE and STOW-RS) before pydicom parses anything:

    - an element whose length runs past the end of its data set or item
      (e.g. a header claiming 0xFFFFFFF0 bytes in a 4 KB file): the file is
      cut short or forged;
    - sequences nested deeper than :data:`MAX_SEQUENCE_DEPTH` levels
      (defined or undefined length): pydicom, and every renderer of the
      data set, recurses once per level.

    Any other irregularity ends the walk without a verdict (the instance is
    read as before).  A deflated data set is not walked (pydicom reads it).
    """
    syntax = UID(layout.transfer_syntax)
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return None
    walker = _Walker(fp, syntax.is_implicit_VR, syntax.is_little_endian, nested_sq=True)
    fp.seek(layout.offset)
    try:
        walker.elements(layout.offset, layout.offset + layout.size, 0)
    except _CutShort:
        return "an element's length runs past the end of the data set (a cut-short or forged file)"
    except _TooDeep:
        return f"sequences are nested deeper than {MAX_SEQUENCE_DEPTH} levels"
    except (_Malformed, struct.error):
        return None
    return None


class _Walker:
    """Skips elements of one encoding; raises _Malformed at the first one
    that does not fit."""

    def __init__(
        self, fp: IO[bytes], implicit: bool, little: bool, *, nested_sq: bool = False
    ) -> None:
        self.fp = fp
        self.implicit = implicit
        #: also walk into defined-length sequences (to count their depth)
        self.nested_sq = nested_sq
        order = "<" if little else ">"
        self.tag = struct.Struct(f"{order}HH")
        self.u16 = struct.Struct(f"{order}H")
        self.u32 = struct.Struct(f"{order}I")

    def implicit_little_endian(self) -> _Walker:
        return _Walker(self.fp, implicit=True, little=True, nested_sq=self.nested_sq)

    def _read(self, size: int) -> bytes:
        data = self.fp.read(size)
        if len(data) < size:
            raise _Malformed
        return data

    def _tag(self, data: bytes) -> int:
        group, element = self.tag.unpack_from(data)
        return int(group) << 16 | int(element)

    def elements(self, position: int, end: int, depth: int, *, inside_item: bool = False) -> int:
        """Skip elements from *position* until *end*, or until an Item
        Delimitation Item (inside an undefined-length item: returns the
        position after it).  Returns where it stopped.  *inside_item*: the
        elements of a defined-length item, which ends at *end*."""
        while position < end:
            if end - position < 8:
                raise _Malformed
            header = self._read(8)
            tag = self._tag(header)
            if tag == _ITEM_DELIMITER:
                if depth == 0:
                    raise _Malformed
                return position + 8
            if tag in (_ITEM, _SEQUENCE_DELIMITER):
                raise _Malformed
            vr = b""
            if self.implicit:
                (length,) = self.u32.unpack_from(header, 4)
                position += 8
            else:
                vr = header[4:6]
                if not (vr.isalpha() and vr.isupper()):
                    raise _Malformed  # e.g. Implicit VR data under an explicit syntax
                if vr in LONG_VRS:
                    (length,) = self.u32.unpack(self._read(4))
                    position += 12
                else:
                    (length,) = self.u16.unpack_from(header, 6)
                    position += 8
            if length == _UNDEFINED:
                # an undefined-length UN holds an Implicit VR Little Endian
                # sequence (PS3.5 6.2.2)
                walker = (
                    self.implicit_little_endian() if not self.implicit and vr == b"UN" else self
                )
                # encapsulated pixel data holds fragments, not data sets
                fragments = tag == _PIXEL_DATA or vr in (b"OB", b"OW")
                position = walker.items(position, end, depth + 1, datasets=not fragments)
            else:
                value_end = position + length
                if value_end > end:
                    raise _CutShort  # the value runs past the end: cut short
                if self.nested_sq and self._is_sequence(vr, length):
                    self.defined_items(position, value_end, depth + 1)
                position = value_end
                self.fp.seek(position)
        if depth and not inside_item:
            raise _Malformed  # an undefined-length item without its delimiter
        return position

    def _is_sequence(self, vr: bytes, length: int) -> bool:
        """A defined-length value to walk as a sequence: SQ, or (Implicit VR,
        where the VR is not written) a value that starts with an Item tag."""
        if vr == b"SQ":
            return True
        if vr or length < 8:
            return False
        start = self.fp.tell()
        head = self.fp.read(4)
        self.fp.seek(start)
        return len(head) == 4 and self._tag(head + b"\0\0\0\0") == _ITEM

    def defined_items(self, position: int, end: int, depth: int) -> None:
        """Walk the items of a defined-length sequence value ending at *end*."""
        if depth > _MAX_DEPTH:
            raise _TooDeep
        while position < end:
            if end - position < 8:
                raise _CutShort
            header = self._read(8)
            tag = self._tag(header)
            (length,) = self.u32.unpack_from(header, 4)
            position += 8
            if tag != _ITEM:
                raise _Malformed
            if length == _UNDEFINED:
                position = self.elements(position, end, depth)
                continue
            item_end = position + length
            if item_end > end:
                raise _CutShort
            self.elements(position, item_end, depth, inside_item=True)
            position = item_end
            self.fp.seek(position)

    def items(self, position: int, end: int, depth: int, *, datasets: bool = True) -> int:
        """Skip the items of an undefined-length value (a sequence, or
        encapsulated pixel data) up to and past its Sequence Delimitation
        Item."""
        if depth > _MAX_DEPTH:
            raise _TooDeep
        while True:
            if end - position < 8:
                raise _Malformed
            header = self._read(8)
            tag = self._tag(header)
            (length,) = self.u32.unpack_from(header, 4)
            position += 8
            if tag == _SEQUENCE_DELIMITER:
                return position
            if tag != _ITEM:
                raise _Malformed
            if length == _UNDEFINED:
                position = self.elements(position, end, depth)
                continue
            item_end = position + length
            if item_end > end:
                raise _CutShort
            if self.nested_sq and datasets and length:
                self.elements(position, item_end, depth, inside_item=True)
            position = item_end
            self.fp.seek(position)
