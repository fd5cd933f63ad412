"""Query/Retrieve Service Class (PS3.4 Annex C), SCP role: C-MOVE and C-GET.

Patient Root and Study Root Query/Retrieve Information Models - MOVE and -
GET (PS3.4 C.6.1, C.6.2), hierarchical retrieve at the PATIENT (Patient Root
only), STUDY, SERIES and IMAGE levels with the unique keys of PS3.4
C.4.2.2.1 / C.4.3.2.1 (a list of UIDs at the retrieve level).

- **C-MOVE** sends the matched instances to the Move Destination, an AE
  title looked up in ``[[dimse.peers]]``, on a new association from
  ``dimse.ae_title`` (the sub-association); an unknown title is answered
  ``0xA801`` without any association.
- **C-GET** sends them back on the requestor's own association, in the
  storage contexts it proposed with SCP/SCU Role Selection (PS3.7 D.3.3.4):
  every storage SOP class is supported with both roles (its transfer
  syntaxes are those of the Storage SCP, :mod:`dimse_bridge.services.storage`).

The sub-operations themselves (contexts, fallback transcoding, what goes on
the wire) are :mod:`dimse_bridge.sending`'s.  pynetdicom drives them: a
handler yields the destination (C-MOVE), the number of sub-operations, then
one data set per sub-operation; pynetdicom sends each C-STORE, the Pending
responses after each, and the final response with the counts and the Failed
SOP Instance UID List (0008,0058).  C-CANCEL is checked before each
sub-operation.

One log line per operation, written when its final response is sent (what
went on the wire): AE titles, level, UIDs, counts, bytes; never a Patient ID
or any other patient data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from appliance.audit import Action, AuditLog, Outcome, study_uids
from appliance.config import Config, PeerConfig
from appliance.dicomio import is_valid_uid
from appliance.errors import ApplianceError, NotFound
from appliance.index.sql import StoredInstance
from appliance.model import Level
from appliance.query import Query, QueryService
from appliance.services import Services
from appliance.status import Status
from dimse_bridge import audit, sending
from dimse_bridge.services import ServiceSetup
from dimse_bridge.stats import stats_of

LOGGER = logging.getLogger(__name__)

#: C-MOVE SOP Class UID -> the root level of its information model.
MOVE_MODELS: Mapping[str, Level] = {
    PatientRootQueryRetrieveInformationModelMove: Level.PATIENT,
    StudyRootQueryRetrieveInformationModelMove: Level.STUDY,
}
#: C-GET SOP Class UID -> the root level of its information model.
GET_MODELS: Mapping[str, Level] = {
    PatientRootQueryRetrieveInformationModelGet: Level.PATIENT,
    StudyRootQueryRetrieveInformationModelGet: Level.STUDY,
}

#: The unique key of each level (PS3.4 C.6.1.1, C.6.2.1), top down.
UNIQUE_KEYS: tuple[tuple[Level, str, int], ...] = (
    (Level.PATIENT, "PatientID", 0x00100020),
    (Level.STUDY, "StudyInstanceUID", 0x0020000D),
    (Level.SERIES, "SeriesInstanceUID", 0x0020000E),
    (Level.IMAGE, "SOPInstanceUID", 0x00080018),
)
_LEVEL_RANK = {level: rank for rank, (level, _, _) in enumerate(UNIQUE_KEYS)}
_QUERY_RETRIEVE_LEVEL = 0x00080052

#: Number of ... Sub-operations (0000,1020-1023) are US: no more matches
#: than this can be reported (PS3.7 E.1).
MAX_SUBOPERATIONS = 65535
#: Error Comment (0000,0902) is an LO: at most 64 characters (PS3.7 C.4).
ERROR_COMMENT_MAX = 64
#: UIDs named in the log line per key before "+N more".
_LOGGED_UIDS = 3

#: Command Field (0000,0100) of the C-GET-RSP and C-MOVE-RSP (PS3.7 E.1).
_C_GET_RSP = 0x8010
_C_MOVE_RSP = 0x8021
_PENDING = frozenset({int(Status.PENDING), int(Status.PENDING_WITH_UNSUPPORTED_KEYS)})

#: Attribute of a pynetdicom Association holding its retrieve operations.
_OPERATIONS = "_appliance_retrievals"


def register(setup: ServiceSetup) -> None:
    """Support the four MOVE and GET SOP Classes, and the storage SOP
    classes with SCP/SCU Role Selection for C-GET."""
    ae, config, services = setup.ae, setup.config, setup.services
    # Send a file given to send_c_store as its bytes, in PDU-sized chunks,
    # not read and re-encoded by pydicom (see sending.send_stored_bytes).  A
    # process-wide pynetdicom setting, like the Storage SCP's receiving one.
    _config.STORE_SEND_CHUNKED_DATASET = True
    for uid in (*MOVE_MODELS, *GET_MODELS):
        ae.add_supported_context(uid)
    # C-GET (PS3.4 C.4.3.1.2): the requestor proposes the storage SOP classes
    # it can receive, asking for the SCP role (PS3.7 D.3.3.4); accept both
    # roles so that a plain C-STORE SCU proposing role selection still works.
    # No transfer syntax is added here: the Storage SCP module owns that list.
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None  # every context of pynetdicom's list has one
        ae.add_supported_context(context.abstract_syntax, [], scu_role=True, scp_role=True)
    setup.handlers += [
        (evt.EVT_C_MOVE, handle_move, [services, config]),
        (evt.EVT_C_GET, handle_get, [services]),
        (evt.EVT_DIMSE_SENT, on_response_sent),
    ]


# ------------------------------------------------------------------ handlers


def handle_move(event: Event, services: Services, config: Config) -> Iterator[Any]:
    """Answer a C-MOVE request (PS3.4 C.4.2.1.4, C.4.2.3) as pynetdicom's
    ``EVT_C_MOVE`` generator: the destination's address, the number of
    sub-operations, then one (status, data set) per sub-operation.

    The identifier is checked before anything is sent.  No exception leaves
    this handler.

    Yields
    ------
    Any
        What pynetdicom expects.  The responses it then sends:

        Pending
          | ``0xFF00`` - after each sub-operation, with the Number of
            Remaining, Completed, Failed and Warning Sub-operations

        Success
          | ``0x0000`` - every sub-operation completed (also: nothing matched)

        Cancel
          | ``0xFE00`` - a C-CANCEL arrived; the counts so far, Remaining,
            and the Failed SOP Instance UID List

        Warning
          | ``0xB000`` - sub-operations complete, one or more failed or
            warned; Failed SOP Instance UID List (0008,0058)

        Failure
          | ``0xA801`` - move destination unknown (not in ``dimse.peers``);
            also sent by pynetdicom when the association to a known
            destination is not accepted (refused, unreachable)
          | ``0xA702`` - out of resources, unable to perform sub-operations:
            every sub-operation failed, or more than 65535 instances match
          | ``0xA900`` - identifier does not match SOP Class (Error Comment
            names the key, Offending Element its tag)
          | ``0xC000`` - unable to process (the identifier cannot be
            decoded, or the index failed)

        pynetdicom 3 opens the sub-association before it sends any final
        response, so an ``0xA900`` or ``0xC000`` to a known destination
        follows an association to it that carries no C-STORE.
    """
    operation = _begin(event, "C-MOVE", MOVE_MODELS)
    operation.audit = services.audit
    sending.send_at_once(event.assoc)
    try:
        destination = str(event.move_destination or "").strip()
        operation.destination = destination
        peer = find_peer(config, destination)
    except Exception as exc:  # noqa: BLE001 - never leak into pynetdicom
        LOGGER.error("C-MOVE: the Move Destination cannot be read (%s)", exc.__class__.__name__)
        peer = None
    if peer is None:
        operation.note = "the move destination is not a configured peer"
        yield None, None
        return
    operation.peer = f"{peer.host}:{peer.port}"
    plan = _plan(event, services, operation)
    association = {"ae_title": peer.ae_title.strip(), "max_pdu": config.dimse.max_pdu}
    if plan.error is not None:
        # pynetdicom sends no final response before its sub-association
        yield peer.host, peer.port, {**association, "contexts": [build_context(Verification)]}
        yield 1
        yield plan.error.response(), None
        return
    if not plan.instances:
        yield peer.host, peer.port, association
        yield 0
        return
    contexts, left_out = sending.propose_contexts(plan.instances)
    operation.left_out = left_out
    link = _SubAssociation()
    operation.link = link
    handlers = [(evt.EVT_ACCEPTED, _on_sub_association_accepted, [link, services])]
    yield peer.host, peer.port, {**association, "contexts": contexts, "evt_handlers": handlers}
    yield len(plan.instances)
    yield from _sub_operations(event, services, plan.instances, link.contexts, operation)


def handle_get(event: Event, services: Services) -> Iterator[Any]:
    """Answer a C-GET request (PS3.4 C.4.3.1.3, C.4.3.3) as pynetdicom's
    ``EVT_C_GET`` generator: the number of sub-operations, then one
    (status, data set) per sub-operation, sent as C-STORE requests on the
    requestor's association in the storage contexts it proposed with the
    SCP role.

    No exception leaves this handler.

    Yields
    ------
    Any
        What pynetdicom expects.  The responses it then sends:

        Pending
          | ``0xFF00`` - after each sub-operation, with the Number of
            Remaining, Completed, Failed and Warning Sub-operations

        Success
          | ``0x0000`` - every sub-operation completed (also: nothing matched)

        Cancel
          | ``0xFE00`` - a C-CANCEL arrived; the counts so far, Remaining,
            and the Failed SOP Instance UID List

        Warning
          | ``0xB000`` - sub-operations complete, one or more failed or
            warned; Failed SOP Instance UID List (0008,0058)

        Failure
          | ``0xA702`` - out of resources, unable to perform sub-operations:
            every sub-operation failed (e.g. no storage context accepted
            with the SCP role for the instances' SOP classes), or more than
            65535 instances match
          | ``0xA900`` - identifier does not match SOP Class (Error Comment
            names the key, Offending Element its tag)
          | ``0xC000`` - unable to process (the identifier cannot be
            decoded, or the index failed)

        The Number of Failed Sub-operations of an ``0xA900`` or ``0xC000``
        is 1: pynetdicom 3 counts the one announced sub-operation that
        carries the failure.
    """
    operation = _begin(event, "C-GET", GET_MODELS)
    operation.audit = services.audit
    sending.send_at_once(event.assoc)
    sending.send_stored_bytes(event.assoc, services.retrieve)
    plan = _plan(event, services, operation)
    if plan.error is not None:
        yield 1
        yield plan.error.response(), None
        return
    if not plan.instances:
        yield 0
        return
    assoc = event.assoc

    def contexts() -> list[PresentationContext] | None:
        return list(assoc.accepted_contexts) if assoc.is_established else None

    yield len(plan.instances)
    yield from _sub_operations(event, services, plan.instances, contexts, operation)


def _sub_operations(
    event: Event,
    services: Services,
    instances: Sequence[StoredInstance],
    contexts: Callable[[], list[PresentationContext] | None],
    operation: _Operation,
) -> Iterator[tuple[int, Dataset | None]]:
    """(Pending, data set) for each instance; (Cancel, None) and stop when
    a C-CANCEL has arrived (PS3.4 C.4.2.3.1, C.4.3.3.1)."""
    for index, stored in enumerate(instances):
        try:
            cancelled = event.is_cancelled
            if not cancelled:
                sub = _prepare(services, stored, contexts(), operation)
        except Exception as exc:  # noqa: BLE001 - never leak into pynetdicom
            cancelled = False
            sub = sending.failure(stored, f"internal error ({exc.__class__.__name__})")
        if cancelled:
            operation.note = f"cancelled before sub-operation {index + 1} of {len(instances)}"
            yield int(Status.CANCEL), None
            return
        operation.account(sub)
        yield int(Status.PENDING), sub.dataset


def _prepare(
    services: Services,
    stored: StoredInstance,
    accepted: list[PresentationContext] | None,
    operation: _Operation,
) -> sending.SubOperation:
    if accepted is None:
        return sending.failure(stored, "the association for the C-STORE requests has ended")
    if stored.sop_class_uid in operation.left_out:
        return sending.failure(
            stored, f"SOP Class {stored.sop_class_uid} is beyond the 128 presentation contexts"
        )
    syntaxes = sending.accepted_syntaxes(accepted, stored.sop_class_uid)
    return sending.prepare(services.retrieve, stored, syntaxes)


def find_peer(config: Config, ae_title: str) -> PeerConfig | None:
    """The configured peer whose AE title is *ae_title* (leading and
    trailing spaces are not significant, PS3.5 6.2), or None."""
    title = ae_title.strip()
    if not title:
        return None
    return next((peer for peer in config.dimse.peers if peer.ae_title.strip() == title), None)


# -------------------------------------------------------------- identifiers


class IdentifierError(Exception):
    """A C-MOVE/C-GET identifier that cannot be served.

    Parameters
    ----------
    status
        The final response's status.
    comment
        Its Error Comment: key names only, never a value.
    tag
        The Offending Element, if one key is at fault.
    """

    def __init__(self, status: Status, comment: str, tag: int | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.tag = tag

    def response(self) -> Dataset:
        """The status Dataset pynetdicom copies into the final response."""
        response = Dataset()
        response.Status = int(self.status)
        response.ErrorComment = self.comment[:ERROR_COMMENT_MAX]
        if self.tag is not None:
            response.OffendingElement = [self.tag]
        return response


def _invalid(comment: str, tag: int | None = None) -> IdentifierError:
    return IdentifierError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, comment, tag)


@dataclasses.dataclass(frozen=True)
class RetrieveRequest:
    """What a C-MOVE/C-GET identifier asks for (PS3.4 C.4.2.2.1).

    Attributes
    ----------
    root
        The information model's top level: PATIENT (Patient Root) or STUDY
        (Study Root).
    level
        The Query/Retrieve Level.
    patient_id
        Patient Root: the Patient ID; Study Root: None.
    studies, series, instances
        The UIDs of the levels down to the retrieve level (one each above
        it, one or more at it); empty below it.
    """

    root: Level
    level: Level
    patient_id: str | None
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()


def parse_identifier(identifier: Dataset, root: Level) -> RetrieveRequest:
    """Check a C-MOVE/C-GET identifier against the information model whose
    top level is *root* (PS3.4 C.4.2.2.1 and C.4.3.2.1, baseline
    hierarchical retrieve).

    - Query/Retrieve Level (0008,0052) is PATIENT (Patient Root only), STUDY,
      SERIES or IMAGE.
    - The unique key of the retrieve level and of each level above it is
      present and not empty: Patient ID (Patient Root), Study, Series, SOP
      Instance UID.  Above the retrieve level each is a single value; at it
      a UID key may be a list (List of UID Matching, PS3.4 C.2.2.2.2).
      Patient ID is matched as a literal single value (no wild cards).
    - A non-empty unique key of a level below the retrieve level is refused
      (it would ask for less than the level retrieves).
    - Other attributes are ignored, as is Patient ID in the Study Root model
      (relational retrieve is not supported).

    Raises
    ------
    IdentifierError
        ``0xA900`` naming the key that is missing, malformed or misplaced.
    """
    levels = _values(identifier, "QueryRetrieveLevel")
    if not levels:
        raise _invalid("QueryRetrieveLevel (0008,0052) is missing", _QUERY_RETRIEVE_LEVEL)
    if len(levels) > 1 or levels[0] not in Level.__members__:
        raise _invalid(
            "QueryRetrieveLevel is not PATIENT, STUDY, SERIES or IMAGE", _QUERY_RETRIEVE_LEVEL
        )
    level = Level(levels[0])
    if root is Level.STUDY and level is Level.PATIENT:
        raise _invalid("the PATIENT level is not in the Study Root model", _QUERY_RETRIEVE_LEVEL)
    found: dict[Level, tuple[str, ...]] = {}
    for key_level, keyword, tag in UNIQUE_KEYS:
        if key_level is Level.PATIENT and root is Level.STUDY:
            continue  # not a key of the Study Root model
        values = _values(identifier, keyword)
        if _LEVEL_RANK[key_level] > _LEVEL_RANK[level]:
            if values:
                raise _invalid(f"{keyword} is below the {level.value} level", tag)
            continue
        if not values:
            raise _invalid(f"{keyword} is required at the {level.value} level", tag)
        if len(values) > 1 and (key_level is not level or key_level is Level.PATIENT):
            raise _invalid(f"{keyword} must be a single value here", tag)
        if key_level is not Level.PATIENT and not all(is_valid_uid(v) for v in values):
            raise _invalid(f"{keyword} holds an invalid UID", tag)
        found[key_level] = tuple(dict.fromkeys(values))
    return RetrieveRequest(
        root=root,
        level=level,
        patient_id=found[Level.PATIENT][0] if Level.PATIENT in found else None,
        studies=found.get(Level.STUDY, ()),
        series=found.get(Level.SERIES, ()),
        instances=found.get(Level.IMAGE, ()),
    )


def _values(identifier: Dataset, keyword: str) -> list[str]:
    """The values of *keyword*: [] when absent or empty (zero length).

    Raises
    ------
    IdentifierError
        ``0xA900`` if a value is empty within a list or not text.
    """
    value = identifier.get(keyword)
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    values = [str(item).strip(" \0") for item in items]
    if not all(values) or not all(isinstance(item, str) for item in items):
        raise _invalid(f"{keyword} holds an empty or malformed value")
    return values


def find_instances(services: Services, request: RetrieveRequest) -> list[StoredInstance]:
    """The stored instances *request* names, in retrieve order (by study,
    series, instance number; lists in the order given), each once.  UIDs
    with nothing stored match nothing.

    Raises
    ------
    ApplianceError
        if the index fails (IndexUnavailable) or a query cannot run.
    """
    retrieve = services.retrieve
    if request.level is Level.PATIENT:
        assert request.patient_id is not None  # parse_identifier requires it
        studies = _studies_of_patient(services.query, request.patient_id, ())
    elif request.root is Level.PATIENT:
        assert request.patient_id is not None  # parse_identifier requires it
        # Patient Root: the studies must be the patient's
        own = set(_studies_of_patient(services.query, request.patient_id, request.studies))
        studies = [uid for uid in request.studies if uid in own]
    else:
        studies = list(request.studies)
    lookups: list[tuple[str, str | None, str | None]]
    if request.level in (Level.PATIENT, Level.STUDY):
        lookups = [(study, None, None) for study in studies]
    elif request.level is Level.SERIES:
        lookups = [(study, series, None) for study in studies for series in request.series]
    else:
        lookups = [
            (study, series, sop)
            for study in studies
            for series in request.series
            for sop in request.instances
        ]
    found: dict[str, StoredInstance] = {}
    for study, series, sop in lookups:
        try:
            instances = retrieve.instances(study, series, sop)
        except NotFound:
            continue
        for stored in instances:
            found.setdefault(stored.sop_instance_uid, stored)
    return list(found.values())


def _studies_of_patient(query: QueryService, patient_id: str, studies: Sequence[str]) -> list[str]:
    """The Study Instance UIDs stored for *patient_id* (among *studies* if
    any are given).  Patient ID is compared as a literal value: the query
    layer would treat ``*`` and ``?`` as wild cards, so its matches are
    filtered again."""
    keys = {"StudyInstanceUID": "\\".join(studies)} if studies else {"PatientID": patient_id}
    found: list[str] = []
    offset = 0
    while True:
        result = query.search(Query(Level.STUDY, keys, offset=offset))
        found.extend(
            str(match["StudyInstanceUID"])
            for match in result.matches
            if (match.get("PatientID") or "") == patient_id
        )
        if not result.truncated:
            return found
        offset += len(result.matches)


@dataclasses.dataclass(frozen=True)
class _Plan:
    instances: list[StoredInstance]
    error: IdentifierError | None = None


def _plan(event: Event, services: Services, operation: _Operation) -> _Plan:
    """Check the identifier and find the instances; never raises."""
    try:
        request = parse_identifier(event.identifier, operation.root)
        operation.describe(request)
        instances = find_instances(services, request)
    except IdentifierError as exc:
        return _refused(operation, exc)
    except ApplianceError as exc:
        LOGGER.error("%s: the instances cannot be listed: %s", operation.service, exc.reason)
        return _refused(operation, IdentifierError(Status.UNABLE_TO_PROCESS, "the index failed"))
    except Exception as exc:  # noqa: BLE001 - pydicom decodes the identifier lazily
        LOGGER.error(
            "%s: the identifier cannot be decoded (%s)", operation.service, exc.__class__.__name__
        )
        return _refused(
            operation,
            IdentifierError(Status.UNABLE_TO_PROCESS, "the identifier cannot be decoded"),
        )
    if len(instances) > MAX_SUBOPERATIONS:
        return _refused(
            operation,
            IdentifierError(
                Status.OUT_OF_RESOURCES_SUBOPERATIONS,
                f"{len(instances)} instances match; at most {MAX_SUBOPERATIONS} per request",
            ),
        )
    operation.matched = len(instances)
    operation.studies = study_uids(stored.study_instance_uid for stored in instances)
    return _Plan(instances)


def _refused(operation: _Operation, error: IdentifierError) -> _Plan:
    operation.note = error.comment
    return _Plan([], error)


# ---------------------------------------------------- the C-MOVE sub-association


class _SubAssociation:
    """The association pynetdicom opens to a Move Destination, once accepted."""

    def __init__(self) -> None:
        self.assoc: Any = None

    def contexts(self) -> list[PresentationContext] | None:
        """Its accepted contexts, or None once it has ended."""
        if self.assoc is None or not self.assoc.is_established:
            return None
        return list(self.assoc.accepted_contexts)


def _on_sub_association_accepted(event: Event, link: _SubAssociation, services: Services) -> None:
    """``EVT_ACCEPTED`` of a C-MOVE sub-association (requestor side), before
    pynetdicom sends anything on it."""
    link.assoc = event.assoc
    sending.send_at_once(event.assoc)
    sending.send_stored_bytes(event.assoc, services.retrieve)


# ------------------------------------------------------------- the log line


@dataclasses.dataclass
class _Operation:
    """One C-MOVE or C-GET, for its log line and the association's counts."""

    service: str
    message_id: int
    root: Level
    destination: str = ""
    peer: str = ""
    what: str = ""
    matched: int = 0
    bytes_out: int = 0
    transcoded: int = 0
    note: str = ""
    left_out: frozenset[str] = frozenset()
    link: _SubAssociation | None = None
    #: for the audit event: where it is written, the studies matched
    audit: AuditLog | None = None
    studies: tuple[str, ...] = ()

    def describe(self, request: RetrieveRequest) -> None:
        """Name what *request* retrieves by its UIDs (the Patient ID is
        patient data: never logged)."""
        parts = [f"{request.level.value} level"]
        if request.level is Level.PATIENT:
            parts.append("of one patient")
        for label, uids in (
            ("study", request.studies),
            ("series", request.series),
            ("instance", request.instances),
        ):
            if uids:
                shown = ", ".join(uids[:_LOGGED_UIDS])
                more = f" +{len(uids) - _LOGGED_UIDS} more" if len(uids) > _LOGGED_UIDS else ""
                parts.append(f"{label} {shown}{more}")
        self.what = " ".join(parts)

    def account(self, sub: sending.SubOperation) -> None:
        """Count a sub-operation handed to pynetdicom, and log a failure."""
        if sub.failed:
            LOGGER.warning(
                "%s sub-operation for %s failed: %s",
                self.service,
                sub.stored.sop_instance_uid,
                sub.reason,
            )
            return
        self.bytes_out += sub.size
        if sub.repaired:
            LOGGER.warning(
                "%s: %s is not encoded as its transfer syntax %s says; sent re-encoded in it",
                self.service,
                sub.stored.sop_instance_uid,
                sub.transfer_syntax,
            )
        if sub.transcoded:
            self.transcoded += 1
            LOGGER.info(
                "%s: %s sent as %s (stored as %s, not accepted by the peer)",
                self.service,
                sub.stored.sop_instance_uid,
                sub.transfer_syntax,
                sub.stored.transfer_syntax_uid,
            )


def _begin(event: Event, service: str, models: Mapping[str, Level]) -> _Operation:
    """Start the record of the operation *event* requests; it is logged by
    :func:`on_response_sent` when its final response goes out."""
    request: Any = event.request
    try:
        model = models.get(str(request.AffectedSOPClassUID or ""), Level.STUDY)
        operation = _Operation(service, int(request.MessageID), model)
        operations = getattr(event.assoc, _OPERATIONS, None)
        if operations is None:
            operations = {}
            setattr(event.assoc, _OPERATIONS, operations)
        operations[operation.message_id] = operation
    except Exception as exc:  # noqa: BLE001 - a log record never fails the operation
        LOGGER.warning("%s: not recorded (%s)", service, exc.__class__.__name__)
        operation = _Operation(service, -1, Level.STUDY)
    return operation


def on_response_sent(event: Event) -> None:
    """``EVT_DIMSE_SENT``: when the final C-MOVE-RSP or C-GET-RSP of an
    operation goes out, log its line and count it in the association's
    statistics (the status and counts are those on the wire)."""
    try:
        command = event.message.command_set
        if command.get("CommandField") not in (_C_GET_RSP, _C_MOVE_RSP):
            return
        status = int(command.get("Status", 0))
        if status in _PENDING:
            return
        operations = getattr(event.assoc, _OPERATIONS, {})
        operation = operations.pop(int(command.get("MessageIDBeingRespondedTo", -1)), None)
        if operation is None:
            return
        _log_final(event, operation, status, command)
    except Exception as exc:  # noqa: BLE001 - a log line never fails an association
        LOGGER.warning("a retrieve response could not be logged (%s)", exc.__class__.__name__)


def _log_final(event: Event, operation: _Operation, status: int, command: Dataset) -> None:
    outcome = _outcome(status)
    stats_of(event.assoc).record(operation.service, outcome, bytes_out=operation.bytes_out)
    counts = ", ".join(
        f"{command.get(f'NumberOf{name}Suboperations')} {name.lower()}"
        for name in ("Completed", "Failed", "Warning", "Remaining")
        if command.get(f"NumberOf{name}Suboperations") is not None
    )
    note = operation.note
    if (
        status == int(Status.MOVE_DESTINATION_UNKNOWN)
        and operation.link is not None
        and operation.link.assoc is None
    ):
        note = f"the association to {operation.peer} was not accepted"
    where = (
        f" to '{operation.destination}'" if operation.service == "C-MOVE" else ""
    ) + f" ({'Patient' if operation.root is Level.PATIENT else 'Study'} Root)"
    if operation.audit is not None:
        _audit(event, operation, operation.audit, status, command)
    LOGGER.log(
        logging.INFO if outcome == "success" else logging.WARNING,
        "%s%s %s: 0x%04X %s; %d matched%s; %d bytes out%s%s",
        operation.service,
        where,
        operation.what or "(identifier not read)",
        status,
        outcome,
        operation.matched,
        f", {counts}" if counts else "",
        operation.bytes_out,
        f", {operation.transcoded} transcoded" if operation.transcoded else "",
        f"; {note}" if note else "",
    )


def _audit(
    event: Event, operation: _Operation, log: AuditLog, status: int, command: Dataset
) -> None:
    """The operation's audit event: the studies matched, the instances sent
    and failed (the final response's counts), the Move Destination."""
    if status == int(Status.SUCCESS) or status == int(Status.CANCEL):
        outcome = Outcome.SUCCESS
    elif status == int(Status.UNABLE_TO_PROCESS):
        outcome = Outcome.SERIOUS_FAILURE
    else:  # refused, a warning (some sub-operations failed), a failure
        outcome = Outcome.MINOR_FAILURE
    destination = ""
    if operation.service == "C-MOVE":
        where = f" ({operation.peer})" if operation.peer else ""
        destination = f"{operation.destination}{where}"
    audit.record(
        event.assoc,
        log,
        Action.RETRIEVE,
        outcome,
        transaction=operation.service,
        status=status,
        studies=operation.studies,
        instances=int(command.get("NumberOfCompletedSuboperations") or 0)
        + int(command.get("NumberOfWarningSuboperations") or 0),
        failed=int(command.get("NumberOfFailedSuboperations") or 0),
        destination=destination,
    )


def _outcome(status: int) -> str:
    """The status class (PS3.7 C.1) as the association statistics name it."""
    if status == int(Status.SUCCESS):
        return "success"
    if status == int(Status.CANCEL):
        return "cancel"
    if status & 0xF000 == 0xB000:
        return "warning"
    return "failure"
