"""The one keyword -> (level, column, VR) table of the query layer.

Every attribute the index holds is listed here once, with the Query/Retrieve
level it belongs to (PS3.4 C.6.1.1 / C.6.2.1, Study Root and Patient Root
Information Models), its Value Representation (PS3.6), which decides the
matching rules that apply (PS3.4 C.2.2.2), and the column that stores it.

Patient attributes are stored twice (see :mod:`appliance.index.schema`): in
``patient`` for a PATIENT-level query and on the ``study`` row, as the study's
own header gave them, for STUDY, SERIES and IMAGE queries.  The column names
are the same in both tables, so an entry names the column only and
:func:`table_for` picks the table from the query level.

Some attributes are computed rather than stored (ModalitiesInStudy, the
``NumberOf...Related...`` counts) or kept in a table of their own (the
Request Attributes Sequence); they are named in :data:`COMPUTED` and handled
by :mod:`appliance.query.service`.  Some stored attributes are only
returned, never matched (the instance's Transfer Syntax UID, Specific
Character Set and Timezone Offset From UTC: PS3.4 C.2.2.2 says Specific
Character Set "is never matched").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from sqlalchemy import Table

from appliance.index.schema import instance, patient, series, study
from appliance.model import Level

#: Levels from the top of the hierarchy down (PS3.4 C.3).
LEVEL_ORDER: tuple[Level, ...] = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)


def rank(level: Level) -> int:
    """0 for PATIENT, 3 for IMAGE: a key applies to a query if its rank is not
    greater than the query level's."""
    return LEVEL_ORDER.index(level)


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One attribute the index holds.

    Attributes
    ----------
    keyword
        The DICOM keyword (PS3.6), e.g. ``"StudyDate"``.
    level
        The Q/R level whose entity owns the attribute.
    vr
        Value Representation; selects the matching rules.
    column
        Name of the column holding the value as stored (returned as is).
    match_column
        Name of the column matched instead of *column*, when matching needs a
        derived form: the casefolded ``*_norm`` column of a PN, the
        fixed-width ``*_time_key`` column of a TM.
    matchable
        False for attributes that are returned but never used as a filter.
    """

    keyword: str
    level: Level
    vr: str
    column: str
    match_column: str | None = None
    matchable: bool = True


def _a(
    keyword: str,
    level: Level,
    vr: str,
    column: str,
    match_column: str | None = None,
    *,
    matchable: bool = True,
) -> Attribute:
    return Attribute(keyword, level, vr, column, match_column, matchable)


_P, _ST, _SE, _IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

_TABLE: tuple[Attribute, ...] = (
    # PS3.4 C.6.1.1.2 / C.6.2.1.2: Patient level
    _a("PatientName", _P, "PN", "patient_name", "patient_name_norm"),
    _a("PatientID", _P, "LO", "patient_id"),
    _a("IssuerOfPatientID", _P, "LO", "issuer_of_patient_id"),
    _a("PatientBirthDate", _P, "DA", "patient_birth_date"),
    _a("PatientSex", _P, "CS", "patient_sex"),
    # PS3.4 C.6.1.1.3 / C.6.2.1.2: Study level
    _a("StudyInstanceUID", _ST, "UI", "study_instance_uid"),
    _a("StudyDate", _ST, "DA", "study_date"),
    _a("StudyTime", _ST, "TM", "study_time", "study_time_key"),
    _a("AccessionNumber", _ST, "SH", "accession_number"),
    _a("StudyID", _ST, "SH", "study_id"),
    _a("StudyDescription", _ST, "LO", "study_description"),
    _a(
        "ReferringPhysicianName",
        _ST,
        "PN",
        "referring_physician_name",
        "referring_physician_name_norm",
    ),
    # PS3.4 C.6.1.1.4: Series level
    _a("SeriesInstanceUID", _SE, "UI", "series_instance_uid"),
    _a("Modality", _SE, "CS", "modality"),
    _a("SeriesNumber", _SE, "IS", "series_number"),
    _a("SeriesDescription", _SE, "LO", "series_description"),
    _a("BodyPartExamined", _SE, "CS", "body_part_examined"),
    _a("PerformedProcedureStepStartDate", _SE, "DA", "performed_procedure_step_start_date"),
    _a(
        "PerformedProcedureStepStartTime",
        _SE,
        "TM",
        "performed_procedure_step_start_time",
        "performed_procedure_step_start_time_key",
    ),
    # PS3.4 C.6.1.1.5: Composite Object Instance (IMAGE) level
    _a("SOPInstanceUID", _IM, "UI", "sop_instance_uid"),
    _a("SOPClassUID", _IM, "UI", "sop_class_uid"),
    _a("InstanceNumber", _IM, "IS", "instance_number"),
    _a("Rows", _IM, "US", "rows"),
    _a("Columns", _IM, "US", "columns"),
    _a("BitsAllocated", _IM, "US", "bits_allocated"),
    _a("NumberOfFrames", _IM, "IS", "number_of_frames"),
    # returned only
    _a("TimezoneOffsetFromUTC", _ST, "SH", "timezone_offset_from_utc", matchable=False),
    _a("TransferSyntaxUID", _IM, "UI", "transfer_syntax_uid", matchable=False),
    _a("SpecificCharacterSet", _IM, "CS", "specific_character_set", matchable=False),
)

#: keyword -> attribute, for every stored attribute.
ATTRIBUTES: Mapping[str, Attribute] = MappingProxyType({a.keyword: a for a in _TABLE})

#: The Request Attributes Sequence (0040,0275) of a series, in the
#: ``request_attribute`` table: returned as a list of items, and matched by
#: the keys of :data:`REQUEST_ATTRIBUTE_KEYS` (PS3.4 C.2.2.2.6 Sequence
#: Matching: all keys given must match one and the same item).
REQUEST_ATTRIBUTES = "RequestAttributesSequence"

#: ``Sequence.Keyword`` matching keys (the attribute path form of PS3.18
#: 8.3.4.1) -> the attribute of the ``request_attribute`` table they match.
REQUEST_ATTRIBUTE_KEYS: Mapping[str, Attribute] = MappingProxyType(
    {
        f"{REQUEST_ATTRIBUTES}.{keyword}": _a(keyword, _SE, "SH", column)
        for keyword, column in (
            ("ScheduledProcedureStepID", "scheduled_procedure_step_id"),
            ("RequestedProcedureID", "requested_procedure_id"),
        )
    }
)

#: Matched by EXISTS over the study's series (PS3.4 C.6.1.1.3.1: "the set of
#: distinct values of Modality in the series of the study").
MODALITIES_IN_STUDY = "ModalitiesInStudy"

#: Computed attributes (keyword -> level), returned but not stored as such.
#: Of these only ModalitiesInStudy is a matching key.
COMPUTED: Mapping[str, Level] = MappingProxyType(
    {
        "NumberOfPatientRelatedStudies": Level.PATIENT,
        "NumberOfPatientRelatedSeries": Level.PATIENT,
        "NumberOfPatientRelatedInstances": Level.PATIENT,
        MODALITIES_IN_STUDY: Level.STUDY,
        "NumberOfStudyRelatedSeries": Level.STUDY,
        "NumberOfStudyRelatedInstances": Level.STUDY,
        "NumberOfSeriesRelatedInstances": Level.SERIES,
        REQUEST_ATTRIBUTES: Level.SERIES,
    }
)


def _matching_keys(level: Level) -> frozenset[str]:
    keys = {a.keyword for a in _TABLE if a.matchable and rank(a.level) <= rank(level)}
    if rank(level) >= rank(Level.STUDY):
        keys.add(MODALITIES_IN_STUDY)
    if rank(level) >= rank(Level.SERIES):
        keys.update(REQUEST_ATTRIBUTE_KEYS)
    return frozenset(keys)


def _return_keys(level: Level) -> frozenset[str]:
    keys = {a.keyword for a in _TABLE if rank(a.level) <= rank(level)}
    for keyword, owner in COMPUTED.items():
        if owner is Level.PATIENT:
            # the patient counts exist only at the PATIENT level: below it the
            # patient attributes come from the study row, not the patient
            if level is Level.PATIENT:
                keys.add(keyword)
        elif rank(owner) <= rank(level):
            keys.add(keyword)
    return frozenset(keys)


#: Keywords usable as filters at each query level: the level's own and those
#: of the levels above it (PS3.4 C.4.1.2.1, hierarchical search).
MATCHING_KEYS: Mapping[Level, frozenset[str]] = MappingProxyType(
    {level: _matching_keys(level) for level in LEVEL_ORDER}
)

#: Keywords present in every match at each query level.
RETURN_KEYS: Mapping[Level, frozenset[str]] = MappingProxyType(
    {level: _return_keys(level) for level in LEVEL_ORDER}
)


def table_for(level: Level, query_level: Level) -> Table:
    """The table holding the attributes of *level* in a query at *query_level*.

    Patient attributes live in ``patient`` for a PATIENT-level query and on
    the ``study`` row for any query below it.
    """
    if level is Level.PATIENT:
        return patient if query_level is Level.PATIENT else study
    return {Level.STUDY: study, Level.SERIES: series, Level.IMAGE: instance}[level]
