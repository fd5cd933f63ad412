"""``dicom-appliance copy``: every instance of one appliance into another,
e.g. from the embedded SQLite + disk to PostgreSQL + an object store.

Each stored instance is read from the source's storage and stored into the
target through the target's own ingest pipeline, exactly as a STOW-RS of
the stored file would be: the same bytes, a new blob in the target's store,
index rows made from the header as every ingest makes them, and a change-feed
entry in the target.  An instance the target already holds (same SOP
Instance UID) is skipped without reading its blob, so a copy that was
interrupted (or the source that kept receiving) is completed by running the
command again; a blob the target wrote but did not index when the copy was
killed is removed by the target's orphan sweep.

Not copied: the source's change-feed history (the target's feed lists the
copied instances in copy order), its metadata cache (rebuilt on demand) and
pending Storage Commitment reports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from appliance.errors import ApplianceError
from appliance.model import Origin
from appliance.services import Services
from appliance.status import StatusCategory

LOGGER = logging.getLogger(__name__)

#: Instances read from the source index per query.
PAGE = 500


@dataclasses.dataclass
class CopyReport:
    """What a copy did."""

    copied: int = 0
    already_there: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def seen(self) -> int:
        return self.copied + self.already_there + len(self.failed)


def copy_instances(
    source: Services,
    target: Services,
    progress: Callable[[CopyReport], None] | None = None,
    *,
    every: int = 1000,
) -> CopyReport:
    """Copy every instance of *source* that *target* lacks (see the module
    docstring); *progress* is called every *every* instances and at the end.

    Raises
    ------
    IndexUnavailable
        if either index fails (the copy can be run again).
    """
    report = CopyReport()
    started = time.monotonic()
    origin = Origin("import", calling_ae="copy")
    after = 0
    while page := source.index.stored_page(after, PAGE):
        for row_id, stored in page:
            after = row_id
            if target.index.find_instance(stored.sop_instance_uid) is not None:
                report.already_there += 1
            else:
                try:
                    with source.retrieve.open(stored) as stream:
                        result = target.ingest.store_part10(stream, origin)
                except ApplianceError as exc:
                    LOGGER.error("not copied: %s: %s", stored.sop_instance_uid, exc.reason)
                    report.failed.append(stored.sop_instance_uid)
                else:
                    if result.status.category is StatusCategory.SUCCESS:
                        report.copied += 1
                    elif result.status.category is StatusCategory.WARNING:
                        report.already_there += 1  # stored meanwhile (duplicate kept)
                    else:
                        LOGGER.error("not copied: %s: %s", stored.sop_instance_uid, result.reason)
                        report.failed.append(stored.sop_instance_uid)
            if progress is not None and report.seen % every == 0:
                report.seconds = time.monotonic() - started
                progress(report)
    report.seconds = time.monotonic() - started
    if progress is not None:
        progress(report)
    return report
