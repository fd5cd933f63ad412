"""The OHIF viewer at ``/viewer/`` (README "Viewer"): the static files of the
build ``dicom-appliance viewer install`` put in ``viewer.folder``
(:mod:`appliance.viewer`).

- ``/viewer/<path>`` is the file at *path* in the folder, resolved with
  werkzeug's ``safe_join`` (no ``..``, no absolute path, nothing outside
  the folder); names starting with a dot (the install's marker) are not
  served.
- A path whose last segment has no extension and names no file is one of
  the viewer's own routes (``/viewer/viewer?StudyInstanceUIDs=...``): it
  gets ``index.html`` and OHIF's router takes it from there.
- ``index.html`` and ``app-config.js`` are revalidated on every use
  (``no-cache``: an install takes effect at once); the bundles, WebAssembly
  and fonts whose names carry a content hash are cached for a year
  (``immutable``); the rest is revalidated (ETag, Last-Modified).
- A file with a gzip copy (``name.gz``, written by the install) is sent
  compressed to a client that accepts gzip (``Content-Encoding: gzip``).
- With ``viewer.folder`` empty, or no build installed there, ``/viewer``
  answers 404 saying so.

The files hold no patient data, so they need no permission
(:data:`dicomweb.auth.PUBLIC`): a browser cannot attach a bearer token to a
page it navigates to.  The viewer's data requests go to ``/v1`` and need
the read permission there.  The requests are not audited (no patient data).

No Content-Security-Policy is set here: OHIF compiles WebAssembly codecs
and loads its own workers and inline start-up scripts, so a policy that
lets it run (``'unsafe-inline'``, ``'wasm-unsafe-eval'``, ``blob:``
workers) would guard little; ``X-Content-Type-Options: nosniff`` and a
same-origin referrer policy are set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final
from urllib.parse import quote

from flask import Blueprint, Response, request, send_file
from werkzeug.security import safe_join

from appliance.partitions import DEFAULT_NAME
from appliance.viewer import BASE_PATH, COMPRESSIBLE, SERVICE_ROOT, app_config
from dicomweb.app import get_extension
from dicomweb.errors import error_response

bp = Blueprint("viewer", __name__, url_prefix=BASE_PATH.rstrip("/"))

#: Media types by extension; Python's ``mimetypes`` lacks some (``.wasm``)
#: on some systems, and a wrong one breaks the viewer (WebAssembly streaming
#: compilation requires ``application/wasm``, module scripts a JavaScript type).
#: Flask adds ``; charset=utf-8`` to the ``text/*`` ones.
MEDIA_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".ico": "image/x-icon",
    ".gif": "image/gif",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".txt": "text/plain",
    ".xml": "application/xml",
    ".onnx": "application/octet-stream",
}
#: Files whose name carries a content hash (webpack's ``[contenthash]``):
#: ``app.bundle.0f6159c501addfe9.js``, ``0ddf166f7a343eda.wasm``.
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16,}\.(js|wasm|woff2?|css)$")
#: Revalidated on every use, so that an install takes effect at once.
_ENTRY_FILES: Final = frozenset({"index.html", "app-config.js"})
CACHE_IMMUTABLE: Final = "public, max-age=31536000, immutable"
CACHE_REVALIDATE: Final = "no-cache"


def study_url(study_uid: str) -> str:
    """The viewer's page of one study (for links from other pages)."""
    return f"{BASE_PATH}viewer?StudyInstanceUIDs={quote(study_uid, safe='.')}"


def viewer_folder() -> Path | None:
    """The folder of the installed viewer, or None if there is none."""
    folder = get_extension().config.viewer.folder
    if folder and (Path(folder) / "index.html").is_file():
        return Path(folder)
    return None


@bp.get("/", defaults={"path": "index.html"})
@bp.get("/<path:path>")
def serve_viewer(path: str) -> Response:
    """A file of the viewer's build, or its ``index.html`` for a route of
    the viewer; 404 if neither (or no viewer is installed)."""
    folder = viewer_folder()
    if folder is None:
        return _missing(
            "no viewer is installed: run 'dicom-appliance viewer install' "
            "(viewer.folder empty: the viewer is off; README, Viewer)"
        )
    name = path.rsplit("/", 1)[-1]
    # dot names: the install's marker (MARKER), and no hidden file is wanted
    if any(part.startswith(".") for part in path.split("/")):
        return _missing("no such file in the viewer")
    if path == "app-config.js" and get_extension().config.partitions.enabled:
        # data partitions on: the viewer shows the default partition (its
        # data paths have a partition segment, README "Data partitions")
        return _partitioned_config()
    found = safe_join(str(folder), path)
    if found is None:
        return _missing("no such file in the viewer")
    target = Path(found)
    if not target.is_file():
        if "." in name:
            return _missing("no such file in the viewer")
        target, name = folder / "index.html", "index.html"  # a route of OHIF's router
    return _send(target, name)


def _partitioned_config() -> Response:
    root = f"{SERVICE_ROOT}/partitions/{DEFAULT_NAME}"
    response = Response(app_config(root), mimetype=MEDIA_TYPES[".js"])
    response.headers["Cache-Control"] = CACHE_REVALIDATE
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _send(target: Path, name: str) -> Response:
    media_type = MEDIA_TYPES.get(target.suffix.lower(), "application/octet-stream")
    packed = target.with_name(target.name + ".gz")
    gzipped = request.accept_encodings["gzip"] > 0 and packed.is_file()
    response = send_file(
        packed if gzipped else target, mimetype=media_type, conditional=True, etag=True
    )
    # send_file names the file it sent (the .gz copy): not for a page or script
    response.headers.pop("Content-Disposition", None)
    if gzipped:
        response.headers["Content-Encoding"] = "gzip"
    if target.suffix.lower() in COMPRESSIBLE:
        response.vary.add("Accept-Encoding")
    if name not in _ENTRY_FILES and _HASHED.search(name):
        response.headers["Cache-Control"] = CACHE_IMMUTABLE
    else:
        response.headers["Cache-Control"] = CACHE_REVALIDATE
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _missing(message: str) -> Response:
    return error_response(404, message)
