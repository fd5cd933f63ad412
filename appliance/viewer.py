"""The OHIF viewer the appliance serves at ``/viewer`` (README "Viewer"):
installing a published build into ``viewer.folder``.

OHIF publishes its built viewer in the npm package ``@ohif/app``: the
package's ``dist/`` folder is a static web application (HTML, JavaScript
bundles, WebAssembly codecs).  :func:`fetch_tarball` gets the package with
``npm pack`` (nothing is installed or run: npm only downloads the tarball),
and :func:`install` turns it into a viewer of this appliance:

- only the entries under ``package/dist/`` are extracted, each one checked
  first: a tarball with an absolute name, a ``..`` component, a link or a
  device anywhere is refused whole (a tarball is input from the network);
- the build's public path, baked in as ``/`` when OHIF built it, becomes
  :data:`BASE_PATH` (:func:`rewrite_public_path`): ``window.PUBLIC_URL`` and
  the root-relative ``href``/``src`` of ``index.html``, webpack's
  ``__webpack_require__.p`` in the bundles (where chunks, workers and
  WebAssembly are loaded from), ``url(/...)`` in the style sheets, and the
  icons of ``manifest.json``; the service-worker script is dropped from
  ``index.html``;
- ``app-config.js`` is replaced by ours (:func:`app_config`): one DICOMweb
  data source, this appliance's ``/v1`` on the page's own origin (so no
  CORS set-up), the router under ``/viewer``, no first-run tour and no
  investigational-use banner;
- the text files, bundles and WebAssembly get a gzip copy beside them
  (``name.gz``, :func:`precompress`), which the server sends to browsers
  that accept gzip: the main bundle is 17 MB, 3.4 MB compressed;
- the new build is assembled in a temporary sibling folder, then renamed
  into place, replacing the old build only when the new one is complete;
  :data:`MARKER` records the version, the tarball's SHA-256 and the time.

The folder is replaced only if it is empty or holds an earlier install (its
marker): ``--folder`` pointed at the wrong place never loses files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Final

from appliance.errors import ApplianceError

LOGGER = logging.getLogger(__name__)

#: The npm package of OHIF's built viewer.
PACKAGE: Final = "@ohif/app"
#: The version ``viewer install`` fetches unless told otherwise: the one the
#: browser tests run (tests/integration/test_viewer_ohif.py).
DEFAULT_VERSION: Final = "3.13.2"
#: Where the viewer is served (the ``viewer`` blueprint of dicomweb).
BASE_PATH: Final = "/viewer/"
#: The DICOMweb service root the viewer calls, on its own origin.
SERVICE_ROOT: Final = "/v1"
#: The record of the install in the folder (not served).
MARKER: Final = ".dicom-appliance-viewer.json"
#: The folder of the built viewer inside the npm tarball.
DIST: Final = "package/dist/"
#: The most bytes a build may unpack to (3.13.2: 204 MB): a bound on what a
#: hostile tarball could fill the disk with.
MAX_BYTES: Final = 2_000_000_000

#: The files given a gzip copy (:func:`precompress`): those that compress.
COMPRESSIBLE: Final = frozenset({".js", ".mjs", ".css", ".wasm", ".json", ".map", ".svg", ".html"})
#: Smaller files are sent as they are.
COMPRESS_MIN_BYTES: Final = 1024

#: An npm version or tag: what may follow ``@ohif/app@`` (no spaces, no
#: option-like leading dash).
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+\-]{0,63}")
#: webpack's public path as OHIF's build sets it (runtime/public_path).
_WEBPACK_PUBLIC_PATH = re.compile(r'__webpack_require__\.p = "/";')
#: Root-relative references in index.html (``"//"``, protocol-relative, excluded).
_INDEX_REFERENCE = re.compile(r'(\s(?:href|src)=")/(?!/)')
_INDEX_PUBLIC_URL = re.compile(r'window\.PUBLIC_URL="/"')
_SERVICE_WORKER_TAG = re.compile(r'<script[^>]*src="/init-service-worker\.js"[^>]*></script>')
_CSS_URL = re.compile(r"url\(/(?!/)")


class ViewerError(ApplianceError):
    """The viewer could not be fetched or installed; the reason says why."""


@dataclasses.dataclass(frozen=True)
class InstallReport:
    """What :func:`install` did."""

    folder: Path
    version: str
    sha256: str
    files: int
    bytes: int
    rewritten: tuple[str, ...]
    compressed: int  # files with a gzip copy
    replaced: str | None  # the version replaced, "unknown" if unrecorded
    seconds: float

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON object (``viewer install --json``)."""
        out = dataclasses.asdict(self)
        out["folder"] = str(self.folder)
        out["rewritten"] = list(self.rewritten)
        out["seconds"] = round(self.seconds, 2)
        return out

    def summary(self) -> list[str]:
        """The report as lines for a terminal."""
        lines = [
            f"OHIF viewer {self.version} installed in {self.folder}: {self.files} files, "
            f"{self.bytes / 1e6:.0f} MB, in {self.seconds:.1f} s",
            f"public path rewritten to {BASE_PATH} in {len(self.rewritten)} files; "
            "app-config.js points at this appliance's /v1; "
            f"{self.compressed} files have a gzip copy",
        ]
        if self.replaced:
            lines.append(f"replaced the viewer {self.replaced} installed before")
        lines.append(f"served at {BASE_PATH} by 'dicom-appliance serve' (viewer.folder)")
        return lines


def check_version(version: str) -> str:
    """*version* if it is a plausible npm version or tag, else ViewerError."""
    if _VERSION.fullmatch(version) is None:
        raise ViewerError(f"{version!r} is not an npm version or tag of {PACKAGE}")
    return version


def fetch_tarball(version: str, into: Path, *, npm: str | None = None) -> Path:
    """Download ``@ohif/app@version`` with ``npm pack`` into *into*.

    ``npm pack`` only downloads (and checks the registry's integrity hash
    of) the package tarball; it runs none of the package's scripts.

    Raises
    ------
    ViewerError
        npm is missing, or ``npm pack`` failed (the registry unreachable, no
        such version): the reason quotes npm's last error line.
    """
    check_version(version)
    npm = npm or shutil.which("npm")
    if npm is None:
        raise ViewerError(
            "npm is not installed (it fetches the OHIF build): install Node.js/npm, or "
            f"download 'npm pack {PACKAGE}@{version}' elsewhere and give --from-tarball FILE"
        )
    into.mkdir(parents=True, exist_ok=True)
    command = [npm, "pack", f"{PACKAGE}@{version}", "--pack-destination", str(into), "--json"]
    LOGGER.info("fetching %s@%s with npm pack", PACKAGE, version)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise ViewerError(f"npm pack {PACKAGE}@{version} took more than 15 minutes") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise ViewerError(f"npm pack {PACKAGE}@{version} failed: {last}")
    tarballs = sorted(into.glob("*.tgz"))
    try:
        # npm pack --json: [{"filename": "ohif-app-3.13.2.tgz", ...}]
        named = into / str(json.loads(done.stdout)[0]["filename"])
    except (ValueError, LookupError, TypeError):
        named = tarballs[-1] if tarballs else into / "missing.tgz"
    if not named.is_file():
        raise ViewerError(f"npm pack {PACKAGE}@{version} wrote no tarball")
    return named


def install(tarball: Path, folder: Path, *, version: str | None = None) -> InstallReport:
    """Install the OHIF build of the npm tarball *tarball* into *folder*.

    Parameters
    ----------
    tarball
        An ``@ohif/app`` package (``npm pack``'s ``.tgz``).
    folder
        ``viewer.folder``; created if missing, replaced if it holds an
        earlier install.
    version
        The version expected (``--version``); the package's own
        ``package.json`` is what is recorded.

    Raises
    ------
    ViewerError
        the tarball is unreadable, unsafe, not an OHIF build, or of another
        version than *version*; *folder* holds files of something else.
    """
    started = time.monotonic()
    folder = folder.resolve()
    replaced = _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sha256 = _sha256(tarball)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-new-", dir=folder.parent))
    try:
        package_version, files, size = _extract(tarball, staging)
        if version is not None and version != package_version:
            raise ViewerError(
                f"the tarball holds {PACKAGE} {package_version}, not the {version} asked for"
            )
        rewritten = rewrite_public_path(staging, BASE_PATH)
        (staging / "app-config.js").write_text(app_config(), encoding="utf-8")
        compressed = precompress(staging)
        marker = {
            "package": PACKAGE,
            "version": package_version,
            "sha256": sha256,
            "installed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "base_path": BASE_PATH,
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)  # noqa: S103 - static web files, readable by the server's user
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    LOGGER.info("viewer %s installed (%d files)", package_version, files)
    return InstallReport(
        folder=folder,
        version=package_version,
        sha256=sha256,
        files=files,
        bytes=size,
        rewritten=tuple(rewritten),
        compressed=compressed,
        replaced=replaced,
        seconds=time.monotonic() - started,
    )


def installed(folder: Path) -> dict[str, Any] | None:
    """The marker of the install in *folder*, or None if there is none."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_replaceable(folder: Path) -> str | None:
    """The version installed in *folder* (``"unknown"`` if unrecorded), None
    if *folder* is missing or empty; ViewerError if it holds anything else."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise ViewerError(f"{folder} exists and is not a folder")
    record = installed(folder)
    if record is not None:
        return str(record.get("version") or "unknown")
    if any(folder.iterdir()):
        raise ViewerError(
            f"{folder} holds files but no viewer install ({MARKER} is missing): "
            "not replaced; empty it or choose another --folder"
        )
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ViewerError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _member_path(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's name, refused if absolute or with a ``..`` component."""
    name = member.name
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ViewerError(f"refused: the tarball's entry {name!r} points outside the package")
    return path


def _extract(tarball: Path, into: Path) -> tuple[str, int, int]:
    """Extract ``package/dist/*`` of *tarball* into *into* (checked first);
    return the package's version, the files and bytes written."""
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            members = archive.getmembers()
            dist: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
            total = 0
            version = None
            for member in members:
                path = _member_path(member)
                if not (member.isfile() or member.isdir()):
                    raise ViewerError(
                        f"refused: the tarball's entry {member.name!r} is a link or a "
                        "special file (an npm package holds only files)"
                    )
                parts = path.parts[1:] if path.parts[:1] == (".",) else path.parts
                if parts == ("package", "package.json") and member.isfile():
                    version = _package_version(archive, member)
                if len(parts) > 2 and parts[:2] == ("package", "dist"):
                    dist.append((member, PurePosixPath(*parts[2:])))
                    total += member.size if member.isfile() else 0
            if version is None:
                raise ViewerError(f"{tarball} is not an npm package (no package/package.json)")
            if not any(rel == PurePosixPath("index.html") for _m, rel in dist):
                raise ViewerError(f"{tarball} holds no built viewer ({DIST}index.html)")
            if total > MAX_BYTES:
                raise ViewerError(f"refused: {tarball} unpacks to more than {MAX_BYTES} bytes")
            files = 0
            for member, rel in dist:
                target = into.joinpath(*rel.parts)
                if not target.resolve().is_relative_to(into.resolve()):
                    raise ViewerError(f"refused: the entry {member.name!r} leaves the folder")
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None  # a regular file
                with source, target.open("xb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                target.chmod(0o644)
                files += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ViewerError(f"cannot read {tarball} as an npm tarball: {exc}") from None
    return version, files, total


def _package_version(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    source = archive.extractfile(member)
    try:
        data = json.loads(source.read(1 << 20) if source else b"")
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("name") != PACKAGE:
        raise ViewerError(f"the tarball is not the {PACKAGE} package")
    return check_version(str(data.get("version", "")))


def rewrite_public_path(dist: Path, base: str) -> list[str]:
    """Move the build in *dist* from the public path ``/`` to *base*
    (``/viewer/``); return the files changed.

    Raises
    ------
    ViewerError
        the build does not look like the OHIF builds this knows: no
        ``window.PUBLIC_URL`` in index.html, or no bundle with webpack's
        public path.
    """
    changed: list[str] = []
    index = dist / "index.html"
    text = index.read_text(encoding="utf-8")
    text, urls = _INDEX_PUBLIC_URL.subn(f"window.PUBLIC_URL={json.dumps(base)}", text)
    if not urls:
        raise ViewerError("index.html sets no window.PUBLIC_URL: not an OHIF 3 build")
    # the service worker is not wanted (it caches studies in the browser);
    # OHIF's own script only unregisters workers, kept out all the same
    text = _SERVICE_WORKER_TAG.sub("", text)
    text = _INDEX_REFERENCE.sub(lambda m: f"{m.group(1)}{base}", text)
    index.write_text(text, encoding="utf-8")
    changed.append("index.html")
    bundles = 0
    for path in sorted(dist.glob("*.js")):
        data = path.read_bytes()
        if b'__webpack_require__.p = "/";' not in data:
            continue
        new = _WEBPACK_PUBLIC_PATH.sub(
            f"__webpack_require__.p = {json.dumps(base)};", data.decode("utf-8")
        )
        path.write_text(new, encoding="utf-8")
        changed.append(path.name)
        bundles += 1
    if not any(name.startswith("app.bundle.") for name in changed):
        raise ViewerError("no app.bundle.*.js sets webpack's public path: not an OHIF 3 build")
    for path in sorted(dist.glob("*.css")):
        text = path.read_text(encoding="utf-8")
        new, count = _CSS_URL.subn(f"url({base}", text)
        if count:
            path.write_text(new, encoding="utf-8")
            changed.append(path.name)
    manifest = dist / "manifest.json"
    if manifest.is_file():
        try:
            manifest_data: Any = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError:
            manifest_data = None
        if isinstance(manifest_data, dict):
            for icon in manifest_data.get("icons") or ():
                if isinstance(icon, dict) and str(icon.get("src", "")).startswith("/"):
                    icon["src"] = base + icon["src"].lstrip("/")
            manifest_data["start_url"] = base
            manifest_data["scope"] = base
            manifest.write_text(json.dumps(manifest_data, indent=2) + "\n", encoding="utf-8")
            changed.append("manifest.json")
    return changed


def precompress(dist: Path) -> int:
    """Write ``name.gz`` beside each file of *dist* that compresses (by
    extension, :data:`COMPRESSIBLE`, and size, at least a tenth smaller);
    return how many were written.  ``app-config.js`` is included: it is
    written before.  The copies carry no name or time (reproducible)."""
    count = 0
    for path in sorted(dist.rglob("*")):
        if path.suffix.lower() not in COMPRESSIBLE or not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) < COMPRESS_MIN_BYTES:
            continue
        packed = gzip.compress(data, compresslevel=6, mtime=0)
        if len(packed) > len(data) * 0.9:
            continue
        target = path.with_name(path.name + ".gz")
        target.write_bytes(packed)
        target.chmod(0o644)
        count += 1
    return count


def app_config(service_root: str = SERVICE_ROOT) -> str:
    """The viewer's ``app-config.js``: OHIF's ``window.config`` for this
    appliance.

    One DICOMweb data source, the page's own origin's *service_root*
    (:data:`SERVICE_ROOT`; with data partitions on, the default partition's
    root, served in place of the installed file by dicomweb/views/viewer.py)
    (whatever host name the browser used, so the same build serves every
    address of the appliance), set as the appliance answers (see
    dicomweb/views):

    - ``qidoSupportsIncludeField``: QIDO-RS takes ``includefield`` (PS3.18
      8.3.4.3); ``supportsFuzzyMatching`` false: fuzzy matching is not
      supported (8.3.4.2); ``supportsWildcard``: ``*`` and ``?`` match as
      PS3.4 C.2.2.2.4 says;
    - ``imageRendering: 'wadors'``: pixel data by the frames resource
      (PS3.18 10.4.1.1.4), which transcodes to what is accepted;
      ``thumbnailRendering: 'thumbnail'``: the instance thumbnail resource;
    - ``enableStudyLazyLoad``: series metadata fetched series by series;
      ``bulkDataURI``: metadata's BulkDataURIs are absolute URLs here;
    - ``omitQuotationForMultipartRequest``: ``Accept: multipart/related;
      type=application/octet-stream`` without quotes, which every server
      parses;
    - ``staticWado`` false: a real QIDO-RS (matching done by the server);
      ``dicomUploadEnabled`` false: the viewer stores nothing;
    - no first-run tour, no investigational-use banner (the appliance's
      README says what OHIF is and is not), no study list warning about a
      cross-origin server (it is the same origin).
    """
    return f"""/* Written by 'dicom-appliance viewer install': OHIF's configuration for
 * this appliance (README "Viewer").  Replaced at each install. */
window.config = {{
  name: 'dicom-appliance',
  routerBasename: {json.dumps(BASE_PATH.rstrip("/"))},
  extensions: [],
  modes: [],
  customizationService: {{
    'ohif.tours': {{ $set: [] }},
  }},
  investigationalUseDialog: {{ option: 'never' }},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
  showErrorDetails: 'production',
  defaultDataSourceName: 'appliance',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'appliance',
      configuration: {{
        friendlyName: 'dicom-appliance',
        name: 'appliance',
        qidoRoot: window.location.origin + {json.dumps(service_root)},
        wadoRoot: window.location.origin + {json.dumps(service_root)},
        wadoUriRoot: window.location.origin + {json.dumps(service_root)},
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'thumbnail',
        thumbnailRequestStrategy: 'fetch',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        supportsReject: false,
        staticWado: false,
        dicomUploadEnabled: false,
        bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
        omitQuotationForMultipartRequest: true,
      }},
    }},
  ],
}};
"""


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename *staging* to *folder*, the old *folder* (if any) out of the
    way first and removed after: two renames in one parent folder, so
    *folder* is never a half-written build."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=folder.parent))
        old.rmdir()
        folder.rename(old)
    try:
        staging.rename(folder)
    except OSError:
        if old is not None:
            old.rename(folder)  # put the previous build back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
