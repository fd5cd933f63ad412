"""The DICOM JSON Model (PS3.18 Annex F) for attributes held as plain values.

The index and the query layer hold attributes as ``keyword -> value`` with
Python values: ``str`` in DICOM string form (multiple values joined by
backslash, a Person Name with its ``=``-separated component groups), ``int``
or ``float`` for numbers, ``None`` or ``""`` for an empty value, a ``list``
for several values, and a list of mappings for the items of a sequence.
This module turns such a mapping into one DICOM JSON object (PS3.18 F.2):

- each attribute is a member named by its tag as eight upper-case hex
  digits (PS3.18 F.2.2), in ascending tag order as in a DICOM data set;
- ``"vr"`` is the attribute's VR from pydicom's data dictionary (PS3.6);
- ``"Value"`` is an array of the values (F.2.2, F.2.3): strings for the
  string VRs, JSON numbers for IS, DS and the binary numeric VRs (F.2.3),
  an object with the members ``Alphabetic``, ``Ideographic`` and
  ``Phonetic`` per Person Name, holding only the component groups that are
  not empty (F.2.2), and one JSON object per item of a sequence (F.2.2);
- an attribute without a value has no ``"Value"`` member, and an empty value
  among several values is ``null`` (F.2.5, null values).

Text is kept as Unicode and serialised by the caller as UTF-8, the encoding
of JSON text (RFC 8259 8.1), whatever the Specific Character Set of the
stored instance was.

Only the VRs the index holds are needed by QIDO-RS; the same functions serve
WADO-RS metadata built from the index.  Bulk data (OB, OW, ...) is out of
scope here: a full data set's metadata is pydicom's ``Dataset.to_json_dict``
with a bulk data handler.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

#: A DICOM JSON object: tag (``"0020000D"``) -> ``{"vr": ..., "Value": [...]}``.
JsonDataset = dict[str, dict[str, Any]]

#: VRs whose JSON values are numbers (PS3.18 F.2.3).
NUMBER_VRS = frozenset({"IS", "DS", "SS", "US", "SL", "UL", "SV", "UV", "FL", "FD"})

#: VRs whose value is a single string in which a backslash is not a separator
#: (PS3.5 6.2: LT, ST, UT and UR hold one value; a backslash is text there).
SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})

#: Person Name component groups in order (PS3.5 6.2.1; PS3.18 F.2.2).
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


class UnknownAttribute(ValueError):
    """A keyword or tag that the data dictionary does not know, or whose VR is
    ambiguous (``"US or SS"``) and cannot be written without the data."""


def tag_of(keyword: str) -> int:
    """The tag of a PS3.6 keyword.

    Raises
    ------
    UnknownAttribute
        if the data dictionary has no such keyword.
    """
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise UnknownAttribute(f"{keyword!r} is not a DICOM keyword (PS3.6)")
    return int(tag)


def vr_of(tag: int) -> str:
    """The VR of *tag* from the data dictionary.

    Raises
    ------
    UnknownAttribute
        if the tag is not in the dictionary or its VR depends on the data.
    """
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        raise UnknownAttribute(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not in PS3.6") from None
    if len(vr) != 2:
        raise UnknownAttribute(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has no single VR ({vr})")
    return vr


def tag_hex(tag: int) -> str:
    """*tag* as the JSON member name: eight upper-case hex digits (F.2.2)."""
    return f"{tag:08X}"


def to_json_dataset(attributes: Mapping[str, Any]) -> JsonDataset:
    """One DICOM JSON object for ``keyword -> value`` *attributes*.

    Parameters
    ----------
    attributes
        Keywords (PS3.6) and their values in the forms described in the module
        docstring; a sequence's value is a list of such mappings.

    Returns
    -------
    dict
        Tag -> ``{"vr", "Value"?}``, in ascending tag order.

    Raises
    ------
    UnknownAttribute
        for a keyword the data dictionary does not know.
    """
    members: list[tuple[int, dict[str, Any]]] = []
    for keyword, value in attributes.items():
        tag, vr = _tag_and_vr(keyword)
        members.append((tag, json_element(vr, value)))
    members.sort(key=lambda member: member[0])
    return {tag_hex(tag): element for tag, element in members}


@functools.lru_cache(maxsize=1024)
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    """The tag and VR of *keyword*, looked up once per process."""
    tag = tag_of(keyword)
    return tag, vr_of(tag)


def json_element(vr: str, value: Any) -> dict[str, Any]:
    """The JSON object of one attribute of VR *vr* (PS3.18 F.2.2).

    ``"Value"`` is left out when the attribute is empty (PS3.18 F.2.5).
    """
    element: dict[str, Any] = {"vr": vr}
    values = _json_values(vr, value)
    if values:
        element["Value"] = values
    return element


def _json_values(vr: str, value: Any) -> list[Any]:
    """The ``"Value"`` array for *value*, or ``[]`` when it is empty."""
    if value is None:
        return []
    if vr == "SQ":
        items: Iterable[Mapping[str, Any]] = value
        return [to_json_dataset(item) for item in items]
    raw = _split(vr, value)
    if not raw or all(item is None or item == "" for item in raw):
        return []
    if vr == "PN":
        return [person_name(item) for item in raw]
    if vr in NUMBER_VRS:
        return [number(item) for item in raw]
    return [None if item is None or item == "" else str(item) for item in raw]


def _split(vr: str, value: Any) -> list[Any]:
    """The individual values of *value*: a list as is, a string split on the
    backslash value delimiter (PS3.5 6.4) unless the VR holds one text."""
    if isinstance(value, str):
        if vr in SINGLE_TEXT_VRS:
            return [value]
        return value.split("\\")
    if isinstance(value, Sequence):
        return list(value)
    return [value]


def person_name(value: Any) -> dict[str, str] | None:
    """The JSON object of one Person Name (PS3.18 F.2.2).

    The ``=``-separated component groups (PS3.5 6.2.1) become the members
    ``Alphabetic``, ``Ideographic`` and ``Phonetic``; an empty group is left
    out, and a name with no group at all is ``null``.
    """
    if value is None:
        return None
    groups = str(value).split("=")
    found = {name: group for name, group in zip(PN_GROUPS, groups, strict=False) if group.strip()}
    return found or None


def number(value: Any) -> int | float | None:
    """One numeric value as a JSON number (PS3.18 F.2.3).

    Integers stay integers (``"007"`` is ``7``); a DS such as ``"1.5e3"`` is
    a float.  An empty, malformed or non-finite value (JSON has no NaN) is
    ``null``: the stored bytes, not this view of them, are authoritative.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    text = str(value).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        parsed = float(text)
    except ValueError:
        return None
    return parsed if math.isfinite(parsed) else None


__all__ = [
    "NUMBER_VRS",
    "PN_GROUPS",
    "JsonDataset",
    "UnknownAttribute",
    "json_element",
    "number",
    "person_name",
    "tag_hex",
    "tag_of",
    "to_json_dataset",
    "vr_of",
]
