"""The query layer against a real index, on SQLite and on PostgreSQL.

Every matching test names the PS3.4 C.2.2.2 rule it checks.  Rows are put in
the index by the ingest's own writer (:meth:`SqlIndex.add_instance`).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine

from appliance.errors import QueryError
from appliance.index.sql import SqlIndex
from appliance.model import (
    InstanceAttributes,
    InstanceRecord,
    Level,
    PatientAttributes,
    RequestAttributes,
    SeriesAttributes,
    StudyAttributes,
)
from appliance.query import MATCHING_KEYS, Query, QueryResult, QueryService
from appliance.storage.base import BlobInfo

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

_PARTS = (PatientAttributes, StudyAttributes, SeriesAttributes, InstanceAttributes)
_FIELDS = {part: {f.name for f in dataclasses.fields(part)} for part in _PARTS}


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


class Index:
    """Puts instances in the index with as few words as a test needs."""

    def __init__(self, engine: Engine) -> None:
        self.sql = SqlIndex(engine)

    def add(self, **values: Any) -> InstanceRecord:
        """Index one instance; *values* are fields of the model's attribute
        classes (e.g. ``study_date=...``), UIDs are made up when absent."""
        given: dict[type, dict[str, Any]] = {part: {} for part in _PARTS}
        for name, value in values.items():
            owner = next((p for p in _PARTS if name in _FIELDS[p]), None)
            assert owner is not None, f"no attribute field named {name}"
            given[owner][name] = value
        record = InstanceRecord(
            patient=PatientAttributes(**given[PatientAttributes]),
            study=StudyAttributes(**{"study_instance_uid": new_uid(), **given[StudyAttributes]}),
            series=SeriesAttributes(
                **{"series_instance_uid": new_uid(), **given[SeriesAttributes]}
            ),
            instance=InstanceAttributes(
                **{
                    "sop_instance_uid": new_uid(),
                    "sop_class_uid": CT_IMAGE,
                    "transfer_syntax_uid": EXPLICIT_LE,
                    **given[InstanceAttributes],
                }
            ),
        )
        self.sql.add_instance(record, BlobInfo(key=uuid.uuid4().hex, size=1))
        return record


@pytest.fixture
def index(index_engine: Engine) -> Index:
    return Index(index_engine)


@pytest.fixture
def service(index_engine: Engine) -> QueryService:
    return QueryService(index_engine, max_results=50)


def search(service: QueryService, level: Level, **keys: str) -> QueryResult:
    return service.search(Query(level=level, keys=keys))


def values(result: QueryResult, keyword: str) -> list[Any]:
    return [match[keyword] for match in result.matches]


def found(service: QueryService, keyword: str, value: str, level: Level = Level.STUDY) -> set[Any]:
    """The *keyword* values of the matches of one key at *level*."""
    return set(values(search(service, level, **{keyword: value}), keyword))


# --------------------------------------------------------------- C.2.2.2.1


def test_single_value_is_exact_and_case_sensitive_c_2_2_2_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.1: only values that match exactly, case-sensitive."""
    index.add(accession_number="ACC1")
    index.add(accession_number="acc1")
    index.add(accession_number="ACC12")
    assert found(service, "AccessionNumber", "ACC1") == {"ACC1"}
    assert found(service, "AccessionNumber", " ACC1 ") == {"ACC1"}  # padding not significant
    assert found(service, "AccessionNumber", "ACC") == set()


def test_single_value_pn_is_case_insensitive_c_2_2_2_1(index: Index, service: QueryService) -> None:
    """PS3.4 C.2.2.2.1: PN literal matching may be insensitive to case."""
    index.add(patient_name="Doe^John", patient_id="P1")
    index.add(patient_name="Doe^Jane", patient_id="P2")
    assert found(service, "PatientName", "DOE^JOHN") == {"Doe^John"}
    assert found(service, "PatientName", "doe^john") == {"Doe^John"}
    assert found(service, "PatientName", "doe") == set()


def test_single_value_pn_matches_the_alphabetic_component_group_c_2_2_2_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.1 / PS3.5 6.2.1: a value without '=' matches the whole
    name or its first (alphabetic) group; a value with '=' the whole name.
    The stored value comes back with its groups untouched."""
    stored = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    index.add(patient_name=stored, patient_id="P1")
    index.add(patient_name="Yamada^Hanako", patient_id="P2")
    assert found(service, "PatientName", "YAMADA^TAROU") == {stored}
    assert found(service, "PatientName", stored.upper()) == {stored}
    assert found(service, "PatientName", "山田^太郎") == set()
    assert found(service, "PatientName", "yamada^tarou=山田^太郎") == set()


def test_single_value_pn_on_referring_physician_c_2_2_2_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.1: every PN key is case-insensitive, not only PatientName."""
    index.add(referring_physician_name="House^Gregory")
    index.add(referring_physician_name="Wilson^James")
    assert found(service, "ReferringPhysicianName", "house^gregory") == {"House^Gregory"}
    assert found(service, "ReferringPhysicianName", "HOUSE*") == {"House^Gregory"}


def test_single_value_integer_matches_the_number_c_2_2_2_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.1 on IS/US: the number, so '007' matches 7; a row
    without a number never matches."""
    index.add(series_number=7, instance_number=1, rows=512)
    index.add(series_number=8, instance_number=2, rows=256)
    index.add(series_number=None, instance_number=None, rows=None)
    assert found(service, "SeriesNumber", "007", Level.SERIES) == {7}
    assert found(service, "InstanceNumber", "2", Level.IMAGE) == {2}
    assert found(service, "Rows", "512", Level.IMAGE) == {512}


def test_single_value_date_accepts_the_retired_form_c_2_2_2_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.1 on DA: equality on YYYYMMDD; YYYY.MM.DD is read too."""
    index.add(study_date="20200315")
    index.add(study_date="20200316")
    assert found(service, "StudyDate", "20200315") == {"20200315"}
    assert found(service, "StudyDate", "2020.03.15") == {"20200315"}


def test_single_value_time_compares_fixed_width_keys_c_2_2_2_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.1 on TM: '1030' is 10:30:00 and matches '103000'."""
    index.add(study_time="103000")
    index.add(study_time="103001")
    assert found(service, "StudyTime", "1030") == {"103000"}
    assert found(service, "StudyTime", "10:30:00") == {"103000"}


# --------------------------------------------------------------- C.2.2.2.2


def test_list_of_uid_matching_c_2_2_2_2(index: Index, service: QueryService) -> None:
    """PS3.4 C.2.2.2.2: each UID of a backslash-separated list may match."""
    a, b, _ = (index.add().study.study_instance_uid for _ in range(3))
    assert found(service, "StudyInstanceUID", f"{a}\\{b}") == {a, b}
    assert found(service, "StudyInstanceUID", a) == {a}
    assert found(service, "StudyInstanceUID", f"{a}\\{a}") == {a}


def test_list_of_uid_matching_at_image_level_c_2_2_2_2(index: Index, service: QueryService) -> None:
    """PS3.4 C.2.2.2.2 on SOPInstanceUID and SOPClassUID."""
    one = index.add().instance.sop_instance_uid
    two = index.add(sop_class_uid="1.2.840.10008.5.1.4.1.1.4").instance.sop_instance_uid
    index.add()
    assert found(service, "SOPInstanceUID", f"{one}\\{two}", Level.IMAGE) == {one, two}
    mr = search(service, Level.IMAGE, SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    assert values(mr, "SOPInstanceUID") == [two]


@pytest.mark.parametrize(
    "value",
    ["1.2.3\\1.2.*", "1.2.3\\", "1.02.3", "abc", "1.2.3\\1..2", "1.2?"],
)
def test_malformed_uid_lists_are_refused_c_2_2_2_2(service: QueryService, value: str) -> None:
    """PS3.4 C.2.2.2.2: each item is a single UID (no wild card, C.2.2.2.4);
    a malformed UID (PS3.5 9.1) is refused with the key's name."""
    with pytest.raises(QueryError, match="StudyInstanceUID"):
        search(service, Level.STUDY, StudyInstanceUID=value)


# --------------------------------------------------------------- C.2.2.2.3


@pytest.mark.parametrize("value", ["", "*", "**", "  "])
def test_universal_matching_c_2_2_2_3(index: Index, service: QueryService, value: str) -> None:
    """PS3.4 C.2.2.2.3 (and the C.2.2.2.4 Note on '*'): every entity
    matches, including those with an empty value, for every VR."""
    index.add(study_description="Head", study_date="20200101", study_time="1000")
    index.add(study_description="", study_date="", study_time="")
    for keyword in (
        "StudyDescription",
        "StudyDate",
        "StudyTime",
        "StudyInstanceUID",
        "PatientName",
        "ModalitiesInStudy",
    ):
        assert len(search(service, Level.STUDY, **{keyword: value}).matches) == 2, keyword
    image_keys = {"InstanceNumber": value, "SOPInstanceUID": value}
    assert len(search(service, Level.IMAGE, **image_keys).matches) == 2


# --------------------------------------------------------------- C.2.2.2.4


def test_wildcard_star_c_2_2_2_4(index: Index, service: QueryService) -> None:
    """PS3.4 C.2.2.2.4: '*' matches any sequence, including none;
    case-sensitive outside PN."""
    for text in ("CT HEAD", "CT", "MR HEAD", "ct head"):
        index.add(study_description=text)
    assert found(service, "StudyDescription", "CT*") == {"CT HEAD", "CT"}
    assert found(service, "StudyDescription", "*HEAD") == {"CT HEAD", "MR HEAD"}
    assert found(service, "StudyDescription", "*T*") == {"CT HEAD", "CT"}


def test_wildcard_question_mark_c_2_2_2_4(index: Index, service: QueryService) -> None:
    """PS3.4 C.2.2.2.4: '?' matches exactly one character."""
    for text in ("CT HEAD", "MR HEAD", "PET HEAD"):
        index.add(study_description=text)
    assert found(service, "StudyDescription", "?? HEAD") == {"CT HEAD", "MR HEAD"}
    assert found(service, "StudyDescription", "??? HEAD") == {"PET HEAD"}
    assert found(service, "StudyDescription", "?") == set()


def test_wildcard_pn_is_case_insensitive_and_sees_the_first_group_c_2_2_2_4(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.4: PN wild card matching is implementation dependent;
    ours is case-insensitive and matches the whole name or its first group."""
    index.add(patient_name="Yamada^Tarou=山田^太郎", patient_id="P1")
    index.add(patient_name="Doe^John", patient_id="P2")
    assert found(service, "PatientName", "YAMA*") == {"Yamada^Tarou=山田^太郎"}
    assert found(service, "PatientName", "?amada^taro?") == {"Yamada^Tarou=山田^太郎"}
    assert found(service, "PatientName", "*^JOHN") == {"Doe^John"}
    assert found(service, "PatientName", "*=山田*") == {"Yamada^Tarou=山田^太郎"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100%*", {"100%", "100% sure"}),
        ("100%", {"100%"}),
        ("a_b*", {"a_b"}),
        ("a_b", {"a_b"}),
        ("a\\b*", {"a\\b"}),
        ("a\\b", {"a\\b"}),
        ("a!b*", {"a!b"}),
        ("*!*", {"a!b", "a!!b"}),
        ("a!!b", {"a!!b"}),
        ("*%*", {"100%", "100% sure"}),
        ("*_*", {"a_b"}),
    ],
)
def test_like_metacharacters_match_literally_c_2_2_2_4(
    index: Index, service: QueryService, value: str, expected: set[str]
) -> None:
    """PS3.4 C.2.2.2.4: only '*' and '?' are wild cards; '%', '_', '\\' and
    the LIKE escape character in a value match themselves."""
    for text in ("100%", "100% sure", "1000", "a_b", "axb", "a\\b", "a!b", "a!!b", "ab"):
        index.add(study_description=text)
    assert found(service, "StudyDescription", value) == expected


def test_pn_component_group_rule_escapes_like_metacharacters_c_2_2_2_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.1: the first-group match of a PN single value is a LIKE
    internally; '%' and '_' in the value must still match literally."""
    index.add(patient_name="O%Brien=X", patient_id="P1")
    index.add(patient_name="OxBrien=X", patient_id="P2")
    index.add(patient_name="O_Brien=X", patient_id="P3")
    assert found(service, "PatientName", "o%brien") == {"O%Brien=X"}
    assert found(service, "PatientName", "o_brien") == {"O_Brien=X"}


@pytest.mark.parametrize(
    ("level", "keyword", "value"),
    [
        (Level.STUDY, "StudyInstanceUID", "1.2.*"),
        (Level.STUDY, "StudyDate", "2020*"),
        (Level.STUDY, "StudyTime", "10?0"),
        (Level.SERIES, "SeriesNumber", "1*"),
        (Level.IMAGE, "Rows", "5?2"),
        (Level.IMAGE, "SOPClassUID", "?"),
    ],
)
def test_wildcards_refused_on_ui_da_tm_and_numbers_c_2_2_2_4(
    service: QueryService, level: Level, keyword: str, value: str
) -> None:
    """PS3.4 C.2.2.2.4: no Wild Card Matching on UI, DA, TM, IS, US (only a
    lone '*', which is universal)."""
    with pytest.raises(QueryError, match=keyword):
        search(service, level, **{keyword: value})


# --------------------------------------------------------------- C.2.2.2.5


@pytest.fixture
def dated(index: Index) -> None:
    for date in ("20191231", "20200101", "20200615", "20201231", "20210101", ""):
        index.add(study_date=date)


@pytest.mark.usefixtures("dated")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20200101-20201231", {"20200101", "20200615", "20201231"}),
        ("2020.01.01-2020.12.31", {"20200101", "20200615", "20201231"}),
        (" 20200101 - 20201231 ", {"20200101", "20200615", "20201231"}),
        ("-20200101", {"20191231", "20200101"}),
        ("20201231-", {"20201231", "20210101"}),
        ("20200102-20200614", set()),
        ("20200615-20200615", {"20200615"}),
    ],
)
def test_date_range_matching_c_2_2_2_5_1(
    service: QueryService, value: str, expected: set[str]
) -> None:
    """PS3.4 C.2.2.2.5.1: 'a-b' inclusive, '-b' up to and including b, 'a-'
    from a on; a study without a date is in no range."""
    assert found(service, "StudyDate", value) == expected


def test_date_range_on_patient_and_series_dates_c_2_2_2_5_1(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.5.1 on PatientBirthDate (PATIENT and STUDY level) and
    PerformedProcedureStepStartDate (SERIES level)."""
    index.add(patient_id="P1", patient_birth_date="19500101")
    index.add(patient_id="P2", patient_birth_date="19800101")
    index.add(patient_id="P3", patient_birth_date="")
    for level in (Level.PATIENT, Level.STUDY):
        assert found(service, "PatientID", "*", level) == {"P1", "P2", "P3"}
        result = search(service, level, PatientBirthDate="-19700101")
        assert values(result, "PatientID") == ["P1"]
    index.add(performed_procedure_step_start_date="20220202")
    index.add(performed_procedure_step_start_date="")
    result = search(service, Level.SERIES, PerformedProcedureStepStartDate="20220101-")
    assert values(result, "PerformedProcedureStepStartDate") == ["20220202"]


@pytest.fixture
def timed(index: Index) -> None:
    for time in ("000000", "0930", "10", "115959.999999", "120000", "120000.5", "2359", ""):
        index.add(study_time=time)


@pytest.mark.usefixtures("timed")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10-12", {"10", "115959.999999", "120000"}),
        ("1000-1200", {"10", "115959.999999", "120000"}),
        ("10:00-12:00", {"10", "115959.999999", "120000"}),
        ("-12", {"000000", "0930", "10", "115959.999999", "120000"}),
        ("-0930", {"000000", "0930"}),
        ("12-", {"120000", "120000.5", "2359"}),
        ("120000.1-", {"120000.5", "2359"}),
        ("-000000", {"000000"}),
    ],
)
def test_time_range_matching_with_short_forms_c_2_2_2_5_2(
    service: QueryService, value: str, expected: set[str]
) -> None:
    """PS3.4 C.2.2.2.5.2: direct comparison of times within a day; a bound
    with omitted components is that exact time ('-12' ends at 12:00:00.0,
    so 12:00:00.5 is after it); a study without a time is in no range."""
    assert found(service, "StudyTime", value) == expected


def test_time_range_on_performed_procedure_step_c_2_2_2_5_2(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.5.2 on PerformedProcedureStepStartTime (SERIES level)."""
    index.add(performed_procedure_step_start_time="0800")
    index.add(performed_procedure_step_start_time="1700")
    index.add(performed_procedure_step_start_time="")
    result = search(service, Level.SERIES, PerformedProcedureStepStartTime="07-09")
    assert values(result, "PerformedProcedureStepStartTime") == ["0800"]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyDate", "2020"),
        ("StudyDate", "20201301"),
        ("StudyDate", "20200230"),
        ("StudyDate", "2020-01-01"),
        ("StudyDate", "-"),
        ("StudyDate", "20201231-20200101"),
        ("StudyDate", "20200101\\20200102"),
        ("StudyDate", "yesterday"),
        ("StudyTime", "25"),
        ("StudyTime", "1260"),
        ("StudyTime", "12-10"),
        ("StudyTime", "noon"),
        ("StudyTime", "1-2-3"),
    ],
)
def test_malformed_dates_times_and_ranges_are_refused_c_2_2_2_5(
    service: QueryService, keyword: str, value: str
) -> None:
    """PS3.4 C.2.2.2.5: a range has one '-' and at least one bound, each a
    valid DA/TM, lower <= upper (no range across midnight)."""
    with pytest.raises(QueryError, match=keyword):
        search(service, Level.STUDY, **{keyword: value})


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SeriesNumber", "one"),
        ("SeriesNumber", "1-3"),
        ("SeriesNumber", "1.5"),
        ("SeriesNumber", "1\\2"),
        ("SeriesNumber", "99999999999"),
    ],
)
def test_malformed_integers_are_refused(service: QueryService, keyword: str, value: str) -> None:
    """IS/US keys take only Single Value Matching of an integer in range
    (PS3.4 C.2.2.2.1; PS3.5 6.2)."""
    with pytest.raises(QueryError, match=keyword):
        search(service, Level.SERIES, **{keyword: value})


def test_negative_or_oversized_us_is_refused(service: QueryService) -> None:
    """US is 0..65535 (PS3.5 6.2)."""
    for value in ("-1", "65536"):
        with pytest.raises(QueryError, match="Columns"):
            search(service, Level.IMAGE, Columns=value)


# ------------------------------------------------------ ModalitiesInStudy


def test_modalities_in_study_single_and_list_c_6_1_1_3_1(
    index: Index, service: QueryService
) -> None:
    """ModalitiesInStudy (PS3.4 C.6.1.1.3.1) matches a study having a series
    of that modality (C.2.2.2.1); a backslash list means any of them."""
    ct_mr = index.add(modality="CT").study.study_instance_uid
    index.add(study_instance_uid=ct_mr, modality="MR")
    us = index.add(modality="US").study.study_instance_uid
    index.add(modality="")
    assert set(
        values(search(service, Level.STUDY, ModalitiesInStudy="MR"), "StudyInstanceUID")
    ) == {ct_mr}
    either = search(service, Level.STUDY, ModalitiesInStudy="US\\MR")
    assert set(values(either, "StudyInstanceUID")) == {ct_mr, us}
    assert search(service, Level.STUDY, ModalitiesInStudy="NM").matches == []
    # C.2.2.2.4 Wild Card Matching on CS items
    wild = search(service, Level.STUDY, ModalitiesInStudy="?R")
    assert set(values(wild, "StudyInstanceUID")) == {ct_mr}


def test_modalities_in_study_filters_a_series_query_by_study(
    index: Index, service: QueryService
) -> None:
    """At SERIES level ModalitiesInStudy is a study key (PS3.4 C.4.1.2.1):
    it selects every series of a matching study, not only the MR series."""
    ct = index.add(modality="CT")
    index.add(study_instance_uid=ct.study.study_instance_uid, modality="MR")
    index.add(modality="CT")
    result = search(service, Level.SERIES, ModalitiesInStudy="MR")
    assert sorted(values(result, "Modality")) == ["CT", "MR"]
    assert set(values(result, "StudyInstanceUID")) == {ct.study.study_instance_uid}


# ----------------------------------------------------- hierarchy (C.4.1.2.1)


def test_series_query_is_filtered_by_study_and_patient_keys(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.4.1.2.1: keys of the levels above the query level select too."""
    a = index.add(patient_id="P1", patient_name="Doe^John", modality="CT")
    index.add(
        patient_id="P1",
        patient_name="Doe^John",
        study_instance_uid=a.study.study_instance_uid,
        modality="SR",
    )
    index.add(patient_id="P2", patient_name="Roe^Richard", modality="CT")
    result = search(service, Level.SERIES, StudyInstanceUID=a.study.study_instance_uid)
    assert sorted(values(result, "Modality")) == ["CT", "SR"]
    result = search(service, Level.SERIES, PatientName="doe*", Modality="CT")
    assert values(result, "SeriesInstanceUID") == [a.series.series_instance_uid]


def test_image_query_is_filtered_by_study_date(index: Index, service: QueryService) -> None:
    """PS3.4 C.4.1.2.1 and C.2.2.2.5.1: a study-level range at IMAGE level."""
    old = index.add(study_date="20190101")
    new = index.add(study_date="20230101")
    index.add(study_instance_uid=new.study.study_instance_uid, study_date="20230101")
    result = search(service, Level.IMAGE, StudyDate="20200101-")
    assert len(result.matches) == 2
    assert set(values(result, "StudyInstanceUID")) == {new.study.study_instance_uid}
    result = search(service, Level.IMAGE, StudyDate="-20191231")
    assert values(result, "SOPInstanceUID") == [old.instance.sop_instance_uid]


@pytest.mark.parametrize(
    ("level", "keyword"),
    [
        (Level.PATIENT, "StudyDate"),
        (Level.PATIENT, "ModalitiesInStudy"),
        (Level.STUDY, "Modality"),
        (Level.STUDY, "SeriesInstanceUID"),
        (Level.SERIES, "SOPInstanceUID"),
        (Level.SERIES, "InstanceNumber"),
    ],
)
def test_key_below_the_query_level_is_refused(
    service: QueryService, level: Level, keyword: str
) -> None:
    """PS3.4 C.4.1.2.1: a hierarchical query has keys at its level or above,
    even a universal one."""
    for value in ("X", ""):
        with pytest.raises(QueryError, match=f"{keyword} is a .*-level key"):
            search(service, level, **{keyword: value})


@pytest.mark.parametrize(
    "keyword",
    ["PatientWeight", "studydate", "OtherPatientIDs", "NumberOfStudyRelatedInstances"],
)
def test_unknown_or_unindexed_key_is_refused(service: QueryService, keyword: str) -> None:
    """A key the index cannot match is refused, naming the key."""
    with pytest.raises(QueryError, match=keyword):
        search(service, Level.STUDY, **{keyword: ""})


def test_returned_only_attributes_are_not_matching_keys(service: QueryService) -> None:
    """TransferSyntaxUID etc. are returned, never matched (PS3.4 C.2.2.2:
    Specific Character Set 'is never matched')."""
    for keyword in ("TransferSyntaxUID", "SpecificCharacterSet", "TimezoneOffsetFromUTC"):
        assert keyword not in QueryService.matching_keys(Level.IMAGE)
        assert keyword in QueryService.return_keys(Level.IMAGE)
        with pytest.raises(QueryError, match=f"{keyword} is returned but is not a matching"):
            search(service, Level.IMAGE, **{keyword: "x"})


def test_matching_keys_per_level() -> None:
    """Each level's keys include those of the levels above (PS3.4 C.4.1.2.1)."""
    patient = QueryService.matching_keys(Level.PATIENT)
    study = QueryService.matching_keys(Level.STUDY)
    series = QueryService.matching_keys(Level.SERIES)
    image = QueryService.matching_keys(Level.IMAGE)
    assert patient == {
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
    }
    assert patient < study < series < image
    assert {"StudyDate", "ModalitiesInStudy", "ReferringPhysicianName"} <= study
    assert "Modality" not in study
    assert {"Modality", "SeriesNumber", "PerformedProcedureStepStartTime"} <= series - study
    assert {"SOPClassUID", "Rows", "NumberOfFrames"} <= image - series
    assert MATCHING_KEYS[Level.SERIES] == series


# --------------------------------------------------------------- C.2.2.2.6

SPS = "RequestAttributesSequence.ScheduledProcedureStepID"
RP = "RequestAttributesSequence.RequestedProcedureID"


def test_sequence_matching_on_request_attributes_c_2_2_2_6(
    index: Index, service: QueryService
) -> None:
    """PS3.4 C.2.2.2.6 Sequence Matching (PS3.18 Table 10.6.1-5 series keys):
    a series matches if one item matches every key given, each by its VR's
    rules; all-universal keys match every series, items or none."""
    both = index.add(
        request_attributes=(
            RequestAttributes("SPS1", "RP1"),
            RequestAttributes("SPS2", "RP2"),
        )
    )
    other = index.add(request_attributes=(RequestAttributes("SPS3", "RP1"),))
    bare = index.add()

    def series_uids(**keys: str) -> set[str]:
        return set(values(search(service, Level.SERIES, **keys), "SeriesInstanceUID"))

    uid = {r: r.series.series_instance_uid for r in (both, other, bare)}
    assert series_uids(**{SPS: "SPS2"}) == {uid[both]}
    assert series_uids(**{RP: "RP1"}) == {uid[both], uid[other]}
    # both keys must match the same item
    assert series_uids(**{SPS: "SPS1", RP: "RP1"}) == {uid[both]}
    assert series_uids(**{SPS: "SPS1", RP: "RP2"}) == set()
    assert series_uids(**{SPS: "SPS?", RP: "RP1"}) == {uid[both], uid[other]}
    assert series_uids(**{SPS: "", RP: "*"}) == set(uid.values())
    # the image level filters by it too; the study level does not know it
    assert len(search(service, Level.IMAGE, **{SPS: "SPS3"}).matches) == 1
    with pytest.raises(QueryError, match="SERIES-level key"):
        search(service, Level.STUDY, **{SPS: "SPS1"})


def test_request_attributes_are_returned_as_items(index: Index, service: QueryService) -> None:
    record = index.add(
        request_attributes=(RequestAttributes("SPS1", "RP1"), RequestAttributes("SPS2", ""))
    )
    index.add()
    matches = {
        m["SeriesInstanceUID"]: m["RequestAttributesSequence"]
        for m in search(service, Level.SERIES).matches
    }
    assert matches.pop(record.series.series_instance_uid) == [
        {"ScheduledProcedureStepID": "SPS1", "RequestedProcedureID": "RP1"},
        {"ScheduledProcedureStepID": "SPS2", "RequestedProcedureID": ""},
    ]
    assert list(matches.values()) == [[]]
    (image,) = [
        m
        for m in search(service, Level.IMAGE).matches
        if m["SeriesInstanceUID"] == record.series.series_instance_uid
    ]
    assert len(image["RequestAttributesSequence"]) == 2
    assert "RequestAttributesSequence" not in QueryService.return_keys(Level.STUDY)


def test_timezone_offset_is_returned_at_every_level_below_patient(
    index: Index, service: QueryService
) -> None:
    """TimezoneOffsetFromUTC is a default return attribute of all three QIDO
    levels (PS3.18 Tables 10.6.3-3/4/5); the index keeps the study's."""
    index.add(timezone_offset_from_utc="-0500")
    for level in (Level.STUDY, Level.SERIES, Level.IMAGE):
        assert values(search(service, level), "TimezoneOffsetFromUTC") == ["-0500"]


# ----------------------------------------------------- paging and maximum


def test_limit_offset_and_truncated(index: Index, service: QueryService) -> None:
    """Matches come in primary-key order, so offset paging is stable."""
    uids = [index.add(study_description="x").study.study_instance_uid for _ in range(5)]

    def page(limit: int | None, offset: int) -> QueryResult:
        return service.search(Query(Level.STUDY, {}, limit=limit, offset=offset))

    first, second, last = page(2, 0), page(2, 2), page(2, 4)
    assert values(first, "StudyInstanceUID") == uids[0:2]
    assert values(second, "StudyInstanceUID") == uids[2:4]
    assert values(last, "StudyInstanceUID") == uids[4:]
    assert (first.truncated, second.truncated, last.truncated) == (True, True, False)
    assert page(5, 0).truncated is False
    assert page(None, 0).truncated is False
    assert page(3, 5).matches == []


def test_the_maximum_is_enforced(index: Index, index_engine: Engine) -> None:
    """A larger or absent limit is lowered to the service maximum."""
    service = QueryService(index_engine, max_results=3)
    uids = [index.add().instance.sop_instance_uid for _ in range(4)]
    for limit in (None, 10):
        result = service.search(Query(Level.IMAGE, {}, limit=limit))
        assert values(result, "SOPInstanceUID") == uids[:3]
        assert result.truncated is True
    result = service.search(Query(Level.IMAGE, {}, offset=3))
    assert (values(result, "SOPInstanceUID"), result.truncated) == (uids[3:], False)


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (-1, 0), (None, -1)])
def test_bad_limit_or_offset_is_refused(
    service: QueryService, limit: int | None, offset: int
) -> None:
    with pytest.raises(QueryError, match=r"limit|offset"):
        service.search(Query(Level.STUDY, {}, limit=limit, offset=offset))


def test_max_results_must_be_positive(index_engine: Engine) -> None:
    with pytest.raises(ValueError, match="max_results"):
        QueryService(index_engine, max_results=0)


# ------------------------------------------------------- returned values


def test_study_match_returns_counts_and_modalities(index: Index, service: QueryService) -> None:
    """Study matches carry the study's counts and its sorted distinct
    non-empty ModalitiesInStudy, and the patient as the study gave it."""
    a = index.add(modality="MR", patient_name="Doe^John=ドウ^ジョン", patient_id="P1")
    uid = a.study.study_instance_uid
    index.add(study_instance_uid=uid, series_instance_uid=a.series.series_instance_uid)
    index.add(study_instance_uid=uid, modality="CT")
    index.add(study_instance_uid=uid, modality="")
    index.add(study_instance_uid=uid, modality="CT")
    index.add(modality="US")
    result = search(service, Level.STUDY, StudyInstanceUID=uid)
    (match,) = result.matches
    assert match["ModalitiesInStudy"] == ["CT", "MR"]
    assert match["NumberOfStudyRelatedSeries"] == 4
    assert match["NumberOfStudyRelatedInstances"] == 5
    assert match["PatientName"] == "Doe^John=ドウ^ジョン"
    assert set(match) == QueryService.return_keys(Level.STUDY)
    other = search(service, Level.STUDY, ModalitiesInStudy="US").matches
    assert [m["ModalitiesInStudy"] for m in other] == [["US"]]


def test_image_match_carries_every_level_above(index: Index, service: QueryService) -> None:
    """An IMAGE match has the instance's, series', study's and patient's
    attributes, numbers as int or None."""
    record = index.add(
        patient_id="P1",
        patient_name="Doe^John",
        patient_sex="M",
        study_date="20200101",
        study_time="101010",
        accession_number="A1",
        modality="CT",
        series_number=3,
        instance_number=9,
        rows=512,
        columns=512,
        bits_allocated=16,
        number_of_frames=None,
        specific_character_set="ISO_IR 192",
        timezone_offset_from_utc="+0100",
    )
    (match,) = search(service, Level.IMAGE).matches
    assert set(match) == QueryService.return_keys(Level.IMAGE)
    assert match["SOPInstanceUID"] == record.instance.sop_instance_uid
    assert match["SeriesInstanceUID"] == record.series.series_instance_uid
    assert match["StudyInstanceUID"] == record.study.study_instance_uid
    assert match["PatientID"] == "P1"
    assert match["StudyTime"] == "101010"
    assert (match["SeriesNumber"], match["InstanceNumber"], match["Rows"]) == (3, 9, 512)
    assert match["NumberOfFrames"] is None
    assert match["TransferSyntaxUID"] == EXPLICIT_LE
    assert match["SpecificCharacterSet"] == "ISO_IR 192"
    assert match["TimezoneOffsetFromUTC"] == "+0100"
    assert match["NumberOfSeriesRelatedInstances"] == 1
    assert match["NumberOfStudyRelatedInstances"] == 1
    assert match["ModalitiesInStudy"] == ["CT"]
    assert "NumberOfPatientRelatedStudies" not in match


def test_series_match_counts(index: Index, service: QueryService) -> None:
    a = index.add(modality="CT")
    index.add(
        study_instance_uid=a.study.study_instance_uid,
        series_instance_uid=a.series.series_instance_uid,
    )
    (match,) = search(service, Level.SERIES).matches
    assert match["NumberOfSeriesRelatedInstances"] == 2
    assert set(match) == QueryService.return_keys(Level.SERIES)


def test_patient_level_with_related_counts(index: Index, service: QueryService) -> None:
    """PATIENT level (Patient Root, PS3.4 C.6.1.1.2) matches the patient
    table and returns NumberOfPatientRelated{Studies,Series,Instances}."""
    a = index.add(patient_id="P1", patient_name="Doe^John", patient_sex="M")
    index.add(
        patient_id="P1",
        patient_name="Doe^John",
        study_instance_uid=a.study.study_instance_uid,
        series_instance_uid=a.series.series_instance_uid,
    )
    index.add(
        patient_id="P1", patient_name="Doe^John", study_instance_uid=a.study.study_instance_uid
    )
    index.add(patient_id="P1", patient_name="Doe^John")
    index.add(patient_id="P2", patient_name="Roe^Jane", patient_sex="F")
    index.add(patient_id="P1", issuer_of_patient_id="OTHER", patient_name="Doe^J")

    result = search(service, Level.PATIENT, PatientName="DOE^JOHN")
    (match,) = result.matches
    assert set(match) == QueryService.return_keys(Level.PATIENT)
    assert match["PatientID"] == "P1"
    assert match["IssuerOfPatientID"] == ""
    assert match["NumberOfPatientRelatedStudies"] == 2
    assert match["NumberOfPatientRelatedSeries"] == 3
    assert match["NumberOfPatientRelatedInstances"] == 4
    assert "StudyInstanceUID" not in match

    everyone = search(service, Level.PATIENT)
    assert [(m["PatientID"], m["IssuerOfPatientID"]) for m in everyone.matches] == [
        ("P1", ""),
        ("P2", ""),
        ("P1", "OTHER"),
    ]
    assert search(service, Level.PATIENT, PatientSex="F").matches[0]["PatientID"] == "P2"
    assert len(search(service, Level.PATIENT, PatientID="P1").matches) == 2
    issuer = search(service, Level.PATIENT, PatientID="P1", IssuerOfPatientID="OTHER")
    assert values(issuer, "NumberOfPatientRelatedInstances") == [1]


def test_empty_index_returns_nothing(service: QueryService) -> None:
    for level in Level:
        result = search(service, level)
        assert (result.matches, result.truncated) == ([], False)


def test_reasons_name_the_key_not_the_value(service: QueryService) -> None:
    """QueryError reasons carry key names only (appliance.errors): a birth
    date is patient data."""
    with pytest.raises(QueryError, match="PatientBirthDate") as caught:
        search(service, Level.STUDY, PatientBirthDate="19500231")
    assert "19500231" not in caught.value.reason
