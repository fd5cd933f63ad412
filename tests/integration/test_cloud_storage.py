"""The whole appliance on a cloud object store, Azure Blob (Azurite) and S3
(SeaweedFS): both protocols store into it and read from it, nothing lands
on the local disk, and the readiness check and the ingest answer a stopped
store as the promise says (nothing acknowledged, nothing half-indexed)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select

from appliance.index.schema import instance
from tests.conftest import (
    LiveAppliance,
    appliance_config,
    dcmtk,
    start_azurite,
    start_seaweedfs,
    started_appliance,
)
from tests.helpers import data_set_of, multipart, part10_of, small_study, stow
from tests.peers import S3_ACCESS_KEY, S3_SECRET_KEY, Azurite, SeaweedS3

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


def _stored_count(app: LiveAppliance) -> int:
    with app.services.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(instance)).scalar_one())


def _wait_for_objects(app: LiveAppliance, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_names(app)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} objects were written"
        time.sleep(0.05)


def _killing_midway(
    app: LiveAppliance, parts: list[bytes], closing: bytes, kill: Callable[[], None]
) -> Iterator[bytes]:
    """A STOW-RS body that sends five parts, waits until the appliance has
    written the blobs of at least four (it reads the body in 256 KiB chunks,
    so the end of the fifth may not be seen yet; their index rows are
    committed with the request's batch, at its end), calls *kill*, and sends
    the rest."""
    written = len(_names(app))
    yield from parts[:5]
    _wait_for_objects(app, written + 4)
    kill()
    yield from parts[5:]
    yield closing


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["azure", "s3"])
def test_the_store_dying_mid_ingest_fails_what_is_left_and_recovers(
    tmp_path: Path, backend: str
) -> None:
    """The object store dies (SeaweedFS: SIGKILL) in the middle of a C-STORE
    association and in the middle of a STOW-RS request, then started again
    on the same port and data.

    - C-STORE: the first instances of the association succeed, those sent
      while the store is dead get 0xA700, and once it is back the same
      association stores them.
    - STOW-RS: one request whose body is still arriving when the store dies
      gets 202 listing the instances whose blobs were written before as
      stored (indexed with the request's batch) and the rest as failed with
      0xA700 (PS3.18 10.5.3); sending the failed ones again after the store
      is back gives 200.
    - Nothing half-indexed: the index holds exactly the instances that were
      acknowledged, each read back byte for byte from the store, and no
      object is left without its row."""
    from pynetdicom import AE

    store_folder = tmp_path / "store"
    if backend == "azure":
        azurite = start_azurite(store_folder, on_disk=True)
        service: Azurite | SeaweedS3 = azurite
        environ = {
            "APPLIANCE_STORAGE_BACKEND": "azure",
            "APPLIANCE_STORAGE_CONNECTION_STRING": azurite.connection_string,
            "APPLIANCE_STORAGE_CONTAINER": f"dying-{uuid.uuid4().hex}",
        }

        def restart() -> Azurite | SeaweedS3:
            return start_azurite(store_folder, port=azurite.port, on_disk=True)

    else:
        seaweed = start_seaweedfs(store_folder)
        service = seaweed
        environ = {
            "APPLIANCE_STORAGE_BACKEND": "s3",
            "APPLIANCE_STORAGE_ENDPOINT_URL": seaweed.endpoint,
            "APPLIANCE_STORAGE_BUCKET": f"dying-{uuid.uuid4().hex[:20]}",
            "APPLIANCE_STORAGE_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "APPLIANCE_STORAGE_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        }

        def restart() -> Azurite | SeaweedS3:
            return start_seaweedfs(store_folder, ports=seaweed.ports)

    # 0.5 MB each, so the first STOW-RS parts fill the body reader's chunks
    def kill() -> None:
        if isinstance(service, Azurite):
            # stopped, not killed: Azurite keeps its blob list in a database
            # it saves every few seconds and on exit, so after a SIGKILL the
            # emulator itself forgets blobs it has acknowledged
            service.stop()
        else:
            service.kill()

    instances = small_study(20, patient_id="DYING-1", size=512)
    files = [part10_of(ds) for ds in instances]
    try:
        config = appliance_config(tmp_path / "app", APPLIANCE_STORAGE_RETRIES="0", **environ)
        for app in started_appliance(config):
            # C-STORE: 5 stored, the store dies, 5 refused, it returns, the
            # same 5 stored on the same association
            ae = AE(ae_title="DYING")
            ae.add_requested_context(instances[0].SOPClassUID, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", app.dimse_port, ae_title=app.ae_title)
            assert assoc.is_established
            try:
                first = [assoc.send_c_store(ds).Status for ds in instances[:5]]
                kill()
                refused = [assoc.send_c_store(ds).Status for ds in instances[5:10]]
                service = restart()
                again = [assoc.send_c_store(ds).Status for ds in instances[5:10]]
            finally:
                assoc.release()
            assert first == [0x0000] * 5
            assert refused == [0xA700] * 5
            assert again == [0x0000] * 5
            assert _stored_count(app) == 10

            # STOW-RS: the store dies while the request's body is arriving
            boundary = "dying-store-boundary"
            parts = [
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
                for f in files[10:20]
            ]
            closing = f"--{boundary}--\r\n".encode()

            response = httpx.post(
                f"{app.base_url}/v1/studies",
                content=_killing_midway(app, parts, closing, kill),
                headers={
                    "Content-Type": (
                        f'multipart/related; type="application/dicom"; boundary={boundary}'
                    ),
                    "Content-Length": str(sum(map(len, parts)) + len(closing)),
                    "Accept": "application/dicom+json",
                },
                timeout=120,
            )
            assert response.status_code == 202, response.text
            answer = response.json()
            stored = {item["00081155"]["Value"][0] for item in answer["00081199"]["Value"]}
            failed = {
                item["00081155"]["Value"][0]: item["00081197"]["Value"][0]
                for item in answer["00081198"]["Value"]
            }
            uids = [str(ds.SOPInstanceUID) for ds in instances]
            # what was written before the kill is stored, the rest failed
            assert set(uids[10:14]) <= stored <= set(uids[10:15])
            assert failed == dict.fromkeys(set(uids[10:20]) - stored, 0xA700)
            assert _stored_count(app) == 10 + len(stored)

            service = restart()
            resent = [f for uid, f in zip(uids, files, strict=True) if uid in failed]
            assert stow(app.base_url, *resent).status_code == 200

            # exactly the acknowledged instances, whole, and no stray object
            assert _stored_count(app) == 20
            assert len(_names(app)) == 20
            for ds, sent in zip(instances, files, strict=True):
                url = (
                    f"{app.base_url}/v1/studies/{ds.StudyInstanceUID}/series/"
                    f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
                )
                got = httpx.get(url, headers={"Accept": RETRIEVE}, timeout=60)
                assert got.status_code == 200
                ((_, content),) = multipart(got)
                assert data_set_of(content) == data_set_of(sent)
    finally:
        service.stop()
