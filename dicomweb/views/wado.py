"""WADO-RS: Retrieve Instances, Retrieve Metadata and Retrieve Bulkdata
(PS3.18 10.4).

Routes (service root ``/v1``):

- ``GET /studies/{study}[/series/{series}[/instances/{instance}]]``: the
  instances as ``multipart/related; type="application/dicom"``, one part per
  instance in retrieve order (PS3.18 10.4.1.1.1), streamed from the storage
  in chunks.  For one instance ``Accept: application/dicom`` gets the Part 10
  file as a single-part body.
- ``GET .../metadata`` at the same three levels: an ``application/dicom+json``
  array, one object per instance (PS3.18 10.4.1.1.2, Annex F; see
  :mod:`dicomweb.metadata`), each from the index's metadata cache once a
  request has built it (:mod:`appliance.index.metadata_cache`).
- ``GET /studies/{study}/series/{series}/instances/{instance}/bulk/{tag path}``:
  the bulk data values the metadata's BulkDataURIs name (PS3.18 10.4.1.1.3).

Transfer syntax negotiation (PS3.18 8.7.3, 8.7.8): the Accept header's media
ranges are taken in order of their q-values (ties in the order written);
each names a transfer syntax with its ``transfer-syntax`` parameter, ``*``
for "as stored", or none for the default, Explicit VR Little Endian
(PS3.18 8.7.3.4: "The Default Transfer Syntax for DICOM objects contained in
a payload shall be Explicit VR Little Endian Uncompressed"), which is also
the answer to a missing Accept header or ``*/*``.  Each instance gets the
first syntax of that list that can be made from its stored syntax (PS3.18
8.7.8.2 note 1: the selected syntax may differ per part).  Stored bytes are
sent unchanged whenever the stored syntax is the one selected; otherwise the
instance is decoded and re-encoded (:func:`transcode`).  Implicit VR Little
Endian and Explicit VR Big Endian "shall not be used with Web Services"
(PS3.18 8.7.3): they are never sent, so ``*`` turns them into Explicit VR
Little Endian.  If some instance can be given in none of the acceptable
syntaxes the answer is 406 before anything is sent, decided from the stored
Transfer Syntax UIDs alone.

Caching: every response carries a strong ``ETag`` (a hash of the instances'
blob keys and times of last write and of the negotiated representation) and
``Last-Modified`` (the latest write); ``If-None-Match`` (or, without it,
``If-Modified-Since``) that matches gets 304 Not Modified (RFC 9110 13.1).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from flask import Blueprint, Response, request
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID
from werkzeug.wsgi import ClosingIterator

from appliance.dicomio import IMPLEMENTATION_VERSION_NAME
from appliance.errors import ApplianceError
from appliance.index.metadata_cache import WRITE_BATCH, MetadataCache
from appliance.index.sql import StoredInstance
from appliance.retrieve import RetrieveService
from appliance.storage.base import CHUNK_SIZE
from dicomweb import audit
from dicomweb.app import current_services
from dicomweb.errors import InvalidRequest, NotAcceptable, check_uids
from dicomweb.media import (
    APPLICATION_DICOM,
    APPLICATION_DICOM_JSON,
    APPLICATION_JSON,
    MULTIPART_RELATED,
    MediaType,
    MediaTypeError,
    parse_media_type,
)
from dicomweb.metadata import (
    CACHE_VERSION,
    BulkValue,
    InstanceHeader,
    fill_template,
    is_tag_path,
    json_base,
    locate_bulk,
    metadata_template,
    read_header,
    to_little_endian,
)
from dicomweb.multipart_writer import close_delimiter, content_type, new_boundary, part_head
from dicomweb.urls import instance_url, service_root

bp = Blueprint("wado", __name__, url_prefix="/v1")
log = logging.getLogger(__name__)

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

#: PS3.18 8.7.3.4: the default for a payload of DICOM objects.
DEFAULT_TRANSFER_SYNTAX = EXPLICIT_VR_LITTLE_ENDIAN
#: PS3.18 8.7.3: "shall not be used with Web Services".
NOT_FOR_WEB = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN})
#: Syntaxes whose pixel data is native (not encapsulated): decoding is a
#: change of byte order at most.
NATIVE = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)
#: Encapsulated syntaxes an instance may be re-encoded into, if pydicom has
#: an encoder for them here; both lossless, so nothing is lost on the way.
COMPRESSED_TARGETS = (RLE_LOSSLESS, JPEG_2000_LOSSLESS)
#: Encapsulated syntaxes that are lossless by definition (PS3.5 A.4, PS3.6
#: Table A-1): JPEG Lossless, JPEG-LS Lossless, JPEG 2000 (Part 1 and 2) and
#: HTJ2K Lossless Only, RLE Lossless.
LOSSLESS_ENCAPSULATED = frozenset(
    {
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        JPEG_2000_LOSSLESS,
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        RLE_LOSSLESS,
    }
)
#: The wildcard value of the transfer-syntax parameter (PS3.18 8.7.3.5.2).
AS_STORED = "*"

APPLICATION_OCTET_STREAM = "application/octet-stream"
#: PS3.18 Table 8.7.3-4: the media type of compressed pixel data bulk data.
_PIXEL_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    RLE_LOSSLESS: "image/dicom-rle",
}


# --------------------------------------------------------------- negotiation


@dataclasses.dataclass(frozen=True)
class Acceptable:
    """One acceptable representation taken from the Accept header.

    Attributes
    ----------
    syntax
        A Transfer Syntax UID, :data:`AS_STORED`, or None for the default.
    single_part
        True for a bare ``application/dicom`` (or ``application/octet-stream``)
        body instead of a multipart one.
    media_type
        For bulk data: the media type of the parts asked for (``type``).
    """

    syntax: str | None
    single_part: bool = False
    media_type: str = ""


def parse_accept(value: str | None) -> list[MediaType]:
    """The media ranges of an Accept header, most preferred first.

    RFC 9110 12.5.1: ranges are ordered by their q-value, ties kept in the
    order written; ``q=0`` means "not acceptable" and is dropped, and so is
    a range that cannot be parsed.
    """
    ranges: list[tuple[float, int, MediaType]] = []
    for position, text in enumerate(_split_list(value or "")):
        try:
            media = parse_media_type(text)
        except MediaTypeError:
            continue
        try:
            quality = float(media.param("q") or "1")
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((-quality, position, media))
    return [media for _, _, media in sorted(ranges, key=lambda r: (r[0], r[1]))]


def _split_list(value: str) -> list[str]:
    """Split a header list at commas outside quoted strings."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def acceptable_instances(accept: str | None, *, single_part_allowed: bool) -> list[Acceptable]:
    """What the Accept header allows for DICOM instances (PS3.18 10.4.1.2).

    ``multipart/related; type="application/dicom"`` (``type`` quoted or not)
    with an optional ``transfer-syntax``; ``multipart/related`` without
    ``type``, ``multipart/*`` and ``*/*`` mean the same with the default
    syntax; a bare ``application/dicom`` is taken for a single instance
    only.  No Accept header at all is the default.
    """
    if not (accept or "").strip():
        return [Acceptable(None)]
    found: list[Acceptable] = []
    for media in parse_accept(accept):
        syntax = media.param("transfer-syntax")
        part_type = (media.param("type") or APPLICATION_DICOM).lower()
        if media.essence in ("*/*", "multipart/*"):
            found.append(Acceptable(None))
        elif media.is_(MULTIPART_RELATED) and part_type in (
            APPLICATION_DICOM,
            "application/*",
            "*/*",
        ):
            found.append(Acceptable(syntax))
        elif media.is_(APPLICATION_DICOM) and single_part_allowed:
            found.append(Acceptable(syntax, single_part=True))
    return found


@functools.cache
def encodable_syntaxes() -> frozenset[str]:
    """The syntaxes an instance can be re-encoded into here: Explicit VR
    Little Endian and its deflated form always, RLE Lossless and JPEG 2000
    Lossless when pydicom has an encoder for them."""
    found = {EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}
    for uid in COMPRESSED_TARGETS:
        try:
            if get_encoder(uid).is_available:
                found.add(uid)
        except (NotImplementedError, ValueError):
            continue
    return frozenset(found)


@functools.cache
def can_decode(stored: str) -> bool:
    """True if pixel data stored in *stored* can be decoded here."""
    if stored in NATIVE:
        return True
    try:
        return bool(get_decoder(stored).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_transcode(stored: str, target: str) -> bool:
    """True if an instance stored in *stored* can be sent in *target*.

    Decided from the syntaxes alone: *target* must be one we encode and not
    one of :data:`NOT_FOR_WEB`; the stored pixel data must be decodable;
    and lossy stored pixel data is only ever decoded to a native syntax
    (never re-compressed, which would hide the earlier loss).
    """
    if target not in encodable_syntaxes() or not can_decode(stored):
        return False
    if target in NATIVE or stored in NATIVE:
        return True
    return stored in LOSSLESS_ENCAPSULATED


def candidates(stored: str, acceptable: Sequence[Acceptable]) -> list[Acceptable]:
    """The representations of one instance, best first, each with a
    concrete syntax: what can be made of *stored* from *acceptable*.

    The default (no transfer-syntax) is Explicit VR Little Endian; where
    that cannot be made of encapsulated pixel data, the stored syntax
    (PS3.18 8.7.3.4: a server that has "only access to the pixel data in
    lossy compressed form" may send it as such).  ``*`` is the stored
    syntax, or Explicit VR Little Endian for one of :data:`NOT_FOR_WEB`.
    """
    found: list[Acceptable] = []
    for choice in acceptable:
        wanted = choice.syntax
        options: list[str]
        if wanted is None:
            options = [DEFAULT_TRANSFER_SYNTAX]
            if stored not in NATIVE:
                options.append(stored)
        elif wanted == AS_STORED:
            options = [stored] if stored not in NOT_FOR_WEB else [DEFAULT_TRANSFER_SYNTAX]
        else:
            options = [wanted]
        for syntax in options:
            usable = (syntax == stored and stored not in NOT_FOR_WEB) or can_transcode(
                stored, syntax
            )
            option = dataclasses.replace(choice, syntax=syntax)
            if usable and option not in found:
                found.append(option)
    return found


def _not_acceptable(what: str, stored: str) -> NotAcceptable:
    targets = ", ".join(sorted(encodable_syntaxes()))
    return NotAcceptable(
        f"{what} is stored in transfer syntax {stored}, which cannot be sent in any "
        'acceptable representation; supported: multipart/related; type="application/dicom" '
        f"with transfer-syntax=* (as stored) or one of {targets} "
        "(PS3.18 8.7.3; Implicit VR Little Endian and Big Endian are never sent)"
    )


# ---------------------------------------------------------------- transcoding


class TranscodeError(ApplianceError):
    """An instance could not be decoded or re-encoded."""


def transcode(source: IO[bytes], target: str) -> bytes:
    """Re-encode a stored Part 10 instance in the syntax *target*.

    The instance is read whole; encapsulated pixel data is decoded
    (pydicom with the pylibjpeg plugins; YCbCr JPEG comes out as RGB, and
    Photometric Interpretation says so), Big Endian values are turned Little
    Endian, and for RLE or JPEG 2000 Lossless the pixel data is encoded.  The
    SOP Instance UID is kept: the data set is the same instance in another
    encoding.  The File Meta Information names this implementation.

    Raises
    ------
    TranscodeError
        if the pixel data cannot be decoded or encoded.
    """
    try:
        ds = dcmread(source)
        _convert_all(ds)
        stored = UID(ds.file_meta.TransferSyntaxUID)
        has_pixels = "PixelData" in ds
        if has_pixels and stored.is_compressed:
            ds.decompress(generate_instance_uid=False)
        elif not stored.is_little_endian:
            _big_to_little_endian(ds)
        if has_pixels and target in COMPRESSED_TARGETS:
            ds.compress(target, generate_instance_uid=False)
        meta = ds.file_meta
        meta.TransferSyntaxUID = UID(target)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:  # codecs raise anything; the reason is kept
        raise TranscodeError(
            f"cannot re-encode in {target}: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    return buffer.getvalue()


def _convert_all(ds: Dataset) -> None:
    """Turn every raw element into a typed one, with the VR of the data
    dictionary where none was encoded (Implicit VR), so it can be written
    in Explicit VR."""
    for _ in ds.iterall():
        pass


def _big_to_little_endian(ds: Dataset) -> None:
    """Make the binary values of a data set read Big Endian Little Endian
    (pydicom does not on writing); numbers and text are already decoded."""
    for elem in ds.iterall():
        if elem.tag != 0x7FE00010 and isinstance(elem.value, bytes):
            elem.value = to_little_endian(elem.value, str(elem.VR))
    if "PixelData" not in ds:
        return
    pixels = ds.pixel_array
    if int(ds.BitsAllocated) == 1:
        data = pack_bits(pixels)  # pixel_array has one byte per bit
    else:
        data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        ds.PlanarConfiguration = 0  # pixel_array is colour-by-pixel


# -------------------------------------------------------------------- caching


def _utc(moment: dt.datetime | None) -> dt.datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def validators(instances: Iterable[StoredInstance], variant: str) -> tuple[str, dt.datetime | None]:
    """A strong entity tag and the Last-Modified time of a response.

    The tag hashes *variant* (what representation was negotiated) with each
    instance's UID, blob key, size and time of last write, so it changes
    when any instance is replaced, added or deleted.
    """
    digest = hashlib.sha256(variant.encode())
    latest: dt.datetime | None = None
    for stored in instances:
        written = _utc(stored.updated_at)
        stamp = written.isoformat() if written else ""
        digest.update(
            f"{stored.sop_instance_uid}|{stored.blob_key}|{stored.size}|{stamp}\n".encode()
        )
        if written is not None and (latest is None or written > latest):
            latest = written
    return digest.hexdigest()[:40], latest


def _not_modified(etag: str, last_modified: dt.datetime | None) -> bool:
    """RFC 9110 13.1.2 / 13.1.3: If-None-Match first (weak comparison), else
    If-Modified-Since."""
    if_none_match = request.if_none_match
    if request.headers.get("If-None-Match"):
        return bool(if_none_match.star_tag or if_none_match.contains_weak(etag))
    since = request.if_modified_since
    if since is not None and last_modified is not None:
        return last_modified.replace(microsecond=0) <= since
    return False


def _cache_headers(response: Response, etag: str, last_modified: dt.datetime | None) -> Response:
    response.set_etag(etag)
    if last_modified is not None:
        response.last_modified = last_modified
    response.vary.add("Accept")
    return response


def _conditional(
    etag: str, last_modified: dt.datetime | None, kind: str, what: str
) -> Response | None:
    """A 304 response if the client's copy is current, else None."""
    if not _not_modified(etag, last_modified):
        return None
    log.info("WADO-RS %s %s: not modified (304)", kind, what)
    return _cache_headers(Response(status=304), etag, last_modified)


# --------------------------------------------------------------------- helpers


def _instance_url(root: str, stored: StoredInstance) -> str:
    return instance_url(
        root, stored.study_instance_uid, stored.series_instance_uid, stored.sop_instance_uid
    )


def _what(study: str, series: str | None, instance: str | None) -> str:
    if instance is not None:
        return f"instance {instance} of series {series} of study {study}"
    if series is not None:
        return f"series {series} of study {study}"
    return f"study {study}"


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """The rest of *stream* in chunks of :data:`CHUNK_SIZE`; closes it."""
    with stream:
        while chunk := stream.read(CHUNK_SIZE):
            yield chunk


def _close(chunks: Iterator[bytes]) -> None:
    """Close a chunk generator (and so its blob stream) not read to the end."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _slices(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_SIZE):
        yield bytes(view[start : start + CHUNK_SIZE])


@dataclasses.dataclass
class _Counter:
    bytes: int = 0
    parts: int = 0
    transcoded: int = 0
    done: bool = False


@dataclasses.dataclass
class _Body:
    """One instance's content, ready to be sent."""

    syntax: str
    single_part: bool
    size: int
    chunks: Iterator[bytes]
    transcoded: bool


def _instance_body(
    retrieve: RetrieveService, stored: StoredInstance, options: Sequence[Acceptable]
) -> _Body:
    """The first of *options* that can actually be produced.  The blob is
    opened (or transcoded) here, so a failure surfaces before any byte of
    this instance is sent."""
    failure: TranscodeError | None = None
    for option in options:
        syntax = option.syntax or DEFAULT_TRANSFER_SYNTAX
        if syntax == stored.transfer_syntax_uid:
            stream = retrieve.stream(stored)
            return _Body(syntax, option.single_part, stored.size, _chunks(stream), False)
        try:
            with retrieve.open(stored) as source:
                data = transcode(source, syntax)
        except TranscodeError as exc:
            log.warning(
                "WADO-RS: instance %s (%s) not sent as %s: %s",
                stored.sop_instance_uid,
                stored.transfer_syntax_uid,
                syntax,
                exc.reason,
            )
            failure = exc
            continue
        return _Body(syntax, option.single_part, len(data), _slices(data), True)
    if failure is not None:
        # the codec's own words stay in the server log
        raise NotAcceptable(
            f"instance {stored.sop_instance_uid} cannot be sent in any acceptable "
            "transfer syntax: decoding or re-encoding its pixel data failed"
        )
    raise _not_acceptable(f"instance {stored.sop_instance_uid}", stored.transfer_syntax_uid)


def _log_done(kind: str, what: str, counter: _Counter) -> None:
    log.info(
        "WADO-RS %s %s: %d part(s), %d transcoded, %d bytes%s",
        kind,
        what,
        counter.parts,
        counter.transcoded,
        counter.bytes,
        "" if counter.done else " (stopped before the end)",
    )


# -------------------------------------------------------------------- retrieve


@bp.get("/studies/<study>")
@bp.get("/studies/<study>/series/<series>")
@bp.get("/studies/<study>/series/<series>/instances/<instance>")
def retrieve_instances(
    study: str, series: str | None = None, instance: str | None = None
) -> Response:
    """Retrieve Study, Series or Instance (PS3.18 10.4.1.1.1).

    Answers 200 with the instances, 304 if the client's copy is current,
    400 for a malformed UID, 404 if nothing is stored there, 406 if an
    instance cannot be given in any acceptable representation.
    """
    check_uids(study, series, instance)
    acceptable = acceptable_instances(
        request.headers.get("Accept"), single_part_allowed=instance is not None
    )
    what = _what(study, series, instance)
    if not acceptable:
        raise NotAcceptable(
            f"the Accept header names no representation of {what} that is served here; "
            'supported: multipart/related; type="application/dicom" with an optional '
            "transfer-syntax, and application/dicom for a single instance (PS3.18 10.4.1.2)"
        )
    retrieve = current_services().retrieve
    instances = retrieve.instances(study, series, instance)
    audit.note(instances=len(instances))
    plans: list[tuple[StoredInstance, list[Acceptable]]] = []
    for stored in instances:
        options = candidates(stored.transfer_syntax_uid, acceptable)
        if len(instances) > 1:
            options = [option for option in options if not option.single_part]
        if not options:
            raise _not_acceptable(f"instance {stored.sop_instance_uid}", stored.transfer_syntax_uid)
        plans.append((stored, options))

    root = service_root()
    # Content-Location carries the service root: a part of the representation
    etag, last_modified = validators(instances, f"retrieve|{root}|{acceptable!r}")
    unchanged = _conditional(etag, last_modified, "retrieve", what)
    if unchanged is not None:
        return unchanged
    counter = _Counter()
    first = _instance_body(retrieve, *plans[0])  # failures before the status is sent
    if first.single_part:
        counter.parts, counter.transcoded = 1, int(first.transcoded)
        response = Response(
            _single(first, counter, what),
            content_type=f"{APPLICATION_DICOM}; transfer-syntax={first.syntax}",
            direct_passthrough=True,
        )
        response.content_length = first.size
    else:
        boundary = new_boundary()
        environ = request.environ
        response = Response(
            _multipart(retrieve, root, plans, first, boundary, counter, what, environ),
            content_type=content_type(boundary, APPLICATION_DICOM),
            direct_passthrough=True,
        )
    return _cache_headers(response, etag, last_modified)


def _single(body: _Body, counter: _Counter, what: str) -> Iterator[bytes]:
    try:
        for chunk in body.chunks:
            counter.bytes += len(chunk)
            yield chunk
        counter.done = True
    finally:
        _close(body.chunks)
        _log_done("retrieve", what, counter)


def _multipart(
    retrieve: RetrieveService,
    root: str,
    plans: Sequence[tuple[StoredInstance, Sequence[Acceptable]]],
    first: _Body,
    boundary: str,
    counter: _Counter,
    what: str,
    environ: dict[str, Any],
) -> Iterator[bytes]:
    """The multipart body, one instance at a time: at most one chunk (or
    one transcoded instance) is in memory."""
    body: _Body | None = first
    try:
        for number, (stored, options) in enumerate(plans):
            if body is None:
                body = _instance_body(retrieve, stored, options)
            headers = {
                "Content-Type": f"{APPLICATION_DICOM}; transfer-syntax={body.syntax}",
                "Content-Length": str(body.size),
                "Content-Location": _instance_url(root, stored),
            }
            head = part_head(boundary, headers, first=number == 0)
            counter.bytes += len(head)
            yield head
            for chunk in body.chunks:
                counter.bytes += len(chunk)
                yield chunk
            counter.parts += 1
            counter.transcoded += int(body.transcoded)
            body = None
        tail = close_delimiter(boundary, empty=not plans)
        counter.bytes += len(tail)
        yield tail
        counter.done = True
    except ApplianceError as exc:
        # the status line is gone: end the body without its close delimiter,
        # which tells the client the message is incomplete
        log.error("WADO-RS retrieve %s stopped: %s", what, exc.reason)
        audit.note_broken(environ)
    finally:
        if body is not None:
            _close(body.chunks)
        _log_done("retrieve", what, counter)


# -------------------------------------------------------------------- metadata


def _check_json_acceptable() -> None:
    """PS3.18 10.4.4 / Table 10.4.4-1 (2019e): metadata as
    ``application/dicom+json`` (also ``application/json``, ``*/*``)."""
    accept = request.headers.get("Accept")
    if not (accept or "").strip():
        return
    for media in parse_accept(accept):
        if media.essence in (APPLICATION_DICOM_JSON, APPLICATION_JSON, "application/*", "*/*"):
            return
    raise NotAcceptable(
        "metadata is served as application/dicom+json only "
        '(multipart/related; type="application/dicom+xml" is not supported)'
    )


@bp.get("/studies/<study>/metadata")
@bp.get("/studies/<study>/series/<series>/metadata")
@bp.get("/studies/<study>/series/<series>/instances/<instance>/metadata")
def retrieve_metadata(
    study: str, series: str | None = None, instance: str | None = None
) -> Response:
    """Retrieve Study, Series or Instance Metadata (PS3.18 10.4.1.1.2).

    Answers 200 with a DICOM JSON array, one object per instance in
    retrieve order, 304 if the client's copy is current, 400 for a malformed
    UID, 404 if nothing is stored there, 406 unless the client accepts
    DICOM JSON.  Each instance's object comes from the metadata cache, or
    is built from its blob and then cached (:class:`_MetadataSource`).
    """
    check_uids(study, series, instance)
    _check_json_acceptable()
    services = current_services()
    instances = services.retrieve.instances(study, series, instance)
    audit.note(instances=len(instances))
    root = service_root()
    # the BulkDataURIs carry the service root: a part of the representation
    etag, last_modified = validators(instances, f"metadata|1|{root}")
    what = _what(study, series, instance)
    unchanged = _conditional(etag, last_modified, "metadata", what)
    if unchanged is not None:
        return unchanged
    counter = _Counter()
    source = _MetadataSource(services.retrieve, MetadataCache(services.engine), root, instances)
    first = source.json(instances[0])  # failures before the status
    # new entries are written when the server closes the body, after the
    # last byte is sent: the client does not wait for that commit
    body = ClosingIterator(_metadata_array(source, instances, first, counter, what), source.save)
    response = Response(body, content_type=APPLICATION_DICOM_JSON, direct_passthrough=True)
    return _cache_headers(response, etag, last_modified)


#: Bytes of metadata gathered before they are handed to the server: one
#: write per few dozen instances rather than per instance.
_METADATA_CHUNK = 64 * 1024
#: Instances whose cache entries are read in one query.
_METADATA_WINDOW = 500


class _MetadataSource:
    """Instances' DICOM JSON text: from the metadata cache when it has the
    instance's entry, else built from the blob and kept for the cache.

    Parameters
    ----------
    retrieve
        Opens the blobs of instances not cached.
    cache
        The metadata cache of the index.
    root
        The service root the BulkDataURIs are under.
    instances
        The instances of the request, in the order :meth:`json` is asked
        for them.
    """

    def __init__(
        self,
        retrieve: RetrieveService,
        cache: MetadataCache,
        root: str,
        instances: Sequence[StoredInstance],
    ) -> None:
        self._retrieve = retrieve
        self._cache = cache
        self._root = root
        self._keys = [stored.blob_key for stored in instances]
        self._position = {key: number for number, key in enumerate(self._keys)}
        # the entries of a window of instances, read ahead of their turn
        self._window: range = range(0)
        self._cached: dict[str, bytes] = {}
        self._new: dict[str, bytes] = {}
        #: instances served from the cache, and built from their blobs
        self.hits = self.misses = 0

    def json(self, stored: StoredInstance) -> bytes:
        """One instance's DICOM JSON object, UTF-8.

        Raises
        ------
        UnreadableInstance
            if it is not cached and its blob cannot be parsed.
        """
        template = self._entry(stored.blob_key)
        if template is None:
            template = metadata_template(self._retrieve, stored)
            self._new[stored.blob_key] = template
            self.misses += 1
            if len(self._new) >= WRITE_BATCH:
                self.save()
        else:
            self.hits += 1
        return fill_template(template, json_base(self._root, stored))

    def _entry(self, key: str) -> bytes | None:
        """The cached entry of blob *key*; entries are read
        :data:`_METADATA_WINDOW` instances at a time, in retrieve order, so
        a large study is never held in memory whole."""
        position = self._position.get(key)
        if position is None:
            return None
        if position not in self._window:
            self._window = range(position, position + _METADATA_WINDOW)
            keys = self._keys[position : position + _METADATA_WINDOW]
            self._cached = self._cache.load(keys, CACHE_VERSION)
        return self._cached.get(key)

    def save(self) -> None:
        """Write the entries built so far to the cache (every
        :data:`WRITE_BATCH` new ones, and when the response is closed); a
        failure is logged and forgotten (the cache only saves work, it never
        fails a request)."""
        new, self._new = self._new, {}
        if not new:
            return
        try:
            self._cache.store(new, CACHE_VERSION)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("metadata cache not written: %s", type(exc).__name__)


def _metadata_array(
    source: _MetadataSource,
    instances: Sequence[StoredInstance],
    first: bytes,
    counter: _Counter,
    what: str,
) -> Iterator[bytes]:
    """The JSON array, one instance read at a time, sent in chunks of about
    :data:`_METADATA_CHUNK` bytes."""
    pending = [b"[", first]
    size = len(first) + 1
    counter.parts = 1
    try:
        for stored in instances[1:]:
            obj = source.json(stored)
            pending += (b",", obj)
            size += len(obj) + 1
            counter.parts += 1
            if size >= _METADATA_CHUNK:
                counter.bytes += size
                yield b"".join(pending)
                pending, size = [], 0
        pending.append(b"]")
        counter.bytes += size + 1
        yield b"".join(pending)
        counter.done = True
    except (ApplianceError, ValueError) as exc:
        # the array stays unterminated: the client sees invalid JSON
        log.error("WADO-RS metadata of %s stopped: %s", what, exc)
        if pending:
            counter.bytes += size
            yield b"".join(pending)
    finally:
        log.debug("metadata of %s: %d cached, %d built", what, source.hits, source.misses)
        _log_done("metadata", what, counter)


# ------------------------------------------------------------------- bulk data


def acceptable_bulk(accept: str | None) -> list[Acceptable]:
    """What the Accept header allows for a bulk data value (PS3.18 8.7.3.3).

    ``multipart/related`` with ``type`` ``application/octet-stream`` (or
    absent, ``*/*``, ``application/*``, or an ``image/...`` type, which
    stands for the stored compressed form), ``multipart/*``, ``*/*``, and a
    bare ``application/octet-stream`` (single part).
    """
    if not (accept or "").strip():
        return [Acceptable(None)]
    found: list[Acceptable] = []
    for media in parse_accept(accept):
        syntax = media.param("transfer-syntax")
        part_type = (media.param("type") or APPLICATION_OCTET_STREAM).lower()
        if media.essence in ("*/*", "multipart/*"):
            found.append(Acceptable(None))
        elif media.is_(MULTIPART_RELATED):
            if part_type in (APPLICATION_OCTET_STREAM, "*/*", "application/*"):
                found.append(Acceptable(syntax))
            elif part_type.startswith("image/"):
                found.append(Acceptable(syntax or AS_STORED, media_type=part_type))
        elif media.is_(APPLICATION_OCTET_STREAM):
            found.append(Acceptable(syntax, single_part=True))
    return found


@bp.get("/studies/<study>/series/<series>/instances/<instance>/bulk/<path>")
def retrieve_bulkdata(study: str, series: str, instance: str, path: str) -> Response:
    """Retrieve Bulkdata (PS3.18 10.4.1.1.3): the value a BulkDataURI of the
    metadata names.

    A native value (any value but encapsulated pixel data) is one part,
    ``application/octet-stream``, Little Endian.  Encapsulated pixel data
    is, with ``transfer-syntax=*`` (or the stored syntax), one part per
    frame holding the frame's compressed bitstream, typed with the syntax's
    image media type (PS3.18 Table 8.7.3-4); without a transfer-syntax (or
    with Explicit VR Little Endian) it is decoded: one part with all frames'
    native pixels, as in the instance's Explicit VR Little Endian form.

    Answers 400 for a malformed UID or tag path, 404 if there is no such
    instance or value, 406 if no acceptable representation can be made.
    """
    check_uids(study, series, instance)
    if not is_tag_path(path):
        raise InvalidRequest(
            "a bulk data path is a tag (8 hex digits), or tag.item.tag... inside sequences"
        )
    acceptable = acceptable_bulk(request.headers.get("Accept"))
    if not acceptable:
        raise NotAcceptable(
            'bulk data is served as multipart/related; type="application/octet-stream" '
            "(or the image media type of compressed pixel data with transfer-syntax=*)"
        )
    retrieve = current_services().retrieve
    stored = retrieve.instances(study, series, instance)[0]
    url = f"{_instance_url(service_root(), stored)}/bulk/{path}"
    etag, last_modified = validators([stored], f"bulk|{url}|{acceptable!r}")
    what = f"{path} of {_what(study, series, instance)}"
    unchanged = _conditional(etag, last_modified, "bulkdata", what)
    if unchanged is not None:
        return unchanged
    with retrieve.open(stored) as stream:
        header = read_header(stream)
        value = locate_bulk(header, path.upper())
        parts, part_type, single = _bulk_parts(retrieve, stored, header, value, acceptable)
    counter = _Counter()
    if single:
        data = b"".join(parts)
        counter.parts, counter.bytes, counter.done = 1, len(data), True
        _log_done("bulkdata", what, counter)
        response = Response(data, content_type=part_type)
    else:
        boundary = new_boundary()
        response = Response(
            _bulk_multipart(parts, part_type, url, boundary, counter, what),
            content_type=content_type(boundary, part_type.split(";")[0]),
            direct_passthrough=True,
        )
    return _cache_headers(response, etag, last_modified)


def _bulk_parts(
    retrieve: RetrieveService,
    stored: StoredInstance,
    header: InstanceHeader,
    value: BulkValue,
    acceptable: Sequence[Acceptable],
) -> tuple[Iterator[bytes], str, bool]:
    """The parts of a bulk data response, their Content-Type, and whether a
    single-part body was chosen."""
    native = f"{APPLICATION_OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
    stored_syntax = header.transfer_syntax
    if value.data is not None or value.length is not None:
        # a native value: the same bytes whatever syntax was asked for among
        # the native ones (Little Endian)
        for choice in acceptable:
            if choice.media_type or choice.syntax not in (
                None,
                AS_STORED,
                EXPLICIT_VR_LITTLE_ENDIAN,
                stored_syntax,
            ):
                continue
            return iter([_native_value(retrieve, stored, value)]), native, choice.single_part
        raise NotAcceptable("this bulk data value is served as application/octet-stream only")
    media = _PIXEL_MEDIA_TYPES.get(stored_syntax, APPLICATION_OCTET_STREAM)
    for choice in acceptable:
        if choice.syntax in (None, EXPLICIT_VR_LITTLE_ENDIAN) and not choice.media_type:
            return iter([_decoded_pixels(retrieve, stored)]), native, choice.single_part
        if choice.single_part:
            continue  # frames come as parts of a multipart message
        if choice.syntax in (AS_STORED, stored_syntax) and choice.media_type in ("", media):
            frames = _encapsulated_frames(retrieve, stored, header, value)
            return frames, f"{media}; transfer-syntax={stored_syntax}", False
    raise NotAcceptable(
        f"the pixel data is stored in {stored_syntax}; it is served with transfer-syntax=* "
        f"as {media} frames, or decoded as application/octet-stream"
    )


def _native_value(retrieve: RetrieveService, stored: StoredInstance, value: BulkValue) -> bytes:
    if value.data is not None:
        return value.data
    assert value.offset is not None
    assert value.length is not None
    with retrieve.open_range(stored, value.offset, value.length) as stream:
        data = stream.read()
    if value.byte_swap and len(data) % value.byte_swap == 0:
        size = value.byte_swap
        return to_little_endian(data, {2: "OW", 4: "OF", 8: "OD"}[size])
    return data


def _encapsulated_frames(
    retrieve: RetrieveService, stored: StoredInstance, header: InstanceHeader, value: BulkValue
) -> Iterator[bytes]:
    """The frames of encapsulated pixel data, each a compressed bitstream
    (PS3.5 A.4: fragments joined, per the Basic or Extended Offset Table)."""
    assert value.offset is not None
    with retrieve.open_range(stored, value.offset, None) as stream:
        encapsulated = stream.read()
    ds = header.dataset
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    frames = int(ds.get("NumberOfFrames") or 1)
    return iter(
        list(generate_frames(encapsulated, number_of_frames=frames, extended_offsets=extended))
    )


def _decoded_pixels(retrieve: RetrieveService, stored: StoredInstance) -> bytes:
    """The pixel data as the instance's Explicit VR Little Endian form has it."""
    try:
        with retrieve.open(stored) as source:
            data = transcode(source, EXPLICIT_VR_LITTLE_ENDIAN)
        pixels = dcmread(io.BytesIO(data)).PixelData
    except TranscodeError as exc:
        log.warning(
            "WADO-RS: pixel data of instance %s not decoded: %s",
            stored.sop_instance_uid,
            exc.reason,
        )
        raise NotAcceptable(
            "the pixel data cannot be decoded; ask for it with transfer-syntax=*"
        ) from exc
    return bytes(pixels)


def _bulk_multipart(
    parts: Iterator[bytes],
    part_type: str,
    url: str,
    boundary: str,
    counter: _Counter,
    what: str,
) -> Iterator[bytes]:
    try:
        for number, data in enumerate(parts):
            headers = {"Content-Type": part_type, "Content-Location": url}
            head = part_head(boundary, headers, first=number == 0)
            yield head
            yield from _slices(data)
            counter.parts += 1
            counter.bytes += len(head) + len(data)
        yield close_delimiter(boundary, empty=counter.parts == 0)
        counter.done = True
    finally:
        _log_done("bulkdata", what, counter)
