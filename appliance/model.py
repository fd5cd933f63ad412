"""Plain data passed between the core's services and the edges."""

from __future__ import annotations

import dataclasses
import enum


class Level(enum.Enum):
    """Query/Retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


@dataclasses.dataclass(frozen=True)
class PatientAttributes:
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""


@dataclasses.dataclass(frozen=True)
class StudyAttributes:
    study_instance_uid: str
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    timezone_offset_from_utc: str = ""


@dataclasses.dataclass(frozen=True)
class RequestAttributes:
    """One item of the Request Attributes Sequence (0040,0275)."""

    scheduled_procedure_step_id: str = ""
    requested_procedure_id: str = ""


@dataclasses.dataclass(frozen=True)
class SeriesAttributes:
    series_instance_uid: str
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    performed_procedure_step_start_date: str = ""
    performed_procedure_step_start_time: str = ""
    request_attributes: tuple[RequestAttributes, ...] = ()


@dataclasses.dataclass(frozen=True)
class InstanceAttributes:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None
    specific_character_set: str = ""
    #: the Calling AE Title of the C-STORE that brought it ("" for STOW-RS
    #: and import): the File Meta's Source Application Entity Title when this
    #: appliance wrote that File Meta (:func:`~appliance.dicomio.part10_prefix`)
    source_ae: str = ""
    #: the protocol it came by (:attr:`Origin.protocol`): "dimse" when read
    #: back from a File Meta this appliance wrote for a C-STORE, else ""
    source_protocol: str = ""


@dataclasses.dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one instance, read from its header."""

    patient: PatientAttributes
    study: StudyAttributes
    series: SeriesAttributes
    instance: InstanceAttributes


@dataclasses.dataclass(frozen=True)
class Origin:
    """Who sent an instance: for logs, metrics and forwarding filters."""

    protocol: str  # "dimse" | "dicomweb" | "import"
    calling_ae: str = ""
    remote: str = ""
