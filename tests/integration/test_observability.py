"""What a running ``dicom-appliance serve`` tells its operator: ``GET
/metrics`` (two HTTP workers, two DIMSE workers: the counts of every process
are added up) after a known workload, each counter checked against it; and
its log lines."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE

from tests.conftest import dcmtk, missing_peer
from tests.helpers import part10_of, small_study, stow
from tests.integration.test_forward import study_files
from tests.integration.test_serve import AE_TITLE, migrated_site, run_echo, running

pytestmark = [pytest.mark.integration, pytest.mark.interop]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str) -> Samples:
    response = httpx.get(f"{base_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of *name* whose labels include *labels*."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def test_the_counters_add_up_over_every_process(tmp_path: Path) -> None:
    site = migrated_site(tmp_path / "app")
    stowed = small_study(3, patient_id="METRICS-1")
    files = study_files(tmp_path / "study", 4)
    with running(site) as app:
        before = scrape(app.base_url)
        assert value(before, "appliance_index_up") == 1
        assert value(before, "appliance_index_objects", level="instance") == 0

        body = [part10_of(ds) for ds in stowed]
        response = stow(app.base_url, *body)
        assert response.status_code == 200
        for _ in range(2):
            assert httpx.get(f"{app.base_url}/v1/studies", timeout=30).status_code == 200
        missing = httpx.get(f"{app.base_url}/v1/studies/1.2.3/metadata", timeout=30)
        assert missing.status_code == 404
        assert run_echo(site.dimse_port)[0] == 0
        assert run_echo(site.dimse_port, called="NOT_US")[0] != 0
        done = subprocess.run(
            [dcmtk("storescu"), "-aet", "MODALITY1", "-aec", AE_TITLE, "127.0.0.1"]
            + [str(site.dimse_port)]
            + [str(path) for path in files],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

        after = scrape(app.base_url)
        # the sending AE the index kept (C-STORE's; STOW-RS has none)
        done = site.run("stats", "--by", "ae", "--json")
        assert done.returncode == 0, done.stderr
        by_ae = {row["key"]: row["instances"] for row in json.loads(done.stdout)["by_ae"]}
        assert by_ae == {"": 3, "MODALITY1": 4}

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # ingest, by protocol
    assert grew("appliance_ingest_instances_total", protocol="dicomweb", outcome="created") == 3
    assert grew("appliance_ingest_instances_total", protocol="dimse", outcome="created") == 4
    assert grew("appliance_ingest_instances_total") == 7
    # DIMSE, per calling AE
    assert (
        grew(
            "appliance_dimse_operations_total",
            service="C-STORE",
            calling_ae="MODALITY1",
            outcome="success",
        )
        == 4
    )
    assert grew("appliance_dimse_operations_total", service="C-ECHO", outcome="success") == 1
    assert grew("appliance_dimse_associations_total", event="accepted") == 2
    assert grew("appliance_dimse_associations_total", event="released") == 2
    assert grew("appliance_dimse_associations_total", event="rejected") == 1
    received_dimse = grew("appliance_received_bytes_total", protocol="dimse")
    # the data sets storescu sent: each file less its preamble, "DICM" and
    # File Meta (group 2: a 12-byte group length element, then its length)
    data_sets = sum(
        path.stat().st_size
        - (
            128
            + 4
            + 12
            + dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
        )
        for path in files
    )
    assert received_dimse == data_sets
    # HTTP, per transaction and status
    assert grew("appliance_http_requests_total", method="POST", status="200") == 1
    assert grew("appliance_http_requests_total", method="GET", status="200") >= 2
    assert grew("appliance_http_requests_total", status="404") == 1
    assert grew("appliance_http_request_duration_seconds_count") >= 4
    assert grew("appliance_received_bytes_total", protocol="http") >= sum(map(len, body))
    assert grew("appliance_sent_bytes_total", protocol="http") > 0
    # what the index holds, read at the scrape
    assert value(after, "appliance_index_objects", level="instance") == 7
    assert value(after, "appliance_index_objects", level="study") == 2
    blobs = [p for p in (site.workdir / "blobs").rglob("*") if p.is_file()]
    assert value(after, "appliance_stored_bytes") == sum(p.stat().st_size for p in blobs)
    assert value(after, "appliance_changefeed_sequence") >= 7
    assert total(after, "appliance_storage_errors_total") == 0


def test_serve_logs_json_lines_with_a_correlation_id_per_request_and_association(
    tmp_path: Path,
) -> None:
    """Its output not a terminal, ``serve`` writes one JSON object per line;
    a request's access line and its X-Request-ID answer carry the client's
    id; the lines of one association share one id; no line is not JSON."""
    site = migrated_site(tmp_path / "app")
    with running(site) as app:
        response = httpx.get(
            f"{app.base_url}/v1/studies", headers={"X-Request-ID": "req-42"}, timeout=30
        )
        assert response.headers["X-Request-ID"] == "req-42"
        made = httpx.get(f"{app.base_url}/v1/studies", timeout=30).headers["X-Request-ID"]
        assert len(made) == 16
        hostile = httpx.get(
            f"{app.base_url}/v1/studies", headers={"X-Request-ID": "a b\tc"}, timeout=30
        )
        assert hostile.headers["X-Request-ID"] != "a b\tc"
        assert run_echo(site.dimse_port)[0] == 0
        deadline = time.monotonic() + 10
        while "association released" not in app.log:
            assert time.monotonic() < deadline, app.log
            time.sleep(0.1)
        log = app.log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    access = [r for r in lines if r["logger"] == "gunicorn.access"]
    assert any("id=req-42" in r["message"] for r in access)
    association = [r for r in lines if r["message"].startswith("association ")]
    ids = {r.get("correlation_id") for r in association}
    assert len(ids) == 1
    (only,) = ids
    assert only is not None
    assert only.startswith("assoc-")
    assert {r["process"] for r in lines} >= {"supervisor", "http-worker"}


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of *megabytes* mounted on *folder* (a real, small file
    system to fill); skips (fails under CI) where mounting is not allowed."""
    folder.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        missing_peer(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def c_store(port: int, ds: Dataset) -> int:
    """C-STORE of *ds* with pynetdicom; the response's status."""
    ae = AE(ae_title="FILLER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_a_full_disk_refuses_new_instances_and_recovers(tmp_path: Path) -> None:
    """The blobs on a 24 MB tmpfs with ``storage.min_free_mb = 8``: filled
    to 4 MB free by a ballast file, C-STORE answers 0xA700 and STOW-RS 503,
    /health/ready warns (and stays 200: reads go on), the metric says so;
    the ballast removed, both store again."""
    with small_disk(tmp_path / "disk", 24) as disk:
        site = migrated_site(
            tmp_path / "app",
            {"APPLIANCE_STORAGE_PATH": str(disk / "blobs"), "APPLIANCE_STORAGE_MIN_FREE_MB": "8"},
        )
        study = small_study(4, patient_id="DISK-1")
        with running(site) as app:
            assert c_store(site.dimse_port, study[0]) == 0x0000
            ballast = disk / "ballast"
            free = shutil.disk_usage(disk).free
            with ballast.open("wb") as fh:
                fh.truncate(0)
                fh.write(b"\0" * (free - 4 * 2**20))

            assert c_store(site.dimse_port, study[1]) == 0xA700
            assert stow(app.base_url, part10_of(study[2])).status_code == 503
            ready = httpx.get(f"{app.base_url}/health/ready", timeout=30)
            assert ready.status_code == 200
            assert ready.json()["status"] == "warn"
            (disk_check,) = ready.json()["checks"]["disk"]
            assert "below storage.min_free_mb" in disk_check["output"]
            samples = scrape(app.base_url)
            assert value(samples, "appliance_storage_refusing") == 1
            assert total(samples, "appliance_storage_errors_total", error="StorageFull") == 2

            ballast.unlink()
            assert c_store(site.dimse_port, study[1]) == 0x0000
            assert stow(app.base_url, part10_of(study[2])).status_code == 200
            ready = httpx.get(f"{app.base_url}/health/ready", timeout=30)
            assert ready.json()["status"] == "pass"
            assert value(scrape(app.base_url), "appliance_storage_refusing") == 0
            assert value(scrape(app.base_url), "appliance_index_objects", level="instance") == 3
