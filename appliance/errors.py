"""Exceptions of the core.  Each carries a :class:`~appliance.status.Status`
and a human reason; the protocol edges map them to the wire in one place each
(``dicomweb/errors.py`` and ``dimse_bridge``).  Reasons never carry patient
names or IDs: UIDs and key names only.
"""

from __future__ import annotations

from appliance.status import Status


class ApplianceError(Exception):
    """Base class: a failure with a status and a reason a client may see."""

    status: Status = Status.PROCESSING_FAILURE

    def __init__(self, reason: str, *, status: Status | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class ConfigError(ApplianceError):
    """A configuration key is unknown or has a bad value."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"configuration key '{key}': {problem}")
        self.key = key


class InvalidInstance(ApplianceError):
    """The data set lacks a required attribute or has a malformed one."""

    status = Status.DATASET_DOES_NOT_MATCH_SOP_CLASS


class UnreadableInstance(ApplianceError):
    """The bytes could not be parsed as DICOM at all."""

    status = Status.CANNOT_UNDERSTAND


class StorageError(ApplianceError):
    """The blob store failed."""

    status = Status.PROCESSING_FAILURE


class StorageFull(StorageError):
    """The blob store has no room (disk full, quota)."""

    status = Status.OUT_OF_RESOURCES


class StorageUnavailable(StorageError):
    """The blob store cannot be reached or asks to be tried later (a remote
    store down, throttling, timeouts): refused with "out of resources" so
    senders retry (C-STORE 0xA700, HTTP 503)."""

    status = Status.OUT_OF_RESOURCES


class BlobNotFound(StorageError):
    """No blob under that key."""


class IndexUnavailable(ApplianceError):
    """The index database failed or could not be reached."""

    status = Status.PROCESSING_FAILURE


class SchemaNotCurrent(ApplianceError):
    """The index database is not migrated to the code's schema revision."""


class NotFound(ApplianceError):
    """Nothing is stored under the UIDs given."""

    status = Status.NO_SUCH_OBJECT_INSTANCE


class QueryError(ApplianceError):
    """A query key or value cannot be understood (PS3.4 C.4.1.1.4)."""

    status = Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


class Conflict(ApplianceError):
    """The request conflicts with what exists (an extended query tag that is
    already there): HTTP 409."""

    status = Status.CANNOT_UNDERSTAND
