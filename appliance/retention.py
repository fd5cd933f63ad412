"""Retention: deleting studies to keep room, by age and by a free-space
target (``[retention]``, README "Retention").

A run picks studies by when something was last stored in them
(``study.updated_at``), oldest first: every study idle for more than
``max_age_days``, then, on the filesystem store, more of the oldest while
the disk has less free space than ``free_target_mb``.  Each is deleted
through the index's normal delete, with its change-feed entries (so
DICOMcast sees it go), but **not forwarded**: retention is local room, not
a deletion upstream.  A study with an instance stored since the run began
or still waiting to be forwarded is left alone, checked in the delete's own
transaction (:meth:`SqlIndex.delete` with ``idle_since``).

Runs in ``serve``'s worker process every ``interval_minutes``, one node at a
time (``task_lease`` "retention"), and on demand with ``dicom-appliance
retention run [--dry-run]``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit import Action, AuditEvent, AuditLog, Outcome
from appliance.config import RetentionConfig
from appliance.delete import DeleteService
from appliance.errors import ApplianceError, IndexUnavailable, NotFound
from appliance.index.schema import study
from appliance.index.sql import Busy, SqlIndex
from appliance.storage.base import BlobStore

log = logging.getLogger(__name__)

TASK = "retention"
#: Studies read per page when walking the oldest first.
_PAGE = 200


@dataclasses.dataclass
class RetentionReport:
    """What a run deleted (or, dry, would delete)."""

    studies: int = 0
    instances: int = 0
    bytes: int = 0
    #: studies left alone: in use (stored since, or waiting to be forwarded)
    kept_busy: int = 0
    #: why the free-space target was not reached, if it was not
    short_of_target: str | None = None
    deleted: list[str] = dataclasses.field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Retention:
    """The retention of an appliance's index and store."""

    def __init__(
        self,
        config: RetentionConfig,
        engine: Engine,
        index: SqlIndex,
        storage: BlobStore,
        audit: AuditLog | None = None,
    ) -> None:
        #: each study deleted is a ``delete`` audit event (who: "retention")
        self.audit = audit
        self.config = config
        self.engine = engine
        self.index = index
        self.storage = storage
        # no destinations: retention makes room here, it deletes nothing upstream
        self._deleting = DeleteService(index, storage)

    @property
    def enabled(self) -> bool:
        return bool(self.config.max_age_days or self._target())

    def _target(self) -> int:
        if not self.config.free_target_mb or not hasattr(self.storage, "free_bytes"):
            return 0
        return self.config.free_target_mb * 2**20

    def _free(self) -> int:
        return int(self.storage.free_bytes())  # type: ignore[attr-defined]

    def run(self, *, dry_run: bool = False, now: dt.datetime | None = None) -> RetentionReport:
        """Delete what the policy says (*dry_run*: only report it)."""
        now = now or dt.datetime.now(dt.UTC)
        report = RetentionReport()
        if self.config.max_age_days:
            cutoff = now - dt.timedelta(days=self.config.max_age_days)
            for uid, _, partition_key in self._oldest(before=cutoff):
                self._delete(uid, partition_key, now, report, dry_run)
        target = self._target()
        if target:
            missing = target - self._free()
            for uid, _, partition_key in self._oldest():
                if missing <= 0:
                    break
                freed = self._delete(uid, partition_key, now, report, dry_run)
                missing = (missing - freed) if dry_run else target - self._free()
            if missing > 0:
                report.short_of_target = (
                    f"{missing // 2**20} MB short of retention.free_target_mb: "
                    "nothing more may be deleted"
                )
        if report.studies or report.kept_busy:
            log.info(
                "retention%s: %d stud%s, %d instance(s), %d MB deleted; %d in use kept",
                " (dry run)" if dry_run else "",
                report.studies,
                "y" if report.studies == 1 else "ies",
                report.instances,
                report.bytes // 2**20,
                report.kept_busy,
            )
        return report

    def _oldest(self, before: dt.datetime | None = None) -> Iterator[tuple[str, dt.datetime, int]]:
        """Studies (UID, last stored, data partition) by when something was
        last stored in them, oldest first, of every partition (a page at a
        time: deleting as it goes)."""
        seen: set[tuple[str, int]] = set()
        while True:
            query = select(
                study.c.study_instance_uid, study.c.updated_at, study.c.partition_key
            ).order_by(study.c.updated_at, study.c.id)
            if before is not None:
                query = query.where(study.c.updated_at < before)
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(query.limit(_PAGE + len(seen))).all()
            except SQLAlchemyError as exc:
                raise IndexUnavailable(
                    f"the index database failed ({exc.__class__.__name__})"
                ) from exc
            fresh = [row for row in rows if (row.study_instance_uid, row.partition_key) not in seen]
            if not fresh:
                return
            for row in fresh:
                seen.add((row.study_instance_uid, row.partition_key))
                yield row.study_instance_uid, row.updated_at, int(row.partition_key)

    def _delete(
        self, uid: str, partition_key: int, now: dt.datetime, report: RetentionReport, dry_run: bool
    ) -> int:
        """Delete study *uid* of *partition_key* unless it is in use; the
        bytes it held."""
        try:
            if dry_run:
                # what it would delete, unless an instance is in use by then
                gone = self.index.in_partition(partition_key).instances(uid)
            else:
                gone = self._deleting.in_partition(partition_key).delete(uid, idle_since=now)
        except Busy as exc:
            log.info("retention keeps study %s: %s", uid, exc.reason)
            report.kept_busy += 1
            return 0
        except NotFound:
            return 0
        size = sum(s.size for s in gone)
        if self.audit is not None and not dry_run:
            self.audit.record(
                AuditEvent(
                    action=Action.DELETE,
                    outcome=Outcome.SUCCESS,
                    protocol="system",
                    who="retention",
                    studies=(uid,),
                    instances=len(gone),
                    transaction="retention",
                )
            )
        report.studies += 1
        report.instances += len(gone)
        report.bytes += size
        report.deleted.append(uid)
        return size

    # ---------------------------------------------------------------- worker

    def serve(self, stop: threading.Event) -> None:
        """Run every ``interval_minutes`` until *stop* is set, one node at a
        time."""
        holder = f"{socket.gethostname()}:{os.getpid()}"
        lease = dt.timedelta(minutes=self.config.interval_minutes)
        while not stop.is_set():
            try:
                if self.index.claim(TASK, holder, lease):
                    self.run()
            except ApplianceError as exc:
                log.warning("retention failed: %s; it runs again later", exc.reason)
            except Exception:
                log.exception("retention failed; it runs again later")
            stop.wait(self.config.interval_minutes * 60)
