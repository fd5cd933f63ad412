"""Operations endpoints: liveness and readiness probes, and the metrics
(``GET /metrics``, Prometheus text format, :mod:`appliance.metrics`).

Bodies use the health check response format
(``application/health+json``, draft-inadarei-api-health-check): an overall
``status`` of ``pass`` or ``fail`` and, for readiness, one entry per check
under ``checks``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from flask import Blueprint, Response

from appliance import health
from appliance.errors import ApplianceError
from appliance.health import Check
from dicomweb.app import get_extension

bp = Blueprint("ops", __name__)

HEALTH_JSON = "application/health+json"


def _health(body: dict[str, object], status: int) -> Response:
    return Response(json.dumps(body), status=status, mimetype=HEALTH_JSON)


@bp.get("/health/live")
def live() -> Response:
    """Liveness: the HTTP worker answers.  Always 200 ``{"status": "pass"}``."""
    return _health({"status": "pass"}, 200)


def _entry(check: Check) -> dict[str, str]:
    if check.status == "ok":
        return {"status": "pass"}
    return {"status": check.status, "output": check.detail}


@bp.get("/health/ready")
def ready() -> Response:
    """Readiness: 200 when the index and the storage answer and the DIMSE
    listener has bound its socket (and still runs), else 503; the body lists
    every check, the upstreams (forwarding destinations, the FHIR server)
    as ``warn`` while their last try failed, which does not make it 503."""
    extension = get_extension()
    checks = health.all_checks(extension.config, extension.run_dir, lambda: extension.services)
    passed = all(check.status == "ok" for check in checks if check.required)
    warned = any(check.status != "ok" for check in checks if not check.required)
    body: dict[str, object] = {
        "status": "fail" if not passed else ("warn" if warned else "pass"),
        "checks": {check.name: [_entry(check)] for check in checks},
    }
    return _health(body, 200 if passed else 503)


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Every process's counters, and gauges read from the index now."""
    from appliance.metrics import CONTENT_TYPE, IndexCollector, StorageCollector, exposition

    extension = get_extension()
    extra: list[Any] = []
    # services that cannot be built (the index down): the counters only
    with contextlib.suppress(ApplianceError):
        services = extension.services
        extra.append(IndexCollector(extension.config, services.engine))
        extra.append(StorageCollector(services.storage))
    return Response(exposition(extra), mimetype=None, content_type=CONTENT_TYPE)
