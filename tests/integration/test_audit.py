"""The audit trail with real peers: each access to patient data, by
DICOMweb (httpx) and by DIMSE (dcmtk's storescu, findscu, movescu, getscu),
gives exactly the expected event (who, address, study UIDs, counts,
outcome); refusals and failures are recorded as such; no patient name or ID
is ever written unless ``audit.record_query_values`` says so; several
gunicorn workers of ``serve`` write whole lines under concurrent requests.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import io
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from flask import abort, g, request
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.config import Config, RetentionConfig
from appliance.fhir.worker import DicomCast
from appliance.forward.outbox import Outbox
from appliance.forward.worker import Forwarder
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.model import Origin
from appliance.retention import Retention
from appliance.services import Services, build_services
from tests.conftest import (
    LiveAppliance,
    appliance_config,
    dcmtk,
    free_port,
    make_config,
    started_appliance,
    started_server,
)
from tests.helpers import part10_of, small_study, stow
from tests.integration.test_dimse_retrieve import storescp
from tests.integration.test_serve import migrated_site, running
from tests.peers import FhirServer

pytestmark = pytest.mark.integration

#: Values that must never reach an audit file (unless configured).
PATIENT_NAME = "Zyxwvut^Audit"
PATIENT_ID = "PID-AUDIT-7391"


# ---------------------------------------------------------------- helpers


def events(config: Config) -> list[dict[str, Any]]:
    """Every event of *config*'s audit folder, in the order written."""
    found: list[dict[str, Any]] = []
    for path in sorted(config.audit.path.glob("audit-*.jsonl")):
        found += [json.loads(line) for line in path.read_text().splitlines()]
    return found


class Trail:
    """The events written since the last :meth:`new` call."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.seen = 0

    def new(self, expected: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait for exactly *expected* new events (they are written when an
        answer's body or an association ends) and return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = events(self.config)[self.seen :]
            if len(found) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # nothing more arrives
        found = events(self.config)[self.seen :]
        self.seen += len(found)
        assert len(found) == expected, json.dumps(found, indent=1)
        return found


def study_of(count: int, suffix: str = "", **values: str) -> list[Dataset]:
    instances = small_study(count, patient_id=PATIENT_ID + suffix)
    for ds in instances:
        ds.PatientName = PATIENT_NAME
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return instances


def write_files(folder: Path, instances: list[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in instances:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(part10_of(ds))
        paths.append(path)
    return paths


def assert_no_patient_data(config: Config) -> None:
    for path in config.audit.path.iterdir():
        text = path.read_bytes()
        for value in (PATIENT_NAME, "Zyxwvut", PATIENT_ID):
            assert value.encode() not in text, f"{value} is in {path.name}"


def run(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, dest_port: int) -> Iterator[LiveAppliance]:
    config = appliance_config(
        tmp_path_factory.mktemp("audit"),
        APPLIANCE_DIMSE_PEERS=f'[{{ae_title="DEST", host="127.0.0.1", port={dest_port}}}]',
    )
    yield from started_appliance(config)


@pytest.fixture
def trail(app: LiveAppliance) -> Trail:
    trail = Trail(app.config)
    trail.seen = len(events(app.config))
    return trail


# ---------------------------------------------------------------- DICOMweb


def test_stow_qido_wado_delete_each_give_one_event(app: LiveAppliance, trail: Trail) -> None:
    first, second = study_of(2), study_of(1)
    study, other = str(first[0].StudyInstanceUID), str(second[0].StudyInstanceUID)

    response = stow(app.base_url, *(part10_of(ds) for ds in first + second))
    assert response.status_code == 200
    (stored,) = trail.new(1)
    assert stored["action"] == "store"
    assert stored["outcome"] == 0
    assert stored["event"] == {"code": "110104", "meaning": "DICOM Instances Transferred",
                               "action": "C"}  # fmt: skip
    assert stored["who"] == "anonymous"
    assert stored["address"] == "127.0.0.1"
    assert stored["protocol"] == "dicomweb"
    assert stored["transaction"] == "stow.store_instances"
    assert stored["studies"] == [study, other]
    assert stored["instances"] == 3
    assert stored["status"] == 200
    assert stored["correlation_id"]

    response = httpx.get(
        f"{app.root}/studies", params={"PatientName": "Zyxw*", "PatientID": PATIENT_ID}
    )
    assert response.status_code == 200
    assert len(response.json()) == 2
    (query,) = trail.new(1)
    assert query["action"] == "query"
    assert query["event"]["code"] == "110112"
    assert sorted(query["query_keys"]) == ["PatientID", "PatientName"]
    assert "query" not in query  # the values: never without the option
    assert sorted(query["studies"]) == sorted([study, other])
    assert query["instances"] == 2

    response = httpx.get(
        f"{app.root}/studies/{study}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 200
    httpx.get(f"{app.root}/studies/{study}/metadata").raise_for_status()
    retrieved, metadata = trail.new(2)
    for event in (retrieved, metadata):
        assert event["action"] == "retrieve"
        assert event["event"]["action"] == "R"
        assert event["studies"] == [study]
        assert event["instances"] == 2
        assert event["outcome"] == 0
    assert retrieved["transaction"] == "wado.retrieve_instances"
    assert metadata["transaction"] == "wado.retrieve_metadata"

    assert httpx.delete(f"{app.root}/studies/{other}").status_code == 204
    (deleted,) = trail.new(1)
    assert deleted["action"] == "delete"
    assert deleted["event"]["code"] == "110105"
    assert deleted["studies"] == [other]
    assert deleted["instances"] == 1

    httpx.get(f"{app.base_url}/health/live").raise_for_status()
    httpx.options(f"{app.root}/studies/{study}")  # a CORS preflight runs no view
    httpx.get(f"{app.root}/no/such/route")
    trail.new(0)  # none touches patient data
    assert_no_patient_data(app.config)


def test_failed_requests_are_recorded_as_failures(app: LiveAppliance, trail: Trail) -> None:
    unknown = str(generate_uid())
    response = httpx.get(f"{app.root}/studies/{unknown}/metadata")
    assert response.status_code == 404
    assert httpx.delete(f"{app.root}/studies/{unknown}").status_code == 404
    assert httpx.get(f"{app.root}/studies", params={"NoSuchKey": "x"}).status_code == 400
    missing, delete, bad_query = trail.new(3)
    assert (missing["action"], missing["outcome"], missing["status"]) == ("retrieve", 4, 404)
    assert missing["studies"] == [unknown]
    assert missing["instances"] == 0
    assert (delete["action"], delete["outcome"], delete["status"]) == ("delete", 4, 404)
    assert (bad_query["action"], bad_query["outcome"], bad_query["status"]) == ("query", 4, 400)

    # a STOW-RS whose one instance is refused (no Study Instance UID)
    (broken,) = study_of(1)
    del broken.StudyInstanceUID
    assert stow(app.base_url, part10_of(broken)).status_code == 409
    (refused,) = trail.new(1)
    assert (refused["action"], refused["outcome"], refused["status"]) == ("store", 4, 409)
    assert refused["failed"] == 1
    assert refused["instances"] == 0
    assert "studies" not in refused


def test_the_authenticated_principal_and_refusals(tmp_path: Path) -> None:
    """The authentication layer (another part of issue 9) puts the caller on
    ``g.principal`` and answers 401/403 from a ``before_request``: stood in
    for here by a ``before_request`` of the test's own, which is all the
    audit relies on (a duck-typed ``g.principal.name``)."""
    from werkzeug.serving import make_server

    from dicomweb.app import create_app

    config = make_config(tmp_path)
    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    services = build_services(config)
    app = create_app(config, services)

    @app.before_request
    def authenticate() -> None:
        token = request.headers.get("Authorization", "")
        if token == "Bearer alice":
            g.principal = SimpleNamespace(name="alice", roles=("read",))
        elif token:
            abort(403)
        else:
            abort(401)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        root = f"http://127.0.0.1:{server.server_port}/v1"
        trail = Trail(config)
        study = str(generate_uid())
        assert httpx.get(f"{root}/studies", headers={"Authorization": "Bearer alice"}).is_success
        assert httpx.get(f"{root}/studies/{study}/metadata").status_code == 401
        refused = httpx.delete(f"{root}/studies/{study}", headers={"Authorization": "x"})
        assert refused.status_code == 403
        allowed, anonymous, forbidden = trail.new(3)
        assert (allowed["who"], allowed["outcome"], allowed["status"]) == ("alice", 0, 200)
        assert (anonymous["who"], anonymous["action"], anonymous["status"]) == (
            "anonymous",
            "retrieve",
            401,
        )
        assert anonymous["outcome"] == 4
        assert anonymous["studies"] == [study]
        assert (forbidden["action"], forbidden["outcome"]) == ("delete", 4)
        assert forbidden["status"] == 403
    finally:
        server.shutdown()
        thread.join(10)
        services.close()


def test_query_values_are_recorded_only_when_configured(tmp_path: Path) -> None:
    config = appliance_config(tmp_path, APPLIANCE_AUDIT_RECORD_QUERY_VALUES="true")
    for app in started_appliance(config):
        trail = Trail(config)
        httpx.get(f"{app.root}/studies", params={"PatientName": "Zyxw*"}).raise_for_status()
        (query,) = trail.new(1)
        assert query["query"] == {"PatientName": "Zyxw*"}
        out = run(
            [
                dcmtk("findscu"), "-S", "-aec", app.ae_title,
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT_ID}",
                "-k", "StudyInstanceUID",
                "127.0.0.1", str(app.dimse_port),
            ]
        )  # fmt: skip
        (find,) = trail.new(1)
        assert find["query"] == {"PatientID": PATIENT_ID}, out


# ---------------------------------------------------------------- DIMSE


def test_c_store_gives_one_event_per_study_and_association(
    app: LiveAppliance, trail: Trail, tmp_path: Path
) -> None:
    first, second = study_of(3), study_of(1)
    files = write_files(tmp_path / "in", first + second)
    (broken,) = study_of(1)
    del broken.StudyInstanceUID  # refused: 0xA900
    files += write_files(tmp_path / "bad", [broken])
    out = run([dcmtk("storescu"), "-aet", "MODALITY1", "-aec", app.ae_title,
               "127.0.0.1", str(app.dimse_port), *map(str, files)])  # fmt: skip
    events_by_study = {tuple(e.get("studies", ())): e for e in trail.new(3)}
    assert len(events_by_study) == 3, out
    one = events_by_study[(str(first[0].StudyInstanceUID),)]
    two = events_by_study[(str(second[0].StudyInstanceUID),)]
    refused = events_by_study[()]
    for event in (one, two, refused):
        assert event["action"] == "store"
        assert event["protocol"] == "dimse"
        assert event["who"] == "MODALITY1"
        assert event["address"] == "127.0.0.1"
        assert event["transaction"] == "C-STORE"
        assert event["correlation_id"].startswith("assoc-")
    assert (one["instances"], one["outcome"]) == (3, 0)
    assert (two["instances"], two["outcome"]) == (1, 0)
    assert (refused["instances"], refused["failed"], refused["outcome"]) == (0, 1, 8)
    assert refused["status"] == 0xA900
    assert_no_patient_data(app.config)


def test_c_find_c_move_and_c_get(
    app: LiveAppliance, trail: Trail, tmp_path: Path, dest_port: int
) -> None:
    instances = study_of(2, suffix="-QR")
    study = str(instances[0].StudyInstanceUID)
    assert stow(app.base_url, *(part10_of(ds) for ds in instances)).status_code == 200
    trail.new(1)

    out = run(
        [
            dcmtk("findscu"), "-S", "-aet", "VIEWER", "-aec", app.ae_title,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientName={PATIENT_NAME}",
            "-k", f"PatientID={PATIENT_ID}-QR", "-k", "StudyInstanceUID",
            "127.0.0.1", str(app.dimse_port),
        ]
    )  # fmt: skip
    (find,) = trail.new(1)
    assert (find["action"], find["transaction"], find["who"]) == ("query", "C-FIND", "VIEWER"), out
    assert sorted(find["query_keys"]) == ["PatientID", "PatientName"]
    assert find["studies"] == [study]
    assert find["instances"] == 1
    assert find["outcome"] == 0

    with storescp(dest_port, tmp_path / "dest"):
        out = run(
            [
                dcmtk("movescu"), "-S", "-aet", "VIEWER", "-aec", app.ae_title, "-aem", "DEST",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                "127.0.0.1", str(app.dimse_port),
            ]
        )  # fmt: skip
        (move,) = trail.new(1)
    assert (move["action"], move["transaction"], move["outcome"]) == ("retrieve", "C-MOVE", 0), out
    assert move["destination"] == f"DEST (127.0.0.1:{dest_port})"
    assert move["studies"] == [study]
    assert move["instances"] == 2
    assert move["status"] == 0

    out = run(
        [
            dcmtk("movescu"), "-S", "-aet", "VIEWER", "-aec", app.ae_title, "-aem", "NOWHERE",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            "127.0.0.1", str(app.dimse_port),
        ]
    )  # fmt: skip
    (unknown,) = trail.new(1)
    assert (unknown["outcome"], unknown["status"]) == (4, 0xA801), out

    (tmp_path / "got").mkdir()
    out = run(
        [
            dcmtk("getscu"), "-S", "-aet", "VIEWER", "-aec", app.ae_title,
            "-od", str(tmp_path / "got"),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            "127.0.0.1", str(app.dimse_port),
        ]
    )  # fmt: skip
    (get,) = trail.new(1)
    assert (get["action"], get["transaction"], get["outcome"]) == ("retrieve", "C-GET", 0), out
    assert get["studies"] == [study]
    assert get["instances"] == 2
    assert "destination" not in get
    assert_no_patient_data(app.config)


# ---------------------------------------------------------------- serve


def test_serve_workers_write_whole_lines_under_concurrent_requests(tmp_path: Path) -> None:
    site = migrated_site(tmp_path / "site", {"APPLIANCE_HTTP_WORKERS": "3"})
    instances = study_of(1)
    study = str(instances[0].StudyInstanceUID)
    requests = 240
    with running(site) as appliance:
        assert stow(appliance.base_url, part10_of(instances[0])).status_code == 200
        # several gunicorn workers append to the day's file at once
        with httpx.Client(timeout=30) as client:

            def one(number: int) -> int:
                if number % 2:
                    url = f"{appliance.base_url}/v1/studies/{study}/metadata"
                else:
                    url = f"{appliance.base_url}/v1/studies"
                return client.get(url, params={} if number % 2 else {"limit": "5"}).status_code

            with concurrent.futures.ThreadPoolExecutor(24) as pool:
                statuses = list(pool.map(one, range(requests)))
        assert statuses == [200] * requests
        folder = tmp_path / "site" / "data" / "audit"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            raw = b"".join(p.read_bytes() for p in folder.glob("audit-*.jsonl"))
            if raw.count(b"\n") >= requests + 1:
                break
            time.sleep(0.1)
    parsed = [json.loads(line) for line in raw.splitlines()]  # no torn or mixed line
    assert len(parsed) == requests + 1
    assert sum(e["action"] == "query" for e in parsed) == requests // 2
    assert sum(e["action"] == "retrieve" for e in parsed) == requests // 2
    assert len({e["correlation_id"] for e in parsed}) == requests + 1
    result = site.run("audit", "--json", "--study", study, "--action", "retrieve")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == requests // 2


# ------------------------------------------------------- the appliance's own


def _ingest(services: Services, instances: list[Dataset]) -> None:
    for ds in instances:
        result = services.ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("import"))
        assert result.stored, result.reason


def test_forwarding_and_retention_are_recorded(tmp_path: Path) -> None:
    """Forwarding to a real DICOMweb upstream (a second appliance on
    loopback): each batch is an export event (each deletion sent, a delete
    event), and the upstream records the store from this appliance; a
    retention run's deletions are delete events of "retention"."""
    for upstream in started_server(make_config(tmp_path / "upstream")):
        config = make_config(
            tmp_path / "here",
            APPLIANCE_FORWARD=f'[{{name="cloud", url="{upstream.root}"}}]',
        )
        engine = create_index_engine(config.index.url)
        migrate.upgrade(engine)
        engine.dispose()
        services = build_services(config)
        try:
            trail, upstream_trail = Trail(config), Trail(upstream.config)
            instances = study_of(2, suffix="-FW")
            study = str(instances[0].StudyInstanceUID)
            _ingest(services, instances)
            (cloud,) = config.forward
            forwarder = Forwarder(
                config.forward,
                Outbox(services.engine),
                services.index,
                services.retrieve,
                audit=services.audit,
            )
            try:
                assert forwarder.send_once(cloud)
                (export,) = trail.new(1)
                assert (export["action"], export["outcome"]) == ("export", 0)
                assert export["event"] == {"code": "110106", "meaning": "Export", "action": "R"}
                assert (export["who"], export["protocol"]) == ("forward", "forward")
                assert (export["destination"], export["address"]) == ("cloud", upstream.root)
                assert (export["studies"], export["instances"]) == ([study], 2)
                (received,) = upstream_trail.new(1)
                assert (received["action"], received["studies"]) == ("store", [study])

                services.delete.delete(study)
                assert forwarder.send_once(cloud)
                deletions = trail.new(2)  # one DELETE per instance upstream
                assert {(e["action"], e["destination"], e["outcome"]) for e in deletions} == {
                    ("delete", "cloud", 0)
                }
                upstream_trail.new(2)

                kept = study_of(1, suffix="-RT")
                _ingest(services, kept)
                assert forwarder.send_once(cloud)
                trail.new(1)
            finally:
                forwarder.close()
            retention = Retention(
                RetentionConfig(max_age_days=1),
                services.engine,
                services.index,
                services.storage,
                services.audit,
            )
            report = retention.run(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
            assert report.studies == 1
            (expired,) = trail.new(1)
            assert (expired["action"], expired["who"], expired["protocol"]) == (
                "delete",
                "retention",
                "system",
            )
            assert expired["studies"] == [str(kept[0].StudyInstanceUID)]
            assert_no_patient_data(config)
        finally:
            services.close()


def test_dicomcast_publications_are_exports(tmp_path: Path, fhir_server: FhirServer) -> None:
    config = make_config(
        tmp_path, APPLIANCE_FHIR_URL=fhir_server.url, APPLIANCE_FHIR_SETTLE_SECONDS="0"
    )
    for server in started_server(config):
        cast = DicomCast(config, server.services.engine, audit=server.services.audit)
        try:
            trail = Trail(config)
            instances = study_of(1, suffix="-FHIR")
            _ingest(server.services, instances)
            while cast.queue.pull(dt.timedelta(0)):
                pass
            assert cast.send_once()
            (export,) = trail.new(1)
            assert (export["action"], export["protocol"], export["who"]) == (
                "export",
                "fhir",
                "dicomcast",
            )
            assert export["address"] == fhir_server.url
            assert export["studies"] == [str(instances[0].StudyInstanceUID)]
            assert export["outcome"] == 0
        finally:
            cast.close()
