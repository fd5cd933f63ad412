"""Storage Commitment (PS3.4 Annex J): a durable outbox of commitment results.

A Storage Commitment request (the N-ACTION of the Push Model, PS3.4 J.3.2)
is recorded here, in the index database, together with its result, before the
request is acknowledged; the result is then delivered as an N-EVENT-REPORT
(PS3.4 J.3.3) by a worker of the DIMSE edge, which claims due reports, sends
them, and marks them delivered, or failed with a retry time.  Nothing is
dropped: a report that cannot be delivered stays ``pending`` and is retried
with an exponential back-off, across restarts (it is a row), until
:attr:`RetrySchedule.give_up_after` has passed since the request; then it
becomes ``failed``, with the last error kept in the row.

**What "committed" means** (PS3.4 J.3.6.2.1 asks the SCP to say it): an
instance is committed when the index holds it with the SOP Class UID the
request names.  The index holds an instance only after its blob was durably
written and the index transaction committed (the acknowledgement promise of
the ingest pipeline), so a committed instance is on disk, blob and row, and
stays until someone deletes it explicitly.  The result is assessed once,
when the request is received (PS3.4 J.3.2.1.3 Note 2), and every retry
delivers that same result.

Failure reasons (PS3.3 C.14.1.1, Failure Reason (0008,1197)):

- ``0x0112`` no such object instance: the SOP Instance UID is not in the index;
- ``0x0119`` class/instance conflict: it is stored under another SOP Class UID;
- ``0x0131`` duplicate transaction UID: every item of a request whose
  Transaction UID was already used by a *different* request (other
  instances or another requester).  The same request sent again (same
  requester, same instances, same order; e.g. an SCU that lost our N-ACTION
  response) is not a duplicate: it is answered as the first one was, and no
  second report is made.

Several DIMSE processes may share the outbox: a report is *claimed* with one
``UPDATE .. WHERE state = 'pending' AND next_attempt_at <= now`` that moves
``next_attempt_at`` past a lease (:data:`CLAIM_LEASE`) and sets a claim token;
only the claimer (rowcount 1) delivers it, and only the holder of the token
may mark it.  A claimer that dies leaves the report to be claimed again once
the lease has run out.

No pynetdicom here: the DIMSE edge turns results into data sets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from appliance.dicomio import is_valid_uid
from appliance.errors import ApplianceError, IndexUnavailable
from appliance.index.engine import WRITE, as_utc
from appliance.index.engine import describe_failure as _describe
from appliance.index.schema import (
    DEFAULT_PARTITION_KEY,
    commitment_report,
    forward_entry,
    instance,
)
from appliance.status import Status

log = logging.getLogger(__name__)

#: How long a claim keeps other workers off a report: longer than one
#: delivery can take (connect, association and DIMSE timeouts, twice).
CLAIM_LEASE = dt.timedelta(minutes=10)
#: The most SOP Instances one request may reference; more is refused with
#: 0x0213 Resource limitation (PS3.7 10.1.4.1.10).
MAX_ITEMS = 50_000
#: PostgreSQL advisory lock key that serialises request recording ("DCMC"),
#: so that two requests with one Transaction UID are told apart.
_REQUEST_LOCK = 0x44434D43
#: SOP Instance UIDs per IN (...) list.
_CHUNK = 500
#: Event Type IDs of the Storage Commitment Result (PS3.4 J.3.3, Table J.3-2).
EVENT_SUCCESSFUL = 1
EVENT_FAILURES_EXIST = 2


class ReportState(enum.Enum):
    """Where a report's delivery stands (``waiting``: its result waits for
    the instances' delivery upstream, see :meth:`CommitmentOutbox.settle_waiting`)."""

    WAITING = "waiting"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class InvalidCommitmentRequest(ApplianceError):
    """The request cannot be processed as given (PS3.7 10.1.4.1.10)."""

    status = Status.INVALID_ARGUMENT_VALUE


@dataclasses.dataclass(frozen=True)
class Reference:
    """One SOP Instance named by a request: (SOP Class UID, SOP Instance UID)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclasses.dataclass(frozen=True)
class FailedReference:
    """A referenced SOP Instance that is not committed, and why (PS3.3 C.14.1.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    reason: Status


@dataclasses.dataclass(frozen=True)
class CommitmentResult:
    """The result of one request: each referenced instance, in request order,
    either committed or failed."""

    committed: tuple[Reference, ...]
    failed: tuple[FailedReference, ...]

    @property
    def event_type(self) -> int:
        """1 (storage commitment request successful) or 2 (failures exist),
        PS3.4 J.3.3.1.2."""
        return EVENT_FAILURES_EXIST if self.failed else EVENT_SUCCESSFUL

    def to_json(self) -> str:
        return json.dumps(
            {
                "committed": [[r.sop_class_uid, r.sop_instance_uid] for r in self.committed],
                "failed": [
                    [f.sop_class_uid, f.sop_instance_uid, int(f.reason)] for f in self.failed
                ],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> CommitmentResult:
        data = json.loads(text)
        return cls(
            committed=tuple(Reference(c, i) for c, i in data["committed"]),
            failed=tuple(FailedReference(c, i, Status(r)) for c, i, r in data["failed"]),
        )


@dataclasses.dataclass(frozen=True)
class CommitmentReport:
    """One row of the outbox."""

    id: int
    transaction_uid: str
    requester_ae: str
    result: CommitmentResult
    state: ReportState
    attempts: int
    next_attempt_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    claim_token: str | None = None
    last_error: str | None = None
    #: "same" or "new" (association), once delivered
    delivered_via: str | None = None
    #: the [[forward]] destination a waiting report awaits
    await_destination: str | None = None
    #: the data partition whose instances the request was assessed against
    partition_key: int = DEFAULT_PARTITION_KEY


@dataclasses.dataclass(frozen=True)
class RequestOutcome:
    """What :meth:`CommitmentOutbox.request` did."""

    report_id: int
    #: the same request was recorded before: no new report was made
    repeated: bool
    result: CommitmentResult


@dataclasses.dataclass(frozen=True)
class RetrySchedule:
    """When to try a report again: *first_delay* after the first failed
    attempt, doubling up to *max_delay*; no more attempts once
    *give_up_after* has passed since the request."""

    first_delay: dt.timedelta = dt.timedelta(seconds=10)
    max_delay: dt.timedelta = dt.timedelta(minutes=10)
    give_up_after: dt.timedelta = dt.timedelta(hours=24)

    def delay(self, attempts: int) -> dt.timedelta:
        """The wait after the *attempts*-th failed attempt (1, 2, ...)."""
        exponent = min(max(attempts - 1, 0), 30)
        return min(self.first_delay * (1 << exponent), self.max_delay)

    def next_attempt(
        self, attempts: int, created_at: dt.datetime, now: dt.datetime
    ) -> dt.datetime | None:
        """When to try again after *attempts* failed attempts, or None to
        give up (the request is older than *give_up_after*)."""
        if now - created_at >= self.give_up_after:
            return None
        return now + self.delay(attempts)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _digest(requester_ae: str, items: Sequence[Reference]) -> str:
    payload = json.dumps(
        [requester_ae, [[r.sop_class_uid, r.sop_instance_uid] for r in items]],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("ascii", "replace")).hexdigest()


def _validate(transaction_uid: str, requester_ae: str, items: Sequence[Reference]) -> None:
    if not is_valid_uid(transaction_uid):
        raise InvalidCommitmentRequest("Transaction UID (0008,1195) is not a valid UID")
    if not requester_ae or len(requester_ae) > 16:
        raise InvalidCommitmentRequest("the requester's AE title is empty or too long")
    if not items:
        raise InvalidCommitmentRequest("Referenced SOP Sequence (0008,1199) is empty")
    if len(items) > MAX_ITEMS:
        raise InvalidCommitmentRequest(
            f"more than {MAX_ITEMS} referenced instances", status=Status.RESOURCE_LIMITATION
        )
    for number, item in enumerate(items, start=1):
        for uid, keyword in (
            (item.sop_class_uid, "Referenced SOP Class UID"),
            (item.sop_instance_uid, "Referenced SOP Instance UID"),
        ):
            if not is_valid_uid(uid):
                raise InvalidCommitmentRequest(
                    f"item {number} of Referenced SOP Sequence: {keyword} is not a valid UID"
                )


_LOCK_STATEMENT = select(func.pg_advisory_xact_lock(_REQUEST_LOCK))
_COLUMNS = (
    commitment_report.c.id,
    commitment_report.c.transaction_uid,
    commitment_report.c.requester_ae,
    commitment_report.c.result,
    commitment_report.c.state,
    commitment_report.c.attempts,
    commitment_report.c.next_attempt_at,
    commitment_report.c.created_at,
    commitment_report.c.updated_at,
    commitment_report.c.claim_token,
    commitment_report.c.last_error,
    commitment_report.c.delivered_via,
    commitment_report.c.await_destination,
    commitment_report.c.partition_key,
)


def _report(row: Any) -> CommitmentReport:
    return CommitmentReport(
        id=row.id,
        transaction_uid=row.transaction_uid,
        requester_ae=row.requester_ae,
        result=CommitmentResult.from_json(row.result),
        state=ReportState(row.state),
        attempts=row.attempts,
        next_attempt_at=as_utc(row.next_attempt_at),
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        claim_token=row.claim_token,
        last_error=row.last_error,
        delivered_via=row.delivered_via,
        await_destination=row.await_destination,
        partition_key=int(row.partition_key),
    )


class CommitmentOutbox:
    """The Storage Commitment requests, their results and their delivery,
    in the index database (table ``commitment_report``).

    Parameters
    ----------
    engine
        The index engine (SQLite or PostgreSQL, migrated).
    lease
        How long a claim keeps other workers off a report.
    """

    def __init__(self, engine: Engine, *, lease: dt.timedelta = CLAIM_LEASE) -> None:
        self.engine = engine
        self.lease = lease

    # ---------------------------------------------------------------- request

    def request(
        self,
        transaction_uid: str,
        requester_ae: str,
        items: Sequence[Reference],
        now: dt.datetime | None = None,
        await_destination: str | None = None,
        partition_key: int = DEFAULT_PARTITION_KEY,
    ) -> RequestOutcome:
        """Record a Storage Commitment request and its result, durably, in
        one transaction; the report is due at once, or, with
        *await_destination* and instances stored here, once they are
        delivered to that forwarding destination (state ``waiting``, see
        :meth:`settle_waiting`).

        Parameters
        ----------
        transaction_uid
            Transaction UID (0008,1195) of the request.
        requester_ae
            The AE title of the SCU (where the report goes).
        items
            The Referenced SOP Sequence (0008,1199), in request order.
        now
            The time of the request (default: the clock).
        await_destination
            The ``[[forward]]`` destination whose confirmed delivery an
            instance needs before it is reported committed.
        partition_key
            The data partition the instances must be stored in (the
            requesting association's, :mod:`dimse_bridge.partitions`).

        Returns
        -------
        RequestOutcome
            The report's id, whether the request was a repeat of one already
            recorded (then nothing was written), and its result.

        Raises
        ------
        InvalidCommitmentRequest
            for a malformed Transaction UID or reference, no reference, or
            more than :data:`MAX_ITEMS` of them (status ``0x0213``).
        IndexUnavailable
            if the database failed; nothing was recorded.
        """
        requester_ae = requester_ae.strip()
        _validate(transaction_uid, requester_ae, items)
        now = now or _now()
        digest = _digest(requester_ae, items)
        try:
            with self._writing() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(_LOCK_STATEMENT)
                earlier = conn.execute(
                    select(
                        commitment_report.c.id,
                        commitment_report.c.request_digest,
                        commitment_report.c.result,
                    ).where(commitment_report.c.transaction_uid == transaction_uid)
                ).all()
                for row in earlier:
                    if row.request_digest == digest:
                        return RequestOutcome(
                            row.id, repeated=True, result=CommitmentResult.from_json(row.result)
                        )
                if earlier:
                    result = CommitmentResult(
                        committed=(),
                        failed=tuple(
                            FailedReference(
                                r.sop_class_uid,
                                r.sop_instance_uid,
                                Status.DUPLICATE_TRANSACTION_UID,
                            )
                            for r in items
                        ),
                    )
                else:
                    result = self._assess(conn, items, partition_key)
                waits = bool(await_destination and result.committed)
                inserted = conn.execute(
                    insert(commitment_report).values(
                        transaction_uid=transaction_uid,
                        requester_ae=requester_ae,
                        request_digest=digest,
                        event_type=result.event_type,
                        result=result.to_json(),
                        state=(ReportState.WAITING if waits else ReportState.PENDING).value,
                        await_destination=await_destination if waits else None,
                        partition_key=partition_key,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                )
                key = inserted.inserted_primary_key
                assert key is not None  # a single-row INSERT
                report_id = int(key[0])
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return RequestOutcome(report_id, repeated=False, result=result)

    def _assess(
        self, conn: Connection, items: Sequence[Reference], partition_key: int
    ) -> CommitmentResult:
        """Committed: in the index, in *partition_key*, under the SOP Class
        named (PS3.3 C.14.1.1 for the failure reasons)."""
        uids = sorted({r.sop_instance_uid for r in items})
        stored: dict[str, str] = {}
        for start in range(0, len(uids), _CHUNK):
            chunk = uids[start : start + _CHUNK]
            rows = conn.execute(
                select(instance.c.sop_instance_uid, instance.c.sop_class_uid).where(
                    instance.c.sop_instance_uid.in_(chunk),
                    instance.c.partition_key == partition_key,
                )
            )
            stored.update({row.sop_instance_uid: row.sop_class_uid for row in rows})
        committed: list[Reference] = []
        failed: list[FailedReference] = []
        for ref in items:
            stored_class = stored.get(ref.sop_instance_uid)
            if stored_class is None:
                failed.append(
                    FailedReference(
                        ref.sop_class_uid, ref.sop_instance_uid, Status.NO_SUCH_OBJECT_INSTANCE
                    )
                )
            elif stored_class != ref.sop_class_uid:
                failed.append(
                    FailedReference(
                        ref.sop_class_uid, ref.sop_instance_uid, Status.CLASS_INSTANCE_CONFLICT
                    )
                )
            else:
                committed.append(ref)
        return CommitmentResult(tuple(committed), tuple(failed))

    # ------------------------------------------------ waiting for forwarding

    def settle_waiting(
        self, wait_limit: dt.timedelta, now: dt.datetime | None = None, limit: int = 100
    ) -> int:
        """Settle the waiting reports whose instances' forwarding is decided;
        how many were settled (made ``pending``, due at once).

        For each instance the result holds as committed, the outbox entries
        of ``await_destination`` decide: one delivered keeps it committed;
        only parked or superseded ones make it failed (0x0110 processing
        failure, PS3.3 C.14.1.1); queued ones, or none yet, keep the report
        waiting, until *wait_limit* has passed since the request, when what
        is still undelivered fails too.  The settled result is final: every
        delivery attempt sends it.
        """
        now = now or _now()
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(*_COLUMNS)
                    .where(commitment_report.c.state == ReportState.WAITING.value)
                    .order_by(commitment_report.c.id)
                    .limit(limit)
                ).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        settled = 0
        for report in map(_report, rows):
            result = self._forwarded(report, now - report.created_at >= wait_limit)
            if result is not None and self._settle(report, result, now):
                settled += 1
        return settled

    def _forwarded(self, report: CommitmentReport, expired: bool) -> CommitmentResult | None:
        """The result of *report* as its destination's deliveries decide it,
        or None while some are undecided (and the wait is not over)."""
        destination = report.await_destination or ""
        uids = sorted({r.sop_instance_uid for r in report.result.committed})
        states: dict[str, set[str]] = {}
        try:
            with self.engine.connect() as conn:
                for start in range(0, len(uids), _CHUNK):
                    rows = conn.execute(
                        select(forward_entry.c.sop_instance_uid, forward_entry.c.state).where(
                            forward_entry.c.destination == destination,
                            forward_entry.c.action == "store",
                            forward_entry.c.partition_key == report.partition_key,
                            forward_entry.c.sop_instance_uid.in_(uids[start : start + _CHUNK]),
                        )
                    )
                    for uid, state in rows:
                        states.setdefault(uid, set()).add(state)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        committed: list[Reference] = []
        failed = list(report.result.failed)
        for ref in report.result.committed:
            found = states.get(ref.sop_instance_uid, set())
            if "delivered" in found:
                committed.append(ref)
            elif (found and found <= {"parked", "superseded"}) or expired:
                failed.append(
                    FailedReference(
                        ref.sop_class_uid, ref.sop_instance_uid, Status.PROCESSING_FAILURE
                    )
                )
            else:
                return None  # still queued, or not queued yet: wait
        return CommitmentResult(tuple(committed), tuple(failed))

    def _settle(self, report: CommitmentReport, result: CommitmentResult, now: dt.datetime) -> bool:
        statement = (
            update(commitment_report)
            .where(
                commitment_report.c.id == report.id,
                commitment_report.c.state == ReportState.WAITING.value,
            )
            .values(
                state=ReportState.PENDING.value,
                result=result.to_json(),
                event_type=result.event_type,
                next_attempt_at=now,
                updated_at=now,
            )
        )
        try:
            with self._writing() as conn:
                done = bool(conn.execute(statement).rowcount == 1)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        if done:
            log.info(
                "storage commitment %s settled by forwarding to %s: %d committed, %d failed",
                report.transaction_uid,
                report.await_destination,
                len(result.committed),
                len(result.failed),
            )
        return done

    # --------------------------------------------------------------- delivery

    def due(self, now: dt.datetime | None = None, limit: int = 100) -> list[int]:
        """Ids of pending reports whose next attempt is due, oldest first
        (not claimed: see :meth:`claim`)."""
        now = now or _now()
        query = (
            select(commitment_report.c.id)
            .where(
                commitment_report.c.state == ReportState.PENDING.value,
                commitment_report.c.next_attempt_at <= now,
            )
            .order_by(commitment_report.c.next_attempt_at, commitment_report.c.id)
            .limit(limit)
        )
        try:
            with self.engine.connect() as conn:
                return [int(row.id) for row in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def claim(self, report_id: int, now: dt.datetime | None = None) -> CommitmentReport | None:
        """Take report *report_id* for one delivery attempt, or None if it is
        not due or another worker took it first.

        The attempt is counted, the report is kept from other workers for
        :attr:`lease`, and the returned report carries the claim token that
        :meth:`mark_delivered` and :meth:`mark_failed` need.
        """
        now = now or _now()
        token = uuid.uuid4().hex
        statement = (
            update(commitment_report)
            .where(
                commitment_report.c.id == report_id,
                commitment_report.c.state == ReportState.PENDING.value,
                commitment_report.c.next_attempt_at <= now,
            )
            .values(
                claim_token=token,
                attempts=commitment_report.c.attempts + 1,
                next_attempt_at=now + self.lease,
                updated_at=now,
            )
        )
        try:
            with self._writing() as conn:
                if conn.execute(statement).rowcount != 1:
                    return None
                row = conn.execute(
                    select(*_COLUMNS).where(commitment_report.c.id == report_id)
                ).one()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return _report(row)

    def claim_due(
        self, now: dt.datetime | None = None, limit: int = 100
    ) -> Iterator[CommitmentReport]:
        """Claim the due reports one by one (each just before it is yielded,
        so a slow delivery does not let the others' claims age)."""
        for report_id in self.due(now, limit):
            report = self.claim(report_id)
            if report is not None:
                yield report

    def mark_delivered(
        self, report: CommitmentReport, via: str, now: dt.datetime | None = None
    ) -> bool:
        """The report was delivered (*via* ``"same"`` or ``"new"``
        association).  False if the claim was lost (another worker holds it)."""
        return self._finish(
            report,
            now,
            state=ReportState.DELIVERED.value,
            delivered_via=via,
            claim_token=None,
        )

    def mark_failed(
        self,
        report: CommitmentReport,
        error: str,
        retry_at: dt.datetime | None,
        now: dt.datetime | None = None,
    ) -> bool:
        """An attempt failed with *error*: try again at *retry_at*, or, when
        it is None, never (state ``failed``).  False if the claim was lost."""
        values: dict[str, Any] = {"last_error": error[:1024], "claim_token": None}
        if retry_at is None:
            values["state"] = ReportState.FAILED.value
        else:
            values["next_attempt_at"] = retry_at
        return self._finish(report, now, **values)

    def _finish(self, report: CommitmentReport, now: dt.datetime | None, **values: Any) -> bool:
        statement = (
            update(commitment_report)
            .where(
                commitment_report.c.id == report.id,
                commitment_report.c.state == ReportState.PENDING.value,
                commitment_report.c.claim_token == report.claim_token,
            )
            .values(updated_at=now or _now(), **values)
        )
        try:
            with self._writing() as conn:
                return bool(conn.execute(statement).rowcount == 1)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    # ------------------------------------------------------------------ reads

    def get(self, report_id: int) -> CommitmentReport | None:
        """The report with that id, or None."""
        return next(iter(self._select(commitment_report.c.id == report_id)), None)

    def reports(self, transaction_uid: str) -> list[CommitmentReport]:
        """The reports of one Transaction UID, oldest first."""
        return self._select(commitment_report.c.transaction_uid == transaction_uid)

    def counts(self) -> dict[str, int]:
        """Reports per state (every state present, zero included)."""
        query = select(commitment_report.c.state, func.count()).group_by(commitment_report.c.state)
        try:
            with self.engine.connect() as conn:
                found = {str(state): int(count) for state, count in conn.execute(query)}
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return {state.value: found.get(state.value, 0) for state in ReportState}

    def _select(self, condition: Any) -> list[CommitmentReport]:
        query = select(*_COLUMNS).where(condition).order_by(commitment_report.c.id)
        try:
            with self.engine.connect() as conn:
                return [_report(row) for row in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A connection in a write transaction (SQLite: BEGIN IMMEDIATE),
        committed on success, rolled back on error."""
        with self.engine.connect() as conn:
            conn.execution_options(**WRITE)
            with conn.begin():
                yield conn
