"""QIDO-RS: the Search Transaction (PS3.18 10.6) over the shared query layer.

Routes (PS3.18 10.6.1), all ``GET`` under the service root
``/v1``::

    /studies                                 SearchForStudies
    /series      /studies/{s}/series         SearchForSeries
    /instances   /studies/{s}/instances      SearchForInstances
                 /studies/{s}/series/{se}/instances

Query parameters (PS3.18 8.3.4, Table 8.3.4-1; 10.6.1.2):

- ``{attributeID}={value}`` (8.3.4.1): *attributeID* is a PS3.6 keyword, a
  tag as eight hex digits, or a dotted path of them into a sequence
  (``RequestAttributesSequence.ScheduledProcedureStepID``,
  ``00400275.00400009``).  *value* is matched by the rules of PS3.4 C.2.2.2
  (the query layer); an empty value is Universal Matching and still asks
  for the attribute to be returned.  For UID keys a comma-separated value,
  or the parameter repeated, is a List of UID Matching (8.3.4.1); the same
  holds for ModalitiesInStudy (a backslash list in C-FIND).  Any other key
  given twice is refused.
- ``includefield`` (8.3.4.3): keywords or tags, comma-separated or repeated,
  or ``all``.  An attribute the index does not hold (a private or unknown
  tag included) is ignored; a word that is no keyword is refused.
- ``limit`` and ``offset`` (8.3.4.4): non-negative integers; ``limit`` of
  at least 1, default :data:`DEFAULT_LIMIT`, lowered to the configured
  ``query.max_results``.
- ``fuzzymatching`` (8.3.4.2): ``true`` or ``false``; fuzzy semantic
  matching is not supported, so ``true`` is answered with the Warning the
  standard prescribes and literal matching.
- ``emptyvaluematching`` and ``multiplevaluematching`` (8.3.4): ``false``
  is accepted; ``true`` is refused, as neither is supported.

Anything else (an unknown name, keyword or tag; a key not matchable at the
level; a malformed value) is a 400 whose reason names the parameter.  The
response is ``200`` with a DICOM JSON array (PS3.18 10.6.3, Annex F), ``[]``
when nothing matches.  Logs carry the path and the parameter names, never
the values (names are patient data).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from flask import Blueprint, Response, request
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from werkzeug.datastructures import MIMEAccept, MultiDict
from werkzeug.exceptions import NotAcceptable
from werkzeug.http import parse_accept_header

from appliance.audit import study_uids
from appliance.dicomio import is_valid_uid
from appliance.errors import QueryError
from appliance.extended_tags import ExtendedTag
from appliance.model import Level
from appliance.query import MATCHING_KEYS, Query, QueryService
from dicomweb import audit
from dicomweb.app import current_services
from dicomweb.jsonmodel import (
    NUMBER_VRS,
    JsonDataset,
    UnknownAttribute,
    json_element,
    tag_hex,
    tag_of,
    vr_of,
)
from dicomweb.urls import instance_url, series_url, service_root, study_url

bp = Blueprint("qido", __name__, url_prefix="/v1")

LOGGER = logging.getLogger(__name__)

DICOM_JSON: Final = "application/dicom+json"
JSON: Final = "application/json"

#: Matches per response when no ``limit`` is given (lowered to
#: ``query.max_results`` if that is smaller).
DEFAULT_LIMIT: Final = 100

#: The largest ``offset`` accepted (a signed 32-bit number; the SQL engines
#: refuse more).
MAX_OFFSET: Final = 2**31 - 1

#: Specific Character Set of every response: the JSON text is UTF-8, whatever
#: the stored instances used (PS3.18 Annex F; ISO_IR 192 is UTF-8, PS3.3
#: C.12.1.1.2).
UTF8_CHARSET: Final = "ISO_IR 192"

#: The levels from the top, for naming the level a key belongs to.
_LEVELS: Final = (Level.STUDY, Level.SERIES, Level.IMAGE)
#: Every standard matching key, of any level: never an extended query tag.
_ALL_MATCHING_KEYS: Final = frozenset().union(*MATCHING_KEYS.values())

_LEVEL_NAMES: Final = {Level.STUDY: "studies", Level.SERIES: "series", Level.IMAGE: "instances"}

#: The default return attributes, in table order (PS3.18 10.6.3.3).
#: Table 10.6.3-3, Study's Returned Attributes.
STUDY_ATTRIBUTES: Final = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "RetrieveURL",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
#: Table 10.6.3-4, Series' Returned Attributes.
SERIES_ATTRIBUTES: Final = (
    "SpecificCharacterSet",
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "RetrieveURL",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
#: Table 10.6.3-5, Instance's Returned Attributes.
INSTANCE_ATTRIBUTES: Final = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
    "RetrieveURL",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)

#: Attributes this view computes rather than takes from a match.
_COMPUTED: Final = frozenset({"SpecificCharacterSet", "InstanceAvailability", "RetrieveURL"})

#: Attributes of a match never returned as such: the stored instance's own
#: Specific Character Set (the response is UTF-8) and its Transfer Syntax
#: UID, a File Meta element (PS3.10 7.1) returned as Available Transfer
#: Syntax UID (0008,3002) instead.
_HIDDEN: Final = frozenset({"SpecificCharacterSet", "TransferSyntaxUID"})

#: Keys whose value may be a list: comma-separated or repeated parameter.
_LIST_KEYS: Final = frozenset({"ModalitiesInStudy"})

#: Query parameters that are not attribute keys (PS3.18 8.3.4).
INCLUDEFIELD: Final = "includefield"
_FLAGS: Final = ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")
_PAGING: Final = ("limit", "offset")

_TAG_RE: Final = re.compile(r"[0-9A-Fa-f]{8}")
_DIGITS_RE: Final = re.compile(r"[0-9]+")

#: Warn-texts of the Warning header (code 299, RFC 7234 5.5): PS3.18 8.3.4.2
#: for fuzzy matching, 8.3.4.4 for the server's maximum; MORE_WARNING is our
#: wording (Microsoft's DICOM server's) for a result cut by the client's limit.
FUZZY_WARNING: Final = (
    "The fuzzymatching parameter is not supported. Only literal matching has been performed."
)
MAXIMUM_WARNING: Final = (
    "The number of results exceeded the maximum supported by the server. "
    "Additional results can be requested."
)
MORE_WARNING: Final = "There are additional results that can be requested."


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """A parsed QIDO-RS request.

    Attributes
    ----------
    level
        The query level of the route.
    keys
        Matching keys for the query layer: keyword (or
        ``Sequence.Keyword``) -> value in DICOM string form, including the
        UIDs of the path.
    parameters
        Key -> the query parameter name it came from (for error reasons).
    returned
        Top-level keywords of the matching keys given as parameters: PS3.18
        10.6.3.3 returns every matching key.
    include
        Keywords named by ``includefield``; None for ``includefield=all``.
    limit
        The client's ``limit``, or None.
    offset
        Matches to skip.
    fuzzymatching
        True if the client asked for fuzzy matching.
    study, series
        The UIDs of the path, or None.
    extended
        Extended query tags (``ggggeeee``) named by ``includefield`` (or
        all of them, for ``includefield=all``); those used as keys are in
        *keys* under the same paths.
    """

    level: Level
    keys: dict[str, str]
    parameters: dict[str, str]
    returned: frozenset[str]
    include: frozenset[str] | None
    limit: int | None
    offset: int
    fuzzymatching: bool
    study: str | None = None
    series: str | None = None
    extended: frozenset[str] = frozenset()


# --------------------------------------------------------------------------
# routes (PS3.18 10.6.1)


@bp.get("/studies")
def search_for_studies() -> Response:
    """SearchForStudies (PS3.18 10.6): 200 and a DICOM JSON array, 400 for a
    request that cannot be understood, 406 for an Accept we cannot give."""
    return _search(Level.STUDY)


@bp.get("/series", defaults={"study": None})
@bp.get("/studies/<study>/series")
def search_for_series(study: str | None) -> Response:
    """SearchForSeries, of all studies or of one (PS3.18 10.6)."""
    return _search(Level.SERIES, study)


@bp.get("/instances", defaults={"study": None, "series": None})
@bp.get("/studies/<study>/instances", defaults={"series": None})
@bp.get("/studies/<study>/series/<series>/instances")
def search_for_instances(study: str | None, series: str | None) -> Response:
    """SearchForInstances, of all studies, of one study or of one series
    (PS3.18 10.6)."""
    return _search(Level.IMAGE, study, series)


def _search(level: Level, study: str | None = None, series: str | None = None) -> Response:
    """One search at *level*: negotiate, parse, query once, convert."""
    mimetype = negotiate(request.headers.get("Accept"))
    service = current_services().query
    search = parse_search(level, request.args, service, study=study, series=series)
    page, limited_by_server = page_size(search.limit, service.max_results)
    keywords = return_keywords(search, service)
    query = Query(
        level,
        search.keys,
        limit=page,
        offset=search.offset,
        returned=needed_keys(level, keywords),
        extended=search.extended,
    )
    try:
        result = service.search(query)
    except QueryError as exc:
        raise QueryError(_name_parameter(exc.reason, search.parameters)) from None
    root = service_root()
    plan = _result_plan(level, keywords)
    body = [_result_json(plan, match, level, root) for match in result.matches]
    if result.extended:
        # extended query tags' values (members named by their tags, PS3.18
        # F.2.2), in tag order with the others (F.2)
        for match, item in zip(result.matches, body, strict=True):
            for tag in result.extended:
                item[tag.path] = json_element(tag.vr, match.get(tag.path))
        body = [dict(sorted(item.items())) for item in body]
    # the audit event: the keys' names (their values only if configured:
    # they may be a patient's name or ID) and the studies disclosed
    audit.note(
        studies=study_uids(m.get("StudyInstanceUID") or study for m in result.matches),
        instances=len(body),
        query_keys=tuple(search.keys),
        query=search.keys,
    )

    warnings: list[str] = []
    if search.fuzzymatching:
        # PS3.18 8.3.4.2: fuzzy matching not supported -> literal matching
        # and this warning.
        warnings.append(FUZZY_WARNING)
    if result.truncated:
        # PS3.18 8.3.4.4: the server's maximum cut the result short; our
        # own text when it was the client's limit.
        warnings.append(MAXIMUM_WARNING if limited_by_server else MORE_WARNING)

    if LOGGER.isEnabledFor(logging.INFO):
        LOGGER.info(
            "QIDO-RS %s parameters=%s -> %d match(es)%s",
            request.path,
            sorted(set(request.args.keys())),
            len(body),
            " (more available)" if result.truncated else "",
        )
    response = Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        status=200,
        mimetype=mimetype,
    )
    for text in warnings:
        response.headers.add("Warning", warning(root, text))
    erroneous = [tag.path for tag in result.extended if tag.path in search.keys and tag.error_count]
    if erroneous:
        # Microsoft's DICOM server: a query on a tag some of whose values
        # failed validation says so (those instances cannot match on it)
        response.headers["erroneous-dicom-attributes"] = ",".join(erroneous)
    return response


# --------------------------------------------------------------------------
# content negotiation (PS3.18 10.6: application/dicom+json, or
# multipart/related; type="application/dicom+xml", which we do not offer)


def negotiate(accept: str | None) -> str:
    """The media type of the response for the *accept* header value.

    ``application/dicom+json`` (the default of PS3.18 10.6) for an absent
    header, ``*/*``, ``application/*`` or ``application/dicom+json``;
    ``application/json`` when only that is acceptable.  Media type
    parameters other than ``q`` are ignored.

    Raises
    ------
    NotAcceptable
        for anything else, e.g. ``multipart/related;
        type="application/dicom+xml"`` (the XML response is not supported).
    """
    if accept is None or not accept.strip():
        return DICOM_JSON
    ranges = [
        (value.split(";", 1)[0].strip().lower(), quality)
        for value, quality in parse_accept_header(accept, MIMEAccept)
    ]
    best: tuple[float, int, str] | None = None
    for preference, offered in enumerate((DICOM_JSON, JSON)):
        quality = _quality(offered, ranges)
        if quality > 0 and (best is None or quality > best[0]):
            best = (quality, preference, offered)
    if best is None:
        raise NotAcceptable(
            f"QIDO-RS answers {DICOM_JSON} (or {JSON}) only; multipart/related; "
            'type="application/dicom+xml" is not supported'
        )
    return best[2]


def _quality(offered: str, ranges: Sequence[tuple[str, float]]) -> float:
    """The quality the client gives *offered*: that of the most specific
    matching media range (RFC 9110 12.5.1), 0 if none matches."""
    kind = offered.split("/", 1)[0]
    found: tuple[int, float] | None = None
    for media, quality in ranges:
        if media == offered:
            specificity = 2
        elif media == f"{kind}/*":
            specificity = 1
        elif media == "*/*":
            specificity = 0
        else:
            continue
        if found is None or specificity > found[0]:
            found = (specificity, quality)
    return 0.0 if found is None else found[1]


# --------------------------------------------------------------------------
# query parameters (PS3.18 8.3.4, 10.6.1.2)


def parse_search(
    level: Level,
    args: MultiDict[str, str],
    service: QueryService,
    *,
    study: str | None = None,
    series: str | None = None,
) -> SearchRequest:
    """Read the route's UIDs and the query parameters of one search.

    Raises
    ------
    QueryError
        for a malformed UID in the path, or a parameter that is unknown,
        repeated where it cannot be, not matchable at *level*, or whose
        value is malformed; the reason names the parameter.
    """
    keys: dict[str, str] = {}
    parameters: dict[str, str] = {}
    for keyword, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if uid is None:
            continue
        # PS3.18 10.6.1: the path holds one UID each; PS3.5 9.1 form.
        if not is_valid_uid(uid):
            raise QueryError(f"the {keyword} in the path is not a valid UID (PS3.5 9.1)")
        keys[keyword] = uid
        parameters[keyword] = f"the {keyword} of the path"

    include: set[str] | None = set()
    flags = dict.fromkeys(_FLAGS, False)
    paging: dict[str, int | None] = dict.fromkeys(_PAGING)
    values: dict[str, list[str]] = {}
    extended: set[str] = set()
    extended_vrs: dict[str, str] = {}
    for name, given in args.lists():
        if name == INCLUDEFIELD:
            include = _includefield(given, include)
            extended |= _extended_included(given, service)
        elif name in _FLAGS:
            flags[name] = _boolean(name, given)
        elif name in _PAGING:
            paging[name] = _integer(name, given)
        elif (tag := _extended_key(name, service)) is not None:
            # an extended query tag (ggggeeee or its keyword): its own key
            if tag.path in values or (len(given) > 1 and tag.vr != "UI"):
                raise QueryError(f"query parameter {name!r} is given more than once")
            values.setdefault(tag.path, []).extend(given)
            parameters.setdefault(tag.path, name)
            extended_vrs[tag.path] = tag.vr
        else:
            path = attribute_path(name)
            if path in keys:  # so far only the path's UIDs
                raise QueryError(f"query parameter {name!r}: {path} is given in the path")
            _check_matchable(name, path, level, service)
            if not _takes_list(path) and (path in values or len(given) > 1):
                raise QueryError(
                    f"query parameter {name!r}: {path} is given more than once; only UID "
                    "keys and ModalitiesInStudy take several values (PS3.18 8.3.4.1)"
                )
            values.setdefault(path, []).extend(given)
            parameters.setdefault(path, name)

    for flag in ("emptyvaluematching", "multiplevaluematching"):
        if flags[flag]:
            raise QueryError(f"query parameter {flag!r}: {flag}=true is not supported")
    for path, given in values.items():
        if path in extended_vrs:
            keys[path] = _extended_value(parameters[path], extended_vrs[path], given)
        else:
            keys[path] = _key_value(parameters[path], path, given)

    limit = paging["limit"]
    if limit is not None and limit < 1:
        raise QueryError("query parameter 'limit': must be 1 or more (PS3.18 8.3.4.4)")
    offset = paging["offset"] or 0
    if offset > MAX_OFFSET:
        raise QueryError(f"query parameter 'offset': must be at most {MAX_OFFSET}")
    return SearchRequest(
        level=level,
        keys=keys,
        parameters=parameters,
        returned=frozenset(path.split(".", 1)[0] for path in values if path not in extended_vrs),
        include=None if include is None else frozenset(include),
        limit=limit,
        offset=offset,
        fuzzymatching=flags["fuzzymatching"],
        study=study,
        series=series,
        extended=frozenset(extended),
    )


def _extended_key(name: str, service: QueryService) -> ExtendedTag | None:
    """The extended query tag a query parameter names (by ``ggggeeee`` or
    keyword), or None; a standard key is never one.

    Raises
    ------
    QueryError
        if it names a tag that cannot be queried now (being added, or its
        query status Disabled).
    """
    registry = service.extended
    if registry is None or "." in name or name in _ALL_MATCHING_KEYS:
        return None
    return registry.resolve(name)


def _extended_included(given: Iterable[str], service: QueryService) -> set[str]:
    """The extended query tags named by ``includefield`` values (every
    queryable one for ``all``)."""
    registry = service.extended
    if registry is None:
        return set()
    found: set[str] = set()
    for value in given:
        for item in value.split(","):
            item = item.strip()
            if item == "all":
                found.update(tag.path for tag in registry.all() if tag.queryable)
            elif item and (tag := registry.find(item)) is not None and tag.queryable:
                found.add(tag.path)
    return found


def _extended_value(name: str, vr: str, given: Sequence[str]) -> str:
    """The DICOM string form of an extended query tag's key value (a UI key
    takes a list, as the standard UID keys)."""
    if any("\0" in value for value in given):
        raise QueryError(f"query parameter {name!r}: the value holds a NUL character")
    if vr != "UI":
        return given[0]
    items = [item.strip() for value in given for item in re.split(r"[,\\]", value)]
    return "\\".join(item for item in items if item)


def attribute_path(name: str) -> str:
    """The keyword path of an ``{attributeID}`` (PS3.18 8.3.4.1): keywords,
    or tags as eight hex digits, joined by ``.`` into sequences.

    Raises
    ------
    QueryError
        if a component is neither a PS3.6 keyword nor a known tag.
    """
    keywords = []
    for part in name.split("."):
        if _TAG_RE.fullmatch(part):
            keyword = keyword_for_tag(int(part, 16))
        elif tag_for_keyword(part) is not None:
            keyword = part
        else:
            keyword = ""
        if not keyword:
            raise QueryError(
                f"unknown query parameter {_shown(name)}: not a QIDO-RS parameter, nor a DICOM "
                "keyword or tag (PS3.18 8.3.4); keywords are case-sensitive"
            )
        keywords.append(keyword)
    return ".".join(keywords)


def _check_matchable(name: str, path: str, level: Level, service: QueryService) -> None:
    """Refuse a key the query layer cannot match at *level*, naming why."""
    if path in service.matching_keys(level):
        return
    owner = next((lv for lv in _LEVELS if path in service.matching_keys(lv)), None)
    if owner is not None:
        hint = " (ModalitiesInStudy matches the modalities of a study)"
        raise QueryError(
            f"query parameter {name!r}: {path} is a {owner.value}-level key and cannot be "
            f"matched in a search for {_LEVEL_NAMES[level]} (PS3.4 C.4.1.2.1)"
            + (hint if path == "Modality" else "")
        )
    if "." in path:
        raise QueryError(
            f"query parameter {name!r}: sequence matching is supported only for "
            "RequestAttributesSequence.ScheduledProcedureStepID and "
            "RequestAttributesSequence.RequestedProcedureID"
        )
    raise QueryError(
        f"query parameter {name!r}: {path} is not a supported matching key "
        "(docs/conformance.md lists them)"
    )


def _takes_list(path: str) -> bool:
    return path in _LIST_KEYS or _leaf_vr(path) == "UI"


def _leaf_vr(path: str) -> str:
    tag = tag_for_keyword(path.rsplit(".", 1)[-1])
    if tag is None:  # attribute_path() returned only known keywords
        return ""
    try:
        return vr_of(int(tag))
    except UnknownAttribute:
        return ""


def _key_value(name: str, path: str, given: Sequence[str]) -> str:
    """The DICOM string form of the values given for one key."""
    if any("\0" in value for value in given):
        raise QueryError(f"query parameter {name!r}: the value holds a NUL character")
    if not _takes_list(path):
        return given[0]
    # PS3.18 8.3.4.1: a list of UIDs is comma-separated (or the parameter
    # repeated); in DICOM form the values are backslash-separated (PS3.5 6.4).
    items = [item.strip() for value in given for item in re.split(r"[,\\]", value)]
    return "\\".join(item for item in items if item)


def _includefield(given: Iterable[str], include: set[str] | None) -> set[str] | None:
    """Add the attributes of ``includefield`` values (PS3.18 8.3.4.3) to
    *include*; None once ``all`` is named."""
    for value in given:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "all":
                include = None
                continue
            try:
                keyword = attribute_path(item).split(".", 1)[0]
            except QueryError:
                if all(_TAG_RE.fullmatch(part) for part in item.split(".")):
                    continue  # a well-formed tag we do not know: not held, ignored
                raise QueryError(
                    f"query parameter 'includefield': {_shown(item)} is not a DICOM keyword "
                    "or tag, nor 'all' (PS3.18 8.3.4.3)"
                ) from None
            if include is not None:
                include.add(keyword)
    return include


def _single(name: str, given: Sequence[str]) -> str:
    if len(given) != 1:
        raise QueryError(f"query parameter {name!r} is given more than once")
    return given[0].strip()


def _boolean(name: str, given: Sequence[str]) -> bool:
    value = _single(name, given).lower()
    if value not in ("true", "false"):
        raise QueryError(f"query parameter {name!r}: must be true or false (PS3.18 8.3.4)")
    return value == "true"


def _integer(name: str, given: Sequence[str]) -> int:
    value = _single(name, given)
    if not _DIGITS_RE.fullmatch(value):
        raise QueryError(
            f"query parameter {name!r}: must be a non-negative integer (PS3.18 8.3.4.4)"
        )
    return int(value)


def _shown(text: str) -> str:
    """*text* quoted for a reason, cut to a sensible length."""
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _name_parameter(reason: str, parameters: Mapping[str, str]) -> str:
    """Put the parameter name in front of a query layer reason, whose
    reasons start with the keyword they are about."""
    for path, name in parameters.items():
        leaf = path.rsplit(".", 1)[-1]
        if not reason.startswith((f"{leaf}:", f"{path}:", f"{leaf} ", f"{path} ")):
            continue
        if name in (path, leaf) or name.startswith("the "):
            return reason  # the reason names it as the client did
        return f"query parameter {name!r}: {reason}"
    return reason


def page_size(limit: int | None, maximum: int) -> tuple[int, bool]:
    """The matches to return and whether the server (not the client's
    ``limit``) set that number.

    PS3.18 8.3.4.4: without ``limit``, or with one above what the server
    supports, the server returns at most its maximum.
    """
    if limit is not None and limit <= maximum:
        return limit, False
    if limit is None:
        return min(DEFAULT_LIMIT, maximum), True
    return maximum, True


# --------------------------------------------------------------------------
# the response (PS3.18 10.6.3)


def warning(root: str, text: str) -> str:
    """A Warning header value as PS3.18 writes it: ``299 {+service}: "text"``."""
    return f'299 {root}: "{text}"'


def return_keywords(search: SearchRequest, service: QueryService) -> tuple[str, ...]:
    """The attributes of every result, in a stable order.

    PS3.18 10.6.3.3: the level's attributes of Tables 10.6.3-3 to -5; for
    a search of series or instances without a study in the path also the
    study's, and for instances without a series in the path also the
    series'; every matching key given; every ``includefield`` attribute the
    index holds (others are ignored).  The UIDs of the levels above are
    always returned, so that each result names its place.
    """
    level = search.level
    wanted: list[str] = []
    if level is Level.STUDY or search.study is None:
        wanted.extend(STUDY_ATTRIBUTES)
    if level is Level.SERIES or (level is Level.IMAGE and search.series is None):
        wanted.extend(SERIES_ATTRIBUTES)
    if level is Level.IMAGE:
        wanted.extend(INSTANCE_ATTRIBUTES)
    wanted.append("StudyInstanceUID")
    if level is not Level.STUDY:
        wanted.append("SeriesInstanceUID")
    available = available_keywords(level, service)
    wanted.extend(sorted(search.returned & available))
    if search.include is None:
        wanted.extend(sorted(available))
    else:
        wanted.extend(sorted(search.include & available))
    return tuple(dict.fromkeys(wanted))


def available_keywords(level: Level, service: QueryService) -> frozenset[str]:
    """Every attribute a result at *level* can carry: what the query layer
    returns (less :data:`_HIDDEN`) and what this view computes."""
    held = set(service.return_keys(level)) - _HIDDEN
    held |= _COMPUTED
    if level is Level.IMAGE:
        held.add("AvailableTransferSyntaxUID")
    return frozenset(held)


def retrieve_url(root: str, level: Level, match: Mapping[str, Any]) -> str:
    """Retrieve URL (0008,1190) of a result: the WADO-RS resource of the
    study, series or instance (PS3.18 10.4.1, Table 10.6.3-3 to -5)."""
    study = match["StudyInstanceUID"]
    if level is Level.STUDY:
        return study_url(root, study)
    if level is Level.SERIES:
        return series_url(root, study, match["SeriesInstanceUID"])
    return instance_url(root, study, match["SeriesInstanceUID"], match["SOPInstanceUID"])


def needed_keys(level: Level, keywords: Iterable[str]) -> frozenset[str]:
    """The attributes the query layer must return for results carrying
    *keywords*: those it holds, the UIDs a Retrieve URL is built from, and
    the Transfer Syntax UID behind Available Transfer Syntax UID."""
    needed = set(keywords)
    if "RetrieveURL" in needed:
        needed.update(_URL_UIDS[level])
    if "AvailableTransferSyntaxUID" in needed:
        needed.add("TransferSyntaxUID")
    return frozenset(needed)


#: The UIDs in the Retrieve URL of a result at each level.
_URL_UIDS: Final = {
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}

#: How a result gets each attribute (see :func:`_result_plan`).
_CONSTANT, _URL, _TRANSFER_SYNTAX, _IF_KNOWN, _FROM_MATCH = range(5)

#: One attribute of a result: its JSON member name (the tag, PS3.18 F.2.2),
#: keyword, VR, how its value is found, and the element when it is constant.
_PlanItem = tuple[str, str, str, int, dict[str, Any] | None]

#: String VRs whose value is copied as is (not PN, not a number, not SQ).
_PLAIN_TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


@functools.lru_cache(maxsize=256)
def _result_plan(level: Level, keywords: tuple[str, ...]) -> tuple[_PlanItem, ...]:
    """The attributes of every result of one request, in ascending tag order
    (the order of PS3.18 F.2), each with how its value is found; worked out
    once per level and set of return keys rather than once per result."""
    items: list[tuple[int, _PlanItem]] = []
    for keyword in dict.fromkeys(keywords):
        tag = tag_of(keyword)
        vr = vr_of(tag)
        constant: dict[str, Any] | None = None
        if keyword == "SpecificCharacterSet":
            kind, constant = _CONSTANT, json_element(vr, UTF8_CHARSET)
        elif keyword == "InstanceAvailability":
            # every instance the index lists is in the blob store: on line
            kind, constant = _CONSTANT, json_element(vr, "ONLINE")
        elif keyword == "RetrieveURL":
            kind = _URL
        elif keyword == "AvailableTransferSyntaxUID":
            kind = _TRANSFER_SYNTAX
        elif keyword == "TimezoneOffsetFromUTC":
            # Tables 10.6.3-3 to -5: present only if known
            kind = _IF_KNOWN
        else:
            kind = _FROM_MATCH
        items.append((tag, (tag_hex(tag), keyword, vr, kind, constant)))
    items.sort(key=lambda item: item[0])
    return tuple(item for _, item in items)


def _result_json(
    plan: Sequence[_PlanItem], match: Mapping[str, Any], level: Level, root: str
) -> JsonDataset:
    """One result in the DICOM JSON Model (PS3.18 Annex F) following *plan*."""
    result: JsonDataset = {}
    for member, keyword, vr, kind, constant in plan:
        if kind == _FROM_MATCH:
            if keyword in match:
                result[member] = _element(vr, match[keyword])
        elif kind == _CONSTANT:
            assert constant is not None
            result[member] = constant
        elif kind == _URL:
            result[member] = _element(vr, retrieve_url(root, level, match))
        elif kind == _TRANSFER_SYNTAX:
            result[member] = _element(vr, match.get("TransferSyntaxUID"))
        elif match.get(keyword):  # _IF_KNOWN
            result[member] = _element(vr, match[keyword])
    return result


def _element(vr: str, value: Any) -> dict[str, Any]:
    """:func:`~dicomweb.jsonmodel.json_element` of *value*, the common cases
    (no value, one string, one integer) without its general machinery; the
    result is the same."""
    if value is None or (type(value) is str and not value):
        return {"vr": vr}  # PS3.18 F.2.5: no Value member
    if type(value) is str and "\\" not in value:
        if vr in _PLAIN_TEXT_VRS:
            return {"vr": vr, "Value": [value]}
        if vr == "PN" and "=" not in value and value.strip():
            # PS3.18 F.2.2: one name of only its alphabetic group
            return {"vr": vr, "Value": [{"Alphabetic": value}]}
    elif type(value) is int and vr in NUMBER_VRS:
        return {"vr": vr, "Value": [value]}
    elif (
        type(value) is list
        and vr in _PLAIN_TEXT_VRS
        and all(type(item) is str and item and "\\" not in item for item in value)
    ):
        # several plain strings (ModalitiesInStudy)
        return {"vr": vr, "Value": value} if value else {"vr": vr}
    return json_element(vr, value)


__all__ = [
    "DEFAULT_LIMIT",
    "INSTANCE_ATTRIBUTES",
    "SERIES_ATTRIBUTES",
    "STUDY_ATTRIBUTES",
    "SearchRequest",
    "attribute_path",
    "bp",
    "negotiate",
    "page_size",
    "parse_search",
    "return_keywords",
]
