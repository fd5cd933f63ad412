"""The WADO-RS metadata cache: each instance's DICOM JSON, kept in the index.

Building an instance's metadata (PS3.18 10.4.1.1.2, Annex F) means opening
its blob and parsing its header, about a millisecond or two per instance; a
cached copy turns a study's metadata into one indexed look-up and the
concatenation of stored bytes.

What is stored is opaque here: the caller's JSON text, UTF-8, with its
request-dependent part (the BulkDataURIs' base) left as a placeholder the
caller fills in when serving.  An entry belongs to one instance row
(``instance_fk``) and is valid only for the blob it was made from and the
format it was made in:

- it is looked up by blob key, so an instance replaced by new bytes (a new
  blob key, the same row: PS3.4 duplicate policy ``replace``) finds no
  entry, and its old entry is overwritten by the next fill;
- deleting the instance row deletes the entry (``ON DELETE CASCADE``: a
  deleted instance, or one replaced into another series, which is a delete
  and an insert);
- an entry of another ``version`` than the caller's is ignored and
  overwritten.

A fill is written only while the instance row still has that blob key
(``INSERT .. SELECT`` from the instance row), so a fill racing a replacement
or a deletion writes nothing.

Writes are an optimisation, never a requirement: they run in their own
short transaction, wait at most :data:`WRITE_WAIT_MS` for a lock (SQLite's
write lock is shared with the ingest of every process; PostgreSQL's row
locks of an ingest replacing the same instance) and give up quietly on
contention or any database failure.  A failed read is a miss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    String,
    bindparam,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from appliance.index.engine import WRITE
from appliance.index.engine import describe_failure as _describe
from appliance.index.schema import instance, metadata_cache

log = logging.getLogger(__name__)

#: The longest a cache write waits for a lock before it is skipped.
WRITE_WAIT_MS = 100
#: Keys per ``IN (...)`` list (SQLite allows 32766 bound parameters).
_CHUNK = 500
#: Entries per write transaction: a short hold of SQLite's write lock.
WRITE_BATCH = 100

_LOAD = select(metadata_cache.c.blob_key, metadata_cache.c.json).where(
    metadata_cache.c.blob_key.in_(bindparam("keys", expanding=True)),
    metadata_cache.c.version == bindparam("version"),
)
# PostgreSQL: give up on a row lock held longer than the wait (the literal
# is a constant: SET takes no bound parameters)
_PG_LOCK_TIMEOUT = text(f"SET LOCAL lock_timeout = '{WRITE_WAIT_MS}ms'")


def _upsert(dialect: str) -> Any:
    """``INSERT .. SELECT`` of one entry from the instance row that still has
    its blob key, replacing the row's older entry."""
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    source = select(
        instance.c.id,
        bindparam("key", type_=String(128)),
        bindparam("version", type_=String(64)),
        bindparam("json", type_=LargeBinary),
    ).where(instance.c.blob_key == bindparam("key"))
    statement = insert(metadata_cache).from_select(
        ["instance_fk", "blob_key", "version", "json"], source
    )
    return statement.on_conflict_do_update(
        index_elements=[metadata_cache.c.instance_fk],
        set_={
            "blob_key": statement.excluded.blob_key,
            "version": statement.excluded.version,
            "json": statement.excluded.json,
        },
    )


_UPSERT = {name: _upsert(name) for name in ("sqlite", "postgresql")}


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class MetadataCache:
    """Cached metadata entries of the index on *engine*.

    Parameters
    ----------
    engine
        The index's engine (SQLite or PostgreSQL, migrated).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self, blob_keys: Sequence[str], version: str) -> dict[str, bytes]:
        """The entries of those blobs that have one of *version*, by blob key;
        an empty dict if the database fails (the caller builds them)."""
        found: dict[str, bytes] = {}
        if not blob_keys:
            return found
        try:
            with self.engine.connect() as conn:
                for chunk in _chunks(blob_keys, _CHUNK):
                    rows = conn.execute(_LOAD, {"keys": list(chunk), "version": version})
                    found.update((key, _bytes(data)) for key, data in rows)
        except SQLAlchemyError as exc:
            log.warning("metadata cache not read (%s): building the metadata", _describe(exc))
            return {}
        return found

    def store(self, entries: Mapping[str, bytes], version: str) -> int:
        """Write entries (JSON by blob key) made in *version*; how many
        transactions committed.

        Each batch of :data:`WRITE_BATCH` entries is one transaction that
        waits at most :data:`WRITE_WAIT_MS` for its locks; a batch that
        cannot be written (lock contention, any database failure) is
        skipped, and so are the rest.  Never raises for a database failure.
        """
        items = [{"key": key, "version": version, "json": data} for key, data in entries.items()]
        statement = _UPSERT.get(self.engine.dialect.name)
        if not items or statement is None:
            return 0
        committed = 0
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**WRITE)
                with _short_lock_wait(conn):
                    for batch in _chunks(items, WRITE_BATCH):
                        with conn.begin():
                            if conn.dialect.name == "postgresql":
                                conn.execute(_PG_LOCK_TIMEOUT)
                            conn.execute(statement, list(batch))
                        committed += 1
        except SQLAlchemyError as exc:
            # "database is locked", a lock timeout, a unique key: the next
            # request tries again.  The message is not logged: it carries
            # the statement's parameters, patient data among them.
            log.info("metadata cache not written (%s)", _describe(exc))
        return committed


@contextlib.contextmanager
def _short_lock_wait(conn: Connection) -> Iterator[None]:
    """SQLite: wait at most :data:`WRITE_WAIT_MS` for the write lock instead
    of the engine's busy timeout, and restore that afterwards (the
    connection goes back to the pool: one that cannot be restored is
    discarded)."""
    if conn.dialect.name != "sqlite":
        yield
        return
    raw = conn.connection.driver_connection
    assert raw is not None
    previous = int(raw.execute("PRAGMA busy_timeout").fetchone()[0])
    # PRAGMA takes no bound parameters; both values are integers
    raw.execute(f"PRAGMA busy_timeout={int(WRITE_WAIT_MS)}")
    try:
        yield
    finally:
        try:
            if conn.in_transaction():
                conn.rollback()
            raw.execute(f"PRAGMA busy_timeout={previous}")
        except Exception:  # noqa: BLE001 - never leave a short timeout in the pool
            conn.invalidate()


def _bytes(data: Any) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)
