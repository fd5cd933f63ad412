"""Data partitions (issue 11), shaped as Microsoft's DICOM server has them
(REFERENCE.md, "Data partitions"): optional (``[partitions] enabled``), a
partition per name of 1 to 64 characters ``[A-Za-z0-9._-]``, created by the
first write into it, and data in one partition invisible from another (the
same UIDs may be stored in two partitions as two independent records).

Every row of the index carries its partition's key
(:data:`appliance.index.schema.DEFAULT_PARTITION_KEY` for
``Microsoft.Default``, the only partition while the feature is off); the
services of one request or association are bound to one partition
(:meth:`appliance.services.Services.in_partition`).  This module names and
finds the partitions: :class:`Partitions` keeps the name -> key map of one
process, read from the ``data_partition`` table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from appliance.config import NAME_PATTERN
from appliance.errors import IndexUnavailable
from appliance.index.engine import as_utc, describe_failure, write_transaction
from appliance.index.schema import DEFAULT_PARTITION_KEY, data_partition

#: The default partition's name (the seed service's).
DEFAULT_NAME = "Microsoft.Default"

#: A partition name: 1 to 64 of ASCII letters, digits, ``.``, ``_`` and ``-``
#: (the rule ``[partitions]`` and ``[[dimse.peers]] partition`` are checked by).
NAME = NAME_PATTERN

#: A key no partition has: the services of a partition that does not exist
#: (yet) are bound to it, so they find nothing.
NO_PARTITION_KEY = 0


def valid_name(name: str) -> bool:
    """True if *name* may name a partition."""
    return NAME.fullmatch(name) is not None


@dataclasses.dataclass(frozen=True)
class Partition:
    """One data partition."""

    key: int
    name: str
    created_at: dt.datetime

    def to_json(self) -> dict[str, object]:
        """The seed service's shape (``GET /partitions``)."""
        return {
            "partitionKey": self.key,
            "partitionName": self.name,
            "createdDate": self.created_at.isoformat(),
        }


class Partitions:
    """The data partitions of one index: name -> key, cached in this process
    (a partition is never renamed nor removed, so a key once read stays
    true)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._keys: dict[str, int] = {DEFAULT_NAME: DEFAULT_PARTITION_KEY}

    def key_of(self, name: str) -> int | None:
        """The key of the partition *name*, or None if it does not exist."""
        with self._lock:
            found = self._keys.get(name)
        if found is not None:
            return found
        try:
            with self._engine.connect() as conn:
                key = conn.execute(
                    select(data_partition.c.key).where(data_partition.c.name == name)
                ).scalar_one_or_none()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({describe_failure(exc)})") from exc
        if key is None:
            return None
        with self._lock:
            self._keys[name] = int(key)
        return int(key)

    def name_of(self, key: int) -> str | None:
        """The name of the partition *key*, or None if there is none."""
        with self._lock:
            for name, found in self._keys.items():
                if found == key:
                    return name
        for partition in self.all():
            with self._lock:
                self._keys[partition.name] = partition.key
            if partition.key == key:
                return partition.name
        return None

    def ensure(self, name: str) -> int:
        """The key of the partition *name*, created if it does not exist
        (the first write into a partition creates it; two writers creating
        it at once get the same key)."""
        found = self.key_of(name)
        if found is not None:
            return found
        if not valid_name(name):
            raise ValueError(f"{name!r} is not a partition name")
        insert = postgresql.insert if self._engine.dialect.name == "postgresql" else sqlite.insert
        statement = (
            insert(data_partition)
            .values(name=name, created_at=dt.datetime.now(dt.UTC))
            .on_conflict_do_nothing(index_elements=["name"])
        )
        with write_transaction(self._engine) as conn:  # IndexUnavailable if it fails
            conn.execute(statement)
        key = self.key_of(name)
        if key is None:  # pragma: no cover - the row was just written
            raise IndexUnavailable(f"the partition {name} could not be created")
        return key

    def all(self) -> list[Partition]:
        """Every partition, in key order (the default one first)."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(select(data_partition).order_by(data_partition.c.key)).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({describe_failure(exc)})") from exc
        return [Partition(int(r.key), str(r.name), as_utc(r.created_at)) for r in rows]

    def others_exist(self) -> bool:
        """True if a partition other than the default one exists."""
        return any(p.key != DEFAULT_PARTITION_KEY for p in self.all())
