"""The SQL index: writes of the ingest pipeline and the look-ups around them.

Every write is one transaction: the patient/study/series rows (created on
first sight), the instance row, the counters and the change-feed entry commit
together or not at all.  Concurrent writers are safe: SQLite writers take the
write lock at BEGIN; on PostgreSQL, parent rows are created with
``INSERT .. ON CONFLICT DO NOTHING`` and a lost race on the SOP Instance UID's
unique key is retried once as the duplicate it now is.

An index object is bound to one data partition (:meth:`SqlIndex.in_partition`;
the default partition unless told otherwise): its look-ups and writes by UID
see only that partition's rows, so the same UIDs may be stored in two
partitions as two independent records.  The walks over the whole index
(``stored_page``, ``blob_page``, ``blob_keys``, ``count_instances``) and the
change feed (unless asked for one partition) cover every partition.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Engine, bindparam, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from appliance.dicomio import tm_key
from appliance.errors import ApplianceError, IndexUnavailable, InvalidInstance, NotFound
from appliance.index.engine import WRITE, as_utc
from appliance.index.engine import describe_failure as _describe
from appliance.index.schema import (
    DEFAULT_PARTITION_KEY,
    changefeed,
    forward_entry,
    instance,
    patient,
    request_attribute,
    series,
    study,
    task_lease,
)
from appliance.model import InstanceRecord
from appliance.storage.base import BlobInfo

log = logging.getLogger(__name__)

#: How often a writer re-creates parent rows that another writer removed.
_PARENT_ATTEMPTS = 5
#: PostgreSQL advisory lock key that orders change-feed commits ("DCMF").
_FEED_LOCK = 0x44434D46
#: Values per IN (...) list: well under SQLite's 32766 bound parameters.
_CHUNK = 500


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _count_where(table: Any, condition: Any) -> Any:
    """A correlated ``(SELECT count(*) FROM table WHERE condition)``."""
    return select(func.count()).select_from(table).where(condition).scalar_subquery()


class AddOutcome(enum.Enum):
    """What :meth:`SqlIndex.add_instance` did."""

    CREATED = "created"
    #: the SOP Instance UID existed; the stored one was kept (policy "keep")
    DUPLICATE_KEPT = "duplicate-kept"
    #: the SOP Instance UID existed; nothing was changed (policy "reject")
    DUPLICATE_REJECTED = "duplicate-rejected"
    #: the SOP Instance UID existed and now points at the new blob ("replace")
    REPLACED = "replaced"


@dataclasses.dataclass(frozen=True)
class AddResult:
    outcome: AddOutcome
    #: the blob the index no longer references (after REPLACED), to delete
    orphaned_blob_key: str | None = None


@dataclasses.dataclass(frozen=True)
class StoredInstance:
    """Where an instance's bytes are, and what they are."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    number_of_frames: int | None = None
    #: when the instance's bytes were last written (created or replaced)
    updated_at: dt.datetime | None = None
    #: its data partition
    partition_key: int = DEFAULT_PARTITION_KEY


@dataclasses.dataclass(frozen=True)
class ChangeEntry:
    """One change-feed row."""

    sequence: int
    timestamp: dt.datetime
    action: str  # create | delete
    state: str  # current | replaced | deleted
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    #: the data partition of the instance
    partition_key: int = DEFAULT_PARTITION_KEY


#: The change-feed columns of a :class:`ChangeEntry`.
_CHANGE_COLUMNS = tuple(changefeed.c)


def _stored_instances() -> Any:
    """SELECT of :class:`StoredInstance` fields, instances joined to parents,
    in retrieve order: series number, instance number, then arrival."""
    return (
        select(
            instance.c.sop_instance_uid,
            instance.c.sop_class_uid,
            series.c.series_instance_uid,
            study.c.study_instance_uid,
            instance.c.transfer_syntax_uid,
            instance.c.blob_key,
            instance.c.size,
            instance.c.number_of_frames,
            instance.c.updated_at,
            instance.c.partition_key,
        )
        .join(series, series.c.id == instance.c.series_fk)
        .join(study, study.c.id == instance.c.study_fk)
        .order_by(
            series.c.series_number.is_(None),
            series.c.series_number,
            series.c.id,
            instance.c.instance_number.is_(None),
            instance.c.instance_number,
            instance.c.id,
        )
    )


def _hierarchy_conditions(
    partition_key: int, study_uid: str, series_uid: str | None, sop_uid: str | None
) -> list[Any]:
    conditions = [study.c.study_instance_uid == study_uid, study.c.partition_key == partition_key]
    if series_uid is not None:
        conditions.append(series.c.series_instance_uid == series_uid)
    if sop_uid is not None:
        conditions.append(instance.c.sop_instance_uid == sop_uid)
    return conditions


def _what(study_uid: str, series_uid: str | None, sop_uid: str | None) -> str:
    if sop_uid is not None:
        return f"instance {sop_uid} of series {series_uid} of study {study_uid}"
    if series_uid is not None:
        return f"series {series_uid} of study {study_uid}"
    return f"study {study_uid}"


class Busy(ApplianceError):
    """Retention: what was to be deleted is in use (see :meth:`SqlIndex.delete`)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _instance_values(record: InstanceRecord, blob: BlobInfo, now: dt.datetime) -> dict[str, Any]:
    """The instance row's own columns (not its parents' keys)."""
    i = record.instance
    return {
        "sop_instance_uid": i.sop_instance_uid,
        "sop_class_uid": i.sop_class_uid,
        "instance_number": i.instance_number,
        "rows": i.rows,
        "columns": i.columns,
        "bits_allocated": i.bits_allocated,
        "number_of_frames": i.number_of_frames,
        "transfer_syntax_uid": i.transfer_syntax_uid,
        "specific_character_set": i.specific_character_set,
        "blob_key": blob.key,
        "size": blob.size,
        "source_ae": i.source_ae,
        "source_protocol": i.source_protocol,
        "updated_at": now,
    }


# Statements of the ingest transaction, built once: building a statement
# per call (coercing values, computing its cache key) cost more than running
# it.  Values travel as bound parameters.
_EXISTING = (
    select(
        instance.c.id,
        instance.c.blob_key,
        instance.c.series_fk,
        instance.c.study_fk,
        series.c.series_instance_uid,
    )
    .join(series, series.c.id == instance.c.series_fk)
    .where(
        instance.c.sop_instance_uid == bindparam("sop"),
        instance.c.partition_key == bindparam("partition"),
    )
    .with_for_update(of=instance)
)
_PATIENT = select(patient.c.id).where(
    patient.c.patient_id == bindparam("pid"),
    patient.c.issuer_of_patient_id == bindparam("issuer"),
    patient.c.partition_key == bindparam("partition"),
)
_STUDY_FOR_UPDATE = (
    select(study.c.id)
    .where(
        study.c.study_instance_uid == bindparam("uid"),
        study.c.partition_key == bindparam("partition"),
    )
    .with_for_update()
)
_SERIES_FOR_UPDATE = (
    select(series.c.id, series.c.study_fk)
    .where(
        series.c.series_instance_uid == bindparam("uid"),
        series.c.partition_key == bindparam("partition"),
    )
    .with_for_update()
)
_INSERT_INSTANCE = instance.insert()
_INSERT_CHANGE = changefeed.insert()
_INSERT_FORWARD = forward_entry.insert()
_COUNT_SERIES = (
    update(series)
    .where(series.c.id == bindparam("row_id"))
    .values(num_instances=series.c.num_instances + bindparam("delta"), updated_at=bindparam("now"))
)
_COUNT_STUDY = (
    update(study)
    .where(study.c.id == bindparam("row_id"))
    .values(num_instances=study.c.num_instances + bindparam("delta"), updated_at=bindparam("now"))
)
_COUNT_NEW_SERIES = (
    update(study).where(study.c.id == bindparam("row_id")).values(num_series=study.c.num_series + 1)
)
_MARK_REPLACED = (
    update(changefeed)
    .where(
        changefeed.c.sop_instance_uid == bindparam("sop"),
        changefeed.c.partition_key == bindparam("partition"),
        changefeed.c.state == "current",
    )
    .values(state="replaced")
)
_FEED_LOCK_STATEMENT = select(func.pg_advisory_xact_lock(_FEED_LOCK))
#: Writes rows of its own about an instance in the transaction that indexes
#: it: ``(conn, instance_id, study_fk, series_fk, replaced)`` (extended query
#: tags' values, :func:`appliance.extended_tags.write_values`).
AlsoWrite = Callable[[Connection, int, int, int, bool], None]

_FIND_INSTANCE = _stored_instances().where(
    instance.c.sop_instance_uid == bindparam("sop"),
    instance.c.partition_key == bindparam("partition"),
)


class SqlIndex:
    """The index on SQLite or PostgreSQL (same code, same migrations), bound
    to the data partition *partition_key* (see the module's text)."""

    def __init__(self, engine: Engine, partition_key: int = DEFAULT_PARTITION_KEY) -> None:
        self.engine = engine
        #: the data partition this object reads and writes
        self.partition_key = partition_key
        insert: Any = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        # parents are created with INSERT .. ON CONFLICT DO NOTHING, so two
        # writers creating the same study at once both succeed
        self._insert_patient = insert(patient).on_conflict_do_nothing(
            index_elements=["patient_id", "issuer_of_patient_id", "partition_key"]
        )
        self._insert_study = insert(study).on_conflict_do_nothing(
            index_elements=["study_instance_uid", "partition_key"]
        )
        self._insert_series = (
            insert(series)
            .on_conflict_do_nothing(index_elements=["series_instance_uid", "partition_key"])
            .returning(series.c.id)
        )

    def in_partition(self, partition_key: int) -> SqlIndex:
        """This index bound to another data partition (a light copy: the
        engine and the prepared statements are shared)."""
        if partition_key == self.partition_key:
            return self
        bound = copy.copy(self)
        bound.partition_key = partition_key
        return bound

    # ------------------------------------------------------------------ reads

    def check(self) -> None:
        """Raise IndexUnavailable unless the database answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise IndexUnavailable(
                f"the index database does not answer ({_describe(exc)})"
            ) from exc

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        """The stored instance with that SOP Instance UID, or None."""
        try:
            with self._reading() as conn:
                row = conn.execute(
                    _FIND_INSTANCE, {"sop": sop_instance_uid, "partition": self.partition_key}
                ).first()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return None if row is None else StoredInstance(*row)

    def instances(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[StoredInstance]:
        """The stored instances of a study, a series of it, or one instance
        of that series, in retrieve order.

        Raises
        ------
        NotFound
            if nothing is stored there.
        """
        query = _stored_instances().where(
            *_hierarchy_conditions(self.partition_key, study_uid, series_uid, sop_uid)
        )
        try:
            with self._reading() as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        if not rows:
            raise NotFound(f"no {_what(study_uid, series_uid, sop_uid)} is stored")
        return [StoredInstance(*row) for row in rows]

    def claim(self, task: str, holder: str, lease: dt.timedelta) -> bool:
        """Claim the background *task* for *holder* until *lease* from now:
        True if it was free (never claimed, or its lease expired), False if
        another holder's lease runs.  One statement (an upsert whose update
        applies only to an expired row), so two nodes claiming at once never
        both get it."""
        now = _now()
        insert: Any = (
            postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        )
        statement = insert(task_lease).values(name=task, holder=holder, expires_at=now + lease)
        statement = statement.on_conflict_do_update(
            index_elements=[task_lease.c.name],
            set_={"holder": statement.excluded.holder, "expires_at": statement.excluded.expires_at},
            where=task_lease.c.expires_at < now,
        ).returning(task_lease.c.name)
        try:
            with self._writing() as conn:
                return conn.execute(statement).first() is not None
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def renew(self, task: str, holder: str, lease: dt.timedelta) -> bool:
        """Extend *holder*'s claim of *task* to *lease* from now; False if
        it is no longer the holder (its lease ran out and another took it)."""
        statement = (
            update(task_lease)
            .where(task_lease.c.name == task, task_lease.c.holder == holder)
            .values(expires_at=_now() + lease)
        )
        try:
            with self._writing() as conn:
                return int(conn.execute(statement).rowcount) == 1
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def claimed_by(self, task: str) -> tuple[str, dt.datetime] | None:
        """Who holds *task* and until when, or None if nobody does."""
        query = select(task_lease.c.holder, task_lease.c.expires_at).where(
            task_lease.c.name == task
        )
        try:
            with self._reading() as conn:
                row = conn.execute(query).first()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        if row is None:
            return None
        expires = as_utc(row.expires_at)
        return None if expires < _now() else (str(row.holder), expires)

    def release(self, task: str, holder: str) -> None:
        """End *holder*'s lease of *task* (a no-op if it is not the holder)."""
        statement = (
            update(task_lease)
            .where(task_lease.c.name == task, task_lease.c.holder == holder)
            .values(expires_at=_now())
        )
        try:
            with self._writing() as conn:
                conn.execute(statement)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def stored_page(self, after: int, limit: int) -> list[tuple[int, StoredInstance]]:
        """Up to *limit* stored instances whose row id is above *after*, in
        row-id order (the order they were first stored), each with its row
        id: a walk over the whole index, a page at a time."""
        query = (
            _stored_instances()
            .add_columns(instance.c.id)
            .where(instance.c.id > after)
            .order_by(None)
            .order_by(instance.c.id)
            .limit(limit)
        )
        try:
            with self._reading() as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return [(int(row[-1]), StoredInstance(*row[:-1])) for row in rows]

    # ------------------------------------------------------------ change feed

    def changes(
        self, after: int, limit: int, *, partition_key: int | None = None
    ) -> list[ChangeEntry]:
        """Change-feed entries with a sequence above *after*, oldest first:
        of every partition, or of *partition_key*'s alone.

        Sequence numbers may have gaps (a rolled-back transaction), never
        late arrivals: see :meth:`_log_change`."""
        query = (
            select(*_CHANGE_COLUMNS)
            .where(changefeed.c.sequence > after)
            .order_by(changefeed.c.sequence)
            .limit(limit)
        )
        if partition_key is not None:
            query = query.where(changefeed.c.partition_key == partition_key)
        try:
            with self._reading() as conn:
                return [ChangeEntry(**row._mapping) for row in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def latest_change(self, *, partition_key: int | None = None) -> ChangeEntry | None:
        """The newest change-feed entry (of every partition, or of
        *partition_key*'s alone), or None for an empty feed."""
        query = select(*_CHANGE_COLUMNS).order_by(changefeed.c.sequence.desc()).limit(1)
        if partition_key is not None:
            query = query.where(changefeed.c.partition_key == partition_key)
        try:
            with self._reading() as conn:
                row = conn.execute(query).first()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return None if row is None else ChangeEntry(**row._mapping)

    def blob_keys(self, keys: Sequence[str]) -> set[str]:
        """Those of *keys* that an instance row references."""
        found: set[str] = set()
        try:
            with self._reading() as conn:
                for chunk in _chunks(list(keys)):
                    rows = conn.execute(
                        select(instance.c.blob_key).where(instance.c.blob_key.in_(chunk))
                    )
                    found.update(r[0] for r in rows)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return found

    def blob_page(self, after: str, limit: int) -> list[StoredInstance]:
        """Up to *limit* stored instances whose blob key is above *after*, in
        blob key order (the unique index on the key serves it): a walk over
        the whole index in the order a store lists its blobs."""
        query = (
            _stored_instances()
            .where(instance.c.blob_key > after)
            .order_by(None)
            .order_by(instance.c.blob_key)
            .limit(limit)
        )
        try:
            with self._reading() as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return [StoredInstance(*row) for row in rows]

    def count_instances(self) -> int:
        """How many instances the index holds."""
        try:
            with self._reading() as conn:
                return int(conn.execute(select(func.count()).select_from(instance)).scalar_one())
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def holds_nothing(self) -> bool:
        """True if the index has no instance *and* no change-feed entry: a
        new index, or one that was lost and created again, as opposed to
        one whose instances were all deleted (their deletions are in the
        feed).  Blobs in the store are then not orphans but instances the
        index does not know yet (``dicom-appliance reindex``)."""
        query = select(select(instance.c.id).exists() | select(changefeed.c.sequence).exists())
        try:
            with self._reading() as conn:
                return not conn.execute(query).scalar_one()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def last_action(self, sop_instance_uid: str) -> str | None:
        """The action (``create`` or ``delete``) of the newest change-feed
        entry of an instance, or None if the feed never named it."""
        query = (
            select(changefeed.c.action)
            .where(
                changefeed.c.sop_instance_uid == sop_instance_uid,
                changefeed.c.partition_key == self.partition_key,
            )
            .order_by(changefeed.c.sequence.desc())
            .limit(1)
        )
        try:
            with self._reading() as conn:
                found = conn.execute(query).scalar_one_or_none()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return None if found is None else str(found)

    # ----------------------------------------------------------------- writes

    def add_instance(
        self,
        record: InstanceRecord,
        blob: BlobInfo,
        duplicate_policy: str = "keep",
        forward_to: Sequence[str] = (),
        *,
        written_at: dt.datetime | None = None,
        also: AlsoWrite | None = None,
    ) -> AddResult:
        """Index *record*, stored as *blob*, in one transaction, with a
        forwarding outbox entry for each destination of *forward_to* if it
        was stored (created or replaced).  *written_at* is when the blob was
        written, if not now (``reindex``: the instance row keeps its time).
        *also* writes more rows about the instance in the same transaction
        (once the instance row exists).

        Raises
        ------
        InvalidInstance
            if the Series Instance UID already belongs to another study.
        IndexUnavailable
            if the database fails.
        """
        for attempt in (1, 2):
            try:
                with self._writing() as conn:
                    return self._add(
                        conn, record, blob, duplicate_policy, forward_to, written_at, also
                    )
            except IntegrityError:
                # PostgreSQL: a concurrent writer committed the same SOP
                # Instance UID (or blob key) first.  Once more, as a duplicate.
                if attempt == 2:
                    raise IndexUnavailable("the index refused the instance twice") from None
                log.info(
                    "lost an insert race for %s; retrying as duplicate",
                    record.instance.sop_instance_uid,
                )
            except (OperationalError, InterfaceError) as exc:
                raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def add_instances(
        self,
        items: Sequence[tuple[InstanceRecord, BlobInfo, Sequence[str], AlsoWrite | None]],
        duplicate_policy: str = "keep",
    ) -> list[AddResult]:
        """Index several instances, each ``(record, blob, forward_to, also)``
        as :meth:`add_instance` takes them, in *one* transaction: one commit
        (one WAL flush) for all of them, the group commit of a STOW-RS
        request.  All or nothing.

        Raises
        ------
        InvalidInstance
            if a Series Instance UID already belongs to another study.
        IndexUnavailable
            if the database fails, or another writer committed one of the
            instances first (PostgreSQL): then nothing was written, and the
            caller indexes them one by one.
        """
        try:
            with self._writing() as conn:
                return [
                    self._add(conn, record, blob, duplicate_policy, forward_to, None, also)
                    for record, blob, forward_to, also in items
                ]
        except IntegrityError:
            raise IndexUnavailable("another writer stored one of the instances first") from None
        except (OperationalError, InterfaceError) as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc

    def _add(
        self,
        conn: Connection,
        record: InstanceRecord,
        blob: BlobInfo,
        policy: str,
        forward_to: Sequence[str],
        written_at: dt.datetime | None = None,
        also: AlsoWrite | None = None,
    ) -> AddResult:
        sop_uid = record.instance.sop_instance_uid
        key = {"sop": sop_uid, "partition": self.partition_key}
        existing = conn.execute(_EXISTING, key).first()
        now = _now()
        written = now if written_at is None else written_at
        if existing is None:
            self._insert_instance(conn, record, blob, now, written, also)
            self._queue_forward(conn, forward_to, "store", record, now)
            self._log_change(conn, record, now)
            return AddResult(AddOutcome.CREATED)

        if policy == "keep":
            return AddResult(AddOutcome.DUPLICATE_KEPT)
        if policy == "reject":
            return AddResult(AddOutcome.DUPLICATE_REJECTED)
        conn.execute(_MARK_REPLACED, {"sop": sop_uid, "partition": self.partition_key})
        if existing.series_instance_uid == record.series.series_instance_uid:
            # the usual replacement: same place in the hierarchy, new bytes
            conn.execute(
                update(instance).where(instance.c.id == bindparam("row_id")),
                {"row_id": existing.id, **_instance_values(record, blob, written)},
            )
            if also is not None:
                also(conn, existing.id, existing.study_fk, existing.series_fk, True)
        else:
            # the instance moved to another series: out of the old, into the new
            self._remove_instances(conn, [existing])
            self._insert_instance(conn, record, blob, now, written, also)
        self._queue_forward(conn, forward_to, "store", record, now)
        self._log_change(conn, record, now)
        return AddResult(AddOutcome.REPLACED, orphaned_blob_key=existing.blob_key)

    def _queue_forward(
        self,
        conn: Connection,
        destinations: Sequence[str],
        action: str,
        record: InstanceRecord,
        now: dt.datetime,
    ) -> None:
        if destinations:
            conn.execute(
                _INSERT_FORWARD,
                [
                    {
                        "destination": name,
                        "action": action,
                        "study_instance_uid": record.study.study_instance_uid,
                        "series_instance_uid": record.series.series_instance_uid,
                        "sop_instance_uid": record.instance.sop_instance_uid,
                        "partition_key": self.partition_key,
                        "state": "queued",
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for name in destinations
                ],
            )

    def _insert_instance(
        self,
        conn: Connection,
        record: InstanceRecord,
        blob: BlobInfo,
        now: dt.datetime,
        written: dt.datetime,
        also: AlsoWrite | None = None,
    ) -> None:
        study_fk, series_fk = self._ensure_parents(conn, record, now)
        inserted = conn.execute(
            _INSERT_INSTANCE,
            {
                "series_fk": series_fk,
                "study_fk": study_fk,
                "partition_key": self.partition_key,
                "created_at": written,
                **_instance_values(record, blob, written),
            },
        )
        self._count_instance(conn, study_fk, series_fk, +1, now)
        if also is not None:
            key = inserted.inserted_primary_key
            assert key is not None
            also(conn, int(key[0]), study_fk, series_fk, False)

    def _ensure_parents(
        self, conn: Connection, record: InstanceRecord, now: dt.datetime
    ) -> tuple[int, int]:
        """The study and series rows of *record*, created if missing and
        locked until commit (PostgreSQL), so no other writer removes them
        under this one.  A row that vanished between the insert attempt and
        the lock (another writer emptied it) is created again.

        The common case, an instance of a study and series already stored,
        costs two indexed look-ups.
        """
        for _ in range(_PARENT_ATTEMPTS):
            study_fk = self._ensure_study(conn, record, now)
            if study_fk is None:
                continue
            series_fk = self._ensure_series(conn, record, study_fk, now)
            if series_fk is not None:
                return study_fk, series_fk
        raise IndexUnavailable("the study's rows kept changing under this writer; try again")

    def _count_instance(
        self, conn: Connection, study_fk: int, series_fk: int, delta: int, now: dt.datetime
    ) -> None:
        conn.execute(_COUNT_SERIES, {"row_id": series_fk, "delta": delta, "now": now})
        conn.execute(_COUNT_STUDY, {"row_id": study_fk, "delta": delta, "now": now})

    def _lock_feed(self, conn: Connection) -> None:
        """Make change-feed sequence numbers commit in order (PostgreSQL).

        A sequence value is taken at insert time but becomes visible at
        commit; two writers could commit 11 before 10, and a reader polling
        "after 10" in between would skip 10 for good.  Taking a transaction
        lock before the insert (held until commit) orders the inserts and
        commits alike, so a reader that sees N has seen everything below N
        that will ever exist.  The change-feed insert is the last statement
        of every writing transaction, so the lock is held only for its
        commit.  SQLite needs nothing: its writers are serialised already.
        """
        if conn.dialect.name == "postgresql":
            conn.execute(_FEED_LOCK_STATEMENT)

    def _log_change(self, conn: Connection, record: InstanceRecord, now: dt.datetime) -> None:
        self._lock_feed(conn)
        conn.execute(
            _INSERT_CHANGE,
            {
                "timestamp": now,
                "action": "create",
                "state": "current",
                "study_instance_uid": record.study.study_instance_uid,
                "series_instance_uid": record.series.series_instance_uid,
                "sop_instance_uid": record.instance.sop_instance_uid,
                "partition_key": self.partition_key,
            },
        )

    def _ensure_patient(self, conn: Connection, record: InstanceRecord, now: dt.datetime) -> int:
        p = record.patient
        key = {
            "pid": p.patient_id,
            "issuer": p.issuer_of_patient_id,
            "partition": self.partition_key,
        }
        found = conn.execute(_PATIENT, key).scalar_one_or_none()
        if found is not None:
            return int(found)
        conn.execute(
            self._insert_patient,
            {
                "patient_id": p.patient_id,
                "issuer_of_patient_id": p.issuer_of_patient_id,
                "partition_key": self.partition_key,
                "patient_name": p.patient_name,
                "patient_name_norm": p.patient_name.casefold(),
                "patient_birth_date": p.patient_birth_date,
                "patient_sex": p.patient_sex,
                "created_at": now,
            },
        )
        return int(conn.execute(_PATIENT, key).scalar_one())

    def _ensure_study(
        self, conn: Connection, record: InstanceRecord, now: dt.datetime
    ) -> int | None:
        s, p = record.study, record.patient
        key = {"uid": s.study_instance_uid, "partition": self.partition_key}
        found = conn.execute(_STUDY_FOR_UPDATE, key).scalar_one_or_none()
        if found is not None:
            return int(found)
        conn.execute(
            self._insert_study,
            {
                "patient_fk": self._ensure_patient(conn, record, now),
                "study_instance_uid": s.study_instance_uid,
                "partition_key": self.partition_key,
                "study_date": s.study_date,
                "study_time": s.study_time,
                "study_time_key": tm_key(s.study_time),
                "accession_number": s.accession_number,
                "study_id": s.study_id,
                "study_description": s.study_description,
                "referring_physician_name": s.referring_physician_name,
                "referring_physician_name_norm": s.referring_physician_name.casefold(),
                "timezone_offset_from_utc": s.timezone_offset_from_utc,
                "patient_id": p.patient_id,
                "issuer_of_patient_id": p.issuer_of_patient_id,
                "patient_name": p.patient_name,
                "patient_name_norm": p.patient_name.casefold(),
                "patient_birth_date": p.patient_birth_date,
                "patient_sex": p.patient_sex,
                "num_series": 0,
                "num_instances": 0,
                "created_at": now,
                "updated_at": now,
            },
        )
        found = conn.execute(_STUDY_FOR_UPDATE, key).scalar_one_or_none()
        return None if found is None else int(found)

    def _ensure_series(
        self, conn: Connection, record: InstanceRecord, study_fk: int, now: dt.datetime
    ) -> int | None:
        s = record.series
        key = {"uid": s.series_instance_uid, "partition": self.partition_key}
        row = conn.execute(_SERIES_FOR_UPDATE, key).first()
        if row is None:
            created = conn.execute(
                self._insert_series,
                {
                    "study_fk": study_fk,
                    "series_instance_uid": s.series_instance_uid,
                    "partition_key": self.partition_key,
                    "modality": s.modality,
                    "series_number": s.series_number,
                    "series_description": s.series_description,
                    "body_part_examined": s.body_part_examined,
                    "performed_procedure_step_start_date": s.performed_procedure_step_start_date,
                    "performed_procedure_step_start_time": s.performed_procedure_step_start_time,
                    "performed_procedure_step_start_time_key": tm_key(
                        s.performed_procedure_step_start_time
                    ),
                    "num_instances": 0,
                    "created_at": now,
                    "updated_at": now,
                },
            ).first()
            if created is not None:
                return self._created_series(conn, record, study_fk, int(created[0]))
            row = conn.execute(_SERIES_FOR_UPDATE, key).first()
            if row is None:
                return None
        if row.study_fk != study_fk:
            raise InvalidInstance(
                f"SeriesInstanceUID {s.series_instance_uid} already belongs to another study"
            )
        return int(row.id)

    def _created_series(
        self, conn: Connection, record: InstanceRecord, study_fk: int, series_fk: int
    ) -> int:
        """Count a new series in its study and keep its request attributes."""
        conn.execute(_COUNT_NEW_SERIES, {"row_id": study_fk})
        items = record.series.request_attributes
        if items:
            conn.execute(
                request_attribute.insert(),
                [
                    {
                        "series_fk": series_fk,
                        "scheduled_procedure_step_id": item.scheduled_procedure_step_id,
                        "requested_procedure_id": item.requested_procedure_id,
                    }
                    for item in items
                ],
            )
        return series_fk

    def _remove_instances(self, conn: Connection, rows: Sequence[Any]) -> None:
        """Delete instance rows (``id``, ``series_fk``, ``study_fk``), keep the
        counters right, and drop the series, studies and patients left empty."""
        series_ids = sorted({row.series_fk for row in rows})
        study_ids = sorted({row.study_fk for row in rows})
        for chunk in _chunks(sorted(row.id for row in rows)):
            conn.execute(delete(instance).where(instance.c.id.in_(chunk)))
        for chunk in _chunks(series_ids):
            conn.execute(
                update(series)
                .where(series.c.id.in_(chunk))
                .values(num_instances=_count_where(instance, instance.c.series_fk == series.c.id))
            )
            empty = select(series.c.id).where(series.c.id.in_(chunk), series.c.num_instances == 0)
            conn.execute(delete(request_attribute).where(request_attribute.c.series_fk.in_(empty)))
            conn.execute(delete(series).where(series.c.id.in_(chunk), series.c.num_instances == 0))
        patient_ids: set[int] = set()
        for chunk in _chunks(study_ids):
            conn.execute(
                update(study)
                .where(study.c.id.in_(chunk))
                .values(
                    num_instances=_count_where(instance, instance.c.study_fk == study.c.id),
                    num_series=_count_where(series, series.c.study_fk == study.c.id),
                )
            )
            patient_ids.update(
                conn.execute(
                    select(study.c.patient_fk).where(study.c.id.in_(chunk), study.c.num_series == 0)
                ).scalars()
            )
            conn.execute(delete(study).where(study.c.id.in_(chunk), study.c.num_series == 0))
        for chunk in _chunks(sorted(patient_ids)):
            conn.execute(
                delete(patient).where(
                    patient.c.id.in_(chunk),
                    ~select(study.c.id).where(study.c.patient_fk == patient.c.id).exists(),
                )
            )

    def delete(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        forward_to: Sequence[str] = (),
        *,
        idle_since: dt.datetime | None = None,
        blob_key: str | None = None,
    ) -> list[StoredInstance]:
        """Remove a study, a series of it, or one instance of that series from
        the index, with one ``delete`` change-feed entry per instance (earlier
        entries of those instances become ``deleted``), in one transaction;
        and a ``delete`` forwarding entry for each instance and each
        destination of *forward_to* that took the instance (has a ``store``
        entry for it).

        With *blob_key*, only an instance whose row still names that blob
        is removed (``verify --drop-missing``: a row whose blob is missing,
        unless a new copy replaced it meanwhile).

        Returns
        -------
        list of StoredInstance
            what was removed; the caller deletes their blobs after this
            returns (a blob whose delete fails is left to the sweeper: an
            unreferenced blob is harmless, a row without its blob is not).

        With *idle_since* (retention), nothing is removed, and :class:`Busy`
        is raised, if an instance there was stored at or after that time or
        still has a queued forwarding entry: checked in the same
        transaction, so an instance arriving or queued meanwhile is never
        deleted before it is forwarded.

        Raises
        ------
        NotFound
            if nothing is stored there.
        Busy
            with *idle_since*, as above.
        """
        query = (
            _stored_instances()
            .add_columns(instance.c.id, instance.c.series_fk, instance.c.study_fk)
            .where(*_hierarchy_conditions(self.partition_key, study_uid, series_uid, sop_uid))
            .with_for_update(of=instance)
        )
        if blob_key is not None:
            query = query.where(instance.c.blob_key == blob_key)
        try:
            with self._writing() as conn:
                rows = conn.execute(query).all()
                if not rows:
                    raise NotFound(f"no {_what(study_uid, series_uid, sop_uid)} is stored")
                if idle_since is not None:
                    self._check_idle(conn, rows, idle_since, self.partition_key)
                self._remove_instances(conn, rows)
                now = _now()
                uids = sorted(row.sop_instance_uid for row in rows)
                for chunk in _chunks(uids):
                    conn.execute(
                        update(changefeed)
                        .where(
                            changefeed.c.sop_instance_uid.in_(chunk),
                            changefeed.c.partition_key == self.partition_key,
                        )
                        .values(state="deleted")
                    )
                if forward_to:
                    self._queue_forward_deletes(conn, rows, forward_to, now, self.partition_key)
                self._lock_feed(conn)
                conn.execute(
                    changefeed.insert(),
                    [
                        {
                            "timestamp": now,
                            "action": "delete",
                            "state": "deleted",
                            "study_instance_uid": row.study_instance_uid,
                            "series_instance_uid": row.series_instance_uid,
                            "sop_instance_uid": row.sop_instance_uid,
                            "partition_key": self.partition_key,
                        }
                        for row in rows
                    ],
                )
        except (OperationalError, InterfaceError) as exc:
            raise IndexUnavailable(f"the index database failed ({_describe(exc)})") from exc
        return [StoredInstance(*row[:10]) for row in rows]

    @staticmethod
    def _check_idle(
        conn: Connection, rows: Sequence[Any], idle_since: dt.datetime, partition_key: int
    ) -> None:
        if any(as_utc(row.updated_at) >= idle_since for row in rows if row.updated_at):
            raise Busy("an instance was stored there since")
        for chunk in _chunks(sorted(row.sop_instance_uid for row in rows)):
            waiting = conn.execute(
                select(forward_entry.c.id)
                .where(
                    forward_entry.c.sop_instance_uid.in_(chunk),
                    forward_entry.c.partition_key == partition_key,
                    forward_entry.c.state == "queued",
                )
                .limit(1)
            ).first()
            if waiting is not None:
                raise Busy("an instance there still waits to be forwarded")

    @staticmethod
    def _queue_forward_deletes(
        conn: Connection,
        rows: Sequence[Any],
        destinations: Sequence[str],
        now: dt.datetime,
        partition_key: int,
    ) -> None:
        by_uid = {row.sop_instance_uid: row for row in rows}
        taken: set[tuple[str, str]] = set()
        for chunk in _chunks(sorted(by_uid)):
            found = conn.execute(
                select(forward_entry.c.destination, forward_entry.c.sop_instance_uid)
                .where(
                    forward_entry.c.sop_instance_uid.in_(chunk),
                    forward_entry.c.partition_key == partition_key,
                    forward_entry.c.action == "store",
                    forward_entry.c.destination.in_(list(destinations)),
                )
                .distinct()
            )
            taken.update((str(name), str(uid)) for name, uid in found)
        if not taken:
            return
        conn.execute(
            _INSERT_FORWARD,
            [
                {
                    "destination": name,
                    "action": "delete",
                    "study_instance_uid": by_uid[uid].study_instance_uid,
                    "series_instance_uid": by_uid[uid].series_instance_uid,
                    "sop_instance_uid": uid,
                    "partition_key": partition_key,
                    "state": "queued",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for name, uid in sorted(taken)
            ],
        )

    # ---------------------------------------------------------------- helpers

    def _writing(self) -> Any:
        """A connection in a write transaction (SQLite: BEGIN IMMEDIATE)."""
        return _Transaction(self.engine, write=True)

    def _reading(self) -> Any:
        return self.engine.connect()


class _OnIndex(Protocol):
    index: SqlIndex


_Service = TypeVar("_Service", bound=_OnIndex)


def rebound(service: _Service, partition_key: int) -> _Service:
    """*service* (an object working on ``service.index``) on the data
    partition *partition_key*: itself if it is there already, else a light
    copy whose index is bound to that partition (everything else shared)."""
    if partition_key == service.index.partition_key:
        return service
    bound = copy.copy(service)
    bound.index = service.index.in_partition(partition_key)
    return bound


class _Transaction:
    """``with _Transaction(engine, write=True) as conn:`` commits on success,
    rolls back on error, and always returns the connection to the pool."""

    def __init__(self, engine: Engine, *, write: bool) -> None:
        self._engine = engine
        self._write = write
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        conn = self._engine.connect()
        if self._write:
            conn = conn.execution_options(**WRITE)
        self._conn = conn
        conn.begin()
        return conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._conn is not None
        try:
            if exc_type is None:
                self._conn.commit()
            else:
                self._conn.rollback()
        finally:
            self._conn.close()
