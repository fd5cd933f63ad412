"""Two nodes, one store: two ``dicom-appliance serve`` processes on their own
ports over one PostgreSQL database and one Azure container (Azurite).  What
either node stores, the other finds, serves and moves; the same study sent
through both at once is indexed once."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, text

from tests.conftest import dcmtk, throwaway_pg_database
from tests.helpers import data_set_of, multipart, small_study, stow
from tests.integration.test_dimse_retrieve import storescp
from tests.integration.test_serve import AE_TITLE, Appliance, make_site, running
from tests.peers import Azurite, free_port

pytestmark = [pytest.mark.integration, pytest.mark.interop, pytest.mark.slow]

RETRIEVE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture
def database() -> Iterator[str]:
    """A throwaway PostgreSQL database for the two nodes (not migrated)."""
    with throwaway_pg_database("appliance_nodes") as url:
        yield url


@contextlib.contextmanager
def two_nodes(tmp_path: Path, database: str, azurite: Azurite) -> Iterator[tuple[Appliance, ...]]:
    """Nodes A and B over *database* and one container; A knows the Move
    Destination DEST (port in ``A.site.env``)."""
    container = f"nodes-{uuid.uuid4().hex}"
    shared = {
        "APPLIANCE_INDEX_URL": database,
        "APPLIANCE_STORAGE_BACKEND": "azure",
        "APPLIANCE_STORAGE_CONNECTION_STRING": azurite.connection_string,
        "APPLIANCE_STORAGE_CONTAINER": container,
        "APPLIANCE_HTTP_WORKERS": "1",
        "APPLIANCE_DIMSE_WORKERS": "1",
        "APPLIANCE_LOG_LEVEL": "warning",
    }
    dest_port = free_port()
    peers = f'[{{ae_title="DEST", host="127.0.0.1", port={dest_port}}}]'
    site_a = make_site(
        tmp_path / "a", {**shared, "APPLIANCE_DIMSE_PEERS": peers, "DEST_PORT": str(dest_port)}
    )
    site_b = make_site(tmp_path / "b", shared)
    migrated = site_a.run("migrate")
    assert migrated.returncode == 0, migrated.stderr
    with running(site_a) as a, running(site_b) as b:
        yield a, b


def _storescu(node: Appliance, *files: Path) -> str:
    result = subprocess.run(
        [dcmtk("storescu"), "-v", "-aec", AE_TITLE, "127.0.0.1", str(node.site.dimse_port)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def _instance_url(node: Appliance, ds: Dataset) -> str:
    return (
        f"{node.base_url}/v1/studies/{ds.StudyInstanceUID}/series/"
        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )


def test_what_one_node_stores_the_other_finds_serves_and_moves(
    tmp_path: Path, database: str, azurite: Azurite
) -> None:
    """C-STORE to A, QIDO-RS and WADO-RS from B; STOW-RS to B, C-MOVE from
    A to dcmtk's storescp; the change feed seen from both lists both, in
    order."""
    ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    with two_nodes(tmp_path, database, azurite) as (a, b):
        _storescu(a, ct)
        ct_header = dcmread(ct, stop_before_pixels=True)
        found = httpx.get(
            f"{b.base_url}/v1/instances",
            params={"SOPInstanceUID": ct_header.SOPInstanceUID},
            timeout=30,
        )
        assert found.status_code == 200
        assert len(found.json()) == 1
        from_b = httpx.get(_instance_url(b, ct_header), headers={"Accept": RETRIEVE}, timeout=30)
        assert from_b.status_code == 200
        from_a = httpx.get(_instance_url(a, ct_header), headers={"Accept": RETRIEVE}, timeout=30)
        assert multipart(from_b)[0][1] == multipart(from_a)[0][1]

        stored = stow(b.base_url, mr.read_bytes())
        assert stored.status_code == 200, stored.text
        mr_header = dcmread(mr, stop_before_pixels=True)
        dest_port = int(a.site.env["DEST_PORT"])
        with storescp(dest_port, tmp_path / "moved") as out:
            moved = subprocess.run(
                [
                    dcmtk("movescu"),
                    "-v",
                    "-S",
                    "-aec",
                    AE_TITLE,
                    "-aem",
                    "DEST",
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    f"StudyInstanceUID={mr_header.StudyInstanceUID}",
                    "127.0.0.1",
                    str(a.site.dimse_port),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
        log = moved.stdout + moved.stderr
        assert "Received Final Move Response (Success)" in log, log[-2000:]
        (received,) = list(out.iterdir())
        assert data_set_of(received.read_bytes()) == data_set_of(mr.read_bytes())

        for node in (a, b):
            answer = httpx.get(f"{node.base_url}/v1/changefeed", timeout=30)
            assert answer.status_code == 200, answer.text
            feed = answer.json()
            assert [entry["SopInstanceUid"] for entry in feed] == [
                ct_header.SOPInstanceUID,
                mr_header.SOPInstanceUID,
            ]
            sequences = [entry["Sequence"] for entry in feed]
            assert sequences == sorted(sequences)


def _study(folder: Path, count: int) -> list[Path]:
    """*count* small CT instances of one new study and series, as files."""
    folder.mkdir(parents=True)
    paths = []
    for number, ds in enumerate(small_study(count), start=1):
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_one_study_through_both_nodes_at_once_is_indexed_once(
    tmp_path: Path, database: str, azurite: Azurite
) -> None:
    """storescu sends the same 40 instances to A and to B at the same time:
    one index row and one change-feed entry per instance, every sender got
    success or the duplicate warning, no blob is left without its row."""
    files = _study(tmp_path / "study", 40)
    with two_nodes(tmp_path, database, azurite) as (a, b):
        logs: dict[str, str] = {}

        def send(node: Appliance) -> None:
            logs[node.site.workdir.name] = _storescu(node, *files)

        senders = [threading.Thread(target=send, args=(node,)) for node in (a, b)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(300)
        assert set(logs) == {"a", "b"}
        for log in logs.values():
            assert "Failed" not in log, log[-2000:]
            assert "Refused" not in log, log[-2000:]

        engine = create_engine(database)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT sop_instance_uid, count(*) FROM instance GROUP BY 1")
                ).all()
                feed = (
                    conn.execute(text("SELECT sop_instance_uid FROM changefeed ORDER BY sequence"))
                    .scalars()
                    .all()
                )
                keys = set(conn.execute(text("SELECT blob_key FROM instance")).scalars())
        finally:
            engine.dispose()
        uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
        assert {uid for uid, _ in rows} == uids
        assert all(count == 1 for _, count in rows)
        assert sorted(feed) == sorted(uids)  # one create entry each

        from appliance.storage.azure import AzureBlobStore

        store = AzureBlobStore(
            a.site.env["APPLIANCE_STORAGE_CONTAINER"],
            connection_string=azurite.connection_string,
        )
        names = {blob.name for blob in store._client().list_blobs()}
        assert names == keys
