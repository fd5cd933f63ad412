"""A streaming reader of ``multipart/related`` request bodies.

DICOMweb sends instances as ``multipart/related`` (RFC 2387) with one part
per instance (PS3.18 8.6.1.2, 10.5.1.2).  :class:`MultipartReader` reads the
body from a stream in chunks and feeds python-multipart's low-level
:class:`~python_multipart.multipart.MultipartParser`; each part's bytes go
to a :class:`tempfile.SpooledTemporaryFile` as they arrive (in memory up to
``spool_max`` bytes, then on disk), and a part is handed out once its closing
delimiter has been read.  Memory use is therefore bounded by one read chunk
plus one spool's memory, whatever the size of the request.

Werkzeug's form decoder is not used: it buffers ``multipart/related`` whole
and refuses parts without ``Content-Disposition``, which DICOMweb parts do
not carry.

The grammar is RFC 2046 5.1.1: a preamble (ignored, up to
:data:`PREAMBLE_MAX` bytes), the first ``--boundary`` delimiter, parts of
header lines, an empty line and the body, and the close delimiter
``--boundary--``; an epilogue after it is read and ignored.  A body that ends
before the close delimiter is refused: its last part is incomplete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import re
import tempfile
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import IO, TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser

from appliance.errors import StorageError, StorageFull
from appliance.status import Status
from dicomweb.errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

#: Bytes read from the request stream at a time.
CHUNK_SIZE = 256 * 1024
#: A part is kept in memory up to this size, then spooled to a temporary file.
SPOOL_MAX = 4 * 1024 * 1024
#: The most bytes of preamble skipped before the first delimiter.
PREAMBLE_MAX = 64 * 1024

#: RFC 2046 5.1.1: 1 to 70 of these characters, the last not a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


class MultipartError(InvalidRequest):
    """The body is not a well-formed multipart message (400)."""

    status = Status.CANNOT_UNDERSTAND


class BodyTooLarge(PayloadTooLarge):
    """More bytes were sent than the limit allows (413)."""


class TooManyParts(PayloadTooLarge):
    """The body has more parts than ``http.max_parts`` allows (413)."""


class _StopFeeding(Exception):
    """Raised from a parser callback to stop parsing the chunk fed."""


class UnreadableBody(InvalidRequest):
    """The body could not be read: the connection failed or the chunked
    transfer coding is broken (400)."""

    status = Status.CANNOT_UNDERSTAND


@dataclasses.dataclass
class Part:
    """One body part of a multipart message.

    Attributes
    ----------
    number
        Its position in the message, from 1.
    headers
        The part's header fields as sent, names in lower case.
    body
        The part's content, positioned at its start; seekable.  Closed by
        the reader when the next part is asked for.
    size
        The content's length in bytes.
    """

    number: int
    headers: list[tuple[str, str]]
    body: IO[bytes]
    size: int

    def header(self, name: str) -> str | None:
        """The value of the first header field *name* (case-insensitive)."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


def check_boundary(boundary: str | None) -> str:
    """Return *boundary* if it is a valid multipart boundary.

    Raises
    ------
    MultipartError
        if it is absent, empty, longer than 70 characters or has a character
        RFC 2046 5.1.1 does not allow.
    """
    if not boundary:
        raise MultipartError("the Content-Type has no boundary parameter (RFC 2046 5.1.1)")
    if _BOUNDARY.fullmatch(boundary) is None:
        raise MultipartError("the boundary parameter is not a valid boundary (RFC 2046 5.1.1)")
    return boundary


class LimitedReader:
    """Reads a request body, counting the bytes and refusing more than a limit.

    Parameters
    ----------
    stream
        The body (``request.stream``).
    limit
        The most bytes accepted, None for no limit.
    """

    def __init__(self, stream: IO[bytes], limit: int | None) -> None:
        self._stream = stream
        self._limit = limit
        self.bytes_read = 0

    def read(self, size: int) -> bytes:
        """Up to *size* bytes; ``b""`` at the end of the body.

        Raises
        ------
        BodyTooLarge
            once more than the limit has been read.
        UnreadableBody
            if the stream fails.
        """
        try:
            data = self._stream.read(size)
        except OSError as exc:
            raise UnreadableBody(
                f"the request body could not be read ({exc.strerror or exc})"
            ) from None
        self.bytes_read += len(data)
        if self._limit is not None and self.bytes_read > self._limit:
            raise BodyTooLarge(f"the request body is larger than {self._limit} bytes")
        return data


def new_spool(spool_max: int = SPOOL_MAX) -> IO[bytes]:
    """An empty binary spool: memory up to *spool_max* bytes, then disk."""
    return tempfile.SpooledTemporaryFile(max_size=spool_max, mode="w+b")


def spool_body(
    source: LimitedReader, *, spool_max: int = SPOOL_MAX, chunk_size: int = CHUNK_SIZE
) -> Part:
    """Spool a whole single-part body (e.g. ``application/dicom``).

    Raises
    ------
    BodyTooLarge
        as *source* does; nothing is left behind.
    """
    spool = new_spool(spool_max)
    try:
        while chunk := source.read(chunk_size):
            with _spooling():
                spool.write(chunk)
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return Part(1, [], spool, size)


@contextlib.contextmanager
def _spooling() -> Iterator[None]:
    """Turn a failure to write a spool (the temporary folder is full or
    gone) into the storage failure it is."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull("no room in the temporary folder for the request") from exc
        raise StorageError(f"the request could not be spooled ({exc.strerror or exc})") from exc


class _PartBuilder:
    """The part being received: headers, then content into a spool."""

    def __init__(self, number: int, spool_max: int) -> None:
        self.number = number
        self.headers: list[tuple[str, str]] = []
        self.spool = new_spool(spool_max)
        self._field = bytearray()
        self._value = bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.headers.append((name, self._value.decode("latin-1").strip()))
        self._field.clear()
        self._value.clear()

    def data(self, data: bytes, start: int, end: int) -> None:
        self.spool.write(memoryview(data)[start:end])

    def finish(self) -> Part:
        size = self.spool.tell()
        self.spool.seek(0)
        return Part(self.number, self.headers, self.spool, size)


class MultipartReader:
    """Iterate over the parts of a multipart body read from a stream.

    Use as a context manager, so that spooled parts are removed whatever
    happens::

        with MultipartReader(LimitedReader(request.stream, limit), boundary) as reader:
            for part in reader:
                store(part.body)

    Each :class:`Part` is valid until the next one is asked for.

    Parameters
    ----------
    source
        The body, counted and limited.
    boundary
        The ``boundary`` parameter of the Content-Type (checked with
        :func:`check_boundary`).
    spool_max
        Bytes of a part kept in memory before it goes to a temporary file.
    chunk_size
        Bytes read from *source* at a time.
    max_parts
        The most parts accepted, None for no limit: a million tiny parts
        would otherwise cost a million spools and a million outcomes.

    Raises
    ------
    TooManyParts
        (while iterating) once the part after *max_parts* begins.
    MultipartError
        (from the constructor) for an invalid boundary; (while iterating) for
        a body that is not a multipart message with that boundary, has no
        part, or ends before the close delimiter.
    BodyTooLarge
        (while iterating) as *source* does.
    """

    def __init__(
        self,
        source: LimitedReader,
        boundary: str,
        *,
        spool_max: int = SPOOL_MAX,
        chunk_size: int = CHUNK_SIZE,
        max_parts: int | None = None,
    ) -> None:
        self._source = source
        self._max_parts = max_parts
        self._delimiter = b"--" + check_boundary(boundary).encode("ascii")
        self._spool_max = spool_max
        self._chunk_size = chunk_size
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }
        self._parser = MultipartParser(self._delimiter[2:], callbacks)
        self._building: _PartBuilder | None = None
        self._ready: deque[Part] = deque()
        self._handed_out: Part | None = None
        self._ended = False
        self._overflow = False
        #: how many parts have been completely received
        self.parts_received = 0

    @property
    def bytes_read(self) -> int:
        """Bytes of the body read so far."""
        return self._source.bytes_read

    def __enter__(self) -> MultipartReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove every spooled part (received, handed out or incomplete)."""
        if self._handed_out is not None:
            self._handed_out.body.close()
            self._handed_out = None
        while self._ready:
            self._ready.popleft().body.close()
        if self._building is not None:
            self._building.spool.close()
            self._building = None

    def __iter__(self) -> Iterator[Part]:
        self._feed(self._skip_preamble())
        while True:
            while self._ready:
                self._release()
                self._handed_out = self._ready.popleft()
                yield self._handed_out
            self._release()
            if self._overflow:
                raise TooManyParts(
                    f"the request has more than http.max_parts ({self._max_parts}) parts"
                )
            if self._ended:
                break
            chunk = self._source.read(self._chunk_size)
            if not chunk:
                raise MultipartError(
                    "the body ended before the close delimiter; "
                    f"{self.parts_received} part(s) were complete"
                )
            self._feed(chunk)
        if self.parts_received == 0:
            raise MultipartError("the multipart body has no part")
        while self._source.read(self._chunk_size):
            pass  # the epilogue (RFC 2046 5.1.1), ignored

    def _release(self) -> None:
        if self._handed_out is not None:
            self._handed_out.body.close()
            self._handed_out = None

    def _skip_preamble(self) -> bytes:
        """Read up to the first delimiter (at the start of the body or of a
        line) and return the data from it on."""
        buffer = b""
        while True:
            chunk = self._source.read(self._chunk_size)
            buffer += chunk
            found = _first_delimiter(
                buffer[: PREAMBLE_MAX + len(self._delimiter) + 1], self._delimiter
            )
            if found >= 0:
                return buffer[found:]
            if not chunk:
                if not buffer:
                    raise MultipartError("the request has no body")
                raise MultipartError(
                    "the body does not contain the boundary given in the Content-Type"
                )
            if len(buffer) > PREAMBLE_MAX + len(self._delimiter):
                raise MultipartError(
                    f"no boundary delimiter in the first {PREAMBLE_MAX} bytes of the body"
                )

    def _feed(self, data: bytes) -> None:
        if self._ended:
            return  # the epilogue
        if self._overflow:
            return
        try:
            with _spooling():
                self._parser.write(data)
        except _StopFeeding:
            return
        except FormParserError as exc:
            # python-multipart's messages name offsets and expected bytes, no content
            raise MultipartError(f"malformed multipart body: {exc}") from None

    # python-multipart callbacks

    def _on_part_begin(self) -> None:
        if self._max_parts is not None and self.parts_received >= self._max_parts:
            # the parts complete so far are still handed out, then TooManyParts
            self._overflow = True
            raise _StopFeeding
        self._building = _PartBuilder(self.parts_received + 1, self._spool_max)

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        assert self._building is not None
        self._building.header_field(data, start, end)

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._building is not None
        self._building.header_value(data, start, end)

    def _on_header_end(self) -> None:
        assert self._building is not None
        self._building.header_end()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._building is not None
        self._building.data(data, start, end)

    def _on_part_end(self) -> None:
        assert self._building is not None
        self._ready.append(self._building.finish())
        self._building = None
        self.parts_received += 1

    def _on_end(self) -> None:
        self._ended = True


def _first_delimiter(buffer: bytes, delimiter: bytes) -> int:
    """The offset of the first *delimiter* at the start of *buffer* or right
    after a line break, or -1."""
    if buffer.startswith(delimiter):
        return 0
    found = buffer.find(b"\n" + delimiter)
    return found + 1 if found >= 0 else -1
