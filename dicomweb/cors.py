"""Cross-origin resource sharing, so a viewer served from another origin can
call the API (the Fetch standard's CORS protocol).

Only origins listed in ``http.cors_allowed_origins`` (or any, with ``*``) get
the ``Access-Control-*`` headers; others get none, and the browser refuses the
response to the page.  Preflight requests (``OPTIONS`` with
``Access-Control-Request-Method``) are answered 204 by Flask's automatic
OPTIONS handling plus these headers.
"""

from __future__ import annotations

from flask import Flask, Response, request

#: Response headers a viewer's script may read besides the simple ones.
#: (WWW-Authenticate: so a viewer can read why a 401 or 403 came)
EXPOSED = (
    "ETag, Last-Modified, Content-Location, Location, Warning, Content-Length, WWW-Authenticate"
)
#: Seconds a browser may cache a preflight answer.
MAX_AGE = "600"
METHODS = "GET, HEAD, POST, DELETE, OPTIONS"


def install_cors(app: Flask, allowed_origins: tuple[str, ...]) -> None:
    """Add the CORS headers for *allowed_origins* to every response."""
    if not allowed_origins:
        return
    any_origin = "*" in allowed_origins
    allowed = frozenset(allowed_origins)

    @app.after_request
    def add_cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is None or not (any_origin or origin in allowed):
            return response
        headers = response.headers
        headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
        if not any_origin:
            headers.add("Vary", "Origin")
        headers["Access-Control-Expose-Headers"] = EXPOSED
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers["Access-Control-Allow-Methods"] = METHODS
            asked = request.headers.get("Access-Control-Request-Headers")
            if asked:
                headers["Access-Control-Allow-Headers"] = asked
            headers["Access-Control-Max-Age"] = MAX_AGE
            response.status_code = 204
            response.set_data(b"")
        return response
