"""Database engines for the index: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from appliance.config import IndexConfig
from appliance.errors import IndexUnavailable

#: Execution option: begin the transaction as a writer (SQLite BEGIN IMMEDIATE).
WRITE = {"appliance_write": True}


def as_utc(value: dt.datetime) -> dt.datetime:
    """*value*, a time read from the index, as an aware UTC datetime: SQLite
    gives naive datetimes back, and every time the index stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def describe_failure(exc: SQLAlchemyError) -> str:
    """Name a database failure without its message: SQLAlchemy's text carries
    the statement's parameters, which may be patient data."""
    orig = getattr(exc, "orig", None)
    return type(orig).__name__ if orig is not None else type(exc).__name__


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction (SQLite: BEGIN IMMEDIATE),
    committed on success, rolled back on error; a database failure is raised
    as :class:`~appliance.errors.IndexUnavailable` naming only its kind."""
    try:
        with engine.connect() as conn:
            conn.execution_options(**WRITE)
            with conn.begin():
                yield conn
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"the index database failed ({describe_failure(exc)})") from exc


def create_index_engine(
    url: str, *, pool_size: int = 5, max_overflow: int = 10, pool_timeout: int = 30
) -> Engine:
    """An engine for *url*, configured for the appliance's durability promise.

    SQLite: WAL journal (readers never block the writer), ``synchronous=FULL``
    (a commit is on disk before it returns: the acknowledgement promise),
    foreign keys on, a 30 s busy timeout for concurrent writers (gunicorn
    workers and the DIMSE process share the file), case-sensitive LIKE (as
    PostgreSQL's, and as DICOM matching wants: PS3.4 C.2.2.2.4), and writers
    that take the write lock at BEGIN (``BEGIN IMMEDIATE``) so two writers
    never deadlock upgrading a read lock.  The folder of the file is created.

    PostgreSQL: a pool of *pool_size* connections kept open plus up to
    *max_overflow* more under load, each checked before use (a server
    restart leaves dead ones in the pool); a request that finds none free
    within *pool_timeout* seconds fails (``sqlalchemy.exc.TimeoutError``,
    which the index reports as unavailable).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
    )


def engine_for(index: IndexConfig) -> Engine:
    """The engine for the ``[index]`` section *index*."""
    return create_index_engine(
        index.url,
        pool_size=index.pool_size,
        max_overflow=index.max_overflow,
        pool_timeout=index.pool_timeout,
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # take over transaction control from the sqlite3 module
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA case_sensitive_like=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("appliance_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
