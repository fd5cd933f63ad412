"""DELETE of studies, series and instances (not a PS3.18 transaction: the
shape follows Microsoft's DICOM server, which answers 204 No Content)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from dicomweb import audit
from dicomweb.app import current_services
from dicomweb.errors import check_uids

bp = Blueprint("delete", __name__, url_prefix="/v1")
log = logging.getLogger(__name__)


@bp.delete("/studies/<study>")
@bp.delete("/studies/<study>/series/<series>")
@bp.delete("/studies/<study>/series/<series>/instances/<instance>")
def delete_resource(study: str, series: str | None = None, instance: str | None = None) -> Response:
    """Delete a study, a series or an instance: 204, or 404 if nothing is
    stored there, or 400 for a malformed UID."""
    check_uids(study, series, instance)
    removed = current_services().delete.delete(study, series, instance)
    audit.note(instances=len(removed))
    log.info("DELETE removed %d instance(s) of study %s", len(removed), study)
    return Response(status=204)
