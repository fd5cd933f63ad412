"""Checking the index against the blob store, and rebuilding the index from
the store (``dicom-appliance verify`` and ``reindex``; ``sweep`` is
:mod:`appliance.ingest.sweep`).

Both walk the store's listing (:meth:`BlobStore.list_blobs`, in key order)
once; ``verify`` walks the index beside it in the same order (by blob key,
which its unique index serves), a page at a time, so neither holds more
than a page of rows and one batch of findings in memory, whatever the size
of the archive.

``verify`` reports, by count and with a few examples (UIDs and blob keys,
never patient data):

- *rows without their blob*: an index row whose blob the store does not
  hold (checked again, blob and row, before it is reported, since an ingest
  or a delete may have run between the two listings).  ``--repair`` leaves
  them: only ``--repair --drop-missing`` deletes such a row, through the
  index's own delete (a ``delete`` change-feed entry, forwarding deletions).
- *blobs without a row* written more than the grace period ago (checked
  again before they are reported or removed; ``--repair`` removes them
  through the orphan sweep, under its claim).  Younger ones may belong to
  an ingest in flight (the blob is written before the row): counted apart,
  never a problem, never touched.
- *size differs*: the row's size and the blob's (the listing carries both).
- with ``deep``, each blob's header is read (not its pixel data) and must
  be the instance its row names (SOP Instance, Series and Study UIDs).

``reindex`` rebuilds a lost index: each blob's header is read and indexed
by the ingest's own code (:func:`~appliance.dicomio.extract_record`,
:meth:`SqlIndex.add_instance`), the blob itself is neither rewritten nor
moved; an unreadable blob is reported and left where it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

from appliance.dicomio import extract_record, read_header
from appliance.errors import (
    ApplianceError,
    BlobNotFound,
    InvalidInstance,
    NotFound,
    StorageUnavailable,
)
from appliance.extended_tags import read_values, values_writer
from appliance.index.sql import AddOutcome, AlsoWrite, SqlIndex, StoredInstance
from appliance.ingest.sweep import (
    DEFAULT_GRACE,
    INDEX_HOLDS_NOTHING,
    INDEX_LOST,
    claimed_sweep,
    remove_unreferenced,
    sweep_holder,
)
from appliance.model import InstanceRecord
from appliance.services import Services
from appliance.storage.base import BlobEntry, BlobInfo, BlobStore

log = logging.getLogger(__name__)

#: Examples kept per kind of finding, unless the caller says otherwise.
EXAMPLES = 10
#: Index rows read per query; findings checked again per batch.
PAGE = 500
#: A seek forward this short reads past the bytes rather than opening a new
#: range of the blob (one request to a cloud store).
_SKIP_BY_READING = 256 * 1024

#: Called with what is done so far and the total, if it is known.
Progress = Callable[[int, int | None], None]

T = TypeVar("T")


class IndexNotEmpty(ApplianceError):
    """``reindex`` on an index that holds instances (without ``force``)."""


class SweepBusy(ApplianceError):
    """Another process holds the claim of the orphan sweep."""


@dataclasses.dataclass
class Findings:
    """One kind of finding: how many, and the first few as examples."""

    limit: int = EXAMPLES
    count: int = 0
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, example: dict[str, Any]) -> None:
        self.count += 1
        if len(self.examples) < self.limit:
            self.examples.append(example)

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


# ------------------------------------------------------------------- verify


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify` found and repaired."""

    grace_seconds: float
    deep: bool = False
    repair: bool = False
    drop_missing: bool = False
    #: index rows and store blobs walked
    instances: int = 0
    blobs: int = 0
    missing_blob: Findings = dataclasses.field(default_factory=Findings)
    orphan_blob: Findings = dataclasses.field(default_factory=Findings)
    #: blobs without a row younger than the grace period (not a problem)
    recent_unindexed: int = 0
    size_differs: Findings = dataclasses.field(default_factory=Findings)
    #: deep: blobs whose header could not be read
    unreadable: Findings = dataclasses.field(default_factory=Findings)
    #: deep: blobs holding another instance than their row names
    other_instance: Findings = dataclasses.field(default_factory=Findings)
    rows_dropped: int = 0
    orphans_removed: int = 0
    #: orphan blobs the store refused to delete
    repair_failed: Findings = dataclasses.field(default_factory=Findings)
    #: why a repair was not done, and other things worth knowing
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def remaining(self) -> int:
        """Problems left after the repairs."""
        return (
            self.missing_blob.count
            - self.rows_dropped
            + self.orphan_blob.count
            - self.orphans_removed
            + self.size_differs.count
            + self.unreadable.count
            + self.other_instance.count
        )

    @property
    def clean(self) -> bool:
        return self.remaining == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "problems_remaining": self.remaining,
            "instances": self.instances,
            "blobs": self.blobs,
            "grace_seconds": self.grace_seconds,
            "deep": self.deep,
            "repair": self.repair,
            "drop_missing": self.drop_missing,
            "rows_without_blob": self.missing_blob.as_json(),
            "blobs_without_row": self.orphan_blob.as_json(),
            "recent_blobs_without_row": self.recent_unindexed,
            "size_differs": self.size_differs.as_json(),
            "unreadable": self.unreadable.as_json(),
            "other_instance": self.other_instance.as_json(),
            "rows_dropped": self.rows_dropped,
            "orphans_removed": self.orphans_removed,
            "repair_failed": self.repair_failed.as_json(),
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> list[str]:
        """The report as a few lines of text."""
        grace = f"{self.grace_seconds:.0f} s"
        lines = [
            f"verified {self.instances} index row(s) against {self.blobs} blob(s) "
            f"in {self.seconds:.1f} s{' (deep: headers read)' if self.deep else ''}",
            _line(
                "rows without their blob",
                self.missing_blob.count,
                self.rows_dropped,
                "dropped" if self.drop_missing else "",
            ),
            _line(
                f"blobs without a row, older than {grace}",
                self.orphan_blob.count,
                self.orphans_removed,
                "removed" if self.repair else "",
            ),
            f"  blobs without a row, younger than {grace} (an ingest in flight?): "
            f"{self.recent_unindexed}, left alone",
            _line("sizes that differ", self.size_differs.count),
        ]
        if self.deep:
            lines.append(_line("blobs whose header cannot be read", self.unreadable.count))
            lines.append(_line("blobs holding another instance", self.other_instance.count))
        for title, found in (
            ("row without its blob", self.missing_blob),
            ("blob without a row", self.orphan_blob),
            ("size differs", self.size_differs),
            ("unreadable", self.unreadable),
            ("another instance", self.other_instance),
            ("not removed", self.repair_failed),
        ):
            lines.extend(f"  e.g. {title}: {_example(e)}" for e in found.examples[:3])
        lines.extend(f"note: {note}" for note in self.notes)
        if self.clean:
            repaired = self.rows_dropped + self.orphans_removed
            lines.append("clean" + (f" ({repaired} repaired)" if repaired else ""))
        else:
            lines.append(f"{self.remaining} problem(s) remain{_hint(self)}")
        return lines


def _line(title: str, count: int, fixed: int = 0, verb: str = "") -> str:
    return f"  {title}: {count}" + (f" ({fixed} {verb})" if verb and count else "")


def _example(example: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in example.items())


def _hint(report: VerifyReport) -> str:
    hints = []
    if report.orphan_blob.count > report.orphans_removed and not report.repair:
        hints.append("--repair removes the old blobs without a row")
    if report.missing_blob.count > report.rows_dropped and not report.drop_missing:
        hints.append("--repair --drop-missing deletes the rows without their blob")
    return f" ({'; '.join(hints)})" if hints else ""


def verify(
    services: Services,
    *,
    deep: bool = False,
    repair: bool = False,
    drop_missing: bool = False,
    grace: dt.timedelta = DEFAULT_GRACE,
    examples: int = EXAMPLES,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check every index row against the store and every blob against the
    index (see the module docstring); with *repair*, remove the old orphan
    blobs, and with *drop_missing* too the rows whose blob is missing.

    Raises
    ------
    IndexUnavailable, StorageError
        if the index or the store fails (nothing is half done: each repair
        is one index transaction or one blob).
    """
    if drop_missing and not repair:
        raise ValueError("drop_missing needs repair")
    return _Verifier(services, deep, repair, drop_missing, grace, examples, progress).run()


class _Verifier:
    def __init__(
        self,
        services: Services,
        deep: bool,
        repair: bool,
        drop_missing: bool,
        grace: dt.timedelta,
        examples: int,
        progress: Progress | None,
    ) -> None:
        self.storage = services.storage
        self.index = services.index
        self.forward_deletes_to = services.delete.forward_deletes_to
        self.progress = progress
        self.cutoff = dt.datetime.now(dt.UTC) - grace
        self.report = VerifyReport(
            grace_seconds=grace.total_seconds(),
            deep=deep,
            repair=repair,
            drop_missing=drop_missing,
        )
        _limit_examples(self.report, examples)
        self.remove_orphans = False
        self.drop_rows = drop_missing
        self.walked = 0
        self._orphans: list[BlobEntry] = []
        self._missing: list[StoredInstance] = []

    def run(self) -> VerifyReport:
        started = time.monotonic()
        self.total = self.index.count_instances()
        self.holds_nothing = self.index.holds_nothing()
        with contextlib.ExitStack() as stack:
            self.lease = None
            if self.report.repair:
                self.lease = stack.enter_context(claimed_sweep(self.index))
                if self.lease is None:
                    self.report.notes.append(
                        f"{sweep_holder(self.index)} is sweeping orphan blobs: "
                        "those found here are reported, not removed"
                    )
                # on an index that holds nothing, every blob looks like an
                # orphan: a lost index, not garbage (see ingest.sweep)
                self.remove_orphans = self.lease is not None and not self.holds_nothing
            self._walk()
        if self.holds_nothing and self.report.orphan_blob.count:
            repairing = self.report.repair and self.lease is not None
            self.report.notes.append(INDEX_HOLDS_NOTHING if repairing else INDEX_LOST)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _walk(self) -> None:
        blobs = _in_key_order(self.storage.list_blobs(), lambda b: b.key, "the store")
        rows = _in_key_order(_index_rows(self.index), lambda r: r.blob_key, "the index")
        blob, row = next(blobs, None), next(rows, None)
        if self.drop_rows and blob is None and row is not None:
            self.drop_rows = False
            self.report.notes.append(
                "the store lists no blob at all while the index lists instances "
                "(is the storage configured right?): no row was dropped"
            )
        while blob is not None or row is not None:
            if row is None or (blob is not None and blob.key < row.blob_key):
                assert blob is not None
                self._blob_without_row(blob)
                blob = next(blobs, None)
            elif blob is None or row.blob_key < blob.key:
                self._row_without_blob(row)
                row = next(rows, None)
            else:
                self._pair(row, blob)
                blob, row = next(blobs, None), next(rows, None)
            self.walked += 1
            if self.lease is not None:
                self.lease.keep()
            if self.progress is not None:
                self.progress(self.walked, self.total)
        self._settle_orphans()
        self._settle_missing()

    # ------------------------------------------------------------- findings

    def _blob_without_row(self, blob: BlobEntry) -> None:
        self.report.blobs += 1
        if blob.modified >= self.cutoff:
            self.report.recent_unindexed += 1
            return
        self._orphans.append(blob)
        if len(self._orphans) >= PAGE:
            self._settle_orphans()

    def _row_without_blob(self, row: StoredInstance) -> None:
        self.report.instances += 1
        self._missing.append(row)
        if len(self._missing) >= PAGE:
            self._settle_missing()

    def _pair(self, row: StoredInstance, blob: BlobEntry) -> None:
        self.report.instances += 1
        self.report.blobs += 1
        if row.size != blob.size:
            self.report.size_differs.add(
                {**_identity(row), "index_size": row.size, "blob_size": blob.size}
            )
        if self.report.deep:
            self._check_header(row, blob)

    def _check_header(self, row: StoredInstance, blob: BlobEntry) -> None:
        try:
            record = read_record(self.storage, blob)
        except BlobNotFound:
            self.report.instances -= 1  # deleted since it was listed: look again
            self.report.blobs -= 1
            self._row_without_blob(row)
            return
        except StorageUnavailable:
            raise
        except ApplianceError as exc:
            self.report.unreadable.add({**_identity(row), "reason": exc.reason})
            return
        found = {
            "sop_instance_uid": record.instance.sop_instance_uid,
            "series_instance_uid": record.series.series_instance_uid,
            "study_instance_uid": record.study.study_instance_uid,
        }
        expected = {
            "sop_instance_uid": row.sop_instance_uid,
            "series_instance_uid": row.series_instance_uid,
            "study_instance_uid": row.study_instance_uid,
        }
        if found != expected:
            self.report.other_instance.add({**_identity(row), "blob_holds": found})

    def _settle_orphans(self) -> None:
        """Check the candidate orphans against the index again (a row may
        have been committed since), count them, remove them if repairing."""
        batch, self._orphans = self._orphans, []
        if not batch:
            return
        keys = [blob.key for blob in batch]
        if self.remove_orphans:
            removal = remove_unreferenced(self.storage, self.index, keys)
            unreferenced = set(removal.unreferenced)
            self.report.orphans_removed += len(removal.removed)
            for key, reason in removal.failed:
                self.report.repair_failed.add({"blob_key": key, "reason": reason})
        else:
            unreferenced = set(keys) - self.index.blob_keys(keys)
        for blob in batch:
            if blob.key in unreferenced:
                self.report.orphan_blob.add(
                    {
                        "blob_key": blob.key,
                        "size": blob.size,
                        "written": blob.modified.isoformat(timespec="seconds"),
                    }
                )

    def _settle_missing(self) -> None:
        """Check the candidate rows again (the blob may have been written,
        or the row deleted, since the listings were read), count them, drop
        them with ``drop_missing``."""
        batch, self._missing = self._missing, []
        if not batch:
            return
        absent = [row for row in batch if not self.storage.exists(row.blob_key)]
        still = self.index.blob_keys([row.blob_key for row in absent])
        for row in absent:
            if row.blob_key not in still:
                continue  # deleted or replaced meanwhile
            self.report.missing_blob.add(_identity(row))
            if self.drop_rows:
                self._drop(row)

    def _drop(self, row: StoredInstance) -> None:
        try:
            self.index.in_partition(row.partition_key).delete(
                row.study_instance_uid,
                row.series_instance_uid,
                row.sop_instance_uid,
                forward_to=self.forward_deletes_to,
                blob_key=row.blob_key,
            )
        except NotFound:
            return  # deleted or replaced meanwhile
        self.report.rows_dropped += 1
        log.warning(
            "dropped the index row of instance %s (series %s, study %s): its blob %s is missing",
            row.sop_instance_uid,
            row.series_instance_uid,
            row.study_instance_uid,
            row.blob_key,
        )


def _limit_examples(report: object, examples: int) -> None:
    for value in vars(report).values():
        if isinstance(value, Findings):
            value.limit = examples


def _identity(row: StoredInstance) -> dict[str, Any]:
    """How a finding names an instance: UIDs and its blob key, no patient data."""
    return {
        "sop_instance_uid": row.sop_instance_uid,
        "series_instance_uid": row.series_instance_uid,
        "study_instance_uid": row.study_instance_uid,
        "blob_key": row.blob_key,
    }


def _index_rows(index: SqlIndex) -> Iterator[StoredInstance]:
    after = ""
    while page := index.blob_page(after, PAGE):
        yield from page
        after = page[-1].blob_key


def _in_key_order(items: Iterable[T], key: Callable[[T], str], source: str) -> Iterator[T]:
    """*items*, checked to come in strictly ascending key order (the walk
    relies on it; a store or a database collation that orders keys in
    another way is reported rather than misread)."""
    previous: str | None = None
    for item in items:
        current = key(item)
        if previous is not None and current <= previous:
            raise ApplianceError(
                f"{source} listed blob keys out of order ({previous} before {current}): "
                "cannot compare the index with the store"
            )
        previous = current
        yield item


# ------------------------------------------------------------ reading blobs


class _RangeReader(io.RawIOBase):
    """A blob as a seekable stream, read through ranged reads: a seek only
    moves the position (a short skip forward reads past the bytes), and the
    next read opens a range from there.  pydicom and the header reader seek;
    a cloud store's stream cannot, and copying the whole blob to read its
    header would read the pixel data too.  The ranges the store opens are
    buffered streams already, so this is not wrapped in another buffer (and
    it must not be an ``io.BufferedReader``: pydicom takes one for a file it
    may open again by name)."""

    def __init__(self, storage: BlobStore, entry: BlobEntry) -> None:
        self._storage = storage
        self._key = entry.key
        self._size = entry.size
        self._position = 0
        self._stream: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        position = base + offset
        if position < 0:
            raise ValueError("negative seek position")
        skip = position - self._position
        if self._stream is not None and 0 < skip <= _SKIP_BY_READING:
            self._position += len(self._stream.read(skip))
        if position != self._position:
            self._drop_stream()
            self._position = position
        return position

    def readinto(self, buffer: Any) -> int:
        if self._position >= self._size:
            return 0
        if self._stream is None:
            self._stream = self._storage.open_range(self._key, self._position)
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._drop_stream()
        super().close()


def read_record(storage: BlobStore, entry: BlobEntry) -> InstanceRecord:
    """What the index keeps of the instance in a blob, from its header (the
    ingest's own reader: up to the last indexed attribute, never the pixel
    data).

    Raises
    ------
    UnreadableInstance, InvalidInstance
        if the blob is not a Part 10 file the ingest would index.
    BlobNotFound, StorageError
        if the store cannot read it.
    """
    with _RangeReader(storage, entry) as stream:
        return extract_record(read_header(stream))  # type: ignore[arg-type]


# ------------------------------------------------------------------ reindex


@dataclasses.dataclass
class ReindexReport:
    """What :func:`reindex` did."""

    force: bool = False
    #: blobs the store listed
    blobs: int = 0
    #: instances indexed from their blob
    indexed: int = 0
    #: (force) blobs an index row already named
    already_indexed: int = 0
    #: blobs holding an instance indexed from another blob (left in the store)
    duplicates: Findings = dataclasses.field(default_factory=Findings)
    #: (force) blobs of instances the change feed says were deleted here
    deleted_here: Findings = dataclasses.field(default_factory=Findings)
    unreadable: Findings = dataclasses.field(default_factory=Findings)
    #: blobs the index refused (e.g. a Series UID already under another study)
    refused: Findings = dataclasses.field(default_factory=Findings)
    #: blobs deleted between the listing and their read
    vanished: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unreadable.count and not self.refused.count

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "force": self.force,
            "blobs": self.blobs,
            "indexed": self.indexed,
            "already_indexed": self.already_indexed,
            "duplicates": self.duplicates.as_json(),
            "deleted_here": self.deleted_here.as_json(),
            "unreadable": self.unreadable.as_json(),
            "refused": self.refused.as_json(),
            "vanished": self.vanished,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> list[str]:
        lines = [
            f"reindexed {self.blobs} blob(s) in {self.seconds:.1f} s",
            f"  instances indexed: {self.indexed}",
        ]
        if self.force:
            lines.append(f"  already in the index: {self.already_indexed}")
            lines.append(
                f"  deleted here (left in the store, not indexed): {self.deleted_here.count}"
            )
        lines += [
            f"  other copies of an indexed instance (left in the store): {self.duplicates.count}",
            f"  unreadable (left in the store): {self.unreadable.count}",
            f"  refused by the index: {self.refused.count}",
        ]
        if self.vanished:
            lines.append(f"  deleted while reindexing: {self.vanished}")
        for title, found in (
            ("unreadable", self.unreadable),
            ("refused", self.refused),
            ("other copy", self.duplicates),
            ("deleted here", self.deleted_here),
        ):
            lines.extend(f"  e.g. {title}: {_example(e)}" for e in found.examples[:3])
        if self.ok:
            lines.append("done")
        else:
            count = self.unreadable.count + self.refused.count
            lines.append(f"{count} blob(s) not indexed (listed above and in --json)")
        return lines


def reindex(
    services: Services,
    *,
    force: bool = False,
    examples: int = EXAMPLES,
    progress: Progress | None = None,
) -> ReindexReport:
    """Rebuild the index from the store: index every blob's instance as the
    ingest would have (its row keeps the blob's write time), without
    writing any blob and without queueing any forwarding.

    The blobs are read in key order, which is the order of the hours they
    were written in, and within an hour in order of their write times, so
    that each study and series row is made from the same first instance as
    when the instances arrived.  Two blobs of one SOP Instance UID (a copy
    a failed delete left) are settled by ``ingest.duplicate_policy``, by
    their write times: the newer one under ``replace``, the older one
    otherwise; the other stays in the store without a row (the orphan sweep
    removes it).

    The orphan sweep is claimed for the whole run, so that no node removes
    blobs this has not indexed yet.

    Raises
    ------
    IndexNotEmpty
        if the index holds anything and *force* is false.
    SweepBusy
        if another process holds the claim of the orphan sweep.
    IndexUnavailable, StorageUnavailable
        if the index or the store fails (run it again with *force*).
    """
    index = services.index
    if not force and not index.holds_nothing():
        count = index.count_instances()
        raise IndexNotEmpty(
            f"the index is not empty ({count} instance(s)"
            f"{'' if count else ', deletions in its change feed'}): reindex rebuilds a lost "
            "index from the store; with --force it adds what the index is missing"
        )
    report = ReindexReport(force=force)
    _limit_examples(report, examples)
    started = time.monotonic()
    with claimed_sweep(index) as lease:
        if lease is None:
            raise SweepBusy(
                f"{sweep_holder(index)} is sweeping orphan blobs; reindex must not run "
                "beside it: try again when it is done"
            )
        walker = _Reindexer(services, report, force)
        entries = _in_key_order(services.storage.list_blobs(), lambda b: b.key, "the store")
        for _hour, group in itertools.groupby(entries, key=lambda b: b.key[:4]):
            hour = sorted(group, key=lambda b: (b.modified, b.key))
            known = index.blob_keys([b.key for b in hour]) if force else set()
            for entry in hour:
                report.blobs += 1
                if entry.key in known:
                    report.already_indexed += 1
                else:
                    walker.index_blob(entry)
                lease.keep()
                if progress is not None:
                    progress(report.blobs, None)
    report.seconds = time.monotonic() - started
    log.info("reindex: %d instance(s) indexed from %d blob(s)", report.indexed, report.blobs)
    return report


class _Reindexer:
    def __init__(self, services: Services, report: ReindexReport, force: bool) -> None:
        self.storage = services.storage
        self.index = services.index
        self.policy = services.config.ingest.duplicate_policy
        self.report = report
        self.force = force
        #: the extended query tags whose values are indexed with each row
        self.extended = services.extended

    def _extended_values(self, entry: BlobEntry) -> AlsoWrite | None:
        """What writes the extended query tags' values of the blob *entry*
        (None when no tag is defined); an unreadable header is an error of
        each tag, as at ingest.  The header only is read (ranged reads)."""
        tags = self.extended.indexed()
        if not tags:
            return None
        try:
            with _RangeReader(self.storage, entry) as stream:
                return values_writer(read_values(stream, tags))  # type: ignore[arg-type]
        except BlobNotFound:
            return None  # deleted since its header was read: the index says so next

    def index_blob(self, entry: BlobEntry) -> None:
        """Index the instance of one blob (unless the index knows better)."""
        try:
            record = read_record(self.storage, entry)
        except BlobNotFound:
            self.report.vanished += 1
            return
        except StorageUnavailable:
            raise
        except ApplianceError as exc:
            self.report.unreadable.add(
                {"blob_key": entry.key, "size": entry.size, "reason": exc.reason}
            )
            log.warning("reindex: blob %s is not indexed: %s", entry.key, exc.reason)
            return
        sop_uid = record.instance.sop_instance_uid
        if (
            self.force
            and self.index.find_instance(sop_uid) is None
            and self.index.last_action(sop_uid) == "delete"
        ):
            self.report.deleted_here.add({"blob_key": entry.key, "sop_instance_uid": sop_uid})
            return
        blob = BlobInfo(entry.key, entry.size)
        try:
            also = self._extended_values(entry)
            added = self.index.add_instance(
                record, blob, "keep", (), written_at=entry.modified, also=also
            )
            if added.outcome is AddOutcome.CREATED:
                self.report.indexed += 1
                return
            self._duplicate(record, entry, blob)
        except InvalidInstance as exc:
            self.report.refused.add(
                {"blob_key": entry.key, "sop_instance_uid": sop_uid, "reason": exc.reason}
            )
            log.warning("reindex: blob %s (%s) is not indexed: %s", entry.key, sop_uid, exc.reason)

    def _duplicate(self, record: InstanceRecord, entry: BlobEntry, blob: BlobInfo) -> None:
        sop_uid = record.instance.sop_instance_uid
        existing = self.index.find_instance(sop_uid)
        if existing is None:  # deleted meanwhile
            return
        written = existing.updated_at
        if written is not None and written.tzinfo is None:
            written = written.replace(tzinfo=dt.UTC)
        # "replace" keeps the copy written last, "keep" and "reject" the first
        if written is None or entry.modified == written:
            wins = False
        elif self.policy == "replace":
            wins = entry.modified > written
        else:
            wins = entry.modified < written
        if wins:
            also = self._extended_values(entry)
            self.index.add_instance(
                record, blob, "replace", (), written_at=entry.modified, also=also
            )
            indexed, other = entry.key, existing.blob_key
        else:
            indexed, other = existing.blob_key, entry.key
        self.report.duplicates.add(
            {"sop_instance_uid": sop_uid, "indexed_blob_key": indexed, "other_blob_key": other}
        )
