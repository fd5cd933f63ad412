"""``dicom-appliance stats``: what the index holds, in total and broken down
by modality, by sending AE and by day of storage.

Every figure counts stored instances (the ``instance`` table) and the
studies and series they belong to; sizes are the sum of the instances' blob
sizes (the bytes as received).  All queries run in one read transaction
(PostgreSQL: REPEATABLE READ), so the breakdowns and the totals describe
the same moment while the appliance keeps storing.

- **by modality**: the series' Modality (0008,0060); a study with series of
  several modalities counts once under each, so the studies of the rows
  may add up to more than the total.
- **by day**: the UTC date an instance was first stored (``created_at``;
  replacing it later keeps that date); studies and series are those that
  received an instance that day.
- **by sending AE**: the Calling AE Title of the C-STORE that brought each
  instance (``instance.source_ae``, migration 0009); STOW-RS and import have
  none (key ""), nor have instances stored before that migration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Select, String, cast, func, select
from sqlalchemy.sql.elements import ColumnElement

from appliance.index.schema import instance, series

#: Breakdowns that can be asked for.
BREAKDOWNS = ("modality", "ae", "day")


@dataclasses.dataclass(frozen=True)
class Counts:
    """Studies, series and instances, and the instances' bytes."""

    studies: int
    series: int
    instances: int
    bytes: int

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Stats:
    """The totals and each breakdown asked for (key -> counts, in order)."""

    totals: Counts
    by_modality: dict[str, Counts] | None = None
    by_ae: dict[str, Counts] | None = None
    by_day: dict[str, Counts] | None = None

    def as_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {"totals": self.totals.as_json()}
        for name, rows in (
            ("by_modality", self.by_modality),
            ("by_ae", self.by_ae),
            ("by_day", self.by_day),
        ):
            if rows is not None:
                result[name] = [{"key": key, **value.as_json()} for key, value in rows.items()]
        return result


def _counts(key: ColumnElement[Any] | None) -> Select[Any]:
    """Studies, series, instances and bytes of the instance table, grouped
    by *key* (a column of instance joined to series) if given."""
    columns: list[Any] = [
        func.count(func.distinct(instance.c.study_fk)),
        func.count(func.distinct(instance.c.series_fk)),
        func.count(instance.c.id),
        func.coalesce(func.sum(instance.c.size), 0),
    ]
    if key is None:
        return select(*columns).select_from(instance)
    labelled = key.label("key")
    return (
        select(labelled, *columns)
        .select_from(instance.join(series, series.c.id == instance.c.series_fk))
        .group_by(labelled)
        .order_by(labelled)
    )


def _day(dialect: str) -> ColumnElement[Any]:
    """The UTC date of ``instance.created_at`` as ``YYYY-MM-DD`` text."""
    if dialect == "postgresql":
        return cast(func.date(func.timezone("UTC", instance.c.created_at)), String)
    # SQLite keeps the UTC time as ISO text: date() takes its date part
    return func.date(instance.c.created_at)


def _row(values: Sequence[Any]) -> Counts:
    studies, series_, instances, size = values
    return Counts(int(studies), int(series_), int(instances), int(size or 0))


def collect(
    engine: Engine,
    breakdowns: Sequence[str] = BREAKDOWNS,
    progress: Callable[[int, int], None] | None = None,
) -> Stats:
    """The totals and the *breakdowns* (names of :data:`BREAKDOWNS`) of the
    index of *engine*; *progress* is called with (queries done, queries).

    Raises
    ------
    ValueError
        for a breakdown not in :data:`BREAKDOWNS`.
    """
    unknown = [name for name in breakdowns if name not in BREAKDOWNS]
    if unknown:
        raise ValueError(f"no breakdown {unknown[0]!r}")
    queries: list[tuple[str, Select[Any]]] = [("totals", _counts(None))]
    if "modality" in breakdowns:
        queries.append(("modality", _counts(series.c.modality)))
    if "ae" in breakdowns:
        queries.append(("ae", _counts(instance.c.source_ae)))
    if "day" in breakdowns:
        queries.append(("day", _counts(_day(engine.dialect.name))))
    results: dict[str, list[Any]] = {}
    with engine.connect() as conn:
        _consistent(conn)
        with conn.begin():
            for done, (name, query) in enumerate(queries, start=1):
                results[name] = list(conn.execute(query))
                if progress is not None:
                    progress(done, len(queries))
    totals = _row(results["totals"][0])
    return Stats(
        totals=totals,
        by_modality=_grouped(results["modality"]) if "modality" in results else None,
        by_ae=_grouped(results["ae"]) if "ae" in results else None,
        by_day=_grouped(results["day"]) if "day" in results else None,
    )


def _grouped(rows: Sequence[Any]) -> dict[str, Counts]:
    return {str(row[0]): _row(row[1:]) for row in rows}


def _consistent(conn: Connection) -> None:
    """One snapshot for every query of the transaction: REPEATABLE READ on
    PostgreSQL (SQLite's WAL reader has one snapshot per transaction)."""
    if conn.dialect.name == "postgresql":
        conn.execution_options(isolation_level="REPEATABLE READ")
