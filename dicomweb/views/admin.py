"""Administration of the forwarding outbox (``appliance/forward``), the same
as ``dicom-appliance forward status | retry``:

- ``GET /v1/admin/forward``: per destination, the entries queued, in
  flight, delivered, parked and superseded, the age of the oldest queued
  entry (seconds) and the last error;
- ``POST /v1/admin/forward/{name}/retry``: queue the destination's parked
  entries again; answers ``{"requeued": N}``.

and of DICOMcast (``appliance/fhir``), the same as ``dicom-appliance fhir
status | retry``:

- ``GET /v1/admin/fhir``: the change-feed position (``cursor``, ``latest``,
  ``behind``), the studies queued, in flight, synced and parked, the age of
  the oldest queued one and the last error;
- ``POST /v1/admin/fhir/retry``: queue the parked studies again; answers
  ``{"requeued": N}``.

Not part of DICOMweb: JSON of our own.  Open like the rest of the service
until the security issue brings roles (these will need ``admin``).
"""

from __future__ import annotations

import json

from flask import Blueprint, Response

from appliance.errors import NotFound
from appliance.fhir.queue import StudyQueue
from appliance.forward.outbox import Outbox
from dicomweb.app import get_extension

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


@bp.get("/forward")
def forward_status() -> Response:
    """Each ``[[forward]]`` destination's outbox, in configuration order."""
    extension = get_extension()
    names = [d.name for d in extension.config.forward]
    found = Outbox(extension.services.engine).status(names)
    destinations = []
    for destination, status in zip(extension.config.forward, found, strict=True):
        destinations.append({**status.as_json(), "url": destination.url})
    return _json({"destinations": destinations})


@bp.post("/forward/<name>/retry")
def forward_retry(name: str) -> Response:
    """Queue the parked entries of destination *name* again (404 if no
    destination has that name)."""
    extension = get_extension()
    if name not in {d.name for d in extension.config.forward}:
        raise NotFound(f"no [[forward]] destination is named {name!r}")
    count = Outbox(extension.services.engine).requeue_parked(name)
    return _json({"destination": name, "requeued": count})


@bp.get("/fhir")
def fhir_status() -> Response:
    """DICOMcast's position in the change feed and its queue."""
    extension = get_extension()
    status = StudyQueue(extension.services.engine).status(extension.config.fhir.url)
    return _json(status.as_json())


@bp.post("/fhir/retry")
def fhir_retry() -> Response:
    """Queue the parked studies again."""
    extension = get_extension()
    count = StudyQueue(extension.services.engine).requeue_parked()
    return _json({"requeued": count})
