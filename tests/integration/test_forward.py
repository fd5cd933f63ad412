"""Store-and-forward to a real upstream: Orthanc with its DICOMweb plugin,
behind ``dicom-appliance serve``.

- C-STORE while the upstream is down: everything is queued, and arrives,
  byte-identical in its data set and exactly once, when it comes up.
- The appliance killed (SIGKILL, every process) in the middle of forwarding
  and started again: nothing is lost, nothing is doubled upstream.
- An Implicit VR study sent to a destination marked ``explicit_vr_only``
  arrives as Explicit VR Little Endian with the same pixel data.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from appliance.forward.upstream import first_part
from tests.conftest import dcmtk, start_orthanc
from tests.helpers import data_set_of, small_study, stow
from tests.integration.test_serve import AE_TITLE, Appliance, Site, migrated_site
from tests.peers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.interop, pytest.mark.slow]

RETRIEVE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def forward_env(url: str, **keys: object) -> dict[str, str]:
    """APPLIANCE_FORWARD for one destination named "orthanc" (short waits:
    a request times out after 3 s, so a dead sender's claim runs out after
    16 s; tries are at most 2 s apart)."""
    settings = {"name": "orthanc", "url": url, "timeout": 3, "retry_max_seconds": 2, **keys}
    inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return {"APPLIANCE_FORWARD": f"[{{{inline}}}]", "APPLIANCE_LOG_LEVEL": "info"}


def status(site: Site) -> dict[str, object]:
    done = site.run("forward", "status", "--json")
    assert done.returncode == 0, done.stderr
    (only,) = json.loads(done.stdout)["destinations"]
    assert isinstance(only, dict)
    return only


def wait_delivered(site: Site, count: int, timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        found = status(site)
        if found["delivered"] == count and found["queued"] == 0:
            return found
        assert time.monotonic() < deadline, f"not all delivered: {found}"
        time.sleep(0.5)


def storescu(site: Site, files: list[Path]) -> None:
    done = subprocess.run(
        [dcmtk("storescu"), "-aec", AE_TITLE, "127.0.0.1", str(site.dimse_port)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def study_files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for number, ds in enumerate(small_study(count, patient_id="FWD-1"), start=1):
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stored_blobs(site: Site) -> dict[str, bytes]:
    """The blobs this appliance holds, by SOP Instance UID."""
    held = {}
    for blob in (site.workdir / "blobs").rglob("*"):
        if blob.is_file():
            data = blob.read_bytes()
            held[str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
    return held


def upstream_instances(orthanc_rest: str) -> int:
    return int(httpx.get(f"{orthanc_rest}/statistics", timeout=30).json()["CountInstances"])


def upstream_copy(dicomweb: str, path: Path) -> bytes:
    ds = dcmread(path, stop_before_pixels=True)
    url = (
        f"{dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    response = httpx.get(url, headers={"Accept": RETRIEVE}, timeout=30)
    assert response.status_code == 200, (url, response.status_code)
    return first_part(response)


@contextlib.contextmanager
def serving(site: Site) -> Iterator[Appliance]:
    app = site.start()
    try:
        app.wait_ready()
        yield app
    finally:
        app.kill()


def kill_everything(app: Appliance) -> None:
    """SIGKILL the supervisor and every child's process group at once, as a
    power cut would stop them (no child gets to finish anything)."""
    groups = [int(pid) for pid in _child_pids(app.log)]
    os.kill(app.process.pid, signal.SIGKILL)
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    app.process.wait(10)


def _child_pids(log: str) -> list[str]:
    import re

    return re.findall(r"started child '[^']+' \(pid (\d+)\)", log)


def test_stored_while_the_upstream_is_down_arrives_once_it_is_up(tmp_path: Path) -> None:
    """storescu sends pydicom's CT_small and rtplan (implicit VR) and 30
    generated instances while nothing listens upstream; they wait in the
    outbox with the connection error visible; Orthanc starts on the
    destination's port and receives every one, the data set bytes this
    appliance holds, no more and no fewer."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/dicom-web"
    site = migrated_site(tmp_path / "app", forward_env(url, batch_size=8))
    files = [
        Path(get_testdata_file("CT_small.dcm")),  # type: ignore[arg-type]
        Path(get_testdata_file("rtplan.dcm")),  # type: ignore[arg-type]
        *study_files(tmp_path / "study", 30),
    ]
    with serving(site):
        storescu(site, files)
        deadline = time.monotonic() + 60
        while not (found := status(site))["last_error"]:
            assert time.monotonic() < deadline, found
            time.sleep(0.3)
        assert found["delivered"] == 0
        assert found["queued"] == len(files)
        assert "cannot reach the upstream" in str(found["last_error"])
        # the upstream is reported, as a warning: the appliance stays ready
        ready = httpx.get(f"http://127.0.0.1:{site.http_port}/health/ready", timeout=30)
        assert ready.status_code == 200
        assert ready.json()["status"] == "warn"
        (check,) = ready.json()["checks"]["forward:orthanc"]
        assert check["status"] == "warn"
        assert "cannot reach the upstream" in check["output"]

        orthanc = start_orthanc(tmp_path / "orthanc", port)
        try:
            wait_delivered(site, len(files))
            assert upstream_instances(orthanc.rest) == len(files)
            ready = httpx.get(f"http://127.0.0.1:{site.http_port}/health/ready", timeout=30)
            assert ready.json()["status"] == "pass"
            assert ready.json()["checks"]["forward:orthanc"] == [{"status": "pass"}]
            held = stored_blobs(site)
            for path in files:
                # what storescu sent is what this appliance holds (storescu
                # leaves out CT_small's trailing padding), and that is what
                # the upstream got
                uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
                assert data_set_of(upstream_copy(orthanc.dicomweb, path)) == data_set_of(
                    held[uid]
                ), path.name
        finally:
            orthanc.stop()


def admin_status(app: Appliance) -> dict[str, int]:
    response = httpx.get(f"{app.base_url}/v1/admin/forward", timeout=10)
    assert response.status_code == 200, response.text
    (only,) = response.json()["destinations"]
    return dict(only)


def test_a_killed_appliance_forwards_everything_after_its_restart(tmp_path: Path) -> None:
    """200 instances wait for an upstream that is down; it comes up, and
    once the first few are delivered every appliance process is killed
    (SIGKILL) while its sender holds a claim; after a restart every
    instance reaches Orthanc, each once."""
    port = free_port()
    site = migrated_site(
        tmp_path / "app",
        forward_env(f"http://127.0.0.1:{port}/dicom-web", batch_size=2, concurrency=1),
    )
    files = study_files(tmp_path / "study", 200)
    orthanc = None
    app = site.start()
    try:
        app.wait_ready()
        storescu(site, files)
        orthanc = start_orthanc(tmp_path / "orthanc", port)
        deadline = time.monotonic() + 60
        while admin_status(app)["delivered"] < 4:
            assert time.monotonic() < deadline, admin_status(app)
            time.sleep(0.01)
        kill_everything(app)
        interrupted = status(site)
        assert interrupted["queued"] > 0, interrupted  # type: ignore[operator]

        with serving(site):
            wait_delivered(site, len(files), timeout=180)
        assert upstream_instances(orthanc.rest) == len(files)
        for path in files[:: len(files) // 10]:
            assert data_set_of(upstream_copy(orthanc.dicomweb, path)) == data_set_of(
                path.read_bytes()
            )
    finally:
        app.kill()
        if orthanc is not None:
            orthanc.stop()


def test_implicit_vr_goes_to_an_explicit_only_destination_as_explicit_vr(
    tmp_path: Path,
) -> None:
    """pydicom's MR_small_implicit (Implicit VR Little Endian), stored by
    STOW-RS, arrives at a destination marked explicit_vr_only in Explicit VR
    Little Endian: every element the same value, the pixel data the same
    bytes; what is stored here is unchanged."""
    orthanc = start_orthanc(tmp_path / "orthanc")
    try:
        site = migrated_site(tmp_path / "app", forward_env(orthanc.dicomweb, explicit_vr_only=True))
        path = Path(get_testdata_file("MR_small_implicit.dcm"))  # type: ignore[arg-type]
        with serving(site) as app:
            assert stow(app.base_url, path.read_bytes()).status_code == 200
            wait_delivered(site, 1)
        sent = dcmread(path)
        arrived = dcmread(io.BytesIO(upstream_copy(orthanc.dicomweb, path)))
        assert arrived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert arrived.PixelData == sent.PixelData
        for element in sent:
            assert arrived[element.tag].value == element.value, element.keyword
        stored = next((tmp_path / "app" / "blobs").rglob("*"), None)
        assert stored is not None
        local = [p for p in (tmp_path / "app" / "blobs").rglob("*") if p.is_file()]
        assert [p.read_bytes() for p in local] == [path.read_bytes()]
    finally:
        orthanc.stop()
