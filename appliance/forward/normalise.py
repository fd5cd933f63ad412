"""What a destination needs changed before an instance is sent.

Azure's DICOM service (and others) accept only explicit VR transfer
syntaxes: with ``explicit_vr_only`` an instance stored in Implicit VR Little
Endian is re-encoded in Explicit VR Little Endian.  Both are native (the
pixel data is not encapsulated), so only the element headers change: each
element gets the VR of the data dictionary (UN for an unknown private
element, PS3.5 6.2.2), every value and the pixel data stay byte for byte.
"""

from __future__ import annotations

import io
from typing import IO

from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.config import ForwardConfig
from appliance.dicomio import IMPLEMENTATION_VERSION_NAME
from appliance.errors import ApplianceError
from appliance.status import Status


class NormaliseError(ApplianceError):
    """An instance could not be re-encoded for its destination."""

    status = Status.PROCESSING_FAILURE


def needs_normalising(destination: ForwardConfig, transfer_syntax_uid: str) -> bool:
    """True if *destination* cannot take *transfer_syntax_uid* as stored."""
    return destination.explicit_vr_only and transfer_syntax_uid == ImplicitVRLittleEndian


def to_explicit_vr(source: IO[bytes]) -> bytes:
    """The Part 10 instance of *source* (Implicit VR Little Endian) as
    Explicit VR Little Endian, its File Meta naming this implementation.

    Raises
    ------
    NormaliseError
        if the instance cannot be read or written.
    """
    try:
        ds = dcmread(source)
        for _ in ds.iterall():  # typed elements: VRs from the dictionary
            pass
        meta = ds.file_meta
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:  # pydicom raises many kinds; the reason is kept
        raise NormaliseError(
            f"cannot re-encode as Explicit VR Little Endian: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    return buffer.getvalue()
