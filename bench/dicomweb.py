"""STOW-RS and WADO-RS throughput, the appliance next to Orthanc in one run.

Both servers get the same requests over loopback HTTP with keep-alive:

- STOW-RS: batches of 50 small (64x64) instances and of 20 CT-sized
  (512x512x16 bit, ~0.5 MB) instances per request, one client; instances/s.
- WADO-RS: whole-study retrieve (``transfer-syntax=*``, multipart) of the
  study the CT batches built, MB/s; study metadata, ms.

Each figure is the median of ``reps`` repetitions on fresh instances.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
from pydicom.uid import generate_uid

from bench.corpus import make_instance
from bench.servers import Server, appliance, orthanc, orthanc_available

BOUNDARY = "bench-boundary-7d1f"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def multipart(instances: list[bytes]) -> bytes:
    parts = []
    for data in instances:
        parts.append(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def batches(size: int, pixels: int, count: int, study: str) -> Iterator[bytes]:
    for _ in range(count):
        series = generate_uid()
        yield multipart(
            [make_instance(pixels, study, series, seed=uuid.uuid4().hex) for _ in range(size)]
        )


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def stow_rate(client: httpx.Client, server: Server, bodies: list[bytes], per_body: int) -> float:
    def send_all() -> None:
        for body in bodies:
            r = client.post(
                f"{server.root}/studies",
                content=body,
                headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
            )
            if r.status_code != 200:
                raise RuntimeError(f"{server.name} STOW answered {r.status_code}: {r.text[:200]}")

    return len(bodies) * per_body / timed(send_all)


def measure(server: Server, reps: int) -> dict[str, float]:
    results: dict[str, list[float]] = {}
    with httpx.Client(timeout=300) as client:
        for _ in range(reps):
            small = list(batches(50, 64, 4, generate_uid()))
            results.setdefault("stow_small_50_per_request_instances_per_s", []).append(
                stow_rate(client, server, small, 50)
            )
            study = generate_uid()
            ct = list(batches(20, 512, 3, study))
            results.setdefault("stow_ct_20_per_request_instances_per_s", []).append(
                stow_rate(client, server, ct, 20)
            )
            size = 0

            def retrieve(study: str = study) -> None:
                nonlocal size
                with client.stream(
                    "GET", f"{server.root}/studies/{study}", headers={"Accept": RETRIEVE_ACCEPT}
                ) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"{server.name} WADO answered {r.status_code}")
                    size = sum(len(chunk) for chunk in r.iter_bytes())

            seconds = timed(retrieve)
            results.setdefault("wado_study_retrieve_mb_per_s", []).append(size / 1e6 / seconds)
            seconds = timed(
                lambda study=study: client.get(
                    f"{server.root}/studies/{study}/metadata",
                    headers={"Accept": "application/dicom+json"},
                ).raise_for_status()
            )
            results.setdefault("wado_study_metadata_ms", []).append(seconds * 1000)
        results["rss_mb_after"] = [server.rss_mb()]
    return {key: round(statistics.median(values), 1) for key, values in results.items()}


def run(reps: int = 3) -> dict[str, dict[str, float]]:
    """The figures for both servers and the appliance/Orthanc ratios."""
    report: dict[str, dict[str, float]] = {}
    with appliance() as server:
        report["appliance"] = measure(server, reps)
    problem = orthanc_available()
    if problem:
        report["orthanc"] = {"unavailable": 0.0}
        print(f"orthanc skipped: {problem}")
        return report
    with orthanc() as server:
        report["orthanc"] = measure(server, reps)
    report["ratio_appliance_over_orthanc"] = {
        key: round(value / report["orthanc"][key], 2)
        for key, value in report["appliance"].items()
        if report["orthanc"].get(key)
    }
    return report
