"""The DICOMweb side of the benchmark: STOW-RS, QIDO-RS and WADO-RS.

Every client is an ``httpx.Client`` with keep-alive on loopback; parallel
clients are threads, each with its own client (own connection).  The one
exception is the whole-study retrieve, timed with ``curl``: httpx reads a
large body at 350-650 MB/s on this machine, below what either server sends
(the appliance serves a 50 MB study to curl at 1-1.6 GB/s), so an httpx
figure would measure the client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.corpus import Instance
from bench.servers import Server

BOUNDARY = "bench-boundary-7d1f"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON = "application/dicom+json"
#: PS3.18 Table 10.6.3-2 / 10.6.3-3: the STOW-RS response's sequences
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"


def client() -> httpx.Client:
    return httpx.Client(timeout=600)


def multipart(instances: list[bytes]) -> bytes:
    """A STOW-RS request body of *instances* (PS3.18 8.6.1.1)."""
    parts = [
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in instances
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts' bodies of a multipart/related response."""
    boundary = None
    for param in content_type.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ValueError(f"no boundary in {content_type!r}")
    delimiter = b"\r\n--" + boundary.encode()
    # the first delimiter may lack its CRLF (nothing precedes it)
    chunks = (b"\r\n" + body).split(delimiter)
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        _headers, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without a header/body separator")
        parts.append(data)
    return parts


def stow(server: Server, bodies: list[list[bytes]]) -> tuple[float, int]:
    """Send each list of *bodies* from its own thread and client; (seconds,
    instances acknowledged).

    The responses are checked after the clock stops: every request must be
    answered 200 with each instance referenced and none failed."""
    # every thread makes its client first, then all start sending at once
    barrier = threading.Barrier(len(bodies) + 1, timeout=120)

    def send(share: list[bytes]) -> list[tuple[int, bytes]]:
        answers = []
        with client() as http:
            try:
                barrier.wait()
            except BaseException:
                barrier.abort()  # the caller must not wait for this client
                raise
            for body in share:
                r = http.post(
                    f"{server.root}/studies",
                    content=body,
                    headers={"Content-Type": STOW_TYPE, "Accept": JSON},
                )
                answers.append((r.status_code, r.content))
        return answers

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(send, share) for share in bodies]
        barrier.wait()
        start = time.perf_counter()
        answers = [future.result() for future in futures]
        seconds = time.perf_counter() - start
    acknowledged = 0
    for status, content in (answer for share in answers for answer in share):
        if status != 200:
            raise RuntimeError(f"{server.name}: STOW-RS answered {status}: {content[:300]!r}")
        result = json.loads(content)
        if result.get(FAILED_SOP_SEQUENCE, {}).get("Value"):
            raise RuntimeError(f"{server.name}: STOW-RS failed instances: {content[:300]!r}")
        acknowledged += len(result.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []))
    return seconds, acknowledged


def stow_bodies(instances: list[bytes], clients: int, per_request: int) -> list[list[bytes]]:
    """*instances* split round-robin among *clients*, each share cut into
    request bodies of up to *per_request* instances."""
    shares = [instances[i::clients] for i in range(clients)]
    return [
        [multipart(share[i : i + per_request]) for i in range(0, len(share), per_request)]
        for share in shares
    ]


def timed_get(http: httpx.Client, url: str, accept: str) -> tuple[float, httpx.Response]:
    """GET *url*, reading the whole body; (ms, response)."""
    start = time.perf_counter()
    response = http.get(url, headers={"Accept": accept})
    ms = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    return ms, response


def curl_get(url: str, accept: str) -> tuple[float, bytes, str]:
    """GET *url* with ``curl`` into a file in memory (``/dev/shm`` where it
    exists); (ms as curl counts it, from the start of the connection to the
    last byte, the body, its Content-Type).  The body is read back after the
    clock has stopped, to be checked."""
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is not installed (bench/ensure_tools.sh installs it)")
    # NamedTemporaryFile creates its file exclusively, readable by us alone
    shm = "/dev/shm"  # noqa: S108
    folder = shm if os.path.isdir(shm) else None
    with tempfile.NamedTemporaryFile(dir=folder, prefix="bench-") as target:
        done = subprocess.run(
            [
                curl,
                "--silent",
                "--show-error",
                "--fail",
                "--output",
                target.name,
                "--header",
                f"Accept: {accept}",
                "--write-out",
                "%{time_total}\n%{content_type}",
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"GET {url} with curl failed: {done.stderr.strip()[:300]}")
        seconds, _, content_type = done.stdout.partition("\n")
        with open(target.name, "rb") as body:
            return float(seconds) * 1000, body.read(), content_type.strip()


def search_url(server: Server, path: str, params: dict[str, str]) -> str:
    """The QIDO-RS URL of *path* with *params*, ``*`` left as it is.

    ``*`` needs no escaping in a query (RFC 3986 3.4), and Orthanc 1.10's
    DICOMweb plugin does not decode ``%2A`` (its wildcard search then finds
    nothing), so it is not escaped for either server."""
    return f"{server.root}{path}?{urllib.parse.urlencode(params, safe='*')}"


def qido(
    http: httpx.Client, server: Server, path: str, params: dict[str, str]
) -> tuple[float, list[dict[str, Any]]]:
    """One QIDO-RS search; (ms to the whole answer, the matches)."""
    start = time.perf_counter()
    response = http.get(search_url(server, path, params), headers={"Accept": JSON})
    ms = (time.perf_counter() - start) * 1000
    if response.status_code == 204:  # PS3.18 8.3.4.1 allows it for no match (Orthanc)
        return ms, []
    if response.status_code != 200:
        raise RuntimeError(f"{server.name}: QIDO {path} answered {response.status_code}")
    matches: list[dict[str, Any]] = response.json()
    return ms, matches


def instance_url(server: Server, instance: Instance) -> str:
    return (
        f"{server.root}/studies/{instance.study}/series/{instance.series}/instances/{instance.sop}"
    )


def retrieve_instance(http: httpx.Client, server: Server, instance: Instance) -> bytes:
    """The stored bytes of *instance*, by WADO-RS in its stored syntax."""
    _ms, response = timed_get(http, instance_url(server, instance), RETRIEVE_ACCEPT)
    parts = split_multipart(response.content, response.headers["content-type"])
    if len(parts) != 1:
        raise RuntimeError(f"{server.name}: instance retrieve gave {len(parts)} parts")
    return parts[0]
