"""The audit events of the DIMSE side (:mod:`appliance.audit`).

*Who* is the Calling AE Title, with the peer's address.  C-FIND, C-MOVE and
C-GET are one event per request, written when the request ends.  C-STORE is
summed up per association and study, as PS3.15 A.5.3.7 "DICOM Instances
Transferred" reports one transfer of a study's instances: one event per
study per association, with the instances stored and failed, written when
the association is released or aborted (:func:`flush`, called by
:mod:`dimse_bridge.handlers`).  A process killed while an association is
open loses that association's pending C-STORE events (the instances
themselves are in the index, with the sender's AE title).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from appliance.audit import Action, AuditEvent, AuditLog, Outcome, outcome_of_counts, study_uids
from appliance.logs import CORRELATION_ID
from dimse_bridge.partitions import partition_of

LOGGER = logging.getLogger(__name__)

#: The attribute of a pynetdicom Association holding its pending C-STORE events.
_STORES = "_appliance_audit_stores"
_CREATE_LOCK = threading.Lock()


def requestor(assoc: Any) -> tuple[str, str]:
    """The Calling AE Title (stripped) and the address of *assoc*'s peer."""
    try:
        peer = assoc.requestor
        return str(peer.ae_title).strip(), str(peer.address)
    except Exception:  # noqa: BLE001 - an audit record never fails an operation
        return "", ""


def record(
    assoc: Any,
    log: AuditLog,
    action: Action,
    outcome: Outcome,
    *,
    transaction: str,
    status: int | None = None,
    studies: Iterable[str] = (),
    instances: int = 0,
    failed: int = 0,
    destination: str = "",
    query_keys: tuple[str, ...] = (),
    query: Mapping[str, str] | None = None,
) -> None:
    """Write one event of *assoc*'s peer now; never raises."""
    if not log.enabled:
        return
    try:
        who, address = requestor(assoc)
        log.record(
            AuditEvent(
                action=action,
                outcome=outcome,
                protocol="dimse",
                who=who,
                address=address,
                destination=destination,
                studies=study_uids(studies),
                instances=instances,
                failed=failed,
                status=status,
                transaction=transaction,
                query_keys=query_keys,
                query=query if log.record_query_values else None,
                correlation_id=CORRELATION_ID.get(),
                partition=partition_of(assoc),
            )
        )
    except Exception as exc:  # noqa: BLE001 - an audit record never fails an operation
        LOGGER.error("a DIMSE audit event was not written (%s)", exc.__class__.__name__)


@dataclasses.dataclass
class _StoreCounts:
    stored: int = 0
    failed: int = 0
    #: the status of the last failure
    status: int | None = None


class PendingStores:
    """The C-STORE requests of one association, per study, until it ends."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self._lock = threading.Lock()
        self._studies: dict[str, _StoreCounts] = {}
        self._ended = False

    def add(self, study: str, stored: bool, status: int) -> bool:
        """Count one C-STORE; False once the association has ended (the
        caller then writes it on its own)."""
        with self._lock:
            if self._ended:
                return False
            counts = self._studies.setdefault(study, _StoreCounts())
            if stored:
                counts.stored += 1
            else:
                counts.failed += 1
                counts.status = status
            return True

    def take(self) -> dict[str, _StoreCounts]:
        """Everything counted; later C-STOREs are not counted any more."""
        with self._lock:
            self._ended = True
            studies, self._studies = self._studies, {}
            return studies


def record_store(assoc: Any, log: AuditLog, study: str, stored: bool, status: int) -> None:
    """Count one C-STORE (*study*: "" when the data set could not be read)
    for its association's event; never raises."""
    if not log.enabled:
        return
    try:
        pending = getattr(assoc, _STORES, None)
        if pending is None:
            with _CREATE_LOCK:
                pending = getattr(assoc, _STORES, None)
                if pending is None:
                    pending = PendingStores(log)
                    setattr(assoc, _STORES, pending)
        if not pending.add(study, stored, status):
            # after the association ended (an abort during the store)
            _write_store(assoc, log, study, _StoreCounts(int(stored), int(not stored), status))
    except Exception as exc:  # noqa: BLE001 - an audit record never fails a store
        LOGGER.error("a C-STORE was not counted for the audit (%s)", exc.__class__.__name__)


def flush(assoc: Any) -> None:
    """Write the C-STORE events of *assoc* (released or aborted); never raises."""
    pending = getattr(assoc, _STORES, None)
    if not isinstance(pending, PendingStores):
        return
    try:
        for study, counts in pending.take().items():
            _write_store(assoc, pending.log, study, counts)
    except Exception as exc:  # noqa: BLE001 - an audit record never fails an association
        LOGGER.error("C-STORE audit events were not written (%s)", exc.__class__.__name__)


def _write_store(assoc: Any, log: AuditLog, study: str, counts: _StoreCounts) -> None:
    record(
        assoc,
        log,
        Action.STORE,
        outcome_of_counts(counts.stored, counts.failed),
        transaction="C-STORE",
        status=counts.status,
        studies=(study,) if study else (),
        instances=counts.stored,
        failed=counts.failed,
    )
