"""The re-index operation of extended query tags (issue 11): after tags are
added, the values of the instances already stored are read from their blobs
and written to the value tables.

An operation walks the instances in row-id order, a batch at a time; each
batch's values and the operation's ``cursor`` (the last row id done) are
written in one transaction, so a process that stops (or dies) leaves the
operation where its last batch ended, and the next one resumes after it.
One node of several sharing the index runs an operation at a time: it holds
the ``task_lease`` ``reindex:<id>`` and renews it each batch; a node that
dies leaves it to another once the lease has run out.

The walk goes to the newest instance, not only to those stored before the
tags were added: an instance stored meanwhile by a process whose list of
tags was not yet fresh (:data:`~appliance.extended_tags.CACHE_SECONDS`)
gets its values here, and one whose values ingest wrote gets them again
(the batch first removes what is there).  The operation ends once a walk
finds nothing more to do and the tags are older than twice the time a
process trusts its list: then every ingest writes them itself.  The tags
become Ready; a tag some of whose values failed validation has its query
status Disabled until an administrator enables it (Microsoft's server does
the same).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, and_, delete, func, select, update

from appliance.errors import ApplianceError, BlobNotFound
from appliance.extended_tags import (
    ADDING,
    CACHE_SECONDS,
    COMPLETED,
    DISABLED,
    NOT_STARTED,
    READY,
    RUNNING,
    ExtendedTag,
    ExtendedTags,
    Extracted,
    read_values,
    tag_of,
    value_tables,
    write_values,
)
from appliance.index.engine import as_utc
from appliance.index.schema import eqt_error, eqt_operation, extended_query_tag, instance
from appliance.index.sql import SqlIndex
from appliance.storage.base import BlobStore

log = logging.getLogger(__name__)

#: Instances read per batch (one transaction each).
BATCH = 100
#: How long a claim of an operation lasts without being renewed.
LEASE = dt.timedelta(seconds=30)
#: Seconds between looks for an operation to run.
INTERVAL = 5.0

_PAGE_COLUMNS = (instance.c.id, instance.c.blob_key, instance.c.study_fk, instance.c.series_fk)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Reindexer:
    """Runs the re-index operations of one index.

    Parameters
    ----------
    engine, index, storage
        The index database (and its :class:`SqlIndex`, for the lease) and
        the blob store.
    tags
        The extended query tags of this process (told when tags change).
    batch
        Instances per batch.
    holder
        The name this process claims operations under.
    """

    def __init__(
        self,
        engine: Engine,
        index: SqlIndex,
        storage: BlobStore,
        tags: ExtendedTags,
        *,
        batch: int = BATCH,
        lease: dt.timedelta = LEASE,
        holder: str | None = None,
        settle_seconds: float = 2 * CACHE_SECONDS,
    ) -> None:
        self.engine = engine
        self.index = index
        self.storage = storage
        self.tags = tags
        self.batch = batch
        self.lease = lease
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.settle_seconds = settle_seconds

    def pending(self) -> list[str]:
        """The operations not finished, oldest first."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(eqt_operation.c.id)
                    .where(eqt_operation.c.status.in_((NOT_STARTED, RUNNING)))
                    .order_by(eqt_operation.c.created_at)
                ).scalars()
            )

    def run_pending(self, *, max_batches: int | None = None) -> int:
        """Run every pending operation this process can claim; the number of
        those it finished.  *max_batches* bounds the work per operation
        (a test stops "in the middle" with it)."""
        finished = 0
        for operation_id in self.pending():
            task = f"reindex:{operation_id}"
            if not self.index.claim(task, self.holder, self.lease):
                continue
            try:
                if self.run(operation_id, max_batches=max_batches) == COMPLETED:
                    finished += 1
            finally:
                self.index.release(task, self.holder)
        return finished

    def serve(self, stop: threading.Event, interval: float = INTERVAL) -> None:
        """Run pending operations until *stop* is set."""
        while not stop.is_set():
            try:
                self.run_pending()
            except ApplianceError as exc:
                log.warning("re-index failed: %s; it runs again later", exc.reason)
            except Exception:
                log.exception("re-index failed; it runs again later")
            stop.wait(interval)

    def run(self, operation_id: str, *, max_batches: int | None = None) -> str:
        """Run one operation (claimed by the caller) from its cursor until it
        ends, its lease is lost, or *max_batches* batches are done; its
        status afterwards."""
        batches = 0
        task = f"reindex:{operation_id}"
        while max_batches is None or batches < max_batches:
            with self.engine.connect() as conn:
                operation = conn.execute(
                    select(eqt_operation).where(eqt_operation.c.id == operation_id)
                ).one()
                tags = [
                    tag_of(row)
                    for row in conn.execute(
                        select(extended_query_tag).where(
                            extended_query_tag.c.operation_id == operation_id,
                            extended_query_tag.c.status == ADDING,
                        )
                    )
                ]
                page = conn.execute(
                    select(
                        instance.c.id,
                        instance.c.blob_key,
                        instance.c.study_fk,
                        instance.c.series_fk,
                    )
                    .where(instance.c.id > operation.cursor)
                    .order_by(instance.c.id)
                    .limit(self.batch)
                ).all()
            if operation.status not in (NOT_STARTED, RUNNING):
                return str(operation.status)
            if not tags:  # deleted meanwhile: nothing left to add
                return self._finish(operation_id, [])
            if not page:
                oldest = min(as_utc(tag.created_at) for tag in tags)
                wait = self.settle_seconds - (_now() - oldest).total_seconds()
                if wait <= 0:
                    return self._finish(operation_id, tags)
                time.sleep(min(wait, 1.0))
                continue
            self._batch(operation_id, tags, page)
            batches += 1
            if not self.index.renew(task, self.holder, self.lease):
                log.warning("re-index %s: the lease was lost; another node goes on", operation_id)
                return RUNNING
        return RUNNING

    def _batch(self, operation_id: str, tags: Sequence[ExtendedTag], page: Sequence[Any]) -> None:
        found: list[tuple[Any, list[Extracted]]] = []
        for row in page:
            try:
                with self.storage.open(row.blob_key) as source:
                    extracted = read_values(source, tags)
            except BlobNotFound:
                continue  # deleted meanwhile (or the sweep's business)
            found.append((row, extracted))
        keys = [tag.key for tag in tags]
        ids = [row.id for row in page]
        with self.engine.begin() as conn:
            alive = set(
                conn.execute(
                    select(instance.c.id).where(instance.c.id.in_(ids)).with_for_update(read=True)
                ).scalars()
            )
            for table in (*value_tables(), eqt_error):
                conn.execute(
                    delete(table).where(
                        and_(table.c.tag_key.in_(keys), table.c.instance_fk.in_(ids))
                    )
                )
            for row, extracted in found:
                if row.id in alive:
                    write_values(conn, extracted, row.id, row.study_fk, row.series_fk)
            for key in keys:
                errors = (
                    select(func.count(eqt_error.c.id))
                    .where(eqt_error.c.tag_key == key)
                    .scalar_subquery()
                )
                conn.execute(
                    update(extended_query_tag)
                    .where(extended_query_tag.c.key == key)
                    .values(error_count=errors)
                )
            conn.execute(
                update(eqt_operation)
                .where(eqt_operation.c.id == operation_id)
                .values(
                    status=RUNNING,
                    cursor=max(ids),
                    done=eqt_operation.c.done + len(ids),
                    updated_at=_now(),
                )
            )
        log.info("re-index %s: instances up to row %d done", operation_id, max(ids))

    def _finish(self, operation_id: str, tags: Sequence[ExtendedTag]) -> str:
        keys = [tag.key for tag in tags]
        with self.engine.begin() as conn:
            if keys:
                conn.execute(
                    update(extended_query_tag)
                    .where(extended_query_tag.c.key.in_(keys), extended_query_tag.c.error_count > 0)
                    .values(query_status=DISABLED)
                )
                conn.execute(
                    update(extended_query_tag)
                    .where(
                        extended_query_tag.c.key.in_(keys), extended_query_tag.c.status == ADDING
                    )
                    .values(status=READY)
                )
            conn.execute(
                update(eqt_operation)
                .where(eqt_operation.c.id == operation_id)
                .values(status=COMPLETED, updated_at=_now())
            )
        self.tags.invalidate()
        log.info("re-index %s completed (%d tag(s) ready)", operation_id, len(keys))
        return COMPLETED
