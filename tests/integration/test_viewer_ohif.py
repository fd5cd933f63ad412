"""The real OHIF viewer (issue 10): ``viewer install`` of the published
``@ohif/app`` tarball, served by a live appliance at ``/viewer``, driven in
headless Chromium.

A CT stored by dcmtk's storescu (C-STORE) shows in OHIF's study list (by
the patient name it was given); the console's study page links to it in the
viewer, whose viewport draws its image: the canvas is not blank.  Screenshots of both pages are kept
(tests/artifacts/screenshots/ohif-*.png; the README shows copies).

The tarball is fetched once per session with ``npm pack`` (about 50 MB;
``OHIF_TEST_TARBALL`` names one fetched before);
without npm or the registry the tests skip (fail under CI).  Every request
the browser makes goes to the appliance: the viewer calls nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.cli import main
from appliance.errors import ApplianceError
from appliance.viewer import DEFAULT_VERSION, fetch_tarball
from tests.browser import chromium, is_real_image, screenshot
from tests.conftest import LiveAppliance, appliance_config, dcmtk, missing_peer, started_appliance

pytestmark = [pytest.mark.integration, pytest.mark.interop, pytest.mark.slow]

PATIENT_NAME = "VIEWER^OHIF"
#: OHIF draws with WebGL; headless Chromium has it in software (SwiftShader).
WEBGL_FLAGS = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader")


@pytest.fixture(scope="session")
def ohif_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published OHIF build (``npm pack @ohif/app@DEFAULT_VERSION``),
    once per session; ``$OHIF_TEST_TARBALL`` names one fetched
    before (offline runs)."""
    given = os.environ.get("OHIF_TEST_TARBALL")
    if given:
        return Path(given)
    if shutil.which("npm") is None:
        missing_peer("npm is not installed (it fetches the OHIF build)")
    try:
        return fetch_tarball(DEFAULT_VERSION, tmp_path_factory.mktemp("ohif"))
    except ApplianceError as exc:
        missing_peer(f"the OHIF build could not be fetched: {exc.reason}")
        raise


@pytest.fixture
def viewer_appliance(tmp_path: Path, ohif_tarball: Path) -> Iterator[LiveAppliance]:
    """An appliance whose viewer.folder holds the installed OHIF build."""
    folder = tmp_path / "viewer"
    code = main(
        ["viewer", "install", "--from-tarball", str(ohif_tarball), "--folder", str(folder), "-q"]
    )
    assert code == 0
    config = appliance_config(tmp_path, APPLIANCE_VIEWER_FOLDER=str(folder))
    yield from started_appliance(config)


def _store_ct(app: LiveAppliance, tmp_path: Path) -> pydicom.Dataset:
    """pydicom's CT_small.dcm, named PATIENT_NAME, stored by storescu."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = PATIENT_NAME
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    subprocess.run(
        [dcmtk("storescu"), "-aec", app.ae_title, "127.0.0.1", str(app.dimse_port), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return ds


def _assert_no_first_run_dialogs(page: Any) -> None:
    """Neither OHIF's first-run tour (Shepherd) nor its investigational-use
    banner shows: the installed app-config.js turns both off."""
    assert page.locator(".shepherd-element").count() == 0
    assert page.get_by_text("investigational use", exact=False).count() == 0


def test_ohif_lists_and_draws_a_study_stored_by_c_store(
    viewer_appliance: LiveAppliance, tmp_path: Path
) -> None:
    app = viewer_appliance
    ds = _store_ct(app, tmp_path)
    requested: list[str] = []
    failed: list[str] = []

    with chromium(extra_flags=WEBGL_FLAGS) as browser:
        page = browser.new_page()
        page.on("request", lambda request: requested.append(request.url))
        page.on(
            "response",
            lambda response: (
                failed.append(f"{response.status} {response.url}")
                if response.status >= 400 and "/v1/" in response.url
                else None
            ),
        )
        page.goto(f"{app.base_url}/viewer/", wait_until="domcontentloaded")
        # the study list: a row with the patient name (OHIF shows "^" as ", ")
        page.get_by_text("VIEWER, OHIF").first.wait_for(timeout=30_000)
        assert page.get_by_text("19-Jan-2004", exact=False).count() >= 1  # its StudyDate
        _assert_no_first_run_dialogs(page)
        screenshot(page, "ohif-study-list")

        # the console's study page links into the viewer
        page.goto(f"{app.base_url}/console/studies/{ds.StudyInstanceUID}")
        link = page.locator("#open-viewer")
        assert link.get_attribute("href") == (
            f"/viewer/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}"
        )
        link.click()
        page.wait_for_url(f"**/viewer/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}")
        canvas = page.locator(".cornerstone-canvas, canvas.cornerstone-canvas").first
        canvas.wait_for(timeout=45_000)
        # drawn: the canvas's pixels vary (a blank viewport is one colour)
        page.wait_for_function(
            """() => {
                const c = document.querySelector('.cornerstone-canvas');
                if (!c || !c.width) return false;
                const g = c.getContext('2d');
                if (!g) return false;
                const d = g.getImageData(0, 0, c.width, c.height).data;
                let lo = 255, hi = 0;
                for (let i = 0; i < d.length; i += 4 * 7) {
                    const v = d[i]; if (v < lo) lo = v; if (v > hi) hi = v;
                }
                return hi - lo > 32;
            }""",
            timeout=45_000,
        )
        assert is_real_image(canvas.screenshot())
        _assert_no_first_run_dialogs(page)
        screenshot(page, "ohif-viewer")

    assert not failed, failed
    # OHIF got the study from the appliance, and called nothing else
    assert any("/v1/studies" in url for url in requested)
    assert any(f"/v1/studies/{ds.StudyInstanceUID}" in url for url in requested)
    hosts = {urlsplit(url).netloc for url in requested if url.startswith("http")}
    assert hosts == {urlsplit(app.base_url).netloc}, hosts


def test_the_real_build_is_moved_under_viewer(tmp_path: Path, ohif_tarball: Path) -> None:
    """Every root-relative reference of the published build now points
    under /viewer/, and what index.html loads is served with its type."""
    import re

    from appliance.viewer import install
    from tests.integration.test_viewer_install import client_for

    folder = tmp_path / "viewer"
    report = install(ohif_tarball, folder, version=DEFAULT_VERSION)

    assert report.version == DEFAULT_VERSION
    assert report.files > 200
    assert report.bytes > 100_000_000
    for path in folder.glob("*.js"):
        assert '__webpack_require__.p = "/";' not in path.read_text(encoding="utf-8"), path
    index = (folder / "index.html").read_text(encoding="utf-8")
    references = re.findall(r'\s(?:href|src)="(/[^"]*)"', index)
    assert references
    assert all(ref.startswith("/viewer/") for ref in references), references
    assert "init-service-worker" not in index
    client = client_for(tmp_path, str(folder))
    for ref in references:
        response = client.get(ref)
        assert response.status_code == 200, ref
    bundle = next(ref for ref in references if "/app.bundle." in ref)
    assert client.get(bundle).mimetype == "text/javascript"
    packed = client.get(bundle, headers={"Accept-Encoding": "gzip"})
    assert packed.headers["Content-Encoding"] == "gzip"
    assert report.compressed > 50
    wasm = next(folder.glob("*.wasm")).name
    assert client.get(f"/viewer/{wasm}").mimetype == "application/wasm"
