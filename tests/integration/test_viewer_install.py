"""``viewer install`` and the ``/viewer`` routes, without a browser (issue
10): a small tarball shaped like ``npm pack @ohif/app`` (package/dist/...)
is installed; unsafe tarballs are refused whole; an install replaces the
previous one only when complete; the files are served with their media
types and cache headers, unknown routes get index.html, and nothing
outside the folder is reachable.  The real OHIF tarball's install is
checked in test_viewer_ohif.py."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from appliance import viewer
from appliance.cli import main
from appliance.config import load_config
from appliance.viewer import MARKER, ViewerError, install
from dicomweb.app import create_app
from dicomweb.views.viewer import study_url

pytestmark = pytest.mark.integration

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><link rel="icon" href="/assets/favicon.ico">'
    '<script src="/app-config.js"></script>'
    '<script rel="preload" as="script" type="module" src="/init-service-worker.js"></script>'
    '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
    '<a href="//cdn.example/x">x</a><a href="https://ohif.org/">ohif</a>'
    "</head><body></body></html>"
)
BUNDLE = '(() => {\n__webpack_require__.p = "/";\n})();\nconsole.log("app");\n' + "//\n" * 900
FILES = {
    "package/package.json": json.dumps({"name": "@ohif/app", "version": "3.13.2"}).encode(),
    "package/README.md": b"not extracted",
    "package/dist/index.html": INDEX.encode(),
    "package/dist/app-config.js": b"window.config = {name: 'config/default.js'};",
    "package/dist/app.bundle.0123456789abcdef.js": BUNDLE.encode(),
    "package/dist/app.bundle.css": b"@font-face{src:url(/a34f9d1faa5f3315.woff2)}",
    "package/dist/a34f9d1faa5f3315.woff2": b"wOF2",
    "package/dist/0ddf166f7a343eda.wasm": b"\0asm\1\0\0\0",
    "package/dist/init-service-worker.js": b"// unregisters",
    "package/dist/manifest.json": json.dumps(
        {"start_url": "/", "icons": [{"src": "/assets/a.png", "sizes": "1x1"}]}
    ).encode(),
    "package/dist/assets/favicon.ico": b"\0\0\1\0",
    "package/dist/assets/a.png": b"\x89PNG",
}


def make_tarball(
    path: Path, files: dict[str, bytes] | None = None, *, links: dict[str, str] | None = None
) -> Path:
    """A gzip tarball of *files* (name: bytes) and symbolic *links*
    (name: target), as ``npm pack`` writes one."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (FILES if files is None else files).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return path


def with_version(version: str) -> dict[str, bytes]:
    files = dict(FILES)
    files["package/package.json"] = json.dumps({"name": "@ohif/app", "version": version}).encode()
    return files


def test_install_extracts_dist_rewrites_the_public_path_and_records_it(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "ohif.tgz")
    folder = tmp_path / "data" / "viewer"

    report = install(tarball, folder)

    assert report.version == "3.13.2"
    assert report.replaced is None
    assert report.files == len([n for n in FILES if n.startswith("package/dist/")])
    assert report.compressed == 2  # the bundle and app-config.js: the others are tiny
    assert (folder / "app-config.js.gz").is_file()
    assert not (folder / "README.md").exists()
    assert not (folder / "package").exists()
    index = (folder / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in index
    assert 'href="/viewer/manifest.json"' in index
    assert 'src="/viewer/app.bundle.0123456789abcdef.js"' in index
    assert 'src="/viewer/app-config.js"' in index
    assert "init-service-worker" not in index  # no service worker
    assert 'href="//cdn.example/x"' in index
    assert 'href="https://ohif.org/"' in index
    bundle = (folder / "app.bundle.0123456789abcdef.js").read_text()
    assert '__webpack_require__.p = "/viewer/";' in bundle
    assert "url(/viewer/a34f9d1faa5f3315.woff2)" in (folder / "app.bundle.css").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["start_url"] == "/viewer/"
    assert manifest["icons"][0]["src"] == "/viewer/assets/a.png"
    config = (folder / "app-config.js").read_text()
    assert 'routerBasename: "/viewer"' in config
    assert 'qidoRoot: window.location.origin + "/v1"' in config
    assert "config/default.js" not in config  # OHIF's own, pointing at a demo server
    assert "'ohif.tours': { $set: [] }" in config
    assert "investigationalUseDialog: { option: 'never' }" in config
    record = json.loads((folder / MARKER).read_text())
    assert record["version"] == "3.13.2"
    assert record["sha256"] == report.sha256
    assert len(report.sha256) == 64
    assert (folder / "assets" / "a.png").stat().st_mode & 0o777 == 0o644
    assert (folder / "assets").stat().st_mode & 0o777 == 0o755
    assert folder.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in folder.parent.iterdir()) == ["viewer"]  # no leftovers


@pytest.mark.parametrize(
    ("files", "links", "why"),
    [
        ({**FILES, "package/dist/../../../evil.sh": b"x"}, None, "points outside"),
        ({**FILES, "/etc/evil": b"x"}, None, "points outside"),
        ({**FILES, "package/../evil": b"x"}, None, "points outside"),
        (FILES, {"package/dist/passwd": "/etc/passwd"}, "is a link"),
        (FILES, {"package/dist/up": "../../.."}, "is a link"),
    ],
)
def test_unsafe_tarballs_are_refused_whole(
    tmp_path: Path, files: dict[str, bytes], links: dict[str, str] | None, why: str
) -> None:
    folder = tmp_path / "deep" / "viewer"
    install(make_tarball(tmp_path / "good.tgz"), folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    with pytest.raises(ViewerError, match=why):
        install(make_tarball(tmp_path / "bad.tgz", files, links=links), folder)

    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["viewer"]
    assert not (tmp_path / "evil.sh").exists()
    assert not (tmp_path / "evil").exists()


def test_a_new_install_replaces_the_old_one_only_when_complete(tmp_path: Path) -> None:
    folder = tmp_path / "viewer"
    install(make_tarball(tmp_path / "a.tgz", with_version("3.13.1")), folder)
    (folder / "stale.bundle.js").write_text("from the old build")

    not_ohif = with_version("3.13.2")
    not_ohif["package/dist/index.html"] = b"<html>no public url</html>"
    with pytest.raises(ViewerError, match="not an OHIF 3 build"):
        install(make_tarball(tmp_path / "b.tgz", not_ohif), folder)
    assert viewer.installed(folder)["version"] == "3.13.1"  # type: ignore[index]
    assert (folder / "stale.bundle.js").exists()

    report = install(make_tarball(tmp_path / "c.tgz", with_version("3.13.2")), folder)
    assert report.replaced == "3.13.1"
    assert viewer.installed(folder)["version"] == "3.13.2"  # type: ignore[index]
    assert not (folder / "stale.bundle.js").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz", "b.tgz", "c.tgz", "viewer"]


def test_refusals(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "ohif.tgz")
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ViewerError, match="holds files but no viewer install"):
        install(tarball, precious)
    assert (precious / "thesis.tex").read_text() == "years of work"

    with pytest.raises(ViewerError, match=r"not the 3\.12\.0 asked for"):
        install(tarball, tmp_path / "v", version="3.12.0")
    other = {**FILES, "package/package.json": b'{"name": "left-pad", "version": "1.0.0"}'}
    with pytest.raises(ViewerError, match="not the @ohif/app package"):
        install(make_tarball(tmp_path / "other.tgz", other), tmp_path / "v")
    no_dist = {k: v for k, v in FILES.items() if not k.startswith("package/dist/")}
    with pytest.raises(ViewerError, match="no built viewer"):
        install(make_tarball(tmp_path / "nodist.tgz", no_dist), tmp_path / "v")
    (tmp_path / "junk.tgz").write_bytes(b"not gzip")
    with pytest.raises(ViewerError, match="cannot read"):
        install(tmp_path / "junk.tgz", tmp_path / "v")
    with pytest.raises(ViewerError, match="not an npm version"):
        viewer.check_version("--registry=http://evil")
    assert not (tmp_path / "v").exists()


def test_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = make_tarball(tmp_path / "ohif.tgz")
    monkeypatch.chdir(tmp_path)  # viewer.folder's default, ./data/viewer, is relative to it
    code = main(["viewer", "install", "--from-tarball", str(tarball), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["version"] == "3.13.2"
    assert out["folder"] == str(tmp_path / "data" / "viewer")
    assert (tmp_path / "data" / "viewer" / "index.html").is_file()

    code = main(["viewer", "install", "--from-tarball", str(tarball), "--version", "3.0.0"])
    assert code == 1
    assert "not the 3.0.0 asked for" in capsys.readouterr().err

    (tmp_path / "off.toml").write_text('[viewer]\nfolder = ""\n')
    code = main(["viewer", "install", "--config", "off.toml", "--from-tarball", str(tarball)])
    assert code == 2
    assert "viewer.folder is empty" in capsys.readouterr().err


def test_without_npm_the_command_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    code = main(["viewer", "install", "--folder", str(tmp_path / "v")])
    assert code == 1
    err = capsys.readouterr().err
    assert "npm is not installed" in err
    assert "--from-tarball" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------
# serving


def client_for(tmp_path: Path, folder: str, **environ: str) -> FlaskClient:
    env = {
        "APPLIANCE_STORAGE_PATH": str(tmp_path / "blobs"),
        "APPLIANCE_INDEX_URL": f"sqlite:///{tmp_path / 'index.db'}",
        "APPLIANCE_VIEWER_FOLDER": folder,
        **environ,
    }
    return create_app(load_config(environ=env, cwd=tmp_path)).test_client()


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    install(make_tarball(tmp_path / "ohif.tgz"), tmp_path / "viewer")
    return client_for(tmp_path, str(tmp_path / "viewer"))


def test_files_have_their_media_types_and_cache_headers(client: FlaskClient) -> None:
    index = client.get("/viewer/")
    assert index.status_code == 200
    assert index.headers["Content-Type"] == "text/html; charset=utf-8"
    assert index.headers["Cache-Control"] == "no-cache"
    assert "Content-Disposition" not in index.headers
    assert b'window.PUBLIC_URL="/viewer/"' in index.data
    assert index.headers["X-Content-Type-Options"] == "nosniff"

    config = client.get("/viewer/app-config.js")
    assert config.mimetype == "text/javascript"
    assert config.headers["Cache-Control"] == "no-cache"

    bundle = client.get("/viewer/app.bundle.0123456789abcdef.js")
    assert bundle.status_code == 200
    assert bundle.mimetype == "text/javascript"
    assert bundle.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    again = client.get(
        "/viewer/app.bundle.0123456789abcdef.js", headers={"If-None-Match": bundle.headers["ETag"]}
    )
    assert again.status_code == 304

    packed = client.get(
        "/viewer/app.bundle.0123456789abcdef.js", headers={"Accept-Encoding": "gzip, br"}
    )
    assert packed.headers["Content-Encoding"] == "gzip"
    assert packed.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert "Content-Disposition" not in packed.headers  # no .gz file name
    assert "Accept-Encoding" in packed.headers["Vary"]
    assert gzip.decompress(packed.data) == bundle.data
    assert len(packed.data) < len(bundle.data) / 10
    assert "Content-Encoding" not in bundle.headers
    small = client.get("/viewer/app.bundle.css", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers  # too small to have a copy

    wasm = client.get("/viewer/0ddf166f7a343eda.wasm")
    assert wasm.mimetype == "application/wasm"
    assert wasm.data == b"\0asm\1\0\0\0"
    assert client.get("/viewer/a34f9d1faa5f3315.woff2").mimetype == "font/woff2"
    assert client.get("/viewer/app.bundle.css").mimetype == "text/css"
    assert client.get("/viewer/manifest.json").mimetype == "application/json"
    icon = client.get("/viewer/assets/a.png")
    assert icon.mimetype == "image/png"
    assert icon.headers["Cache-Control"] == "no-cache"
    assert client.head("/viewer/").status_code == 200
    assert client.get("/viewer").status_code in (301, 308)  # to /viewer/


def test_routes_of_the_viewer_get_index_html(client: FlaskClient) -> None:
    page = client.get("/viewer/viewer?StudyInstanceUIDs=1.2.3")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert b'window.PUBLIC_URL="/viewer/"' in page.data
    assert client.get("/viewer/viewer/dicomweb").status_code == 200
    assert client.get(study_url("1.2.840.1")).status_code == 200
    assert study_url("1.2.840.1") == "/viewer/viewer?StudyInstanceUIDs=1.2.840.1"
    # a missing file (it has an extension) is a 404, not the page
    missing = client.get("/viewer/app.bundle.ffffffffffffffff.js")
    assert missing.status_code == 404
    assert missing.is_json


@pytest.mark.parametrize(
    "path",
    [
        "/viewer/../index.db",
        "/viewer/%2e%2e/index.db",
        "/viewer/assets/..%2f..%2findex.db",
        "/viewer/%2Fetc%2Fpasswd",
        "/viewer//etc/passwd",
        f"/viewer/{MARKER}",
        "/viewer/assets/.hidden",
    ],
)
def test_nothing_outside_the_folder_nor_hidden_is_served(
    client: FlaskClient, tmp_path: Path, path: str
) -> None:
    (tmp_path / "viewer" / "assets" / ".hidden").write_text("secret")
    response = client.get(path)
    assert response.status_code in (308, 404), response.status_code
    assert b"secret" not in response.data
    assert b"root:" not in response.data
    assert b"3.13.2" not in response.data  # the marker
    assert b"SQLite" not in response.data


def test_no_viewer_is_a_404_that_says_what_to_do(tmp_path: Path) -> None:
    off = client_for(tmp_path, "").get("/viewer/")
    assert off.status_code == 404
    assert "viewer install" in off.get_json()["error"]
    empty = client_for(tmp_path, str(tmp_path / "nothing-here")).get("/viewer/viewer")
    assert empty.status_code == 404
    assert "viewer install" in empty.get_json()["error"]


def test_the_viewer_needs_no_token_but_its_data_does(tmp_path: Path) -> None:
    install(make_tarball(tmp_path / "ohif.tgz"), tmp_path / "viewer")
    client = client_for(tmp_path, str(tmp_path / "viewer"), APPLIANCE_AUTH_MODE="token")
    assert client.get("/viewer/").status_code == 200
    assert client.get("/viewer/viewer?StudyInstanceUIDs=1.2.3").status_code == 200
    assert client.get("/v1/studies").status_code == 401
