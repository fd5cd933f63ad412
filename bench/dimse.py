"""C-STORE, C-FIND and C-MOVE, the appliance next to Orthanc in one run.

Both servers are driven by the same dcmtk tools over loopback:

- C-STORE: ``storescu`` sending small (64x64) and CT-sized (512x512x16 bit)
  instances, on 1 association and on 4 at once; instances/s.
- C-FIND: ``findscu`` study-level queries (by PatientID, by PatientName
  prefix, by StudyDate range) against the stored studies; ms per query,
  which includes starting findscu (the same for both servers).
- C-MOVE: ``movescu`` moving a 100-instance study to a local ``storescp``;
  instances/s.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.uid import generate_uid

from bench.corpus import make_instance
from bench.servers import Peer, Server, appliance, free_port, orthanc, orthanc_available

DEST = "BENCHDEST"
#: dcmtk leaves Nagle's algorithm on unless told otherwise; without this every
#: DIMSE message of the *client* waits for a delayed ACK (~40 ms), which would
#: hide both servers' speed (measured: storescu to the appliance, 18 -> 60
#: small instances/s on one association).  Orthanc gets the same variable.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def tool(name: str) -> str:
    path = Path("/usr/bin") / name
    if not path.is_file():
        raise RuntimeError(f"dcmtk's {name} is missing (apt-get install dcmtk)")
    return str(path)


def write_corpus(folder: Path, count: int, size: int, per_study: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    study = series = ""
    for i in range(count):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        path = folder / f"{i:05d}.dcm"
        path.write_bytes(make_instance(size, study, series, seed=uuid.uuid4().hex))
        paths.append(path)
    return paths


def storescu(server: Server, files: list[Path]) -> None:
    subprocess.run(
        [
            tool("storescu"),
            "-aet",
            "BENCH",
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.dimse_port),
            *map(str, files),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        env=DCMTK_ENV,
    )


def store_rate(server: Server, files: list[Path], associations: int) -> float:
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(lambda chunk: storescu(server, chunk), chunks))
    return len(files) / (time.perf_counter() - start)


def findscu_ms(server: Server, keys: list[str], runs: int) -> float:
    args = [
        tool("findscu"),
        "-S",
        "-aet",
        "BENCH",
        "-aec",
        server.ae_title,
        "127.0.0.1",
        str(server.dimse_port),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
    ]
    for key in keys:
        args += ["-k", key]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, timeout=60, env=DCMTK_ENV)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@contextlib.contextmanager
def storescp(port: int, folder: Path) -> Iterator[None]:
    process = subprocess.Popen(
        [tool("storescp"), "-aet", DEST, "+xa", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    try:
        time.sleep(0.5)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def move_rate(server: Server, study_uid: str, count: int, port: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-dest-") as tmp, storescp(port, Path(tmp)):
        start = time.perf_counter()
        subprocess.run(
            [
                tool("movescu"),
                "-S",
                "-aet",
                "BENCH",
                "-aec",
                server.ae_title,
                "-aem",
                DEST,
                "127.0.0.1",
                str(server.dimse_port),
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study_uid}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
            env=DCMTK_ENV,
        )
        seconds = time.perf_counter() - start
        received = sum(1 for p in Path(tmp).iterdir() if p.is_file())
    if received != count:
        raise RuntimeError(f"{server.name}: C-MOVE delivered {received} of {count}")
    return count / seconds


def measure(server: Server, corpus: Path, reps: int, dest_port: int) -> dict[str, float]:
    results: dict[str, list[float]] = {}
    for rep in range(reps):
        for name, size, count in (("small", 64, 200), ("ct", 512, 40)):
            for associations in (1, 4):
                files = write_corpus(corpus / f"{name}{associations}-{rep}", count, size, 50)
                key = f"cstore_{name}_{associations}_assoc_instances_per_s"
                results.setdefault(key, []).append(store_rate(server, files, associations))
    move_files = write_corpus(corpus / "move", 100, 64, 100)
    storescu(server, move_files)
    from pydicom import dcmread

    study_uid = dcmread(move_files[0], stop_before_pixels=True).StudyInstanceUID
    patient_id = dcmread(move_files[0], stop_before_pixels=True).PatientID
    for _ in range(reps):
        results.setdefault("cmove_100_instances_per_s", []).append(
            move_rate(server, study_uid, 100, dest_port)
        )
    results["cfind_by_patient_id_ms"] = [findscu_ms(server, [f"PatientID={patient_id}"], 10)]
    results["cfind_by_name_prefix_ms"] = [findscu_ms(server, ["PatientName=SMI*"], 10)]
    results["cfind_by_date_range_ms"] = [findscu_ms(server, ["StudyDate=20150101-20151231"], 10)]
    results["rss_mb_after"] = [server.rss_mb()]
    return {key: round(statistics.median(values), 1) for key, values in results.items()}


def run(reps: int = 3) -> dict[str, dict[str, float]]:
    """The figures for both servers and the appliance/Orthanc ratios."""
    report: dict[str, dict[str, float]] = {}
    dest_port = free_port()
    peers = (Peer(DEST, dest_port),)
    with tempfile.TemporaryDirectory(prefix="bench-dimse-") as tmp:
        with appliance(peers=peers) as server:
            report["appliance"] = measure(server, Path(tmp) / "a", reps, dest_port)
        problem = orthanc_available()
        if problem:
            print(f"orthanc skipped: {problem}")
            return report
        with orthanc(peers=peers) as server:
            report["orthanc"] = measure(server, Path(tmp) / "o", reps, dest_port)
    report["ratio_appliance_over_orthanc"] = {
        key: round(value / report["orthanc"][key], 2)
        for key, value in report["appliance"].items()
        if report["orthanc"].get(key)
    }
    return report
