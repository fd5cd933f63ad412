"""A seekable read-only stream of a prefix followed by another stream."""

from __future__ import annotations

import io
from typing import IO


class PrefixedStream(io.RawIOBase):
    """``prefix + source`` as one seekable stream, without copying *source*.

    Used to put the File Meta Information in front of a data set received
    over DIMSE, for both header parsing and the blob write.
    """

    #: pydicom asks a stream for its name; this one is no file to reopen
    name = "<data set received over DIMSE>"

    def __init__(self, prefix: bytes, source: IO[bytes]) -> None:
        self._prefix = prefix
        self._source = source
        self._base = source.tell()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        else:
            end = self._source.seek(0, io.SEEK_END) - self._base
            pos = len(self._prefix) + end + offset
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = len(buffer)
        done = 0
        plen = len(self._prefix)
        if self._pos < plen and n:
            chunk = self._prefix[self._pos : self._pos + n]
            buffer[: len(chunk)] = chunk
            done = len(chunk)
            self._pos += done
        if done < n:
            self._source.seek(self._base + self._pos - plen)
            data = self._source.read(n - done)
            buffer[done : done + len(data)] = data
            done += len(data)
            self._pos += len(data)
        return done
