"""``GET /v1/partitions``: the data partitions (issue 11), in the shape of
Microsoft's DICOM server (REFERENCE.md, "Data partitions"): a JSON array of
``{"partitionKey", "partitionName", "createdDate"}``, the default partition
``Microsoft.Default`` first; 400 while partitions are off.  A partition is
created by the first write into it (STOW-RS to
``/v1/partitions/{name}/studies``, or a C-STORE whose Called AE Title or
peer selects it); there is no other way to create, rename or remove one.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response

from dicomweb.app import get_extension
from dicomweb.errors import InvalidRequest
from dicomweb.partitioning import DISABLED

bp = Blueprint("partitions", __name__, url_prefix="/v1")


@bp.get("/partitions")
def list_partitions() -> Response:
    """Every data partition, in the order they were created."""
    extension = get_extension()
    if not extension.config.partitions.enabled:
        raise InvalidRequest(DISABLED)
    found = extension.services.partitions.all()
    body = json.dumps([partition.to_json() for partition in found])
    return Response(body, status=200, mimetype="application/json")
