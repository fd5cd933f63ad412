"""Extended query tags (issue 11): the admin API in the seed service's shapes,
values indexed at ingest (C-STORE by dcmtk's storescu, STOW-RS) and by the
re-index of instances stored before, found by QIDO-RS and C-FIND with each
matching rule; a re-index stopped in the middle and finished by another
worker from its cursor; a deleted tag refused by queries.

The index tests run on SQLite and PostgreSQL (``index_url``); the DIMSE
ones on the embedded default.
"""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from appliance.index.engine import create_index_engine
from appliance.model import Origin
from appliance.reindex import Reindexer
from tests.conftest import (
    LiveServer,
    appliance_config,
    dcmtk,
    make_config,
    started_appliance,
    started_server,
)
from tests.helpers import part10_of, stow

pytestmark = pytest.mark.integration

CREATOR = "ACME 1.0"
#: The private tags of these tests, in the block 0x10 of group 0x0009.
P_LO, P_DA, P_UI, P_SL, P_DS, P_PN = (
    "00091001",
    "00091002",
    "00091003",
    "00091004",
    "00091005",
    "00091006",
)
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
ORIGIN = Origin("import")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

TAGS = [
    {"path": P_LO, "vr": "LO", "privateCreator": CREATOR, "level": "Study"},
    {"path": P_DA, "vr": "DA", "privateCreator": CREATOR, "level": "Series"},
    {"path": P_UI, "vr": "UI", "privateCreator": CREATOR, "level": "Instance"},
    {"path": P_SL, "vr": "SL", "privateCreator": CREATOR, "level": "Instance"},
    {"path": P_DS, "vr": "DS", "privateCreator": CREATOR, "level": "Instance"},
    {"path": P_PN, "vr": "PN", "privateCreator": CREATOR, "level": "Study"},
    {"path": "ManufacturerModelName", "level": "Series"},
    {"path": "AcquisitionDateTime", "level": "Instance"},
]


def instance(
    study: str,
    *,
    lo: str | None = None,
    da: str | None = None,
    ui: str | None = None,
    sl: int | None = None,
    ds_value: str | None = None,
    pn: str | None = None,
    model: str | None = None,
    acquired: str | None = None,
    series: str | None = None,
    syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A Secondary Capture instance of *study* carrying the private block of
    :data:`CREATOR` with the values given."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = SC_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID = "EQT-1"
    ds.Modality = "OT"
    block = ds.private_block(0x0009, CREATOR, create=True)
    for element, vr, value in (
        (0x01, "LO", lo),
        (0x02, "DA", da),
        (0x03, "UI", ui),
        (0x04, "SL", sl),
        (0x05, "DS", ds_value),
        (0x06, "PN", pn),
    ):
        if value is not None:
            block.add_new(element, vr, value)
    if model is not None:
        ds.ManufacturerModelName = model
    if acquired is not None:
        ds.AcquisitionDateTime = acquired
    return ds


def store(server: LiveServer, ds: Dataset) -> None:
    response = stow(server.base_url, part10_of(ds))
    assert response.status_code == 200, response.text


def admin(server: LiveServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.root}{path}", timeout=30, **kwargs)


def qido(server: LiveServer, path: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{server.root}{path}", params=params, headers={"Accept": "application/dicom+json"}
    )


def uids(response: httpx.Response, tag: str) -> set[str]:
    assert response.status_code == 200, response.text
    return {item[tag]["Value"][0] for item in response.json()}


def reindexer(server: LiveServer, **kwargs: Any) -> Reindexer:
    services = server.services
    return Reindexer(services.engine, services.index, services.storage, services.extended, **kwargs)


@pytest.fixture
def server(index_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """An empty appliance on the index of ``index_url`` (SQLite, PostgreSQL)."""
    yield from started_server(make_config(tmp_path, APPLIANCE_INDEX_URL=index_url))


# --------------------------------------------------------------------------
# the admin API


def test_admin_api_in_the_seed_services_shapes(server: LiveServer) -> None:
    added = admin(server, "POST", "/extendedquerytags", json=TAGS[:2])
    assert added.status_code == 202, added.text
    reference = added.json()
    assert set(reference) == {"id", "href"}
    assert reference["href"] == f"{server.root}/operations/{reference['id']}"

    again = admin(server, "POST", "/extendedquerytags", json=[TAGS[0]])
    assert again.status_code == 409
    assert P_LO in again.json()["error"]

    for bad, why in (
        ([{"path": "00091010", "privateCreator": CREATOR, "level": "Study"}], "vr"),
        ([{"path": "00091010", "vr": "LO", "level": "Study"}], "privateCreator"),
        ([{"path": "00091010", "vr": "OB", "privateCreator": CREATOR, "level": "Study"}], "VR"),
        ([{"path": "ReferencedStudySequence", "level": "Study"}], "VR SQ"),
        ([{"path": "PatientName", "level": "Study"}], "already a query key"),
        ([{"path": "StationName", "level": "Patient"}], "level"),
        ([{"path": "StationName.CodeValue", "level": "Study"}], "top-level"),
        ([{"path": "NoSuchKeyword", "level": "Study"}], "neither"),
        ({"path": "StationName", "level": "Study"}, "array"),
        ([], "no extended query tag"),
    ):
        refused = admin(server, "POST", "/extendedquerytags", json=bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert why in refused.json()["error"], refused.json()

    listed = admin(server, "GET", "/extendedquerytags")
    assert listed.status_code == 200
    assert [tag["path"] for tag in listed.json()] == ["00091001", "00091002"]
    tag = admin(server, "GET", f"/extendedquerytags/{P_LO}").json()
    assert tag == {
        "path": P_LO,
        "vr": "LO",
        "privateCreator": CREATOR,
        "level": "Study",
        "status": "Adding",
        "queryStatus": "Enabled",
        "operation": reference,
    }
    # member names in any case, as the seed service's guide writes them
    capitalised = [{"Path": "ManufacturerModelName", "Level": "Series"}]
    assert admin(server, "POST", "/extendedquerytags", json=capitalised).status_code == 202
    assert admin(server, "GET", "/extendedquerytags/00091099").status_code == 404
    assert admin(server, "GET", "/extendedquerytags/ManufacturerModelName").json()["vr"] == "LO"

    operation = admin(server, "GET", f"/operations/{reference['id']}")
    assert operation.status_code == 202
    body = operation.json()
    assert body["operationId"] == reference["id"]
    assert body["type"] == "Reindex"
    assert body["status"] == "NotStarted"
    assert body["percentComplete"] == 0
    assert body["resources"] == [
        f"{server.root}/extendedquerytags/{P_LO}",
        f"{server.root}/extendedquerytags/{P_DA}",
    ]
    assert admin(server, "GET", "/operations/no-such-operation").status_code == 404

    patched = admin(server, "PATCH", f"/extendedquerytags/{P_DA}", json={"QueryStatus": "Disabled"})
    assert patched.status_code == 200
    assert patched.json()["queryStatus"] == "Disabled"
    bad_patch = admin(server, "PATCH", f"/extendedquerytags/{P_DA}", json={"queryStatus": "Off"})
    assert bad_patch.status_code == 400

    assert admin(server, "DELETE", f"/extendedquerytags/{P_DA}").status_code == 204
    assert admin(server, "GET", f"/extendedquerytags/{P_DA}").status_code == 404
    assert admin(server, "DELETE", f"/extendedquerytags/{P_DA}").status_code == 404


# --------------------------------------------------------------------------
# re-index, matching, errors, deletion


def test_reindex_resumes_from_its_cursor_then_queries_match(server: LiveServer) -> None:
    study_a, study_b, study_c = generate_uid(), generate_uid(), generate_uid()
    series_a = generate_uid()
    uid_a, uid_b = generate_uid(), generate_uid()
    before = [
        instance(
            study_a,
            series=series_a,
            lo="Alpha Site",
            da="20240105",
            ui=uid_a,
            sl=-7,
            ds_value="1.5",
            pn="Smith^Anna",
            model="Scanner X1",
            acquired="20240105101500",
        ),
        instance(
            study_b,
            lo="Beta Site",
            da="20240220",
            ui=uid_b,
            sl=42,
            ds_value="2.25",
            pn="Jones^Bob",
            model="Scanner Y2",
            acquired="20240220235959.5",
        ),
        # stored with implicit VR: the private values arrive without their VR
        instance(study_c, lo="Gamma", da="20231231", sl=9, syntax=ImplicitVRLittleEndian),
    ]
    for ds in before:
        store(server, ds)

    added = admin(server, "POST", "/extendedquerytags", json=TAGS)
    assert added.status_code == 202, added.text
    operation_id = added.json()["id"]

    # while it is Adding, the tag cannot be queried
    refused = qido(server, "/studies", **{P_LO: "Alpha Site"})
    assert refused.status_code == 400
    assert "not queryable" in refused.json()["error"]

    # one worker does one batch of one instance and dies (its lease not
    # released); another cannot take it over before the lease runs out
    first = reindexer(server, batch=1, lease=dt.timedelta(seconds=1), holder="node-1")
    assert server.services.index.claim(f"reindex:{operation_id}", "node-1", first.lease)
    assert first.run(operation_id, max_batches=1) == "Running"
    progress = admin(server, "GET", f"/operations/{operation_id}")
    assert progress.status_code == 202
    assert progress.json()["status"] == "Running"
    assert 0 < progress.json()["percentComplete"] < 100

    second = reindexer(server, batch=1, holder="node-2", settle_seconds=0)
    assert second.run_pending() == 0  # node-1's lease still runs
    time.sleep(1.2)
    assert second.run_pending() == 1
    done = admin(server, "GET", f"/operations/{operation_id}")
    assert done.status_code == 200
    assert done.json()["status"] == "Completed"
    assert done.json()["percentComplete"] == 100
    tag = admin(server, "GET", f"/extendedquerytags/{P_LO}").json()
    assert tag["status"] == "Ready"
    assert "operation" not in tag
    assert "errors" not in tag  # none
    # each instance was read once: the cursor went on from node-1's batch
    with server.services.engine.connect() as conn:
        from sqlalchemy import select

        from appliance.index.schema import eqt_operation

        row = conn.execute(
            select(eqt_operation.c.done).where(eqt_operation.c.id == operation_id)
        ).one()
    assert row.done == 3

    # STOW-RS after the tag is Ready: indexed at ingest
    study_d = generate_uid()
    store(server, instance(study_d, lo="Alpha Annex", da="20240301", sl=42, pn="smith^anna"))

    # Single Value Matching (PS3.4 C.2.2.2.1), by tag or by keyword
    assert uids(qido(server, "/studies", **{P_LO: "Alpha Site"}), "0020000D") == {study_a}
    assert uids(qido(server, "/studies", **{P_LO: "Gamma"}), "0020000D") == {study_c}
    assert uids(qido(server, "/series", ManufacturerModelName="Scanner Y2"), "0020000D") == {
        study_b
    }
    # Wild Card Matching (C.2.2.2.4)
    assert uids(qido(server, "/studies", **{P_LO: "Alpha*"}), "0020000D") == {study_a, study_d}
    assert uids(qido(server, "/studies", **{P_LO: "?eta Site"}), "0020000D") == {study_b}
    # PN: case-insensitive, as the standard PN keys
    assert uids(qido(server, "/studies", **{P_PN: "SMITH^ANNA"}), "0020000D") == {
        study_a,
        study_d,
    }
    # Range Matching of DA (C.2.2.2.5), series level
    assert uids(qido(server, "/series", **{P_DA: "20240101-20240229"}), "0020000D") == {
        study_a,
        study_b,
    }
    assert uids(qido(server, "/series", **{P_DA: "-20231231"}), "0020000D") == {study_c}
    # DT range, instance level
    assert uids(
        qido(server, "/instances", AcquisitionDateTime="20240220-20240221"), "0020000D"
    ) == {study_b}
    # List of UID Matching (C.2.2.2.2)
    assert uids(qido(server, "/instances", **{P_UI: f"{uid_a},{uid_b}"}), "0020000D") == {
        study_a,
        study_b,
    }
    # numbers: SL (from an implicit VR instance too) and DS
    assert uids(qido(server, "/instances", **{P_SL: "42"}), "0020000D") == {study_b, study_d}
    assert uids(qido(server, "/instances", **{P_SL: "9"}), "0020000D") == {study_c}
    assert uids(qido(server, "/instances", **{P_DS: "2.25"}), "0020000D") == {study_b}

    # the value of a tag used as a key is returned; includefield adds others
    found = qido(server, "/studies", **{P_LO: "Beta Site", "includefield": P_PN}).json()
    assert found[0][P_LO] == {"vr": "LO", "Value": ["Beta Site"]}
    assert found[0][P_PN] == {"vr": "PN", "Value": [{"Alphabetic": "Jones^Bob"}]}

    # a tag below the query level, and malformed values, are refused
    assert qido(server, "/studies", **{P_UI: uid_a}).status_code == 400
    assert qido(server, "/series", **{P_DA: "2024*"}).status_code == 400
    assert qido(server, "/instances", **{P_SL: "forty"}).status_code == 400

    # an invalid value is stored, counted and listed, never refused
    study_e = generate_uid()
    bad = instance(study_e, lo="Epsilon", da="20240230")  # no 30 February
    store(server, bad)
    tag = admin(server, "GET", f"/extendedquerytags/{P_DA}").json()
    assert tag["errors"]["count"] == 1
    errors = admin(server, "GET", f"/extendedquerytags/{P_DA}/errors").json()
    assert [(e["studyInstanceUid"], e["sopInstanceUid"]) for e in errors] == [
        (study_e, str(bad.SOPInstanceUID))
    ]
    assert "DA" in errors[0]["errorMessage"]
    assert "20240230" not in errors[0]["errorMessage"]
    assert uids(qido(server, "/studies", **{P_LO: "Epsilon"}), "0020000D") == {study_e}
    flagged = qido(server, "/series", **{P_DA: "20240101-"})
    assert flagged.status_code == 200
    assert flagged.headers["erroneous-dicom-attributes"] == P_DA

    # deleted: queries on it refused, its values gone
    assert admin(server, "DELETE", f"/extendedquerytags/{P_LO}").status_code == 204
    gone = qido(server, "/studies", **{P_LO: "Alpha Site"})
    assert gone.status_code == 400
    assert qido(server, "/studies", ManufacturerModelName="Scanner X1").status_code == 400
    with server.services.engine.connect() as conn:
        from appliance.index.schema import eqt_string

        left = conn.execute(select(eqt_string.c.value).where(eqt_string.c.value == "Gamma"))
        assert left.all() == []


def test_reindex_errors_disable_queries_until_enabled(server: LiveServer) -> None:
    store(server, instance(generate_uid(), da="2024-01-05"))  # not a DA
    good_study = generate_uid()
    store(server, instance(good_study, da="20240105"))
    added = admin(server, "POST", "/extendedquerytags", json=[TAGS[1]])
    assert reindexer(server, settle_seconds=0).run_pending() == 1
    assert admin(server, "GET", f"/operations/{added.json()['id']}").status_code == 200
    tag = admin(server, "GET", f"/extendedquerytags/{P_DA}").json()
    assert (tag["status"], tag["queryStatus"], tag["errors"]["count"]) == ("Ready", "Disabled", 1)
    assert qido(server, "/series", **{P_DA: "20240105"}).status_code == 400
    admin(server, "PATCH", f"/extendedquerytags/{P_DA}", json={"queryStatus": "Enabled"})
    enabled = qido(server, "/series", **{P_DA: "20240105"})
    assert uids(enabled, "0020000D") == {good_study}
    assert enabled.headers["erroneous-dicom-attributes"] == P_DA


def test_rebuilding_the_index_from_the_store_keeps_the_tags_values(
    server: LiveServer,
) -> None:
    """``dicom-appliance reindex --force``: a blob the index lacks is indexed
    with its extended query tags' values, as at ingest."""
    from appliance.integrity import reindex

    added = admin(server, "POST", "/extendedquerytags", json=[TAGS[0]])
    assert added.status_code == 202
    assert reindexer(server, settle_seconds=0).run_pending() == 1
    study = generate_uid()
    blob = server.services.storage.put(io.BytesIO(part10_of(instance(study, lo="Zeta"))))
    report = reindex(server.services, force=True)
    assert report.indexed == 1, report.as_json()
    assert server.services.index.blob_keys([blob.key]) == {blob.key}
    assert uids(qido(server, "/studies", **{P_LO: "Zeta"}), "0020000D") == {study}


def test_deleting_an_instance_deletes_its_values(server: LiveServer) -> None:
    added = admin(server, "POST", "/extendedquerytags", json=[TAGS[0], TAGS[1]])
    assert added.status_code == 202
    assert reindexer(server, settle_seconds=0).run_pending() == 1
    study = generate_uid()
    store(server, instance(study, lo="Eta", da="2024"))  # the DA is an error
    assert admin(server, "GET", f"/extendedquerytags/{P_DA}").json()["errors"]["count"] == 1
    assert httpx.delete(f"{server.root}/studies/{study}").status_code == 204
    from sqlalchemy import func, select

    from appliance.index.schema import eqt_error, eqt_string

    with server.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(eqt_string)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(eqt_error)).scalar() == 0
    assert admin(server, "GET", f"/extendedquerytags/{P_DA}/errors").json() == []
    assert "errors" not in admin(server, "GET", f"/extendedquerytags/{P_DA}").json()


def test_migration_0012_goes_down_and_up(tmp_path: Path) -> None:
    """SQLite (PostgreSQL: test_migrations' down-and-up test)."""
    from sqlalchemy import inspect

    from appliance.index import migrate

    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        migrate.upgrade(engine)
        migrate.downgrade(engine, "0011")
        names = set(inspect(engine).get_table_names())
        assert not names & {"extended_query_tag", "eqt_string", "eqt_operation", "eqt_error"}
        migrate.upgrade(engine)
        assert "eqt_datetime" in inspect(engine).get_table_names()
        assert migrate.stored_revision(engine) == migrate.SCHEMA_REVISION
    finally:
        engine.dispose()


# --------------------------------------------------------------------------
# DIMSE: C-STORE by dcmtk's storescu, C-FIND by findscu and pynetdicom


def test_cstore_values_are_found_by_qido_and_cfind(tmp_path: Path) -> None:
    storescu, findscu = dcmtk("storescu"), dcmtk("findscu")
    for app in started_appliance(appliance_config(tmp_path)):
        added = admin(app, "POST", "/extendedquerytags", json=[TAGS[0], TAGS[6]])
        assert added.status_code == 202
        assert reindexer(app, settle_seconds=0).run_pending() == 1

        study = generate_uid()
        path = tmp_path / "one.dcm"
        instance(study, lo="Delta Ward", model="Scanner Z9").save_as(path, enforce_file_format=True)
        sent = subprocess.run(
            [storescu, "-aec", app.ae_title, app.dimse_host, str(app.dimse_port), str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert uids(qido(app, "/studies", **{P_LO: "Delta*"}), "0020000D") == {study}

        # findscu: the standard keyword of an extended tag, wild card
        out = tmp_path / "findscu"
        out.mkdir()
        found = subprocess.run(
            [
                findscu,
                "-S",
                "-aec",
                app.ae_title,
                "-X",
                "-od",
                str(out),
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={study}",
                "-k",
                "SeriesInstanceUID",
                "-k",
                "ManufacturerModelName=Scanner Z*",
                app.dimse_host,
                str(app.dimse_port),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert found.returncode == 0, found.stderr
        responses = [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
        assert [str(r.ManufacturerModelName) for r in responses] == ["Scanner Z9"]
        assert str(responses[0].StudyInstanceUID) == study

        # pynetdicom: the private tag with its creator, and a refused tag
        ae = AE(ae_title="EQT-SCU")
        ae.add_requested_context(STUDY_ROOT_FIND)
        assoc = ae.associate(app.dimse_host, app.dimse_port, ae_title=app.ae_title)
        assert assoc.is_established
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            block = query.private_block(0x0009, CREATOR, create=True)
            block.add_new(0x01, "LO", "Delta Ward")
            answers = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
            matches = [ident for status, ident in answers if status.Status in (0xFF00, 0xFF01)]
            assert [str(m.StudyInstanceUID) for m in matches] == [study]
            assert answers[-1][0].Status == 0x0000

            # a tag that cannot be queried now: "unable to process" (PS3.4
            # C.4.1.1.4, 0xC000) with the reason in Error Comment
            patch = {"queryStatus": "Disabled"}
            admin(app, "PATCH", f"/extendedquerytags/{P_LO}", json=patch)
            refused = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
            assert [status.Status for status, _ in refused] == [0xC000]
            assert "not queryable" in str(refused[0][0].ErrorComment)

            # deleted: no longer a key of this server, so, as any private
            # key it does not support, not used for matching and reported by
            # 0xFF01 (PS3.4 C.4.1.1.4); QIDO-RS refuses it (400)
            admin(app, "DELETE", f"/extendedquerytags/{P_LO}")
            ignored = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
            assert {status.Status for status, _ in ignored[:-1]} == {0xFF01}
            assert ignored[-1][0].Status == 0x0000
            assert qido(app, "/studies", **{P_LO: "Delta Ward"}).status_code == 400
        finally:
            assoc.release()


# --------------------------------------------------------------------------
# a restart in the middle of a re-index: `serve` finishes it


@pytest.mark.slow
def test_serve_finishes_a_reindex_another_process_left_in_the_middle(tmp_path: Path) -> None:
    """A process re-indexes two of five instances and dies holding the
    operation (its short lease not released); ``serve`` is started, its DIMSE
    worker 1 claims the operation once the lease has run out and finishes it
    from the cursor."""
    from appliance.config import load_config
    from appliance.services import build_services
    from tests.integration.test_serve import migrated_site, running

    site = migrated_site(tmp_path / "site")
    config = load_config(environ=site.env, cwd=site.workdir)
    services = build_services(config)
    studies = [generate_uid() for _ in range(5)]
    try:
        for number, study in enumerate(studies):
            ds = instance(study, lo=f"Theta {number}")
            assert services.ingest.store_part10(io.BytesIO(part10_of(ds)), ORIGIN).stored
        operation_id = services.extended.add([TAGS[0]])
        dying = Reindexer(
            services.engine,
            services.index,
            services.storage,
            services.extended,
            batch=1,
            lease=dt.timedelta(seconds=2),
            holder="dying-node",
        )
        assert services.index.claim(f"reindex:{operation_id}", "dying-node", dying.lease)
        assert dying.run(operation_id, max_batches=2) == "Running"
    finally:
        services.close()

    with running(site) as app:
        url = f"{app.base_url}/v1/operations/{operation_id}"
        deadline = time.monotonic() + 60
        while (answer := httpx.get(url, timeout=10)).status_code == 202:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.5)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "Completed"
        found = httpx.get(
            f"{app.base_url}/v1/studies",
            params={P_LO: "Theta*"},
            headers={"Accept": "application/dicom+json"},
            timeout=10,
        )
        assert uids(found, "0020000D") == set(studies)
        assert "re-index" in app.log
        assert "completed" in app.log

    engine = create_index_engine(config.index.url)
    try:
        with engine.connect() as conn:
            from sqlalchemy import select

            from appliance.index.schema import eqt_operation

            done = conn.execute(
                select(eqt_operation.c.done).where(eqt_operation.c.id == operation_id)
            ).scalar_one()
        assert done == 5  # 2 by the dying process, 3 from its cursor on
    finally:
        engine.dispose()


# --------------------------------------------------------------------------
# PostgreSQL: the extended tags' searches go through indexes


@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
def test_postgresql_serves_extended_tag_searches_through_indexes(
    index_url: str, tmp_path: Path
) -> None:
    from sqlalchemy import event

    from appliance.config import load_config
    from appliance.model import Level
    from appliance.query import Query
    from appliance.services import build_services
    from tests.integration.test_pg_query_plans import _plan, _whole_table_reads

    config = load_config(
        environ={
            "APPLIANCE_STORAGE_PATH": str(tmp_path / "blobs"),
            "APPLIANCE_INDEX_URL": index_url,
        },
        cwd=tmp_path,
    )
    services = build_services(config)
    try:
        uid = generate_uid()
        for number in range(20):
            ds = instance(
                generate_uid(),
                lo=f"Site {number}",
                da=f"202401{number + 1:02d}",
                ui=uid if number == 0 else generate_uid(),
                sl=number,
            )
            assert services.ingest.store_part10(io.BytesIO(part10_of(ds)), ORIGIN).stored
        services.extended.add(TAGS[:4])
        reindex_with = Reindexer(
            services.engine,
            services.index,
            services.storage,
            services.extended,
            settle_seconds=0,
        )
        assert reindex_with.run_pending() == 1

        def no_seqscan(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET enable_seqscan = off")

        engine = services.engine
        # the plans are explained on an engine of their own, whose sessions
        # have no sequential scans (as test_pg_query_plans)
        explaining = create_index_engine(index_url)
        event.listen(explaining, "connect", no_seqscan)
        access_paths = {
            "studies by a private LO prefix": Query(Level.STUDY, {P_LO: "Site 1*"}),
            "studies by a private LO": Query(Level.STUDY, {P_LO: "Site 7"}),
            "series by a private DA range": Query(Level.SERIES, {P_DA: "20240101-20240105"}),
            "instances by a private UI": Query(Level.IMAGE, {P_UI: uid}),
            "instances by a private SL": Query(Level.IMAGE, {P_SL: "3"}),
        }
        for name, query in access_paths.items():
            seen: list[tuple[str, Any]] = []

            def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
                if statement.lstrip().upper().startswith("SELECT"):
                    seen.append((statement, parameters))  # noqa: B023

            event.listen(engine, "before_cursor_execute", capture)
            try:
                result = services.query.search(query)
            finally:
                event.remove(engine, "before_cursor_execute", capture)
            assert result.matches, name
            ours = [(sql, given) for sql, given in seen if "eqt_" in sql]
            assert ours, name
            for statement, parameters in ours:
                if "eqt_error" in statement:
                    continue  # the list of tags and their errors, read every 2 s
                plan = _plan(explaining, statement, parameters)
                assert not _whole_table_reads(plan), f"{name}:\n{statement}\n{plan}"
        explaining.dispose()
    finally:
        services.close()


def test_ingest_writes_an_adding_tags_values_and_the_reindex_does_not_repeat_them(
    server: LiveServer,
) -> None:
    from sqlalchemy import func, select

    from appliance.index.schema import eqt_string

    def rows() -> int:
        with server.services.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(eqt_string)).scalar_one())

    before = generate_uid()
    store(server, instance(before, lo="Iota"))
    added = admin(server, "POST", "/extendedquerytags", json=[TAGS[0]])
    assert added.status_code == 202
    during = generate_uid()
    store(server, instance(during, lo="Iota"))  # the tag is Adding
    assert rows() == 1  # written by the ingest, in the instance's transaction
    assert reindexer(server, settle_seconds=0).run_pending() == 1
    assert rows() == 2  # the re-index wrote the first, and the second once
    assert uids(qido(server, "/studies", **{P_LO: "Iota"}), "0020000D") == {before, during}
