"""Query/Retrieve Service Class, C-FIND SCP (PS3.4 C.4.1).

SOP Classes (PS3.4 C.6.1.2, C.6.2.2), each with the transfer syntaxes
pynetdicom offers by default (Implicit VR Little Endian, Explicit VR Little
Endian, Deflated Explicit VR Little Endian, Explicit VR Big Endian):

- Patient Root Query/Retrieve Information Model - FIND, 1.2.840.10008.5.1.4.1.2.1.1
- Study Root Query/Retrieve Information Model - FIND, 1.2.840.10008.5.1.4.1.2.2.1

Each request is one search of the shared query layer
(:mod:`appliance.query`, PS3.4 C.2.2.2 matching) with the identifier split
by :mod:`dimse_bridge.identifiers`; each match is one pending response.
Relational queries, fuzzy matching, combined date-time matching and the
other Extended Negotiation options are not negotiated (baseline behaviour,
PS3.4 C.4.1.2.1 and C.4.1.3.1).  Priority is not used.

Log lines name the calling AE, the model, the level, the key names and the
counts, never a value (the identifier holds patient data).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from typing import Final

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from appliance.audit import Action, Outcome
from appliance.config import Config
from appliance.errors import IndexUnavailable, QueryError
from appliance.services import Services
from appliance.status import Status, StatusCategory
from dimse_bridge import audit
from dimse_bridge.identifiers import (
    IdentifierError,
    InformationModel,
    parse_find,
    response_identifier,
    status_dataset,
)
from dimse_bridge.services import ServiceSetup
from dimse_bridge.stats import stats_of

LOGGER = logging.getLogger(__name__)

#: The C-FIND SOP Classes served and their information models.
FIND_SOP_CLASSES: dict[str, InformationModel] = {
    "1.2.840.10008.5.1.4.1.2.1.1": InformationModel.PATIENT_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.1": InformationModel.STUDY_ROOT,
}

#: Pending responses between two waits for pynetdicom to write out what is
#: queued (see :func:`_let_cancel_in`), and the longest such wait in seconds.
DRAIN_EVERY: Final = 8
DRAIN_TIMEOUT: Final = 10.0

#: What a response of the C-FIND generator is: a status (or a status data set
#: with Error Comment) and, for a pending status, the identifier.
FindResponse = tuple[int | Dataset, Dataset | None]


def register(setup: ServiceSetup) -> None:
    """Support the Patient Root and Study Root FIND SOP Classes."""
    for uid in FIND_SOP_CLASSES:
        setup.ae.add_supported_context(uid)
    setup.handlers.append((evt.EVT_C_FIND, handle_find, [setup.services, setup.config]))


def handle_find(event: Event, services: Services, config: Config) -> Iterator[FindResponse]:
    """Answer a C-FIND request (PS3.4 C.4.1): one pending response per
    matching entity at the Query/Retrieve Level, then the final status.

    Yields
    ------
    tuple
        ``(status, identifier)``; this handler sends:

        - ``0xFF00`` Pending, with the identifier of one match: the
          Query/Retrieve Level, every key of the request filled from the
          match, Specific Character Set when needed.
        - ``0xFF01`` Pending, the same, when one or more keys were not
          supported for existence and/or matching (not held by the index,
          or returned but not matchable; their values were ignored).
        - ``0x0000`` Success (sent by pynetdicom when the generator ends):
          every match was sent.
        - ``0xFE00`` Cancel: a C-CANCEL was received; checked before each
          pending response.
        - ``0xA700`` Refused: Out of Resources, after ``query.max_results``
          pending responses when more entities matched; Error Comment says so.
        - ``0xA900`` Identifier does not match SOP Class: a missing or bad
          Query/Retrieve Level, a missing Unique Key of a level above, a key
          of a level below with a value, a malformed value, an unknown
          Specific Character Set; Error Comment names the key.
        - ``0xC000`` Unable to process: the identifier cannot be decoded, or
          the index failed.
        - ``0x0122`` SOP Class not supported (an unexpected C-FIND SOP Class).
    """
    started = time.monotonic()
    outcome = _Outcome()
    completed = False
    try:
        for response in _find(event, services, config, outcome):
            status = response[0]
            outcome.last = int(status.Status) if isinstance(status, Dataset) else int(status)
            yield response
        completed = True
    finally:
        if not completed and Status(outcome.last).category is StatusCategory.PENDING:
            # pynetdicom stopped asking (the association was aborted or
            # released mid-answer): no final status was sent
            result, code = "interrupted", outcome.last
        else:
            category = Status(outcome.last).category
            if category is StatusCategory.PENDING:
                category = StatusCategory.SUCCESS  # pynetdicom sends it at the end
            result, code = category.value, 0 if category is StatusCategory.SUCCESS else outcome.last
        stats_of(event.assoc).record("C-FIND", result)
        audit.record(
            event.assoc,
            services.audit,
            Action.QUERY,
            Outcome.SUCCESS if result in ("success", "cancel") else Outcome.MINOR_FAILURE,
            transaction="C-FIND",
            status=code,
            studies=outcome.studies,
            instances=outcome.sent,
            query_keys=tuple(outcome.matching),
            query=outcome.matching,
        )
        log = LOGGER.info if result in ("success", "cancel") else LOGGER.warning
        log(
            "C-FIND from '%s': %s %s keys=%s -> %d match(es) sent, %s 0x%04X%s (%.2f s)",
            event.assoc.requestor.ae_title,
            outcome.model,
            outcome.level,
            outcome.keys,
            outcome.sent,
            result,
            code,
            f": {outcome.reason}" if outcome.reason else "",
            time.monotonic() - started,
        )


class _Outcome:
    """What one C-FIND did, for its log line and the association's counts."""

    def __init__(self) -> None:
        self.model = "?"
        self.level = "?"
        self.keys: list[str] = []
        self.sent = 0
        self.last = int(Status.SUCCESS)
        self.reason = ""
        #: for the audit event: the matching keys (keyword -> value) and
        #: the studies of the matches sent
        self.matching: dict[str, str] = {}
        self.studies: dict[str, None] = {}


def _failure(
    outcome: _Outcome, status: Status, reason: str, offending: tuple[int, ...] = ()
) -> FindResponse:
    outcome.reason = reason
    return status_dataset(status, reason, offending), None


def _find(
    event: Event, services: Services, config: Config, outcome: _Outcome
) -> Iterator[FindResponse]:
    """The responses of one C-FIND; never raises (an exception reaching
    pynetdicom would become 0xC311 with the cause hidden)."""
    sop_class = str(event.request.AffectedSOPClassUID or "")
    model = FIND_SOP_CLASSES.get(sop_class)
    if model is None:
        yield _failure(outcome, Status.SOP_CLASS_NOT_SUPPORTED, f"{sop_class} is not served")
        return
    outcome.model = model.value
    try:
        find = parse_find(event.identifier, model, services.query)
    except IdentifierError as exc:
        yield _failure(outcome, exc.status, exc.reason, exc.offending)
        return
    outcome.level, outcome.keys = find.level.value, find.key_names()
    outcome.matching = dict(find.keys)
    path_study = outcome.matching.get("StudyInstanceUID", "")
    try:
        result = services.query.search(find.query())
    except QueryError as exc:
        # PS3.4 C.4.1.1.4: a key value the query layer cannot use
        status = Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
        yield _failure(outcome, status, exc.reason, find.tags_named(exc.reason))
        return
    except IndexUnavailable as exc:
        yield _failure(outcome, Status.UNABLE_TO_PROCESS, exc.reason)
        return
    except Exception as exc:  # noqa: BLE001 - never into pynetdicom
        LOGGER.error("C-FIND search failed unexpectedly: %s", exc.__class__.__name__)
        yield _failure(outcome, Status.UNABLE_TO_PROCESS, "internal error while searching")
        return

    ae_title = config.dimse.ae_title.strip()
    pending = find.pending_status
    for index, match in enumerate(result.matches):
        if index and index % DRAIN_EVERY == 0:
            _let_cancel_in(event)
        # PS3.4 C.4.1.3.1, PS3.7 9.3.2.3: a C-CANCEL ends the matching with
        # the status Cancel; checked before each pending response.
        if event.is_cancelled:
            yield Status.CANCEL, None
            return
        try:
            identifier = response_identifier(find, match, ae_title)
        except Exception as exc:  # noqa: BLE001 - never into pynetdicom
            LOGGER.error("C-FIND response not built: %s", exc.__class__.__name__)
            yield _failure(outcome, Status.UNABLE_TO_PROCESS, "a match could not be encoded")
            return
        outcome.sent += 1
        outcome.studies[str(match.get("StudyInstanceUID") or path_study)] = None
        yield pending, identifier
    if event.is_cancelled:
        yield Status.CANCEL, None
        return
    if result.truncated:
        # PS3.4 C.4.1.1.4 has no "more matches" status for these SOP Classes
        # (0xB001 belongs to the Repository Query SOP Class); a final Success
        # would claim the set complete.  Refused: Out of Resources says it is
        # not, after the matches that were sent.
        maximum = services.query.max_results
        yield _failure(
            outcome,
            Status.OUT_OF_RESOURCES,
            f"more than {maximum} matches; first {maximum} sent, narrow the query",
        )


def _let_cancel_in(event: Event) -> None:
    """Wait until pynetdicom has written the responses queued so far.

    pynetdicom's DUL reactor either sends one queued primitive or reads the
    socket in each loop, sending first (``pynetdicom/dul.py``,
    ``run_reactor``): while responses wait in its outgoing queue, a C-CANCEL
    from the peer is not even read.  A handler that yields faster than the
    socket drains would only see the C-CANCEL after every match was queued,
    i.e. never.  Letting the queue empty every :data:`DRAIN_EVERY` responses
    gives the reactor loops in which it reads, so that ``event.is_cancelled``
    can turn true within a few responses of the C-CANCEL.

    Reads pynetdicom's ``assoc.dul.to_provider_queue``; with a pynetdicom
    that has no such queue no wait is made (cancel is then still honoured,
    only later).
    """
    outgoing = getattr(getattr(event.assoc, "dul", None), "to_provider_queue", None)
    if not isinstance(outgoing, queue.Queue):
        return
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while not outgoing.empty() and event.assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0005)
