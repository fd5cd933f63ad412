"""The query layer returns only what a search asks for (``Query.returned``),
and its wild card searches can use an index, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select, text

from appliance.index.schema import study
from appliance.model import Level, RequestAttributes
from appliance.query import RETURN_KEYS, Query, QueryService, matching
from appliance.query.keys import ATTRIBUTES
from tests.unit.test_query_matching import Index


@pytest.fixture
def index(index_engine: Engine) -> Index:
    return Index(index_engine)


@pytest.fixture
def service(index_engine: Engine) -> QueryService:
    return QueryService(index_engine, max_results=50)


def _fill(index: Index) -> None:
    index.add(patient_name="Smith^Ann", patient_id="P1", modality="CT", study_date="20150304")
    index.add(
        patient_name="Smythe^Bo=スミス",
        patient_id="P2",
        modality="MR",
        request_attributes=(RequestAttributes("SPS1", "RP1"),),
    )
    index.add(patient_name="Jones^Cy", patient_id="P3", modality="US")


@pytest.mark.parametrize("level", [Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE])
def test_returned_keys_only_and_the_same_matches(
    index: Index, service: QueryService, level: Level
) -> None:
    """A match carries exactly the keys asked for (those the level holds; a
    keyword it does not hold is ignored), and asking for fewer keys selects
    the same entities in the same order."""
    _fill(index)
    everything = service.search(Query(level, {"PatientName": "SM*"}))
    assert len(everything.matches) == 2
    assert all(set(match) == RETURN_KEYS[level] for match in everything.matches)
    wanted = frozenset({"PatientID", "ModalitiesInStudy", "RequestAttributesSequence", "Nope"})
    some = service.search(Query(level, {"PatientName": "SM*"}, returned=wanted))
    held = wanted & RETURN_KEYS[level]
    assert [set(match) for match in some.matches] == [held, held]
    assert [m["PatientID"] for m in some.matches] == [m["PatientID"] for m in everything.matches]
    for few, full in zip(some.matches, everything.matches, strict=True):
        assert few == {key: full[key] for key in held}


def test_returned_nothing_still_counts_and_pages(index: Index, service: QueryService) -> None:
    """An empty set of return keys gives empty matches, still limited and
    marked truncated like any other search."""
    _fill(index)
    result = service.search(Query(Level.STUDY, {}, limit=2, returned=frozenset()))
    assert result.matches == [{}, {}]
    assert result.truncated


def test_pn_prefix_is_one_like_on_the_name_c_2_2_2_4() -> None:
    """A PN value ending in '*' is one LIKE on the casefolded name: its
    trailing '%' already covers the later component groups, so the second
    LIKE of the first-group rule is left out (same matches, less work)."""
    attribute = ATTRIBUTES["PatientName"]
    prefix = matching.condition(attribute, study.c.patient_name_norm, "SMI*")
    inner = matching.condition(attribute, study.c.patient_name_norm, "SMI*TH")
    assert prefix is not None
    assert inner is not None
    assert str(prefix.compile()).count("LIKE") == 1
    assert str(inner.compile()).count("LIKE") == 2


def test_pn_prefix_search_uses_the_name_index(index_engine: Engine, index: Index) -> None:
    """The study-level prefix search ``PatientName=SMI*`` is answered from
    ``ix_study_patient_name_norm``.  On PostgreSQL that needs the index's
    ``varchar_pattern_ops`` operator class (migration 0004) unless the
    database collation is "C"; sequential scans are disabled so that the
    planner shows whether it could use the index at all."""
    _fill(index)
    condition = matching.condition(ATTRIBUTES["PatientName"], study.c.patient_name_norm, "SMI*")
    assert condition is not None
    statement = select(study.c.id).where(condition).compile(index_engine)
    with index_engine.connect() as conn:
        if index_engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = conn.exec_driver_sql(
                "EXPLAIN " + str(statement), statement.construct_params()
            ).scalars()
        else:
            params = statement.construct_params()
            plan = conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + str(statement),
                tuple(params[name] for name in statement.positiontup or ()),
            ).scalars(3)
        assert "ix_study_patient_name_norm" in "\n".join(plan)


@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
def test_postgresql_pattern_indexes(index_engine: Engine) -> None:
    """Migration 0004: the indexes of the columns matched with wild cards
    use ``varchar_pattern_ops`` on PostgreSQL (an operator class of
    PostgreSQL only)."""
    with index_engine.connect() as conn:
        rows = conn.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        )
        definitions = {str(name): str(definition) for name, definition in rows}
    for name in (
        "ix_patient_patient_name_norm",
        "ix_study_patient_name_norm",
        "ix_study_patient_id",
        "ix_study_accession_number",
    ):
        assert "varchar_pattern_ops" in definitions[name], name
