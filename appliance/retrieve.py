"""Finding stored instances and opening their bytes (WADO-RS, C-MOVE, C-GET)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from appliance.index.sql import SqlIndex, StoredInstance
from appliance.storage.base import BlobStore


class RetrieveService:
    """Read access to what the index lists and the storage holds."""

    def __init__(self, index: SqlIndex, storage: BlobStore) -> None:
        self.index = index
        self.storage = storage

    def instances(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[StoredInstance]:
        """The instances of a study, a series of it, or one instance, in
        retrieve order (series number, instance number).  Raises NotFound."""
        return self.index.instances(study_uid, series_uid, sop_uid)

    def open(self, stored: StoredInstance) -> IO[bytes]:
        """The instance's Part 10 bytes, exactly as stored."""
        return self.storage.open(stored.blob_key)

    def open_range(self, stored: StoredInstance, offset: int, length: int | None) -> IO[bytes]:
        """*length* bytes of the instance from *offset* (bulk data, frames)."""
        return self.storage.open_range(stored.blob_key, offset, length)

    def local_path(self, stored: StoredInstance) -> AbstractContextManager[Path]:
        """A local file of the instance's Part 10 bytes, valid inside the
        context (see :meth:`BlobStore.local_path`)."""
        return self.storage.local_path(stored.blob_key)
