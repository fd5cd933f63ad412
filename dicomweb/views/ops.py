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

from flask import Blueprint, Response

from appliance import runstate
from appliance.errors import ApplianceError
from dicomweb.app import get_extension

bp = Blueprint("ops", __name__)

HEALTH_JSON = "application/health+json"
OK = runstate.OK


def _health(body: dict[str, object], status: int) -> Response:
    return Response(json.dumps(body), status=status, mimetype=HEALTH_JSON)


@bp.get("/health/live")
def live() -> Response:
    """Liveness: the HTTP worker answers.  Always 200 ``{"status": "pass"}``."""
    return _health({"status": "pass"}, 200)


def readiness_checks() -> dict[str, str]:
    """Each dependency's state: ``"ok"`` or ``"failed: <reason>"``."""
    extension = get_extension()
    checks: dict[str, str] = {}
    try:
        checks.update(extension.services.check_ready())
    except ApplianceError as exc:
        checks["services"] = f"failed: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - a probe reports, never raises
        checks["services"] = f"failed: {exc.__class__.__name__}: {exc}"
    # not a TCP probe of the DIMSE port: see appliance.runstate for why; the
    # first worker that is not ready is reported
    workers = extension.config.dimse.workers
    states = (
        runstate.check_ready(extension.run_dir, f"dimse-{number}")
        for number in range(1, workers + 1)
    )
    checks["dimse"] = next((state for state in states if state != OK), OK)
    return checks


@bp.get("/health/ready")
def ready() -> Response:
    """Readiness: 200 when the index and the storage answer and the DIMSE
    listener has bound its socket (and still runs), else 503; the body lists
    every check."""
    checks = readiness_checks()
    passed = all(state == OK for state in checks.values())
    body: dict[str, object] = {
        "status": "pass" if passed else "fail",
        "checks": {
            name: [
                {"status": "pass"}
                if state == OK
                else {"status": "fail", "output": state.removeprefix("failed: ")}
            ]
            for name, state in checks.items()
        },
    }
    return _health(body, 200 if passed else 503)


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Every process's counters, and gauges read from the index now."""
    from appliance.metrics import CONTENT_TYPE, IndexCollector, exposition

    extension = get_extension()
    extra = []
    # services that cannot be built (the index down): the counters only
    with contextlib.suppress(ApplianceError):
        extra.append(IndexCollector(extension.config, extension.services.engine))
    return Response(exposition(extra), mimetype=None, content_type=CONTENT_TYPE)
