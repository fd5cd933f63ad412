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
    if extension.config.dimse.tls_port:
        # the DICOM TLS listener of every worker (a marker of its own)
        tls_states = (
            runstate.check_ready(extension.run_dir, f"dimse-{number}-tls")
            for number in range(1, workers + 1)
        )
        checks["dimse_tls"] = next((state for state in tls_states if state != OK), OK)
    return checks


def upstream_checks() -> dict[str, str]:
    """Each upstream's state from its queue (no probe: a readiness poll must
    not send requests upstream): ``"ok"``, or ``"warn: <the last error>"``
    while something waits to be tried again after a failure.  Upstreams are
    not required: a WAN that is down delays forwarding, and the appliance
    goes on storing.  And the storage disk's free space (filesystem): a
    warning below ``storage.min_free_mb``."""
    from appliance.fhir.queue import StudyQueue
    from appliance.forward.outbox import Outbox

    extension = get_extension()
    config = extension.config
    checks: dict[str, str] = {}
    try:
        engine = extension.services.engine
        names = [d.name for d in config.forward]
        errors = Outbox(engine).waiting_errors(names) if names else {}
        for name, error in errors.items():
            checks[f"forward:{name}"] = f"warn: {error}" if error else OK
        if config.fhir.url:
            error = StudyQueue(engine).waiting_error()
            checks["fhir"] = f"warn: {error}" if error else OK
        below_floor = getattr(extension.services.storage, "below_floor", None)
        if below_floor is not None:
            # reads go on: a warning, not a failure, while new instances are refused
            low = below_floor()
            checks["disk"] = f"warn: {low}" if low else OK
    except (ApplianceError, OSError):
        pass  # the index or storage check above fails already
    return checks


def _entry(state: str) -> dict[str, str]:
    if state == OK:
        return {"status": "pass"}
    kind, _, output = state.partition(": ")
    return {"status": "warn" if kind == "warn" else "fail", "output": output}


@bp.get("/health/ready")
def ready() -> Response:
    """Readiness: 200 when the index and the storage answer and the DIMSE
    listener has bound its socket (and still runs), else 503; the body lists
    every check, the upstreams (forwarding destinations, the FHIR server)
    as ``warn`` while their last try failed, which does not make it 503."""
    checks = readiness_checks()
    passed = all(state == OK for state in checks.values())
    upstreams = upstream_checks()
    checks.update(upstreams)
    warned = any(state != OK for state in upstreams.values())
    body: dict[str, object] = {
        "status": "fail" if not passed else ("warn" if warned else "pass"),
        "checks": {name: [_entry(state)] for name, state in checks.items()},
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
