"""Storage Service Class (PS3.4 Annex B), SCP role: C-STORE.

Every storage SOP class pynetdicom knows is accepted with the transfer
syntaxes of :data:`DEFAULT_TRANSFER_SYNTAXES` (or ``dimse.storage_transfer_syntaxes``
when that is set).  A received data set is never decoded here: its bytes go
to the one ingest pipeline (:meth:`appliance.ingest.IngestService.store_dataset`),
which puts File Meta Information in front of them and stores them as
received.

Large data sets are not held in memory: pynetdicom writes each received data
set to a temporary file as its P-DATA arrive (``STORE_RECV_CHUNKED_DATASET``)
and the handler streams that file into the pipeline.  pynetdicom deletes the
file after the handler returns; a data set cut short by an aborted
association never reaches the handler, and its file is deleted here when the
connection closes (:func:`discard_unfinished`).

Log lines name UIDs, AE titles and addresses only, never data set contents.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    HEVCM10P51,
    HEVCMP51,
    HTJ2K,
    JPEG2000,
    MPEG2MPHL,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    MPEG4HP42STEREO,
    MPEG4HP422D,
    MPEG4HP423D,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.model import Origin
from appliance.services import Services
from appliance.status import Status, StatusCategory
from dimse_bridge import audit
from dimse_bridge.services import ServiceSetup
from dimse_bridge.stats import stats_of

LOGGER = logging.getLogger(__name__)

#: The transfer syntaxes accepted for storage when
#: ``dimse.storage_transfer_syntaxes`` is empty, in this order of preference:
#: pynetdicom, as acceptor, takes the first of *this* list that the requestor
#: proposed in a context.  Uncompressed first, so that a modality offering a
#: lossy syntax beside an uncompressed one in one context is never taken at
#: its lossy word; a C-GET requester proposing both therefore receives
#: compressed instances decompressed (docs/conformance.md, C-GET).
DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1
    ImplicitVRLittleEndian,  # 1.2.840.10008.1.2
    DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
    ExplicitVRBigEndian,  # 1.2.840.10008.1.2.2 (retired)
    JPEGBaseline8Bit,  # .4.50
    JPEGExtended12Bit,  # .4.51
    JPEGLossless,  # .4.57
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEGLSNearLossless,  # .4.81
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
    RLELossless,  # 1.2.840.10008.1.2.5
    HTJ2KLossless,  # .4.201
    HTJ2KLosslessRPCL,  # .4.202
    HTJ2K,  # .4.203
    MPEG2MPML,  # .4.100
    MPEG2MPHL,  # .4.101
    MPEG4HP41,  # .4.102
    MPEG4HP41BD,  # .4.103
    MPEG4HP422D,  # .4.104
    MPEG4HP423D,  # .4.105
    MPEG4HP42STEREO,  # .4.106
    HEVCMP51,  # .4.107
    HEVCM10P51,  # .4.108
)

#: The statuses a C-STORE response may carry (PS3.4 B.2.3, PS3.7 C.5, and the
#: duplicate-kept warning of docs/conformance.md); any other status from the
#: pipeline is answered as a processing failure.
STORE_STATUSES = frozenset(
    {
        Status.SUCCESS,
        Status.COERCION_OF_DATA_ELEMENTS,
        Status.ELEMENTS_DISCARDED,
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
        Status.DUPLICATE_INSTANCE_KEPT,
        Status.PROCESSING_FAILURE,
        Status.DUPLICATE_SOP_INSTANCE,
        Status.OUT_OF_RESOURCES,
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        Status.CANNOT_UNDERSTAND,
    }
)

#: Error Comment (0000,0902) is an LO: at most 64 characters (PS3.7 C.4).
ERROR_COMMENT_MAX = 64

_SERVICE = "C-STORE"
#: The File Meta pynetdicom writes in front of a received data set starts
#: with its group length: (0002,0000) UL, length 4 (PS3.10 7.1).
_META_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
_META_START = 128 + 4


def transfer_syntaxes(config: Config) -> tuple[str, ...]:
    """The transfer syntaxes accepted for storage under *config*."""
    return config.dimse.storage_transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES


def register(setup: ServiceSetup) -> None:
    """Support every storage SOP class known to pynetdicom as SCP.

    Contexts another service module already added (e.g. for C-GET) keep
    their SCP/SCU role selection; only the transfer syntaxes are added.
    Handlers: ``EVT_C_STORE`` bound to :func:`handle_store`, and the clean-up
    of unfinished data sets on ``EVT_CONN_CLOSE`` and ``EVT_ABORTED``.
    """
    ae, config, services = setup.ae, setup.config, setup.services
    # Receive each C-STORE data set into a temporary file instead of memory,
    # so that a 500 MB+ instance (or 16 associations of big ones) never sits
    # in RAM: the handler streams the file into the ingest pipeline.  It is a
    # process-wide pynetdicom setting; register() runs once per DIMSE process
    # (the listener child of `serve`), and only that process receives C-STORE.
    _config.STORE_RECV_CHUNKED_DATASET = True
    syntaxes = list(transfer_syntaxes(config))
    supported = {cx.abstract_syntax: cx for cx in ae.supported_contexts}
    for context in AllStoragePresentationContexts:
        uid = context.abstract_syntax
        assert uid is not None  # every context of pynetdicom's list has one
        known = supported.get(uid)
        ae.add_supported_context(
            uid,
            syntaxes,
            scu_role=known.scu_role if known is not None else None,
            scp_role=known.scp_role if known is not None else None,
        )
    setup.handlers += [
        (evt.EVT_C_STORE, handle_store, [services, config]),
        (evt.EVT_CONN_CLOSE, discard_unfinished),
        (evt.EVT_ABORTED, discard_unfinished),
    ]


def handle_store(event: Event, services: Services, config: Config) -> Dataset:
    """Store the data set of a C-STORE request (PS3.4 B.2.2) as received.

    The data set's bytes (never decoded) go to the ingest pipeline with the
    request's Affected SOP Class and Instance UIDs and the presentation
    context's transfer syntax.  A data set whose own SOP Class UID or SOP
    Instance UID differs from the request's is refused before anything is
    written.  No exception leaves this handler.

    Parameters
    ----------
    event
        pynetdicom's ``EVT_C_STORE`` event.
    services
        The core's services (the ingest pipeline).
    config
        The appliance configuration.

    Returns
    -------
    pydicom.dataset.Dataset
        Status (0000,0900), and for a warning or failure Error Comment
        (0000,0902): at most 64 characters, UIDs and attribute names only.
        This handler sends:

        Success
          | ``0x0000`` - stored (durably written and indexed)

        Warning
          | ``0xB000`` - coercion of data elements
          | ``0xB006`` - elements discarded
          | ``0xB007`` - data set does not match SOP class
          | ``0xB00E`` - duplicate SOP Instance UID, the stored copy kept
            (duplicate policy ``keep``; see docs/conformance.md)

        Failure
          | ``0x0110`` - processing failure (index or storage failed, or an
            unexpected error)
          | ``0x0111`` - duplicate SOP Instance (duplicate policy ``reject``)
          | ``0xA700`` - out of resources (the storage is full)
          | ``0xA900`` - data set does not match SOP class: a required
            attribute is missing or malformed, or the data set's SOP Class
            or SOP Instance UID differs from the request's
          | ``0xC000`` - cannot understand (the bytes are not a data set)

        The ``0xB0xx`` warnings other than ``0xB00E`` are sent only if the
        pipeline reports them; it does not coerce or discard today.
    """
    request: Any = event.request
    sop_class = str(request.AffectedSOPClassUID or "")
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    size = 0
    study, stored = "", False
    try:
        assoc = event.assoc
        origin = Origin(
            "dimse",
            calling_ae=assoc.requestor.ae_title.strip(),
            remote=f"{assoc.requestor.address}:{assoc.requestor.port}",
        )
        transfer_syntax = str(event.context.transfer_syntax)
        with _received_dataset(event) as (dataset, size):
            # the pipeline also refuses a data set whose own SOP Class or
            # Instance UID differs from the request's (0xA900)
            result = services.ingest.store_dataset(
                dataset,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                transfer_syntax_uid=transfer_syntax,
                origin=origin,
            )
        status, reason = result.status, result.reason
        study, stored = result.study_instance_uid, result.stored
    except ApplianceError as exc:
        status, reason = exc.status, exc.reason
    except Exception as exc:  # never leak into pynetdicom (it would answer 0xC211)
        status = Status.PROCESSING_FAILURE
        reason = f"internal error ({exc.__class__.__name__})"
        # the traceback's last line may quote the exception's text: debug only
        LOGGER.debug("C-STORE of %s failed", sop_instance, exc_info=True)
    response = _response(event, status, reason, sop_instance, size)
    audit.record_store(event.assoc, services.audit, study, stored, int(response.Status))
    return response


def _response(event: Event, status: Status, reason: str, sop_instance: str, size: int) -> Dataset:
    """The response Dataset for *status*, counted in the association's
    statistics and logged."""
    if status not in STORE_STATUSES:
        LOGGER.error(
            "C-STORE of %s: the pipeline answered 0x%04X, sent as a processing failure",
            sop_instance,
            int(status),
        )
        status = Status.PROCESSING_FAILURE
    category = status.category
    outcome = "success" if category is StatusCategory.SUCCESS else category.value
    with contextlib.suppress(Exception):  # statistics never fail a store
        stats_of(event.assoc).record(_SERVICE, outcome, bytes_in=size)
    response = Dataset()
    response.Status = int(status)
    if category is not StatusCategory.SUCCESS:
        comment = error_comment(reason or status.name.replace("_", " ").lower())
        if comment:
            response.ErrorComment = comment
        LOGGER.log(
            _log_level(status),
            "C-STORE of %s: 0x%04X %s",
            sop_instance,
            int(status),
            reason,
        )
    else:
        LOGGER.debug("C-STORE of %s: stored", sop_instance)
    return response


def _log_level(status: Status) -> int:
    """INFO for a warning (a duplicate re-sent is routine), WARNING for a
    data set refused (the sender's problem), ERROR for our own failures."""
    if status.category is StatusCategory.WARNING:
        return logging.INFO
    if status in (Status.PROCESSING_FAILURE, Status.OUT_OF_RESOURCES):
        return logging.ERROR
    return logging.WARNING


def error_comment(reason: str) -> str:
    """*reason* as an Error Comment (0000,0902): an LO of the default
    character repertoire, at most 64 characters (PS3.5 6.2, PS3.7 C.4)."""
    text = unicodedata.normalize("NFKD", reason).encode("ascii", "ignore").decode("ascii")
    text = "".join(" " if ch == "\\" or not ch.isprintable() else ch for ch in text)
    text = " ".join(text.split())
    if len(text) > ERROR_COMMENT_MAX:
        text = text[: ERROR_COMMENT_MAX - 3].rstrip() + "..."
    return text


@contextlib.contextmanager
def _received_dataset(event: Event) -> Iterator[tuple[IO[bytes], int]]:
    """The received data set's bytes as a seekable stream positioned at its
    first byte, and their count.

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom has written them to a
    temporary Part 10 file (its own File Meta first, which is skipped here);
    it deletes the file after the handler returns.  Otherwise they are in
    memory.
    """
    # None when pynetdicom kept the data set in memory (chunked receive off)
    path: Path | None = event.dataset_path
    if path is None:
        data = event.encoded_dataset(include_meta=False)
        yield io.BytesIO(data), len(data)
        return
    with open(path, "rb") as fh:
        offset = _dataset_offset(fh)
        size = os.fstat(fh.fileno()).st_size - offset
        fh.seek(offset)
        yield fh, size


def _dataset_offset(fh: IO[bytes]) -> int:
    """Where the data set starts in a file pynetdicom received: after the
    preamble, ``DICM`` and the File Meta group whose length its first
    element gives (PS3.10 7.1)."""
    head = fh.read(_META_START + 12)
    if len(head) < _META_START + 12 or head[128:132] != b"DICM":
        raise ApplianceError("the received data set's temporary file has no File Meta")
    if head[_META_START : _META_START + 8] != _META_GROUP_LENGTH:
        raise ApplianceError("the received data set's temporary file lacks the meta group length")
    (length,) = struct.unpack("<I", head[_META_START + 8 :])
    return _META_START + 12 + int(length)


def discard_unfinished(event: Event) -> None:
    """``EVT_CONN_CLOSE`` / ``EVT_ABORTED``: delete the temporary files of
    data sets that will never reach :func:`handle_store`.

    pynetdicom creates the file when a C-STORE request's command arrives and
    deletes it only after the handler ran; a data set cut short by an abort
    or a dropped connection (the message still being received), or received
    but left in the queue when the association ended, would leave its file
    behind.  The message being received is read when the connection has
    closed, in the thread that was writing it (``EVT_CONN_CLOSE`` runs in
    pynetdicom's DUL thread); queued ones when the association ends.
    Nothing partial ever reaches the ingest pipeline: pynetdicom queues a
    message only once its last fragment has arrived.
    """
    try:
        dimse = event.assoc.dimse
        files: list[Any] = []
        if event.event == evt.EVT_CONN_CLOSE:
            message = dimse.message
            files.append(getattr(message, "_data_set_file", None))
        else:
            with dimse.msg_queue.mutex:
                queued = list(dimse.msg_queue.queue)
            files.extend(getattr(item[1], "_dataset_file", None) for item in queued)
        for file in files:
            if file is None:
                continue
            with contextlib.suppress(OSError):
                file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(file.name)
                LOGGER.info("discarded a data set left unstored by the end of its association")
    except Exception as exc:  # noqa: BLE001 - a clean-up never fails the association
        LOGGER.warning("could not discard an unfinished data set: %s", exc.__class__.__name__)
