"""Forwarding throughput: the appliance's senders delivering to Orthanc.

Each repetition, for the CT and the small set: a fresh appliance (embedded
default) with one ``[[forward]]`` destination (default ``batch_size`` and
``concurrency``) at a loopback port where nothing listens yet; the set
stored into it by STOW-RS (50 per request, 2 clients), so every instance is
queued and none can go; then Orthanc (with its DICOMweb plugin) started on
that port.  The clock runs from the first delivery seen to the last, the
outbox polled every 20 ms (``GET /v1/admin/forward``); Orthanc's instance
count is then checked.  The figure to hold it against is Orthanc's own
STOW-RS ingest of the same kind of set (the main table, Orthanc column).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

from bench import dicomweb
from bench.compare import CT, SMALL, Plan, log
from bench.corpus import InstanceSet
from bench.servers import appliance, free_port, orthanc

#: Seconds to wait for the outbox to drain.
DRAIN_TIMEOUT = 600


def _outbox(root: str) -> dict[str, Any]:
    response = httpx.get(f"{root}/admin/forward", timeout=30)
    response.raise_for_status()
    (only,) = response.json()["destinations"]
    return dict(only)


def _one(instances: InstanceSet) -> float:
    """Instances per second from the first delivery to the last."""
    port = free_port()
    destination = (
        f'[{{name = "orthanc", url = "http://127.0.0.1:{port}/dicom-web", retry_max_seconds = 1}}]'
    )
    with appliance(name="appliance-forward", extra={"APPLIANCE_FORWARD": destination}) as server:
        _, stored = dicomweb.stow(server, dicomweb.stow_bodies(list(instances.render()), 2, 50))
        if stored != instances.count:
            raise RuntimeError(f"stored {stored} of {instances.count}")
        with orthanc(http_port=port) as upstream:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            first: tuple[float, int] | None = None
            while True:
                state = _outbox(server.root)
                now = time.perf_counter()
                delivered = int(state["delivered"])
                if first is None and delivered:
                    first = (now, delivered)
                if delivered == instances.count:
                    break
                if state["parked"]:
                    raise RuntimeError(f"forwarding parked entries: {state['last_error']}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the outbox did not drain: {state}")
                time.sleep(0.02)
            assert first is not None
            held = httpx.get(
                upstream.root.removesuffix("/dicom-web") + "/statistics", timeout=30
            ).json()["CountInstances"]
            if held != instances.count:
                raise RuntimeError(f"Orthanc holds {held} instances, {instances.count} were sent")
    started, already = first
    if now == started:
        return float("nan")
    return (instances.count - already) / (now - started)


def run(plan: Plan) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The medians, and every repetition, by figure key."""
    values: dict[str, list[float]] = {}
    for rep in range(plan.reps):
        for kind, size, count in (("ct", CT, plan.ct), ("small", SMALL, plan.small)):
            instances = InstanceSet(f"forward-{kind}-{rep}", size, count, 100, plan.seed)
            rate = _one(instances)
            values.setdefault(f"forward_{kind}_to_orthanc_per_s", []).append(rate)
            log(f"forwarding {kind} to Orthanc, repetition {rep + 1}: {rate:.1f} inst/s")
    medians = {key: round(statistics.median(v), 1) for key, v in values.items()}
    return medians, values
