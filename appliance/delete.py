"""Deleting studies, series and instances: index first, then blobs."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

from appliance.errors import ApplianceError
from appliance.index.sql import SqlIndex, StoredInstance, rebound
from appliance.storage.base import BlobStore

log = logging.getLogger(__name__)


class DeleteService:
    """Removes what the index lists, and then its bytes.

    The index transaction goes first (rows and ``delete`` change-feed entries
    together), so no row ever points at a missing blob; a blob whose delete
    fails afterwards is unreferenced and the orphan sweep removes it.
    """

    def __init__(
        self, index: SqlIndex, storage: BlobStore, forward_deletes_to: Sequence[str] = ()
    ) -> None:
        self.index = index
        self.storage = storage
        #: the forwarding destinations that are sent deletions
        self.forward_deletes_to = tuple(forward_deletes_to)

    def in_partition(self, partition_key: int) -> DeleteService:
        """This service on the data partition *partition_key*."""
        return rebound(self, partition_key)

    def delete(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        *,
        idle_since: dt.datetime | None = None,
    ) -> list[StoredInstance]:
        """Delete a study, a series of it, or one instance; what was deleted.

        Raises
        ------
        NotFound
            if nothing is stored there.
        IndexUnavailable
            if the index fails (then nothing was deleted).
        """
        removed = self.index.delete(
            study_uid,
            series_uid,
            sop_uid,
            forward_to=self.forward_deletes_to,
            idle_since=idle_since,
        )
        failed = 0
        for stored in removed:
            try:
                self.storage.delete(stored.blob_key)
            except ApplianceError as exc:
                failed += 1
                log.warning(
                    "blob %s of a deleted instance stays for the sweeper: %s",
                    stored.blob_key,
                    exc.reason,
                )
        log.info(
            "deleted %d instance(s) of study %s%s",
            len(removed),
            study_uid,
            f" ({failed} blob(s) left for the sweeper)" if failed else "",
        )
        return removed
