"""DELETE, CORS and hostile request paths against a live server."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import store

pytestmark = pytest.mark.integration


def test_delete_instance_series_study(live_server: LiveServer) -> None:
    st, se1, se2 = generate_uid(), generate_uid(), generate_uid()
    i1 = store(live_server, st, se1)
    store(live_server, st, se1)
    store(live_server, st, se2)
    root = live_server.root
    r = httpx.delete(f"{root}/studies/{st}/series/{se1}/instances/{i1}")
    assert r.status_code == 204
    assert httpx.delete(f"{root}/studies/{st}/series/{se1}/instances/{i1}").status_code == 404
    assert httpx.delete(f"{root}/studies/{st}/series/{se1}").status_code == 204
    assert len(live_server.services.retrieve.instances(st)) == 1
    assert httpx.delete(f"{root}/studies/{st}").status_code == 204
    r = httpx.delete(f"{root}/studies/{st}")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text
    actions = [e.action for e in live_server.services.index.changes(0, 100)]
    assert actions == ["create"] * 3 + ["delete"] * 3


@pytest.mark.parametrize(
    "path",
    [
        "/v1/studies/..%2F..%2Fetc",
        "/v1/studies/1.2.3%00",
        "/v1/studies/1.2.3%2f4",
        "/v1/studies/%2e%2e",
        "/v1/studies/..",
        "/v1/studies/1." + "1" * 70,
        "/v1/studies/abc",
    ],
)
def test_hostile_uids_in_paths_are_400(live_server: LiveServer, path: str) -> None:
    # http.client sends the path exactly as written (httpx resolves "..")
    host, port = live_server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("DELETE", path)
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 400, (path, response.status, body)
    assert "Traceback" not in body
    assert httpx.get(f"{live_server.base_url}/health/live").status_code == 200


@pytest.fixture
def cors_server(tmp_path: Path) -> Iterator[LiveServer]:
    yield from started_server(
        make_config(tmp_path, APPLIANCE_HTTP_CORS_ALLOWED_ORIGINS="https://viewer.example:8443")
    )


def test_cors_for_an_allowed_origin(cors_server: LiveServer) -> None:
    url = f"{cors_server.base_url}/health/live"
    r = httpx.get(url, headers={"Origin": "https://viewer.example:8443"})
    assert r.headers["access-control-allow-origin"] == "https://viewer.example:8443"
    assert "Origin" in r.headers["vary"]
    assert "ETag" in r.headers["access-control-expose-headers"]
    preflight = httpx.request(
        "OPTIONS",
        f"{cors_server.root}/studies/1.2.3",
        headers={
            "Origin": "https://viewer.example:8443",
            "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "authorization, accept",
        },
    )
    assert preflight.status_code == 204
    assert "DELETE" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, accept"


def test_no_cors_headers_for_other_origins(
    cors_server: LiveServer, live_server: LiveServer
) -> None:
    r = httpx.get(f"{cors_server.base_url}/health/live", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    # none configured (the default): none sent
    r = httpx.get(
        f"{live_server.base_url}/health/live", headers={"Origin": "https://viewer.example:8443"}
    )
    assert "access-control-allow-origin" not in r.headers


def test_public_url_is_written_into_retrieve_urls(tmp_path: Path) -> None:
    config = make_config(tmp_path, APPLIANCE_HTTP_PUBLIC_URL="https://pacs.example/dicom")
    for server in started_server(config):
        study = generate_uid()
        store(server, study, generate_uid())
        (match,) = httpx.get(f"{server.root}/studies").json()
        assert match["00081190"]["Value"] == [f"https://pacs.example/dicom/v1/studies/{study}"]
