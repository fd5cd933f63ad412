"""DICOMcast's durable queue: the change-feed cursor and the studies to
publish (``feed_cursor`` row "fhir", ``fhir_study`` rows).

A *pull* reads the change feed after the cursor and, in the same
transaction, queues each study it names and moves the cursor: a crash
loses nothing (the changes are read again, or their studies are queued).
Pulls are serialised by a lock on the cursor row, so nodes sharing the
index can all run one.  A *sender* claims due studies (like the forwarding
outbox: a claim token and a lease; ``FOR UPDATE SKIP LOCKED``), publishes
each, and marks it synced, parked or to be tried again.

A study that changes again is queued again, and a claim on it (a sender
publishing the older state) is taken away: that sender's mark then misses,
and the newest state is published after ``settle_seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from appliance.errors import IndexUnavailable
from appliance.index.engine import as_utc, write_transaction
from appliance.index.schema import DEFAULT_PARTITION_KEY, changefeed, feed_cursor, fhir_study

CURSOR = "fhir"
#: Change-feed rows one pull reads.
PULL_LIMIT = 1000
_ERROR_MAX = 1024
_CHUNK = 500


class StudyState(enum.StrEnum):
    QUEUED = "queued"
    SYNCED = "synced"
    PARKED = "parked"


@dataclasses.dataclass(frozen=True)
class QueuedStudy:
    study_instance_uid: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class StudyClaim:
    token: str
    studies: list[QueuedStudy]


@dataclasses.dataclass(frozen=True)
class FhirStatus:
    """What DICOMcast has done and has to do (``fhir status``)."""

    url: str
    #: the last change-feed sequence taken in, and the newest there is
    cursor: int = 0
    latest: int = 0
    queued: int = 0
    in_flight: int = 0
    synced: int = 0
    parked: int = 0
    oldest_queued_age: float | None = None
    last_error: str | None = None
    last_error_at: dt.datetime | None = None

    @property
    def behind(self) -> int:
        """Change-feed entries not yet taken in."""
        return max(self.latest - self.cursor, 0)

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["behind"] = self.behind
        out["last_error_at"] = self.last_error_at.isoformat() if self.last_error_at else None
        return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StudyQueue:
    """DICOMcast's cursor and queue in the index database behind *engine*."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ pull

    def pull(self, settle: dt.timedelta, limit: int = PULL_LIMIT) -> int:
        """Queue the studies of up to *limit* changes after the cursor, due
        after *settle*, and move the cursor past them; how many changes."""
        now = _now()
        with self._writing() as conn:
            after = self._lock_cursor(conn)
            rows = conn.execute(
                select(
                    changefeed.c.sequence,
                    changefeed.c.study_instance_uid,
                    changefeed.c.partition_key,
                )
                .where(changefeed.c.sequence > after)
                .order_by(changefeed.c.sequence)
                .limit(limit)
            ).all()
            if not rows:
                return 0
            # DICOMcast publishes the default data partition (README "Data
            # partitions"); the cursor moves past the others' changes
            studies = sorted(
                {
                    row.study_instance_uid
                    for row in rows
                    if row.partition_key == DEFAULT_PARTITION_KEY
                }
            )
            if studies:
                self._queue(conn, studies, now, now + settle)
            conn.execute(
                update(feed_cursor)
                .where(feed_cursor.c.name == CURSOR)
                .values(sequence=rows[-1].sequence, updated_at=now)
            )
        return len(rows)

    def _lock_cursor(self, conn: Connection) -> int:
        """The cursor's sequence, its row locked (PostgreSQL; SQLite's
        write transaction locks the database) until the transaction ends."""
        query = select(feed_cursor.c.sequence).where(feed_cursor.c.name == CURSOR)
        found = conn.execute(query.with_for_update()).scalar()
        if found is not None:
            return int(found)
        dialect: Any = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        conn.execute(
            dialect.insert(feed_cursor)
            .values(name=CURSOR, sequence=0, updated_at=_now())
            .on_conflict_do_nothing(index_elements=[feed_cursor.c.name])
        )
        return int(conn.execute(query.with_for_update()).scalar_one())

    def _queue(
        self, conn: Connection, studies: list[str], now: dt.datetime, due: dt.datetime
    ) -> None:
        for start in range(0, len(studies), _CHUNK):
            chunk = studies[start : start + _CHUNK]
            known = {
                row.study_instance_uid: row
                for row in conn.execute(
                    select(
                        fhir_study.c.study_instance_uid,
                        fhir_study.c.state,
                        fhir_study.c.claim_token,
                    )
                    .where(fhir_study.c.study_instance_uid.in_(chunk))
                    .with_for_update()
                )
            }
            new = [uid for uid in chunk if uid not in known]
            if new:
                conn.execute(
                    insert(fhir_study),
                    [
                        {
                            "study_instance_uid": uid,
                            "state": StudyState.QUEUED.value,
                            "attempts": 0,
                            "next_attempt_at": due,
                            "queued_at": now,
                            "updated_at": now,
                        }
                        for uid in new
                    ],
                )
            waiting = fhir_study.c.state == StudyState.QUEUED.value
            # synced or parked: queued afresh; queued and claimed: taken
            # from its sender; queued and waiting: left as it is (its
            # backoff, if the server is away, goes on)
            again = [
                uid
                for uid, row in known.items()
                if row.state != StudyState.QUEUED.value or row.claim_token is not None
            ]
            if again:
                conn.execute(
                    update(fhir_study)
                    .where(fhir_study.c.study_instance_uid.in_(again))
                    .values(
                        state=StudyState.QUEUED.value,
                        attempts=case((waiting, fhir_study.c.attempts), else_=0),
                        queued_at=case((waiting, fhir_study.c.queued_at), else_=now),
                        last_error=case((waiting, fhir_study.c.last_error), else_=None),
                        claim_token=None,
                        next_attempt_at=due,
                        updated_at=now,
                    )
                )

    # --------------------------------------------------------------- senders

    def claim(self, limit: int, lease: dt.timedelta) -> StudyClaim | None:
        """Up to *limit* due queued studies, held for *lease*."""
        now = _now()
        token = uuid.uuid4().hex
        due = (
            select(fhir_study.c.study_instance_uid)
            .where(
                fhir_study.c.state == StudyState.QUEUED.value,
                fhir_study.c.next_attempt_at <= now,
            )
            .order_by(fhir_study.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(fhir_study)
            .where(fhir_study.c.study_instance_uid.in_(due.scalar_subquery()))
            .values(claim_token=token, next_attempt_at=now + lease, updated_at=now)
            .returning(fhir_study.c.study_instance_uid, fhir_study.c.attempts)
        )
        with self._writing() as conn:
            rows = conn.execute(statement).all()
        if not rows:
            return None
        return StudyClaim(
            token, [QueuedStudy(row.study_instance_uid, int(row.attempts)) for row in rows]
        )

    def synced(self, token: str, study: str, imaging_study: str | None) -> bool:
        """Mark *study* published (False if its claim was taken away)."""
        return self._mark(
            token, study, state=StudyState.SYNCED, error=None, imaging_study=imaging_study
        )

    def park(self, token: str, study: str, reason: str) -> bool:
        return self._mark(token, study, state=StudyState.PARKED, error=reason, attempt=True)

    def retry(self, token: str, study: str, reason: str, at: dt.datetime) -> bool:
        return self._mark(
            token, study, state=StudyState.QUEUED, error=reason, attempt=True, next_attempt_at=at
        )

    def _mark(
        self,
        token: str,
        study: str,
        *,
        state: StudyState,
        error: str | None,
        attempt: bool = False,
        next_attempt_at: dt.datetime | None = None,
        imaging_study: str | None = None,
    ) -> bool:
        values: dict[str, Any] = {
            "state": state.value,
            "claim_token": None,
            "updated_at": _now(),
            "last_error": None if error is None else error[:_ERROR_MAX],
        }
        if attempt:
            values["attempts"] = fhir_study.c.attempts + 1
        else:
            values["attempts"] = 0
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        if imaging_study is not None:
            values["imaging_study"] = imaging_study
        with self._writing() as conn:
            result = conn.execute(
                update(fhir_study)
                .where(
                    fhir_study.c.study_instance_uid == study,
                    fhir_study.c.claim_token == token,
                )
                .values(**values)
            )
        return bool(result.rowcount)

    # ------------------------------------------------------------- operators

    def status(self, url: str) -> FhirStatus:
        now = _now()
        queued = fhir_study.c.state == StudyState.QUEUED.value
        counts = select(
            fhir_study.c.state,
            func.count(),
            func.sum(case((and_(queued, fhir_study.c.claim_token.is_not(None)), 1), else_=0)),
            func.min(case((queued, fhir_study.c.queued_at), else_=None)),
        ).group_by(fhir_study.c.state)
        latest_error = (
            select(fhir_study.c.last_error, fhir_study.c.updated_at)
            .where(
                fhir_study.c.state.in_([StudyState.QUEUED.value, StudyState.PARKED.value]),
                fhir_study.c.last_error.is_not(None),
            )
            .order_by(fhir_study.c.updated_at.desc())
            .limit(1)
        )
        fields: dict[str, Any] = {}
        try:
            with self.engine.connect() as conn:
                for state, count, flying, oldest in conn.execute(counts):
                    fields[state] = int(count)
                    if state == StudyState.QUEUED.value:
                        fields["in_flight"] = int(flying or 0)
                        if oldest is not None:
                            age = (now - as_utc(oldest)).total_seconds()
                            fields["oldest_queued_age"] = round(max(age, 0.0), 1)
                row = conn.execute(latest_error).first()
                if row is not None:
                    fields["last_error"] = row.last_error
                    fields["last_error_at"] = as_utc(row.updated_at)
                cursor = conn.execute(
                    select(feed_cursor.c.sequence).where(feed_cursor.c.name == CURSOR)
                ).scalar()
                latest = conn.execute(select(func.max(changefeed.c.sequence))).scalar()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({exc.__class__.__name__})") from exc
        return FhirStatus(url, cursor=int(cursor or 0), latest=int(latest or 0), **fields)

    def waiting_error(self) -> str | None:
        """The newest error of a queued study (waiting to be tried again
        after a failure), or None: what ``/health/ready`` reports."""
        try:
            with self.engine.connect() as conn:
                found = conn.execute(
                    select(fhir_study.c.last_error)
                    .where(
                        fhir_study.c.state == StudyState.QUEUED.value,
                        fhir_study.c.last_error.is_not(None),
                    )
                    .order_by(fhir_study.c.updated_at.desc())
                    .limit(1)
                ).scalar()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({exc.__class__.__name__})") from exc
        return None if found is None else str(found)

    def requeue_parked(self) -> int:
        """Queue every parked study again, due now; how many."""
        now = _now()
        with self._writing() as conn:
            result = conn.execute(
                update(fhir_study)
                .where(fhir_study.c.state == StudyState.PARKED.value)
                .values(
                    state=StudyState.QUEUED.value,
                    attempts=0,
                    next_attempt_at=now,
                    claim_token=None,
                    queued_at=now,
                    updated_at=now,
                )
            )
            return int(result.rowcount)

    def replay(self, since: dt.datetime | None = None) -> int:
        """Move the cursor back to just before the first change at or after
        *since* (None: the start of the feed), so that every study changed
        since is published again; how many changes will be read again."""
        with self._writing() as conn:
            self._lock_cursor(conn)
            first = select(func.min(changefeed.c.sequence))
            if since is not None:
                first = first.where(changefeed.c.timestamp >= since.astimezone(dt.UTC))
            start = conn.execute(first).scalar()
            latest = int(conn.execute(select(func.max(changefeed.c.sequence))).scalar() or 0)
            position = latest if start is None else int(start) - 1
            conn.execute(
                update(feed_cursor)
                .where(feed_cursor.c.name == CURSOR)
                .values(sequence=position, updated_at=_now())
            )
        return latest - position

    # --------------------------------------------------------------- helpers

    def _writing(self) -> contextlib.AbstractContextManager[Connection]:
        return write_transaction(self.engine)
