"""Resource exhaustion over HTTP against ``dicom-appliance serve`` (gunicorn,
as in production): slowloris clients, a slow but steady upload, oversized
request lines and headers, many connections at once.  Each gets a bounded
answer and an ordinary request is served afterwards.

The appliance runs with one worker process of two threads, a header
deadline of 2 s and an idle timeout of 2 s, so that a handful of slow
clients would hold every thread if nothing bounded them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import part10_of, small_study
from tests.integration.test_serve import Appliance, migrated_site, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADER_TIMEOUT = 2
IDLE_TIMEOUT = 2
THREADS = 2


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    site = migrated_site(
        tmp_path_factory.mktemp("hostile-http"),
        {
            "APPLIANCE_HTTP_WORKERS": "1",
            "APPLIANCE_HTTP_THREADS": str(THREADS),
            "APPLIANCE_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
            "APPLIANCE_HTTP_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        },
    )
    with running(site) as running_appliance:
        yield running_appliance


def _raw(port: int, request: bytes) -> bytes:
    """Send *request* on a new connection; the response's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def _served(appliance: Appliance) -> None:
    response = httpx.get(f"{appliance.base_url}/health/live", timeout=30)
    assert response.status_code == 200


def test_slowloris_clients_are_cut_at_the_header_deadline(appliance: Appliance) -> None:
    """Three times as many clients as threads send their headers a byte a
    second: each is closed after http.header_timeout, and an ordinary
    request waiting behind them is served within a few deadlines."""
    port = appliance.site.http_port
    slow = []
    for _ in range(3 * THREADS):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        slow.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for sock in slow:
                with contextlib.suppress(OSError):  # closed by the server: expected
                    sock.send(b"X")
            time.sleep(1)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        _served(appliance)
        waited = time.monotonic() - started
        # the slow clients get at most 3 rounds of the deadline (+ the
        # poller's first 5 s wait for data, gunicorn's own)
        assert waited < 3 * HEADER_TIMEOUT + 10
        time.sleep(HEADER_TIMEOUT + 1.5)
        closed = 0
        for sock in slow:
            sock.settimeout(1)
            try:
                closed += sock.recv(100) == b""
            except OSError:
                closed += 1  # reset
        assert closed == len(slow)
    finally:
        stop.set()
        feeder.join(5)
        for sock in slow:
            sock.close()
    assert "did not send its request headers in time" in appliance.log
    _served(appliance)


def test_a_slow_but_steady_upload_is_not_cut(appliance: Appliance) -> None:
    """The deadline is on headers only: a STOW-RS body sent over several
    header deadlines (a slow link) is stored."""
    ds = small_study(1)[0]
    part = part10_of(ds)
    boundary = "slow-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{boundary}--\r\n".encode()
    )
    pieces = [body[i : i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]

    def slowly() -> Iterator[bytes]:
        for piece in pieces:
            time.sleep(0.6)  # ~5 s in all: more than two header deadlines
            yield piece

    started = time.monotonic()
    response = httpx.post(
        f"{appliance.base_url}/v1/studies",
        content=slowly(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
        timeout=60,
    )
    assert time.monotonic() - started > 2 * HEADER_TIMEOUT
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("name", "request_bytes", "status"),
    [
        (
            "10,000 query parameters",
            b"GET /v1/studies?"
            + b"&".join(b"PatientID%d=x" % i for i in range(10_000))
            + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"414",
        ),
        (
            "a 100 kB path",
            b"GET /v1/studies/" + b"1" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"414",
        ),
        (
            "a 100 kB header value",
            b"GET /v1/studies HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            b"431",
        ),
        (
            "1,000 header fields",
            b"GET /v1/studies HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: a\r\n" % i for i in range(1000))
            + b"\r\n",
            b"431",
        ),
        (
            "a path that is not UTF-8",
            b"GET /v1/studies/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
            b"400",
        ),
        (
            "a NUL in a query value",
            b"GET /v1/studies?PatientID=a%00b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"400",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_oversized_or_malformed_requests_get_a_4xx(
    appliance: Appliance, name: str, request_bytes: bytes, status: bytes
) -> None:
    line = _raw(appliance.site.http_port, request_bytes)
    assert line.split(b" ")[1] == status, (name, line)
    _served(appliance)


def test_many_connections_at_once(appliance: Appliance) -> None:
    """300 idle connections and 100 concurrent requests: every request is
    answered (gunicorn's poller holds the idle ones without a thread)."""
    port = appliance.site.http_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    try:
        with (
            httpx.Client(base_url=appliance.base_url, timeout=60) as client,
            concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool,
        ):
            statuses = list(pool.map(lambda _: client.get("/v1/studies").status_code, range(100)))
        assert statuses == [200] * 100
    finally:
        for sock in idle:
            sock.close()
    _served(appliance)


def test_a_stalled_upload_ends_at_the_idle_timeout(appliance: Appliance) -> None:
    """More clients than threads send headers and half a body, then stop:
    after http.idle_timeout each gets a 400 and its thread is free, so an
    ordinary request is served."""
    port = appliance.site.http_port
    stalled = []
    for _ in range(THREADS + 1):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Content-Type: application/dicom\r\n\r\n" + b"\0" * 100
        )
        stalled.append(sock)
    try:
        started = time.monotonic()
        _served(appliance)
        assert time.monotonic() - started < 3 * IDLE_TIMEOUT + 10
        for sock in stalled:
            sock.settimeout(3 * IDLE_TIMEOUT + 10)
            answer = sock.recv(200)
            assert answer.startswith(b"HTTP/1.1 400"), answer
    finally:
        for sock in stalled:
            sock.close()
    _served(appliance)


def test_a_slow_but_steady_download_is_not_cut(appliance: Appliance) -> None:
    """The idle timeout counts stalls, not duration: a WADO-RS retrieve of a
    8 MB instance read over several idle timeouts completes."""
    ds = small_study(1, size=2048)[0]  # 2048 x 2048 x 2 bytes of pixel data
    part = part10_of(ds)
    boundary = "big"
    stored = httpx.post(
        f"{appliance.base_url}/v1/studies",
        content=f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
        timeout=60,
    )
    assert stored.status_code == 200
    url = (
        f"{appliance.base_url}/v1/studies/{ds.StudyInstanceUID}/series/"
        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )
    started, received = time.monotonic(), 0
    with httpx.stream("GET", url, headers={"Accept": "*/*"}, timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes(256 * 1024):
            received += len(chunk)
            time.sleep(0.2)  # ~1.3 MB/s: the whole takes several idle timeouts
    assert time.monotonic() - started > 2 * IDLE_TIMEOUT
    assert received >= len(part) - 1024
