"""Blob storage backends.  Keys are opaque strings the store makes; the index
maps UIDs to keys, and no UID ever becomes part of a path or object name."""

from __future__ import annotations

from appliance.config import StorageConfig
from appliance.errors import ConfigError
from appliance.storage.base import BlobInfo, BlobStore


def open_blob_store(config: StorageConfig) -> BlobStore:
    """The backend *config* names.  Raises ConfigError for one not built yet."""
    if config.backend == "filesystem":
        from appliance.storage.filesystem import FilesystemBlobStore

        return FilesystemBlobStore(config.path)
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
    raise ConfigError(
        "storage.backend",
        f"the {config.backend!r} backend is not available in this version "
        "(see README: storage backends)",
    )


__all__ = ["BlobInfo", "BlobStore", "open_blob_store"]
