"""Extended query tags' administration (issue 11), in the shapes of
Microsoft's DICOM server (REFERENCE.md, "Extended query tags"):

- ``POST /v1/extendedquerytags``: a JSON array of ``{path, vr?,
  privateCreator?, level}``; 202 with the re-index operation's reference
  ``{id, href}``; 409 if a tag already exists; 400 for bad input;
- ``GET /v1/extendedquerytags`` (``limit``, ``offset``), ``GET``, ``PATCH``
  (``{"queryStatus": "Enabled" | "Disabled"}``) and ``DELETE`` (204)
  ``/v1/extendedquerytags/{path}`` (``ggggeeee`` or a keyword);
- ``GET /v1/extendedquerytags/{path}/errors`` (``limit``, ``offset``): the
  instances whose value failed validation;
- ``GET /v1/operations/{id}``: the re-index's progress, 202 while it runs,
  200 once it has ended.

Not part of DICOMweb; the ``admin`` role (Microsoft's
``manageExtendedQueryTags`` data action) for every route, reads included:
the tags name what the site indexes, and the errors name instances.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from flask import Blueprint, Response, request

from appliance.extended_tags import (
    COMPLETED,
    FAILED,
    ExtendedTags,
    InvalidTag,
    operation_reference,
)
from dicomweb.app import current_services
from dicomweb.urls import service_root

bp = Blueprint("extended_tags", __name__, url_prefix="/v1")

#: The most tags or errors one GET returns (as Microsoft's server).
MAX_LIMIT = 200


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _tags() -> ExtendedTags:
    return current_services().extended


def _paging() -> tuple[int, int]:
    try:
        limit = int(request.args.get("limit", "100"))
        offset = int(request.args.get("offset", "0"))
    except ValueError:
        raise InvalidTag("limit and offset must be integers") from None
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise InvalidTag(f"limit must be 1 to {MAX_LIMIT} and offset 0 or more")
    return limit, offset


@bp.post("/extendedquerytags")
def add_tags() -> Response:
    """Add tags: 202 and the reference of the operation that re-indexes the
    instances stored before them."""
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except ValueError:
        raise InvalidTag("the body is not JSON") from None
    if not isinstance(body, list):
        raise InvalidTag("the body must be a JSON array of extended query tags")
    operation_id = _tags().add(body)
    return _json(operation_reference(service_root(), operation_id), 202)


@bp.get("/extendedquerytags")
def list_tags() -> Response:
    """Every tag, in path order."""
    limit, offset = _paging()
    root = service_root()
    tags = _tags().all(fresh=True)[offset : offset + limit]
    return _json([tag.as_json(root) for tag in tags])


@bp.get("/extendedquerytags/<name>")
def get_tag(name: str) -> Response:
    """One tag (404 if there is none of that name)."""
    return _json(_tags().get(name).as_json(service_root()))


@bp.patch("/extendedquerytags/<name>")
def update_tag(name: str) -> Response:
    """Change a tag's ``queryStatus``."""
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except ValueError:
        raise InvalidTag("the body is not JSON") from None
    # the member's name in any case, as Microsoft's server takes it
    if not isinstance(body, dict) or [str(k).lower() for k in body] != ["querystatus"]:
        raise InvalidTag('the body must be {"queryStatus": "Enabled" | "Disabled"}')
    tag = _tags().set_query_status(name, next(iter(body.values())))
    return _json(tag.as_json(service_root()))


@bp.delete("/extendedquerytags/<name>")
def delete_tag(name: str) -> Response:
    """Delete a tag and its values: 204."""
    _tags().delete(name)
    return Response(status=204)


@bp.get("/extendedquerytags/<name>/errors")
def tag_errors(name: str) -> Response:
    """The instances whose value of the tag failed validation."""
    limit, offset = _paging()
    return _json(_tags().errors(name, limit, offset))


def _time(value: dt.datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


@bp.get("/operations/<operation_id>")
def get_operation(operation_id: str) -> Response:
    """An operation's progress: 202 while it is not finished, 200 after."""
    row = _tags().operation(operation_id)
    root = service_root()
    total, done = int(row["total"]), int(row["done"])
    ended = row["status"] in (COMPLETED, FAILED)
    percent = 100 if row["status"] == COMPLETED else (min(99, done * 100 // total) if total else 0)
    body: dict[str, Any] = {
        "operationId": row["id"],
        "type": row["type"],
        "createdTime": _time(row["created_at"]),
        "lastUpdatedTime": _time(row["updated_at"]),
        "status": row["status"],
        "percentComplete": percent,
        "resources": [
            f"{root}/extendedquerytags/{path}" for path in str(row["tag_paths"]).split(",") if path
        ],
    }
    return _json(body, 200 if ended else 202)
