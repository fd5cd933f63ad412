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

A browser cannot send a bearer header with a page load or an ``<img>``, so
the operator console (:mod:`dicomweb.views.console`) keeps the token the
user pasted at ``/console/login`` in a session cookie
(:data:`SESSION_COOKIE`: HttpOnly, SameSite=Strict, Secure over HTTPS).
A request without an ``Authorization`` header is authenticated by that
cookie, on the console's routes and on the DICOMweb routes alike (so the
console's thumbnails and a same-origin viewer work); the token is checked
by the same :class:`~appliance.access.Authenticator` as a bearer token, on
every request.  Cookies go with requests other sites make, so a request
authenticated by the cookie that may change something (any method but
GET, HEAD, OPTIONS) must also carry the session's CSRF token
(:func:`csrf_token`, in the form field :data:`CSRF_FIELD` or the header
:data:`CSRF_HEADER`) and must not come from another origin
(:func:`same_origin`), else 403.  The console's own forms are also held to
the origin check in anonymous mode, where no cookie is needed: a page of
another site could otherwise post them from the operator's browser.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from urllib.parse import urlsplit

from flask import Flask, g, redirect, request, url_for
from werkzeug.wrappers import Response

from appliance.access import (
    ADMIN,
    ANONYMOUS,
    DELETE,
    NOBODY,
    READ,
    WRITE_PERMISSION,
    Authenticator,
    Forbidden,
    Principal,
    Unauthenticated,
    authorize,
)

LOGGER = logging.getLogger(__name__)

#: Endpoints open to all when ``auth.health_anonymous`` (else: read).
HEALTH = "health"
#: Endpoints open to all when ``auth.metrics_anonymous`` (else: read).
METRICS = "metrics"
#: A request that matched no route (404/405): any authenticated caller.
AUTHENTICATED = "authenticated"
#: Open to all in every mode: the console's login and logout, its CSS and
#: JS, and the viewer's static files (no patient data; a browser cannot
#: attach a token to a page it opens).
PUBLIC = "public"

#: The cookie holding the console session's token (API token or JWT).
SESSION_COOKIE = "appliance_session"
#: Where a request authenticated by the cookie carries its CSRF token.
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
#: Methods that change nothing (RFC 9110 9.2.1): no CSRF token needed.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The blueprint of the operator console.
CONSOLE = "console"

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
    "partitions.list_partitions": READ,
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
    "admin.dashboard_snapshot": ADMIN,
    # extended query tags (Microsoft's manageExtendedQueryTags data action):
    # admin, reads included (the errors name instances)
    "extended_tags.add_tags": ADMIN,
    "extended_tags.list_tags": ADMIN,
    "extended_tags.get_tag": ADMIN,
    "extended_tags.update_tag": ADMIN,
    "extended_tags.delete_tag": ADMIN,
    "extended_tags.tag_errors": ADMIN,
    "extended_tags.get_operation": ADMIN,
    "ops.live": HEALTH,
    "ops.ready": HEALTH,
    "ops.prometheus_metrics": METRICS,
    # the operator console (dicomweb/views/console.py): pages read, actions admin
    "console.dashboard": READ,
    "console.studies": READ,
    "console.study": READ,
    "console.download_study": ADMIN,
    "console.confirm_delete": ADMIN,
    "console.delete_study": ADMIN,
    "console.retry_forward": ADMIN,
    "console.login": PUBLIC,
    "console.logout": PUBLIC,
    "console.static": PUBLIC,
    # the OHIF viewer's static files (its data requests are the READ ones above)
    "viewer.serve_viewer": PUBLIC,
}


def csrf_token(session: str) -> str:
    """The CSRF token of a console session whose cookie holds *session*.

    It is derived, not stored: every gunicorn worker (and every node behind
    a load balancer) computes the same one without sharing a secret, and it
    lives exactly as long as the session.  SHA-256 is one-way, so the token
    shown in the pages reveals nothing of the session token it comes from
    (256 random bits for an API token, a signed JWT otherwise); a page of
    another site can read neither the cookie nor our pages, so it cannot
    compute it.  The label keeps it apart from every other hash of the
    token (the Authenticator's cache key is the bare SHA-256).
    """
    return hashlib.sha256(b"dicom-appliance console csrf v1\0" + session.encode()).hexdigest()


def same_origin(public_url: str = "") -> bool:
    """Whether the current request may come from one of our own pages: a
    ``Sec-Fetch-Site`` header (Fetch Metadata), if sent, says
    ``same-origin`` or ``none`` (typed by the user), and an ``Origin``
    header, if sent, names this server as the client addressed it, or
    ``http.public_url``.  Clients that send neither (curl, scripts) are not
    browsers that another site could drive."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    allowed = {request.host_url.rstrip("/")}
    if public_url:
        parts = urlsplit(public_url)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    return origin.rstrip("/") in allowed


def install_auth(app: Flask, authenticator: Authenticator, public_url: str = "") -> None:
    """Check every request of *app* with *authenticator* (*public_url*:
    ``http.public_url``, an origin the console's forms may come from)."""
    auth = authenticator.auth
    open_to_all = {PUBLIC}
    if auth.health_anonymous:
        open_to_all.add(HEALTH)
    if auth.metrics_anonymous:
        open_to_all.add(METRICS)

    # anonymous mode: everyone is the anonymous principal, on every route
    unidentified = ANONYMOUS if authenticator.anonymous else NOBODY

    def check_access() -> Response | None:
        rule = request.url_rule
        g.session_token = None
        if request.method == "OPTIONS" and (
            rule is None or getattr(rule, "provide_automatic_options", False)
        ):
            g.principal = unidentified
            return None
        endpoint = rule.endpoint if rule is not None else None
        if endpoint is None:
            needed = AUTHENTICATED
        else:
            needed = ENDPOINT_PERMISSIONS.get(endpoint, "")
            if not needed:
                LOGGER.error("endpoint %s has no permission assigned: refused", endpoint)
        g.principal = unidentified
        changes = request.method not in SAFE_METHODS
        console = request.blueprint == CONSOLE
        if console and changes and not same_origin(public_url):
            raise Forbidden("a console form must be sent from the console's own pages")
        if needed in open_to_all:
            return None
        header = request.headers.get("Authorization")
        session = None if header or authenticator.anonymous else request.cookies.get(SESSION_COOKIE)
        try:
            if session:
                principal: Principal = authenticator.authenticate(f"Bearer {session}")
            else:
                principal = authenticator.authenticate(header)
        except Unauthenticated as exc:
            if console and not changes:
                # a browser without a (valid) session: to the login page
                return _to_login(clear=bool(session))
            if session:
                # a cookie is no malformed Authorization header (400): the
                # session is over, 401
                raise Unauthenticated(
                    f"the console session is not valid ({exc.reason}): sign in again",
                    "invalid_token",
                ) from exc
            raise
        g.principal = principal
        if session:
            g.session_token = session
            if changes:
                _check_csrf(session, public_url)
        if needed in (HEALTH, METRICS):
            needed = READ
        if needed != AUTHENTICATED:
            authorize(principal, needed)
        return None

    app.before_request(check_access)


def _check_csrf(session: str, public_url: str) -> None:
    """Refuse (403) a request authenticated by the session cookie that may
    change something, unless it carries the session's CSRF token and does
    not come from another origin."""
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.mimetype in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        given = request.form.get(CSRF_FIELD)
    if not given or not hmac.compare_digest(given.encode(), csrf_token(session).encode()):
        raise Forbidden(
            f"a request authenticated by the console's cookie must carry its CSRF token "
            f"(form field {CSRF_FIELD} or header {CSRF_HEADER})"
        )
    if not same_origin(public_url):
        raise Forbidden("a request authenticated by the console's cookie came from another origin")


def _to_login(*, clear: bool) -> Response:
    """302 to the console's login page, back to this page afterwards;
    *clear*: also drop the session cookie that did not verify."""
    target = request.full_path if request.query_string else request.path
    response = redirect(url_for("console.login", next=target), code=302)
    if clear:
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response
