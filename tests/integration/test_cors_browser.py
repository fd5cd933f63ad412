"""CORS in a real browser (issue 10): a viewer served from another origin
retrieves an instance's metadata and frames when the appliance allows that
origin (``http.cors_allowed_origins``), and is refused when it does not.

The "viewer" is a small page served by a second HTTP server on loopback: on
one port it is origin A (allowed), on another origin B (not).  Its script
fetches ``.../metadata`` (a simple request) and ``.../frames/1`` with
``Accept: multipart/related; type="application/octet-stream";
transfer-syntax=*`` (the quotes make Chromium send a CORS preflight first),
then writes what it got into the page, which the test reads.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.browser import chromium, screenshot
from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import stow

pytestmark = [pytest.mark.integration, pytest.mark.interop]

#: The page of the other-origin viewer: ``?root=...&path=...`` names the
#: appliance's service root and the instance's path below it.
PAGE = b"""<!doctype html><html><head><title>other-origin viewer</title></head>
<body><pre id="result">running</pre><script>
(async () => {
  const params = new URLSearchParams(location.search);
  const base = params.get('root') + params.get('path');
  const out = {origin: location.origin};
  try {
    const meta = await fetch(base + '/metadata', {headers: {Accept: 'application/dicom+json'}});
    out.metadataStatus = meta.status;
    const json = await meta.json();
    out.rows = json[0]['00280010'].Value[0];
    const frames = await fetch(base + '/frames/1', {headers: {
      Accept: 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}});
    out.framesStatus = frames.status;
    out.framesType = frames.headers.get('Content-Type');
    out.framesBytes = (await frames.arrayBuffer()).byteLength;
  } catch (error) {
    out.error = error.name + ': ' + error.message;
  }
  document.getElementById('result').textContent = JSON.stringify(out);
})();
</script></body></html>"""


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def page_server() -> tuple[http.server.ThreadingHTTPServer, str]:
    """The other-origin viewer on a free loopback port; its origin."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def origins() -> Iterator[tuple[str, str]]:
    """Origins A and B: the same page on two loopback ports."""
    a, origin_a = page_server()
    b, origin_b = page_server()
    yield origin_a, origin_b
    for server in (a, b):
        server.shutdown()
        server.server_close()


@pytest.fixture
def appliance(tmp_path: Path, origins: tuple[str, str]) -> Iterator[LiveServer]:
    """An appliance that allows origin A only."""
    config = make_config(tmp_path, APPLIANCE_HTTP_CORS_ALLOWED_ORIGINS=origins[0])
    yield from started_server(config)


def run_page(browser: Any, origin: str, server: LiveServer, path: str, name: str) -> dict[str, Any]:
    """Open the viewer page of *origin*; what its script reported."""
    page = browser.new_page()
    page.goto(f"{origin}/viewer.html?root={server.root}&path={path}")
    result = page.locator("#result")
    page.wait_for_function("document.getElementById('result').textContent !== 'running'")
    screenshot(page, name)
    report: dict[str, Any] = json.loads(result.text_content() or "{}")
    page.close()
    return report


def test_an_allowed_origin_retrieves_and_another_is_refused(
    appliance: LiveServer, origins: tuple[str, str]
) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with open(get_testdata_file("CT_small.dcm"), "rb") as fh:  # type: ignore[arg-type]
        assert stow(appliance.base_url, fh.read()).status_code == 200
    path = (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    allowed, other = origins

    with chromium() as browser:
        granted = run_page(browser, allowed, appliance, path, "cors-allowed-origin")
        refused = run_page(browser, other, appliance, path, "cors-other-origin")

    assert "error" not in granted, granted
    assert granted["metadataStatus"] == 200
    assert granted["rows"] == ds.Rows
    assert granted["framesStatus"] == 200
    assert granted["framesType"].startswith("multipart/related")
    assert granted["framesBytes"] >= ds.Rows * ds.Columns * ds.BitsAllocated // 8

    # the browser withholds the response: fetch rejects (a network error)
    assert refused.get("error", "").startswith("TypeError"), refused
    assert "metadataStatus" not in refused
