"""Blobs in an Azure Blob Storage container (``storage.backend = "azure"``).

Needs the ``azure`` extra (``azure-storage-blob``), imported only when this
backend is configured.

- **Names.** A blob's name is its key: 32 hex digits made here, the first
  four the hour it was written (as on the filesystem), the rest random.
  Nothing from the DICOM data reaches a name.
- **Writes.** ``put`` uploads a block blob with ``If-None-Match: *`` (an
  existing name is never overwritten; a clash, which random keys make
  practically impossible, gets a new key).  A blob of up to
  :data:`SINGLE_PUT_MAX` bytes from a source that knows its length goes in
  one request (Put Blob); a larger one, or one of unknown length, as blocks
  committed at the end, streamed from the source, so a put interrupted at
  any point leaves nothing under a name
  (uncommitted blocks are invisible and Azure discards them after a week).
  Azure acknowledges a write once it is durably stored, so a returned put is
  durable.
- **Reads** are streamed in chunks of :data:`CHUNK_SIZE`, ranged reads with
  an HTTP range.
- **Errors.** Unreachable service, timeouts, 408/429/5xx answers:
  :class:`~appliance.errors.StorageUnavailable` (transient; the SDK has
  already retried them :data:`RETRIES` times with exponential backoff), a
  missing blob :class:`~appliance.errors.BlobNotFound`, anything else (no
  such container, access denied) :class:`~appliance.errors.StorageError`.
  Messages carry the error code and the blob key, never a URL with a token.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobServiceClient, ContainerClient, ExponentialRetry

from appliance import metrics
from appliance.errors import BlobNotFound, StorageError, StorageUnavailable
from appliance.storage.base import CHUNK_SIZE, BlobEntry, BlobInfo
from appliance.storage.cloud import (
    CONNECT_TIMEOUT,
    KEY_RE,
    READ_TIMEOUT,
    RETRIES,
    TRANSIENT_STATUSES,
    ChunkReader,
    CountingReader,
    buffered,
    new_key,
    object_name,
    position,
    remaining,
    temporary_copy,
)

#: The largest blob written in one request (the SDK holds it in memory);
#: larger ones are written as blocks of the SDK's 4 MiB.
SINGLE_PUT_MAX = 4 * 1024 * 1024


class AzureBlobStore:
    """A :class:`~appliance.storage.base.BlobStore` on one Azure container.

    Parameters
    ----------
    container
        The container's name.
    connection_string
        An Azure Storage connection string (account key, SAS, or Azurite's
        development string); or
    account_url, credential
        the Blob service URL (``https://<account>.blob.core.windows.net``)
        and a SAS token or the account key.
    create_container
        Create the container if it does not exist (needs the right to).
    retries
        Tries after the first of a request that failed transiently.
    """

    def __init__(
        self,
        container: str,
        *,
        connection_string: str = "",
        account_url: str = "",
        credential: str = "",
        create_container: bool = True,
        retries: int = RETRIES,
    ) -> None:
        options: dict[str, Any] = {
            # waits of about 1, 3 and 5 s (+/- 1 s) between the tries
            "retry_policy": ExponentialRetry(
                initial_backoff=1, increment_base=2, retry_total=retries, random_jitter_range=1
            ),
            "connection_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "max_single_get_size": CHUNK_SIZE,
            # the SDK holds a single put in memory: keep it small
            "max_single_put_size": SINGLE_PUT_MAX,
            "max_chunk_get_size": CHUNK_SIZE,
        }
        with _azure_errors("connect to the Azure Blob service"):
            if connection_string:
                service = BlobServiceClient.from_connection_string(connection_string, **options)
            else:
                service = BlobServiceClient(account_url, credential=credential or None, **options)
        self.container_name = container
        self._container: ContainerClient = service.get_container_client(container)
        self._create_container = create_container
        self._ready = False

    def _client(self) -> ContainerClient:
        """The container, created on first use if allowed and missing."""
        if not self._ready:
            if self._create_container:
                with (
                    _azure_errors(f"create the container {self.container_name}"),
                    # made before, or by another node just now: inside the
                    # mapping, which would turn it into a StorageError
                    contextlib.suppress(ResourceExistsError),
                ):
                    self._container.create_container()
            self._ready = True
        return self._container

    def put(self, source: IO[bytes]) -> BlobInfo:
        start = position(source)
        # a known length lets the SDK send a small blob in one request
        # instead of a block and a block list
        length = remaining(source)
        for _ in range(3):
            key = new_key()
            counted = CountingReader(source)
            try:
                with _azure_errors(f"write blob {key}"):
                    self._client().upload_blob(
                        key,
                        io.BufferedReader(counted, CHUNK_SIZE),
                        length=length,
                        overwrite=False,  # If-None-Match: *
                        max_concurrency=1,
                    )
            except StorageError as exc:
                clash = isinstance(exc.__cause__, ResourceExistsError)
                gone = _code(exc.__cause__) == "ContainerNotFound" and self._create_container
                if not (clash or gone):
                    raise
                if counted.size:
                    if start is None:
                        raise  # the source cannot be read again
                    source.seek(start)
                # a key clash: another key; the container went away (a store
                # restored empty): make it again
                self._ready = self._ready and not gone
                continue
            return BlobInfo(key=key, size=counted.size)
        raise StorageError("could not write the blob: the container keeps vanishing")

    def open(self, key: str) -> IO[bytes]:
        return self._download(key, 0, None)

    def open_range(self, key: str, offset: int, length: int | None = None) -> IO[bytes]:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            self._properties(key)  # a missing blob is still BlobNotFound
            return io.BytesIO(b"")
        return self._download(key, offset, length)

    def _download(self, key: str, offset: int, length: int | None) -> IO[bytes]:
        blob = self._client().get_blob_client(object_name(key))
        try:
            with _azure_errors(f"read blob {key}"):
                downloader = blob.download_blob(
                    offset=offset if offset or length is not None else None, length=length
                )
        except StorageError as exc:
            # a range starting at or after the end: nothing to read (HTTP 416)
            cause = exc.__cause__
            if isinstance(cause, HttpResponseError) and cause.status_code == 416:
                return io.BytesIO(b"")
            raise
        errors = functools.partial(_azure_errors, f"read blob {key}")
        return buffered(ChunkReader(downloader.chunks(), errors))

    def _properties(self, key: str) -> Any:
        with _azure_errors(f"read blob {key}"):
            return self._client().get_blob_client(object_name(key)).get_blob_properties()

    def local_path(self, key: str) -> AbstractContextManager[Path]:
        return temporary_copy(self.open(key))

    def delete(self, key: str) -> None:
        name = object_name(key)
        with contextlib.suppress(BlobNotFound), _azure_errors(f"delete blob {key}"):
            self._client().delete_blob(name)

    def exists(self, key: str) -> bool:
        try:
            name = object_name(key)
        except BlobNotFound:
            return False
        with _azure_errors(f"look up blob {key}"):
            return bool(self._client().get_blob_client(name).exists())

    def check(self) -> None:
        probe = f"probe-{secrets.token_hex(8)}"
        with _azure_errors(f"write to the container {self.container_name}"):
            container = self._client()
            container.upload_blob(probe, b"ok", overwrite=True)
            container.delete_blob(probe)

    def iter_blobs(self, older_than: dt.datetime) -> Iterator[str]:
        cutoff = older_than if older_than.tzinfo else older_than.replace(tzinfo=dt.UTC)
        with _azure_errors(f"list the container {self.container_name}"):
            for item in self._client().list_blobs():
                if KEY_RE.fullmatch(item.name) and item.last_modified < cutoff:
                    yield item.name

    def list_blobs(self) -> Iterator[BlobEntry]:
        # the service lists blob names in lexical order
        with _azure_errors(f"list the container {self.container_name}"):
            for item in self._client().list_blobs():
                if KEY_RE.fullmatch(item.name):
                    yield BlobEntry(key=item.name, size=item.size, modified=item.last_modified)


def _code(exc: BaseException | None) -> str:
    """The Azure error code of an SDK exception ("" if none)."""
    return str(getattr(exc, "error_code", None) or "")


@contextlib.contextmanager
def _azure_errors(action: str) -> Iterator[None]:
    """Azure errors, translated (below) and counted in
    ``appliance_storage_errors_total``."""
    with metrics.counting_storage_errors("azure"), _translated_azure_errors(action):
        yield


@contextlib.contextmanager
def _translated_azure_errors(action: str) -> Iterator[None]:
    """Turn the SDK's errors into the store's (see the module docstring)."""
    try:
        yield
    except ResourceNotFoundError as exc:
        if _code(exc) == "ContainerNotFound":
            raise StorageError(f"cannot {action}: the container does not exist") from exc
        raise BlobNotFound(f"cannot {action}: no such blob") from exc
    except (ServiceRequestError, ServiceResponseError) as exc:
        raise StorageUnavailable(
            f"cannot {action}: the Azure Blob service does not answer ({type(exc).__name__})"
        ) from exc
    except HttpResponseError as exc:
        code = getattr(exc, "error_code", None) or exc.reason or "error"
        if exc.status_code in TRANSIENT_STATUSES:
            raise StorageUnavailable(
                f"cannot {action}: the Azure Blob service answered {exc.status_code} ({code})"
            ) from exc
        raise StorageError(f"cannot {action}: HTTP {exc.status_code} ({code})") from exc
    except AzureError as exc:
        raise StorageUnavailable(f"cannot {action}: {type(exc).__name__}") from exc
