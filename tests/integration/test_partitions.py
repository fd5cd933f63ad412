"""Data partitions (issue 11): the same instance stored in two partitions is
two independent records; QIDO-RS in one never returns the other's; the
DICOMweb paths, the partition list and the change feed in the seed
service's shapes; C-STORE, C-FIND, C-GET and Storage Commitment through two
Called AE Titles (dcmtk and pynetdicom) see two partitions.

The DICOMweb tests run on SQLite and PostgreSQL (``index_url``); the DIMSE
ones on the embedded default.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelGet,
)

from appliance.cli import prepare
from appliance.errors import ConfigError
from appliance.partitions import DEFAULT_NAME
from tests.conftest import (
    LiveServer,
    appliance_config,
    dcmtk,
    make_config,
    started_appliance,
    started_server,
)
from tests.helpers import part10_of, stow_to

pytestmark = pytest.mark.integration

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
STUDY_TAG, SOP_TAG, RETRIEVE_URL = "0020000D", "00080018", "00081190"
#: the well-known SOP Instance of Storage Commitment (PS3.4 J.3.5)
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


@pytest.fixture
def server(index_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """An empty appliance with partitions on (SQLite, PostgreSQL)."""
    config = make_config(tmp_path, APPLIANCE_INDEX_URL=index_url, APPLIANCE_PARTITIONS_ENABLED="1")
    yield from started_server(config)


def qido(url: str, **params: str) -> httpx.Response:
    return httpx.get(url, params=params, headers={"Accept": "application/dicom+json"})


def values(response: httpx.Response, tag: str) -> set[str]:
    assert response.status_code == 200, response.text
    return {item[tag]["Value"][0] for item in response.json()}


def secondary_capture(patient_id: str, study: str | None = None) -> Dataset:
    """A small CT-class instance of a new study (or of *study*)."""
    ds = dcmread(CT)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


# --------------------------------------------------------------------------
# DICOMweb


def test_the_same_instance_in_two_partitions_is_two_independent_records(
    server: LiveServer,
) -> None:
    data = CT.read_bytes()
    ds = dcmread(CT)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    roots = {name: f"{server.root}/partitions/{name}" for name in ("Cardio-1", "onco.2")}
    for root in roots.values():
        stored = stow_to(root, data)
        assert stored.status_code == 200, stored.text
        # the RetrieveURL stays in the partition it was stored in (PS3.18 10.5.3)
        assert stored.json()[RETRIEVE_URL]["Value"] == [f"{root}/studies/{study}"]

    # both partitions hold it, each retrieves the bytes it was sent
    instance_path = f"/studies/{study}/series/{series}/instances/{sop}"
    for root in roots.values():
        assert values(qido(f"{root}/studies"), STUDY_TAG) == {study}
        got = httpx.get(
            f"{root}{instance_path}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
        assert got.status_code == 200
        assert data[132:] in got.content  # the data set, whatever File Meta it got

    # the partitions are listed, created by these writes, after the default one
    listed = httpx.get(f"{server.root}/partitions").json()
    assert [p["partitionName"] for p in listed] == [DEFAULT_NAME, "Cardio-1", "onco.2"]
    assert [p["partitionKey"] for p in listed] == [1, 2, 3]

    # deleting it in one partition leaves the other's record whole
    assert httpx.delete(f"{roots['Cardio-1']}/studies/{study}").status_code == 204
    assert qido(f"{roots['Cardio-1']}/studies").json() == []
    assert httpx.get(f"{roots['Cardio-1']}/studies/{study}/metadata").status_code == 404
    assert values(qido(f"{roots['onco.2']}/studies"), STUDY_TAG) == {study}
    metadata = httpx.get(f"{roots['onco.2']}/studies/{study}/metadata").json()
    assert metadata[0]["7FE00010"]["BulkDataURI"].startswith(f"{roots['onco.2']}/studies/")

    # storing it again in the first partition is a new record, not a duplicate
    again = stow_to(roots["Cardio-1"], data)
    assert again.status_code == 200
    assert "00081196" not in again.json()  # no warning: nothing was kept from before

    # the audit trail names the partition of each access (written as each
    # answer ends)
    deadline = time.monotonic() + 10
    while True:
        stored = [
            event.get("partition", "")
            for event in audit_events(server)
            if event.get("transaction") == "stow.store_instances"
        ]
        if len(stored) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(stored) == ["Cardio-1", "Cardio-1", "onco.2"]


def test_qido_in_one_partition_never_returns_the_others(server: LiveServer) -> None:
    a, b = f"{server.root}/partitions/A", f"{server.root}/partitions/B"
    in_a = secondary_capture("PAT-A")
    in_b = secondary_capture("PAT-B")
    shared = secondary_capture("PAT-SHARED")
    assert stow_to(a, part10_of(in_a), part10_of(shared)).status_code == 200
    assert stow_to(b, part10_of(in_b), part10_of(shared)).status_code == 200

    for root, own, other in ((a, in_a, in_b), (b, in_b, in_a)):
        studies = {own.StudyInstanceUID, shared.StudyInstanceUID}
        assert values(qido(f"{root}/studies"), STUDY_TAG) == studies
        assert values(qido(f"{root}/instances"), SOP_TAG) == {
            own.SOPInstanceUID,
            shared.SOPInstanceUID,
        }
        assert qido(f"{root}/studies", PatientID=other.PatientID).json() == []
        assert qido(f"{root}/studies", StudyInstanceUID=other.StudyInstanceUID).json() == []
        assert qido(f"{root}/studies/{other.StudyInstanceUID}/series").json() == []
        assert values(qido(f"{root}/studies", PatientID="PAT-*"), STUDY_TAG) == studies
        other_metadata = httpx.get(f"{root}/studies/{other.StudyInstanceUID}/metadata")
        assert other_metadata.status_code == 404

    # the default partition holds neither
    default = f"{server.root}/partitions/{DEFAULT_NAME}"
    assert qido(f"{default}/studies").json() == []


def test_the_paths_refused_with_the_seed_services_messages(server: LiveServer) -> None:
    assert stow_to(f"{server.root}/partitions/A", CT.read_bytes()).status_code == 200
    cases = {
        f"{server.root}/studies": "PartitionName value is missing in the route segment.",
        f"{server.root}/instances": "PartitionName value is missing in the route segment.",
        f"{server.root}/partitions/nope/studies": "Specified PartitionName nope does not exist.",
        f"{server.root}/partitions/{'x' * 65}/studies": "PartitionName must be",
        f"{server.root}/partitions/a*b/studies": "PartitionName must be",
    }
    for url, message in cases.items():
        answer = qido(url)
        assert answer.status_code == 400, url
        assert answer.json()["error"].startswith(message), answer.text
    # a write into a bad name creates nothing
    assert stow_to(f"{server.root}/partitions/a*b", CT.read_bytes()).status_code == 400
    names = [p["partitionName"] for p in httpx.get(f"{server.root}/partitions").json()]
    assert names == [DEFAULT_NAME, "A"]
    # what the seed service keeps at the base URI stays there
    assert httpx.get(f"{server.root}/changefeed").status_code == 200


def test_dicomweb_client_works_against_a_partition_root(server: LiveServer) -> None:
    """The dicomweb-client package, pointed at a partition as its root."""
    client = DICOMwebClient(url=f"{server.root}/partitions/research")
    ds = secondary_capture("RESEARCH-7")
    client.store_instances([ds])
    found = client.search_for_studies(search_filters={"PatientID": "RESEARCH-7"})
    assert [item[STUDY_TAG]["Value"][0] for item in found] == [ds.StudyInstanceUID]
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    elsewhere = DICOMwebClient(url=f"{server.root}/partitions/{DEFAULT_NAME}")
    assert elsewhere.search_for_studies(search_filters={"PatientID": "RESEARCH-7"}) == []


def test_the_change_feed_names_each_entrys_partition(server: LiveServer) -> None:
    data = CT.read_bytes()
    for name in ("A", "B"):
        assert stow_to(f"{server.root}/partitions/{name}", data).status_code == 200
    feed = httpx.get(f"{server.root}/changefeed").json()
    assert [entry["PartitionName"] for entry in feed] == ["A", "B"]
    for entry in feed:
        bulk = entry["Metadata"]["7FE00010"]["BulkDataURI"]
        assert bulk.startswith(f"{server.root}/partitions/{entry['PartitionName']}/studies/")
        assert httpx.get(bulk).status_code == 200


def test_with_partitions_off_the_partition_paths_are_refused(tmp_path: Path) -> None:
    for server in started_server(make_config(tmp_path)):
        listed = httpx.get(f"{server.root}/partitions")
        assert listed.status_code == 400
        assert listed.json()["error"] == "Data partitions feature is disabled."
        assert qido(f"{server.root}/partitions/A/studies").status_code == 400
        assert stow_to(server.root, CT.read_bytes()).status_code == 200
        entry = httpx.get(f"{server.root}/changefeed").json()[0]
        assert "PartitionName" not in entry


def test_partitions_cannot_be_turned_off_once_another_exists(tmp_path: Path) -> None:
    on = make_config(tmp_path, APPLIANCE_PARTITIONS_ENABLED="1")
    for server in started_server(on):
        prepare(make_config(tmp_path))  # only the default partition: off is fine
        assert stow_to(f"{server.root}/partitions/A", CT.read_bytes()).status_code == 200
    with pytest.raises(ConfigError, match="partitions cannot be turned off"):
        prepare(make_config(tmp_path))
    prepare(on)


# --------------------------------------------------------------------------
# DIMSE


def partitioned_appliance(tmp_path: Path, **environ: str) -> Iterator[LiveServer]:
    config = appliance_config(
        tmp_path,
        APPLIANCE_PARTITIONS_ENABLED="1",
        APPLIANCE_PARTITIONS_AE_TITLES="CARDIO_EDGE=cardiology,ONCO_EDGE=oncology",
        **environ,
    )
    yield from started_appliance(config)


def storescu(app: LiveServer, called: str, *paths: Path) -> None:
    sent = subprocess.run(
        [dcmtk("storescu"), "-aec", called, "127.0.0.1", str(app.config.dimse.port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr


def findscu(app: LiveServer, called: str, folder: Path) -> set[str]:
    """The Study Instance UIDs a study-level C-FIND by dcmtk's findscu
    through *called* returns."""
    folder.mkdir()
    found = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "-aec",
            called,
            "-X",
            "-od",
            str(folder),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "-k",
            "PatientID",
            "127.0.0.1",
            str(app.config.dimse.port),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    return {str(dcmread(p).StudyInstanceUID) for p in folder.glob("rsp*.dcm")}


def audit_events(app: LiveServer) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(app.config.audit.path.glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_cfind_via_two_called_ae_titles_sees_two_partitions(tmp_path: Path) -> None:
    shared, cardio_only, onco_only = (
        secondary_capture("SHARED"),
        secondary_capture("CARDIO-1"),
        secondary_capture("ONCO-1"),
    )
    files = {}
    for name, ds in (("shared", shared), ("cardio", cardio_only), ("onco", onco_only)):
        files[name] = tmp_path / f"{name}.dcm"
        ds.save_as(files[name], enforce_file_format=True)
    for app in partitioned_appliance(tmp_path):
        storescu(app, "CARDIO_EDGE", files["shared"], files["cardio"])
        storescu(app, "ONCO_EDGE", files["shared"], files["onco"])

        cardio = findscu(app, "CARDIO_EDGE", tmp_path / "cardio")
        onco = findscu(app, "ONCO_EDGE", tmp_path / "onco")
        default = findscu(app, "DICOM_EDGE", tmp_path / "default")
        assert cardio == {shared.StudyInstanceUID, cardio_only.StudyInstanceUID}
        assert onco == {shared.StudyInstanceUID, onco_only.StudyInstanceUID}
        assert default == set()

        # the same partitions on the DICOMweb side, by name
        root = app.root + "/partitions"
        assert values(qido(f"{root}/cardiology/studies"), STUDY_TAG) == cardio
        assert values(qido(f"{root}/oncology/studies"), STUDY_TAG) == onco

        # the audit trail says which partition each access was in
        stores = {
            (event.get("partition", ""), tuple(event["studies"]))
            for event in audit_events(app)
            if event["protocol"] == "dimse" and event["action"] == "store"
        }
        assert ("cardiology", (cardio_only.StudyInstanceUID,)) in stores
        assert ("oncology", (onco_only.StudyInstanceUID,)) in stores
        finds = [e for e in audit_events(app) if e.get("transaction") == "C-FIND"]
        assert sorted(e.get("partition", "") for e in finds) == ["", "cardiology", "oncology"]

        # a title the appliance does not answer to: rejected, reason 7
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aec", "RADIOLOGY", "127.0.0.1", str(app.config.dimse.port)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert echo.returncode != 0
        assert "Called AE Title Not Recognized" in echo.stdout + echo.stderr


def test_cget_and_commitment_stay_in_the_called_partition(tmp_path: Path) -> None:
    """pynetdicom as SCU: a C-GET through one title retrieves only that
    partition's copy; a Storage Commitment request through another title
    commits only what is stored in its partition."""
    shared, onco_only = secondary_capture("SHARED"), secondary_capture("ONCO-1")
    paths = []
    for name, ds in (("shared", shared), ("onco", onco_only)):
        paths.append(tmp_path / f"{name}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    received: list[str] = []
    reports: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append(event.event_information)
        return 0x0000, None

    for app in partitioned_appliance(tmp_path):
        storescu(app, "CARDIO_EDGE", paths[0])
        storescu(app, "ONCO_EDGE", *paths)
        port = app.config.dimse.port

        ae = AE(ae_title="GET-SCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        role = build_role(CTImageStorage, scp_role=True)

        for called, study in (
            ("CARDIO_EDGE", onco_only.StudyInstanceUID),
            ("ONCO_EDGE", onco_only.StudyInstanceUID),
        ):
            assoc = ae.associate(
                "127.0.0.1",
                port,
                ae_title=called,
                ext_neg=[role],
                evt_handlers=[(evt.EVT_C_STORE, on_store)],
            )
            assert assoc.is_established
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study
            statuses = [
                int(status.Status)
                for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
                if status
            ]
            assoc.release()
            assert statuses[-1] == 0x0000
        # through CARDIO_EDGE the oncology-only study is not there: nothing sent
        assert received == [onco_only.SOPInstanceUID]

        # Storage Commitment through CARDIO_EDGE: the shared instance is
        # committed, the oncology-only one is not in this partition
        commit = AE(ae_title="COMMIT-SCU")
        commit.add_requested_context(StorageCommitmentPushModel)
        assoc = commit.associate(
            "127.0.0.1",
            port,
            ae_title="CARDIO_EDGE",
            ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )
        assert assoc.is_established
        info = Dataset()
        info.TransactionUID = generate_uid()
        info.ReferencedSOPSequence = []
        for ds in (shared, onco_only):
            item = Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            info.ReferencedSOPSequence.append(item)
        status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert int(status.Status) == 0x0000
        deadline = time.monotonic() + 30
        while not reports and time.monotonic() < deadline:
            time.sleep(0.1)
        assoc.release()
        assert reports, "no N-EVENT-REPORT"
        report = reports[0]
        committed = [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence]
        failed = [i.ReferencedSOPInstanceUID for i in report.FailedSOPSequence]
        assert committed == [shared.SOPInstanceUID]
        assert failed == [onco_only.SOPInstanceUID]


def test_a_peers_partition_wins_over_the_called_title(tmp_path: Path) -> None:
    """``[[dimse.peers]] partition``: a modality that always lands in one
    partition, whatever title it calls."""
    ds = secondary_capture("RESEARCH-1")
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    config = appliance_config(
        tmp_path,
        APPLIANCE_PARTITIONS_ENABLED="1",
        APPLIANCE_PARTITIONS_AE_TITLES="CARDIO_EDGE=cardiology",
        APPLIANCE_DIMSE_PEERS=(
            '[{ae_title = "STORESCU", host = "127.0.0.1", partition = "research"}]'
        ),
    )
    for app in started_appliance(config):
        storescu(app, "CARDIO_EDGE", path)  # dcmtk calls as STORESCU
        root = app.root + "/partitions"
        assert values(qido(f"{root}/research/studies"), STUDY_TAG) == {ds.StudyInstanceUID}
        # cardiology was never written into: it does not exist
        assert qido(f"{root}/cardiology/studies").status_code == 400


def test_the_console_and_the_viewer_show_the_default_partition(tmp_path: Path) -> None:
    """With partitions on, the console's pages and the viewer's data source
    use the default partition's root (the unpartitioned one is refused)."""
    folder = tmp_path / "viewer"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><title>OHIF</title>")
    (folder / "app-config.js").write_text("window.config = {}; // as installed")
    config = make_config(
        tmp_path, APPLIANCE_PARTITIONS_ENABLED="1", APPLIANCE_VIEWER_FOLDER=str(folder)
    )
    ds = dcmread(CT)
    default = f"/v1/partitions/{DEFAULT_NAME}"
    for server in started_server(config):
        assert stow_to(server.base_url + default, CT.read_bytes()).status_code == 200
        assert stow_to(f"{server.root}/partitions/other", CT.read_bytes()).status_code == 200
        page = httpx.get(f"{server.base_url}/console/studies/{ds.StudyInstanceUID}")
        assert page.status_code == 200
        thumbnail = (
            f"{default}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/thumbnail"
        )
        assert f'src="{thumbnail}"' in page.text
        image = httpx.get(server.base_url + thumbnail, headers={"Accept": "image/png"})
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        listed = httpx.get(f"{server.base_url}/console/studies")
        assert listed.text.count(ds.StudyInstanceUID) >= 1

        script = httpx.get(f"{server.base_url}/viewer/app-config.js")
        assert script.status_code == 200
        assert f'qidoRoot: window.location.origin + "{default}"' in script.text


def test_import_into_a_partition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``dicom-appliance import --partition NAME``: the files land in that
    partition (created), and importing them again elsewhere is another
    import (its own journal identity)."""
    from appliance.cli import main

    folder = tmp_path / "disc"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(CT.read_bytes())
    settings = tmp_path / "appliance.toml"
    settings.write_text(
        f'[storage]\npath = "{tmp_path / "blobs"}"\n'
        f'[index]\nurl = "sqlite:///{tmp_path / "index.db"}"\nauto_migrate = true\n'
        "[partitions]\nenabled = true\n"
    )
    assert main(["migrate", "--config", str(settings)]) == 0
    journal = str(tmp_path / "journal")
    argv = ["import", str(folder), "--config", str(settings), "--journal", journal]
    assert main([*argv, "--partition", "outside-disc"]) == 0
    assert main([*argv, "--partition", "a b"]) == 2
    capsys.readouterr()
    config = make_config(tmp_path, APPLIANCE_PARTITIONS_ENABLED="1")
    study = dcmread(CT).StudyInstanceUID
    for server in started_server(config):
        root = f"{server.root}/partitions"
        assert values(qido(f"{root}/outside-disc/studies"), STUDY_TAG) == {study}
        assert qido(f"{root}/{DEFAULT_NAME}/studies").json() == []
    # the same journal, another partition: refused rather than skipping the files
    assert main([*argv, "--partition", "second"]) == 1
    assert "another index or partition" in capsys.readouterr().err


def test_an_extended_query_tag_matches_within_a_partition(server: LiveServer) -> None:
    """Extended query tags span the partitions (defined once, at the service
    root); their values are per instance, so each partition matches its own."""
    from appliance.reindex import Reindexer

    added = httpx.post(
        f"{server.root}/extendedquerytags",
        json=[{"path": "ManufacturerModelName", "level": "Series"}],
    )
    assert added.status_code == 202, added.text
    services = server.services
    reindex = Reindexer(
        services.engine, services.index, services.storage, services.extended, settle_seconds=0
    )
    assert reindex.run_pending() == 1
    in_a, in_b = secondary_capture("EQT-A"), secondary_capture("EQT-B")
    in_a.ManufacturerModelName = "Scanner Z9"
    in_b.ManufacturerModelName = "Scanner Z9"
    a, b = f"{server.root}/partitions/A", f"{server.root}/partitions/B"
    assert stow_to(a, part10_of(in_a)).status_code == 200
    assert stow_to(b, part10_of(in_b)).status_code == 200
    for root, own in ((a, in_a), (b, in_b)):
        found = qido(f"{root}/series", ManufacturerModelName="Scanner Z*")
        assert values(found, "0020000E") == {own.SeriesInstanceUID}
