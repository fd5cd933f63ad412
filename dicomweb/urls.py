"""URLs the DICOMweb service writes into its answers (RetrieveURL,
BulkDataURI, Content-Location, Warning headers)."""

from __future__ import annotations

from flask import request

from dicomweb.app import get_extension
from dicomweb.partitioning import partition_name

#: The API version in the path (SPEC.md: the service root is ``/v1``).
SERVICE_PATH = "/v1"


def service_root() -> str:
    """The service root, e.g. ``http://host:8080/v1``: from ``http.public_url``
    when set (behind a reverse proxy, or for clients whose Host header drops
    the port), else as the client addressed this server; with the data
    partition segment when the request's path has one
    (``.../v1/partitions/{name}``), so the URLs written into an answer stay
    in the request's partition."""
    public = get_extension().config.http.public_url
    base = public if public else request.root_url.rstrip("/")
    name = partition_name()
    if name is not None:
        return f"{base}{SERVICE_PATH}/partitions/{name}"
    return base + SERVICE_PATH


def study_url(root: str, study: str) -> str:
    return f"{root}/studies/{study}"


def series_url(root: str, study: str, series: str) -> str:
    return f"{study_url(root, study)}/series/{series}"


def instance_url(root: str, study: str, series: str, instance: str) -> str:
    return f"{series_url(root, study, series)}/instances/{instance}"
