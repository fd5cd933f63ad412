"""The query service: a hierarchical search of the index, for QIDO-RS and C-FIND.

A :class:`Query` names a level and matching keys; :meth:`QueryService.search`
returns the matching entities of that level, each with every attribute the
index holds for it and for its parents (PS3.4 C.4.1.2.1 hierarchical search:
keys of the query level and the levels above it select; keys below it are
refused).  The matching rules themselves are in :mod:`appliance.query.matching`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    FromClause,
    Label,
    bindparam,
    func,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from appliance import extended_tags
from appliance.errors import IndexUnavailable, QueryError
from appliance.index.schema import (
    instance,
    patient,
    request_attribute,
    series,
    study,
)
from appliance.model import Level
from appliance.query import matching
from appliance.query.keys import (
    ATTRIBUTES,
    COMPUTED,
    MATCHING_KEYS,
    MODALITIES_IN_STUDY,
    REQUEST_ATTRIBUTE_KEYS,
    REQUEST_ATTRIBUTES,
    RETURN_KEYS,
    rank,
    table_for,
)

if TYPE_CHECKING:
    from appliance.extended_tags import ExtendedTag, ExtendedTags

#: Labels of the study's and series' primary keys in a result row; removed
#: before returning.
_STUDY_PK = "_study_pk"
_SERIES_PK = "_series_pk"
#: Label of the one column selected when no key is wanted.
_ROW_PK = "_row_pk"


@dataclasses.dataclass(frozen=True)
class Query:
    """A search at one Q/R level.

    Attributes
    ----------
    level
        PATIENT, STUDY, SERIES or IMAGE.
    keys
        Matching keys: DICOM keyword -> value in DICOM string form: ``""``
        (universal), ``"1.2\\1.3"`` (UID list), ``"*x?"`` (wild card),
        ``"20200101-20201231"``, ``"-2020..."``, ``"2020...-"`` (DA/TM range).
    limit
        At most this many matches; None means the service's maximum.  Larger
        values are lowered to the maximum.
    offset
        Matches to skip, in the stable order of the index's primary keys.
    returned
        The attributes each match must carry (keywords of
        :meth:`QueryService.return_keys` at *level*; others are ignored), or
        None for all of them.  Naming only what the response needs spares
        the columns, and the look-ups of ModalitiesInStudy and the Request
        Attributes Sequence, that nobody asked for.
    extended
        Extended query tags (``ggggeeee`` or keyword) whose values each
        match carries, besides those used as keys (which it always does);
        names that are not a tag of the query level or above are ignored.

    A key that is no standard key but names an extended query tag
    (``ggggeeee``, or its keyword) matches on its values
    (:mod:`appliance.extended_tags`).
    """

    level: Level
    keys: Mapping[str, str]
    limit: int | None = None
    offset: int = 0
    returned: frozenset[str] | None = None
    extended: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """The matches of one :class:`Query`.

    Attributes
    ----------
    matches
        One dict per match: keyword -> value for every attribute of
        :meth:`QueryService.return_keys` at the query level (of those in
        :attr:`Query.returned` when that is given); an extended query tag's
        values as a list (None if the entity has none) under its
        ``ggggeeee`` path.  Strings as
        stored (a PN with its ``=`` component groups untouched), ``int`` or
        None for IS/US numbers, ``int`` for the ``NumberOf...`` counts, and
        ModalitiesInStudy as the sorted list of the distinct non-empty
        modalities of the study's series.
    truncated
        True if more matches existed beyond the limit (or the maximum).
    """

    matches: list[dict[str, Any]]
    truncated: bool
    #: the extended query tags matched or returned, by path
    extended: tuple[ExtendedTag, ...] = ()


class QueryService:
    """Searches the index (PS3.4 C.2.2.2 matching, C.4.1.2.1 hierarchy).

    Parameters
    ----------
    engine
        The index database.
    max_results
        The most matches one search returns; a larger or absent limit is
        lowered to it and the result marked truncated if there were more.
    extended
        The extended query tags (None: only the standard keys).
    partition_key
        The data partition searched (:mod:`appliance.partitions`): the
        entities of another partition never match.  None while partitions
        are off: every row is then the default partition's (``serve``
        refuses to start with partitions off and others in the index), so
        the searches carry no partition condition and keep the plans they
        had before partitions existed.
    """

    def __init__(
        self,
        engine: Engine,
        max_results: int,
        extended: ExtendedTags | None = None,
        partition_key: int | None = None,
    ) -> None:
        if max_results < 1:
            raise ValueError("max_results must be at least 1")
        self._engine = engine
        self._max_results = max_results
        self._extended = extended
        self._partition_key = partition_key

    def in_partition(self, partition_key: int) -> QueryService:
        """This service searching the data partition *partition_key*."""
        if partition_key == self._partition_key:
            return self
        return QueryService(self._engine, self._max_results, self._extended, partition_key)

    @property
    def extended(self) -> ExtendedTags | None:
        """The extended query tags, if any."""
        return self._extended

    @property
    def max_results(self) -> int:
        """The most matches one search returns."""
        return self._max_results

    @staticmethod
    def matching_keys(level: Level) -> frozenset[str]:
        """Keywords usable as matching keys in a query at *level*: the
        level's own and those of the levels above it."""
        return MATCHING_KEYS[level]

    @staticmethod
    def return_keys(level: Level) -> frozenset[str]:
        """Keywords present in every match of a query at *level*."""
        return RETURN_KEYS[level]

    def search(self, query: Query) -> QueryResult:
        """The entities at ``query.level`` that match every key of *query*.

        Raises
        ------
        QueryError
            for a key the level cannot match (unknown, not indexed, or of a
            level below the query's), a malformed value, or a bad limit or
            offset.
        IndexUnavailable
            if the database fails.
        """
        limit = self._page_size(query)
        shape = _shape(query.level, _wanted(query))
        conditions, tags = _conditions(query, self._extended)
        if self._partition_key is not None:
            # every level's source holds the study (or, for PATIENT, the patient)
            owner = patient if query.level is Level.PATIENT else study
            conditions.append(owner.c.partition_key == self._partition_key)
        returned = _extended_returned(query, self._extended, tags)
        pks = {tag.level: extended_tags.entity_column(tag) for tag in returned}
        columns = [*shape.columns, *(pk.label(_pk_label(lv)) for lv, pk in pks.items())]
        statement = (
            select(*columns)
            .select_from(_SOURCES[query.level])
            .where(*conditions)
            .order_by(_ORDER[query.level])
            .limit(limit + 1)
            .offset(query.offset)
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(statement).all()
                truncated = len(rows) > limit
                labels = (*shape.labels, *(_pk_label(lv) for lv in pks))
                matches = [dict(zip(labels, row, strict=True)) for row in rows[:limit]]
                if shape.modalities:
                    modalities = _modalities(conn, [match[_STUDY_PK] for match in matches])
                    for match in matches:
                        match[MODALITIES_IN_STUDY] = modalities.get(match.pop(_STUDY_PK), [])
                if shape.request_attributes:
                    items = _request_attributes(conn, [match[_SERIES_PK] for match in matches])
                    for match in matches:
                        match[REQUEST_ATTRIBUTES] = items.get(match.pop(_SERIES_PK), [])
                if pks:
                    _add_extended(conn, matches, returned)
                if shape.labels == (_ROW_PK,):
                    matches = [
                        {k: v for k, v in match.items() if k != _ROW_PK} for match in matches
                    ]
        except SQLAlchemyError as exc:
            # the reason names no value: SQLAlchemy's text carries the
            # statement's parameters, which may be patient data
            reason = f"the index query failed: {exc.__class__.__name__}"
            raise IndexUnavailable(reason) from exc
        return QueryResult(matches=matches, truncated=truncated, extended=returned)

    def _page_size(self, query: Query) -> int:
        if query.offset < 0:
            raise QueryError(f"offset must be 0 or more, not {query.offset}")
        if query.limit is None:
            return self._max_results
        if query.limit < 1:
            raise QueryError(f"limit must be 1 or more, not {query.limit}")
        return min(query.limit, self._max_results)


def _pk_label(level: Level) -> str:
    return f"_eqt_{level.name.lower()}_pk"


def _extended_returned(
    query: Query, registry: ExtendedTags | None, used: Iterable[ExtendedTag]
) -> tuple[ExtendedTag, ...]:
    """The extended tags each match carries: those used as keys and those
    of :attr:`Query.extended` a query at its level may carry."""
    found = {tag.path: tag for tag in used}
    if registry is not None:
        for name in query.extended:
            tag = registry.find(name)
            if (
                tag is not None
                and tag.queryable
                and query.level is not Level.PATIENT
                and rank(tag.level) <= rank(query.level)
            ):
                found.setdefault(tag.path, tag)
    return tuple(found[path] for path in sorted(found))


def _add_extended(
    conn: Connection, matches: list[dict[str, Any]], tags: Iterable[ExtendedTag]
) -> None:
    """Put each match's values of the extended *tags* under their paths,
    in one query per tag, and drop the entity keys selected for it."""
    for tag in tags:
        label = _pk_label(tag.level)
        values = extended_tags.returned_values(conn, tag, [m[label] for m in matches])
        for match in matches:
            match[tag.path] = values.get(match[label])
    for match in matches:
        for tag in tags:
            match.pop(_pk_label(tag.level), None)


def _conditions(
    query: Query, registry: ExtendedTags | None = None
) -> tuple[list[ColumnElement[bool]], list[ExtendedTag]]:
    """One condition per non-universal key, and the extended tags used;
    refuses keys the level cannot match (PS3.4 C.4.1.2.1: in a hierarchical
    query, keys are at the query level or above)."""
    conditions: list[ColumnElement[bool]] = []
    sequence_keys: dict[str, str] = {}
    used: list[ExtendedTag] = []
    allowed = MATCHING_KEYS[query.level]
    for keyword, value in sorted(query.keys.items()):
        if not isinstance(value, str):
            raise QueryError(f"{keyword}: the value must be a string")
        if keyword not in allowed:
            tag = registry.resolve(keyword) if registry is not None else None
            if tag is None or keyword in ATTRIBUTES:
                raise QueryError(_not_matchable(keyword, query.level))
            found = extended_tags.condition(tag, value, query.level)
            used.append(tag)
            if found is not None:
                conditions.append(found)
            continue
        if keyword == MODALITIES_IN_STUDY:
            found = matching.modalities_in_study(value)
        elif keyword in REQUEST_ATTRIBUTE_KEYS:
            sequence_keys[keyword] = value
            continue
        else:
            attribute = ATTRIBUTES[keyword]
            table = table_for(attribute.level, query.level)
            column = table.c[attribute.match_column or attribute.column]
            found = matching.condition(attribute, column, value)
        if found is not None:
            conditions.append(found)
    found = _request_attributes_condition(sequence_keys)
    if found is not None:
        conditions.append(found)
    return conditions, used


def _request_attributes_condition(keys: Mapping[str, str]) -> ColumnElement[bool] | None:
    """PS3.4 C.2.2.2.6 Sequence Matching on the Request Attributes Sequence:
    the series matches if one of its items matches every key given (each by
    the rules of its VR); universal keys add nothing, and a query whose keys
    are all universal matches every series, with items or without."""
    item_conditions = []
    for keyword, value in keys.items():
        attribute = REQUEST_ATTRIBUTE_KEYS[keyword]
        found = matching.condition(attribute, request_attribute.c[attribute.column], value)
        if found is not None:
            item_conditions.append(found)
    if not item_conditions:
        return None
    return (
        select(request_attribute.c.id)
        .where(request_attribute.c.series_fk == series.c.id, *item_conditions)
        .exists()
    )


def _not_matchable(keyword: str, level: Level) -> str:
    known = ATTRIBUTES.get(keyword) or REQUEST_ATTRIBUTE_KEYS.get(keyword)
    owner = known.level if known is not None else COMPUTED.get(keyword)
    if owner is not None and rank(owner) > rank(level):
        return (
            f"{keyword} is a {owner.value}-level key and cannot be matched "
            f"in a {level.value}-level query"
        )
    if owner is not None:
        return f"{keyword} is returned but is not a matching key"
    return f"{keyword} is not a supported matching key"


def _wanted(query: Query) -> frozenset[str]:
    """The return keys of *query* that its matches carry."""
    held = RETURN_KEYS[query.level]
    return held if query.returned is None else held & query.returned


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What the search at one level selects for one set of wanted keys.

    Attributes
    ----------
    columns
        The labelled columns, parents first.
    labels
        Their labels, in the same order: the keys of a match.
    modalities
        True if ModalitiesInStudy is wanted (one more look-up; the study's
        primary key is then selected as :data:`_STUDY_PK`).
    request_attributes
        True if the Request Attributes Sequence is wanted (the series'
        primary key is then selected as :data:`_SERIES_PK`).
    """

    columns: tuple[ColumnElement[Any], ...]
    labels: tuple[str, ...]
    modalities: bool
    request_attributes: bool


@functools.lru_cache(maxsize=256)
def _shape(level: Level, wanted: frozenset[str]) -> _Shape:
    """The columns of a search at *level* carrying the *wanted* keys; built
    once per level and set of keys (a C-FIND identifier or a QIDO-RS
    request names the same few sets again and again)."""
    columns: list[ColumnElement[Any]] = []
    for attribute in ATTRIBUTES.values():
        if attribute.keyword in wanted and rank(attribute.level) <= rank(level):
            table = table_for(attribute.level, level)
            columns.append(table.c[attribute.column].label(attribute.keyword))
    if level is Level.PATIENT:
        columns.extend(count for count in _patient_counts() if count.name in wanted)
        if not columns:  # nothing wanted: a SELECT still needs a column
            columns.append(patient.c.id.label(_ROW_PK))
        return _Shape(tuple(columns), tuple(c.name for c in columns), False, False)
    counters = [
        (study.c.num_series, "NumberOfStudyRelatedSeries"),
        (study.c.num_instances, "NumberOfStudyRelatedInstances"),
        (series.c.num_instances, "NumberOfSeriesRelatedInstances"),
    ]
    for column, keyword in counters:
        if keyword in wanted:
            columns.append(column.label(keyword))
    request_attributes = REQUEST_ATTRIBUTES in wanted
    if request_attributes:
        columns.append(series.c.id.label(_SERIES_PK))
    modalities = MODALITIES_IN_STUDY in wanted
    if modalities:
        columns.append(study.c.id.label(_STUDY_PK))
    if not columns:  # nothing wanted: a SELECT still needs a column
        columns.append(_ORDER[level].label(_ROW_PK))
    return _Shape(tuple(columns), tuple(c.name for c in columns), modalities, request_attributes)


def _patient_counts() -> list[Label[Any]]:
    """NumberOfPatientRelated{Studies,Series,Instances} (PS3.4 C.6.1.1.2) as
    correlated subqueries over the patient's studies and their counters."""

    def over_studies(expression: ColumnElement[Any], label: str) -> Label[Any]:
        return (
            select(expression)
            .where(study.c.patient_fk == patient.c.id)
            .correlate(patient)
            .scalar_subquery()
            .label(label)
        )

    return [
        over_studies(func.count(study.c.id), "NumberOfPatientRelatedStudies"),
        over_studies(
            func.coalesce(func.sum(study.c.num_series), 0), "NumberOfPatientRelatedSeries"
        ),
        over_studies(
            func.coalesce(func.sum(study.c.num_instances), 0), "NumberOfPatientRelatedInstances"
        ),
    ]


#: What a search at each level selects from: the level's table joined up the
#: hierarchy.
_SOURCES: Mapping[Level, FromClause] = {
    Level.PATIENT: patient,
    Level.STUDY: study,
    Level.SERIES: series.join(study, series.c.study_fk == study.c.id),
    Level.IMAGE: instance.join(series, instance.c.series_fk == series.c.id).join(
        study, series.c.study_fk == study.c.id
    ),
}

#: The order of a search's matches: the primary key of the level's table, so
#: that offset paging is stable.
_ORDER: Mapping[Level, ColumnElement[Any]] = {
    Level.PATIENT: patient.c.id,
    Level.STUDY: study.c.id,
    Level.SERIES: series.c.id,
    Level.IMAGE: instance.c.id,
}

#: The Request Attributes Sequence items of a page's series, in stored order
#: (built once; the ids are one expanding parameter).
_REQUEST_ATTRIBUTES = (
    select(
        request_attribute.c.series_fk,
        request_attribute.c.scheduled_procedure_step_id,
        request_attribute.c.requested_procedure_id,
    )
    .where(request_attribute.c.series_fk.in_(bindparam("series_ids", expanding=True)))
    .order_by(request_attribute.c.id)
)

#: The distinct non-empty modalities of a page's studies (built once).
_MODALITIES = (
    select(series.c.study_fk, series.c.modality)
    .where(series.c.study_fk.in_(bindparam("study_ids", expanding=True)), series.c.modality != "")
    .distinct()
)


def _request_attributes(
    conn: Connection, series_ids: Iterable[int]
) -> dict[int, list[dict[str, str]]]:
    """The Request Attributes Sequence items of the series of one page, in
    one query: series id -> items in stored order."""
    ids = sorted(set(series_ids))
    if not ids:
        return {}
    found: dict[int, list[dict[str, str]]] = {}
    for series_id, step_id, procedure_id in conn.execute(_REQUEST_ATTRIBUTES, {"series_ids": ids}):
        found.setdefault(series_id, []).append(
            {"ScheduledProcedureStepID": step_id, "RequestedProcedureID": procedure_id}
        )
    return found


def _modalities(conn: Connection, study_ids: Iterable[int]) -> dict[int, list[str]]:
    """ModalitiesInStudy (PS3.4 C.6.1.1.3.1) for the studies of one page, in
    one query: study id -> sorted distinct non-empty modalities."""
    ids = sorted(set(study_ids))
    if not ids:
        return {}
    found: dict[int, set[str]] = {}
    for study_id, modality in conn.execute(_MODALITIES, {"study_ids": ids}):
        found.setdefault(study_id, set()).add(modality)
    return {study_id: sorted(values) for study_id, values in found.items()}
