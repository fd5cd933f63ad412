"""The index server goes away and comes back: a running ``serve`` on
PostgreSQL answers cleanly while the server is down (STOW-RS and QIDO-RS
503, C-STORE 0x0110 processing failure, readiness 503) and works again once it is
back, without being restarted.

The test stops and starts this machine's PostgreSQL cluster itself
(``pg_ctlcluster``), and always starts it again: it is the one test that
touches the server rather than a database of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import create_engine, text

from tests.conftest import PG_ADMIN_URL, dcmtk, missing_peer
from tests.integration.test_serve import AE_TITLE, make_site, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=restart'


def _cluster() -> tuple[str, str]:
    """(version, name) of the local cluster on port 5432."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        missing_peer("pg_ctlcluster is not available: cannot restart the local PostgreSQL")
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    )
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "5432" and fields[3] == "online":
            return fields[0], fields[1]
    missing_peer("no online PostgreSQL cluster on port 5432")
    raise AssertionError("unreachable")


def _pg_ready(timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"], check=False)
        if done.returncode == 0:
            return True
        time.sleep(0.3)
    return False


@pytest.fixture
def database() -> Iterator[str]:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"appliance_restart_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        admin.dispose()
        missing_peer(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}")
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    assert _pg_ready(60)
    admin.dispose()  # its pooled connection died with the restart
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _stow(base_url: str, data: bytes) -> int:
    body = b"--restart\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--restart--\r\n"
    response = httpx.post(
        f"{base_url}/v1/studies",
        content=body,
        headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
        timeout=120,
    )
    return response.status_code


def test_index_server_restart_fails_cleanly_then_recovers(tmp_path: Path, database: str) -> None:
    version, name = _cluster()
    site = make_site(
        tmp_path / "node",
        {"APPLIANCE_INDEX_URL": database, "APPLIANCE_LOG_LEVEL": "warning"},
    )
    assert site.run("migrate").returncode == 0
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    with running(site) as node:
        assert _stow(node.base_url, ct) == 200
        subprocess.run(["pg_ctlcluster", version, name, "stop", "-m", "fast"], check=True)
        try:
            assert _stow(node.base_url, ct) == 503
            search = httpx.get(f"{node.base_url}/v1/studies", timeout=60)
            assert search.status_code == 503, search.text
            assert "Traceback" not in search.text
            ready = httpx.get(f"{node.base_url}/health/ready", timeout=60)
            assert ready.status_code == 503
            store = subprocess.run(
                [
                    dcmtk("storescu"),
                    "-v",
                    "-aec",
                    AE_TITLE,
                    "127.0.0.1",
                    str(node.site.dimse_port),
                    str(mr),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            # 0x0110 processing failure (PS3.7 C.4), which dcmtk calls unknown
            assert "Store Response (Unknown Status: 0x110)" in store.stderr, store.stderr
        finally:
            subprocess.run(["pg_ctlcluster", version, name, "start"], check=True)
            assert _pg_ready(60), "PostgreSQL did not come back"
        # the same processes, new connections
        assert _stow(node.base_url, mr.read_bytes()) == 200
        studies = httpx.get(f"{node.base_url}/v1/studies", timeout=60)
        assert studies.status_code == 200
        assert len(studies.json()) == 2
        assert node.process.poll() is None
