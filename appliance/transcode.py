"""Re-encoding a stored instance in another transfer syntax, for the
senders that need one: C-MOVE and C-GET sub-operations whose peer did not
accept the stored syntax (``dimse_bridge.sending``), and forwarding to a
destination that takes explicit VR only (``appliance.forward``)."""

from __future__ import annotations

import io

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr, dcmwrite
from pydicom.pixels.utils import pack_bits
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from appliance.dicomio import IMPLEMENTATION_VERSION_NAME
from appliance.errors import ApplianceError

_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010


class TranscodeError(ApplianceError):
    """An instance could not be decoded or re-encoded in another syntax."""


def transcode(data: bytes, target: str) -> bytes:
    """Re-encode the Part 10 instance *data* in *target*.

    *target* is an uncompressed syntax: encapsulated pixel data is
    decompressed (pydicom and its pylibjpeg plugins; YCbCr JPEG becomes RGB
    and Photometric Interpretation says so), Big Endian binary values are
    swapped, and everything is written in *target*.  Or *target* is the
    stored syntax itself: only the elements are re-encoded, for a data set
    not encoded as its File Meta says.  The SOP Instance UID is kept; the
    File Meta names this implementation.

    Raises
    ------
    TranscodeError
        if the instance cannot be decoded or written.
    """
    stored = "?"
    try:
        ds = dcmread(io.BytesIO(data))
        stored = UID(ds.file_meta.TransferSyntaxUID).name
        for _ in ds.iterall():  # raw elements -> typed ones (VRs of implicit data sets)
            pass
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        if target == syntax:
            pass  # the elements only are re-encoded (see prepare)
        elif "PixelData" in ds and syntax.is_encapsulated:
            ds.decompress(generate_instance_uid=False)
        elif not syntax.is_little_endian:
            _to_little_endian(ds)
        correct_ambiguous_vr(ds, is_little_endian=True)
        meta = ds.file_meta
        meta.TransferSyntaxUID = UID(target)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        buffer = io.BytesIO()
        # dcmwrite, not save_as: save_as refuses Big -> Little Endian, whose
        # binary values _to_little_endian has swapped
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:  # codecs raise anything; the reason names no value
        raise TranscodeError(
            f"cannot convert {stored} to {UID(target).name}: {exc.__class__.__name__}: "
            f"{str(exc)[:160]}"
        ) from exc
    return buffer.getvalue()


def _to_little_endian(ds: Dataset) -> None:
    """Make the binary values of a data set read from Big Endian read Little
    Endian (numbers and text are already decoded; pydicom does not swap
    byte-valued elements when writing)."""
    for elem in ds.iterall():
        size = _WORD_SIZE.get(str(elem.VR), 0)
        if elem.tag == _PIXEL_DATA or not size or not isinstance(elem.value, bytes):
            continue
        if len(elem.value) % size == 0:
            words = np.frombuffer(elem.value, dtype=f">u{size}")
            elem.value = words.astype(f"<u{size}").tobytes()
    if "PixelData" not in ds:
        return
    pixels = ds.pixel_array
    if int(ds.BitsAllocated) == 1:
        value = pack_bits(pixels)
    else:
        value = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = value + b"\0" * (len(value) % 2)
    ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        ds.PlanarConfiguration = 0  # pixel_array is colour-by-pixel
