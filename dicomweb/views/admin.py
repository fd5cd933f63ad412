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

and the operator dashboard's data (:mod:`appliance.dashboard`):

- ``GET /v1/admin/dashboard``: instances received per hour (by protocol
  and sending AE), storage and index size, the forwarding and DICOMcast
  queues, recent DIMSE associations and every health check, in one JSON
  object (``?hours=N``, 1 to 168, default 24).

Not part of DICOMweb: JSON of our own, for the ``admin`` role.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, request

from appliance import dashboard
from appliance.errors import NotFound
from appliance.fhir.queue import StudyQueue
from appliance.forward.outbox import Outbox
from dicomweb.app import get_extension
from dicomweb.errors import InvalidRequest

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


#: The most hours ``/v1/admin/dashboard?hours=`` may ask for (a week).
MAX_HOURS = 168


@bp.get("/dashboard")
def dashboard_snapshot() -> Response:
    """One snapshot of the dashboard's data (:func:`appliance.dashboard.snapshot`)."""
    extension = get_extension()
    raw = request.args.get("hours", "24")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_HOURS:
        raise InvalidRequest(f"hours must be a whole number from 1 to {MAX_HOURS}")
    found = dashboard.snapshot(
        extension.services, extension.config, hours=int(raw), run_dir=extension.run_dir
    )
    return _json(found.as_json())
