"""``dicom-appliance backup FILE`` and ``restore FILE``: the index database.

**SQLite.**  The backup is made with SQLite's online backup API
(:meth:`sqlite3.Connection.backup`) while the appliance keeps writing: the
copy is read inside one read transaction, so in WAL mode (the appliance's)
it is one consistent snapshot of the moment it started, writers are never
blocked, and the copy is never restarted by their commits (without that
transaction SQLite restarts a stepwise backup after every commit of another
connection, which under steady ingest never finishes).  It is written to a
temporary file beside *FILE*, switched to a single-file journal mode,
checked (``PRAGMA quick_check``), fsynced and renamed, so *FILE* is either
the whole backup or absent.  Restore copies the backup into the index file
with the same API, which locks the index while it writes (a running
appliance waits, then sees the restored index).

**PostgreSQL.**  ``pg_dump --format=custom`` and ``pg_restore --clean
--if-exists --single-transaction`` (all or nothing) with the parameters of
``index.url``; the password goes in ``PGPASSWORD``, never on a command line
(and ``--no-password`` keeps the tools from prompting).  Without the tools,
:class:`ToolsMissing` carries the exact commands to run elsewhere.

**Both.**  Restore refuses to replace an index that holds instances or
change-feed entries unless forced, and reads the backup's schema revision
(Alembic's ``alembic_version``) first: the revision of this version is
restored as is, an older one is restored and must then be migrated
(``dicom-appliance migrate``), a newer or missing one is refused.

The blobs are not in the index: see the README (Running in production,
Backups) for how they are kept with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from appliance.errors import ApplianceError
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.schema import changefeed, instance, study

#: Progress callback: (unit, done, total or None).
Progress = Callable[[str, int, int | None], None]

#: SQLite pages copied per backup step (between progress reports).
PAGES = 1024
_SQLITE_MAGIC = b"SQLite format 3\x00"
_PG_MAGIC = b"PGDMP"
#: How often the size of a dump being written is reported (seconds).
_POLL = 0.25


class ToolsMissing(ApplianceError):
    """``pg_dump``/``pg_restore`` are not installed; :attr:`commands` are
    what to run where they are."""

    def __init__(self, reason: str, commands: list[str]) -> None:
        super().__init__(reason)
        self.commands = commands


@dataclasses.dataclass(frozen=True)
class BackupReport:
    """What a backup or a restore did."""

    action: str  # backup | restore
    kind: str  # sqlite | postgresql
    file: str
    bytes: int
    seconds: float
    #: the schema revision in the backup
    revision: str | None
    studies: int | None = None
    instances: int | None = None
    #: restore: the restored index must be migrated (an older revision)
    needs_migrate: bool = False
    #: restore: an index that held data was replaced (--force)
    replaced: bool = False

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def backup(
    index_url: str, file: Path, *, force: bool = False, progress: Progress | None = None
) -> BackupReport:
    """Back up the index of *index_url* into *file* (see the module).

    Raises
    ------
    ApplianceError
        if *file* exists (and not *force*), or the backup fails.
    ToolsMissing
        PostgreSQL, without ``pg_dump``.
    """
    if file.exists() and not force:
        raise ApplianceError(f"{file} exists (give --force to replace it)")
    if file.is_dir():
        raise ApplianceError(f"{file} is a folder")
    url = make_url(index_url)
    if url.get_backend_name() == "sqlite":
        return _backup_sqlite(_sqlite_path(index_url), file, progress)
    return _backup_postgresql(index_url, file, progress)


def restore(
    index_url: str, file: Path, *, force: bool = False, progress: Progress | None = None
) -> BackupReport:
    """Restore the backup *file* into the index of *index_url* (see the
    module).

    Raises
    ------
    ApplianceError
        if *file* is not a backup of this kind of index, its revision is
        newer than this version's, the index holds data (and not *force*),
        or the restore fails.
    ToolsMissing
        PostgreSQL, without ``pg_restore``.
    """
    if not file.is_file():
        raise ApplianceError(f"{file} is not a file")
    url = make_url(index_url)
    if url.get_backend_name() == "sqlite":
        return _restore_sqlite(file, _sqlite_path(index_url), force, progress)
    return _restore_postgresql(index_url, file, force, progress)


def needs_migrate(revision: str | None, file: Path) -> bool:
    """True if the backup's *revision* is older than this version's; raises
    ApplianceError for a missing or newer (unknown) one."""
    if revision is None:
        raise ApplianceError(
            f"{file} holds no schema revision: it is not a backup of a migrated index"
        )
    order = migrate.revisions()
    if revision not in order:
        raise ApplianceError(
            f"{file} is at schema revision {revision}, which this version (revision "
            f"{migrate.SCHEMA_REVISION}) does not know: restore it with the newer "
            "dicom-appliance that made it"
        )
    return order.index(revision) < order.index(migrate.SCHEMA_REVISION)


def _magic(file: Path, size: int) -> bytes:
    with file.open("rb") as fh:
        return fh.read(size)


def _fsync_rename(tmp: Path, file: Path) -> None:
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(file)
    folder = os.open(file.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _temporary(file: Path) -> Path:
    return file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}.tmp")


# --------------------------------------------------------------------------
# SQLite


def _sqlite_path(index_url: str) -> Path:
    database = make_url(index_url).database
    if not database or database == ":memory:":
        raise ApplianceError("index.url names no SQLite file to back up or restore")
    return Path(database)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _sqlite_revision(conn: sqlite3.Connection) -> str | None:
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", ("alembic_version",)
    ).fetchone()
    if has is None:
        return None
    rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    return str(rows[0][0]) if len(rows) == 1 else None


#: The row counts read from SQLite files (fixed statements, by table name).
_COUNT = {
    "instance": "SELECT count(*) FROM instance",
    "study": "SELECT count(*) FROM study",
    "changefeed": "SELECT count(*) FROM changefeed",
}


def _sqlite_count(conn: sqlite3.Connection, table: str) -> int | None:
    """Rows of *table* (a key of :data:`_COUNT`); None if there is no such table."""
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    if has is None:
        return None
    return int(conn.execute(_COUNT[table]).fetchone()[0])


def _copy(
    source: sqlite3.Connection, target: sqlite3.Connection, pages: int, progress: Progress | None
) -> None:
    def report(_status: int, remaining: int, total: int) -> None:
        if progress is not None:
            progress("page", total - remaining, total)

    source.backup(target, pages=pages, progress=report)


def _check(conn: sqlite3.Connection, what: str) -> None:
    result = conn.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise ApplianceError(f"{what} failed SQLite's quick_check: {result and result[0]}")


def _backup_sqlite(db: Path, file: Path, progress: Progress | None) -> BackupReport:
    if not db.is_file():
        raise ApplianceError(f"there is no index at {db}")
    started = time.monotonic()
    tmp = _temporary(file)
    source = _connect(db)
    try:
        wal = source.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # one read transaction: a snapshot that writers neither block nor change
        source.execute("BEGIN")
        revision = _sqlite_revision(source)
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            # outside WAL a reader blocks writers: copy in one step, as briefly as can be
            _copy(source, target, PAGES if wal else -1, progress)
            target.execute("PRAGMA journal_mode=DELETE")
            _check(target, "the backup")
            studies = _sqlite_count(target, "study")
            instances = _sqlite_count(target, "instance")
        finally:
            target.close()
        source.execute("COMMIT")
        _fsync_rename(tmp, file)
    except sqlite3.Error as exc:
        raise ApplianceError(f"the SQLite backup failed: {exc}") from None
    finally:
        source.close()
        tmp.unlink(missing_ok=True)
    return BackupReport(
        "backup",
        "sqlite",
        str(file),
        file.stat().st_size,
        time.monotonic() - started,
        revision,
        studies,
        instances,
    )


def _restore_sqlite(file: Path, db: Path, force: bool, progress: Progress | None) -> BackupReport:
    magic = _magic(file, len(_SQLITE_MAGIC))
    if magic != _SQLITE_MAGIC:
        kind = "a PostgreSQL dump" if magic.startswith(_PG_MAGIC) else "not an SQLite database"
        raise ApplianceError(f"{file} is {kind}; the index is SQLite")
    if db.exists() and db.resolve() == file.resolve():
        raise ApplianceError(f"{file} is the index itself")
    started = time.monotonic()
    try:
        source = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
        try:
            revision = _sqlite_revision(source)
            migrate_after = needs_migrate(revision, file)
            _check(source, f"the backup {file}")
            db.parent.mkdir(parents=True, exist_ok=True)
            target = _connect(db)
            try:
                held = [_sqlite_count(target, t) for t in ("instance", "changefeed")]
                replaced = any(held)
                if replaced and not force:
                    raise ApplianceError(
                        f"the index {db} is not empty ({held[0] or 0} instance(s), "
                        f"{held[1] or 0} change(s)): give --force to replace it"
                    )
                _copy(source, target, PAGES, progress)
                _check(target, "the restored index")
                studies = _sqlite_count(target, "study")
                instances = _sqlite_count(target, "instance")
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise ApplianceError(f"the SQLite restore failed: {exc}") from None
    return BackupReport(
        "restore",
        "sqlite",
        str(file),
        file.stat().st_size,
        time.monotonic() - started,
        revision,
        studies,
        instances,
        needs_migrate=migrate_after,
        replaced=replaced,
    )


# --------------------------------------------------------------------------
# PostgreSQL


def libpq(index_url: str) -> tuple[str, dict[str, str]]:
    """The libpq connection URI of *index_url* without its password, and
    the environment that carries the password (``PGPASSWORD``)."""
    url = make_url(index_url)
    # URL.set() takes None as "unchanged": a new URL is made without the password
    bare = URL.create("postgresql", url.username, None, url.host, url.port, url.database, url.query)
    uri = bare.render_as_string(hide_password=False)
    password = url.password
    return uri, ({"PGPASSWORD": str(password)} if password else {})


def dump_command(index_url: str, file: Path) -> list[str]:
    uri, _ = libpq(index_url)
    return ["pg_dump", "--format=custom", "--no-password", f"--file={file}", f"--dbname={uri}"]


def restore_command(index_url: str, file: Path) -> list[str]:
    uri, _ = libpq(index_url)
    return [
        "pg_restore",
        "--clean",
        "--if-exists",
        "--no-owner",
        "--no-privileges",
        "--single-transaction",
        "--exit-on-error",
        "--no-password",
        f"--dbname={uri}",
        str(file),
    ]


def _shown(index_url: str, argv: list[str]) -> str:
    """*argv* as a shell line, with where the password goes (never it)."""
    _, env = libpq(index_url)
    prefix = "PGPASSWORD='<the password of index.url>' " if env else ""
    return prefix + shlex.join(argv)


def _tool(name: str, index_url: str, argv: list[str]) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolsMissing(
            f"{name} is not installed (Debian: apt-get install postgresql-client); "
            "run this where it is:",
            [_shown(index_url, argv)],
        )
    return path


def _environment(index_url: str) -> dict[str, str]:
    _, password = libpq(index_url)
    return {**os.environ, **password}


def _last_line(text: bytes) -> str:
    lines = [line.strip() for line in text.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _backup_postgresql(index_url: str, file: Path, progress: Progress | None) -> BackupReport:
    tmp = _temporary(file)
    argv = dump_command(index_url, tmp)
    argv[0] = _tool("pg_dump", index_url, dump_command(index_url, file))
    started = time.monotonic()
    try:
        with subprocess.Popen(
            argv, env=_environment(index_url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        ) as process:
            assert process.stderr is not None
            with _drained(process.stderr) as errors:
                while process.poll() is None:
                    if progress is not None and tmp.exists():
                        progress("B", tmp.stat().st_size, None)
                    time.sleep(_POLL)
        if process.returncode != 0:
            raise ApplianceError(f"pg_dump failed: {_last_line(b''.join(errors))}")
        revision = _dump_revision(index_url, tmp) if shutil.which("pg_restore") else None
        _fsync_rename(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    size = file.stat().st_size
    if progress is not None:
        progress("B", size, size)
    # no counts: the live database's would not be the dump's
    return BackupReport(
        "backup", "postgresql", str(file), size, time.monotonic() - started, revision
    )


@contextlib.contextmanager
def _drained(stream: IO[bytes]) -> Iterator[list[bytes]]:
    """Read *stream* to its end in a thread (a full pipe would stall the
    tool); the chunks read, complete after the block."""
    chunks: list[bytes] = []
    thread = threading.Thread(target=lambda: chunks.extend(iter(lambda: stream.read(65536), b"")))
    thread.start()
    try:
        yield chunks
    finally:
        thread.join()


def _dump_revision(index_url: str, file: Path) -> str | None:
    """The schema revision a custom-format dump holds (``alembic_version``)."""
    argv = ["pg_restore", "--data-only", "--table=alembic_version", "--file=-", str(file)]
    argv[0] = _tool("pg_restore", index_url, argv)
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        raise ApplianceError(f"pg_restore cannot read {file}: {_last_line(done.stderr)}")
    lines = done.stdout.decode(errors="replace").splitlines()
    for number, line in enumerate(lines):
        if line.startswith("COPY ") and "alembic_version" in line:
            values = []
            for row in lines[number + 1 :]:
                if row == "\\.":
                    break
                values.append(row.strip())
            return values[0] if len(values) == 1 else None
    return None


def _pg_counts(index_url: str) -> tuple[int | None, int | None]:
    """Studies and instances of the index (None where the table is missing)."""
    engine = create_index_engine(index_url)
    try:
        return _table_count(engine, study), _table_count(engine, instance)
    finally:
        engine.dispose()


def _table_count(engine: Engine, table: Any) -> int | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table(table.name):
            return None
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _restore_postgresql(
    index_url: str, file: Path, force: bool, progress: Progress | None
) -> BackupReport:
    magic = _magic(file, len(_PG_MAGIC))
    if magic != _PG_MAGIC:
        kind = (
            "an SQLite database"
            if magic == _SQLITE_MAGIC[: len(_PG_MAGIC)]
            else "not a custom-format dump"
        )
        raise ApplianceError(f"{file} is {kind}; the index is PostgreSQL (pg_dump --format=custom)")
    argv = restore_command(index_url, file)
    argv[0] = _tool("pg_restore", index_url, argv)
    revision = _dump_revision(index_url, file)
    migrate_after = needs_migrate(revision, file)
    engine = create_index_engine(index_url)
    try:
        held = [_table_count(engine, changefeed), _table_count(engine, instance)]
    except SQLAlchemyError as exc:
        raise ApplianceError(
            f"the index database cannot be reached: {exc.__class__.__name__} "
            "(it must exist: create it first)"
        ) from None
    finally:
        engine.dispose()
    replaced = any(held)
    if replaced and not force:
        raise ApplianceError(
            f"the index is not empty ({held[1] or 0} instance(s), {held[0] or 0} change(s)): "
            "give --force to replace it"
        )
    started = time.monotonic()
    with subprocess.Popen(
        [*argv[:-1], "--verbose", argv[-1]],
        env=_environment(index_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stderr is not None
        errors: list[bytes] = []
        for done, line in enumerate(process.stderr, start=1):
            if b"error" in line.lower():
                errors.append(line)
            if progress is not None:
                progress("item", done, None)
    if process.returncode != 0:
        raise ApplianceError(f"pg_restore failed: {_last_line(b''.join(errors))}")
    studies, instances = _pg_counts(index_url)
    return BackupReport(
        "restore",
        "postgresql",
        str(file),
        file.stat().st_size,
        time.monotonic() - started,
        revision,
        studies,
        instances,
        needs_migrate=migrate_after,
        replaced=replaced,
    )
