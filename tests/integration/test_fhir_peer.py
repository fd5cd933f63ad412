"""The FHIR peer (tests/fhir_peer) behaves as a FHIR R4 server should: the
DICOMcast tests trust it to refuse what a real server refuses."""

from __future__ import annotations

from typing import Any

import httpx

from tests.peers import FhirServer

FHIR_JSON = {"Content-Type": "application/fhir+json"}
MRN = {"system": "urn:oid:1.2.3.4", "value": "MRN-0001"}


def patient(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [MRN], **fields}


def test_conditional_create_search_and_versioned_update(fhir_server: FhirServer) -> None:
    with httpx.Client(base_url=fhir_server.url, headers=FHIR_JSON, timeout=10) as fhir:
        created = fhir.post("/Patient", json=patient(gender="female"))
        assert created.status_code == 201
        first = created.json()
        version = first["meta"]["versionId"]
        assert created.headers["ETag"] == f'W/"{version}"'
        assert created.headers["Location"].startswith(f"{fhir_server.url}/Patient/{first['id']}")
        assert created.headers["Content-Type"].startswith("application/fhir+json")

        # conditional create: the match is answered, nothing new is made
        again = fhir.post(
            "/Patient",
            json=patient(gender="female"),
            headers={"If-None-Exist": f"identifier={MRN['system']}|{MRN['value']}"},
        )
        assert again.status_code == 200
        assert again.json()["id"] == first["id"]
        assert len(fhir_server.resources("Patient")) == 1

        found = fhir.get("/Patient", params={"identifier": f"{MRN['system']}|{MRN['value']}"})
        assert found.status_code == 200
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [first["id"]]
        other = fhir.get("/Patient", params={"identifier": f"urn:other|{MRN['value']}"})
        assert "entry" not in other.json()

        # versioned update: a stale If-Match is refused, the current one wins
        body = {**first, "gender": "male"}
        stale = fhir.put(f"/Patient/{first['id']}", json=body, headers={"If-Match": 'W/"0"'})
        assert stale.status_code == 412
        updated = fhir.put(
            f"/Patient/{first['id']}", json=body, headers={"If-Match": f'W/"{version}"'}
        )
        assert updated.status_code == 200
        assert updated.json()["gender"] == "male"
        assert updated.json()["meta"]["versionId"] != version
        assert updated.headers["ETag"] == f'W/"{updated.json()["meta"]["versionId"]}"'


def test_conditional_update_and_delete(fhir_server: FhirServer) -> None:
    study_uid = {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.2.1125.1"}
    study = {
        "resourceType": "ImagingStudy",
        "identifier": [study_uid],
        "status": "registered",
        "subject": {"reference": "Patient/p1"},
    }
    where = {"identifier": f"{study_uid['system']}|{study_uid['value']}"}
    with httpx.Client(base_url=fhir_server.url, headers=FHIR_JSON, timeout=10) as fhir:
        assert fhir.put("/ImagingStudy", params=where, json=study).status_code == 201
        changed = fhir.put("/ImagingStudy", params=where, json={**study, "status": "available"})
        assert changed.status_code == 200
        [stored] = fhir_server.resources("ImagingStudy")
        assert stored["status"] == "available"
        assert fhir.delete(f"/ImagingStudy/{stored['id']}").is_success
        assert fhir.get(f"/ImagingStudy/{stored['id']}").status_code == 404


def test_invalid_resources_are_refused(fhir_server: FhirServer) -> None:
    with httpx.Client(base_url=fhir_server.url, headers=FHIR_JSON, timeout=10) as fhir:
        # ImagingStudy.status and .subject are required (1..1)
        missing = fhir.post("/ImagingStudy", json={"resourceType": "ImagingStudy"})
        assert missing.status_code == 400
        outcome = missing.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert {e for i in outcome["issue"] for e in i["expression"]} == {
            "ImagingStudy.status",
            "ImagingStudy.subject",
        }
        # a code outside its required value set; an unknown element
        assert fhir.post("/Patient", json=patient(gender="x")).status_code == 400
        assert fhir.post("/Patient", json=patient(sex="female")).status_code == 400
        assert (
            fhir.put("/Patient", params={"identifier": "a|b"}, json=patient(gender="M")).status_code
            == 400
        )
    assert fhir_server.resources("Patient") == []
    assert fhir_server.resources("ImagingStudy") == []


def test_injected_failures_and_reset(fhir_server: FhirServer) -> None:
    assert httpx.post(f"{fhir_server.url}/Patient", json=patient()).status_code == 201
    fhir_server.fail(503, 1)
    failed = httpx.get(f"{fhir_server.url}/Patient")
    assert failed.status_code == 503
    assert failed.json()["resourceType"] == "OperationOutcome"
    assert len(fhir_server.resources("Patient")) == 1  # only the next request failed
    fhir_server.reset()
    assert fhir_server.resources("Patient") == []
