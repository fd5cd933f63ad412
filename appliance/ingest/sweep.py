"""Removing blobs no index row references (left by a crash between the blob
write and the index commit, or by a failed delete)."""

from __future__ import annotations

import datetime as dt
import itertools
import logging

from appliance.index.sql import SqlIndex
from appliance.storage.base import BlobStore

log = logging.getLogger(__name__)

#: A blob younger than this may belong to an ingest still in progress.
DEFAULT_GRACE = dt.timedelta(hours=1)
_BATCH = 500


def sweep_orphans(storage: BlobStore, index: SqlIndex, grace: dt.timedelta = DEFAULT_GRACE) -> int:
    """Delete unreferenced blobs written more than *grace* ago; return how many."""
    cutoff = dt.datetime.now(dt.UTC) - grace
    removed = 0
    keys = storage.iter_blobs(cutoff)
    while batch := list(itertools.islice(keys, _BATCH)):
        referenced = index.blob_keys(batch)
        for key in batch:
            if key not in referenced:
                storage.delete(key)
                removed += 1
    if removed:
        log.info("swept %d unreferenced blob(s)", removed)
    return removed
