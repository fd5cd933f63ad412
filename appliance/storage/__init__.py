"""Blob storage backends.  Keys are opaque strings the store makes; the index
maps UIDs to keys, and no UID ever becomes part of a path or object name."""

from __future__ import annotations

from appliance.config import StorageConfig
from appliance.errors import ConfigError
from appliance.storage.base import BlobInfo, BlobStore


def open_blob_store(config: StorageConfig) -> BlobStore:
    """The backend *config* names.  Raises ConfigError if its extra is not
    installed."""
    if config.backend == "filesystem":
        from appliance.storage.filesystem import FilesystemBlobStore

        return FilesystemBlobStore(config.path, config.min_free_mb * 2**20)
    if config.backend == "azure":
        try:
            from appliance.storage.azure import AzureBlobStore
        except ImportError:
            raise ConfigError(
                "storage.backend",
                "the azure backend needs the azure extra: pip install 'dicom-appliance[azure]'",
            ) from None
        return AzureBlobStore(
            config.container,
            connection_string=config.connection_string,
            account_url=config.account_url,
            credential=config.credential,
            create_container=config.create_container,
            retries=config.retries,
        )
    if config.backend == "s3":
        try:
            from appliance.storage.s3 import S3BlobStore
        except ImportError:
            raise ConfigError(
                "storage.backend",
                "the s3 backend needs the s3 extra: pip install 'dicom-appliance[s3]'",
            ) from None
        return S3BlobStore(
            config.bucket,
            endpoint_url=config.endpoint_url,
            region=config.region,
            access_key_id=config.access_key_id,
            secret_access_key=config.secret_access_key,
            create_bucket=config.create_container,
            retries=config.retries,
        )
    raise ConfigError("storage.backend", f"unknown backend {config.backend!r}")


__all__ = ["BlobInfo", "BlobStore", "open_blob_store"]
