"""DICOM to FHIR R4: a study of the index as Patient, Endpoint and
ImagingStudy resources, the way Microsoft's DICOMcast maps them
(REFERENCE.md "DICOMcast mapping"; README "DICOMcast to FHIR").

Every function takes the resource the FHIR server holds (or None) and
returns the one to write: the fields this appliance owns are set from the
index, every other field (added by another system, or the server's own
``id`` and ``meta``) is kept.  Writing the result again changes nothing,
which is what makes a replay of the change feed harmless.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import zoneinfo
from typing import Any

#: ImagingStudy.identifier of the Study Instance UID (FHIR R4 ImagingStudy,
#: "identifier": system urn:dicom:uid, value urn:oid:<uid>).
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: The accession number's identifier type (HL7 v2 table 0203, ACSN).
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACCESSION_TYPE = "ACSN"
#: DICOM's own code system: Modality (0008,0060) values are its codes.
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
#: Endpoint.connectionType of a DICOMweb WADO-RS service.
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
WADO_RS = "dicom-wado-rs"
#: The Endpoint is identified by its address, a URI.
URI_SYSTEM = "urn:ietf:rfc:3986"
#: Modality of a series whose header has none (Modality is Type 1, but an
#: ImagingStudy series needs one): "OT", Other.
UNKNOWN_MODALITY = "OT"

_GENDERS = {"M": "male", "F": "female", "O": "other"}


@dataclasses.dataclass(frozen=True)
class InstanceFacts:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None


@dataclasses.dataclass(frozen=True)
class SeriesFacts:
    series_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    #: Performed Procedure Step Start Date/Time, as the index keeps them
    start_date: str
    start_time_key: str
    instances: tuple[InstanceFacts, ...]


@dataclasses.dataclass(frozen=True)
class StudyFacts:
    """What the index holds of one study."""

    study_instance_uid: str
    accession_number: str
    study_date: str
    #: StudyTime as ``HHMMSS.FFFFFF`` (the index's range key), or ""
    study_time_key: str
    timezone_offset_from_utc: str
    description: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    series: tuple[SeriesFacts, ...]

    @property
    def number_of_instances(self) -> int:
        return sum(len(s.instances) for s in self.series)


def study_identifier(study_instance_uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_instance_uid}"}


def patient_identifier(system: str, patient_id: str) -> dict[str, str]:
    return {"system": system, "value": patient_id} if system else {"value": patient_id}


def has_identifier(resource: dict[str, Any], identifier: dict[str, str]) -> bool:
    """Whether *resource* carries *identifier* (same system, or both none,
    and same value)."""
    for item in resource.get("identifier") or []:
        if not isinstance(item, dict):
            continue
        if item.get("value") == identifier["value"] and item.get("system") == identifier.get(
            "system"
        ):
            return True
    return False


# ---------------------------------------------------------------- Endpoint


def endpoint(address: str, existing: dict[str, Any] | None) -> dict[str, Any]:
    """The Endpoint of this appliance's DICOMweb service root *address*."""
    resource = _base("Endpoint", existing)
    ours = {"system": URI_SYSTEM, "value": address}
    resource["identifier"] = [ours] + [
        item for item in resource.get("identifier") or [] if item != ours
    ]
    resource["status"] = "active"
    resource["connectionType"] = {"system": CONNECTION_TYPE_SYSTEM, "code": WADO_RS}
    resource.setdefault("name", "dicom-appliance DICOMweb service")
    # payloadType is required (1..*); DICOMcast gives it as text only
    resource["payloadType"] = resource.get("payloadType") or [{"text": "DICOM WADO-RS"}]
    resource["payloadMimeType"] = resource.get("payloadMimeType") or ["application/dicom"]
    resource["address"] = address
    return resource


# ----------------------------------------------------------------- Patient


def patient(facts: StudyFacts, system: str, existing: dict[str, Any] | None) -> dict[str, Any]:
    """The Patient of *facts*' PatientID: identifier, name (as the "usual"
    name; other names kept), gender and birth date, each set only when the
    header has a usable value (an empty one does not erase what is there)."""
    resource = _base("Patient", existing)
    ours = patient_identifier(system, facts.patient_id)
    if not has_identifier(resource, ours):
        resource["identifier"] = [ours, *(resource.get("identifier") or [])]
    name = human_name(facts.patient_name)
    if name is not None:
        others = [n for n in resource.get("name") or [] if n.get("use") != "usual"]
        resource["name"] = [name, *others]
    sex = facts.patient_sex.strip().upper()
    if sex:
        resource["gender"] = _GENDERS.get(sex, "unknown")
    birth = fhir_date(facts.patient_birth_date)
    if birth is not None:
        resource["birthDate"] = birth
    return resource


def human_name(person_name: str) -> dict[str, Any] | None:
    """A HumanName from a DICOM PN value's alphabetic group (PS3.5 6.2.1:
    family^given^middle^prefix^suffix), or None if it is empty."""
    alphabetic = person_name.split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: dict[str, Any] = {"use": "usual"}
    if family:
        name["family"] = family
    given_names = [g for g in (given, *middle.split()) if g]
    if given_names:
        name["given"] = given_names
    if prefix:
        name["prefix"] = prefix.split()
    if suffix:
        name["suffix"] = suffix.split()
    if len(name) == 1:
        return None
    name["text"] = " ".join(
        [*name.get("prefix", []), *name.get("given", []), family, *name.get("suffix", [])]
    ).strip()
    return name


# ------------------------------------------------------------ ImagingStudy


def imaging_study(
    facts: StudyFacts,
    patient_reference: str,
    endpoint_reference: str,
    existing: dict[str, Any] | None,
    zone: dt.tzinfo | None = None,
) -> dict[str, Any]:
    """The ImagingStudy of *facts*: identifiers, status available, the
    series' modalities, subject, started, endpoint, counts, description and
    every series with its instances, in the index's order (series number,
    then instance number)."""
    resource = _base("ImagingStudy", existing)
    ours: list[dict[str, Any]] = [study_identifier(facts.study_instance_uid)]
    if facts.accession_number:
        ours.append(
            {
                "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": ACCESSION_TYPE}]},
                "value": facts.accession_number,
            }
        )
    resource["identifier"] = ours + [
        item
        for item in resource.get("identifier") or []
        if item.get("system") != DICOM_UID_SYSTEM and not _is_accession(item)
    ]
    resource["status"] = "available"
    modalities: list[str] = []
    for series in facts.series:
        code = series.modality or UNKNOWN_MODALITY
        if code not in modalities:
            modalities.append(code)
    resource["modality"] = [_modality(code) for code in modalities]
    resource["subject"] = {"reference": patient_reference}
    started = fhir_date_time(
        facts.study_date, facts.study_time_key, facts.timezone_offset_from_utc, zone
    )
    _set(resource, "started", started)
    endpoint_ref = {"reference": endpoint_reference}
    resource["endpoint"] = [endpoint_ref] + [
        item for item in resource.get("endpoint") or [] if item != endpoint_ref
    ]
    resource["numberOfSeries"] = len(facts.series)
    resource["numberOfInstances"] = facts.number_of_instances
    _set(resource, "description", facts.description or None)
    resource["series"] = [_series(s, facts.timezone_offset_from_utc, zone) for s in facts.series]
    return resource


def withdrawn(existing: dict[str, Any], status: str) -> dict[str, Any]:
    """*existing* once every instance of its study is deleted here: no
    series, no instances, *status* (e.g. entered-in-error)."""
    resource = copy.deepcopy(existing)
    resource["status"] = status
    resource["numberOfSeries"] = 0
    resource["numberOfInstances"] = 0
    resource.pop("series", None)
    return resource


def _series(series: SeriesFacts, offset: str, zone: dt.tzinfo | None) -> dict[str, Any]:
    out: dict[str, Any] = {"uid": series.series_instance_uid}
    if series.series_number is not None and series.series_number >= 0:
        out["number"] = series.series_number
    out["modality"] = _modality(series.modality or UNKNOWN_MODALITY)
    if series.description:
        out["description"] = series.description
    out["numberOfInstances"] = len(series.instances)
    started = fhir_date_time(series.start_date, series.start_time_key, offset, zone)
    if started:
        out["started"] = started
    out["instance"] = [_instance(i) for i in series.instances]
    return out


def _instance(item: InstanceFacts) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": item.sop_instance_uid,
        # a UID as a code of the URI system (FHIR R4 ImagingStudy example)
        "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{item.sop_class_uid}"},
    }
    if item.instance_number is not None and item.instance_number >= 0:
        out["number"] = item.instance_number
    return out


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code}


def _is_accession(item: dict[str, Any]) -> bool:
    codings = (item.get("type") or {}).get("coding") or []
    return any(
        c.get("system") == IDENTIFIER_TYPE_SYSTEM and c.get("code") == ACCESSION_TYPE
        for c in codings
    )


# ------------------------------------------------------------- date, time


def fhir_date(value: str) -> str | None:
    """A DICOM DA (YYYYMMDD) as a FHIR date, or None if it is not a date."""
    text = value.strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        return None


def fhir_date_time(
    date: str, time_key: str, offset: str, zone: dt.tzinfo | None = None
) -> str | None:
    """DA + TM (as ``HHMMSS.FFFFFF``) + Timezone Offset From UTC (0008,0201)
    as a FHIR dateTime.  FHIR wants a time zone whenever there is a time:
    the study's offset if it has one (PS3.3 C.12.1.1.8), else the time zone
    of *zone* (None: the machine's) at that date.  A date without a time is
    a date; no usable date gives None."""
    day = fhir_date(date)
    if day is None:
        return None
    if not time_key:
        return day
    try:
        clock = dt.datetime.strptime(time_key, "%H%M%S.%f").time()
    except ValueError:
        return day
    moment = dt.datetime.combine(dt.date.fromisoformat(day), clock)
    fixed = _offset(offset)
    if fixed is not None:
        moment = moment.replace(tzinfo=fixed)
    elif zone is not None:
        moment = moment.replace(tzinfo=zone)
    else:
        moment = moment.astimezone()  # naive = the machine's local time
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.isoformat(timespec=spec)


def _offset(value: str) -> dt.timezone | None:
    text = value.strip()
    if len(text) != 5 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        return None
    delta = dt.timedelta(hours=hours, minutes=minutes)
    return dt.timezone(-delta if text[0] == "-" else delta)


def zone_of(name: str) -> dt.tzinfo | None:
    """The time zone named by ``fhir.timezone`` ("" = the machine's: None)."""
    return zoneinfo.ZoneInfo(name) if name else None


# ----------------------------------------------------------------- helpers


def _base(resource_type: str, existing: dict[str, Any] | None) -> dict[str, Any]:
    if existing is None:
        return {"resourceType": resource_type}
    return copy.deepcopy(existing)


def _set(resource: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        resource.pop(key, None)
    else:
        resource[key] = value


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two resources say the same, apart from the server's meta."""
    return {k: v for k, v in a.items() if k != "meta"} == {
        k: v for k, v in b.items() if k != "meta"
    }
