"""PostgreSQL as the scaled-out index: every QIDO-RS / C-FIND access path is
answered through an index, never by reading a whole table.

The searches are the query layer's own statements, captured as they run and
explained with their parameters.  Sequential scans are disabled in the
session, so a plan still reading a whole table (a sequential scan, or a walk
of the primary key filtering every row) means that no index can serve the
search: the check holds whatever the table sizes, without filling millions
of rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event

from appliance.model import Level
from appliance.query import Query, QueryService
from tests.unit.test_query_matching import Index

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(index_engine: Engine) -> Iterator[Engine]:
    """The PostgreSQL index engine, its sessions without sequential scans."""

    def no_seqscan(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET enable_seqscan = off")

    event.listen(index_engine, "connect", no_seqscan)
    index_engine.dispose()  # new connections get the setting
    yield index_engine
    event.remove(index_engine, "connect", no_seqscan)


def _searches(
    engine: Engine, query: Query, partition_key: int | None = None
) -> list[tuple[str, Any]]:
    """The statements (SQL, parameters) the query layer runs for *query*
    (in the data partition *partition_key*; None: partitions off)."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        QueryService(engine, max_results=100, partition_key=partition_key).search(query)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def _whole_table_reads(plan: str) -> list[str]:
    """The plan's nodes that read a whole table: sequential scans, and
    scans of a primary key index with no condition on it (with sequential
    scans off, the planner walks the primary key, for the ORDER BY, and
    filters every row), and scans whose only index condition is the data
    partition (a walk of the whole partition: all of the index while there
    is one partition)."""
    found = []
    nodes = plan.split("->")
    for node in nodes:
        head = node.strip().splitlines()[0] if node.strip() else ""
        conditions = [line for line in node.splitlines() if "Index Cond" in line]
        partition_only = any(
            line.split("Index Cond:", 1)[1].strip().startswith("(partition_key =")
            for line in conditions
        )
        if (
            "Seq Scan" in head
            or ("Scan using pk_" in head and not conditions)
            or (head and partition_only)
        ):
            found.append(head)
    return found


def _plan(engine: Engine, statement: str, parameters: Any) -> str:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars()
        return "\n".join(rows)


@pytest.mark.parametrize("partition_key", [None, 1], ids=["partitions-off", "partitions-on"])
@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
def test_every_access_path_uses_an_index(engine: Engine, partition_key: int | None) -> None:
    index = Index(engine)
    first = index.add(
        patient_name="Smith^Ann",
        patient_id="P1",
        accession_number="ACC1",
        study_date="20150304",
        modality="CT",
    )
    for number in range(20):
        index.add(patient_name=f"Jones^{number}", patient_id=f"Q{number}", study_date="20160101")
    study_uid = first.study.study_instance_uid
    series_uid = first.series.series_instance_uid
    sop_uid = first.instance.sop_instance_uid
    access_paths = {
        "studies by PatientID": Query(Level.STUDY, {"PatientID": "P1"}),
        "studies by PatientName prefix": Query(Level.STUDY, {"PatientName": "SMI*"}),
        "studies by StudyDate range": Query(Level.STUDY, {"StudyDate": "20150101-20151231"}),
        "studies by AccessionNumber": Query(Level.STUDY, {"AccessionNumber": "ACC1"}),
        "one study": Query(Level.STUDY, {"StudyInstanceUID": study_uid}),
        "series of a study": Query(Level.SERIES, {"StudyInstanceUID": study_uid}),
        "instances of a series": Query(
            Level.IMAGE, {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
        ),
        "one instance": Query(Level.IMAGE, {"SOPInstanceUID": sop_uid}),
        "patients by PatientID": Query(Level.PATIENT, {"PatientID": "P1"}),
    }
    for name, query in access_paths.items():
        statements = _searches(engine, query, partition_key)
        assert statements, name
        for statement, parameters in statements:
            plan = _plan(engine, statement, parameters)
            assert not _whole_table_reads(plan), f"{name}:\n{statement}\n{plan}"


@pytest.mark.parametrize("partition_key", [None, 1], ids=["partitions-off", "partitions-on"])
@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
def test_the_check_sees_a_search_no_index_serves(engine: Engine, partition_key: int | None) -> None:
    """StudyDescription has no index (not an access path): its search reads
    the whole table (or, partitions on, the whole partition through the
    unique index of the UIDs), and the check says so."""
    Index(engine).add(patient_name="A^B", patient_id="P1")
    query = Query(Level.STUDY, {"StudyDescription": "x*"})
    statements = _searches(engine, query, partition_key)
    assert _whole_table_reads(_plan(engine, *statements[0]))
