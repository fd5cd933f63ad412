"""Data partitions on the DICOMweb side (issue 11; :mod:`appliance.partitions`).

With ``[partitions] enabled``, every data path has a partition segment after
the service root, as in Microsoft's DICOM server (REFERENCE.md):
``/v1/partitions/{name}/studies...``, ``.../series...``,
``.../instances...``.  The other paths (change feed, extended query tags,
operations, admin, health) stay at the service root, as there.

:class:`PartitionRouting`, a WSGI middleware in front of the Flask app,
takes the segment off the path (so every view serves both shapes unchanged)
and keeps the name in the WSGI environment; :func:`check_partition`, the
first ``before_request`` hook, answers 400 with the seed service's messages
for a data path without the segment while partitions are on, a segment
while they are off, or an invalid name.  :func:`partition_key` resolves the
name: a write (``POST``, STOW-RS) creates the partition, any other request
to a partition that does not exist is a 400.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import g, has_request_context, request

from appliance.index.schema import DEFAULT_PARTITION_KEY
from appliance.partitions import DEFAULT_NAME, valid_name
from appliance.services import Services
from dicomweb.errors import InvalidRequest

#: The WSGI environment's key of the partition named by the path.
ENVIRON_KEY = "appliance.partition"
#: ... and of why the path's partition segment is refused.
_ERROR_KEY = "appliance.partition_error"

#: The path segments after the service root that are partitioned.
DATA_ROOTS = frozenset({"studies", "series", "instances"})

_ROOT = "/v1/"
_PREFIX = "/v1/partitions/"

MISSING = "PartitionName value is missing in the route segment."
DISABLED = "Data partitions feature is disabled."


class PartitionRouting:
    """WSGI middleware: ``/v1/partitions/{name}/<data path>`` is served as
    ``/v1/<data path>`` with *name* in ``environ[ENVIRON_KEY]``."""

    def __init__(self, app: Callable[..., Iterable[bytes]], enabled: bool) -> None:
        self.app = app
        self.enabled = enabled

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = str(environ.get("PATH_INFO", ""))
        if path.startswith(_PREFIX):
            name, _, rest = path[len(_PREFIX) :].partition("/")
            if rest.split("/", 1)[0] in DATA_ROOTS:
                environ["PATH_INFO"] = _ROOT + rest
                environ[ENVIRON_KEY] = name
                if not self.enabled:
                    environ[_ERROR_KEY] = DISABLED
                elif not valid_name(name):
                    environ[_ERROR_KEY] = (
                        "PartitionName must be 1 to 64 characters of A-Z a-z 0-9 . _ and -."
                    )
        elif (
            self.enabled
            and path.startswith(_ROOT)
            and path[len(_ROOT) :].split("/", 1)[0] in DATA_ROOTS
        ):
            environ[_ERROR_KEY] = MISSING
        return self.app(environ, start_response)


def check_partition() -> None:
    """``before_request``: the refusal :class:`PartitionRouting` noted."""
    problem = request.environ.get(_ERROR_KEY)
    if problem:
        raise InvalidRequest(str(problem))


def partition_name() -> str | None:
    """The partition the current request's path names, or None (no
    segment: the default partition, partitions being off)."""
    if not has_request_context():
        return None
    name = request.environ.get(ENVIRON_KEY)
    return None if name is None else str(name)


def partition_services(services: Services) -> Services:
    """*services* bound to the current request's partition (created by a
    ``POST``; 400 for another request naming a partition that does not
    exist)."""
    name = partition_name()
    if name is None or name == DEFAULT_NAME:
        return services.in_partition(DEFAULT_PARTITION_KEY)
    key: int | None = g.get("appliance_partition_key")
    if key is None:
        if request.method == "POST":
            key = services.partitions.ensure(name)
        else:
            key = services.partitions.key_of(name)
            if key is None:
                raise InvalidRequest(f"Specified PartitionName {name} does not exist.")
        g.appliance_partition_key = key
    return services.in_partition(key)
