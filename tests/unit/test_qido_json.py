"""QIDO-RS results in the DICOM JSON Model (PS3.18 Annex F): the view's
per-request plan gives the same JSON as the general converter of
:mod:`dicomweb.jsonmodel` (no database, no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.model import Level
from appliance.query.keys import RETURN_KEYS
from dicomweb.jsonmodel import json_element, to_json_dataset
from dicomweb.views import qido

ROOT = "http://example.test/v1"


@pytest.mark.parametrize(
    ("vr", "value"),
    [
        ("CS", None),
        ("CS", ""),
        ("CS", "CT"),
        ("CS", "ORIGINAL\\PRIMARY"),
        ("CS", "A\\"),
        ("CS", ["CT", "MR"]),
        ("CS", []),
        ("CS", ["CT", ""]),
        ("CS", ["CT\\MR"]),
        ("LO", " padded "),
        ("LO", "ID1\\ID2"),
        ("UI", "1.2.3"),
        ("DA", "20150304"),
        ("TM", "101500.5"),
        ("SH", "x"),
        ("UR", "http://a/b\\c"),
        ("LT", "one\\text"),
        ("PN", "Doe^John"),
        ("PN", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("PN", "=山田"),
        ("PN", "   "),
        ("PN", "Doe^John\\Roe^Jane"),
        ("PN", ""),
        ("PN", None),
        ("IS", 7),
        ("IS", 0),
        ("IS", None),
        ("IS", "007"),
        ("IS", True),
        ("US", 512),
        ("DS", "1.5"),
        ("SH", 5),
    ],
)
def test_element_is_the_json_models_element_f_2(vr: str, value: Any) -> None:
    """The short cuts of the view (no value, one string, one integer, a list
    of plain strings) give exactly what :func:`json_element` gives (PS3.18
    F.2.2 Value arrays, F.2.5 no Value member when empty)."""
    assert qido._element(vr, value) == json_element(vr, value)


def _reference(match: dict[str, Any], level: Level, keywords: tuple[str, ...]) -> Any:
    """A result built attribute by attribute with the general converter:
    what each computed attribute is, per PS3.18 Tables 10.6.3-3 to -5."""
    values: dict[str, Any] = {}
    for keyword in keywords:
        if keyword == "SpecificCharacterSet":
            values[keyword] = qido.UTF8_CHARSET
        elif keyword == "InstanceAvailability":
            values[keyword] = "ONLINE"
        elif keyword == "RetrieveURL":
            values[keyword] = qido.retrieve_url(ROOT, level, match)
        elif keyword == "AvailableTransferSyntaxUID":
            values[keyword] = match.get("TransferSyntaxUID")
        elif keyword == "TimezoneOffsetFromUTC":
            if match.get(keyword):
                values[keyword] = match[keyword]
        elif keyword in match:
            values[keyword] = match[keyword]
    return to_json_dataset(values)


def _match(level: Level, **values: Any) -> dict[str, Any]:
    match: dict[str, Any] = dict.fromkeys(RETURN_KEYS[level], "")
    match.update(
        StudyInstanceUID="1.2.3",
        SeriesInstanceUID="1.2.3.4",
        SOPInstanceUID="1.2.3.4.5",
        ModalitiesInStudy=["CT", "MR"],
        NumberOfStudyRelatedSeries=2,
        NumberOfStudyRelatedInstances=3,
        NumberOfSeriesRelatedInstances=1,
        SeriesNumber=None,
        InstanceNumber=4,
        Rows=512,
        Columns=None,
        RequestAttributesSequence=[
            {"ScheduledProcedureStepID": "SPS1", "RequestedProcedureID": ""}
        ],
    )
    match = {key: value for key, value in match.items() if key in RETURN_KEYS[level]}
    match.update(values)
    return match


@pytest.mark.parametrize("level", [Level.STUDY, Level.SERIES, Level.IMAGE])
@pytest.mark.parametrize(
    "values",
    [
        {},
        {"PatientName": "Yamada^Tarou=山田^太郎", "TimezoneOffsetFromUTC": "+0900"},
        {"PatientName": "", "PatientID": "A\\B", "ModalitiesInStudy": []},
        {"TransferSyntaxUID": "1.2.840.10008.1.2.1", "StudyDescription": "CT HEAD"},
    ],
)
def test_result_follows_the_plan_in_tag_order_f_2(level: Level, values: dict[str, Any]) -> None:
    """Every attribute the request returns, in ascending tag order, with the
    values the general converter gives; a keyword the match lacks (the
    instance attributes of a study) is left out, Timezone Offset From UTC
    only when known."""
    keywords = tuple(
        dict.fromkeys(
            (
                *qido.STUDY_ATTRIBUTES,
                *qido.SERIES_ATTRIBUTES,
                *qido.INSTANCE_ATTRIBUTES,
                "AvailableTransferSyntaxUID",
                "StudyDescription",
            )
        )
    )
    match = _match(level, **values)
    plan = qido._result_plan(level, keywords)
    result = qido._result_json(plan, match, level, ROOT)
    expected = _reference(match, level, keywords)
    assert result == expected
    assert list(result) == sorted(result)  # PS3.18 F.2: members in tag order


def test_needed_keys_add_what_computed_attributes_are_made_of() -> None:
    """A Retrieve URL needs the UIDs of its level; Available Transfer Syntax
    UID needs the stored Transfer Syntax UID."""
    assert qido.needed_keys(Level.IMAGE, ["RetrieveURL", "AvailableTransferSyntaxUID"]) >= {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "TransferSyntaxUID",
    }
    assert qido.needed_keys(Level.STUDY, ["PatientID"]) == {"PatientID"}
