"""DICOMcast's mapping of a study to FHIR R4 resources, each validated with
the ``fhir.resources`` R4B models (structure and types of FHIR R4)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient

from appliance.fhir import mapping
from appliance.fhir.mapping import InstanceFacts, SeriesFacts, StudyFacts

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
BERLIN = mapping.zone_of("Europe/Berlin")


def facts(**changes: Any) -> StudyFacts:
    values: dict[str, Any] = {
        "study_instance_uid": "1.2.3.4",
        "accession_number": "ACC-7",
        "study_date": "20240131",
        "study_time_key": "101530.250000",
        "timezone_offset_from_utc": "",
        "description": "CT chest",
        "patient_id": "PID-1",
        "patient_name": "Doe^Jane^Q^Dr^PhD=ド^ジェーン",
        "patient_birth_date": "19700102",
        "patient_sex": "F",
        "series": (
            SeriesFacts(
                "1.2.3.4.1",
                "CT",
                1,
                "axial",
                "20240131",
                "101600.000000",
                (InstanceFacts("1.2.3.4.1.1", CT, 1), InstanceFacts("1.2.3.4.1.2", CT, 2)),
            ),
            SeriesFacts(
                "1.2.3.4.2", "", None, "", "", "", (InstanceFacts("1.2.3.4.2.1", SR, None),)
            ),
        ),
    }
    values.update(changes)
    return StudyFacts(**values)


def test_imaging_study_maps_like_dicomcast_and_is_valid_r4() -> None:
    study = mapping.imaging_study(facts(), "Patient/p1", "Endpoint/e1", None, BERLIN)
    ImagingStudy.model_validate(study)
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}
    accession = study["identifier"][1]
    assert accession["value"] == "ACC-7"
    assert accession["type"]["coding"][0]["code"] == "ACSN"
    assert study["status"] == "available"
    assert study["subject"] == {"reference": "Patient/p1"}
    assert study["endpoint"] == [{"reference": "Endpoint/e1"}]
    # winter in Berlin: +01:00; the fraction of a second kept (ms)
    assert study["started"] == "2024-01-31T10:15:30.250+01:00"
    assert study["numberOfSeries"] == 2
    assert study["numberOfInstances"] == 3
    assert study["description"] == "CT chest"
    codes = [m["code"] for m in study["modality"]]
    assert codes == ["CT", "OT"]  # a series without Modality is "Other"
    first, second = study["series"]
    assert first["uid"] == "1.2.3.4.1"
    assert first["number"] == 1
    assert first["modality"] == {"system": mapping.DCM_SYSTEM, "code": "CT"}
    assert first["numberOfInstances"] == 2
    assert first["started"] == "2024-01-31T10:16:00+01:00"
    assert first["instance"][0] == {
        "uid": "1.2.3.4.1.1",
        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{CT}"},
        "number": 1,
    }
    assert "number" not in second
    assert "started" not in second
    assert "number" not in second["instance"][0]


def test_the_study_offset_wins_over_the_configured_zone() -> None:
    study = mapping.imaging_study(
        facts(timezone_offset_from_utc="-0500"), "Patient/p", "Endpoint/e", None, BERLIN
    )
    assert study["started"] == "2024-01-31T10:15:30.250-05:00"


@pytest.mark.parametrize(
    ("date", "time", "expected"),
    [
        ("20240131", "", "2024-01-31"),
        ("", "101530.000000", None),
        ("2024013", "101530.000000", None),
        ("20240731", "080000.000000", "2024-07-31T08:00:00+02:00"),  # summer time
    ],
)
def test_started_needs_a_date_and_a_zone_with_a_time(
    date: str, time: str, expected: str | None
) -> None:
    assert mapping.fhir_date_time(date, time, "", BERLIN) == expected


def test_started_without_a_zone_is_the_machines_local_time() -> None:
    value = mapping.fhir_date_time("20240131", "101530.000000", "")
    assert value is not None
    parsed = dt.datetime.fromisoformat(value)
    assert parsed.utcoffset() == dt.datetime(2024, 1, 31, 10, 15, 30).astimezone().utcoffset()


def test_patient_maps_name_gender_birth_date_and_is_valid_r4() -> None:
    patient = mapping.patient(facts(), "urn:oid:1.2.36.146.595.217.0.1", None)
    Patient.model_validate(patient)
    assert patient["identifier"] == [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "PID-1"}]
    assert patient["name"] == [
        {
            "use": "usual",
            "family": "Doe",
            "given": ["Jane", "Q"],
            "prefix": ["Dr"],
            "suffix": ["PhD"],
            "text": "Dr Jane Q Doe PhD",
        }
    ]
    assert patient["gender"] == "female"
    assert patient["birthDate"] == "1970-01-02"


def test_patient_update_keeps_what_other_systems_wrote() -> None:
    existing = {
        "resourceType": "Patient",
        "id": "p9",
        "meta": {"versionId": "3"},
        "identifier": [{"system": "urn:mrn", "value": "PID-1"}],
        "name": [{"use": "official", "family": "Doe-Smith"}, {"use": "usual", "family": "Old"}],
        "telecom": [{"system": "phone", "value": "555"}],
        "gender": "female",
    }
    patient = mapping.patient(facts(patient_sex="", patient_birth_date="bad"), "urn:mrn", existing)
    Patient.model_validate(patient)
    assert patient["id"] == "p9"
    assert patient["meta"] == {"versionId": "3"}
    assert patient["identifier"] == existing["identifier"]  # not added twice
    assert [n["use"] for n in patient["name"]] == ["usual", "official"]
    assert patient["name"][0]["family"] == "Doe"
    assert patient["telecom"] == existing["telecom"]
    assert patient["gender"] == "female"  # an empty PatientSex erases nothing
    assert "birthDate" not in patient
    assert mapping.same(
        mapping.patient(facts(), "urn:mrn", patient), mapping.patient(facts(), "urn:mrn", patient)
    )


@pytest.mark.parametrize(
    ("sex", "gender"), [("M", "male"), ("f", "female"), ("O", "other"), ("X", "unknown")]
)
def test_gender(sex: str, gender: str) -> None:
    assert mapping.patient(facts(patient_sex=sex), "", None)["gender"] == gender


def test_a_patient_without_a_system_has_a_bare_identifier() -> None:
    patient = mapping.patient(facts(patient_name=""), "", None)
    Patient.model_validate(patient)
    assert patient["identifier"] == [{"value": "PID-1"}]
    assert "name" not in patient
    assert mapping.has_identifier(patient, {"value": "PID-1"})
    assert not mapping.has_identifier(patient, {"system": "urn:x", "value": "PID-1"})


def test_endpoint_is_valid_r4() -> None:
    endpoint = mapping.endpoint("http://edge.example:8080/v1", None)
    Endpoint.model_validate(endpoint)
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == "http://edge.example:8080/v1"
    assert endpoint["status"] == "active"
    assert endpoint["identifier"] == [
        {"system": "urn:ietf:rfc:3986", "value": "http://edge.example:8080/v1"}
    ]
    assert mapping.same(endpoint, mapping.endpoint("http://edge.example:8080/v1", endpoint))


def test_an_unchanged_study_needs_no_write_and_a_withdrawn_one_is_marked() -> None:
    existing = mapping.imaging_study(facts(), "Patient/p", "Endpoint/e", None, BERLIN)
    existing.update(id="s1", meta={"versionId": "1"}, basedOn=[{"reference": "ServiceRequest/r"}])
    again = mapping.imaging_study(facts(), "Patient/p", "Endpoint/e", existing, BERLIN)
    assert mapping.same(existing, again)
    assert again["basedOn"] == [{"reference": "ServiceRequest/r"}]  # another system's, kept
    fewer = facts(series=facts().series[:1])
    smaller = mapping.imaging_study(fewer, "Patient/p", "Endpoint/e", existing, BERLIN)
    assert smaller["numberOfSeries"] == 1
    assert smaller["numberOfInstances"] == 2
    assert [m["code"] for m in smaller["modality"]] == ["CT"]
    gone = mapping.withdrawn(existing, "entered-in-error")
    ImagingStudy.model_validate(gone)
    assert gone["status"] == "entered-in-error"
    assert gone["numberOfSeries"] == 0
    assert gone["numberOfInstances"] == 0
    assert "series" not in gone
    assert gone["identifier"][0]["value"] == "urn:oid:1.2.3.4"


def test_a_study_without_accession_or_description_leaves_them_out() -> None:
    existing = mapping.imaging_study(facts(), "Patient/p", "Endpoint/e", None, BERLIN)
    study = mapping.imaging_study(
        facts(accession_number="", description=""), "Patient/p", "Endpoint/e", existing, BERLIN
    )
    ImagingStudy.model_validate(study)
    assert len(study["identifier"]) == 1
    assert "description" not in study
