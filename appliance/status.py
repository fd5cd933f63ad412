"""Named status codes shared by both protocol edges.

DICOMweb failure and warning reasons *are* DIMSE status codes (PS3.18
Table I.2-2 refers to PS3.4/PS3.7 statuses), so one table serves both edges:
the DIMSE bridge sends the code as the response Status, the DICOMweb side puts
it in FailureReason (0008,1197) or WarningReason (0008,1196).

Nowhere else in the code base is a bare status literal written.
"""

from __future__ import annotations

import enum


class StatusCategory(enum.Enum):
    """The class of a status per PS3.7 Annex C.1."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    PENDING = "pending"
    CANCEL = "cancel"


class Status(enum.IntEnum):
    """DIMSE status codes used by the appliance, each with its source."""

    #: PS3.7 C.1.1: the operation completed.
    SUCCESS = 0x0000

    #: PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4: pending, matches (or
    #: sub-operations) are continuing.
    PENDING = 0xFF00
    #: PS3.4 C.4.1.1.4: pending, but one or more Optional Keys were not
    #: supported for existence and/or matching for this identifier.
    PENDING_WITH_UNSUPPORTED_KEYS = 0xFF01
    #: PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4: cancelled (C-CANCEL).
    CANCEL = 0xFE00

    #: PS3.4 B.2.3 (C-STORE warning): coercion of data elements.  Also, in
    #: C-MOVE/C-GET (PS3.4 C.4.2.1.5, C.4.3.1.4): sub-operations complete,
    #: one or more failures or warnings.
    COERCION_OF_DATA_ELEMENTS = 0xB000
    SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
    #: PS3.4 B.2.3 (C-STORE warning): elements discarded.
    ELEMENTS_DISCARDED = 0xB006
    #: PS3.4 B.2.3 (C-STORE warning): data set does not match SOP Class.
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    #: Warning class (PS3.7 C.1.3 "Bxxx"): the SOP Instance already existed
    #: and the stored copy was kept (duplicate policy "keep").  The number is
    #: the one Microsoft's DICOM server uses (45070) so scripts written for it
    #: recognise the case; see docs/conformance.md.
    DUPLICATE_INSTANCE_KEPT = 0xB00E

    #: PS3.7 C.5.5: processing failure (general failure, e.g. the index or the
    #: storage failed in a way that is not a lack of resources).
    PROCESSING_FAILURE = 0x0110
    #: PS3.7 C.5.6: duplicate SOP Instance (duplicate policy "reject").
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: PS3.7 C.5.7: no such SOP Instance (nothing stored under the UIDs given).
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    #: PS3.7 10.1.4.1.10 (N-ACTION Status), Annex C: invalid argument value
    #: (the Action Information is missing, malformed or inappropriate).
    INVALID_ARGUMENT_VALUE = 0x0115
    #: PS3.7 Annex C: class-instance conflict.  Also a Failure Reason
    #: (0008,1197) of Storage Commitment (PS3.3 C.14.1.1): the instance is
    #: stored under another SOP Class.
    CLASS_INSTANCE_CONFLICT = 0x0119
    #: PS3.7 10.1.4.1.10 (N-ACTION Status), Annex C: no such action (an
    #: Action Type ID the SOP Class does not define).
    NO_SUCH_ACTION = 0x0123
    #: PS3.3 C.14.1.1, Failure Reason (0008,1197) of Storage Commitment only:
    #: duplicate transaction UID (the Transaction UID is already in use).
    DUPLICATE_TRANSACTION_UID = 0x0131
    #: PS3.7 10.1.4.1.10 (N-ACTION Status), Annex C: resource limitation.
    RESOURCE_LIMITATION = 0x0213
    #: PS3.7 C.5.12: the SOP Class is not supported.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: PS3.7 Annex C.5 (Failure), "Refused: Not Authorized": the
    #: DIMSE-service-user is not authorized to invoke the operation (a
    #: peer's ``[[dimse.peers]] services`` leave the service out).
    NOT_AUTHORIZED = 0x0124
    #: PS3.4 B.2.3 (C-STORE refused): out of resources.
    OUT_OF_RESOURCES = 0xA700
    #: PS3.4 C.4.2.1.5 / C.4.3.1.4: out of resources, unable to calculate the
    #: number of matches.
    OUT_OF_RESOURCES_MATCHES = 0xA701
    #: PS3.4 C.4.2.1.5 / C.4.3.1.4: out of resources, unable to perform
    #: sub-operations.
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    #: PS3.4 C.4.2.1.5 (C-MOVE): move destination unknown.
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: PS3.4 B.2.3 (C-STORE error): data set does not match SOP Class.  Used
    #: when a required attribute is missing or malformed (e.g. a bad UID).
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: PS3.4 C.4.1.1.4 (C-FIND failed): identifier does not match SOP Class.
    #: Used for a query whose keys cannot be understood.  An alias: the code
    #: is the same as the C-STORE one, the meaning is the query's.
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: PS3.18 Table I.2-2 / PS3.4 B.2.3, the A9xx range (data set does not
    #: match SOP Class): the instance's Study Instance UID differs from the
    #: study named in the STOW-RS URL (PS3.18 10.5.1, Table 10.5.3-1 "Study
    #: Instance UID mismatch").  The number is the one Microsoft's DICOM
    #: server uses (43265), so scripts written for it recognise the case;
    #: see docs/conformance.md.
    STUDY_INSTANCE_UID_MISMATCH = 0xA901
    #: PS3.4 B.2.3 (C-STORE error): cannot understand (the data set could not
    #: be parsed at all).  Also C-FIND/C-MOVE/C-GET "unable to process"
    #: (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
    CANNOT_UNDERSTAND = 0xC000
    UNABLE_TO_PROCESS = 0xC000

    @property
    def category(self) -> StatusCategory:
        """The status class per PS3.7 C.1 (ranges of the code)."""
        code = int(self)
        if code == 0x0000:
            return StatusCategory.SUCCESS
        if code in (0xFF00, 0xFF01):
            return StatusCategory.PENDING
        if code == 0xFE00:
            return StatusCategory.CANCEL
        if code == 0x0001 or (code & 0xF000) == 0xB000:
            return StatusCategory.WARNING
        return StatusCategory.FAILURE
