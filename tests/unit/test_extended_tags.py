"""Extended query tags without a database: what a tag to add may be, and how
each VR's values are validated and keyed (appliance/extended_tags.py)."""

from __future__ import annotations

import datetime as dt
import struct

import pytest
from pydicom.dataset import Dataset

from appliance.extended_tags import (
    READY,
    ExtendedTag,
    InvalidTag,
    dt_key,
    extract,
    parse_new_tag,
    values_from_bytes,
)
from appliance.model import Level

CREATOR = "ACME 1.0"


def tag(path: str, vr: str, creator: str = CREATOR) -> ExtendedTag:
    return ExtendedTag(
        key=1,
        path=path,
        vr=vr,
        private_creator=creator,
        level=Level.STUDY,
        status=READY,
        query_status="Enabled",
        error_count=0,
        operation_id=None,
        created_at=dt.datetime.now(dt.UTC),
    )


def private(vr: str, value: object) -> Dataset:
    ds = Dataset()
    ds.private_block(0x0009, CREATOR, create=True).add_new(0x01, vr, value)
    return ds


def test_a_standard_tag_takes_its_vr_from_the_dictionary() -> None:
    new = parse_new_tag({"path": "ManufacturerModelName", "level": "series"})
    assert (new.path, new.vr, new.private_creator, new.level) == (
        "00081090",
        "LO",
        "",
        Level.SERIES,
    )
    assert parse_new_tag({"path": "00101010", "level": "Study"}).vr == "AS"


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"path": "00091001", "vr": "LO", "level": "Study"}, "privateCreator"),
        ({"path": "00090010", "vr": "LO", "privateCreator": CREATOR, "level": "Study"}, "creator"),
        ({"path": "00020010", "level": "Study"}, "not an attribute"),
        ({"path": "StationName", "vr": "SH ", "privateCreator": "X", "level": "Study"}, "only"),
        ({"path": "StationName", "vr": "LO", "level": "Study"}, "differs"),
        ({"path": "PixelData", "level": "Instance"}, "not supported"),
        ({"path": "StationName", "level": "Study", "extra": 1}, "unknown member"),
    ],
)
def test_tags_refused(entry: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidTag, match=reason):
        parse_new_tag(entry)


@pytest.mark.parametrize(
    ("vr", "value", "rows"),
    [
        ("LO", "Alpha", [{"value": "Alpha", "value_norm": "Alpha"}]),
        ("PN", "Doe^Jane", [{"value": "Doe^Jane", "value_norm": "doe^jane"}]),
        ("CS", ["A", "B"], [{"value": "A", "value_norm": "A"}, {"value": "B", "value_norm": "B"}]),
        ("AS", "035Y", [{"value": "035Y", "value_norm": "035Y"}]),
        ("DA", "20240229", [{"value": "20240229", "value_key": "20240229"}]),
        ("TM", "1015", [{"value": "1015", "value_key": "101500.000000"}]),
        ("DT", "2024022910", [{"value": "2024022910", "value_key": "20240229100000.000000"}]),
        ("IS", "42", [{"value": 42}]),
        ("DS", "1.50", [{"value": 1.5}]),
        ("SL", -7, [{"value": -7}]),
        ("FD", 2.5, [{"value": 2.5}]),
    ],
)
def test_valid_values_and_their_keys(vr: str, value: object, rows: list[dict[str, object]]) -> None:
    [found] = extract(private(vr, value), [tag("00091001", vr)])
    assert found.error == ""
    assert list(found.rows) == rows


@pytest.mark.parametrize(
    ("vr", "value", "reason"),
    [
        ("DA", "20240230", "not a valid DA"),
        ("TM", "2561", "not a valid TM"),
        ("DT", "2024-01", "not a valid DT"),
        ("AS", "35Y", "age"),
        ("CS", "lower", "characters CS"),
        ("SH", "x" * 17, "longer than 16"),
        ("UI", "1.02.3", "not a valid UID"),
        ("IS", "3000000000", "outside the range"),
        ("UN", b"one", "not a number"),  # a DS read without its VR
    ],
)
def test_invalid_values_are_errors_naming_no_value(
    vr: str, value: str | bytes, reason: str
) -> None:
    [found] = extract(private(vr, value), [tag("00091001", "DS" if vr == "UN" else vr)])
    assert found.rows == ()
    assert reason in found.error
    text = value.decode() if isinstance(value, bytes) else value
    assert text not in found.error


def test_a_value_pydicom_cannot_convert_is_an_error_naming_no_value() -> None:
    ds = Dataset()
    block = ds.private_block(0x0009, CREATOR, create=True)
    block.add_new(0x01, "UN", b"12a4")
    ds[0x00091001].VR = "IS"  # an explicit VR file would say IS
    [found] = extract(ds, [tag("00091001", "IS")])
    assert found.rows == ()
    assert "12a4" not in found.error


def test_another_creators_block_is_not_the_tag() -> None:
    ds = Dataset()
    ds.private_block(0x0009, "OTHER", create=True).add_new(0x01, "LO", "x")
    assert extract(ds, [tag("00091001", "LO")]) == []


def test_values_read_without_their_vr() -> None:
    assert values_from_bytes(struct.pack("<2l", -1, 7), "SL") == [-1, 7]
    assert values_from_bytes(b"A\\B ", "LO") == ["A", "B"]
    with pytest.raises(ValueError, match="multiple of 4"):
        values_from_bytes(b"\x01\x02\x03", "UL")


def test_dt_keys_sort_in_time_order() -> None:
    assert dt_key("2024") == "20240101000000.000000"
    assert dt_key("20240229235959.5+0100") == "20240229235959.500000"
    assert dt_key("20230229") == ""
    assert dt_key("2023") < dt_key("20230601") < dt_key("2024")
