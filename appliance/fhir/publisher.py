"""Publish one study to the FHIR server: its Endpoint, Patient and
ImagingStudy as the index has the study *now* (not as one change said), so
publishing is idempotent and a replay of the whole change feed converges to
exactly one of each.

Each resource is found by its identifier (``GET [type]?identifier=..``);
one that is missing is made with a conditional create (``If-None-Exist``
on the same identifier, so two writers racing make one), one that is there
is updated only if it would change, with ``If-Match`` on the version read
(a concurrent change makes the publisher read everything again).  Several
resources carrying one identifier is a permanent failure: the study is
parked with that reason rather than one of them picked.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from appliance.config import Config
from appliance.errors import IndexUnavailable
from appliance.fhir import mapping
from appliance.fhir.client import FhirClient, FhirConflict, FhirError
from appliance.fhir.mapping import InstanceFacts, SeriesFacts, StudyFacts
from appliance.index.schema import DEFAULT_PARTITION_KEY, instance, series, study

log = logging.getLogger(__name__)

#: Reads and writes of one study again after a conflicting change.
CONFLICT_TRIES = 3


def dicomweb_root(config: Config) -> str:
    """This appliance's DICOMweb service root as FHIR users reach it."""
    if config.fhir.dicomweb_url:
        return config.fhir.dicomweb_url
    if config.http.public_url:
        return f"{config.http.public_url}/v1"
    host = config.http.host
    if ":" in host:
        host = f"[{host}]"
    return f"{config.http.scheme}://{host}:{config.http.port}/v1"


def read_study(engine: Engine, study_instance_uid: str) -> StudyFacts | None:
    """What the index holds of the study now, or None if it has none of it."""
    try:
        with engine.connect() as conn:
            found = conn.execute(
                select(study).where(
                    study.c.study_instance_uid == study_instance_uid,
                    study.c.partition_key == DEFAULT_PARTITION_KEY,
                )
            ).first()
            if found is None:
                return None
            series_rows = conn.execute(
                select(series)
                .where(series.c.study_fk == found.id)
                .order_by(series.c.series_number.is_(None), series.c.series_number, series.c.id)
            ).all()
            instance_rows = conn.execute(
                select(
                    instance.c.series_fk,
                    instance.c.sop_instance_uid,
                    instance.c.sop_class_uid,
                    instance.c.instance_number,
                )
                .where(instance.c.study_fk == found.id)
                .order_by(
                    instance.c.instance_number.is_(None), instance.c.instance_number, instance.c.id
                )
            ).all()
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"the index database failed ({exc.__class__.__name__})") from exc
    by_series: dict[int, list[InstanceFacts]] = {}
    for row in instance_rows:
        by_series.setdefault(row.series_fk, []).append(
            InstanceFacts(row.sop_instance_uid, row.sop_class_uid, row.instance_number)
        )
    return StudyFacts(
        study_instance_uid=found.study_instance_uid,
        accession_number=found.accession_number,
        study_date=found.study_date,
        study_time_key=found.study_time_key if found.study_time else "",
        timezone_offset_from_utc=found.timezone_offset_from_utc,
        description=found.study_description,
        patient_id=found.patient_id,
        patient_name=found.patient_name,
        patient_birth_date=found.patient_birth_date,
        patient_sex=found.patient_sex,
        series=tuple(
            SeriesFacts(
                series_instance_uid=row.series_instance_uid,
                modality=row.modality,
                series_number=row.series_number,
                description=row.series_description,
                start_date=row.performed_procedure_step_start_date,
                start_time_key=(
                    row.performed_procedure_step_start_time_key
                    if row.performed_procedure_step_start_time
                    else ""
                ),
                instances=tuple(by_series.get(row.id, ())),
            )
            for row in series_rows
            if by_series.get(row.id)
        ),
    )


@dataclasses.dataclass(frozen=True)
class Published:
    """What publishing a study wrote."""

    #: e.g. "ImagingStudy/123", or None if there was nothing to write (a
    #: study deleted here that the server never had)
    imaging_study: str | None
    #: resources created or updated (0 when the server had it all already)
    writes: int


class Publisher:
    """Publishes studies of the index behind *engine* to *client*."""

    def __init__(
        self,
        config: Config,
        client: FhirClient,
        engine: Engine,
        read: Callable[[Engine, str], StudyFacts | None] = read_study,
    ) -> None:
        self.settings = config.fhir
        self.client = client
        self.engine = engine
        self.address = dicomweb_root(config)
        self.zone = mapping.zone_of(config.fhir.timezone)
        self._read = read
        self._endpoint: str | None = None
        self._lock = threading.Lock()

    def publish(self, study_instance_uid: str) -> Published:
        """Make the FHIR server's resources of the study match the index.

        Raises
        ------
        FhirError
            transient (try again later) or permanent (park it).
        IndexUnavailable
            if the index cannot be read.
        """
        for _ in range(CONFLICT_TRIES):
            try:
                return self._publish(study_instance_uid)
            except FhirConflict as exc:
                log.info("fhir: study %s changed meanwhile (%s); again", study_instance_uid, exc)
        raise FhirError("the FHIR server's resources kept changing while written", transient=True)

    def _publish(self, uid: str) -> Published:
        facts = self._read(self.engine, uid)
        ours = mapping.study_identifier(uid)
        existing = self._find("ImagingStudy", ours)
        if facts is None:
            if existing is None:
                return Published(None, 0)
            gone = mapping.withdrawn(existing, self.settings.deleted_status)
            return Published(_reference(existing), self._write(existing, gone))
        if not facts.patient_id.strip():
            raise FhirError(
                "the study has no Patient ID, by which DICOMcast identifies its Patient",
                transient=False,
            )
        writes = 0
        endpoint, made = self._ensure_endpoint()
        writes += made
        patient_ref, made = self._upsert(
            "Patient",
            mapping.patient_identifier(self.settings.patient_system, facts.patient_id),
            lambda old: mapping.patient(facts, self.settings.patient_system, old),
        )
        writes += made
        study_ref, made = self._upsert(
            "ImagingStudy",
            ours,
            lambda old: mapping.imaging_study(facts, patient_ref, endpoint, old, self.zone),
            existing=existing,
            searched=True,
        )
        return Published(study_ref, writes + made)

    def _ensure_endpoint(self) -> tuple[str, int]:
        with self._lock:
            if self._endpoint is not None:
                return self._endpoint, 0
        reference, made = self._upsert(
            "Endpoint",
            {"system": mapping.URI_SYSTEM, "value": self.address},
            lambda old: mapping.endpoint(self.address, old),
        )
        with self._lock:
            self._endpoint = reference
        return reference, made

    def forget_endpoint(self) -> None:
        """Look the Endpoint up again next time (e.g. after a failure)."""
        with self._lock:
            self._endpoint = None

    def _upsert(
        self,
        resource_type: str,
        identifier: dict[str, str],
        build: Callable[[dict[str, Any] | None], dict[str, Any]],
        existing: dict[str, Any] | None = None,
        searched: bool = False,
    ) -> tuple[str, int]:
        """The reference of the *resource_type* with *identifier*, made or
        brought up to date with *build*; and how many writes it took."""
        if not searched:
            existing = self._find(resource_type, identifier)
        if existing is None:
            query = urllib.parse.urlencode({"identifier": _search(identifier)})
            created, resource = self.client.create(build(None), query)
            if not created:
                # another writer made it meanwhile: bring that one up to date
                raise FhirConflict(f"a {resource_type} with that identifier appeared meanwhile")
            return _reference(resource), 1
        return _reference(existing), self._write(existing, build(existing))

    def _write(self, existing: dict[str, Any], wanted: dict[str, Any]) -> int:
        if mapping.same(existing, wanted):
            return 0
        self.client.update(wanted)
        return 1

    def _find(self, resource_type: str, identifier: dict[str, str]) -> dict[str, Any] | None:
        found = [
            resource
            for resource in self.client.search(resource_type, {"identifier": _search(identifier)})
            if mapping.has_identifier(resource, identifier)
        ]
        if len(found) > 1:
            ids = ", ".join(_reference(r) for r in found)
            raise FhirError(
                f"several {resource_type} resources carry the identifier "
                f"{_search(identifier)} ({ids}); keep one",
                transient=False,
            )
        return found[0] if found else None


def _search(identifier: dict[str, str]) -> str:
    """A token search value (FHIR R4 search.html#token): system|value, or
    the bare value when there is no system (any system: the matches are
    filtered to the ones without a system afterwards)."""
    value = identifier["value"].replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,")
    system = identifier.get("system")
    return f"{system}|{value}" if system else value


def _reference(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"
