"""WADO-RS Retrieve Frames (PS3.18 10.4, the frames resource of 10.4.1.1;
media types 8.7.3.3).

``GET /v1/studies/{study}/series/{series}/instances/{instance}/frames/{list}``
answers the listed frames (1-based, comma-separated, no duplicates, in the
order asked) as ``multipart/related``, one part per frame:

- ``application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1``: the
  uncompressed frame in little endian (PS3.18 8.7.3.3.1), exactly the stored
  bytes for native data (byte-swapped if stored in Explicit VR Big Endian),
  decoded here for compressed data;
- the compressed media type of the stored transfer syntax (PS3.18 Table
  8.7.3-5: ``image/jpeg``, ``image/jls``, ``image/jp2``, ``image/jpx``,
  ``image/jphc``, ``image/jxl``, ``image/dicom-rle``) with its
  ``transfer-syntax`` parameter: the stored fragments of the frame,
  concatenated, byte for byte.  No transcoding to another compressed syntax.

Accept (header, or the ``accept`` query parameter of PS3.18 8.3.3.1) is
matched range by range in q order, see :func:`choose_frame_form`; no Accept
or ``*/*`` gets the default of PS3.18 8.7.3.3 (uncompressed, unless the
data are lossy compressed).  A single frame may also be asked for with a
single-part media type (PS3.18 10.4.4).  A frame number beyond Number of
Frames is a 400, as PS3.18 9.5.2 has it for WADO-URI's frameNumber.

This module also holds the HTTP helpers the rendered and thumbnail
resources share (:mod:`dicomweb.views.rendered`): Accept parsing, path
checks, entity tags and the multipart writer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator

from flask import Blueprint, Response, request
from pydicom.uid import UID
from werkzeug.http import http_date

from appliance.errors import ApplianceError
from appliance.index.sql import StoredInstance
from appliance.pixels import (
    COMPRESSED_MEDIA_TYPES,
    LOSSY_TRANSFER_SYNTAXES,
    MEDIA_TYPE_ALIASES,
    UNCOMPRESSED_TRANSFER_SYNTAX,
    InstancePixels,
    can_decode,
    load_pixels,
)
from dicomweb.app import current_services
from dicomweb.errors import InvalidRequest, NotAcceptable, check_uids
from dicomweb.media import MediaTypeError, parse_media_type
from dicomweb.multipart_writer import close_delimiter, part_head

bp = Blueprint("frames", __name__, url_prefix="/v1")

LOGGER = logging.getLogger(__name__)

#: The Instance resource's path below the service root (PS3.18 10.4.1.1).
INSTANCE_PATH = "/studies/<study>/series/<series>/instances/<instance>"

OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"

#: The most frame numbers one request may list.
MAX_FRAMES_PER_REQUEST = 10000


# --------------------------------------------------------------------------
# request checks shared by the pixel resources


def parse_frame_list(text: str) -> list[int]:
    """The frame numbers of a ``{frames}`` path segment.

    PS3.18 10.4.1.1: one or more comma-separated, non-duplicate frame
    numbers in any order, counted from 1.  Anything else is a 400.
    """
    items = text.split(",")
    if len(items) > MAX_FRAMES_PER_REQUEST:
        raise InvalidRequest(f"at most {MAX_FRAMES_PER_REQUEST} frames can be asked at once")
    numbers: list[int] = []
    seen: set[int] = set()
    for item in items:
        item = item.strip()
        if not item.isascii() or not item.isdigit() or len(item) > 9:
            raise InvalidRequest(
                f"the frame list {text[:64]!r} is not comma-separated frame numbers"
            )
        number = int(item)
        if number < 1:
            raise InvalidRequest("frame numbers start at 1 (PS3.18 9.5.2, 10.4.1.1)")
        if number in seen:
            raise InvalidRequest(f"frame {number} is listed twice (PS3.18 10.4.1.1)")
        seen.add(number)
        numbers.append(number)
    return numbers


def describe_frames(numbers: list[int]) -> str:
    """*numbers* for a log line: the list, or its ends and count if long."""
    if len(numbers) <= 10:
        return ",".join(map(str, numbers))
    return f"{numbers[0]},...,{numbers[-1]} ({len(numbers)} frames)"


def check_frames_exist(numbers: list[int], pixels: InstancePixels) -> None:
    """400 for a frame number beyond Number of Frames: PS3.18 9.5.2 (and
    8.2.7) make a frame number that is not "a positive integer less than or
    equal to the number of frames" a Bad Request; the RS frame list follows
    the same rule here."""
    for number in numbers:
        if number > pixels.number_of_frames:
            raise InvalidRequest(
                f"frame {number} does not exist: the instance has "
                f"{pixels.number_of_frames} frame(s) (PS3.18 9.5.2)"
            )


def find_instance(study: str, series: str, instance: str) -> StoredInstance:
    """The stored instance (NotFound, a 404, if it is not stored)."""
    return current_services().retrieve.instances(study, series, instance)[0]


# --------------------------------------------------------------------------
# Accept


@dataclasses.dataclass(frozen=True)
class MediaRange:
    """One element of an Accept list (RFC 9110 12.5.1), names lower-cased."""

    type: str
    params: dict[str, str]
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        """True for ``multipart/related`` (or ``multipart/*``)."""
        return self.type in (MULTIPART, "multipart/*")

    @property
    def part_type(self) -> str:
        """The media type of the parts (``type=``), else this range's own;
        ``*/*`` for a multipart range without one."""
        if self.multipart:
            return normalise(self.params.get("type", "*/*"))
        return self.type

    @property
    def transfer_syntax(self) -> str | None:
        """The ``transfer-syntax`` parameter (PS3.18 8.7.3.5.2), if any."""
        return self.params.get("transfer-syntax")


def normalise(media_type: str) -> str:
    """*media_type* lower-cased, without parameters, old aliases mapped."""
    name = media_type.split(";", 1)[0].strip().lower()
    return MEDIA_TYPE_ALIASES.get(name, name)


def _split(text: str, separator: str) -> list[str]:
    """*text* split at *separator* outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(value: str | None) -> list[MediaRange]:
    """The ranges of an Accept value, best first (q descending, then the
    order given); q=0 ranges and elements that are not media ranges are
    dropped.  No value means ``*/*``."""
    if value is None or not value.strip():
        return [MediaRange("*/*", {})]
    ranges: list[MediaRange] = []
    for element in _split(value, ","):
        if not element.strip():
            continue
        try:
            parsed = parse_media_type(element)
        except MediaTypeError:
            continue
        params = dict(parsed.params)
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(normalise(parsed.essence), params, q))
    return sorted(ranges, key=lambda r: -r.q)


def accepted_ranges() -> list[MediaRange]:
    """The request's acceptable media types: the ``accept`` query parameter
    when present (PS3.18 8.3.3.1: it takes precedence), else the header."""
    values = request.args.getlist("accept")
    if values:
        return parse_accept(",".join(values))
    return parse_accept(request.headers.get("Accept"))


@dataclasses.dataclass(frozen=True)
class FrameForm:
    """How frames are sent: part media type, its transfer syntax, whether
    compressed frames are decoded first, multipart or a single part."""

    media_type: str
    transfer_syntax: str
    decode: bool
    multipart: bool

    @property
    def content_type(self) -> str:
        """The Content-Type of one frame."""
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def choose_frame_form(
    ranges: list[MediaRange], stored_syntax: str, frames: int
) -> FrameForm | None:
    """The first acceptable way to send *frames* frames of data stored in
    *stored_syntax*, or None (406).

    Per range (PS3.18 8.7.3.3, 8.7.4; Table 8.7.3-4 and 8.7.3-5):

    - ``application/octet-stream`` without ``transfer-syntax`` or with
      ``1.2.840.10008.1.2.1``: uncompressed little endian, decoding compressed
      data (skipped when no decoder here handles it);
    - ``application/octet-stream; transfer-syntax=*`` (or the stored syntax):
      the stored form, compressed bytes labelled with their syntax;
    - the stored syntax's compressed media type, or ``image/*``, with no
      ``transfer-syntax``, ``*`` or the stored one: the stored fragments;
    - ``*/*``, and ``multipart/related`` without ``type`` or with
      ``type="*/*"``: the default of PS3.18 8.7.3.3, uncompressed little
      endian "unless the origin server has only access to the pixel data in
      lossy compressed form": native and lossless-compressed data are sent
      uncompressed (decoded here), data in a lossy transfer syntax
      (:data:`~appliance.pixels.LOSSY_TRANSFER_SYNTAXES`) or one no decoder
      here handles are sent in the stored form.

    A single-part range counts only when one frame is asked (PS3.18 10.4.4).
    """
    compressed = is_compressed(stored_syntax)
    stored_media = COMPRESSED_MEDIA_TYPES.get(stored_syntax)
    as_stored = FrameForm(stored_media or OCTET_STREAM, stored_syntax, False, False)
    for accept in ranges:
        multipart = accept.multipart or accept.type == "*/*"
        if not multipart and frames > 1:
            continue
        part = accept.part_type
        syntax = accept.transfer_syntax
        form: FrameForm | None = None
        if part == "*/*":
            if not compressed:
                form = FrameForm(OCTET_STREAM, UNCOMPRESSED_TRANSFER_SYNTAX, False, multipart)
            elif stored_syntax in LOSSY_TRANSFER_SYNTAXES or not can_decode(stored_syntax):
                form = dataclasses.replace(as_stored, multipart=multipart)
            else:
                form = FrameForm(OCTET_STREAM, UNCOMPRESSED_TRANSFER_SYNTAX, True, multipart)
        elif part == OCTET_STREAM:
            if syntax in (None, UNCOMPRESSED_TRANSFER_SYNTAX) or (not compressed and syntax == "*"):
                form = FrameForm(OCTET_STREAM, UNCOMPRESSED_TRANSFER_SYNTAX, compressed, multipart)
            elif compressed and syntax in ("*", stored_syntax):
                form = FrameForm(OCTET_STREAM, stored_syntax, False, multipart)
        elif (
            compressed
            and stored_media is not None
            and part in ("image/*", stored_media)
            and syntax in (None, "*", stored_syntax)
        ):
            form = FrameForm(stored_media, stored_syntax, False, multipart)
        if form is not None and (not form.decode or can_decode(stored_syntax)):
            return form
    return None


def is_compressed(syntax: str) -> bool:
    """True if *syntax* is an encapsulated (compressed) transfer syntax."""
    uid = UID(syntax)
    return uid.is_transfer_syntax and uid.is_encapsulated


# --------------------------------------------------------------------------
# caching (RFC 9110 8.8, 13.1)


def entity_tag(stored: StoredInstance, *parts: object) -> str:
    """A strong entity tag for one representation of *stored*: its blob key
    and write time (a replaced instance gets a new one) and what was asked."""
    text = "\x1f".join(
        [stored.blob_key, _utc(stored.updated_at).isoformat() if stored.updated_at else ""]
        + [str(part) for part in parts]
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def _utc(moment: dt.datetime) -> dt.datetime:
    """*moment* as an aware UTC time (SQLite returns naive UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def not_modified(stored: StoredInstance, etag: str) -> bool:
    """True if the request's If-None-Match names *etag* (or ``*``), or,
    without If-None-Match, If-Modified-Since is not before the write time
    (RFC 9110 13.1.2, 13.1.3)."""
    if request.if_none_match:
        return request.if_none_match.contains_weak(etag)
    since = request.if_modified_since
    if since is not None and stored.updated_at is not None:
        return _utc(stored.updated_at).replace(microsecond=0) <= since
    return False


def cache_headers(response: Response, stored: StoredInstance, etag: str) -> Response:
    """ETag, Last-Modified, Cache-Control (private: the body is patient
    data; no-cache: revalidate, which a 304 answers cheaply) and Vary."""
    response.set_etag(etag)
    if stored.updated_at is not None:
        response.headers["Last-Modified"] = http_date(_utc(stored.updated_at))
    response.headers["Cache-Control"] = "private, no-cache"
    response.vary.add("Accept")
    return response


def not_modified_response(stored: StoredInstance, etag: str) -> Response:
    """The 304 for a conditional GET whose representation is unchanged."""
    return cache_headers(Response(status=304), stored, etag)


# --------------------------------------------------------------------------
# multipart/related (RFC 2387, PS3.18 8.6.1.2)

#: A part: its headers and a callable producing its body in chunks (called
#: only when the part is written, so decoding happens while streaming).
Part = tuple[dict[str, str], Callable[[], Iterable[bytes]]]


def multipart_body(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body of a ``multipart/related`` message, part by part."""
    first = True
    for headers, body in parts:
        yield part_head(boundary, headers, first=first)
        yield from body()
        first = False
    yield close_delimiter(boundary, empty=first)


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str | None) -> str:
    """``multipart/related; type="..."; boundary=...`` (PS3.18 8.7.3.5.1)."""
    value = f'{MULTIPART}; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def guarded(chunks: Iterable[bytes], what: str) -> Iterator[bytes]:
    """*chunks*, logging a failure after the status line went out: the
    response then ends early (no closing boundary), which the client sees."""
    try:
        yield from chunks
    except ApplianceError as exc:
        LOGGER.error("%s: stopped while streaming: %s", what, exc.reason)
    except Exception:
        LOGGER.exception("%s: stopped while streaming", what)


# --------------------------------------------------------------------------
# the route


@bp.get(f"{INSTANCE_PATH}/frames/<frame_list>")
def retrieve_frames(study: str, series: str, instance: str, frame_list: str) -> Response:
    """PS3.18 10.4 Retrieve Transaction, frames resource: the listed frames.

    Statuses: 200; 304 (If-None-Match); 400 (bad UID, malformed or
    out-of-range frame list, no pixel data); 404 (instance not stored); 406
    (no acceptable form, e.g. uncompressed asked and no decoder here, or
    video); 500 (stored pixel data unreadable).
    """
    check_uids(study, series, instance)
    numbers = parse_frame_list(frame_list)
    stored = find_instance(study, series, instance)
    form = choose_frame_form(accepted_ranges(), stored.transfer_syntax_uid, len(numbers))
    if form is None:
        raise NotAcceptable(
            f"the frames are stored in transfer syntax {stored.transfer_syntax_uid}; "
            "acceptable here: multipart/related with application/octet-stream "
            "(uncompressed) or the stored compressed media type (PS3.18 8.7.3.3)"
        )
    etag = entity_tag(stored, "frames", numbers, form)
    what = f"retrieve_frames study={study} series={series} instance={instance}"
    if not_modified(stored, etag):
        LOGGER.info("%s frames=%s -> 304", what, describe_frames(numbers))
        return not_modified_response(stored, etag)

    pixels = load_pixels(current_services().retrieve, stored)
    if pixels.is_video:
        raise NotAcceptable("the frames of MPEG/HEVC video are not available one by one")
    check_frames_exist(numbers, pixels)
    produce = _frame_producer(pixels, form)
    # fail before the status line for what can be known: a frame missing
    # from the stored data, or the first frame not decoding
    for number in numbers:
        pixels.check_frame(number - 1)
    first = list(produce(numbers[0] - 1)) if form.decode else None

    def body(index: int, number: int) -> Callable[[], Iterable[bytes]]:
        if index == 0 and first is not None:
            return lambda: first
        return lambda: produce(number - 1)

    LOGGER.info(
        "%s frames=%s type=%s transfer-syntax=%s",
        what,
        describe_frames(numbers),
        form.media_type,
        form.transfer_syntax,
    )
    if not form.multipart:
        response = Response(guarded(body(0, numbers[0])(), what), content_type=form.content_type)
        return cache_headers(response, stored, etag)

    location = request.base_url.rsplit("/", 1)[0]
    parts: list[Part] = [
        (
            {"Content-Type": form.content_type, "Content-Location": f"{location}/{number}"},
            body(index, number),
        )
        for index, number in enumerate(numbers)
    ]
    boundary = etag[:32]
    response = Response(
        guarded(multipart_body(parts, boundary), what),
        content_type=multipart_content_type(form.media_type, boundary, form.transfer_syntax),
    )
    return cache_headers(response, stored, etag)


def _frame_producer(pixels: InstancePixels, form: FrameForm) -> Callable[[int], Iterator[bytes]]:
    """A function from a 0-based frame index to the frame's bytes in *form*."""
    if form.decode:

        def decoded(index: int) -> Iterator[bytes]:
            yield pixels.uncompressed_frame(index)

        return decoded
    return pixels.iter_frame
