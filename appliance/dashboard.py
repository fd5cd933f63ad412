"""One snapshot of everything the operator console's dashboard shows
(``GET /v1/admin/dashboard``): what arrived in the last hours, storage and
index size, the forwarding and DICOMcast queues, recent DIMSE associations
and the health of each dependency.

Meant to be read every few seconds: each part is one or a few indexed
queries, except the index totals (:func:`appliance.stats.collect`'s
totals, which count and sum the whole ``instance`` table, as ``stats`` and
``/metrics`` do) and the forwarding counts per state (those of
``/v1/admin/forward``, which count each destination's outbox through its
``(destination, state, ...)`` index, delivered entries included).

Every part is computed on its own: a part that fails (e.g. the index is
down) leaves the others and is reported by the health checks; its field
is then empty (None, or an empty list).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from appliance import activity, health, stats
from appliance.activity import AssociationRecord, HourCount
from appliance.config import Config
from appliance.errors import ApplianceError, IndexUnavailable
from appliance.health import Check
from appliance.index.engine import as_utc, describe_failure
from appliance.index.schema import changefeed
from appliance.stats import Counts

if TYPE_CHECKING:
    from appliance.services import Services

LOGGER = logging.getLogger(__name__)

#: Associations shown, newest first.
ASSOCIATIONS = 20

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class StorageState:
    """The blob store's use and, on a local disk, its space."""

    #: ``filesystem``, ``azure``, ``s3`` (``storage.backend``)
    backend: str
    #: the bytes of the stored instances (sum of their blob sizes, from the index)
    used_bytes: int | None
    #: free and total bytes of the storage folder's file system (None for a
    #: cloud store); free as an unprivileged user sees it
    free_bytes: int | None
    total_bytes: int | None
    #: the floor (``storage.min_free_mb``) in bytes, 0 for none or a cloud store
    min_free_bytes: int
    #: free space is below the floor: new instances are refused
    refusing: bool


@dataclasses.dataclass(frozen=True)
class ForwardQueue:
    """One ``[[forward]]`` destination's outbox (``/v1/admin/forward``)."""

    name: str
    #: entries waiting to be delivered (queued, in flight included)
    pending: int
    #: of those, claimed by a sender now
    in_flight: int
    #: entries that failed for good, waiting for ``forward retry``
    parked: int
    #: seconds since the oldest pending entry was made, None if none
    oldest_age_seconds: float | None
    #: the newest error of a pending or parked entry, and when
    last_error: str | None
    last_error_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class FhirSync:
    """DICOMcast (``/v1/admin/fhir``), when ``[fhir] url`` is set."""

    #: studies waiting to be published (queued, in flight included)
    pending: int
    #: studies that failed for good, waiting for ``fhir retry``
    parked: int
    #: change-feed entries not taken in yet
    behind: int
    #: age of the oldest change not published yet: the older of the first
    #: change-feed entry past the cursor and the oldest queued study; None
    #: when everything is published
    lag_seconds: float | None
    last_error: str | None
    last_error_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Dashboard:
    """What the dashboard shows (see the module)."""

    #: when the snapshot was taken (UTC)
    generated_at: dt.datetime
    #: the hours :attr:`received` covers (the current one included)
    hours: int
    #: instances received per UTC hour, protocol and sending AE, oldest first
    received: list[HourCount]
    storage: StorageState
    #: studies, series, instances and bytes in the index (None if it failed)
    index: Counts | None
    #: per ``[[forward]]`` destination, in configuration order
    forwarding: list[ForwardQueue]
    #: None when DICOMcast is off (or its queue could not be read)
    fhir: FhirSync | None
    #: the newest DIMSE associations, newest first
    associations: list[AssociationRecord]
    #: each dependency, as ``/health/ready`` reports it
    health: list[Check]

    def as_json(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 UTC text."""
        value = _jsonable(self)
        assert isinstance(value, dict)
        return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Check):
        return value.as_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return value


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _part(name: str, work: Callable[[], T], default: T) -> T:
    """*work()*, or *default* when the index or the storage fails (logged,
    naming the failure's kind only: a database message may quote values)."""
    try:
        return work()
    except (ApplianceError, SQLAlchemyError, OSError) as exc:
        if isinstance(exc, ApplianceError):
            reason = exc.reason
        elif isinstance(exc, SQLAlchemyError):
            reason = describe_failure(exc)
        else:
            reason = exc.__class__.__name__
        LOGGER.warning("dashboard: %s not read (%s)", name, reason)
        return default


def snapshot(
    services: Services,
    config: Config,
    *,
    now: dt.datetime | None = None,
    hours: int = 24,
    run_dir: Path | None = None,
) -> Dashboard:
    """The dashboard of the appliance of *services* and *config* now.

    Parameters
    ----------
    services
        The core's services (their index engine and blob store).
    config
        The configuration (forwarding destinations, DICOMcast, DIMSE workers).
    now
        The time of the snapshot (tests); the current time by default.
    hours
        How many hours of :attr:`Dashboard.received`, the current included.
    run_dir
        The run folder of ``serve`` where DIMSE workers say they are ready
        (:mod:`appliance.runstate`); None outside ``serve`` (the DIMSE check
        then fails, as ``/health/ready`` does).
    """
    moment = now or _now()
    engine = services.engine
    index = _part("index totals", lambda: stats.collect(engine, ()).totals, None)
    return Dashboard(
        generated_at=moment,
        hours=hours,
        received=_part(
            "received per hour",
            lambda: activity.received_per_hour(engine, hours=hours, now=moment),
            [],
        ),
        storage=_storage(services, config, index),
        index=index,
        forwarding=_part("forwarding", lambda: _forwarding(services, config, moment), []),
        fhir=_part("DICOMcast", lambda: _fhir(services, config, moment), None),
        associations=_part(
            "associations", lambda: activity.recent_associations(engine, ASSOCIATIONS), []
        ),
        health=health.all_checks(config, run_dir, lambda: services),
    )


def _storage(services: Services, config: Config, index: Counts | None) -> StorageState:
    store = services.storage
    free: int | None = None
    total: int | None = None
    refusing = False
    root = getattr(store, "root", None)
    if config.storage.backend == "filesystem" and isinstance(root, Path):
        try:
            usage = shutil.disk_usage(root)
            free, total = usage.free, usage.total
            below_floor = getattr(store, "below_floor", None)
            refusing = below_floor is not None and below_floor() is not None
        except OSError as exc:
            LOGGER.warning("dashboard: the storage disk not read (%s)", exc.__class__.__name__)
    return StorageState(
        backend=config.storage.backend,
        used_bytes=None if index is None else index.bytes,
        free_bytes=free,
        total_bytes=total,
        min_free_bytes=int(getattr(store, "min_free_bytes", 0) or 0),
        refusing=refusing,
    )


def _forwarding(services: Services, config: Config, now: dt.datetime) -> list[ForwardQueue]:
    from appliance.forward.outbox import Outbox

    names = [d.name for d in config.forward]
    if not names:
        return []
    return [
        ForwardQueue(
            name=status.name,
            pending=status.queued,
            in_flight=status.in_flight,
            parked=status.parked,
            oldest_age_seconds=status.oldest_queued_age,
            last_error=status.last_error,
            last_error_at=status.last_error_at,
        )
        for status in Outbox(services.engine).status(names, now)
    ]


def _fhir(services: Services, config: Config, now: dt.datetime) -> FhirSync | None:
    from appliance.fhir.queue import StudyQueue

    if not config.fhir.url:
        return None
    status = StudyQueue(services.engine).status(config.fhir.url)
    ages = [] if status.oldest_queued_age is None else [status.oldest_queued_age]
    if status.behind:
        # the first change past the cursor: one look-up of the primary key
        query = (
            select(changefeed.c.timestamp)
            .where(changefeed.c.sequence > status.cursor)
            .order_by(changefeed.c.sequence)
            .limit(1)
        )
        try:
            with services.engine.connect() as conn:
                first = conn.execute(query).scalar()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({describe_failure(exc)})") from exc
        if first is not None:
            ages.append(round(max((now - as_utc(first)).total_seconds(), 0.0), 1))
    return FhirSync(
        pending=status.queued,
        parked=status.parked,
        behind=status.behind,
        lag_seconds=max(ages) if ages else None,
        last_error=status.last_error,
        last_error_at=status.last_error_at,
    )
