"""What the appliance has been doing lately, for the operator dashboard
(:mod:`appliance.dashboard`): instances received per hour, by protocol and
sending AE, and the log of DIMSE associations.

- **Received per hour**: instances grouped by the UTC hour they were first
  stored (``instance.created_at``, indexed since migration 0011), by the
  protocol they came by (``instance.source_protocol``: ``dimse``,
  ``dicomweb``, ``import``; "" for instances stored before that migration)
  and by the Calling AE Title of the C-STORE (``instance.source_ae``; ""
  for STOW-RS).  An instance replaced later keeps its first hour, as in
  ``dicom-appliance stats``.
- **Association log** (``association_log``): one row per DIMSE association,
  written when it ends (released, aborted, or rejected by this listener),
  with its counts.  Only the newest :data:`KEEP` rows are kept: each write
  that passes a multiple of :data:`PRUNE_EVERY` row ids deletes the rows
  more than :data:`KEEP` ids older, so the table never holds more than
  ``KEEP + PRUNE_EVERY`` rows and the prune is one indexed range delete.
  The log names AE titles, addresses and counts, never patient data.

:class:`AssociationLog` takes records from the DIMSE listener's threads
without touching the database and writes them from a thread of its own, so
neither an association nor its C-STOREs ever wait for it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, String, delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from appliance.errors import ApplianceError, IndexUnavailable
from appliance.index.engine import as_utc, describe_failure, write_transaction
from appliance.index.schema import association_log, instance

LOGGER = logging.getLogger(__name__)

#: Association log rows kept.
KEEP = 1000
#: Row ids between two prunes.
PRUNE_EVERY = 100
#: The outcomes of an association.
OUTCOMES = ("released", "aborted", "rejected")
#: Records waiting to be written, at most (more are dropped, with a warning).
QUEUE_LIMIT = 1000
#: Records written in one transaction, at most.
BATCH = 100


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def hour_of(moment: dt.datetime) -> dt.datetime:
    """The UTC start of the hour of *moment*."""
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


@dataclasses.dataclass(frozen=True)
class HourCount:
    """Instances first stored in one UTC hour, by one protocol and AE."""

    #: the UTC start of the hour
    hour: dt.datetime
    #: ``dimse``, ``dicomweb``, ``import``, or "" (stored before migration 0011)
    protocol: str
    #: the Calling AE Title of the C-STORE ("" for STOW-RS and import)
    ae: str
    instances: int

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hour": self.hour.isoformat()}


@dataclasses.dataclass(frozen=True)
class AssociationRecord:
    """One DIMSE association, as the association log keeps it."""

    started_at: dt.datetime
    ended_at: dt.datetime
    calling_ae: str
    called_ae: str
    #: the peer's IP address
    address: str
    tls: bool
    #: ``released``, ``aborted`` or ``rejected`` (:data:`OUTCOMES`)
    outcome: str
    #: why it was rejected or aborted (no patient data), else ""
    detail: str = ""
    #: C-STOREs answered with success or a warning
    stored: int = 0
    #: C-STOREs answered with a failure (refused ones included)
    store_failed: int = 0
    #: C-FIND requests
    finds: int = 0
    #: C-MOVE and C-GET requests
    retrieves: int = 0
    #: C-ECHO requests
    echoes: int = 0
    #: the row's id once written (newer rows have greater ids)
    id: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
        }

    def row(self) -> dict[str, Any]:
        """The columns of its row, each value cut to its column's length."""
        return {
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "calling_ae": self.calling_ae.strip()[:16],
            "called_ae": self.called_ae.strip()[:16],
            "address": self.address[:64],
            "tls": bool(self.tls),
            "outcome": self.outcome[:16],
            "detail": self.detail[:200],
            "stored": self.stored,
            "store_failed": self.store_failed,
            "finds": self.finds,
            "retrieves": self.retrieves,
            "echoes": self.echoes,
        }


# ------------------------------------------------------------ received


def _hour(dialect: str) -> ColumnElement[Any]:
    """The UTC start of the hour of ``instance.created_at``: a timestamp
    (PostgreSQL) or ``YYYY-MM-DD HH:00:00`` text (SQLite, which keeps the
    UTC time as ISO text: see :func:`appliance.stats._day`)."""
    if dialect == "postgresql":
        return func.date_trunc("hour", func.timezone("UTC", instance.c.created_at))
    return func.strftime("%Y-%m-%d %H:00:00", instance.c.created_at, type_=String)


def _parse_hour(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return as_utc(value)
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=dt.UTC)


def received_per_hour(
    engine: Engine, *, hours: int = 24, now: dt.datetime | None = None
) -> list[HourCount]:
    """Instances first stored in the last *hours* UTC hours (the current
    one included), per hour, protocol and sending AE; oldest hour first,
    hours with none left out.  One range scan of the ``created_at`` index.

    Raises
    ------
    ValueError
        if *hours* is not positive.
    IndexUnavailable
        if the database fails.
    """
    if hours < 1:
        raise ValueError("hours must be at least 1")
    current = hour_of(now or _now())
    since = current - dt.timedelta(hours=hours - 1)
    until = current + dt.timedelta(hours=1)
    hour = _hour(engine.dialect.name).label("hour")
    query = (
        select(hour, instance.c.source_protocol, instance.c.source_ae, func.count())
        .where(instance.c.created_at >= since, instance.c.created_at < until)
        .group_by(hour, instance.c.source_protocol, instance.c.source_ae)
        .order_by(hour, instance.c.source_protocol, instance.c.source_ae)
    )
    rows = _read(engine, lambda conn: conn.execute(query).all())
    return [
        HourCount(_parse_hour(h), str(protocol), str(ae), int(count))
        for h, protocol, ae, count in rows
    ]


# ---------------------------------------------------------- associations


def recent_associations(engine: Engine, limit: int = 20) -> list[AssociationRecord]:
    """The newest *limit* associations of the log, newest first (in the
    order they ended: by row id, the primary key).

    Raises
    ------
    IndexUnavailable
        if the database fails.
    """
    query = select(association_log).order_by(association_log.c.id.desc()).limit(limit)
    rows = _read(engine, lambda conn: conn.execute(query).all())
    return [
        AssociationRecord(
            started_at=as_utc(row.started_at),
            ended_at=as_utc(row.ended_at),
            calling_ae=row.calling_ae,
            called_ae=row.called_ae,
            address=row.address,
            tls=bool(row.tls),
            outcome=row.outcome,
            detail=row.detail,
            stored=row.stored,
            store_failed=row.store_failed,
            finds=row.finds,
            retrieves=row.retrieves,
            echoes=row.echoes,
            id=row.id,
        )
        for row in rows
    ]


def record_association(engine: Engine, record: AssociationRecord) -> None:
    """Add *record* to the association log (and prune it: see the module).

    Raises
    ------
    IndexUnavailable
        if the database fails.
    """
    record_associations(engine, [record])


def record_associations(engine: Engine, records: Sequence[AssociationRecord]) -> None:
    """Add *records* to the association log in one transaction, pruning
    it when their ids pass a multiple of :data:`PRUNE_EVERY`.

    Raises
    ------
    IndexUnavailable
        if the database fails.
    """
    if not records:
        return
    with write_transaction(engine) as conn:
        conn.execute(association_log.insert(), [r.row() for r in records])
        newest = int(conn.execute(select(func.max(association_log.c.id))).scalar_one())
        if newest // PRUNE_EVERY != (newest - len(records)) // PRUNE_EVERY:
            _prune(conn, newest)


def _prune(conn: Connection, newest: int) -> None:
    conn.execute(delete(association_log).where(association_log.c.id <= newest - KEEP))


class AssociationLog:
    """Writes association records from a thread of its own.

    :meth:`add` never blocks nor raises (a full queue drops the record with
    a warning naming the AE titles); :meth:`run` writes what was added, in
    batches, until its stop event is set, then what is left.  A failed
    write is logged (AE titles only) and its records dropped: the log is a
    view for operators, not an audit trail (that is :mod:`appliance.audit`).
    """

    def __init__(self, engine: Engine, limit: int = QUEUE_LIMIT) -> None:
        self.engine = engine
        self._queue: queue.Queue[AssociationRecord] = queue.Queue(maxsize=limit)
        self._written = threading.Condition()
        self._pending = 0

    def add(self, record: AssociationRecord) -> None:
        """Queue *record* for writing."""
        try:
            with self._written:
                self._queue.put_nowait(record)
                self._pending += 1
        except queue.Full:
            LOGGER.warning(
                "association %s -> %s not logged: %d records wait to be written already",
                record.calling_ae,
                record.called_ae,
                self._queue.maxsize,
            )

    def run(self, stop: threading.Event, poll: float = 0.2) -> None:
        """Write queued records until *stop* is set, then the rest."""
        while not stop.is_set():
            self._write_batch(poll)
        while self._write_batch(0):
            pass

    def wait(self, timeout: float) -> bool:
        """Wait until every record added so far is written (or dropped);
        False on timeout."""
        with self._written:
            return self._written.wait_for(lambda: self._pending == 0, timeout)

    def _write_batch(self, timeout: float) -> bool:
        """Write up to :data:`BATCH` records, waiting *timeout* seconds for
        the first; False if there was none."""
        try:
            first = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
        except queue.Empty:
            return False
        batch = [first]
        while len(batch) < BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        try:
            record_associations(self.engine, batch)
        except Exception as exc:  # noqa: BLE001 - a failed write never stops the writer
            LOGGER.warning(
                "%d association(s) not logged (%s), the last %s -> %s",
                len(batch),
                exc.reason if isinstance(exc, ApplianceError) else exc.__class__.__name__,
                batch[-1].calling_ae,
                batch[-1].called_ae,
            )
        finally:
            with self._written:
                self._pending -= len(batch)
                self._written.notify_all()
        return True


def _read(engine: Engine, work: Any) -> Any:
    """*work(conn)* in a read transaction; a database failure is raised as
    IndexUnavailable naming only its kind."""
    try:
        with engine.connect() as conn, conn.begin():
            return work(conn)
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"the index database failed ({describe_failure(exc)})") from exc


__all__ = [
    "KEEP",
    "AssociationLog",
    "AssociationRecord",
    "HourCount",
    "received_per_hour",
    "recent_associations",
    "record_association",
    "record_associations",
]
