"""The DIMSE side of the benchmark: C-STORE, C-FIND and C-MOVE.

- C-STORE: dcmtk ``storescu`` (one process per association, files split
  round-robin), 1 and 4 associations at once; instances/s from the start of
  the first process to the end of the last.
- C-FIND: a pynetdicom SCU keeps one association open and sends the study
  queries on it one after the other, so each time is the query itself (and
  the client's decoding of the matches, the same work for both servers), not
  a process start and an association; plus ``findscu`` end to end.
- C-MOVE: ``movescu`` moving a study to a local ``storescp``; instances/s,
  and every instance must arrive (one compared byte for byte).

All dcmtk tools run with ``TCP_NODELAY=1``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from bench.corpus import Instance, dataset_part
from bench.servers import Server, wait_for_echo

CALLING_AE = "BENCH"
DEST = "BENCHDEST"
#: dcmtk leaves Nagle's algorithm on unless told otherwise; without this every
#: DIMSE message of the *client* waits for a delayed ACK (~40 ms), which would
#: hide both servers' speed (measured: storescu to the appliance, 18 -> 60
#: small instances/s on one association).  Orthanc gets the same variable.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: C-FIND status codes (PS3.4 C.4.1.1.4): Pending (0xFF00, 0xFF01) carry a
#: match; Success ends a complete answer.  A server that cuts the answer at
#: its limit ends with another status: Refused: Out of Resources (0xA700,
#: the appliance) or Cancel (0xFE00, Orthanc).
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000


def tool(name: str) -> str:
    path = Path("/usr/bin") / name
    if not path.is_file():
        raise RuntimeError(f"dcmtk's {name} is missing (apt-get install dcmtk)")
    return str(path)


def storescu(server: Server, files: list[Path]) -> None:
    """Send *files* on one association; fails if storescu reports an error
    (a refused store is also caught later by the count check)."""
    result = subprocess.run(
        [
            tool("storescu"),
            "-aet",
            CALLING_AE,
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.dimse_port),
            *map(str, files),
        ],
        check=False,
        capture_output=True,
        timeout=1800,
        env=DCMTK_ENV,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 or b"E: " in output or b"F: " in output:
        raise RuntimeError(
            f"{server.name}: storescu failed ({result.returncode}): "
            f"{output.decode(errors='replace')[-500:]}"
        )


def store(server: Server, files: list[Path], associations: int) -> float:
    """Send *files* on *associations* parallel associations; seconds taken."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(lambda chunk: storescu(server, chunk), chunks))
    return time.perf_counter() - start


def study_query(**keys: str) -> Dataset:
    """A study-level C-FIND identifier: the matching *keys* and the same
    return keys for both servers."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientName = ""
    ds.PatientID = ""
    ds.StudyDate = ""
    ds.AccessionNumber = ""
    ds.StudyDescription = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


class FindClient:
    """One pynetdicom association kept open for many C-FINDs."""

    def __init__(self, server: Server) -> None:
        self.server = server
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        self.assoc = ae.associate(
            "127.0.0.1", server.dimse_port, ae_title=server.ae_title, max_pdu=0
        )
        if not self.assoc.is_established:
            raise RuntimeError(f"{server.name}: C-FIND association not established")
        # pynetdicom writes a message in several small pieces; with Nagle's
        # algorithm on, each query would wait for the server's delayed ACK
        transport = self.assoc.dul.socket
        if transport is None or transport.socket is None:
            raise RuntimeError(f"{server.name}: C-FIND association has no socket")
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def find(self, query: Dataset) -> tuple[list[Dataset], int]:
        """Send one C-FIND and read every response; (the matches' identifiers,
        the final status)."""
        matches = []
        final = None
        for status, identifier in self.assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if status is None or "Status" not in status:
                raise RuntimeError(f"{self.server.name}: C-FIND got no answer")
            if status.Status in PENDING:
                if identifier is None:
                    raise RuntimeError(f"{self.server.name}: a C-FIND match without identifier")
                matches.append(identifier)
            else:
                final = int(status.Status)
        if final is None:
            raise RuntimeError(f"{self.server.name}: C-FIND ended without a final status")
        return matches, final

    def close(self) -> None:
        self.assoc.release()


def findscu_ms(server: Server, keys: list[str], runs: int) -> list[float]:
    """``findscu`` end to end (process start, association, query), in ms."""
    args = [
        tool("findscu"),
        "-S",
        "-aet",
        CALLING_AE,
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
    return times


@contextlib.contextmanager
def storescp(port: int, folder: Path) -> Iterator[None]:
    """A dcmtk storescp accepting any AE title, writing into *folder*."""
    process = subprocess.Popen(
        [tool("storescp"), "-aet", DEST, "+xa", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    try:
        wait_for_echo(DEST, port)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def move(server: Server, study: list[Instance], dest_port: int) -> float:
    """C-MOVE *study* to a fresh storescp; seconds taken.  Fails unless every
    instance arrived, and the first one with its data set byte for byte."""
    with tempfile.TemporaryDirectory(prefix="bench-dest-") as tmp, storescp(dest_port, Path(tmp)):
        start = time.perf_counter()
        subprocess.run(
            [
                tool("movescu"),
                "-S",
                "-aet",
                CALLING_AE,
                "-aec",
                server.ae_title,
                "-aem",
                DEST,
                "127.0.0.1",
                str(server.dimse_port),
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study[0].study}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
            env=DCMTK_ENV,
        )
        seconds = time.perf_counter() - start
        received = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
        if len(received) != len(study):
            raise RuntimeError(
                f"{server.name}: C-MOVE delivered {len(received)} of {len(study)} instances"
            )
        # storescp names files <modality prefix>.<SOP Instance UID>
        first = study[0]
        path = next((p for n, p in received.items() if n.endswith(first.sop)), None)
        if path is None or dataset_part(path.read_bytes()) != dataset_part(first.render()):
            raise RuntimeError(f"{server.name}: C-MOVE delivered {first.sop} altered or not at all")
    return seconds
