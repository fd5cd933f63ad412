"""Access control of the DICOMweb edge: one ``before_request`` hook that
authenticates the caller (:class:`appliance.access.Authenticator`), sets
``flask.g.principal``, and checks the permission the endpoint needs in
:data:`ENDPOINT_PERMISSIONS`.

Every endpoint is listed there; one that is not is refused (403) and named
in the log, and a test walks ``app.url_map`` so a new view cannot be left
out (open) by accident.  The table's families follow Microsoft's DICOM
server's data actions: read (QIDO-RS, WADO-RS, frames, rendered,
thumbnails, the change feed), write (STOW-RS), delete, and admin
(``/v1/admin``); the viewer's static files (``/viewer``) are public.

CORS preflights and Flask's automatic ``OPTIONS`` answers pass without a
token: browsers send preflights without credentials (Fetch standard,
CORS-preflight request), and such an answer carries no data.
"""

from __future__ import annotations

import logging

from flask import Flask, g, request

from appliance.access import (
    ADMIN,
    ANONYMOUS,
    DELETE,
    NOBODY,
    READ,
    WRITE_PERMISSION,
    Authenticator,
    Principal,
    authorize,
)

LOGGER = logging.getLogger(__name__)

#: Endpoints open to all when ``auth.health_anonymous`` (else: read).
HEALTH = "health"
#: Endpoints open to all when ``auth.metrics_anonymous`` (else: read).
METRICS = "metrics"
#: Endpoints open to all, always: the viewer's static files (no patient
#: data; a browser cannot attach a token to a page it opens).
PUBLIC = "public"
#: A request that matched no route (404/405): any authenticated caller.
AUTHENTICATED = "authenticated"

#: The permission each endpoint needs.
ENDPOINT_PERMISSIONS: dict[str, str] = {
    # QIDO-RS (PS3.18 10.6)
    "qido.search_for_studies": READ,
    "qido.search_for_series": READ,
    "qido.search_for_instances": READ,
    # WADO-RS (PS3.18 10.4)
    "wado.retrieve_instances": READ,
    "wado.retrieve_metadata": READ,
    "wado.retrieve_bulkdata": READ,
    "frames.retrieve_frames": READ,
    "rendered.retrieve_rendered_instance": READ,
    "rendered.retrieve_rendered_frames": READ,
    "rendered.retrieve_instance_thumbnail": READ,
    "rendered.retrieve_frames_thumbnail": READ,
    "rendered.retrieve_series_thumbnail": READ,
    "rendered.retrieve_study_thumbnail": READ,
    "changefeed.read_change_feed": READ,
    "changefeed.latest_change": READ,
    # STOW-RS (PS3.18 10.5)
    "stow.store_instances": WRITE_PERMISSION,
    "stow.store_study_instances": WRITE_PERMISSION,
    # delete (not in PS3.18; Microsoft's and Orthanc's DELETE)
    "delete.delete_resource": DELETE,
    # operations of the appliance
    "admin.forward_status": ADMIN,
    "admin.forward_retry": ADMIN,
    "admin.fhir_status": ADMIN,
    "admin.fhir_retry": ADMIN,
    "ops.live": HEALTH,
    "ops.ready": HEALTH,
    "ops.prometheus_metrics": METRICS,
    # the OHIF viewer's static files (its data requests are the READ ones above)
    "viewer.serve_viewer": PUBLIC,
}


def install_auth(app: Flask, authenticator: Authenticator) -> None:
    """Check every request of *app* with *authenticator*."""
    auth = authenticator.auth
    open_to_all = {PUBLIC}
    if auth.health_anonymous:
        open_to_all.add(HEALTH)
    if auth.metrics_anonymous:
        open_to_all.add(METRICS)

    # anonymous mode: everyone is the anonymous principal, on every route
    unidentified = ANONYMOUS if authenticator.anonymous else NOBODY

    def check_access() -> None:
        rule = request.url_rule
        if request.method == "OPTIONS" and (
            rule is None or getattr(rule, "provide_automatic_options", False)
        ):
            g.principal = unidentified
            return
        endpoint = rule.endpoint if rule is not None else None
        if endpoint is None:
            needed = AUTHENTICATED
        else:
            needed = ENDPOINT_PERMISSIONS.get(endpoint, "")
            if not needed:
                LOGGER.error("endpoint %s has no permission assigned: refused", endpoint)
        g.principal = unidentified
        if needed in open_to_all:
            return
        principal: Principal = authenticator.authenticate(request.headers.get("Authorization"))
        g.principal = principal
        if needed in (HEALTH, METRICS):
            needed = READ
        if needed != AUTHENTICATED:
            authorize(principal, needed)

    app.before_request(check_access)
