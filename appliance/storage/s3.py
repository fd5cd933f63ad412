"""Blobs in an S3 bucket (``storage.backend = "s3"``): Amazon S3 or any
S3-compatible server (SeaweedFS, MinIO, Ceph...).

Needs the ``s3`` extra (``boto3``), imported only when this backend is
configured.

- **Names.** An object's name is its key: 32 hex digits made here (as for
  the other backends); nothing from the DICOM data reaches a name.
- **Writes.** ``put`` streams the source with boto3's managed upload: one
  PUT for an instance up to :data:`MULTIPART_THRESHOLD`, a multipart upload
  of :data:`PART_SIZE` parts above it, completed at the end and aborted on
  any failure, so a put interrupted at any point leaves no object under a
  name.  S3 acknowledges a write once it is durably stored.  Keys are
  random (112 bits), so no write is made conditional.
- **Reads** are streamed in chunks of :data:`CHUNK_SIZE`, ranged reads with
  an HTTP range.
- **Errors.** Unreachable endpoint, timeouts, throttling (503 SlowDown,
  429) and other 5xx answers: :class:`~appliance.errors.StorageUnavailable`
  once botocore has retried them ``retries`` times; a missing object
  :class:`~appliance.errors.BlobNotFound`; anything else (no such bucket,
  access denied) :class:`~appliance.errors.StorageError`.  Messages carry the
  error code and the key, never a credential.
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

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

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
    temporary_copy,
)

#: Instances up to this size are written in one PUT; larger ones in parts.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})


class S3BlobStore:
    """A :class:`~appliance.storage.base.BlobStore` on one S3 bucket.

    Parameters
    ----------
    bucket
        The bucket's name.
    endpoint_url
        The S3 endpoint; empty for Amazon S3 of *region*.
    region
        The bucket's region (``us-east-1`` if empty).
    access_key_id, secret_access_key
        The credentials; empty to use boto3's own chain (environment,
        instance profile...).
    create_bucket
        Create the bucket if it does not exist (needs the right to).
    retries
        Tries after the first of a request that failed transiently.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        create_bucket: bool = True,
        retries: int = RETRIES,
    ) -> None:
        config = BotoConfig(
            retries={"total_max_attempts": retries + 1, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            # an S3-compatible server on a host name or address of its own
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        with _s3_errors("set up the S3 client"):
            self._s3: Any = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url or None,
                region_name=region or "us-east-1",
                aws_access_key_id=access_key_id or None,
                aws_secret_access_key=secret_access_key or None,
                config=config,
            )
        self.bucket = bucket
        self._region = region
        self._create_bucket = create_bucket
        self._ready = False
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=PART_SIZE,
            max_concurrency=1,
            use_threads=False,
        )

    def _client(self) -> Any:
        """The client, once the bucket exists (created if allowed)."""
        if not self._ready:
            if self._create_bucket:
                with _s3_errors(f"look up the bucket {self.bucket}"):
                    try:
                        self._s3.head_bucket(Bucket=self.bucket)
                    except ClientError as exc:
                        if _status(exc) != 404:
                            raise
                        self._make_bucket()
            self._ready = True
        return self._s3

    def _make_bucket(self) -> None:
        options: dict[str, Any] = {"Bucket": self.bucket}
        if self._region and self._region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            self._s3.create_bucket(**options)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put(self, source: IO[bytes]) -> BlobInfo:
        start = position(source)
        for _ in range(2):
            key = new_key()
            counted = CountingReader(source)
            try:
                with _s3_errors(f"write blob {key}"):
                    self._client().upload_fileobj(
                        buffered(counted), self.bucket, key, Config=self._transfer
                    )
            except StorageError as exc:
                gone = _code(exc.__cause__) == "NoSuchBucket" and self._create_bucket
                if not gone or (counted.size and start is None):
                    raise
                if counted.size:
                    source.seek(start or 0)
                self._ready = False  # the bucket went away: make it again
                continue
            return BlobInfo(key=key, size=counted.size)
        raise StorageError("could not write the blob: the bucket keeps vanishing")

    def open(self, key: str) -> IO[bytes]:
        return self._get(key, None)

    def open_range(self, key: str, offset: int, length: int | None = None) -> IO[bytes]:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            if not self.exists(key):
                raise BlobNotFound(f"no blob {key}")
            return io.BytesIO(b"")
        end = "" if length is None else str(offset + length - 1)
        return self._get(key, f"bytes={offset}-{end}")

    def _get(self, key: str, byte_range: str | None) -> IO[bytes]:
        name = object_name(key)
        options: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if byte_range is not None:
            options["Range"] = byte_range
        try:
            with _s3_errors(f"read blob {key}"):
                response = self._client().get_object(**options)
        except StorageError as exc:
            # a range starting at or after the end: nothing to read
            if _code(exc.__cause__) == "InvalidRange" or _status(exc.__cause__) == 416:
                if not self.exists(key):
                    raise BlobNotFound(f"no blob {key}") from None
                return io.BytesIO(b"")
            raise
        body = response["Body"]
        errors = functools.partial(_s3_errors, f"read blob {key}")
        return buffered(ChunkReader(body.iter_chunks(CHUNK_SIZE), errors, body.close))

    def local_path(self, key: str) -> AbstractContextManager[Path]:
        return temporary_copy(self.open(key))

    def delete(self, key: str) -> None:
        name = object_name(key)
        with _s3_errors(f"delete blob {key}"):
            self._client().delete_object(Bucket=self.bucket, Key=name)

    def exists(self, key: str) -> bool:
        try:
            name = object_name(key)
        except BlobNotFound:
            return False
        with contextlib.suppress(BlobNotFound), _s3_errors(f"look up blob {key}"):
            self._client().head_object(Bucket=self.bucket, Key=name)
            return True
        return False

    def check(self) -> None:
        probe = f"probe-{secrets.token_hex(8)}"
        with _s3_errors(f"write to the bucket {self.bucket}"):
            client = self._client()
            try:
                # some servers (SeaweedFS) would create the bucket on a put
                client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _status(exc) == 404:
                    raise StorageError(
                        f"cannot write to the bucket {self.bucket}: the bucket does not exist"
                    ) from exc
                raise
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            client.delete_object(Bucket=self.bucket, Key=probe)

    def iter_blobs(self, older_than: dt.datetime) -> Iterator[str]:
        cutoff = older_than if older_than.tzinfo else older_than.replace(tzinfo=dt.UTC)
        with _s3_errors(f"list the bucket {self.bucket}"):
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            for page in pages:
                for item in page.get("Contents", []):
                    if KEY_RE.fullmatch(item["Key"]) and item["LastModified"] < cutoff:
                        yield item["Key"]

    def list_blobs(self) -> Iterator[BlobEntry]:
        # ListObjectsV2 returns keys in ascending UTF-8 binary order
        with _s3_errors(f"list the bucket {self.bucket}"):
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            for page in pages:
                for item in page.get("Contents", []):
                    if KEY_RE.fullmatch(item["Key"]):
                        yield BlobEntry(
                            key=item["Key"], size=int(item["Size"]), modified=item["LastModified"]
                        )


def _code(exc: BaseException | None) -> str:
    """The S3 error code of a botocore ClientError ("" if none)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: BaseException | None) -> int:
    """The HTTP status of a botocore ClientError (0 if none)."""
    if isinstance(exc, ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


@contextlib.contextmanager
def _s3_errors(action: str) -> Iterator[None]:
    """S3 errors, translated (below) and counted in
    ``appliance_storage_errors_total``."""
    with metrics.counting_storage_errors("s3"), _translated_s3_errors(action):
        yield


@contextlib.contextmanager
def _translated_s3_errors(action: str) -> Iterator[None]:
    """Turn botocore's errors into the store's (see the module docstring)."""
    try:
        yield
    except ClientError as exc:
        code, status = _code(exc), _status(exc)
        if code in _NOT_FOUND:
            raise BlobNotFound(f"cannot {action}: no such blob") from exc
        if code == "NoSuchBucket":
            raise StorageError(f"cannot {action}: the bucket does not exist") from exc
        if status in TRANSIENT_STATUSES or code in (
            "SlowDown",
            "RequestTimeout",
            "ServiceUnavailable",
        ):
            raise StorageUnavailable(
                f"cannot {action}: the S3 service answered {status} ({code})"
            ) from exc
        raise StorageError(f"cannot {action}: HTTP {status} ({code or 'error'})") from exc
    except (ConnectionError, HTTPClientError) as exc:
        raise StorageUnavailable(
            f"cannot {action}: the S3 service does not answer ({type(exc).__name__})"
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(f"cannot {action}: {type(exc).__name__}") from exc
