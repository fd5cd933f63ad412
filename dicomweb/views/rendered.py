"""WADO-RS rendered and thumbnail resources (PS3.18 10.4, the Rendered and
Thumbnail resources of 10.4.1.1 (Sup 203); query parameters 8.3.5).

Routes (below ``/v1``):

- ``.../instances/{instance}/rendered``: the instance's first frame, or
  all its frames as ``multipart/related`` when only that is accepted;
- ``.../instances/{instance}/frames/{list}/rendered``: the listed frames,
  one image for one frame, else ``multipart/related`` (PS3.18 10.4.4: a
  single-part media type is for single-item resources only);
- ``/studies/{study}/thumbnail``, ``.../series/{series}/thumbnail``,
  ``.../instances/{instance}/thumbnail``, ``.../frames/{list}/thumbnail``:
  the first frame of a representative instance (the first instance with
  pixel data in retrieve order: series number, instance number), scaled to
  fit :data:`THUMBNAIL_SIZE`.

Media types: ``image/jpeg`` (the default) and ``image/png``.  Query
parameters (PS3.18 8.3.5.1): ``window=center,width[,function]`` (function
``linear``, ``linear-exact`` or ``sigmoid``, 8.3.5.1.4),
``viewport=vw,vh[,sx,sy,sw,sh]`` (8.3.5.1.3), ``quality=1..100`` (JPEG,
8.3.5.1.2) and ``accept`` (8.3.3.1); a thumbnail takes ``viewport`` and
``accept`` (8.3.5.2).  Other parameters (``annotation``, ``charset``,
``iccprofile``, and any unknown name) are ignored as PS3.18 8.3 requires;
a supported parameter with a bad value is a 400.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import cast

from flask import Blueprint, Response, request

from appliance.index.sql import StoredInstance
from appliance.pixels import (
    InstancePixels,
    NotAnImage,
    PixelDataError,
    RenderOptions,
    Viewport,
    Window,
    WindowFunction,
    encode_image,
    load_pixels,
    render_frame,
)
from dicomweb.app import current_services
from dicomweb.errors import InvalidRequest, NotAcceptable, check_uids
from dicomweb.views.frames import (
    INSTANCE_PATH,
    MediaRange,
    Part,
    accepted_ranges,
    cache_headers,
    check_frames_exist,
    describe_frames,
    entity_tag,
    find_instance,
    guarded,
    multipart_body,
    multipart_content_type,
    not_modified,
    not_modified_response,
    parse_frame_list,
)

bp = Blueprint("rendered", __name__, url_prefix="/v1")

LOGGER = logging.getLogger(__name__)

JPEG = "image/jpeg"
PNG = "image/png"
#: The rendered media types made here, the first being the default.
RENDERED_TYPES = (JPEG, PNG)

#: JPEG quality when the request gives none (rendered; thumbnails use 75).
DEFAULT_QUALITY = 90
THUMBNAIL_QUALITY = 75
#: A thumbnail fits in this many pixels (width, height) unless ``viewport``.
THUMBNAIL_SIZE = (200, 200)
#: The largest viewport side accepted.
MAX_VIEWPORT = 8192
#: How many instances of a study or series are tried for a thumbnail.
THUMBNAIL_CANDIDATES = 16

WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")


# --------------------------------------------------------------------------
# parameters (PS3.18 8.3.5.1)


def _single(name: str) -> str | None:
    values = request.args.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(f"the query parameter {name!r} is given more than once")
    return values[0] if values else None


def parse_window(value: str | None) -> Window | None:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4); the function
    defaults to ``linear`` when left out."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    if len(parts) not in (2, 3):
        raise InvalidRequest("window is center,width,function (PS3.18 8.3.5.1.4)")
    function = parts[2].lower() if len(parts) == 3 else "linear"
    if function not in WINDOW_FUNCTIONS:
        raise InvalidRequest(f"the window function must be one of {', '.join(WINDOW_FUNCTIONS)}")
    try:
        center, width = float(parts[0]), float(parts[1])
        return Window(center, width, cast(WindowFunction, function))
    except ValueError as exc:
        raise InvalidRequest(f"bad window ({exc}) (PS3.18 8.3.5.1.4)") from None


def parse_viewport(value: str | None) -> Viewport | None:
    """``viewport=vw,vh`` or ``viewport=vw,vh,sx,sy,sw,sh`` (PS3.18
    8.3.5.1.3); an empty sx or sy means 0, a negative sw or sh flips."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    if len(parts) not in (2, 6):
        raise InvalidRequest("viewport is vw,vh[,sx,sy,sw,sh] (PS3.18 8.3.5.1.3)")
    try:
        width, height = int(parts[0]), int(parts[1])
        source = None
        if len(parts) == 6:
            sx, sy = int(parts[2] or 0), int(parts[3] or 0)
            sw, sh = int(parts[4]), int(parts[5])
            if sw == 0 or sh == 0 or sx < 0 or sy < 0:
                raise ValueError("sx, sy must not be negative, sw, sh not zero")
            source = (sx, sy, sw, sh)
    except ValueError as exc:
        raise InvalidRequest(f"bad viewport ({exc}) (PS3.18 8.3.5.1.3)") from None
    if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise InvalidRequest(f"the viewport width and height must be within 1..{MAX_VIEWPORT}")
    return Viewport(width, height, source)


def parse_quality(value: str | None) -> int | None:
    """``quality=1..100`` (PS3.18 8.3.5.1.2)."""
    if value is None:
        return None
    try:
        quality = int(value)
    except ValueError:
        quality = 0
    if not 1 <= quality <= 100:
        raise InvalidRequest("quality is a number from 1 to 100 (PS3.18 8.3.5.1.2)")
    return quality


def choose_rendered(ranges: list[MediaRange], items: int) -> tuple[str, bool] | None:
    """The first acceptable (media type, multipart) for *items* images, or
    None.  ``*/*`` and ``image/*`` mean JPEG; a single-part range counts
    only for one image (PS3.18 10.4.4)."""
    for accept in ranges:
        if accept.type == "*/*":
            return JPEG, items > 1
        kind = accept.part_type
        if kind in ("*/*", "image/*"):
            kind = JPEG
        if kind not in RENDERED_TYPES:
            continue
        if accept.multipart:
            return kind, True
        if items == 1:
            return kind, False
    return None


def _not_acceptable(items: int) -> NotAcceptable:
    shape = (
        "image/jpeg or image/png"
        if items == 1
        else 'multipart/related; type="image/jpeg" (or "image/png")'
    )
    return NotAcceptable(f"rendered here as {shape} only (PS3.18 10.4.4, 8.7.4)")


# --------------------------------------------------------------------------
# routes


@bp.get(f"{INSTANCE_PATH}/rendered")
def retrieve_rendered_instance(study: str, series: str, instance: str) -> Response:
    """PS3.18 10.4.1.1 Rendered Instance: the first frame as one image,
    or every frame as ``multipart/related`` when only that is accepted.

    Statuses: 200, 304, 400 (bad UID or parameter value, no pixel data),
    404, 406, 500.
    """
    check_uids(study, series, instance)
    stored = find_instance(study, series, instance)
    chosen = choose_rendered(accepted_ranges(), 1)
    if chosen is None:
        raise _not_acceptable(1)
    return _rendered(stored, None, chosen, _render_options(thumbnail=False), "rendered")


@bp.get(f"{INSTANCE_PATH}/frames/<frame_list>/rendered")
def retrieve_rendered_frames(study: str, series: str, instance: str, frame_list: str) -> Response:
    """PS3.18 10.4.1.1 Rendered Frames: one image per listed frame.

    Statuses: 200, 304, 400 (also for a frame number beyond the frames,
    PS3.18 9.5.2), 404, 406, 500.
    """
    check_uids(study, series, instance)
    numbers = parse_frame_list(frame_list)
    stored = find_instance(study, series, instance)
    chosen = choose_rendered(accepted_ranges(), len(numbers))
    if chosen is None:
        raise _not_acceptable(len(numbers))
    return _rendered(stored, numbers, chosen, _render_options(thumbnail=False), "rendered")


@bp.get("/studies/<study>/thumbnail")
def retrieve_study_thumbnail(study: str) -> Response:
    """PS3.18 10.4.1.1 Study Thumbnail: a representative instance's
    first frame.  Statuses: 200, 304, 400, 404, 406, 500."""
    check_uids(study)
    return _thumbnail(*_representative(study, None), None)


@bp.get("/studies/<study>/series/<series>/thumbnail")
def retrieve_series_thumbnail(study: str, series: str) -> Response:
    """PS3.18 10.4.1.1 Series Thumbnail: a representative instance's
    first frame.  Statuses: 200, 304, 400, 404, 406, 500."""
    check_uids(study, series)
    return _thumbnail(*_representative(study, series), None)


@bp.get(f"{INSTANCE_PATH}/thumbnail")
def retrieve_instance_thumbnail(study: str, series: str, instance: str) -> Response:
    """PS3.18 10.4.1.1 Instance Thumbnail: the first frame.  Statuses:
    200, 304, 400, 404, 406, 500."""
    check_uids(study, series, instance)
    return _thumbnail(find_instance(study, series, instance), None, None)


@bp.get(f"{INSTANCE_PATH}/frames/<frame_list>/thumbnail")
def retrieve_frames_thumbnail(study: str, series: str, instance: str, frame_list: str) -> Response:
    """PS3.18 10.4.1.1 Frames Thumbnail: the first listed frame.
    Statuses: 200, 304, 400, 404, 406, 500."""
    check_uids(study, series, instance)
    numbers = parse_frame_list(frame_list)
    return _thumbnail(find_instance(study, series, instance), None, numbers[:1])


# --------------------------------------------------------------------------
# the work


def _render_options(*, thumbnail: bool) -> tuple[RenderOptions, int]:
    """The rendering options and JPEG quality of the request."""
    viewport = parse_viewport(_single("viewport"))
    if thumbnail:
        if viewport is None:
            viewport = Viewport(*THUMBNAIL_SIZE)
        return RenderOptions(viewport=viewport), THUMBNAIL_QUALITY
    window = parse_window(_single("window"))
    quality = parse_quality(_single("quality"))
    return RenderOptions(window, viewport), quality or DEFAULT_QUALITY


def _thumbnail(
    stored: StoredInstance, pixels: InstancePixels | None, numbers: list[int] | None
) -> Response:
    chosen = choose_rendered(accepted_ranges(), 1)
    if chosen is None:
        raise _not_acceptable(1)
    options = _render_options(thumbnail=True)
    return _rendered(stored, numbers or [1], chosen, options, "thumbnail", pixels)


def _representative(study: str, series: str | None) -> tuple[StoredInstance, InstancePixels]:
    """The first of the study's (series') first instances, in retrieve
    order, that has pixel data; NotFound if none is stored, NotAnImage if
    none of the candidates is an image."""
    retrieve = current_services().retrieve
    for stored in retrieve.instances(study, series)[:THUMBNAIL_CANDIDATES]:
        try:
            return stored, load_pixels(retrieve, stored)
        except (NotAnImage, PixelDataError):
            continue
    raise NotAnImage(f"none of the first {THUMBNAIL_CANDIDATES} instances has pixel data to show")


def _rendered(
    stored: StoredInstance,
    numbers: list[int] | None,
    chosen: tuple[str, bool],
    options: tuple[RenderOptions, int],
    kind: str,
    pixels: InstancePixels | None = None,
) -> Response:
    """Render *numbers* (None: the instance resource) of *stored* as
    *chosen*, honouring If-None-Match before any pixel is read."""
    media_type, multipart = chosen
    render_options, quality = options
    quality_key = quality if media_type == JPEG else None
    etag = entity_tag(stored, kind, numbers, media_type, multipart, render_options, quality_key)
    what = (
        f"retrieve_{kind} study={stored.study_instance_uid} "
        f"series={stored.series_instance_uid} instance={stored.sop_instance_uid}"
    )
    if not_modified(stored, etag):
        LOGGER.info("%s -> 304", what)
        return not_modified_response(stored, etag)

    if pixels is None:
        pixels = load_pixels(current_services().retrieve, stored)
    if numbers is None:
        numbers = list(range(1, pixels.number_of_frames + 1)) if multipart else [1]
    check_frames_exist(numbers, pixels)

    def image(number: int) -> bytes:
        picture = render_frame(pixels, number - 1, render_options)
        return encode_image(picture, media_type, quality)

    # the first image is made before the status line, so that a decoding
    # failure is an error response rather than a cut-off body
    first = image(numbers[0])
    LOGGER.info("%s frames=%s type=%s", what, describe_frames(numbers), media_type)
    if not multipart:
        response = Response(first, content_type=media_type)
        return cache_headers(response, stored, etag)

    parts: list[Part] = [
        ({"Content-Type": media_type}, _body(first if index == 0 else None, image, number))
        for index, number in enumerate(numbers)
    ]
    boundary = etag[:32]
    response = Response(
        guarded(multipart_body(parts, boundary), what),
        content_type=multipart_content_type(media_type, boundary, None),
    )
    return cache_headers(response, stored, etag)


def _body(
    ready: bytes | None, make: Callable[[int], bytes], number: int
) -> Callable[[], Iterable[bytes]]:
    if ready is not None:
        return lambda: (ready,)
    return lambda: (make(number),)
