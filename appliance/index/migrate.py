"""Schema migrations (Alembic), run by ``dicom-appliance migrate`` or by
``serve`` when ``index.auto_migrate`` is true."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from appliance.errors import SchemaNotCurrent

MIGRATIONS = Path(__file__).parent / "migrations"


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The schema revision this code expects."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision, or None if it was never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to *revision* (default: the newest)."""
    cfg = _alembic_config()
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def require_current(engine: Engine) -> None:
    """Raise SchemaNotCurrent unless the database is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        found = "an empty database" if current is None else f"revision {current}"
        raise SchemaNotCurrent(
            f"the index database is at {found} but this version needs revision {head}: "
            "run 'dicom-appliance migrate' (or set index.auto_migrate = true)"
        )
