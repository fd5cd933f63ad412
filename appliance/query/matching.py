"""Attribute matching (PS3.4 C.2.2.2) as SQLAlchemy conditions.

Each matching key's value, in DICOM string form, becomes one SQL condition (or
none, for Universal Matching).  The rules, with the standard's text they
implement:

- C.2.2.2.1 Single Value Matching: "only entities with values that match
  exactly the value specified in the request shall match".  Case-sensitive,
  except PN, which "may" be matched insensitively to case: we compare the
  casefolded ``*_norm`` column with the casefolded value.
- C.2.2.2.2 List of UID Matching: backslash-separated UIDs; "each UID in the
  list ... may generate a match" (SQL ``IN``).
- C.2.2.2.3 Universal Matching: "If the value specified for a Key Attribute
  in a request is zero length, then all entities shall match this
  Attribute".  A value of only ``*`` is the same (C.2.2.2.4, Note).
- C.2.2.2.4 Wild Card Matching: for AE, CS, LO, LT, PN, SH, ST, UC, UR, UT,
  ``*`` matches any sequence of characters and ``?`` any single character
  (SQL ``LIKE`` with ``%``, ``_`` and the escape character escaped).
- C.2.2.2.5 Range Matching for DA and TM: ``a-b``, ``-b``, ``a-``, inclusive.

Not supported, and refused or ignored as stated:

- C.2.2.2.5.4 combined date-time matching (Extended Negotiation): a DA key and
  its TM key are matched independently, never as one DT value.
- C.2.2.2.6 Sequence Matching: no sequence attribute is indexed.
- C.2.2.2.7 Empty Value Matching (``""``): the value is matched literally.
- Fuzzy semantic matching of person names (Extended Negotiation).

Leading and trailing spaces of a value (and of each value of a list) are not
significant, as for the stored values (PS3.5 6.2).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select

from appliance.dicomio import is_valid_uid, normalize_da, tm_key
from appliance.errors import QueryError
from appliance.index.schema import series, study
from appliance.query.keys import Attribute

#: The LIKE escape character, given explicitly (SQLite has no default one,
#: PostgreSQL's default is backslash, which stored multi-values contain).
ESCAPE = "!"

#: VRs on which PS3.4 C.2.2.2.4 allows wild cards; the key table uses these.
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})

#: PS3.5 6.2: IS is a signed 32-bit range, US is 0..65535.
#: PS3.5 6.2: the range of each integer VR (IS and US are standard keys'; the
#: others are extended query tags', :mod:`appliance.extended_tags`).
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "IS": (-(2**31), 2**31 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "US": (0, 2**16 - 1),
}

_DA_RE = re.compile(r"\d{8}")


def escape_like(text: str) -> str:
    """*text* with the LIKE metacharacters ``%`` and ``_`` and the escape
    character itself escaped, so that it matches literally."""
    return text.replace(ESCAPE, ESCAPE * 2).replace("%", ESCAPE + "%").replace("_", ESCAPE + "_")


def wildcard_pattern(value: str) -> str:
    """The LIKE pattern for a DICOM wild card value (PS3.4 C.2.2.2.4):
    ``*`` becomes ``%``, ``?`` becomes ``_``, everything else is literal."""
    parts: list[str] = []
    for char in value:
        if char == "*":
            parts.append("%")
        elif char == "?":
            parts.append("_")
        else:
            parts.append(escape_like(char))
    return "".join(parts)


def is_universal(value: str) -> bool:
    """True for a zero-length value (PS3.4 C.2.2.2.3) or one made only of
    ``*`` (C.2.2.2.4, Note: wild card matching on ``*`` is universal)."""
    value = value.strip()
    return value == "" or set(value) == {"*"}


def has_wildcard(value: str) -> bool:
    """True if *value* asks for Wild Card Matching (PS3.4 C.2.2.2.4)."""
    return "*" in value or "?" in value


def condition(
    attribute: Attribute, column: ColumnElement[Any], value: str
) -> ColumnElement[bool] | None:
    """The condition for one matching key, or None for Universal Matching.

    Parameters
    ----------
    attribute
        The key's entry in the keyword table.
    column
        The column to match: the attribute's ``match_column`` if it has one
        (the casefolded PN or the TM key), else its value column.
    value
        The key's value in DICOM string form.

    Raises
    ------
    QueryError
        if *value* is malformed for the attribute's VR.
    """
    value = value.strip()
    # PS3.4 C.2.2.2.3 Universal Matching: zero length, or only "*".
    if is_universal(value):
        return None
    keyword, vr = attribute.keyword, attribute.vr
    if vr == "UI":
        return _match_uid(column, value, keyword)
    if vr == "DA":
        return _match_date(column, value, keyword)
    if vr == "TM":
        return _match_time(column, value, keyword)
    if vr in INTEGER_RANGES:
        return _match_integer(column, value, keyword, vr)
    if vr == "PN":
        return _match_person_name(column, value)
    assert vr in _WILDCARD_VRS, vr
    return _match_text(column, value)


def _match_text(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    # PS3.4 C.2.2.2.4 Wild Card Matching: "*" any sequence, "?" any single
    # character, case-sensitive (both databases have a case-sensitive LIKE).
    if has_wildcard(value):
        return column.like(wildcard_pattern(value), escape=ESCAPE)
    # PS3.4 C.2.2.2.1 Single Value Matching: exact, case-sensitive.  A
    # backslash is not a list separator here (List of UID Matching is for UI
    # only): it matches a stored multi-valued string literally.
    return column == value


def _match_person_name(norm: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    # PS3.4 C.2.2.2.1: for PN an SCP "may perform literal matching that is
    # ... insensitive to some or all aspects of case": the value and the
    # stored *_norm column are both casefolded.
    folded = value.casefold()
    with_groups = "=" in folded
    if has_wildcard(folded):
        # PS3.4 C.2.2.2.4: for PN "Wild Card Matching is implementation
        # dependent".  Ours: the pattern matches the whole value, or (when it
        # has no "=") the value's first, alphabetic, component group.  A "*"
        # may span a "=", so "*x" can also match "...x=" in a later group.
        pattern = wildcard_pattern(folded)
        whole = norm.like(pattern, escape=ESCAPE)
        if with_groups or folded.endswith("*"):
            # a trailing "*" already matches the "=..." of the later groups:
            # the second LIKE would add no match, only work (the prefix
            # search "SMI*" is the common case)
            return whole
        return or_(whole, norm.like(pattern + "=%", escape=ESCAPE))
    # PS3.4 C.2.2.2.1 Single Value Matching.  A value without "=" names the
    # alphabetic component group (PS3.5 6.2.1), so it also matches a stored
    # name that has ideographic/phonetic groups after it.
    if with_groups:
        return norm == folded
    return or_(norm == folded, norm.like(escape_like(folded) + "=%", escape=ESCAPE))


def _match_uid(column: ColumnElement[Any], value: str, keyword: str) -> ColumnElement[bool]:
    # PS3.4 C.2.2.2.4: no Wild Card Matching on UI.
    if has_wildcard(value):
        raise QueryError(f"{keyword}: wild cards are not allowed in a UID (PS3.4 C.2.2.2.4)")
    # PS3.4 C.2.2.2.2 List of UID Matching: "\"-separated, each item a single
    # UID; a single UID is Single Value Matching (C.2.2.2.1).
    uids = [uid.strip(" \0") for uid in value.split("\\")]
    for uid in uids:
        if not is_valid_uid(uid):
            raise QueryError(f"{keyword}: {uid!r} is not a valid UID (PS3.5 9.1)")
    if len(uids) == 1:
        return column == uids[0]
    return column.in_(sorted(set(uids)))


def _match_integer(
    column: ColumnElement[Any], value: str, keyword: str, vr: str
) -> ColumnElement[bool]:
    # PS3.4 C.2.2.2.4: no Wild Card Matching on integer VRs; C.2.2.2.5: no Range
    # Matching either.  Only C.2.2.2.1 Single Value Matching, as a number
    # (so "007" matches 7).
    if has_wildcard(value):
        raise QueryError(f"{keyword}: wild cards are not allowed for {vr} (PS3.4 C.2.2.2.4)")
    try:
        number = int(value)
    except ValueError:
        raise QueryError(f"{keyword}: the value is not an integer ({vr})") from None
    low, high = INTEGER_RANGES[vr]
    if not low <= number <= high:
        raise QueryError(f"{keyword}: the value is outside the range of {vr} (PS3.5 6.2)")
    return column == number


# Reasons name the key, never the value (appliance.errors: no patient data in
# a reason; a birth date is patient data).  UIDs may be named.


def _date(text: str, keyword: str) -> str:
    """One DA value as ``YYYYMMDD`` (the retired ``YYYY.MM.DD`` accepted)."""
    text = normalize_da(text.strip())
    if _DA_RE.fullmatch(text) is None:
        raise QueryError(f"{keyword}: the value is not a date YYYYMMDD (PS3.5 6.2 DA)")
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise QueryError(f"{keyword}: the value is not a calendar date") from None
    return text


def _time(text: str, keyword: str) -> str:
    """One TM value as its fixed-width key ``HHMMSS.FFFFFF``; omitted trailing
    components are zero (so ``12`` is 12:00:00.000000)."""
    key = tm_key(text)
    if not key or int(key[0:2]) > 23 or int(key[2:4]) > 59 or int(key[4:6]) > 60:
        raise QueryError(f"{keyword}: the value is not a time HHMMSS.FFFFFF (PS3.5 6.2 TM)")
    return key


def _range(value: str, keyword: str) -> tuple[str, str] | None:
    """The two sides of a range ``a-b`` / ``-b`` / ``a-``, or None if *value*
    has no ``-`` (a single value)."""
    if "-" not in value:
        return None
    if value.count("-") > 1:
        raise QueryError(f"{keyword}: the value is not a range (one '-' allowed, PS3.4 C.2.2.2.5)")
    low, high = (side.strip() for side in value.split("-"))
    if not low and not high:
        raise QueryError(f"{keyword}: a range needs at least one bound")
    return low, high


def _range_condition(
    column: ColumnElement[Any], low: str, high: str, keyword: str
) -> ColumnElement[bool]:
    if low and high and low > high:
        # PS3.4 C.2.2.2.5: "<date1> - <date2>, where <date1> is less or equal
        # to <date2>"; for TM "Range Matching crossing midnight is not
        # supported".  Refused rather than silently matching nothing.
        raise QueryError(f"{keyword}: the range's lower bound is after its upper bound")
    # An empty stored value has no date or time: it is in no range, and ''
    # sorts before every bound in text order, so exclude it explicitly.
    conditions = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high)
    return and_(*conditions)


def _match_date(column: ColumnElement[Any], value: str, keyword: str) -> ColumnElement[bool]:
    # PS3.4 C.2.2.2.4: no Wild Card Matching on DA.
    if has_wildcard(value):
        raise QueryError(f"{keyword}: wild cards are not allowed for DA (PS3.4 C.2.2.2.4)")
    bounds = _range(value, keyword)
    if bounds is None:
        # PS3.4 C.2.2.2.1 Single Value Matching on the stored YYYYMMDD.
        return column == _date(value, keyword)
    # PS3.4 C.2.2.2.5.1 Range Matching of DA: "<date1> - <date2>" all dates
    # between, inclusive; "- <date1>" all dates prior to and including;
    # "<date1> -" <date1> and all subsequent dates.
    low, high = bounds
    return _range_condition(
        column,
        _date(low, keyword) if low else "",
        _date(high, keyword) if high else "",
        keyword,
    )


def _match_time(key: ColumnElement[Any], value: str, keyword: str) -> ColumnElement[bool]:
    """TM matching on the ``*_time_key`` column.

    PS3.4 C.2.2.2.5.2: "All comparison ... shall be based on a direct
    comparison of times within a day"; "Prior includes all times starting
    from midnight of the same day to the specified time".  A bound with
    omitted components is the exact time it names, the omitted components
    being zero: ``-12`` matches up to and including 12:00:00.000000 (not
    12:59:59.999999), ``1000-`` from 10:00:00.000000 on.  Single Value
    Matching compares the same keys, so ``1030`` matches a stored ``103000``.
    """
    # PS3.4 C.2.2.2.4: no Wild Card Matching on TM.
    if has_wildcard(value):
        raise QueryError(f"{keyword}: wild cards are not allowed for TM (PS3.4 C.2.2.2.4)")
    bounds = _range(value, keyword)
    if bounds is None:
        # PS3.4 C.2.2.2.1 Single Value Matching on the fixed-width key.
        return key == _time(value, keyword)
    # PS3.4 C.2.2.2.5.2 Range Matching of TM, inclusive at both ends.
    low, high = bounds
    return _range_condition(
        key,
        _time(low, keyword) if low else "",
        _time(high, keyword) if high else "",
        keyword,
    )


def modalities_in_study(value: str) -> ColumnElement[bool] | None:
    """The condition for ModalitiesInStudy on the ``study`` table, or None.

    PS3.4 C.6.1.1.3.1: ModalitiesInStudy is the set of the Modality values of
    the study's series.  A study matches if one of its series matches the
    value; a backslash-separated list matches a study having any of the
    listed modalities.  Each item is Single Value or Wild Card Matching on
    CS (PS3.4 C.2.2.2.1, C.2.2.2.4); an item of only ``*`` (or an empty value)
    is Universal Matching (C.2.2.2.3).
    """
    items = [item.strip() for item in value.split("\\")]
    items = [item for item in items if item]
    if not items or any(is_universal(item) for item in items):
        return None
    # An alias, so the EXISTS never correlates with the series table of a
    # SERIES- or IMAGE-level query around it.
    other = series.alias("modalities_in_study")
    alternatives = [_match_text(other.c.modality, item) for item in dict.fromkeys(items)]
    return select(other.c.id).where(other.c.study_fk == study.c.id, or_(*alternatives)).exists()


__all__ = [
    "ESCAPE",
    "condition",
    "escape_like",
    "has_wildcard",
    "is_universal",
    "modalities_in_study",
    "wildcard_pattern",
]
