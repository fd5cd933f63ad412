"""The senders against a second dicom-appliance as the upstream (real
DICOMweb: duplicates, conflicting content, deletions, the admin endpoints)
and against a *scripted* HTTP server for what no real peer shows on demand:
a 503 storm with Retry-After, an upstream that never answers, refused
credentials and the three ways of authenticating.  Each sender runs in this
process, one batch at a time (``Forwarder.send_once``)."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import http.server
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from appliance.config import ForwardConfig
from appliance.forward.outbox import Outbox
from appliance.forward.worker import Forwarder
from appliance.model import Origin
from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import data_set_of, multipart, part10_of, small_study, stow

pytestmark = pytest.mark.integration

RETRIEVE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def env_for(**destination: object) -> dict[str, str]:
    inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in destination.items())
    return {"APPLIANCE_FORWARD": f"[{{{inline}}}]"}


@dataclasses.dataclass
class Local:
    server: LiveServer
    forwarder: Forwarder
    outbox: Outbox

    @property
    def destination(self) -> ForwardConfig:
        return self.server.config.forward[0]

    def store(self, ds: Dataset) -> None:
        result = self.server.services.ingest.store_part10(
            io.BytesIO(part10_of(ds)), Origin("dicomweb")
        )
        assert result.stored, result

    def drain(self, limit: int = 50) -> None:
        """Send batches until none is due."""
        for _ in range(limit):
            if not self.forwarder.send_once(self.destination):
                return
        raise AssertionError("the outbox did not drain")

    def status(self) -> dict[str, Any]:
        response = httpx.get(f"{self.server.base_url}/v1/admin/forward", timeout=10)
        assert response.status_code == 200
        (only,) = response.json()["destinations"]
        return dict(only)


@contextlib.contextmanager
def local_site(tmp_path: Path, **destination: object) -> Iterator[Local]:
    """This appliance, in process, forwarding to *destination* (timeouts
    short: 2 s per request, retries at most 1 s apart)."""
    settings = {"name": "up", "timeout": 2, "retry_max_seconds": 1, **destination}
    config = make_config(tmp_path / "local", **env_for(**settings))
    for server in started_server(config):
        outbox = Outbox(server.services.engine)
        forwarder = Forwarder(
            config.forward, outbox, server.services.index, server.services.retrieve
        )
        try:
            yield Local(server, forwarder, outbox)
        finally:
            forwarder.close()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveServer]:
    """A second dicom-appliance: the upstream DICOMweb service."""
    yield from started_server(make_config(tmp_path / "upstream"))


def instance_url(root: str, ds: Dataset) -> str:
    return (
        f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def upstream_data_set(upstream: LiveServer, ds: Dataset) -> bytes | None:
    response = httpx.get(instance_url(upstream.root, ds), headers={"Accept": RETRIEVE})
    if response.status_code == 404:
        return None
    assert response.status_code == 200
    ((_, content),) = multipart(response)
    return data_set_of(content)


def test_another_appliance_gets_each_instance_and_duplicates_are_checked(
    tmp_path: Path, upstream: LiveServer
) -> None:
    """A new instance is delivered; one the upstream already holds with the
    same content (it answers 45070, keeping its copy) counts as delivered
    after the content check; one it holds with other content is parked with
    that reason, visible in the admin endpoint, and delivered once the
    conflict is cleared upstream and the entry re-queued."""
    new, same, other = small_study(3)
    clash = copy.deepcopy(other)
    clash.PatientName = "Someone^Else"
    assert stow(upstream.base_url, part10_of(same)).status_code == 200
    assert stow(upstream.base_url, part10_of(clash)).status_code == 200

    with local_site(tmp_path, url=upstream.root) as local:
        for ds in (new, same, other):
            local.store(ds)
        local.drain()
        found = local.status()
        assert (found["delivered"], found["parked"], found["queued"]) == (2, 1, 0)
        assert "other content" in found["last_error"]
        assert upstream_data_set(upstream, new) == data_set_of(part10_of(new))
        assert upstream_data_set(upstream, same) == data_set_of(part10_of(same))

        # cleared upstream, re-queued here: delivered
        assert httpx.delete(instance_url(upstream.root, other)).status_code in (200, 202, 204)
        retried = httpx.post(f"{local.server.base_url}/v1/admin/forward/up/retry")
        assert retried.json() == {"destination": "up", "requeued": 1}
        assert (
            httpx.post(f"{local.server.base_url}/v1/admin/forward/nobody/retry").status_code == 404
        )
        local.drain()
        found = local.status()
        assert (found["delivered"], found["parked"]) == (3, 0)
        assert upstream_data_set(upstream, other) == data_set_of(part10_of(other))


def test_deletions_follow_and_an_instance_deleted_before_sending_is_not_sent(
    tmp_path: Path, upstream: LiveServer
) -> None:
    kept, gone = small_study(2)
    with local_site(tmp_path, url=upstream.root) as local:
        local.store(kept)
        local.drain()
        assert upstream_data_set(upstream, kept) is not None
        local.store(gone)
        # deleted here before its entry was sent: superseded, never sent
        local.server.services.delete.delete(
            gone.StudyInstanceUID, gone.SeriesInstanceUID, gone.SOPInstanceUID
        )
        local.server.services.delete.delete(kept.StudyInstanceUID)
        local.drain()
        found = local.status()
        assert (found["superseded"], found["parked"], found["queued"]) == (1, 0, 0)
        assert found["delivered"] == 3  # kept's store and delete, gone's delete (404: not there)
        assert upstream_data_set(upstream, kept) is None
        assert upstream_data_set(upstream, gone) is None


# ---------------------------------------------------------------------------
# a scripted HTTP server (not a real peer): faults on demand


@dataclasses.dataclass
class Scripted:
    """A scripted upstream on loopback: each request is answered by the
    next function of *script* (the last one repeats), and recorded."""

    port: int
    requests: list[tuple[str, str, dict[str, str], bytes]]
    server: http.server.ThreadingHTTPServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"


Answer = tuple[int, dict[str, str], bytes]
Reply = Callable[[str, dict[str, str], bytes], Answer]


@contextlib.contextmanager
def scripted(*script: Reply) -> Iterator[Scripted]:
    requests: list[tuple[str, str, dict[str, str], bytes]] = []
    replies = list(script)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            requests.append((self.command, self.path, headers, body))
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
            status, out_headers, out = reply(self.path, headers, body)
            self.send_response(status)
            for name, value in {**out_headers, "Content-Length": str(len(out))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_DELETE = handle_one

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Scripted(server.server_address[1], requests, server)
    finally:
        server.shutdown()
        server.server_close()


def busy(retry_after: str) -> Reply:
    return lambda _path, _headers, _body: (503, {"Retry-After": retry_after}, b"busy")


def stored(_path: str, _headers: dict[str, str], _body: bytes) -> Answer:
    return 200, {}, b""


def test_a_503_storm_is_waited_out_honouring_retry_after(tmp_path: Path) -> None:
    """Scripted upstream: 503 with Retry-After: 1 twice, then 200.  The entry
    is not due again before the second has passed, is tried three times in
    all, and is delivered; the request carries every instance of the batch
    in one multipart/related body."""
    with scripted(busy("1"), busy("1"), stored) as up, local_site(tmp_path, url=up.url) as local:
        instances = small_study(3)
        for ds in instances:
            local.store(ds)
        assert local.forwarder.send_once(local.destination)
        assert not local.forwarder.send_once(local.destination)  # waits for Retry-After
        time.sleep(1.1)
        assert local.forwarder.send_once(local.destination)
        time.sleep(1.1)
        local.drain()
        found = local.status()
        assert (found["delivered"], found["queued"]) == (3, 0)
        assert len(up.requests) == 3
        method, path, headers, body = up.requests[-1]
        assert (method, path) == ("POST", "/dicomweb/studies")
        assert headers["content-type"].startswith('multipart/related; type="application/dicom"')
        for ds in instances:
            assert part10_of(ds) in body


def test_an_upstream_that_never_answers_times_out_and_is_tried_again(tmp_path: Path) -> None:
    def hang(_path: str, _headers: dict[str, str], _body: bytes) -> Answer:
        time.sleep(5)
        return 200, {}, b""

    with scripted(hang) as up, local_site(tmp_path, url=up.url, timeout=1) as local:
        local.store(small_study(1)[0])
        started = time.monotonic()
        assert local.forwarder.send_once(local.destination)
        assert time.monotonic() - started < 4
        found = local.status()
        assert (found["queued"], found["delivered"]) == (1, 0)
        assert "did not answer in time" in found["last_error"]


def test_bearer_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")

    def check(_path: str, headers: dict[str, str], _body: bytes) -> Answer:
        ok = headers.get("authorization") == "Bearer second-token"
        return (200 if ok else 401), {}, b""

    with (
        scripted(check) as up,
        local_site(tmp_path, url=up.url, auth="bearer", token_file=str(token)) as local,
    ):
        local.store(small_study(1)[0])
        local.forwarder.send_once(local.destination)
        found = local.status()
        assert found["queued"] == 1
        assert "credentials refused" in found["last_error"]
        time.sleep(0.05)  # a new modification time
        token.write_text("second-token\n")
        time.sleep(1.1)
        local.drain()
        assert local.status()["delivered"] == 1
        assert [h["authorization"] for _, _, h, _ in up.requests] == [
            "Bearer first-token",
            "Bearer second-token",
        ]


def test_basic_and_oauth2_client_credentials(tmp_path: Path) -> None:
    """Basic: the header of RFC 7617.  OAuth 2.0 client credentials (RFC
    6749 4.4): a token from the token endpoint, used until the upstream
    refuses it (401), then fetched again."""
    tokens = iter(["token-1", "token-2"])

    def token_endpoint(path: str, headers: dict[str, str], body: bytes) -> Answer:
        if path == "/token":
            assert b"grant_type=client_credentials" in body
            assert b"client_id=appliance" in body
            grant = {"access_token": next(tokens), "expires_in": 3600, "token_type": "Bearer"}
            return 200, {"Content-Type": "application/json"}, json.dumps(grant).encode()
        ok = headers.get("authorization") == "Bearer token-2"
        return (200 if ok else 401), {}, b""

    with scripted(token_endpoint) as up:
        with local_site(
            tmp_path / "oauth",
            url=up.url,
            auth="oauth2",
            token_url=f"http://127.0.0.1:{up.port}/token",
            client_id="appliance",
            client_secret="s3cret",
        ) as local:
            local.store(small_study(1)[0])
            local.forwarder.send_once(local.destination)
            time.sleep(1.1)
            local.drain()
            assert local.status()["delivered"] == 1
        paths = [path for _, path, _, _ in up.requests]
        assert paths == ["/token", "/dicomweb/studies", "/token", "/dicomweb/studies"]

    with (
        scripted(stored) as up,
        local_site(
            tmp_path / "basic", url=up.url, auth="basic", username="edge", password="pa:ss"
        ) as local,
    ):
        local.store(small_study(1)[0])
        local.drain()
        expected = "Basic " + base64.b64encode(b"edge:pa:ss").decode()
        assert up.requests[0][2]["authorization"] == expected
