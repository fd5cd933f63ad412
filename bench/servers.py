"""Start the appliance and Orthanc side by side on loopback, for benchmarks.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) runs with its
own configuration in a temporary folder: loopback ports, no remote access,
its default SQLite index, and ``TCP_NODELAY=1`` in its environment (without
it the Debian build leaves Nagle's algorithm on and every DIMSE reply waits
~40 ms, which would make any comparison unfair in our favour).  Known trap:
Orthanc 1.10 listens on all interfaces whatever its bind settings, so
``RemoteAccessAllowed`` stays false and the ports are ephemeral.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Server:
    """A running server under test."""

    name: str
    root: str  # DICOMweb service root
    dimse_port: int
    ae_title: str
    pids: list[int]

    def rss_mb(self) -> float:
        """Resident memory of the server's processes and their children."""
        total = 0
        for pid in _with_children(self.pids):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024


def _with_children(pids: list[int]) -> list[int]:
    found = list(pids)
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            found += _with_children([int(k) for k in kids])
    return found


def _wait(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@dataclasses.dataclass(frozen=True)
class Peer:
    """A DIMSE node the servers know (a C-MOVE destination)."""

    ae_title: str
    port: int
    host: str = "127.0.0.1"


@contextlib.contextmanager
def appliance(workers: int = 2, peers: tuple[Peer, ...] = ()) -> Iterator[Server]:
    """``dicom-appliance serve`` on the embedded default, in a temp folder."""
    with tempfile.TemporaryDirectory(prefix="bench-appliance-") as tmp:
        http_port, dimse_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env |= {
            "APPLIANCE_HTTP_PORT": str(http_port),
            "APPLIANCE_HTTP_WORKERS": str(workers),
            "APPLIANCE_DIMSE_PORT": str(dimse_port),
            "APPLIANCE_LOG_LEVEL": "warning",
            "APPLIANCE_INDEX_AUTO_MIGRATE": "true",
        }
        if peers:
            env["APPLIANCE_DIMSE_PEERS"] = (
                "["
                + ", ".join(
                    f'{{ae_title="{p.ae_title}", host="{p.host}", port={p.port}}}' for p in peers
                )
                + "]"
            )
        cli = [sys.executable, "-m", "appliance.cli"]
        process = subprocess.Popen(
            [*cli, "serve"], cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            _wait(f"http://127.0.0.1:{http_port}/health/ready", process)
            yield Server(
                "appliance",
                f"http://127.0.0.1:{http_port}/v1",
                dimse_port,
                "DICOM_EDGE",
                [process.pid],
            )
        finally:
            process.terminate()
            process.wait(timeout=30)


def orthanc_available() -> str | None:
    """None if Orthanc and its DICOMweb plugin are installed, else why not."""
    if not Path(ORTHANC).is_file():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@contextlib.contextmanager
def orthanc(peers: tuple[Peer, ...] = ()) -> Iterator[Server]:
    """Orthanc with its DICOMweb plugin, private to this run."""
    problem = orthanc_available()
    if problem:
        raise RuntimeError(problem)
    with tempfile.TemporaryDirectory(prefix="bench-orthanc-") as tmp:
        http_port, dimse_port = free_port(), free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": f"{tmp}/db",
            "IndexDirectory": f"{tmp}/db",
            "HttpPort": http_port,
            "DicomPort": dimse_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "DicomModalities": {p.ae_title.lower(): [p.ae_title, p.host, p.port] for p in peers},
            # the benchmark's SCUs call with titles Orthanc does not know:
            # without these it refuses their C-FIND and C-MOVE
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "HttpThreadsCount": 50,
        }
        path = Path(tmp) / "orthanc.json"
        path.write_text(json.dumps(config))
        env = dict(os.environ, TCP_NODELAY="1")
        process = subprocess.Popen(
            [ORTHANC, str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            _wait(f"http://127.0.0.1:{http_port}/system", process)
            yield Server(
                "orthanc",
                f"http://127.0.0.1:{http_port}/dicom-web",
                dimse_port,
                "ORTHANC",
                [process.pid],
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
