"""Pixel data of stored instances: where each frame is, its bytes, and a
rendered picture of it (WADO-RS frames, rendered and thumbnail resources).

Only the header is parsed (``stop_before_pixels``); the frames are then read
with :meth:`~appliance.retrieve.RetrieveService.open_range` from positions
found by walking the Pixel Data element:

- native (uncompressed) data, PS3.5 8.1.1: frame *n* starts at bit
  ``n * Rows * Columns * SamplesPerPixel * BitsAllocated`` of the value (two
  thirds of that for native ``YBR_FULL_422``, PS3.3 C.7.6.3.1.2); with
  Bits Allocated 1 a frame need not start on a byte boundary;
- encapsulated data, PS3.5 A.4: the item headers are read, not the
  fragments; frames come from the Extended Offset Table (PS3.3 C.7.6.3.1.8),
  else the Basic Offset Table, else one fragment per frame, else the JPEG
  end-of-image marker, the same rules (and order) as
  :func:`pydicom.encaps.generate_fragmented_frames`.

A data set in Deflated Explicit VR Little Endian cannot be read at an
offset; it is inflated whole in memory instead.

Frames are delivered in the byte order of PS3.18 8.7.3.3.1 (uncompressed
bulk data is little endian): data stored in the retired Explicit VR Big
Endian is byte-swapped on the way out, everything else is sent exactly as
stored.  Decoding uses pydicom's decoders (:func:`pydicom.pixels.get_decoder`)
and rendering follows the grayscale pipeline of PS3.4 N.2 (Modality LUT,
VOI LUT or window, MONOCHROME1 inversion) or the palette / colour path.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MPEGTransferSyntaxes,
)

from appliance.errors import ApplianceError
from appliance.index.sql import StoredInstance
from appliance.retrieve import RetrieveService
from appliance.status import Status

#: Bytes read per call when streaming a frame.
CHUNK_SIZE = 1024 * 1024

#: The Pixel Data elements a frame can come from (PS3.3 C.7.6.3).
PIXEL_KEYWORDS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}

#: PS3.18 Table 8.7.3-5: the media type of compressed bulk data by Transfer
#: Syntax (HTJ2K and JPEG XL from the 2024 editions of the table).
COMPRESSED_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "image/jpeg",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57": "image/jpeg",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "image/jpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "image/jls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "image/jls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "image/jp2",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91": "image/jp2",  # JPEG 2000
    "1.2.840.10008.1.2.4.92": "image/jpx",  # JPEG 2000 Part 2 (Lossless Only)
    "1.2.840.10008.1.2.4.93": "image/jpx",  # JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.201": "image/jphc",  # HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202": "image/jphc",  # HTJ2K with RPCL (Lossless Only)
    "1.2.840.10008.1.2.4.203": "image/jphc",  # HTJ2K
    "1.2.840.10008.1.2.4.110": "image/jxl",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111": "image/jxl",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112": "image/jxl",  # JPEG XL
    "1.2.840.10008.1.2.5": "image/dicom-rle",  # RLE Lossless
}

#: Transfer syntaxes whose pixel data is (or may be) lossy: retrieved in the
#: stored form by default (PS3.18 8.7.3.3), not decoded.  JPEG 2000 and
#: HTJ2K "Image Compression" may be reversible too; they count as lossy here
#: (the transfer syntax is all that is known before the header is read).
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2
        "1.2.840.10008.1.2.4.203",  # HTJ2K
        "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
        "1.2.840.10008.1.2.4.112",  # JPEG XL
        *(str(uid) for uid in MPEGTransferSyntaxes),
    }
)

#: Older names of the same media types, still sent by some clients.
MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}

#: Uncompressed bulk data (PS3.18 Table 8.7.3-4): Explicit VR Little Endian.
UNCOMPRESSED_TRANSFER_SYNTAX = str(ExplicitVRLittleEndian)

#: The "last bytes of a fragment" window in which a JPEG EOI marker ends a
#: frame when nothing else tells the frame boundaries (as pydicom does).
_EOI_MARKER = b"\xff\xd9"
_EOI_WINDOW = 10

_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UC", b"UR", b"UT"}


class PixelDataError(ApplianceError):
    """The stored pixel data cannot be located or decoded (truncated,
    corrupt, or contradicting its header)."""


class NotAnImage(ApplianceError):
    """The instance has no Pixel Data, Float Pixel Data or Double Float
    Pixel Data, so it has no frames and nothing to render."""

    #: its SOP Class has no image to give (PS3.7 C.5: 0x0122)
    status = Status.SOP_CLASS_NOT_SUPPORTED


class CannotDecode(ApplianceError):
    """No decoder available here handles the instance's transfer syntax."""


class InvalidRenderParameter(ApplianceError):
    """A rendering parameter cannot be applied to this image (e.g. a
    viewport source region outside it)."""


# --------------------------------------------------------------------------
# locating frames


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of bytes in the stored source: *length* bytes from *offset*."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        """The offset just past the segment."""
        return self.offset + self.length


#: Opens *length* bytes of the stored source from *offset*.
RangeOpener = Callable[[int, int], IO[bytes]]


@dataclasses.dataclass(frozen=True)
class _NativeLayout:
    """How native frames sit in the value (PS3.5 8.1.1, 8.2)."""

    value_offset: int
    value_length: int
    frame_bits: int
    #: byte-swap unit to turn stored big endian into little endian; 0 = none
    swap: int
    #: 8-bit data in OW with big endian: bytes swapped pairwise (PS3.5 8.1.1)
    pairwise: bool


@dataclasses.dataclass(frozen=True)
class InstancePixels:
    """The pixel data of one stored instance, located but not read.

    Build it with :func:`load_pixels`.  Frame indexes are 0-based here; the
    1-based frame numbers of PS3.18 are the edge's business.
    """

    header: Dataset
    transfer_syntax: UID
    keyword: str
    number_of_frames: int
    opener: RangeOpener
    #: encapsulated: the fragments of each located frame (value bytes only)
    fragments: tuple[tuple[Segment, ...], ...] = ()
    native: _NativeLayout | None = None

    # -- what it is ------------------------------------------------------

    @property
    def is_encapsulated(self) -> bool:
        """True if the stored pixel data is compressed (PS3.5 A.4)."""
        return self.native is None

    @property
    def is_video(self) -> bool:
        """True for MPEG-2/MPEG-4/HEVC data, whose frames are one stream."""
        return self.transfer_syntax in MPEGTransferSyntaxes

    def can_decode(self) -> bool:
        """True if frames can be decoded here (native data always can)."""
        return can_decode(str(self.transfer_syntax))

    # -- bytes -----------------------------------------------------------

    def iter_frame(self, index: int) -> Iterator[bytes]:
        """The frame's bytes in chunks: the fragments' contents for
        encapsulated data, little endian uncompressed bytes otherwise
        (exactly as stored unless stored big endian or bit-packed across a
        byte boundary).

        Raises
        ------
        PixelDataError
            if the frame is not in the stored pixel data.
        """
        self.check_frame(index)
        if self.native is None:
            yield from self._iter_segments(self._fragments_of(index))
            return
        layout = self.native
        start_bit = index * layout.frame_bits
        start, end = start_bit // 8, -(-(start_bit + layout.frame_bits) // 8)
        if layout.swap == 0 and start_bit % 8 == 0 and layout.frame_bits % 8 == 0:
            # the common case: a byte-exact slice of the stored value
            yield from self._iter_segments((Segment(layout.value_offset + start, end - start),))
            return
        yield self._converted_native_frame(layout, start_bit, start, end)

    def frame_bytes(self, index: int) -> bytes:
        """The whole frame of :meth:`iter_frame`."""
        return b"".join(self.iter_frame(index))

    def uncompressed_frame(self, index: int) -> bytes:
        """The frame as little endian uncompressed bytes (PS3.18 8.7.3.3.1),
        decoding compressed data; colour is pixel-interleaved, and data
        decoded from YBR_FULL/YBR_FULL_422 is RGB (as pydicom decodes it).

        Raises
        ------
        CannotDecode, PixelDataError
        """
        if not self.is_encapsulated:
            return self.frame_bytes(index)
        arr = self.decode_frame(index)
        bits = _int_value(self.header, "BitsAllocated") or 8
        size = max(1, bits // 8)
        return np.ascontiguousarray(arr, dtype=f"<{arr.dtype.kind}{size}").tobytes()

    def decode_frame(self, index: int) -> npt.NDArray[Any]:
        """The frame decoded by pydicom: (rows, columns) or (rows, columns,
        samples); YBR_FULL and YBR_FULL_422 come back as RGB.

        Raises
        ------
        CannotDecode
            if no decoder here handles the transfer syntax.
        PixelDataError
            if the decoder fails on the stored bytes.
        """
        if not self.can_decode():
            raise CannotDecode(
                f"no decoder is available here for transfer syntax {self.transfer_syntax}"
            )
        data = self.frame_bytes(index)
        options = as_pixel_options(self.header, number_of_frames=1, pixel_keyword=self.keyword)
        options.pop("extended_offsets", None)
        if self.is_encapsulated:
            syntax = self.transfer_syntax
            source = encapsulate([data])
        else:
            syntax = ExplicitVRLittleEndian
            source = data
        try:
            arr, _ = get_decoder(syntax).as_array(source, index=0, **options)
        except NotImplementedError as exc:
            raise CannotDecode(f"frame {index + 1} cannot be decoded here: {exc}") from None
        except (ValueError, RuntimeError, AttributeError, TypeError, KeyError) as exc:
            raise PixelDataError(f"frame {index + 1} could not be decoded: {exc}") from None
        return arr

    def check_frame(self, index: int) -> None:
        """Raise :class:`PixelDataError` unless frame *index* is wholly in
        the stored pixel data (checked without reading it)."""
        self._check_index(index)
        if self.native is None:
            self._fragments_of(index)
            return
        end = -(-((index + 1) * self.native.frame_bits) // 8)
        if end > self.native.value_length:
            raise PixelDataError(
                f"frame {index + 1} lies beyond the end of the stored pixel data "
                f"({self.native.value_length} bytes)"
            )

    # -- helpers ---------------------------------------------------------

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.number_of_frames:
            raise PixelDataError(
                f"frame {index + 1} is outside 1..{self.number_of_frames} (Number of Frames)"
            )

    def _fragments_of(self, index: int) -> tuple[Segment, ...]:
        if index >= len(self.fragments):
            raise PixelDataError(
                f"frame {index + 1} is missing from the stored pixel data "
                f"({len(self.fragments)} frames found of {self.number_of_frames})"
            )
        return self.fragments[index]

    def _iter_segments(self, segments: Sequence[Segment]) -> Iterator[bytes]:
        """Read *segments* (in order, possibly with gaps) through one range."""
        if not segments:
            return
        first, last = segments[0].offset, segments[-1].end
        with self.opener(first, last - first) as stream:
            position = first
            for segment in segments:
                _skip(stream, segment.offset - position)
                remaining = segment.length
                while remaining:
                    chunk = stream.read(min(CHUNK_SIZE, remaining))
                    if not chunk:
                        raise PixelDataError("the stored pixel data ends inside a frame")
                    remaining -= len(chunk)
                    yield chunk
                position = segment.end

    def _converted_native_frame(
        self, layout: _NativeLayout, start_bit: int, start: int, end: int
    ) -> bytes:
        """A native frame that is not a plain slice: swapped to little endian
        and/or shifted to start on a byte boundary."""
        read_start, read_end = start, end
        if layout.pairwise:
            read_start -= read_start % 2
            read_end = min(read_end + read_end % 2, layout.value_length)
        data = b"".join(
            self._iter_segments((Segment(layout.value_offset + read_start, read_end - read_start),))
        )
        if layout.swap:
            usable = len(data) - len(data) % layout.swap
            swapped = np.frombuffer(data[:usable], dtype=f">u{layout.swap}").astype(
                f"<u{layout.swap}"
            )
            data = swapped.tobytes() + data[usable:]
        data = data[start - read_start :]
        shift = start_bit % 8
        if shift == 0 and layout.frame_bits % 8 == 0:
            return data[: end - start]
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        frame = bits[shift : shift + layout.frame_bits]
        return np.packbits(frame, bitorder="little").tobytes()


def can_decode(transfer_syntax_uid: str) -> bool:
    """True if pixel data in *transfer_syntax_uid* can be decoded here
    (native syntaxes always; compressed ones if a pydicom decoder plugin is
    installed: pylibjpeg, its libjpeg/openjpeg/rle plugins, Pillow)."""
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_encapsulated:
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def load_pixels(retrieve: RetrieveService, stored: StoredInstance) -> InstancePixels:
    """Read the header of *stored* and locate its frames.

    Raises
    ------
    NotAnImage
        if the instance has no pixel data element.
    PixelDataError
        if the header or the pixel data's structure cannot be read.
    """

    def opener(offset: int, length: int) -> IO[bytes]:
        return retrieve.open_range(stored, offset, length)

    with retrieve.open(stored) as stream:
        header = _read_header(stream)
        syntax = UID(header.file_meta.get("TransferSyntaxUID", ""))
        if not syntax.is_transfer_syntax:
            raise PixelDataError(f"unknown transfer syntax {syntax!r} in the File Meta")
        if syntax == DeflatedExplicitVRLittleEndian:
            stream.seek(0)
            return _inflated_pixels(stream, header, syntax)
        return _locate(stream, header, syntax, opener, stored.size)


def _read_header(stream: IO[bytes]) -> Dataset:
    try:
        # defer_size=None: the header is kept after the stream is closed
        # (palette LUTs and offset tables included)
        return dcmread(stream, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise PixelDataError(f"the stored header could not be parsed: {exc}") from None


def _frame_count(header: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent or zero (as pydicom)."""
    try:
        value = header.get("NumberOfFrames")
        count = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise PixelDataError("Number of Frames (0028,0008) is not a number") from None
    if count < 0:
        raise PixelDataError("Number of Frames (0028,0008) is negative")
    return count or 1


def _int_value(header: Dataset, keyword: str) -> int | None:
    try:
        value = header.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _locate(
    stream: IO[bytes], header: Dataset, syntax: UID, opener: RangeOpener, size: int
) -> InstancePixels:
    """Parse the pixel data element header at the stream's position (where
    ``stop_before_pixels`` left it) and locate the frames; *size* is the
    blob's, so that a truncated blob fails before a frame is streamed."""
    position = stream.tell()
    implicit, little = header.original_encoding
    if implicit is None or little is None:
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    endian = "<" if little else ">"
    raw_tag = stream.read(4)
    if len(raw_tag) < 4:
        raise NotAnImage("the instance has no pixel data")
    group, element = struct.unpack(f"{endian}HH", raw_tag)
    keyword = PIXEL_KEYWORDS.get(group << 16 | element)
    if keyword is None:
        raise PixelDataError(f"unexpected tag ({group:04X},{element:04X}) at the pixel data")
    raw = _read_exact(stream, 4)
    vr = raw[:2]
    if implicit or not (vr.isalpha() and vr.isupper()):
        # implicit VR, or an explicit syntax whose data set is implicit (as
        # pydicom tolerates, seen in real files): no VR, a 4-byte length
        vr = b"OW" if keyword == "PixelData" else b"OF"
        (length,) = struct.unpack(f"{endian}L", raw)
        header_size = 8
    elif vr in _LONG_VRS:
        (length,) = struct.unpack(f"{endian}L", _read_exact(stream, 4))
        header_size = 12
    else:
        (length,) = struct.unpack(f"{endian}H", raw[2:])
        header_size = 8
    value_offset = position + header_size
    count = _frame_count(header)
    if length == 0xFFFFFFFF:
        fragments = _locate_fragments(stream, header, count, endian, size)
        return InstancePixels(header, syntax, keyword, count, opener, fragments=tuple(fragments))
    length = max(0, min(length, size - value_offset))
    layout = _native_layout(header, little, vr, value_offset, length)
    return InstancePixels(header, syntax, keyword, count, opener, native=layout)


def _native_layout(
    header: Dataset, little: bool, vr: bytes, value_offset: int, length: int
) -> _NativeLayout:
    rows = _int_value(header, "Rows")
    columns = _int_value(header, "Columns")
    bits = _int_value(header, "BitsAllocated")
    samples = _int_value(header, "SamplesPerPixel") or 1
    if not rows or not columns or not bits:
        raise PixelDataError("Rows, Columns or Bits Allocated is missing or zero")
    frame_bits = rows * columns * samples * bits
    if str(header.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        # PS3.3 C.7.6.3.1.2: two Y values share one CbCr pair when native
        frame_bits = frame_bits // 3 * 2
    swap, pairwise = 0, False
    if not little:
        if bits >= 16:
            swap = bits // 8
        elif bits == 8 and vr == b"OW":
            swap, pairwise = 2, True
    return _NativeLayout(value_offset, length, frame_bits, swap, pairwise)


def _locate_fragments(
    stream: IO[bytes], header: Dataset, count: int, endian: str, size: int
) -> list[tuple[Segment, ...]]:
    """The fragments of each frame of encapsulated pixel data; the stream is
    at the Basic Offset Table item (PS3.5 A.4).  A fragment cut short by the
    end of the data (*size*) ends the list."""
    tag, bot_length = _read_item_header(stream, endian)
    if tag != _ITEM:
        raise PixelDataError("encapsulated pixel data does not start with the Basic Offset Table")
    if bot_length % 4:
        raise PixelDataError("the Basic Offset Table's length is not a multiple of 4")
    basic = list(struct.unpack(f"{endian}{bot_length // 4}L", _read_exact(stream, bot_length)))
    first_item = stream.tell()
    items: list[Segment] = []  # the value of each fragment item
    while True:
        try:
            tag, length = _read_item_header(stream, endian)
        except PixelDataError:
            break  # ends without a sequence delimiter: take what is there
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise PixelDataError("malformed fragment item in the encapsulated pixel data")
        if stream.tell() + length > size:
            break
        items.append(Segment(stream.tell(), length))
        _skip(stream, length)

    extended = _extended_offsets(header, endian)
    if extended is not None:
        # PS3.3 C.7.6.3.1.8: offsets from the first fragment item's tag,
        # one fragment per frame
        located: list[tuple[Segment, ...]] = []
        for offset, length in zip(*extended, strict=False):
            segment = Segment(first_item + offset + 8, length)
            if segment.end > size:
                break  # cut short by the end of the data
            located.append((segment,))
        return located
    if basic:
        # PS3.5 A.4: each offset is that of the frame's first fragment item
        frames: list[list[Segment]] = []
        boundaries = basic[1:]
        for item in items:
            relative = item.offset - 8 - first_item
            if not frames or (boundaries and relative >= boundaries[0]):
                if frames:
                    boundaries = boundaries[1:]
                frames.append([])
            frames[-1].append(item)
        return [tuple(frame) for frame in frames]
    if len(items) == 1 or len(items) == count:
        return [(item,) for item in items]
    if count == 1:
        return [tuple(items)]
    if len(items) > count:
        return _split_at_eoi(stream, items)
    raise PixelDataError(
        f"{len(items)} fragments for {count} frames and no offset table: "
        "the frame boundaries are unknown"
    )


def _split_at_eoi(stream: IO[bytes], items: list[Segment]) -> list[tuple[Segment, ...]]:
    """Frames end with the fragment whose last bytes hold a JPEG EOI marker
    (the heuristic pydicom uses when no offset table is given)."""
    frames: list[tuple[Segment, ...]] = []
    current: list[Segment] = []
    for item in items:
        current.append(item)
        tail = min(_EOI_WINDOW, item.length)
        stream.seek(item.end - tail)
        if _EOI_MARKER in stream.read(tail):
            frames.append(tuple(current))
            current = []
    if current:
        frames.append(tuple(current))
    return frames


def _extended_offsets(header: Dataset, endian: str) -> tuple[list[int], list[int]] | None:
    offsets = header.get("ExtendedOffsetTable")
    lengths = header.get("ExtendedOffsetTableLengths")
    if not offsets or not lengths:
        return None
    return (
        list(struct.unpack(f"{endian}{len(offsets) // 8}Q", offsets)),
        list(struct.unpack(f"{endian}{len(lengths) // 8}Q", lengths)),
    )


def _inflated_pixels(stream: IO[bytes], header: Dataset, syntax: UID) -> InstancePixels:
    """Deflated data sets (PS3.5 A.5) are read whole: a deflate stream has
    no offsets to seek to."""
    try:
        full = dcmread(stream)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise PixelDataError(f"the deflated data set could not be read: {exc}") from None
    found = [(tag, keyword) for tag, keyword in PIXEL_KEYWORDS.items() if tag in full]
    if not found:
        raise NotAnImage("the instance has no pixel data")
    tag, keyword = found[0]
    element = full[tag]
    value = bytes(element.value)

    def opener(offset: int, length: int) -> IO[bytes]:
        return io.BytesIO(value[offset : offset + length])

    count = _frame_count(header)
    if element.is_undefined_length:
        buffer = io.BytesIO(value)
        fragments = _locate_fragments(buffer, header, count, "<", len(value))
        return InstancePixels(header, syntax, keyword, count, opener, fragments=tuple(fragments))
    vr = str(element.VR).encode("ascii")
    layout = _native_layout(header, True, vr, 0, len(value))
    return InstancePixels(header, syntax, keyword, count, opener, native=layout)


def _read_item_header(stream: IO[bytes], endian: str) -> tuple[int, int]:
    raw = stream.read(8)
    if len(raw) < 8:
        raise PixelDataError("the encapsulated pixel data ends early")
    group, element, length = struct.unpack(f"{endian}HHL", raw)
    return group << 16 | element, length


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise PixelDataError("the stored pixel data ends early")
    return data


def _skip(stream: IO[bytes], size: int) -> None:
    if size <= 0:
        return
    if stream.seekable():
        stream.seek(size, io.SEEK_CUR)
        return
    while size:
        chunk = stream.read(min(CHUNK_SIZE, size))
        if not chunk:
            raise PixelDataError("the stored pixel data ends early")
        size -= len(chunk)


# --------------------------------------------------------------------------
# rendering (PS3.18 8.3.5, PS3.4 N.2)

WindowFunction = Literal["linear", "linear-exact", "sigmoid"]

#: VOI LUT Function (0028,1056) values and the PS3.18 8.3.5.1.4 names.
_VOI_FUNCTIONS: dict[str, WindowFunction] = {
    "LINEAR": "linear",
    "LINEAR_EXACT": "linear-exact",
    "SIGMOID": "sigmoid",
}


@dataclasses.dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center and width in the units after
    the Modality LUT, and the function's PS3.18 name."""

    center: float
    width: float
    function: WindowFunction = "linear"

    def __post_init__(self) -> None:
        # PS3.3 C.11.2.1.2.1 / C.11.2.1.3: width >= 1 for LINEAR, > 0 else
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise ValueError("window center and width must be finite numbers")
        if self.function == "linear" and self.width < 1:
            raise ValueError("the window width must be at least 1 for the linear function")
        if self.width <= 0:
            raise ValueError("the window width must be greater than 0")


@dataclasses.dataclass(frozen=True)
class Viewport:
    """PS3.18 8.3.5.1.3: fit the source region (default: the whole frame)
    into *width* x *height*, keeping its aspect ratio.  A negative source
    width or height flips the region."""

    width: int
    height: int
    source: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """What the client asked of a rendered frame; None = the default."""

    window: Window | None = None
    viewport: Viewport | None = None


def render_frame(pixels: InstancePixels, index: int, options: RenderOptions) -> Image.Image:
    """The frame as an 8-bit grayscale (``L``) or ``RGB`` picture.

    Grayscale (PS3.4 N.2.1): the Modality LUT (Rescale Slope/Intercept or
    Modality LUT Sequence, per frame for enhanced objects), then the window
    asked for, else the data set's first Window Center/Width with its VOI LUT
    Function, else its VOI LUT Sequence, else the frame's minimum..maximum;
    MONOCHROME1 is inverted.  Palette colour goes through its lookup tables;
    RGB and YBR come out as RGB (a window is not applied to colour).

    Raises
    ------
    CannotDecode, PixelDataError
    """
    arr = pixels.decode_frame(index)
    header = pixels.header
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, header)
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise PixelDataError(f"the palette could not be applied: {exc}") from None
        scale = 255.0 / (np.iinfo(rgb.dtype).max if rgb.dtype.kind in "ui" else 1.0)
        image = Image.fromarray(_to_uint8(rgb.astype(np.float64) * scale), "RGB")
    elif arr.ndim == 3:
        stored = _int_value(header, "BitsStored") or 8
        top = float(2**stored - 1) if arr.dtype.kind in "ui" else float(arr.max() or 1)
        image = Image.fromarray(_to_uint8(arr.astype(np.float64) * (255.0 / top)), "RGB")
    else:
        values = _modality(arr, header, index)
        out = _voi(values, header, index, options.window)
        if photometric == "MONOCHROME1":
            out = 255.0 - out
        image = Image.fromarray(_to_uint8(out), "L")
    return _apply_viewport(image, options.viewport)


def _to_uint8(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _functional_group(header: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of *sequence* for frame *index* in the Per-Frame, else the
    Shared Functional Groups (PS3.3 C.7.6.16)."""
    for groups, position in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = header.get(groups)
        if items and position < len(items):
            inner = items[position].get(sequence)
            if inner:
                item = inner[0]
                assert isinstance(item, Dataset)
                return item
    return None


def _modality(arr: npt.NDArray[Any], header: Dataset, index: int) -> npt.NDArray[np.float64]:
    """PS3.4 N.2.1.1 Modality LUT: per-frame Pixel Value Transformation
    first (enhanced objects), else the top-level module via pydicom."""
    transform = _functional_group(header, index, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform:
        slope = float(transform.get("RescaleSlope", 1) or 1)
        intercept = float(transform.get("RescaleIntercept", 0) or 0)
        return arr.astype(np.float64) * slope + intercept
    try:
        result = apply_modality_lut(arr, header)
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):
        result = arr
    return np.asarray(result, dtype=np.float64)


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _default_window(header: Dataset, index: int) -> Window | None:
    """The data set's own window: Frame VOI LUT (enhanced), else the first
    Window Center / Window Width value pair."""
    source = _functional_group(header, index, "FrameVOILUTSequence") or header
    center = _first_number(source.get("WindowCenter"))
    width = _first_number(source.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = _VOI_FUNCTIONS.get(str(source.get("VOILUTFunction", "LINEAR")).upper(), "linear")
    try:
        return Window(center, width, function)
    except ValueError:
        return None


def _voi(
    values: npt.NDArray[np.float64],
    header: Dataset,
    index: int,
    window: Window | None,
) -> npt.NDArray[np.float64]:
    """PS3.4 N.2.1.2 VOI LUT to 0..255."""
    window = window or _default_window(header, index)
    if window is not None:
        return apply_window(values, window)
    if header.get("VOILUTSequence"):
        try:
            return _voi_lut(values, header)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError, struct.error):
            pass  # an unusable table: fall back to the frame's range
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _voi_lut(values: npt.NDArray[np.float64], header: Dataset) -> npt.NDArray[np.float64]:
    """The first VOI LUT of the VOI LUT Sequence (PS3.3 C.11.2.1.1), its
    output scaled from the table's bit depth to 0..255.  (Not pydicom's
    ``apply_voi``, which wraps inputs above an 8-bit table's range.)"""
    item = header.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, bytes):
        endian = "<" if header.original_encoding[1] is not False else ">"
        data = struct.unpack(f"{endian}{len(data) // 2}H", data)
    table = np.atleast_1d(np.asarray(data, dtype=np.float64))[:entries]
    index = np.clip(np.rint(values) - first, 0, len(table) - 1).astype(np.int64)
    scaled: npt.NDArray[np.float64] = np.clip(table[index] * (255.0 / (2**bits - 1)), 0, 255)
    return scaled


def apply_window(values: npt.NDArray[np.float64], window: Window) -> npt.NDArray[np.float64]:
    """Map *values* through *window* to 0..255 (PS3.3 C.11.2.1.2.1 linear,
    C.11.2.1.3.2 linear exact, C.11.2.1.3.1 sigmoid)."""
    c, w = window.center, window.width
    if window.function == "sigmoid":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function == "linear-exact":
        return np.clip(((values - c) / w + 0.5) * 255.0, 0, 255)
    low = c - 0.5 - (w - 1) / 2
    high = c - 0.5 + (w - 1) / 2
    if w == 1:
        return np.where(values <= low, 0.0, 255.0)
    ramp = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.where(values <= low, 0.0, np.where(values > high, 255.0, ramp))


def _apply_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    if viewport is None:
        return image
    if viewport.source is not None:
        sx, sy, sw, sh = viewport.source
        left, right = sorted((sx, sx + sw))
        top, bottom = sorted((sy, sy + sh))
        left, top = max(left, 0), max(top, 0)
        right, bottom = min(right, image.width), min(bottom, image.height)
        if right <= left or bottom <= top:
            raise InvalidRenderParameter("the viewport's source region lies outside the image")
        image = image.crop((left, top, right, bottom))
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return fit(image, viewport.width, viewport.height)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """*image* scaled to fit in *width* x *height*, aspect ratio kept (both
    up and down, as WADO's rows/columns), never below 1 x 1."""
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, media_type: str, quality: int) -> bytes:
    """*image* as ``image/jpeg`` (at *quality*, 1..100) or ``image/png``."""
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    elif media_type == "image/jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        raise ValueError(f"cannot encode {media_type}")
    return buffer.getvalue()
