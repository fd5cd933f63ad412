"""Finding stored instances and opening their bytes (WADO-RS, C-MOVE, C-GET)."""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from appliance.index.sql import SqlIndex, StoredInstance, rebound
from appliance.storage.base import CHUNK_SIZE, BlobStore

#: Bytes of a remote blob held in memory when it is copied to be read with
#: seeks; a larger one goes on to a temporary file.
SPOOL_IN_MEMORY = 16 * 1024 * 1024


class RetrieveService:
    """Read access to what the index lists and the storage holds."""

    def __init__(self, index: SqlIndex, storage: BlobStore) -> None:
        self.index = index
        self.storage = storage

    def in_partition(self, partition_key: int) -> RetrieveService:
        """This service on the data partition *partition_key*."""
        return rebound(self, partition_key)

    def instances(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[StoredInstance]:
        """The instances of a study, a series of it, or one instance, in
        retrieve order (series number, instance number).  Raises NotFound."""
        return self.index.instances(study_uid, series_uid, sop_uid)

    def open(self, stored: StoredInstance) -> IO[bytes]:
        """The instance's Part 10 bytes, exactly as stored, in a stream that
        can seek (pydicom and the header readers seek).  A cloud store's
        stream cannot: its blob is copied first, in memory up to
        :data:`SPOOL_IN_MEMORY`, on a temporary file beyond."""
        stream = self.storage.open(stored.blob_key)
        if stream.seekable():
            return stream
        copy = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        try:
            with stream:
                while chunk := stream.read(CHUNK_SIZE):
                    copy.write(chunk)
            copy.seek(0)
        except BaseException:
            copy.close()
            raise
        return copy

    def stream(self, stored: StoredInstance) -> IO[bytes]:
        """The instance's Part 10 bytes as stored, to be read once from the
        start (no seeking): no copy of a cloud store's blob is made."""
        return self.storage.open(stored.blob_key)

    def open_range(self, stored: StoredInstance, offset: int, length: int | None) -> IO[bytes]:
        """*length* bytes of the instance from *offset* (bulk data, frames)."""
        return self.storage.open_range(stored.blob_key, offset, length)

    def local_path(self, stored: StoredInstance) -> AbstractContextManager[Path]:
        """A local file of the instance's Part 10 bytes, valid inside the
        context (see :meth:`BlobStore.local_path`)."""
        return self.storage.local_path(stored.blob_key)
