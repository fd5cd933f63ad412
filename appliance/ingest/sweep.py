"""Removing blobs no index row references (left by a crash between the blob
write and the index commit, or by a failed delete).

One sweep for every caller: ``serve`` runs it once at start, ``dicom-appliance
sweep`` on demand, ``dicom-appliance verify --repair`` on the orphans it
found.  Nodes sharing the index and the store sweep one at a time: the sweep
is claimed in the index (``task_lease``, :func:`claimed_sweep`), and
``reindex`` holds the same claim, so no sweep removes blobs it has not
indexed yet.

A blob is removed only if it was written more than a grace period ago (an
ingest in flight writes its blob before its row) and more than a grace
period before the index's newest change-feed entry, and no row references
it when it is removed.  The second rule keeps the blobs an index restored
from an older backup does not know (stored after the backup: acknowledged
instances, which ``dicom-appliance reindex --force`` adds back) from being
taken for orphans; an orphan of a crash is swept once later changes have
come.  An index that holds nothing at all (no instance and no
change-feed entry: lost and created again, or new beside an old store) is
not trusted: the sweep removes nothing and says so, because every blob of
the store would look like an orphan (``dicom-appliance reindex`` rebuilds
such an index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from appliance.errors import ApplianceError, IndexUnavailable
from appliance.index.sql import SqlIndex
from appliance.storage.base import BlobStore

log = logging.getLogger(__name__)

#: A blob younger than this may belong to an ingest still in progress.
DEFAULT_GRACE = dt.timedelta(hours=1)
#: The ``task_lease`` row of the sweep (and of anything that must not run
#: beside it, such as ``reindex``).
SWEEP_TASK = "orphan-sweep"
#: The longest a claim of the sweep keeps the others off it if its holder
#: dies; a holder that works longer renews it (:meth:`SweepLease.keep`).
SWEEP_LEASE = dt.timedelta(hours=1)
_BATCH = 500

#: Called with the number of blobs looked at so far.
Progress = Callable[[int], None]

#: What an index that holds nothing beside a store that holds blobs means.
INDEX_LOST = (
    "the index holds no instance and no change-feed entry, but the store holds blobs: "
    "if the index was lost, rebuild it with `dicom-appliance reindex`"
)
INDEX_HOLDS_NOTHING = f"{INDEX_LOST}; no blob was removed"


class LeaseLost(ApplianceError):
    """The claim of the sweep ran out and another node took it."""


class SweepLease:
    """A claim of the sweep held by this process (see :func:`claimed_sweep`)."""

    def __init__(self, index: SqlIndex, holder: str, lease: dt.timedelta = SWEEP_LEASE) -> None:
        self.index = index
        self.holder = holder
        self.lease = lease
        self._renewed = time.monotonic()

    def keep(self) -> None:
        """Renew the claim once a quarter of the lease has passed; call it
        often during long work.

        Raises
        ------
        LeaseLost
            if the claim ran out and another holder has it now.
        """
        if time.monotonic() - self._renewed < self.lease.total_seconds() / 4:
            return
        if not self.index.renew(SWEEP_TASK, self.holder, self.lease):
            raise LeaseLost(f"the claim of the orphan sweep ({self.holder}) was lost")
        self._renewed = time.monotonic()


def default_holder() -> str:
    """This process, as a lease holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def claimed_sweep(index: SqlIndex, holder: str | None = None) -> Iterator[SweepLease | None]:
    """Claim the sweep for this process for the ``with`` block; yields the
    lease, or None if another holder has it (then nothing must be swept)."""
    holder = holder or default_holder()
    if not index.claim(SWEEP_TASK, holder, SWEEP_LEASE):
        yield None
        return
    try:
        yield SweepLease(index, holder)
    finally:
        try:
            index.release(SWEEP_TASK, holder)
        except IndexUnavailable as exc:  # the claim lapses by itself
            log.warning("could not release the claim of the orphan sweep: %s", exc.reason)


def sweep_holder(index: SqlIndex) -> str:
    """Who holds the claim of the sweep, for a message."""
    holder = index.claimed_by(SWEEP_TASK)
    if holder is None:
        return "another process"
    name, until = holder
    return f"{name} (claimed until {until.isoformat(timespec='seconds')})"


@dataclasses.dataclass
class Removal:
    """What :func:`remove_unreferenced` did with some candidate keys."""

    #: the candidates no row referenced when they were checked
    unreferenced: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    #: (key, reason) of removals the store refused
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def remove_unreferenced(storage: BlobStore, index: SqlIndex, keys: Sequence[str]) -> Removal:
    """Delete those of *keys* that no index row references, checked now (a
    row written since the keys were listed keeps its blob)."""
    result = Removal()
    referenced = index.blob_keys(keys)
    for key in keys:
        if key in referenced:
            continue
        result.unreferenced.append(key)
        try:
            storage.delete(key)
        except ApplianceError as exc:
            result.failed.append((key, exc.reason))
        else:
            result.removed.append(key)
    return result


@dataclasses.dataclass
class SweepReport:
    """What one sweep did."""

    grace_seconds: float
    #: blobs older than the grace period looked at
    checked: int = 0
    removed: int = 0
    #: (key, reason) of blobs that could not be removed
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: why nothing was removed, if the sweep refused (see the module docstring)
    refused: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.refused

    def as_json(self, examples: int = 10) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "grace_seconds": self.grace_seconds,
            "checked": self.checked,
            "removed": self.removed,
            "failed": {
                "count": len(self.failed),
                "examples": [{"blob_key": k, "reason": r} for k, r in self.failed[:examples]],
            },
            "refused": self.refused,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> list[str]:
        """The report as a few lines of text."""
        lines = [
            f"looked at {self.checked} blob(s) written more than {self.grace_seconds:.0f} s ago, "
            f"in {self.seconds:.1f} s",
            f"  removed (no index row): {self.removed}",
            f"  could not be removed: {len(self.failed)}",
        ]
        lines += [f"  e.g. {key}: {reason}" for key, reason in self.failed[:3]]
        if self.refused:
            lines.append(f"refused: {self.refused}")
        lines.append("done" if self.ok else "not done")
        return lines


def _cutoff(index: SqlIndex, grace: dt.timedelta) -> dt.datetime:
    """Blobs written before this may be swept: *grace* before now, or before
    the index's newest change if that is earlier (see the module docstring)."""
    moment = dt.datetime.now(dt.UTC)
    newest = index.latest_change()
    if newest is not None:
        stamp = newest.timestamp
        moment = min(moment, stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC))
    return moment - grace


def sweep_orphans(
    storage: BlobStore,
    index: SqlIndex,
    grace: dt.timedelta = DEFAULT_GRACE,
    *,
    lease: SweepLease | None = None,
    progress: Progress | None = None,
) -> SweepReport:
    """Delete unreferenced blobs written more than *grace* ago.  The caller
    holds the claim (*lease*, renewed as the sweep goes, or claimed by other
    means); see the module docstring for what is never removed."""
    started = time.monotonic()
    report = SweepReport(grace_seconds=grace.total_seconds())
    cutoff = _cutoff(index, grace)
    keys = storage.iter_blobs(cutoff)
    while batch := list(itertools.islice(keys, _BATCH)):
        if lease is not None:
            lease.keep()
        report.checked += len(batch)
        if report.checked == len(batch) and index.holds_nothing():
            report.refused = INDEX_HOLDS_NOTHING
            log.warning("orphan sweep: %s", INDEX_HOLDS_NOTHING)
            break
        removal = remove_unreferenced(storage, index, batch)
        report.removed += len(removal.removed)
        report.failed.extend(removal.failed)
        for key, reason in removal.failed:
            log.warning("orphan sweep: blob %s stays: %s", key, reason)
        if progress is not None:
            progress(report.checked)
    report.seconds = time.monotonic() - started
    if report.removed:
        log.info("swept %d unreferenced blob(s)", report.removed)
    return report
