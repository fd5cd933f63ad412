"""The one place where exceptions become HTTP responses.

- :class:`~appliance.errors.ApplianceError`: the HTTP status of
  :data:`HTTP_STATUS` (by the most specific class), a JSON body with the
  reason and the DICOM status code (PS3.18 Table I.2-2: DICOMweb failure
  reasons are DIMSE status codes), never a stack trace.
- werkzeug's HTTP errors (unknown path, method not allowed): the same JSON
  shape with their own status.
- anything else: 500 with a generic message; the traceback goes to the
  server log only.

A view that owes the client a richer answer (e.g. a STOW-RS response data
set listing the failed instances) builds it itself; this is the fallback.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from appliance.access import AccessDenied, Unauthenticated
from appliance.dicomio import is_valid_uid
from appliance.errors import (
    ApplianceError,
    BlobNotFound,
    ConfigError,
    Conflict,
    IndexUnavailable,
    InvalidInstance,
    NotFound,
    QueryError,
    SchemaNotCurrent,
    StorageError,
    StorageFull,
    UnreadableInstance,
)
from appliance.extended_tags import InvalidTag
from appliance.pixels import CannotDecode, InvalidRenderParameter, NotAnImage
from appliance.status import Status

LOGGER = logging.getLogger(__name__)


class InvalidRequest(ApplianceError):
    """The request itself is malformed (a bad UID in the path, an unknown
    parameter): 400."""

    status = Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


class UnsupportedMediaType(ApplianceError):
    """The request's Content-Type is not one the transaction accepts: 415
    (PS3.18 Table 10.5.3-1)."""

    status = Status.CANNOT_UNDERSTAND


class PayloadTooLarge(ApplianceError):
    """The request body is larger than ``http.max_request_mb``: 413."""

    status = Status.OUT_OF_RESOURCES


class NotAcceptable(ApplianceError):
    """No media type the client accepts can be produced: 406 (PS3.18
    8.3.3.1 / RFC 9110 15.5.7)."""


#: In the raw request target: an encoded slash, backslash or NUL, or a dot
#: segment.  The server decodes ``%2F`` before routing, so without this a
#: "UID" such as ``..%2F..%2Fetc`` would only miss every route (404).
_HOSTILE_PATH = re.compile(r"%2f|%5c|%00|(^|/)\.{1,2}(/|$|\?)|(^|/)%2e", re.IGNORECASE)


def refuse_hostile_paths() -> None:
    """``before_request``: 400 for a path under the service root that carries
    an encoded separator, a NUL or a dot segment (nothing we serve has one)."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.path
    target = raw.split("?", 1)[0]
    if target.startswith("/v1") and _HOSTILE_PATH.search(target):
        raise InvalidRequest(
            "the path holds an encoded separator, a NUL or a dot segment; a UID cannot"
        )


def check_uids(*uids: str | None) -> None:
    """Raise InvalidRequest unless each UID given (None: absent) is a valid
    UID (PS3.5 9.1).  Every UID taken from a URL passes here first."""
    for uid in uids:
        if uid is not None and not is_valid_uid(uid):
            raise InvalidRequest("a UID in the path is not a valid UID (PS3.5 9.1)")


#: HTTP status per core exception class; the most specific class wins, and
#: an ApplianceError not listed is a 500.
HTTP_STATUS: dict[type[ApplianceError], int] = {
    InvalidRequest: 400,
    NotAcceptable: 406,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    QueryError: 400,  # PS3.18 8.3.4.5 / 10.6.3: a query that cannot be understood
    NotAnImage: 400,  # frames/rendered of an instance without pixel data (PS3.18 9.5.2)
    InvalidRenderParameter: 400,  # PS3.18 8.3: a supported parameter with a bad value
    CannotDecode: 406,  # no decoder here: the uncompressed/rendered form cannot be made
    InvalidInstance: 400,
    InvalidTag: 400,  # an extended query tag to add, or named, is not acceptable
    Conflict: 409,  # an extended query tag that already exists
    UnreadableInstance: 400,
    BlobNotFound: 404,
    NotFound: 404,
    StorageFull: 507,
    StorageError: 503,
    IndexUnavailable: 503,
    SchemaNotCurrent: 503,
    ConfigError: 500,
}

GENERIC_MESSAGE = "internal server error; the server log has the details"


def http_status_for(exc: ApplianceError) -> int:
    """The HTTP status for *exc*: that of its most specific listed class."""
    for cls in type(exc).__mro__:
        if issubclass(cls, ApplianceError) and cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_response(status: int, message: str, **extra: Any) -> Response:
    """A JSON error body ``{"error": message, "status": status, ...}``."""
    response = jsonify({"error": message, "status": status, **extra})
    response.status_code = status
    return response


def handle_appliance_error(exc: ApplianceError) -> Response:
    """A core failure: its reason and DICOM status, no stack trace."""
    status = http_status_for(exc)
    level = logging.ERROR if status >= 500 else logging.INFO
    LOGGER.log(level, "%s %s -> %d: %s", request.method, request.path, status, exc.reason)
    return error_response(status, exc.reason, dicomStatus=int(exc.status))


def handle_http_exception(exc: HTTPException) -> Response:
    """A werkzeug HTTP error (404 for an unknown path, 405, 413, ...)."""
    status = exc.code or 500
    response = error_response(status, exc.description or exc.name)
    if status == 405:
        # keep the Allow header werkzeug computed
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers["Allow"] = value
    return response


def handle_unexpected(exc: Exception) -> Response:
    """A bug or an unforeseen failure: logged with its traceback, answered
    with a generic 500."""
    LOGGER.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, GENERIC_MESSAGE)


#: The ``realm`` of our challenges (RFC 9110 11.5).
REALM = "dicom-appliance"


def handle_access_denied(exc: AccessDenied) -> Response:
    """A refused request (:mod:`dicomweb.auth`), as RFC 9110 and RFC 6750
    say: no or unusable credentials 401 with a ``Bearer`` challenge
    (``error="invalid_token"`` for a bad, expired or revoked token, none when
    no credentials came: RFC 6750 3.1), a malformed Authorization header 400
    (``invalid_request``), valid credentials without the permission 403
    (``insufficient_scope``).  The reason never holds the token."""
    if isinstance(exc, Unauthenticated):
        error = exc.error
        status = 400 if error == "invalid_request" else 401
    else:
        error, status = "insufficient_scope", 403
    LOGGER.info("%s %s -> %d: %s", request.method, request.path, status, exc.reason)
    response = error_response(status, exc.reason)
    challenge = f'Bearer realm="{REALM}"'
    if error is not None:
        # RFC 6750 3: error_description is printable ASCII without " and \\
        description = "".join(
            c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "?" for c in exc.reason
        )
        challenge += f', error="{error}", error_description="{description}"'
    response.headers["WWW-Authenticate"] = challenge
    return response


def register_error_handlers(app: Flask) -> None:
    """Install the mapping on *app*."""
    app.register_error_handler(AccessDenied, handle_access_denied)
    app.register_error_handler(ApplianceError, handle_appliance_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
