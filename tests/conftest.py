"""Shared fixtures: a migrated index on SQLite and on the local PostgreSQL.

PostgreSQL tests skip with a reason when no server is reachable, except under
CI (``CI=true``), where a missing peer is a failure.
"""

from __future__ import annotations

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

PG_ADMIN_URL = os.environ.get(
    "APPLIANCE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing_peer(reason: str) -> None:
    """Skip the test for a missing system peer, or fail under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing peer is a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing_peer("psycopg is not installed")
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"appliance_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        admin.dispose()
        missing_peer(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = create_index_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


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
