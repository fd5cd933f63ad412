"""Prometheus metrics (``GET /metrics``, README "Monitoring").

Counters and histograms are kept by the process whose work they count (an
HTTP worker, a DIMSE worker, the background worker) and added up at scrape
time: under ``serve`` the supervisor gives every child the same
``PROMETHEUS_MULTIPROC_DIR`` (emptied at each start), where
prometheus-client keeps each process's values in a memory-mapped file, and
``/metrics`` in any HTTP worker reads them all.  Without that variable (a
test's app in one process) the values are the process's own.

What the index holds (instances, studies, bytes; forwarding queues; the
change-feed lag of DICOMcast) is not counted as it happens but read from the
index when ``/metrics`` is scraped (:class:`IndexCollector`), so every node
and every process reports the same truth.

Labels carry no patient data: DICOMweb transactions, HTTP methods and
statuses, DIMSE services and status classes, Calling AE Titles (at most
:data:`AE_TITLE_LIMIT` distinct ones per process, then ``other``, so a
scanner of AE titles cannot grow the series without bound), protocols.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from sqlalchemy import Engine

    from appliance.config import Config

#: The variable prometheus-client reads (when it is imported) to keep
#: values in files shared by the processes.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Distinct Calling AE Titles a process labels before it says "other".
AE_TITLE_LIMIT = 64
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

HTTP_REQUESTS = Counter(
    "appliance_http_requests_total",
    "DICOMweb and other HTTP requests answered, by transaction (the route's "
    "name), method and status code.",
    ["transaction", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "appliance_http_request_duration_seconds",
    "Seconds from a request's arrival to the end of its answer's body.",
    ["transaction"],
    buckets=_LATENCY_BUCKETS,
)
AUDIT_WRITE_FAILURES = Counter(
    "appliance_audit_write_failures_total",
    "Audit events that could not be written to the audit trail (disk full, "
    "permissions); the service log names each.",
)
RECEIVED_BYTES = Counter(
    "appliance_received_bytes_total",
    "Bytes received: HTTP request bodies, DIMSE data sets.",
    ["protocol"],
)
SENT_BYTES = Counter(
    "appliance_sent_bytes_total",
    "Bytes sent: HTTP response bodies, DIMSE data sets.",
    ["protocol"],
)
ASSOCIATIONS = Counter(
    "appliance_dimse_associations_total",
    "DIMSE associations, by Calling AE Title and how they went (accepted, "
    "rejected, released, aborted).",
    ["calling_ae", "event"],
)
DIMSE_OPERATIONS = Counter(
    "appliance_dimse_operations_total",
    "DIMSE operations answered, by service (C-STORE, C-FIND...), Calling AE "
    "Title and status class (success, warning, failure, cancel).",
    ["service", "calling_ae", "outcome"],
)
INGESTED = Counter(
    "appliance_ingest_instances_total",
    "Instances offered to the ingest, by protocol (dimse, dicomweb, import) "
    "and outcome (created, replaced, duplicate-kept, duplicate-rejected, "
    "refused, failed).",
    ["protocol", "outcome"],
)
STORAGE_ERRORS = Counter(
    "appliance_storage_errors_total",
    "Blob store operations that failed, by backend and error "
    "(StorageUnavailable: transient; StorageFull; StorageError).",
    ["backend", "error"],
)

_ae_lock = threading.Lock()
_ae_seen: set[str] = set()


def ae_label(calling_ae: str) -> str:
    """*calling_ae* as a label value: itself for the first
    :data:`AE_TITLE_LIMIT` distinct titles this process sees, else "other"."""
    title = calling_ae.strip() or "(none)"
    with _ae_lock:
        if title in _ae_seen:
            return title
        if len(_ae_seen) < AE_TITLE_LIMIT:
            _ae_seen.add(title)
            return title
    return "other"


@contextlib.contextmanager
def counting_storage_errors(backend: str) -> Iterator[None]:
    """Count the :class:`~appliance.errors.StorageError` raised inside (but
    BlobNotFound, an answer rather than a failure)."""
    from appliance.errors import BlobNotFound, StorageError

    try:
        yield
    except BlobNotFound:
        raise
    except StorageError as exc:
        STORAGE_ERRORS.labels(backend, type(exc).__name__).inc()
        raise


# ----------------------------------------------------------------- scrape


def exposition(extra: Iterable[Collector] = ()) -> bytes:
    """The text exposition of every process's metrics, plus *extra*
    collectors read now."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


class _Forward:
    """The default registry's metrics, inside another registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self._registry.collect()


class IndexCollector:
    """Gauges read from the index at scrape time: what it holds, the
    forwarding outboxes and DICOMcast's queue and lag.  A failing index
    gives ``appliance_index_up 0`` and nothing else, not an error."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import func, select
        from sqlalchemy.exc import SQLAlchemyError

        from appliance.errors import ApplianceError
        from appliance.fhir.queue import StudyQueue
        from appliance.forward.outbox import Outbox
        from appliance.index.schema import changefeed, instance, series, study

        up = GaugeMetricFamily("appliance_index_up", "1 if the index answered the scrape.")
        try:
            with self.engine.connect() as conn:
                studies = conn.execute(select(func.count()).select_from(study)).scalar()
                series_count = conn.execute(select(func.count()).select_from(series)).scalar()
                instances, size = conn.execute(
                    select(func.count(), func.coalesce(func.sum(instance.c.size), 0))
                ).one()
                latest = conn.execute(select(func.max(changefeed.c.sequence))).scalar()
            destinations = [d.name for d in self.config.forward]
            forward = Outbox(self.engine).status(destinations) if destinations else []
            fhir = StudyQueue(self.engine).status(self.config.fhir.url)
        except (SQLAlchemyError, ApplianceError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        held = GaugeMetricFamily(
            "appliance_index_objects",
            "Studies, series and instances in the index.",
            labels=["level"],
        )
        held.add_metric(["study"], int(studies or 0))
        held.add_metric(["series"], int(series_count or 0))
        held.add_metric(["instance"], int(instances or 0))
        yield held
        yield GaugeMetricFamily(
            "appliance_stored_bytes", "Bytes of the stored instances.", value=int(size or 0)
        )
        yield GaugeMetricFamily(
            "appliance_changefeed_sequence",
            "The newest change-feed sequence number.",
            value=int(latest or 0),
        )
        entries = GaugeMetricFamily(
            "appliance_forward_entries",
            "Forwarding outbox entries per destination and state (in_flight: "
            "queued and claimed by a sender).",
            labels=["destination", "state"],
        )
        oldest = GaugeMetricFamily(
            "appliance_forward_oldest_queued_seconds",
            "Age of the oldest queued entry per destination (0 when none).",
            labels=["destination"],
        )
        for status in forward:
            for state in ("queued", "in_flight", "delivered", "parked", "superseded"):
                entries.add_metric([status.name, state], getattr(status, state))
            oldest.add_metric([status.name], status.oldest_queued_age or 0.0)
        yield entries
        yield oldest
        lag = GaugeMetricFamily(
            "appliance_changefeed_lag",
            "Change-feed entries a follower has not read yet.",
            labels=["follower"],
        )
        fhir_studies = GaugeMetricFamily(
            "appliance_fhir_studies",
            "DICOMcast's studies per state (in_flight: queued and claimed).",
            labels=["state"],
        )
        if self.config.fhir.url:
            lag.add_metric(["fhir"], fhir.behind)
            for state in ("queued", "in_flight", "synced", "parked"):
                fhir_studies.add_metric([state], getattr(fhir, state))
        yield lag
        yield fhir_studies


class StorageCollector:
    """Free space of the storage folder's disk, read at scrape time (the
    filesystem backend; nothing for a cloud store)."""

    def __init__(self, storage: object) -> None:
        self.storage = storage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        free_bytes = getattr(self.storage, "free_bytes", None)
        below_floor = getattr(self.storage, "below_floor", None)
        if free_bytes is None or below_floor is None:
            return
        try:
            free, low = free_bytes(), below_floor()
        except OSError:
            return
        yield GaugeMetricFamily(
            "appliance_storage_free_bytes",
            "Free bytes on the storage folder's disk.",
            value=free,
        )
        yield GaugeMetricFamily(
            "appliance_storage_refusing",
            "1 while free space is below storage.min_free_mb and new instances are refused.",
            value=1 if low else 0,
        )
