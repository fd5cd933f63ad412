"""The forwarding outbox: the ``forward_entry`` rows, and what senders and
operators do with them.

Rows are written by the index in the instance's own transaction
(:meth:`SqlIndex.add_instance`, :meth:`SqlIndex.delete`).  A sender
*claims* a batch of due rows of one destination with one ``UPDATE .. WHERE
id IN (SELECT .. FOR UPDATE SKIP LOCKED)``: the rows get a claim token and
their ``next_attempt_at`` moves past a lease, so no other sender, in this
process or on another node, takes them meanwhile; only the token's holder
may then mark them (delivered, retry later, parked).  A sender that dies
leaves its rows to be claimed again when the lease has run out: delivery is
at least once, never lost.

States: ``queued`` (to send, or being sent if claimed), ``delivered``,
``parked`` (a permanent failure with the upstream's reason, kept until an
operator re-queues it), ``superseded`` (a store entry whose instance was
deleted here before it could be sent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from appliance.config import ForwardConfig
from appliance.errors import IndexUnavailable
from appliance.forward.routes import matches
from appliance.index.engine import as_utc, write_transaction
from appliance.index.engine import describe_failure as _describe
from appliance.index.schema import DEFAULT_PARTITION_KEY, forward_entry, instance, series, study

#: ``last_error`` is at most this long (its column's size).
_ERROR_MAX = 1024
#: Rows per statement when a list of ids goes into ``IN (...)``.
_CHUNK = 500


class EntryState(enum.StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    PARKED = "parked"
    SUPERSEDED = "superseded"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One outbox row, as claimed."""

    id: int
    destination: str
    action: str  # store | delete
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    attempts: int
    created_at: dt.datetime
    #: the data partition of the instance
    partition_key: int = DEFAULT_PARTITION_KEY


@dataclasses.dataclass(frozen=True)
class Claim:
    """A batch of entries held by one sender until it marks them."""

    token: str
    entries: list[Entry]


@dataclasses.dataclass(frozen=True)
class DestinationStatus:
    """What a destination's outbox holds (``forward status``)."""

    name: str
    queued: int = 0
    in_flight: int = 0
    delivered: int = 0
    parked: int = 0
    superseded: int = 0
    #: seconds since the oldest queued entry was made, or None
    oldest_queued_age: float | None = None
    #: the newest error of a queued or parked entry, or None
    last_error: str | None = None
    last_error_at: dt.datetime | None = None

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["last_error_at"] = self.last_error_at.isoformat() if self.last_error_at else None
        return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Outbox:
    """The forwarding outbox of the index database behind *engine*."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---------------------------------------------------------------- senders

    def claim(
        self, destination: str, limit: int, lease: dt.timedelta, now: dt.datetime | None = None
    ) -> Claim | None:
        """Up to *limit* due queued entries of *destination*, oldest first,
        held for *lease*; None if there are none."""
        now = now or _now()
        token = uuid.uuid4().hex
        due = (
            select(forward_entry.c.id)
            .where(
                forward_entry.c.destination == destination,
                forward_entry.c.state == EntryState.QUEUED.value,
                forward_entry.c.next_attempt_at <= now,
            )
            .order_by(forward_entry.c.id)
            .limit(limit)
            # PostgreSQL: rows another sender is claiming right now are
            # skipped, not waited for (SQLite serialises writers anyway)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(forward_entry)
            .where(forward_entry.c.id.in_(due.scalar_subquery()))
            .values(claim_token=token, next_attempt_at=now + lease, updated_at=now)
            .returning(
                forward_entry.c.id,
                forward_entry.c.destination,
                forward_entry.c.action,
                forward_entry.c.study_instance_uid,
                forward_entry.c.series_instance_uid,
                forward_entry.c.sop_instance_uid,
                forward_entry.c.attempts,
                forward_entry.c.created_at,
                forward_entry.c.partition_key,
            )
        )
        with self._writing() as conn:
            rows = conn.execute(statement).all()
        if not rows:
            return None
        entries = sorted(
            (
                Entry(
                    id=int(row.id),
                    destination=row.destination,
                    action=row.action,
                    study_instance_uid=row.study_instance_uid,
                    series_instance_uid=row.series_instance_uid,
                    sop_instance_uid=row.sop_instance_uid,
                    attempts=int(row.attempts),
                    created_at=as_utc(row.created_at),
                    partition_key=int(row.partition_key),
                )
                for row in rows
            ),
            key=lambda e: e.id,
        )
        return Claim(token, entries)

    def delivered(self, token: str, ids: Iterable[int]) -> int:
        """Mark entries of claim *token* delivered; how many were (an entry
        whose claim ran out and was taken by another sender is not)."""
        return self._mark(token, ids, state=EntryState.DELIVERED, error=None)

    def superseded(self, token: str, ids: Iterable[int], reason: str) -> int:
        """Mark store entries whose instance is gone as superseded."""
        return self._mark(token, ids, state=EntryState.SUPERSEDED, error=reason)

    def park(self, token: str, ids: Iterable[int], reason: str) -> int:
        """Mark entries parked: a permanent failure, with *reason*."""
        return self._mark(token, ids, state=EntryState.PARKED, error=reason, attempt=True)

    def retry(self, token: str, ids: Iterable[int], reason: str, at: dt.datetime) -> int:
        """Release entries to be tried again at *at*, keeping *reason*."""
        return self._mark(
            token, ids, state=EntryState.QUEUED, error=reason, attempt=True, next_attempt_at=at
        )

    def _mark(
        self,
        token: str,
        ids: Iterable[int],
        *,
        state: EntryState,
        error: str | None,
        attempt: bool = False,
        next_attempt_at: dt.datetime | None = None,
    ) -> int:
        now = _now()
        values: dict[str, Any] = {
            "state": state.value,
            "claim_token": None,
            "updated_at": now,
            "last_error": None if error is None else error[:_ERROR_MAX],
        }
        if attempt:
            values["attempts"] = forward_entry.c.attempts + 1
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        wanted = sorted(set(ids))
        count = 0
        with self._writing() as conn:
            for start in range(0, len(wanted), _CHUNK):
                result = conn.execute(
                    update(forward_entry)
                    .where(
                        forward_entry.c.id.in_(wanted[start : start + _CHUNK]),
                        forward_entry.c.claim_token == token,
                    )
                    .values(**values)
                )
                count += result.rowcount
        return count

    # -------------------------------------------------------------- operators

    def status(
        self, destinations: Sequence[str], now: dt.datetime | None = None
    ) -> list[DestinationStatus]:
        """Counts per state, in-flight entries (claimed, lease running), the
        age of the oldest queued entry and the last error, per destination
        (in the order given; one with no entries has zeros)."""
        now = now or _now()
        queued = forward_entry.c.state == EntryState.QUEUED.value
        in_flight = and_(queued, forward_entry.c.claim_token.is_not(None))
        counts = (
            select(
                forward_entry.c.destination,
                forward_entry.c.state,
                func.count(),
                func.sum(case((in_flight, 1), else_=0)),
                func.min(case((queued, forward_entry.c.created_at), else_=None)),
            )
            .where(forward_entry.c.destination.in_(list(destinations)))
            .group_by(forward_entry.c.destination, forward_entry.c.state)
        )
        latest_error = (
            select(
                forward_entry.c.destination,
                forward_entry.c.last_error,
                forward_entry.c.updated_at,
            )
            .where(
                forward_entry.c.destination.in_(list(destinations)),
                forward_entry.c.state.in_([EntryState.QUEUED.value, EntryState.PARKED.value]),
                forward_entry.c.last_error.is_not(None),
            )
            .order_by(forward_entry.c.updated_at.desc(), forward_entry.c.id.desc())
        )
        found: dict[str, dict[str, Any]] = {name: {} for name in destinations}
        try:
            with self.engine.connect() as conn:
                for name, state, count, flying, oldest in conn.execute(counts):
                    fields = found[name]
                    fields[state] = int(count)
                    if state == EntryState.QUEUED.value:
                        fields["in_flight"] = int(flying or 0)
                        if oldest is not None:
                            age = (now - as_utc(oldest)).total_seconds()
                            fields["oldest_queued_age"] = round(max(age, 0.0), 1)
                for name in destinations:
                    row = conn.execute(
                        latest_error.where(forward_entry.c.destination == name).limit(1)
                    ).first()
                    if row is not None:
                        found[name]["last_error"] = row.last_error
                        found[name]["last_error_at"] = as_utc(row.updated_at)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return [DestinationStatus(name, **found[name]) for name in destinations]

    def waiting_errors(self, destinations: Sequence[str]) -> dict[str, str | None]:
        """Per destination, the newest error of a queued entry (one waiting
        to be tried again after a failure), or None: what ``/health/ready``
        reports, read through the (destination, state) index without
        counting the outbox (delivered entries are kept and many)."""
        found: dict[str, str | None] = {}
        try:
            with self.engine.connect() as conn:
                for name in destinations:
                    found[name] = conn.execute(
                        select(forward_entry.c.last_error)
                        .where(
                            forward_entry.c.destination == name,
                            forward_entry.c.state == EntryState.QUEUED.value,
                            forward_entry.c.last_error.is_not(None),
                        )
                        .order_by(forward_entry.c.updated_at.desc())
                        .limit(1)
                    ).scalar()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return found

    def requeue_parked(self, destination: str) -> int:
        """Queue every parked entry of *destination* again, due now, its
        attempts counted from zero; how many."""
        now = _now()
        with self._writing() as conn:
            result = conn.execute(
                update(forward_entry)
                .where(
                    forward_entry.c.destination == destination,
                    forward_entry.c.state == EntryState.PARKED.value,
                )
                .values(
                    state=EntryState.QUEUED.value,
                    attempts=0,
                    next_attempt_at=now,
                    claim_token=None,
                    updated_at=now,
                )
            )
            return int(result.rowcount)

    def replay(self, destination: ForwardConfig, since: dt.datetime) -> int:
        """Queue, for *destination*, every instance stored (created or
        replaced) at or after *since* that its filters take (the calling AE
        title: the one the index kept, "" for STOW-RS and import and for
        instances stored before migration 0009); how many."""
        now = _now()
        page = (
            select(
                instance.c.id,
                study.c.study_instance_uid,
                series.c.series_instance_uid,
                instance.c.sop_instance_uid,
                series.c.modality,
                instance.c.sop_class_uid,
                instance.c.source_ae,
                instance.c.partition_key,
            )
            .select_from(instance.join(series, instance.c.series_fk == series.c.id))
            .join(study, instance.c.study_fk == study.c.id)
            .where(instance.c.updated_at >= since)
            .order_by(instance.c.id)
            .limit(_CHUNK)
        )
        queued, after = 0, 0
        while True:
            with self._writing() as conn:
                found = conn.execute(page.where(instance.c.id > after)).all()
                rows = [
                    {
                        "destination": destination.name,
                        "action": "store",
                        "study_instance_uid": st,
                        "series_instance_uid": se,
                        "sop_instance_uid": sop,
                        "partition_key": partition_key,
                        "state": EntryState.QUEUED.value,
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for _, st, se, sop, modality, sop_class, source_ae, partition_key in found
                    if matches(destination, modality or "", sop_class, source_ae)
                ]
                if rows:
                    conn.execute(insert(forward_entry), rows)
            queued += len(rows)
            if len(found) < _CHUNK:
                return queued
            after = found[-1][0]

    # ---------------------------------------------------------------- helpers

    def _writing(self) -> contextlib.AbstractContextManager[Connection]:
        return write_transaction(self.engine)
