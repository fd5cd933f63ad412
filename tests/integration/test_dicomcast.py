"""DICOMcast against a real FHIR engine: Medplum's FHIR router and its
in-memory repository behind node:http (``tests/fhir_peer``), validating
every resource written.  DICOMcast runs in this process, over an appliance
served on loopback; its threads are driven a step at a time (pull the
change feed, publish what is due) so each test sees a settled state."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.fhir.publisher import dicomweb_root
from appliance.fhir.queue import StudyQueue
from appliance.fhir.worker import DicomCast
from appliance.model import Origin
from tests.conftest import LiveServer, make_config, start_fhir_server, started_server
from tests.helpers import part10_of, small_study
from tests.integration.test_forward import serving, storescu, study_files
from tests.integration.test_serve import Site as ServeSite
from tests.integration.test_serve import migrated_site
from tests.peers import FhirServer

pytestmark = [pytest.mark.integration, pytest.mark.interop]

PATIENT_SYSTEM = "urn:oid:1.2.3.999.1"


@dataclasses.dataclass
class Site:
    server: LiveServer
    cast: DicomCast

    @property
    def queue(self) -> StudyQueue:
        return self.cast.queue

    def store(self, ds: Dataset) -> None:
        result = self.server.services.ingest.store_part10(
            io.BytesIO(part10_of(ds)), Origin("dicomweb")
        )
        assert result.stored, result

    def delete(self, study: str, series: str | None = None, sop: str | None = None) -> None:
        url = f"{self.server.root}/studies/{study}"
        if series:
            url += f"/series/{series}"
        if sop:
            url += f"/instances/{sop}"
        response = httpx.delete(url, timeout=30)
        assert response.status_code in (200, 202, 204), (url, response.status_code)

    def drain(self, limit: int = 100) -> None:
        """Take in the whole change feed and publish every due study."""
        for _ in range(limit):
            while self.queue.pull(dt.timedelta(0)):
                pass
            if not self.cast.send_once():
                return
        raise AssertionError("DICOMcast did not settle")

    def status(self) -> dict[str, Any]:
        response = httpx.get(f"{self.server.root}/admin/fhir", timeout=10)
        assert response.status_code == 200
        return dict(response.json())


@contextlib.contextmanager
def site(tmp_path: Path, fhir_url: str, **keys: str) -> Iterator[Site]:
    env = {
        "APPLIANCE_FHIR_URL": fhir_url,
        "APPLIANCE_FHIR_PATIENT_SYSTEM": PATIENT_SYSTEM,
        "APPLIANCE_FHIR_TIMEOUT": "5",
        "APPLIANCE_FHIR_RETRY_MAX_SECONDS": "1",
        "APPLIANCE_FHIR_SETTLE_SECONDS": "0",
        "APPLIANCE_FHIR_TIMEZONE": "UTC",
        **{f"APPLIANCE_FHIR_{key.upper()}": value for key, value in keys.items()},
    }
    config = make_config(tmp_path / "appliance", **env)
    for server in started_server(config):
        cast = DicomCast(config, server.services.engine)
        try:
            yield Site(server, cast)
        finally:
            cast.close()


def by_identifier(resources: list[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    return [r for r in resources if any(i.get("value") == value for i in r.get("identifier") or [])]


def imaging_study(fhir: FhirServer, study_uid: str) -> dict[str, Any]:
    (only,) = by_identifier(fhir.resources("ImagingStudy"), f"urn:oid:{study_uid}")
    return only


def shape(study: dict[str, Any]) -> dict[str, list[str]]:
    """Series UID -> its instances' UIDs."""
    return {
        s["uid"]: sorted(i["uid"] for i in s.get("instance", [])) for s in study.get("series", [])
    }


def test_each_study_becomes_one_imaging_study_of_one_patient_and_endpoint(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    """pydicom's CT_small and MR_small (real files, other patients) and a
    generated two-series study of a third patient, one of whose studies
    comes twice (a second study of the same patient): one Patient per
    Patient ID, one Endpoint, one ImagingStudy per study, each valid R4 and
    mapped as DICOMcast maps it."""
    fhir = fhir_server
    ct = dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    mr = dcmread(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    generated = small_study(4, patient_id="CAST-1")
    other_series = generate_uid()
    for ds in generated[2:]:
        ds.SeriesInstanceUID = other_series
        ds.Modality = "SR"
    second = small_study(1, patient_id="CAST-1")
    with site(tmp_path, fhir.url) as local:
        for ds in [ct, mr, *generated, *second]:
            local.store(ds)
        local.drain()
        status = local.status()
        assert status["synced"] == 4
        assert status["queued"] == status["parked"] == status["behind"] == 0

        patients = fhir.resources("Patient")
        endpoints = fhir.resources("Endpoint")
        studies = fhir.resources("ImagingStudy")
        assert len(patients) == 3
        assert len(endpoints) == 1
        assert len(studies) == 4
        for resource in patients:
            Patient.model_validate(resource)
        Endpoint.model_validate(endpoints[0])
        for resource in studies:
            ImagingStudy.model_validate(resource)
        (endpoint,) = endpoints
        assert endpoint["address"] == dicomweb_root(local.server.config)
        assert endpoint["connectionType"]["code"] == "dicom-wado-rs"

        ct_study = imaging_study(fhir, ct.StudyInstanceUID)
        (ct_patient,) = by_identifier(patients, ct.PatientID)
        assert ct_patient["identifier"][0] == {"system": PATIENT_SYSTEM, "value": ct.PatientID}
        assert ct_study["subject"]["reference"] == f"Patient/{ct_patient['id']}"
        assert ct_study["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
        assert ct_study["numberOfSeries"] == 1
        assert ct_study["numberOfInstances"] == 1
        assert ct_study["modality"][0]["code"] == "CT"
        assert ct_study["started"].startswith(
            f"{ct.StudyDate[:4]}-{ct.StudyDate[4:6]}-{ct.StudyDate[6:]}"
        )
        (series,) = ct_study["series"]
        assert series["uid"] == ct.SeriesInstanceUID
        assert series["instance"][0]["sopClass"]["code"] == f"urn:oid:{ct.SOPClassUID}"

        two = imaging_study(fhir, generated[0].StudyInstanceUID)
        assert two["numberOfSeries"] == 2
        assert two["numberOfInstances"] == 4
        assert [m["code"] for m in two["modality"]] == ["CT", "SR"]
        (cast_patient,) = by_identifier(patients, "CAST-1")
        other = imaging_study(fhir, second[0].StudyInstanceUID)
        assert two["subject"] == other["subject"] == {"reference": f"Patient/{cast_patient['id']}"}


def test_deletes_and_a_replay_of_the_whole_feed_leave_exactly_one_of_each(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    """Study A (3 series of 2) and study B (2 instances): one instance of A
    deleted, one whole series of A deleted, all of B deleted.  A keeps its
    ImagingStudy with the right series and counts; B's is marked
    entered-in-error with none.  Replaying the whole change feed then
    writes nothing (every resource keeps its version); after the FHIR
    server loses everything, the replay makes each again, once."""
    fhir = fhir_server
    a = small_study(6, patient_id="CAST-A")
    series_uids = [generate_uid() for _ in range(3)]
    for number, ds in enumerate(a):
        ds.SeriesInstanceUID = series_uids[number // 2]
        ds.SeriesNumber = number // 2 + 1
        ds.InstanceNumber = number % 2 + 1
    b = small_study(2, patient_id="CAST-B")
    with site(tmp_path, fhir.url) as local:
        for ds in [*a, *b]:
            local.store(ds)
        local.drain()
        assert imaging_study(fhir, a[0].StudyInstanceUID)["numberOfInstances"] == 6

        local.delete(a[0].StudyInstanceUID, a[0].SeriesInstanceUID, a[0].SOPInstanceUID)
        local.delete(a[0].StudyInstanceUID, a[2].SeriesInstanceUID)
        local.delete(b[0].StudyInstanceUID)
        local.drain()

        expected = {
            a[1].SeriesInstanceUID: [a[1].SOPInstanceUID],
            a[4].SeriesInstanceUID: sorted([a[4].SOPInstanceUID, a[5].SOPInstanceUID]),
        }

        def check() -> dict[str, str]:
            studies = fhir.resources("ImagingStudy")
            assert len(studies) == 2
            assert len(fhir.resources("Patient")) == 2
            assert len(fhir.resources("Endpoint")) == 1
            study_a = imaging_study(fhir, a[0].StudyInstanceUID)
            ImagingStudy.model_validate(study_a)
            assert study_a["status"] == "available"
            assert study_a["numberOfSeries"] == 2
            assert study_a["numberOfInstances"] == 3
            assert shape(study_a) == expected
            study_b = imaging_study(fhir, b[0].StudyInstanceUID)
            ImagingStudy.model_validate(study_b)
            assert study_b["status"] == "entered-in-error"
            assert study_b["numberOfSeries"] == 0
            assert study_b["numberOfInstances"] == 0
            assert "series" not in study_b
            kinds = ("Patient", "Endpoint", "ImagingStudy")
            return {
                f"{r['resourceType']}/{r['id']}": r["meta"]["versionId"]
                for kind in kinds
                for r in fhir.resources(kind)
            }

        versions = check()
        replayed = local.queue.replay()
        assert replayed >= 11  # 8 stored, 4 deleted (one series counted per instance)
        local.drain()
        assert check() == versions  # nothing was written again

        fhir.reset()
        assert fhir.resources("ImagingStudy") == []
        local.queue.replay()
        local.drain()
        # made again, once each; B, gone here before the server knew it,
        # is not made at all
        studies = fhir.resources("ImagingStudy")
        assert len(studies) == 1
        assert shape(imaging_study(fhir, a[0].StudyInstanceUID)) == expected
        assert len(fhir.resources("Patient")) == 1
        assert len(fhir.resources("Endpoint")) == 1


def test_the_fhir_server_down_delays_and_loses_nothing(tmp_path: Path) -> None:
    """Studies stored while the FHIR server's port is closed wait in the
    queue with the connection error visible; a server started on that port
    gets every one, and studies that change meanwhile are published as they
    are when it comes back."""
    fhir = start_fhir_server(tmp_path / "fhir-1")
    port = fhir.port
    fhir.stop()
    studies = [small_study(2, patient_id=f"DOWN-{n}") for n in range(5)]
    with site(tmp_path, f"http://127.0.0.1:{port}/fhir/R4") as local:
        for study in studies:
            for ds in study:
                local.store(ds)
        local.drain()
        status = local.status()
        assert status["queued"] == 5
        assert status["synced"] == 0
        assert "cannot reach the FHIR server" in status["last_error"]

        extra = small_study(1, patient_id="DOWN-0")[0]
        extra.StudyInstanceUID = studies[0][0].StudyInstanceUID
        extra.SeriesInstanceUID = studies[0][0].SeriesInstanceUID
        local.store(extra)

        fhir = start_fhir_server(tmp_path / "fhir-2", port)
        try:
            deadline = time.monotonic() + 30
            while local.status()["synced"] < 5:
                assert time.monotonic() < deadline, local.status()
                local.drain()
                time.sleep(0.2)
            assert len(fhir.resources("ImagingStudy")) == 5
            assert len(fhir.resources("Patient")) == 5
            first = imaging_study(fhir, studies[0][0].StudyInstanceUID)
            assert first["numberOfInstances"] == 3
            assert local.status()["last_error"] is None
        finally:
            fhir.stop()


def test_a_503_storm_waits_and_a_refused_study_is_parked_until_retried(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    """The FHIR server answers 503 to the next requests (the test server's
    fault switch: a real server cannot be made to on demand): the studies
    wait and are published after.  A study without a Patient ID is parked
    with the reason, visible in status; ``retry`` queues it again."""
    fhir = fhir_server
    with site(tmp_path, fhir.url) as local:
        fine = small_study(1, patient_id="STORM-1")[0]
        local.store(fine)
        fhir.fail(503, 3)
        local.drain()
        assert local.status()["queued"] == 1
        assert "HTTP 503" in local.status()["last_error"]
        deadline = time.monotonic() + 30
        while local.status()["synced"] < 1:
            assert time.monotonic() < deadline, local.status()
            time.sleep(0.3)
            local.drain()
        assert len(fhir.resources("ImagingStudy")) == 1

        # a refusal (the server's 422, from its fault switch) parks the study
        refused = small_study(1, patient_id="STORM-2")[0]
        local.store(refused)
        fhir.fail(422, 1)
        local.drain()
        status = local.status()
        assert status["parked"] == 1
        assert "HTTP 422" in status["last_error"]
        assert httpx.post(f"{local.server.root}/admin/fhir/retry", timeout=10).json() == {
            "requeued": 1
        }
        local.drain()
        assert local.status()["parked"] == 0
        assert len(fhir.resources("ImagingStudy")) == 2

        nobody = small_study(1, patient_id="")[0]
        local.store(nobody)
        local.drain()
        status = local.status()
        assert status["parked"] == 1
        assert "no Patient ID" in status["last_error"]
        response = httpx.post(f"{local.server.root}/admin/fhir/retry", timeout=10)
        assert response.json() == {"requeued": 1}
        assert local.status()["queued"] == 1
        local.drain()
        assert local.status()["parked"] == 1


def fhir_status(app_site: ServeSite) -> dict[str, Any]:
    done = app_site.run("fhir", "status", "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.slow
def test_serve_publishes_what_storescu_sends_and_replay_changes_nothing(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    """``dicom-appliance serve`` with only ``[fhir] url`` set starts the
    background worker; dcmtk's storescu sends pydicom's CT_small and a
    generated study; the FHIR server gets both studies; ``fhir replay``
    (the CLI, while serving) reads the whole feed again and nothing is
    written twice."""
    fhir = fhir_server
    env = {
        "APPLIANCE_FHIR_URL": fhir.url,
        "APPLIANCE_FHIR_SETTLE_SECONDS": "1",
        "APPLIANCE_FHIR_DICOMWEB_URL": "https://edge.example/dicomweb/v1",
        "APPLIANCE_LOG_LEVEL": "info",
    }
    app_site = migrated_site(tmp_path / "app", env)
    files = [
        Path(get_testdata_file("CT_small.dcm")),  # type: ignore[arg-type]
        *study_files(tmp_path / "study", 5),
    ]
    with serving(app_site):
        storescu(app_site, files)
        deadline = time.monotonic() + 60
        while (status := fhir_status(app_site))["synced"] < 2:
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        assert status["parked"] == 0
        assert status["behind"] == 0
        studies = fhir.resources("ImagingStudy")
        assert sorted(s["numberOfInstances"] for s in studies) == [1, 5]
        (endpoint,) = fhir.resources("Endpoint")
        assert endpoint["address"] == "https://edge.example/dicomweb/v1"
        versions = {s["id"]: s["meta"]["versionId"] for s in studies}

        done = app_site.run("fhir", "replay")
        assert done.returncode == 0, done.stderr
        assert "6 change(s)" in done.stdout
        deadline = time.monotonic() + 60
        while (status := fhir_status(app_site))["behind"] or status["queued"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        again = fhir.resources("ImagingStudy")
        assert {s["id"]: s["meta"]["versionId"] for s in again} == versions
        assert len(fhir.resources("Patient")) == 2
