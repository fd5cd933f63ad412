"""The change feed over HTTP, shaped as Microsoft's DICOM server's."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.conftest import LiveServer
from tests.helpers import store

pytestmark = pytest.mark.integration


def feed(server: LiveServer, **params: str) -> httpx.Response:
    return httpx.get(f"{server.root}/changefeed", params=params)


def test_empty_feed(live_server: LiveServer) -> None:
    r = feed(live_server)
    assert r.status_code == 200
    assert r.json() == []
    assert httpx.get(f"{live_server.root}/changefeed/latest").status_code == 204


def test_entries_paging_and_metadata(live_server: LiveServer) -> None:
    study, series = generate_uid(), generate_uid()
    uids = [store(live_server, study, series, PatientName="Doe^Jane") for _ in range(12)]
    r = feed(live_server)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    entries = r.json()
    assert len(entries) == 10  # the default limit
    first = entries[0]
    assert set(first) == {
        "Sequence",
        "StudyInstanceUid",
        "SeriesInstanceUid",
        "SopInstanceUid",
        "Action",
        "Timestamp",
        "State",
        "Metadata",
    }
    assert first["SopInstanceUid"] == uids[0]
    assert (first["Action"], first["State"]) == ("create", "current")
    assert first["Timestamp"].endswith("Z")
    dt.datetime.fromisoformat(first["Timestamp"].replace("Z", "+00:00"))
    # Metadata is the instance's DICOM JSON (PS3.18 Annex F), as WADO-RS gives it
    wado = httpx.get(
        f"{live_server.root}/studies/{study}/series/{series}/instances/{uids[0]}/metadata"
    ).json()[0]
    assert first["Metadata"] == wado
    assert first["Metadata"]["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    # offset is exclusive: entries with a greater sequence
    sequences = [e["Sequence"] for e in entries]
    after = feed(live_server, offset=str(sequences[4]), limit="3").json()
    assert [e["Sequence"] for e in after] == sequences[5:8]
    rest = feed(live_server, offset=str(sequences[-1])).json()
    assert [e["SopInstanceUid"] for e in rest] == uids[10:]
    # includemetadata=false, and the seed clients' spelling
    lean = feed(live_server, includeMetadata="false", limit="100").json()
    assert len(lean) == 12
    assert "Metadata" not in lean[0]


def test_deleted_instances_and_latest(live_server: LiveServer) -> None:
    study, series = generate_uid(), generate_uid()
    a = store(live_server, study, series)
    b = store(live_server, study, series)
    assert (
        httpx.delete(
            f"{live_server.root}/studies/{study}/series/{series}/instances/{a}"
        ).status_code
        == 204
    )
    entries = feed(live_server).json()
    assert [(e["SopInstanceUid"], e["Action"], e["State"]) for e in entries] == [
        (a, "create", "deleted"),
        (b, "create", "current"),
        (a, "delete", "deleted"),
    ]
    assert entries[0]["Metadata"] is None
    assert entries[2]["Metadata"] is None
    assert entries[1]["Metadata"]["00080018"]["Value"] == [b]
    latest = httpx.get(f"{live_server.root}/changefeed/latest").json()
    assert latest["Sequence"] == entries[-1]["Sequence"]
    assert latest["Action"] == "delete"
    lean = httpx.get(
        f"{live_server.root}/changefeed/latest", params={"includemetadata": "false"}
    ).json()
    assert "Metadata" not in lean


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"offset": "-1"},
        {"includemetadata": "yes"},
        {"colour": "blue"},
    ],
)
def test_bad_parameters_are_400(live_server: LiveServer, params: dict[str, str]) -> None:
    r = feed(live_server, **params)
    assert r.status_code == 400
    assert next(iter(params)) in r.json()["error"]
    assert "Traceback" not in r.text
    assert feed(live_server).status_code == 200
