"""The blob store interface every backend implements."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Protocol

#: Bytes copied per read/write call when streaming.
CHUNK_SIZE = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its opaque key and size in bytes."""

    key: str
    size: int


@dataclasses.dataclass(frozen=True)
class BlobEntry:
    """A blob as a listing of the store shows it."""

    key: str
    size: int
    #: when it was last written (timezone-aware)
    modified: dt.datetime


class BlobStore(Protocol):
    """Durable, opaque-keyed byte storage.

    ``put`` returns only when the bytes are durable; a put interrupted at any
    point leaves nothing visible under any key.
    """

    def put(self, source: IO[bytes]) -> BlobInfo:
        """Store the rest of *source* under a new key; durable on return."""
        ...

    def open(self, key: str) -> IO[bytes]:
        """A readable binary stream of the whole blob.  Raises BlobNotFound."""
        ...

    def open_range(self, key: str, offset: int, length: int | None = None) -> IO[bytes]:
        """A stream of *length* bytes from *offset* (to the end if None)."""
        ...

    def local_path(self, key: str) -> AbstractContextManager[Path]:
        """A local file holding the blob, for readers that take a path (the
        DIMSE sender streams a file in PDU-sized chunks), valid inside the
        context.  A local backend yields the blob's own file (read only); a
        remote one a temporary copy.  Raises BlobNotFound."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; removing a missing one is not an error."""
        ...

    def exists(self, key: str) -> bool:
        """True if a blob is stored under *key*."""
        ...

    def check(self) -> None:
        """Raise StorageError unless the store is reachable and writable."""
        ...

    def iter_blobs(self, older_than: dt.datetime) -> Iterator[str]:
        """Keys of blobs last written before *older_than* (for sweeping
        orphans); also removes abandoned temporary files older than that."""
        ...

    def list_blobs(self) -> Iterator[BlobEntry]:
        """Every blob of the store, in ascending key order (as ``str``
        compares them), with its size and write time; nothing else is
        listed and nothing is changed (for checking the store against the
        index, and for rebuilding the index from the store)."""
        ...
