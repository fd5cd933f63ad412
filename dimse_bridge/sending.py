"""The C-STORE sub-operations of C-MOVE and C-GET (PS3.4 C.4.2.3, C.4.3.3).

Shared by both retrieve services: which presentation contexts to propose on
a C-MOVE sub-association, which transfer syntax each instance goes out in,
and the data set handed to pynetdicom for each C-STORE.

- **As stored when possible.**  The proposed contexts are the (SOP Class,
  stored transfer syntax) pairs of the matched instances, one context each,
  plus per SOP Class a fallback context offering Explicit and Implicit VR
  Little Endian.  Over pynetdicom's limit of 128 contexts (PS3.8 9.3.2.2: odd
  context IDs 1-255), one context per SOP Class carries all its syntaxes.
- **Fallback transcoding.**  An instance whose stored syntax the peer did not
  accept is decoded (encapsulated pixel data decompressed, Big Endian values
  swapped) and re-encoded in an accepted uncompressed syntax, Explicit VR
  Little Endian first.  The SOP Instance UID is kept.  If that is impossible
  (no accepted context, no decoder) the sub-operation fails.
- **Bytes kept.**  An instance sent as stored goes out as its stored bytes:
  the data set part of the blob, streamed from its file in PDU-sized chunks
  (pynetdicom's chunked sending), never decoded or held in memory, so the
  data set on the wire is the stored one byte for byte (Group Length
  elements, deflated data and any encoding detail included).  pynetdicom 3
  sends a C-MOVE/C-GET sub-operation only for a pydicom Dataset, so the
  handlers hand it a :class:`StoredDataset` stand-in, and the association's
  ``send_c_store`` is wrapped (:func:`send_stored_bytes`) to send the file
  behind it (behind a new File Meta if the stored one names another
  instance: pynetdicom names the instance in the request by it).  Before
  that, the blob's elements are walked by tag and length
  (:mod:`appliance.encoding`).
- **Damaged files.**  A data set whose walk fails is read whole with
  pydicom and written again: a deflated stream of odd length (unpadded) is
  deflated again; one not encoded as its File Meta says (e.g.
  Implicit VR elements under an explicit syntax) is re-encoded in the syntax
  named; one cut short inside a value goes out as pydicom reads it (the
  value as far as it goes).  One of odd length (cut short) is not sent:
  peers abort the association on it.

Nothing here raises: a sub-operation that cannot be prepared is returned as
a failure with its reason, and pynetdicom counts it as failed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

from appliance.dicomio import part10_prefix
from appliance.encoding import Layout, LayoutError, Soundness, check_structure, read_layout
from appliance.errors import ApplianceError
from appliance.index.sql import StoredInstance
from appliance.retrieve import RetrieveService
from appliance.storage.base import CHUNK_SIZE
from appliance.transcode import TranscodeError, transcode

#: The uncompressed syntaxes offered for every SOP Class, in this order of
#: preference, for instances the peer refuses in their stored syntax.
FALLBACK_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: The most presentation contexts one association can propose (PS3.8 9.3.2.2:
#: Presentation Context IDs are the odd numbers 1 to 255).
MAX_CONTEXTS = 128


#: Bytes per value word of the binary VRs whose values depend on byte order.
@dataclasses.dataclass(frozen=True)
class SubOperation:
    """What to hand pynetdicom for one C-STORE sub-operation.

    Attributes
    ----------
    stored
        The instance.
    dataset
        The data set pynetdicom encodes and sends.  For a failure it is a
        stand-in with only the SOP Class and Instance UIDs and no File Meta:
        pynetdicom refuses it before anything is sent and counts the
        sub-operation as failed, with its UID in the Failed SOP Instance UID
        List (0008,0058).
    transfer_syntax
        The syntax it is sent in; None for a failure.
    size
        Bytes of the data set as sent (0 for a failure).
    reason
        Why it failed, or "" (UIDs and syntax names only).
    repaired
        True if the stored data set was not encoded as its transfer syntax
        says and its elements were re-encoded in that syntax.
    """

    stored: StoredInstance
    dataset: Dataset
    transfer_syntax: str | None
    size: int = 0
    reason: str = ""
    repaired: bool = False

    @property
    def failed(self) -> bool:
        return self.transfer_syntax is None

    @property
    def transcoded(self) -> bool:
        """True if sent in another syntax than the stored one."""
        return not self.failed and self.transfer_syntax != self.stored.transfer_syntax_uid


def send_at_once(assoc: Any) -> None:
    """Turn off Nagle's algorithm (TCP_NODELAY) on *assoc*'s socket (a
    pynetdicom Association), so that each C-STORE request and each Pending
    response leaves at once: pynetdicom writes a message in several small
    pieces, and with the peer's delayed acknowledgement every sub-operation
    would otherwise wait about 40 ms."""
    with contextlib.suppress(AttributeError, OSError):
        sock = assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def propose_contexts(
    instances: Iterable[StoredInstance],
) -> tuple[list[PresentationContext], frozenset[str]]:
    """The presentation contexts to propose for sending *instances*.

    Returns
    -------
    tuple
        The contexts, and the SOP Classes left without one because more than
        :data:`MAX_CONTEXTS` classes are needed (the least frequent ones;
        their sub-operations fail).
    """
    syntaxes: dict[str, list[str]] = {}
    counts: collections.Counter[str] = collections.Counter()
    for stored in instances:
        found = syntaxes.setdefault(stored.sop_class_uid, [])
        if stored.transfer_syntax_uid not in found:
            found.append(stored.transfer_syntax_uid)
        counts[stored.sop_class_uid] += 1
    dedicated: list[PresentationContext] = []
    for sop_class, stored_syntaxes in syntaxes.items():
        dedicated.extend(build_context(sop_class, syntax) for syntax in stored_syntaxes)
        if not set(FALLBACK_SYNTAXES) <= set(stored_syntaxes):
            dedicated.append(build_context(sop_class, list(FALLBACK_SYNTAXES)))
    if len(dedicated) <= MAX_CONTEXTS:
        return dedicated, frozenset()
    # one context per SOP Class: the peer accepts one of its syntaxes, the
    # instances in the others are transcoded if that one is uncompressed
    ranked = sorted(syntaxes, key=lambda uid: -counts[uid])
    kept, left_out = ranked[:MAX_CONTEXTS], frozenset(ranked[MAX_CONTEXTS:])
    grouped = [
        build_context(
            sop_class,
            syntaxes[sop_class] + [s for s in FALLBACK_SYNTAXES if s not in syntaxes[sop_class]],
        )
        for sop_class in kept
    ]
    return grouped, left_out


def accepted_syntaxes(contexts: Iterable[PresentationContext], sop_class: str) -> list[str]:
    """The transfer syntaxes accepted for *sop_class* in which this side
    may send C-STORE requests (the SCU role), in context order."""
    found: list[str] = []
    for context in contexts:
        if context.abstract_syntax != sop_class or context.as_scu is not True:
            continue
        syntax = str(context.transfer_syntax[0])
        if syntax not in found:
            found.append(syntax)
    return found


def choose_syntax(stored_syntax: str, accepted: Sequence[str]) -> str | None:
    """The syntax to send an instance stored in *stored_syntax* in: the
    stored one if accepted, else the first accepted fallback, else None."""
    if stored_syntax in accepted:
        return stored_syntax
    return next((str(s) for s in FALLBACK_SYNTAXES if s in accepted), None)


def prepare(
    retrieve: RetrieveService, stored: StoredInstance, accepted: Sequence[str]
) -> SubOperation:
    """Make what to send for *stored*, given the transfer syntaxes the peer
    *accepted* for its SOP Class: the stored bytes when it accepted the
    stored syntax and they are sound, else a data set read with pydicom
    (transcoded into a fallback syntax, or re-encoded).  Never raises."""
    target = choose_syntax(stored.transfer_syntax_uid, accepted)
    if target is None:
        offered = ", ".join(UID(s).name for s in accepted) or "no transfer syntax"
        return failure(
            stored,
            f"the peer accepted {offered} for SOP Class {stored.sop_class_uid}, not "
            f"{UID(stored.transfer_syntax_uid).name} nor an uncompressed fallback",
        )
    if target == stored.transfer_syntax_uid:
        try:
            with retrieve.local_path(stored) as path, path.open("rb") as fp:
                layout = read_layout(fp)
                soundness = check_structure(fp, layout)
        except ApplianceError as exc:
            return failure(stored, exc.reason)
        except (LayoutError, OSError) as exc:
            return failure(stored, f"the stored instance cannot be read ({exc.__class__.__name__})")
        if soundness is Soundness.ODD_LENGTH:
            return _odd_length(stored)
        if soundness is Soundness.SOUND and layout.transfer_syntax == target:
            # pynetdicom names the instance in the C-STORE request by the
            # File Meta's UIDs: a File Meta naming another instance (copied
            # from another file) is replaced by one naming the data set's
            relabel = None if _labelled_as_indexed(layout, stored) else layout.offset
            return SubOperation(stored, StoredDataset(stored, relabel), target, layout.size)
    return _read_and_prepare(retrieve, stored, target)


def _labelled_as_indexed(layout: Layout, stored: StoredInstance) -> bool:
    """True if the File Meta names the instance as the index (its data set)
    does."""
    return (layout.sop_class_uid, layout.sop_instance_uid) == (
        stored.sop_class_uid,
        stored.sop_instance_uid,
    )


def _odd_length(stored: StoredInstance) -> SubOperation:
    # PS3.5 7.1.1: every value has an even length, so a data set has one;
    # peers abort the association on an odd one (dcmtk: "Odd Fragment
    # Length"), which would fail every later sub-operation too
    return failure(stored, "the stored data set has an odd length (a damaged file); not sent")


def _read_and_prepare(
    retrieve: RetrieveService, stored: StoredInstance, target: str
) -> SubOperation:
    """The data set of *stored* read whole with pydicom, in *target*."""
    repaired = False
    try:
        with retrieve.open(stored) as stream:
            data = stream.read()
        if target != stored.transfer_syntax_uid:
            data = transcode(data, target)
        dataset = dcmread(io.BytesIO(data))
        if not _encoded_as_labelled(dataset):
            # e.g. Implicit VR elements under an explicit syntax: pydicom reads
            # them, nobody can send them as they are; re-encode the elements
            # (pixel data kept) in the syntax the File Meta names
            data = transcode(data, target)
            dataset = dcmread(io.BytesIO(data))
            repaired = True
        size = len(data) - dataset_offset(data)
    except ApplianceError as exc:
        return failure(stored, exc.reason)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        return failure(stored, f"the stored instance cannot be read ({exc.__class__.__name__})")
    if size % 2 and not UID(target).is_deflated:
        return _odd_length(stored)
    return SubOperation(stored, dataset, target, size, repaired=repaired)


class StoredDataset(Dataset):
    """The stand-in handed to pynetdicom for an instance sent as stored: a
    data set of only its SOP Class and Instance UIDs (what pynetdicom reads
    of it), which :func:`send_stored_bytes` replaces with the blob's file.

    Parameters
    ----------
    stored
        The instance.
    relabel
        None to send the blob as it is; else where its data set starts, to
        send it behind a new File Meta naming the instance (the blob's names
        another one).
    """

    def __init__(self, stored: StoredInstance, relabel: int | None = None) -> None:
        super().__init__()
        self.SOPClassUID = UID(stored.sop_class_uid)
        self.SOPInstanceUID = UID(stored.sop_instance_uid)
        self.stored_instance = stored
        self.relabel = relabel


def send_stored_bytes(assoc: Any, retrieve: RetrieveService) -> None:
    """Make the pynetdicom Association *assoc* send a :class:`StoredDataset`
    as the stored bytes of its instance.

    pynetdicom's C-MOVE and C-GET loops call ``assoc.send_c_store(dataset,
    ...)`` for every data set a handler yields.  This wraps that method on
    this one association: a StoredDataset is sent from the blob's local file
    (with ``STORE_SEND_CHUNKED_DATASET``, set by the retrieve service, the
    data set after the File Meta is sent unchanged in PDU-sized chunks, in
    the accepted context of exactly its stored syntax); anything else is
    passed on unchanged.  A blob that cannot be read raises, and pynetdicom
    counts the sub-operation as failed.
    """
    send = assoc.send_c_store

    def send_c_store(
        dataset: Dataset,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if not isinstance(dataset, StoredDataset):
            return cast(Dataset, send(dataset, msg_id, priority, originator_aet, originator_id))
        stored = dataset.stored_instance
        with contextlib.ExitStack() as stack:
            path = stack.enter_context(retrieve.local_path(stored))
            if dataset.relabel is not None:
                path = stack.enter_context(_relabelled(path, dataset.relabel, stored))
            return cast(Dataset, send(path, msg_id, priority, originator_aet, originator_id))

    assoc.send_c_store = send_c_store


@contextlib.contextmanager
def _relabelled(path: Path, offset: int, stored: StoredInstance) -> Iterator[Path]:
    """A temporary copy of the Part 10 file *path* whose File Meta names
    *stored*; the data set (from *offset*) is copied unchanged."""
    with tempfile.TemporaryDirectory(prefix="dicom-appliance-send-") as folder:
        copy = Path(folder) / "instance.dcm"
        with path.open("rb") as source, copy.open("wb") as target:
            target.write(
                part10_prefix(
                    stored.sop_class_uid, stored.sop_instance_uid, stored.transfer_syntax_uid
                )
            )
            source.seek(offset)
            shutil.copyfileobj(source, target, CHUNK_SIZE)
        yield copy


def failure(stored: StoredInstance, reason: str) -> SubOperation:
    """A failed sub-operation: a stand-in data set pynetdicom will not send."""
    stand_in = Dataset()
    stand_in.SOPClassUID = stored.sop_class_uid
    stand_in.SOPInstanceUID = stored.sop_instance_uid
    return SubOperation(stored, stand_in, None, 0, reason)


def _encoded_as_labelled(ds: Dataset) -> bool:
    """False if pydicom found the data set encoded otherwise than its File
    Meta's transfer syntax says (it then reads the elements as found)."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    first = next(iter(ds.keys()), None)
    if first is None:
        return True
    elem = ds.get_item(first)
    if not isinstance(elem, RawDataElement):
        return True
    return (elem.is_implicit_VR, elem.is_little_endian) == (
        syntax.is_implicit_VR,
        syntax.is_little_endian,
    )


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in the Part 10 bytes *data*: after the
    preamble, ``DICM`` and the File Meta elements (PS3.10 7.1).

    Raises
    ------
    TranscodeError
        if *data* has no ``DICM`` prefix or a truncated File Meta.
    """
    try:
        return read_layout(io.BytesIO(data)).offset
    except LayoutError as exc:
        raise TranscodeError(f"the stored instance is not a Part 10 file: {exc}") from None
