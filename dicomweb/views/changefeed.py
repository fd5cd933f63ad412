"""The change feed, shaped as Microsoft's DICOM server shapes it
(REFERENCE.md; microsoft/dicom-server docs/concepts/change-feed.md).

``GET /v1/changefeed?offset=&limit=&includemetadata=`` lists entries with a
sequence above ``offset`` (exclusive), oldest first; ``limit`` 1-100, default
10; ``includemetadata`` default true: the DICOM JSON metadata of the
instance's *current* version, or null once it is deleted.
``GET /v1/changefeed/latest`` is the newest entry, or 204 when the feed is
empty (what the seed's ASP.NET controller answers for no entry).

With data partitions on, the feed stays at the service root, as the seed
service's does, and holds the changes of every partition: each entry then
names its ``PartitionName``, and its metadata's URLs are in that partition.

Sequence numbers increase and may have gaps; entries commit in sequence order
(see ``SqlIndex._lock_feed``), so a reader polling "after the last sequence I
saw" never misses one.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from flask import Blueprint, Response, request

from appliance.errors import NotFound
from appliance.index.sql import ChangeEntry
from appliance.partitions import DEFAULT_NAME
from dicomweb import audit
from dicomweb.app import current_services, get_extension
from dicomweb.errors import InvalidRequest
from dicomweb.metadata import instance_metadata
from dicomweb.urls import service_root

bp = Blueprint("changefeed", __name__, url_prefix="/v1")

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
#: offsets are sequence numbers: a signed 64-bit column
MAX_OFFSET = 2**63 - 1


@bp.get("/changefeed")
def read_change_feed() -> Response:
    """Entries after ``offset``, at most ``limit``, oldest first."""
    params = _params({"offset", "limit", "includemetadata"})
    offset = _integer(params, "offset", 0, 0, MAX_OFFSET)
    limit = _integer(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    include = _boolean(params, "includemetadata", True)
    entries = current_services().index.changes(after=offset, limit=limit)
    audit.note(
        studies=tuple(dict.fromkeys(e.study_instance_uid for e in entries)), instances=len(entries)
    )
    cache: dict[str, dict[str, Any] | None] = {}
    return _json([_entry(entry, include, cache) for entry in entries])


@bp.get("/changefeed/latest")
def latest_change() -> Response:
    """The newest entry; 204 No Content for an empty feed."""
    params = _params({"includemetadata"})
    include = _boolean(params, "includemetadata", True)
    entry = current_services().index.latest_change()
    if entry is None:
        return Response(status=204)
    audit.note(studies=(entry.study_instance_uid,), instances=1)
    return _json(_entry(entry, include, {}))


def _params(allowed: set[str]) -> dict[str, str]:
    """The query parameters, names case-insensitive (the seed's clients
    write ``includeMetadata``); an unknown or repeated one is a 400."""
    found: dict[str, str] = {}
    for name, values in request.args.lists():
        key = name.lower()
        if key not in allowed:
            raise InvalidRequest(f"unknown query parameter {name!r}")
        if key in found or len(values) != 1:
            raise InvalidRequest(f"query parameter {name!r} is given more than once")
        found[key] = values[0]
    return found


def _integer(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in params:
        return default
    try:
        value = int(params[name])
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be a whole number") from None
    if not low <= value <= high:
        raise InvalidRequest(f"query parameter {name!r} must be from {low} to {high}")
    return value


def _boolean(params: dict[str, str], name: str, default: bool) -> bool:
    if name not in params:
        return default
    value = params[name].lower()
    if value not in ("true", "false"):
        raise InvalidRequest(f"query parameter {name!r} must be true or false")
    return value == "true"


def _timestamp(value: dt.datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` (SQLite hands back naive UTC values)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _entry(
    entry: ChangeEntry, include_metadata: bool, cache: dict[str, dict[str, Any] | None]
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Sequence": entry.sequence,
        "StudyInstanceUid": entry.study_instance_uid,
        "SeriesInstanceUid": entry.series_instance_uid,
        "SopInstanceUid": entry.sop_instance_uid,
        "Action": entry.action,
        "Timestamp": _timestamp(entry.timestamp),
        **_partition_of(entry),
        "State": entry.state,
    }
    if include_metadata:
        body["Metadata"] = _current_metadata(entry, cache)
    return body


def _partition_of(entry: ChangeEntry) -> dict[str, str]:
    """``{"PartitionName": ...}`` of the entry's partition while partitions
    are on, else nothing (the shape without partitions stays as it was)."""
    extension = get_extension()
    if not extension.config.partitions.enabled:
        return {}
    name = extension.services.partitions.name_of(entry.partition_key)
    return {"PartitionName": name or DEFAULT_NAME}


def _current_metadata(
    entry: ChangeEntry, cache: dict[str, dict[str, Any] | None]
) -> dict[str, Any] | None:
    """The metadata of the instance's current version; None once deleted."""
    uid = entry.sop_instance_uid
    key = f"{entry.partition_key}/{uid}"
    if key in cache:
        return cache[key]
    metadata: dict[str, Any] | None = None
    if entry.state != "deleted":
        services = current_services().in_partition(entry.partition_key)
        stored = services.index.find_instance(uid)
        if stored is not None:
            root = service_root()
            name = _partition_of(entry).get("PartitionName")
            if name is not None:
                root = f"{root}/partitions/{name}"
            try:
                metadata = instance_metadata(services.retrieve, root, stored)
            except NotFound:  # deleted between the two reads
                metadata = None
    cache[key] = metadata
    return metadata


def _json(body: object) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False), content_type="application/json; charset=utf-8"
    )
