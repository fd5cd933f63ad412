"""The health of each dependency, as ``GET /health/ready`` reports it and
the operator dashboard shows it (one computation for both).

Two kinds of checks:

- **required** (``index``, ``storage``, ``dimse``, ``dimse_tls``): the
  appliance is not ready while one fails (503);
- **upstreams** (``forward:<name>``, ``fhir``) and the storage disk's free
  space (``disk``): read from the queues and the disk, never probed (a
  readiness poll must not send requests upstream), and only ever a
  warning: a WAN that is down delays forwarding, and the appliance goes on
  storing; a disk below ``storage.min_free_mb`` refuses new instances while
  reads go on.

A state is ``"ok"``, ``"warn: <why>"`` or ``"failed: <why>"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import runstate
from appliance.config import Config
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.services import Services

OK = runstate.OK


@dataclasses.dataclass(frozen=True)
class Check:
    """One dependency's state."""

    name: str
    #: ``ok``, ``warn`` or ``fail``
    status: str
    #: why it is not ok ("" when it is)
    detail: str
    #: a failure makes the appliance not ready (else it is only a warning)
    required: bool

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


def readiness_checks(
    config: Config, run_dir: Path | None, services: Callable[[], Services]
) -> dict[str, str]:
    """Each required dependency's state: the index and the storage (probed
    through *services*, which may fail to be built), and the DIMSE
    listeners of every worker (their readiness markers in *run_dir*: see
    :mod:`appliance.runstate` for why not a TCP probe; the first worker
    that is not ready is reported)."""
    checks: dict[str, str] = {}
    try:
        checks.update(services().check_ready())
    except ApplianceError as exc:
        checks["services"] = f"failed: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - a probe reports, never raises
        checks["services"] = f"failed: {exc.__class__.__name__}: {exc}"
    workers = config.dimse.workers
    states = (runstate.check_ready(run_dir, f"dimse-{number}") for number in range(1, workers + 1))
    checks["dimse"] = next((state for state in states if state != OK), OK)
    if config.dimse.tls_port:
        # the DICOM TLS listener of every worker (a marker of its own)
        tls_states = (
            runstate.check_ready(run_dir, f"dimse-{number}-tls") for number in range(1, workers + 1)
        )
        checks["dimse_tls"] = next((state for state in tls_states if state != OK), OK)
    return checks


def upstream_checks(config: Config, services: Callable[[], Services]) -> dict[str, str]:
    """Each upstream's state from its queue: ``"ok"``, or ``"warn: <the
    last error>"`` while something waits to be tried again after a failure;
    and the storage disk's free space (filesystem): a warning below
    ``storage.min_free_mb``.  Nothing when the index or the storage cannot
    be read (their required checks fail already)."""
    from appliance.fhir.queue import StudyQueue
    from appliance.forward.outbox import Outbox

    checks: dict[str, str] = {}
    try:
        built = services()
        engine = built.engine
        names = [d.name for d in config.forward]
        errors = Outbox(engine).waiting_errors(names) if names else {}
        for name, error in errors.items():
            checks[f"forward:{name}"] = f"warn: {error}" if error else OK
        if config.fhir.url:
            error = StudyQueue(engine).waiting_error()
            checks["fhir"] = f"warn: {error}" if error else OK
        below_floor = getattr(built.storage, "below_floor", None)
        if below_floor is not None:
            # reads go on: a warning, not a failure, while new instances are refused
            low = below_floor()
            checks["disk"] = f"warn: {low}" if low else OK
    except (ApplianceError, OSError):
        pass  # the index or storage check fails already
    return checks


def _check(name: str, state: str, required: bool) -> Check:
    if state == OK:
        return Check(name, "ok", "", required)
    kind, _, detail = state.partition(": ")
    return Check(name, "warn" if kind == "warn" else "fail", detail, required)


def all_checks(
    config: Config, run_dir: Path | None, services: Callable[[], Services]
) -> list[Check]:
    """The required checks, then the upstream ones, in that order."""
    required = readiness_checks(config, run_dir, services)
    upstreams = upstream_checks(config, services)
    return [_check(name, state, True) for name, state in required.items()] + [
        _check(name, state, False) for name, state in upstreams.items()
    ]
