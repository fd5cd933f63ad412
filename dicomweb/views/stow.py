"""STOW-RS: the Store Instances transaction (PS3.18 10.5).

``POST /v1/studies`` and ``POST /v1/studies/{study}`` take

- ``multipart/related; type="application/dicom"; boundary=...`` (PS3.18
  10.5.1.2; the ``type`` parameter may be absent, quoted or bare), one
  DICOM Part 10 instance per part, each part with ``Content-Type:
  application/dicom`` or none; or
- a single ``application/dicom`` instance as the whole body.

The body is read as a stream: each part is spooled (memory, then a
temporary file) and stored through the one ingest pipeline as soon as its
closing delimiter has arrived, so a request of any size holds one read chunk
and one part's spool in memory.  Each instance succeeds or fails on its own.

Metadata + bulk data bodies (``application/dicom+json``,
``application/dicom+xml``) are answered 415.

The answer is the Store Instances Response Module (PS3.18 Annex I, Table
I.1-1) as DICOM JSON, with the HTTP status of PS3.18 Table 10.5.3-1 (see
:func:`http_status`).  A request that cannot be read at all (no parts, bad
boundary, truncated) is a 400; a body over ``http.max_request_mb`` a 413.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Iterable
from typing import IO

from flask import Blueprint, Response, request
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from appliance.errors import ApplianceError
from appliance.ingest import IngestResult, IngestService
from appliance.ingest.pipeline import Prepared
from appliance.ingest.streams import PrefixedStream
from appliance.model import Origin
from appliance.status import Status, StatusCategory
from dicomweb import audit
from dicomweb.app import current_services, get_extension
from dicomweb.errors import (
    InvalidRequest,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
    check_uids,
)
from dicomweb.media import (
    APPLICATION_DICOM,
    APPLICATION_DICOM_JSON,
    APPLICATION_DICOM_XML,
    APPLICATION_JSON,
    MULTIPART_RELATED,
    MediaType,
    MediaTypeError,
    dicom_json_response,
    parse_media_type,
)
from dicomweb.multipart import LimitedReader, MultipartReader, Part, TooManyParts, spool_body
from dicomweb.urls import instance_url, service_root, study_url

bp = Blueprint("stow", __name__, url_prefix="/v1")
log = logging.getLogger(__name__)

#: Response media types we can produce, best first (PS3.18 8.7.3.5.3: a
#: user agent may ask for plain JSON).
RESPONSE_TYPES = (APPLICATION_DICOM_JSON, APPLICATION_JSON)

#: Failure reasons that say the appliance, not the instance, failed: when
#: every instance failed with one of these, the answer is 503 (try again).
TRANSIENT_FAILURES = frozenset({Status.PROCESSING_FAILURE, Status.OUT_OF_RESOURCES})

#: PS3.10 7.1: the File Preamble (here zeros) and the DICOM Prefix.
PART10_PREFIX = b"\x00" * 128 + b"DICM"

#: ErrorComment (0000,0902) is LO: at most 64 characters (PS3.5 6.2).
_ERROR_COMMENT_MAX = 64

_METADATA_TYPES = (APPLICATION_DICOM_JSON, APPLICATION_DICOM_XML)
_METADATA_REFUSAL = (
    "metadata and bulk data STOW-RS requests ({}) are not supported; "
    'send DICOM Part 10 instances as multipart/related; type="application/dicom"'
)


@dataclasses.dataclass(frozen=True)
class StoredPart:
    """The outcome of one part, with where a stored instance can be retrieved."""

    result: IngestResult
    #: the study and series the stored copy is in (for a duplicate kept,
    #: those of the copy that was already there)
    study_uid: str = ""
    series_uid: str = ""


@bp.post("/studies")
def store_instances() -> Response:
    """Store Instances in any study (PS3.18 10.5, target "All Studies")."""
    return _store(None)


@bp.post("/studies/<study>")
def store_study_instances(study: str) -> Response:
    """Store Instances of one study (PS3.18 10.5, target "Study"): an
    instance of another study is refused on its own (PS3.18 Table 10.5.3-1,
    "Study Instance UID mismatch"), with
    :attr:`~appliance.status.Status.STUDY_INSTANCE_UID_MISMATCH`."""
    check_uids(study)
    return _store(study)


def _store(study: str | None) -> Response:
    """Check the request's headers, store every part, answer the Store
    Instances Response Module."""
    started = time.monotonic()
    response_type = _negotiate_response_type()
    content_type = _content_type()
    limit = get_extension().config.http.max_request_mb * 1024 * 1024
    declared = request.content_length
    if declared is not None and declared > limit:
        # refused before reading anything (RFC 9110 15.5.14)
        raise PayloadTooLarge(_too_large(limit, 0))

    services = current_services()
    origin = Origin("dicomweb", calling_ae="", remote=request.remote_addr or "")
    source = LimitedReader(request.stream, limit)
    outcomes = _Outcomes(services.ingest, study, origin)
    try:
        try:
            if content_type.is_(APPLICATION_DICOM):
                part = spool_body(source)
                with part.body:
                    if part.size == 0:
                        raise InvalidRequest("the request has no body")
                    outcomes.add(part)
            else:
                with MultipartReader(
                    source,
                    content_type.param("boundary") or "",
                    max_parts=get_extension().config.http.max_parts,
                ) as reader:
                    for part in reader:
                        outcomes.add(part)
        finally:
            # what was prepared before a defect of the request is indexed
            # (and counted in the refusal's reason), as each part would be
            outcomes.commit()
    except TooManyParts as exc:
        stored = _stored_count(outcomes.done)
        if stored:
            exc.reason += f"; {stored} instance(s) of the parts before the limit were stored"
        raise
    except PayloadTooLarge as exc:
        raise PayloadTooLarge(_too_large(limit, _stored_count(outcomes.done))) from exc
    except InvalidRequest as exc:
        if outcomes.done:
            exc.reason += (
                f"; {_stored_count(outcomes.done)} instance(s) of the complete parts before "
                "the defect were stored"
            )
        raise

    stored_parts = outcomes.done
    _locate_duplicates(stored_parts)
    status = http_status(outcome.result for outcome in stored_parts)
    body = response_dataset(stored_parts, service_root(), study)
    log.info(
        "STOW-RS %s from %s: %d part(s), %d stored, %d warning(s), %d failed, "
        "%d bytes in %.2f s -> %d",
        f"study {study}" if study else "studies",
        origin.remote,
        len(stored_parts),
        _stored_count(stored_parts),
        sum(o.result.status.category is StatusCategory.WARNING for o in stored_parts),
        sum(not o.result.stored for o in stored_parts),
        source.bytes_read,
        time.monotonic() - started,
        status,
    )
    return dicom_json_response(body, status, media_type=response_type)


def _negotiate_response_type() -> str:
    """The media type of the response: DICOM JSON, or plain JSON for a client
    that accepts only that (PS3.18 8.7.3.5.3).

    Raises
    ------
    NotAcceptable
        if the client accepts neither (the XML response of PS3.18 10.5.3 is
        not offered).
    """
    if "Accept" not in request.headers:
        return APPLICATION_DICOM_JSON
    best = request.accept_mimetypes.best_match(RESPONSE_TYPES)
    if best is None:
        raise NotAcceptable(f"the response is only available as {APPLICATION_DICOM_JSON}")
    return best


def _content_type() -> MediaType:
    """The request's media type if STOW-RS of Part 10 instances accepts it.

    Raises
    ------
    UnsupportedMediaType
        for no Content-Type, a metadata + bulk data request, or any type
        but ``multipart/related`` of ``application/dicom`` and
        ``application/dicom`` (PS3.18 10.5.1.2).
    InvalidRequest
        for a Content-Type that cannot be parsed.
    """
    value = request.headers.get("Content-Type")
    if not value:
        raise UnsupportedMediaType(
            f'a Content-Type is required: {MULTIPART_RELATED}; type="{APPLICATION_DICOM}" '
            f"or {APPLICATION_DICOM}"
        )
    try:
        media = parse_media_type(value)
    except MediaTypeError as exc:
        raise InvalidRequest(f"the Content-Type cannot be parsed: {exc}") from None
    if media.is_(APPLICATION_DICOM):
        return media
    if media.essence in _METADATA_TYPES:
        raise UnsupportedMediaType(_METADATA_REFUSAL.format(media.essence))
    if media.is_(MULTIPART_RELATED):
        # RFC 2387 3.1: "type" names the type of the root (here: every) part
        part_type = (media.param("type") or APPLICATION_DICOM).strip().lower()
        if part_type == APPLICATION_DICOM:
            return media
        if part_type in _METADATA_TYPES:
            raise UnsupportedMediaType(_METADATA_REFUSAL.format(part_type))
        raise UnsupportedMediaType(
            f'multipart/related of "{part_type[:64]}" is not supported; '
            f'only type="{APPLICATION_DICOM}"'
        )
    raise UnsupportedMediaType(
        f"{media.essence[:64]} is not supported; send {MULTIPART_RELATED}; "
        f'type="{APPLICATION_DICOM}" or {APPLICATION_DICOM}'
    )


#: Instances of one request indexed in one transaction (group commit): one
#: commit and one WAL flush for up to this many; a part's blob is written
#: when it arrives (its spool is gone once the next part is read).
COMMIT_BATCH = 50


class _Outcomes:
    """The parts of one request: each prepared as it arrives (header read
    and checked, blob written durably: :meth:`IngestService.prepare_part10`),
    indexed :data:`COMMIT_BATCH` at a time (:meth:`IngestService.commit`).
    Nothing is answered before :meth:`commit` has indexed everything: the
    answer is sent at the end of the request."""

    def __init__(self, ingest: IngestService, study: str | None, origin: Origin) -> None:
        self.ingest = ingest
        self.study = study
        self.origin = origin
        self._results: list[IngestResult | None] = []
        self._waiting: list[tuple[int, Prepared]] = []
        self._studies: dict[str, None] = {}  # the studies stored in, in order
        self._counts = [0, 0]  # instances stored, failed

    def add(self, part: Part) -> None:
        """Prepare one part; a part that is not ``application/dicom``
        fails on its own with Cannot Understand."""
        declared = part.header("content-type")
        if declared:
            try:
                kind = parse_media_type(declared)
            except MediaTypeError:
                kind = None
            if kind is None or not kind.is_(APPLICATION_DICOM):
                reason = f"part {part.number} is not {APPLICATION_DICOM}"
                self._done(len(self._results), IngestResult(Status.CANNOT_UNDERSTAND, reason))
                return
        slot = len(self._results)
        self._results.append(None)
        prepared = self.ingest.prepare_part10(
            part10_stream(part.body), self.origin, expected_study_uid=self.study
        )
        if isinstance(prepared, IngestResult):
            self._done(slot, prepared)
            return
        self._waiting.append((slot, prepared))
        if len(self._waiting) >= COMMIT_BATCH:
            self.commit()

    def commit(self) -> None:
        """Index the prepared parts."""
        waiting, self._waiting = self._waiting, []
        results = self.ingest.commit([prepared for _, prepared in waiting])
        for (slot, _), result in zip(waiting, results, strict=True):
            self._done(slot, result)

    def _done(self, slot: int, result: IngestResult) -> None:
        if slot == len(self._results):
            self._results.append(result)
        else:
            self._results[slot] = result
        # the audit event lists what was stored, even if a later part fails
        # the whole request (dicomweb.audit)
        if result.stored:
            self._studies.setdefault(result.study_instance_uid, None)
            self._counts[0] += 1
        else:
            self._counts[1] += 1
        audit.note(studies=tuple(self._studies), instances=self._counts[0], failed=self._counts[1])

    @property
    def done(self) -> list[StoredPart]:
        """The outcome of each part indexed (or refused) so far, in order."""
        return [
            StoredPart(result, result.study_instance_uid, result.series_instance_uid)
            for result in self._results
            if result is not None
        ]


def part10_stream(body: IO[bytes]) -> IO[bytes]:
    """*body*, with a zero preamble and the DICM prefix put in front if it
    starts right at the File Meta Information.

    pydicom writes a data set that was not read from a file without the
    preamble (``dcmwrite`` without ``enforce_file_format``), and
    dicomweb-client sends what pydicom writes; such a part is a Part 10
    file minus its first 132 bytes (PS3.10 7.1).  The bytes sent are kept
    unchanged after the prefix.
    """
    head = body.read(len(PART10_PREFIX))
    body.seek(0)
    # the File Meta is explicit VR little endian and starts with group 0002
    if head[128:] == b"DICM" or not head.startswith(b"\x02\x00"):
        return body
    return io.BufferedReader(PrefixedStream(PART10_PREFIX, body))


def _locate_duplicates(outcomes: list[StoredPart]) -> None:
    """For a duplicate kept, point the RetrieveURL at the copy that was kept,
    which may sit in another study or series than the one just sent."""
    services = current_services()
    for i, outcome in enumerate(outcomes):
        if outcome.result.status is not Status.DUPLICATE_INSTANCE_KEPT:
            continue
        try:
            stored = services.index.find_instance(outcome.result.sop_instance_uid)
        except ApplianceError:
            continue  # the URL from the header is the best we can give
        if stored is not None:
            outcomes[i] = dataclasses.replace(
                outcome, study_uid=stored.study_instance_uid, series_uid=stored.series_instance_uid
            )


def http_status(results: Iterable[IngestResult]) -> int:
    """The HTTP status of a store (PS3.18 Table 10.5.3-1).

    - 200: every instance stored, without warnings;
    - 202: some stored, and some failed or had warnings;
    - 409: none stored (a conflict in the request: unsupported, mismatched
      or invalid instances);
    - 503: none stored and every failure was the appliance's own (processing
      failure, out of resources): the client should try again later.
    """
    statuses = [result.status for result in results]
    stored = [s for s in statuses if s.category is not StatusCategory.FAILURE]
    if not stored:
        return 503 if statuses and all(s in TRANSIENT_FAILURES for s in statuses) else 409
    if len(stored) == len(statuses) and all(s is Status.SUCCESS for s in stored):
        return 200
    return 202


def response_dataset(outcomes: list[StoredPart], root: str, study: str | None) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table I.1-1).

    Parameters
    ----------
    outcomes
        One per part, in the order received.
    root
        The service root, ``http://host:port/v1``.
    study
        The study of the URL, None for ``POST /studies``.
    """
    ds = Dataset()
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for outcome in outcomes:
        result = outcome.result
        item = Dataset()
        if result.sop_class_uid:
            item.ReferencedSOPClassUID = result.sop_class_uid
        if result.sop_instance_uid:
            item.ReferencedSOPInstanceUID = result.sop_instance_uid
        if result.stored:
            item.RetrieveURL = instance_url(
                root, outcome.study_uid, outcome.series_uid, result.sop_instance_uid
            )
            if result.status.category is StatusCategory.WARNING:
                item.WarningReason = int(result.status)
            referenced.append(item)
        else:
            item.FailureReason = int(result.status)
            if result.reason:
                # as Microsoft's DICOM server does: the reason in words
                comment = Dataset()
                comment.ErrorComment = result.reason[:_ERROR_COMMENT_MAX]
                item.FailedAttributesSequence = Sequence([comment])
            failed.append(item)
    # Type 2: the study's URL when the stored instances are of one study
    studies = {o.study_uid for o in outcomes if o.result.stored}
    if study is not None and studies:
        ds.RetrieveURL = study_url(root, study)
    elif len(studies) == 1:
        ds.RetrieveURL = study_url(root, studies.pop())
    else:
        ds.RetrieveURL = None
    if failed:
        ds.FailedSOPSequence = Sequence(failed)
    if referenced:
        ds.ReferencedSOPSequence = Sequence(referenced)
    return ds


def _stored_count(outcomes: list[StoredPart]) -> int:
    return sum(outcome.result.stored for outcome in outcomes)


def _too_large(limit: int, stored: int) -> str:
    text = f"the request body is larger than http.max_request_mb ({limit // (1024 * 1024)} MiB)"
    if stored:
        text += f"; {stored} instance(s) of the complete parts before the limit were stored"
    return text
