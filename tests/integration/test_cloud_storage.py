"""The whole appliance on a cloud object store, Azure Blob (Azurite) and S3
(SeaweedFS): both protocols store into it and read from it, nothing lands
on the local disk, and the readiness check and the ingest answer a stopped
store as the promise says (nothing acknowledged, nothing half-indexed)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from appliance.index.schema import instance
from tests.conftest import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    Azurite,
    LiveAppliance,
    SeaweedS3,
    appliance_config,
    dcmtk,
    start_azurite,
    started_appliance,
)
from tests.helpers import data_set_of, multipart, stow

pytestmark = [pytest.mark.integration, pytest.mark.interop]

RETRIEVE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _on_azure(tmp_path: Path, azurite: Azurite, retries: int = 3) -> Iterator[LiveAppliance]:
    config = appliance_config(
        tmp_path,
        APPLIANCE_STORAGE_RETRIES=str(retries),
        APPLIANCE_STORAGE_BACKEND="azure",
        APPLIANCE_STORAGE_CONNECTION_STRING=azurite.connection_string,
        APPLIANCE_STORAGE_CONTAINER=f"e2e-{uuid.uuid4().hex}",
    )
    yield from started_appliance(config)


@pytest.fixture(params=["azure", "s3"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveAppliance]:
    if request.param == "azure":
        yield from _on_azure(tmp_path, request.getfixturevalue("azurite"))
        return
    seaweedfs: SeaweedS3 = request.getfixturevalue("seaweedfs")
    config = appliance_config(
        tmp_path,
        APPLIANCE_STORAGE_BACKEND="s3",
        APPLIANCE_STORAGE_ENDPOINT_URL=seaweedfs.endpoint,
        APPLIANCE_STORAGE_BUCKET=f"e2e-{uuid.uuid4().hex[:20]}",
        APPLIANCE_STORAGE_ACCESS_KEY_ID=S3_ACCESS_KEY,
        APPLIANCE_STORAGE_SECRET_ACCESS_KEY=S3_SECRET_KEY,
    )
    yield from started_appliance(config)


def _names(app: LiveAppliance) -> list[str]:
    """The names of the objects in the appliance's container or bucket."""
    store: Any = app.services.storage
    if app.config.storage.backend == "s3":
        listed = store._client().list_objects_v2(Bucket=store.bucket)
        return [item["Key"] for item in listed.get("Contents", [])]
    return [blob.name for blob in store._client().list_blobs()]


def test_both_protocols_store_into_and_read_from_the_container(
    app: LiveAppliance, tmp_path: Path
) -> None:
    """STOW-RS in, WADO-RS out byte for byte; C-STORE (dcmtk) in, C-GET
    (dcmtk, through a temporary local copy of the blob) out byte for byte;
    two blobs in the container and none on the disk."""
    stowed = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    response = stow(app.base_url, stowed.read_bytes())
    assert response.status_code == 200, response.text
    header = dcmread(stowed, stop_before_pixels=True)
    url = (
        f"{app.base_url}/v1/studies/{header.StudyInstanceUID}/series/"
        f"{header.SeriesInstanceUID}/instances/{header.SOPInstanceUID}"
    )
    got = httpx.get(url, headers={"Accept": RETRIEVE}, timeout=60)
    assert got.status_code == 200
    assert multipart(got)[0][1] == stowed.read_bytes()
    # the readers that seek (metadata, change feed) and read ranges (frames)
    metadata = httpx.get(f"{url}/metadata", timeout=60)
    assert metadata.status_code == 200, metadata.text
    assert metadata.json()[0]["00080018"]["Value"] == [header.SOPInstanceUID]
    feed = httpx.get(f"{app.base_url}/v1/changefeed", timeout=60)
    assert feed.status_code == 200, feed.text
    assert feed.json()[0]["Metadata"]["00080018"]["Value"] == [header.SOPInstanceUID]
    frame = httpx.get(
        f"{url}/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
        timeout=60,
    )
    assert frame.status_code == 200, frame.text
    full = dcmread(stowed)
    assert multipart(frame)[0][1] == full.PixelData

    sent = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    subprocess.run(
        [dcmtk("storescu"), "-aec", app.ae_title, "127.0.0.1", str(app.dimse_port), str(sent)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    mr = dcmread(sent, stop_before_pixels=True)
    out = tmp_path / "got"
    out.mkdir()
    log = subprocess.run(
        [
            dcmtk("getscu"),
            "-v",
            "-S",  # Study Root
            "+B",
            "-od",
            str(out),
            "-aec",
            app.ae_title,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={mr.StudyInstanceUID}",
            "127.0.0.1",
            str(app.dimse_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Received C-GET Response (Success)" in log.stdout + log.stderr
    (received,) = list(out.iterdir())
    # what C-GET sent is the data set stored in the container (storescu
    # itself re-encodes what it sends, so the file sent is no reference)
    mr_url = (
        f"{app.base_url}/v1/studies/{mr.StudyInstanceUID}/series/"
        f"{mr.SeriesInstanceUID}/instances/{mr.SOPInstanceUID}"
    )
    stored = multipart(httpx.get(mr_url, headers={"Accept": RETRIEVE}, timeout=60))[0][1]
    assert data_set_of(received.read_bytes()) == data_set_of(stored)

    assert len(_names(app)) == 2
    assert not Path(app.config.storage.path).exists() or not any(
        p.is_file() for p in Path(app.config.storage.path).rglob("*")
    )


def _storage_check(app: LiveAppliance) -> str:
    """The readiness probe's storage check ("pass" or "fail"; the in-process
    appliance has no DIMSE worker markers, so the whole probe fails)."""
    body = httpx.get(f"{app.base_url}/health/ready", timeout=60).json()
    return str(body["checks"]["storage"][0]["status"])


def test_a_stopped_azure_store_fails_ingest_cleanly_and_recovers(
    tmp_path: Path,
) -> None:
    """Azurite stopped under a running appliance: the readiness probe's
    storage check fails, a
    STOW-RS gets 503 and a C-STORE 0xA700 (out of resources), nothing is
    indexed; Azurite back (same port): both work again without a restart."""
    service = start_azurite(tmp_path / "azurite")
    try:
        for app in _on_azure(tmp_path / "app", service, retries=0):
            assert _storage_check(app) == "pass"
            service.stop()
            assert _storage_check(app) == "fail"

            data = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
            assert stow(app.base_url, data).status_code == 503
            sent = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
            store = subprocess.run(
                [
                    dcmtk("storescu"),
                    "-v",
                    "-aec",
                    app.ae_title,
                    "127.0.0.1",
                    str(app.dimse_port),
                    str(sent),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            # dcmtk names 0xA700 "Refused: OutOfResources"
            assert "Store Response (Refused: OutOfResources)" in store.stderr, store.stderr
            with app.services.engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(instance)).scalar_one() == 0

            service = start_azurite(tmp_path / "azurite2", port=service.port)
            assert stow(app.base_url, data).status_code == 200
            assert _storage_check(app) == "pass"
    finally:
        service.stop()
