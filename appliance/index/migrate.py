"""Schema migrations (Alembic), run by ``dicom-appliance migrate`` or by
``serve`` when ``index.auto_migrate`` is true.

Alembic is imported only to migrate or to read the migration scripts: the
processes that merely check that the index is current (every worker, at
start) compare Alembic's version table with :data:`SCHEMA_REVISION`, which
spares each of them about 12 MB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, column, inspect, select, table
from sqlalchemy.exc import SQLAlchemyError

from appliance.errors import IndexUnavailable, SchemaNotCurrent

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"

#: The schema revision this code expects: the head of ``migrations/versions``
#: (a test holds the two together; raise it with each new migration).
SCHEMA_REVISION = "0013"

#: Alembic's table of the database's revision (one row, one column).
_VERSION = table("alembic_version", column("version_num"))


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The newest revision of the migration scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def revisions() -> list[str]:
    """Every revision of the migration scripts, oldest first."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(_alembic_config())
    return [script.revision for script in reversed(list(scripts.walk_revisions()))]


def current_revision(engine: Engine) -> str | None:
    """The database's revision, or None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to *revision* (default: the newest)."""
    from alembic import command

    cfg = _alembic_config()
    with engine.connect() as conn, _foreign_keys_off(conn):
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Take the database back to *revision* (tests, and an operator going
    back to an older version: what the newer revisions added is dropped)."""
    from alembic import command

    cfg = _alembic_config()
    with engine.connect() as conn, _foreign_keys_off(conn):
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()


@contextlib.contextmanager
def _foreign_keys_off(conn: Connection) -> Iterator[None]:
    """SQLite: foreign keys off while migrations rebuild tables (the
    procedure of SQLite's documentation, "Making Other Kinds Of Table Schema
    Changes"): dropping the old copy of a table would otherwise cascade to,
    or be refused by, the rows that reference it.  Set outside any
    transaction (inside one the pragma does nothing), checked before they
    are turned on again.  Other databases: nothing to do."""
    if conn.dialect.name != "sqlite":
        yield
        return
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise IndexUnavailable(f"the migration left {len(broken)} dangling references")
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


def stored_revision(engine: Engine) -> str | None:
    """The revision in the database's version table, read without Alembic;
    None if it has none (never migrated) or several (never written so by
    these linear migrations)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(_VERSION.name):
            return None
        revisions = conn.execute(select(_VERSION.c.version_num)).scalars().all()
    return str(revisions[0]) if len(revisions) == 1 else None


def require_current(engine: Engine) -> None:
    """Raise SchemaNotCurrent unless the database is at :data:`SCHEMA_REVISION`,
    IndexUnavailable if it cannot be asked (a worker's first request while
    the index server is down answers 503, and the next one asks again)."""
    try:
        current = stored_revision(engine)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        kind = type(orig).__name__ if orig is not None else type(exc).__name__
        raise IndexUnavailable(f"the index database does not answer ({kind})") from exc
    if current != SCHEMA_REVISION:
        found = "an empty database" if current is None else f"revision {current}"
        raise SchemaNotCurrent(
            f"the index database is at {found} but this version needs revision "
            f"{SCHEMA_REVISION}: run 'dicom-appliance migrate' (or set index.auto_migrate = true)"
        )
