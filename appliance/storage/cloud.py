"""What the object-store backends (Azure Blob, S3) share: the keys, the
counting of uploaded bytes, streams over downloaded chunks, and a temporary
local copy for readers that need a file."""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from appliance.errors import BlobNotFound
from appliance.storage.base import CHUNK_SIZE

KEY_RE = re.compile(r"[0-9a-f]{32}")
#: Retries of a failed request (connection error, timeout, 408/429/5xx),
#: unless ``storage.retries`` says otherwise.
RETRIES = 3
#: Seconds to wait for a connection, and for data on it.
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
#: HTTP statuses that say "try again later".
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def new_key() -> str:
    """32 hex digits: the hour of writing (hours since the epoch, modulo
    65536), then 28 random ones (as the filesystem backend's keys)."""
    return f"{(int(time.time()) // 3600) & 0xFFFF:04x}{secrets.token_hex(14)}"


def object_name(key: str) -> str:
    """The object name of *key*: the key itself, refused unless it is one
    this store makes (the only place a key becomes a name)."""
    if KEY_RE.fullmatch(key) is None:
        raise BlobNotFound(f"not a blob key of this store: {key!r}")
    return key


def position(source: IO[bytes]) -> int | None:
    """Where *source* is, if it can be read again from there."""
    try:
        return source.tell() if source.seekable() else None
    except (OSError, ValueError):
        return None


def remaining(source: IO[bytes]) -> int | None:
    """How many bytes *source* holds from where it is, if it can tell (it is
    left where it was)."""
    start = position(source)
    if start is None:
        return None
    try:
        end = source.seek(0, io.SEEK_END)
        source.seek(start)
    except (OSError, ValueError):
        return None
    return end - start


class CountingReader(io.RawIOBase):
    """The source stream, counting the bytes read from it."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.size += n
        return n


class ChunkReader(io.RawIOBase):
    """A raw stream over downloaded chunks; each ``next()`` runs inside
    *errors* (the backend's mapping of its SDK's exceptions)."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        errors: Callable[[], AbstractContextManager[None]],
        close: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._errors = errors
        self._close = close
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                with self._errors():
                    chunk = next(self._chunks)
            except StopIteration:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if self._close is not None and not self.closed:
            with contextlib.suppress(Exception):
                self._close()
        super().close()


def buffered(raw: io.RawIOBase) -> IO[bytes]:
    return io.BufferedReader(raw, CHUNK_SIZE)


@contextlib.contextmanager
def temporary_copy(source: IO[bytes]) -> Iterator[Path]:
    """A read-only temporary file holding the rest of *source* (closed
    here), removed when the context ends."""
    fd, name = tempfile.mkstemp(prefix="appliance-blob-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, source:
            while chunk := source.read(CHUNK_SIZE):
                out.write(chunk)
        path.chmod(0o400)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
