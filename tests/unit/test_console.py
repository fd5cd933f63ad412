"""The console's pieces without a server: the CSRF token's derivation, the
study list's form, the received-images chart, the zip stream (whole, and
cut short by a missing blob) and the template filters."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from appliance.activity import HourCount
from appliance.errors import ApplianceError, BlobNotFound, QueryError
from appliance.index.sql import StoredInstance
from dicomweb.auth import csrf_token
from dicomweb.views.console import (
    age,
    dicom_date,
    parse_study_search,
    person_name,
    received_chart,
    size,
    zip_entry_name,
    zip_study,
)

SERIES = "1.2.3.4"


def test_the_csrf_token_is_derived_one_way_and_per_session() -> None:
    token = "dap_0123456789ab_" + "x" * 43
    assert csrf_token(token) == csrf_token(token)  # every worker computes the same
    assert csrf_token(token) != csrf_token(token[:-1] + "y")
    assert token not in csrf_token(token)
    # not the Authenticator's cache key (the bare SHA-256 of the token)
    assert csrf_token(token) != hashlib.sha256(token.encode()).hexdigest()
    assert len(csrf_token(token)) == 64


def test_the_study_form() -> None:
    search = parse_study_search(
        {
            "patient": " doe ",
            "patient_id": "P1",
            "from": "2024-01-01",
            "to": "2024-12-31",
            "modality": "ct",
            "accession": "A*",
            "page": "2",
        }
    )
    assert search.keys == {
        "PatientName": "doe*",  # a prefix, matched case-insensitively by the query layer
        "PatientID": "P1",
        "AccessionNumber": "A*",
        "ModalitiesInStudy": "CT",
        "StudyDate": "20240101-20241231",
    }
    assert search.page == 2
    assert parse_study_search({"patient": "*ann?"}).keys == {"PatientName": "*ann?"}
    assert parse_study_search({"to": "2024-02-29"}).keys == {"StudyDate": "-20240229"}
    assert parse_study_search({"from": "2024-02-29"}).keys == {"StudyDate": "20240229-"}
    assert parse_study_search({}).keys == {}


@pytest.mark.parametrize(
    ("form", "reason"),
    [
        ({"from": "2024-02-30"}, "from: not a date"),
        ({"to": "20240101"}, "to: a date as YYYY-MM-DD"),
        ({"from": "2024-05-01", "to": "2024-04-01"}, "from: the range starts after it ends"),
        ({"modality": "C T"}, "modality: letters and digits only"),
        ({"patient": "a\\b"}, "patient: a backslash or NUL is not allowed"),
        ({"accession": "x" * 65}, "accession: at most 64 characters"),
        ({"page": "-1"}, "page: a number from 0"),
    ],
)
def test_a_bad_form_field_is_named(form: dict[str, str], reason: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_study_search(form)
    assert caught.value.reason.startswith(reason)


def test_the_chart_stacks_the_hours_and_names_the_busiest() -> None:
    now = dt.datetime(2026, 12, 3, 5, 40, tzinfo=dt.UTC)
    hour = dt.datetime(2026, 12, 3, 5, tzinfo=dt.UTC)
    earlier = hour - dt.timedelta(hours=2)
    rows = [
        HourCount(earlier, "dimse", "CT1", 4),
        HourCount(hour, "dimse", "CT1", 6),
        HourCount(hour, "dicomweb", "", 3),
        HourCount(hour - dt.timedelta(hours=30), "dimse", "OLD", 99),  # outside the 24 h
    ] + [HourCount(hour, "dimse", f"AE{n}", 1) for n in range(8)]
    chart = received_chart(rows, now, 24, width=240, height=100)
    assert chart.total == 4 + 6 + 3 + 8
    assert chart.top == 6 + 3 + 8
    labels = [label for _, label, _ in chart.legend]
    assert labels[:2] == ["CT1 (dimse)", "dicomweb"]
    assert labels[-1] == "other"  # the eighth series and beyond
    assert len(chart.legend) == 8
    assert sum(count for _, _, count in chart.legend) == chart.total
    last = [bar for bar in chart.bars if bar.x > 230]
    assert sum(bar.height for bar in last) == pytest.approx(100)
    two_ago = [bar for bar in chart.bars if 210 < bar.x < 220]
    assert [bar.label for bar in two_ago] == ["03:00 CT1 (dimse): 4"]
    assert received_chart([], now).bars == []


class Blobs:
    """A retrieve service over bytes in memory; *missing* blobs raise."""

    def __init__(self, blobs: dict[str, bytes], missing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.blobs = blobs
        self.missing = missing

    def stream(self, stored: StoredInstance) -> IO[bytes]:
        if stored.blob_key in self.missing:
            raise BlobNotFound("the blob is gone")
        return io.BytesIO(self.blobs[stored.blob_key])


def stored(sop: str, data: bytes) -> StoredInstance:
    return StoredInstance(
        sop, "1.2.840.10008.5.1.4.1.1.7", SERIES, "1.2.3", "1.2.840.10008.1.2.1", sop, len(data)
    )


@contextmanager
def broken_note(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    noted: list[Any] = []
    monkeypatch.setattr("dicomweb.audit.note_broken", noted.append)
    yield noted


def test_the_zip_holds_each_blob_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = {"1.2.3.4.1": b"DICM" * 50_000, "1.2.3.4.2": b"", "1.2.3.4.3": bytes(range(256))}
    instances = [stored(sop, data) for sop, data in blobs.items()]
    with broken_note(monkeypatch) as noted:
        body = b"".join(zip_study(Blobs(blobs), instances, {}))  # type: ignore[arg-type]
    assert not noted
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == [f"{SERIES}/{sop}.dcm" for sop in blobs]
        for sop, data in blobs.items():
            assert archive.read(f"{SERIES}/{sop}.dcm") == data


def test_a_missing_blob_cuts_the_zip_short(monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = {"1.2.3.4.1": b"a" * 1000, "1.2.3.4.2": b"b" * 1000}
    instances = [stored(sop, data) for sop, data in blobs.items()]
    environ: dict[str, Any] = {}
    with broken_note(monkeypatch) as noted:
        body = b"".join(zip_study(Blobs(blobs, {"1.2.3.4.2"}), instances, environ))  # type: ignore[arg-type]
    assert noted == [environ]  # the audit event says the answer broke
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(body))  # no central directory: visibly incomplete


def test_an_entry_name_is_made_of_checked_uids(tmp_path: Path) -> None:
    assert zip_entry_name(stored("1.2.3.4.5", b"")) == f"{SERIES}/1.2.3.4.5.dcm"
    with pytest.raises(ApplianceError, match="not a valid UID"):
        zip_entry_name(stored("../../etc/passwd", b""))


def test_the_filters() -> None:
    assert person_name("DOE^JOHN^Q^DR") == "DOE, JOHN Q"
    assert person_name("DOE") == "DOE"
    assert person_name("Yamada^Tarou=山田^太郎") == "Yamada, Tarou"
    assert person_name(None) == ""
    assert dicom_date("20240105") == "2024-01-05"
    assert dicom_date("") == ""
    assert size(None) == "-"
    assert size(999) == "999 B"
    assert size(137_100) == "137.1 kB"
    assert size(65_600_000_000) == "65.6 GB"
    assert age(None) == "-"
    assert age(42) == "42 s"
    assert age(600) == "10 min"
    assert age(3 * 3600) == "3.0 h"
    assert age(3 * 86400) == "3.0 d"


def test_the_console_files_are_package_data() -> None:
    """Every template, style sheet and script is named by pyproject's
    package data, so an installed (non-editable) appliance has them."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["dicomweb"]
    package = root / "dicomweb"
    files = [
        path.relative_to(package).as_posix()
        for folder in ("templates", "static")
        for path in (package / folder).rglob("*")
        if path.is_file()
    ]
    assert len(files) >= 9
    unpackaged = [f for f in files if not any(fnmatch.fnmatchcase(f, p) for p in patterns)]
    assert not unpackaged
