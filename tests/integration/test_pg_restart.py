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
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import dcmtk, missing_peer, throwaway_pg_database
from tests.helpers import stow
from tests.integration.test_serve import AE_TITLE, make_site, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
    with throwaway_pg_database("appliance_restart") as url:
        yield url
        assert _pg_ready(60)  # the test restarted the server: wait before the drop


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
        assert stow(node.base_url, ct).status_code == 200
        subprocess.run(["pg_ctlcluster", version, name, "stop", "-m", "fast"], check=True)
        try:
            assert stow(node.base_url, ct).status_code == 503
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
        assert stow(node.base_url, mr.read_bytes()).status_code == 200
        studies = httpx.get(f"{node.base_url}/v1/studies", timeout=60)
        assert studies.status_code == 200
        assert len(studies.json()) == 2
        assert node.process.poll() is None
