"""Storage Commitment Push Model SOP Class (PS3.4 J.3) as SCP.

- **N-ACTION** (Request Storage Commitment, Action Type ID 1, PS3.4 J.3.2):
  the request is checked, then recorded with its result in the index
  database (:class:`appliance.commitment.CommitmentOutbox`) *before* Success
  is answered, so an acknowledged request is never forgotten.
- **N-EVENT-REPORT** (Storage Commitment Result, PS3.4 J.3.3): sent by a
  background worker (:class:`ReportWorker`, a daemon thread of the DIMSE
  process started by :func:`register`) that polls the outbox for due reports.
  With ``dimse.commitment_on_same_association`` the report goes on the
  requesting association if it is still open (J.3.3.1.2 Note 1); otherwise,
  or if that fails, on a new association to the requester's AE title looked
  up in ``dimse.peers``, proposing the SCP role for ourselves through SCP/SCU
  Role Selection (J.3.3.1.3 Note).  A failed attempt is retried with an
  exponential back-off (:class:`appliance.commitment.RetrySchedule`: 10 s
  doubling to 10 min, for 24 h, then the report is ``failed`` and logged).
  A requester that is not in ``dimse.peers`` has no address: its report is
  marked ``failed`` at once, with that reason, when the same association is
  not (or no longer) available.

On the same association no role negotiation is needed: the requestor is the
SOP Class's SCU, and receiving the N-EVENT-REPORT is part of the SCU role
(PS3.4 J.3.1, Table J.3-1 "N-EVENT-REPORT M/M"); pynetdicom sends it on the
accepted context whatever roles were negotiated.

Log lines carry AE titles, Transaction UIDs and counts, never patient data.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from appliance.commitment import (
    CommitmentOutbox,
    CommitmentReport,
    InvalidCommitmentRequest,
    Reference,
    RetrySchedule,
)
from appliance.config import Config, PeerConfig
from appliance.errors import ApplianceError
from appliance.status import Status
from dimse_bridge import access
from dimse_bridge.partitions import current_key
from dimse_bridge.services import ServiceSetup
from dimse_bridge.stats import stats_of

LOGGER = logging.getLogger(__name__)

#: Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2, Table J.3-1).
REQUEST_STORAGE_COMMITMENT = 1
#: Seconds between looks at the outbox (a request wakes the worker at once).
POLL_INTERVAL = 2.0
#: Seconds to wait for the N-EVENT-REPORT response on the requesting
#: association.  The reactor of that association is paused meanwhile (so an
#: A-RELEASE-RQ of an SCU that releases at once waits too), hence shorter
#: than ``dimse.dimse_timeout``; on timeout the association is aborted and a
#: new one is tried.
SAME_ASSOCIATION_TIMEOUT = 10.0
#: Transfer syntaxes proposed on a new association (Implicit VR Little
#: Endian is the one every AE supports, PS3.5 10.1).
REPORT_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: Longest Error Comment (0000,0902): LO, 64 characters.
_ERROR_COMMENT_LENGTH = 64


def register(setup: ServiceSetup) -> None:
    """Support the Storage Commitment Push Model SOP Class as SCP, add the
    N-ACTION handler, and the report worker as a background task (it runs
    while the listener runs: see :meth:`ReportWorker.run`)."""
    setup.ae.add_supported_context(StorageCommitmentPushModel)
    outbox = CommitmentOutbox(setup.services.engine)
    worker = ReportWorker(outbox, setup.config)
    setup.handlers.append((evt.EVT_N_ACTION, handle_n_action, [outbox, worker, setup.config]))
    setup.tasks.append(("commitment-reports", lambda stop: worker.run(stop.is_set)))


# ---------------------------------------------------------------- N-ACTION


class _Refused(Exception):
    """The N-ACTION request is answered with a failure *status*."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def handle_n_action(
    event: Event, outbox: CommitmentOutbox, worker: ReportWorker, config: Config
) -> tuple[Dataset, None]:
    """Answer a Storage Commitment Request (N-ACTION, PS3.4 J.3.2.1.3).

    The request is recorded durably before Success is sent; the result goes
    out later as an N-EVENT-REPORT (see :class:`ReportWorker`).

    Returns
    -------
    tuple
        The response Status (a data set with Status and, on failure, an
        Error Comment (0000,0902)) and no Action Reply.  This handler sends:

        - ``0x0000`` :attr:`~appliance.status.Status.SUCCESS`: recorded; the
          N-EVENT-REPORT follows (also for a repeat of a recorded request).
        - ``0x0123`` :attr:`~appliance.status.Status.NO_SUCH_ACTION`: the
          Action Type ID is not 1.
        - ``0x0112`` :attr:`~appliance.status.Status.NO_SUCH_OBJECT_INSTANCE`:
          the Requested SOP Instance UID is not the well-known instance
          1.2.840.10008.1.20.1.1 (J.3.2.1.2).
        - ``0x0115`` :attr:`~appliance.status.Status.INVALID_ARGUMENT_VALUE`:
          no or undecodable Action Information; Transaction UID missing or not
          a UID; Referenced SOP Sequence missing or empty; an item without a
          valid Referenced SOP Class or Instance UID.
        - ``0x0213`` :attr:`~appliance.status.Status.RESOURCE_LIMITATION`:
          more than :data:`appliance.commitment.MAX_ITEMS` references.
        - ``0x0110`` :attr:`~appliance.status.Status.PROCESSING_FAILURE`: the
          index failed (nothing recorded), an internal error, or the report
          could never be delivered: ``commitment_on_same_association`` is
          false and the requester's AE title is not in ``dimse.peers``.
    """
    assoc = event.assoc
    requester = str(assoc.requestor.ae_title).strip()
    stats = stats_of(assoc)
    try:
        transaction_uid, items = _parse_request(event)
        if not config.dimse.commitment_on_same_association and peer_of(config, requester) is None:
            raise _Refused(
                Status.PROCESSING_FAILURE,
                f"calling AE '{requester}' is not in dimse.peers: no address for the report",
            )
        peer = peer_of(config, requester)
        # a peer whose commitment waits for the cloud: committed only once
        # delivered to its [[forward]] destination (README "Forwarding")
        awaiting = peer.commit_after_forward if peer is not None else ""
        outcome = outbox.request(
            transaction_uid,
            requester,
            items,
            await_destination=awaiting or None,
            # the association's data partition (dimse_bridge.partitions)
            partition_key=current_key(assoc),
        )
    except _Refused as refused:
        return _refuse(stats, requester, refused.status, refused.reason)
    except InvalidCommitmentRequest as exc:
        return _refuse(stats, requester, exc.status, exc.reason)
    except ApplianceError as exc:
        LOGGER.error("storage commitment request from AE '%s' not recorded: %s", requester, exc)
        return _refuse(stats, requester, exc.status, "the request could not be recorded")
    except Exception:
        # a defect: answered and logged here, never left to pynetdicom
        LOGGER.exception("storage commitment request from AE '%s' failed", requester)
        return _refuse(stats, requester, Status.PROCESSING_FAILURE, "internal error")
    result = outcome.result
    LOGGER.info(
        "storage commitment request %s from AE '%s': %d committed, %d failed%s",
        transaction_uid,
        requester,
        len(result.committed),
        len(result.failed),
        " (a repeat of a recorded request)" if outcome.repeated else "",
    )
    if config.dimse.commitment_on_same_association:
        worker.attach(outcome.report_id, assoc)
    worker.wake()
    stats.record("N-ACTION", "success")
    return _status(Status.SUCCESS), None


def _parse_request(event: Event) -> tuple[str, list[Reference]]:
    """The Transaction UID and the references of an N-ACTION, or _Refused."""
    request = cast(N_ACTION, event.request)
    if request.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
        raise _Refused(
            Status.NO_SUCH_ACTION,
            f"Action Type ID {request.ActionTypeID} is not 1 (Request Storage Commitment)",
        )
    if request.RequestedSOPInstanceUID != StorageCommitmentPushModelInstance:
        raise _Refused(
            Status.NO_SUCH_OBJECT_INSTANCE,
            "Requested SOP Instance UID is not the well-known 1.2.840.10008.1.20.1.1",
        )
    try:
        info = event.action_information
        transaction_uid = info.get("TransactionUID")
        sequence = info.get("ReferencedSOPSequence")
        items = [
            Reference(
                str(item.get("ReferencedSOPClassUID") or ""),
                str(item.get("ReferencedSOPInstanceUID") or ""),
            )
            for item in (sequence or [])
        ]
    except Exception as exc:
        raise _Refused(
            Status.INVALID_ARGUMENT_VALUE,
            f"the Action Information cannot be decoded ({exc.__class__.__name__})",
        ) from exc
    if not transaction_uid:
        raise _Refused(Status.INVALID_ARGUMENT_VALUE, "Transaction UID (0008,1195) is missing")
    if not items:
        raise _Refused(
            Status.INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence (0008,1199) is missing or empty"
        )
    return str(transaction_uid), items


def _status(status: Status, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return ds


def _refuse(stats: Any, requester: str, status: Status, reason: str) -> tuple[Dataset, None]:
    LOGGER.warning(
        "storage commitment request from AE '%s' refused (0x%04X): %s",
        requester,
        int(status),
        reason,
    )
    stats.record("N-ACTION", "failure")
    return _status(status, reason), None


def peer_of(config: Config, ae_title: str) -> PeerConfig | None:
    """The configured peer with AE title *ae_title* (first match), or None."""
    title = ae_title.strip()
    return next((p for p in config.dimse.peers if p.ae_title.strip() == title), None)


# ----------------------------------------------------------- N-EVENT-REPORT


def event_information(report: CommitmentReport, retrieve_ae_title: str) -> Dataset:
    """The Event Information of a Storage Commitment Result (PS3.4 J.3.3,
    Table J.3-2): Transaction UID; Retrieve AE Title (our AE, where the
    committed instances can be retrieved) when something is committed;
    Referenced SOP Sequence (the committed instances, when any); Failed SOP
    Sequence with Failure Reason (event type 2)."""
    result = report.result
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if result.committed:
        ds.RetrieveAETitle = retrieve_ae_title
        ds.ReferencedSOPSequence = [
            _item(ref.sop_class_uid, ref.sop_instance_uid) for ref in result.committed
        ]
    if result.failed:
        failed = []
        for ref in result.failed:
            item = _item(ref.sop_class_uid, ref.sop_instance_uid)
            item.FailureReason = int(ref.reason)
            failed.append(item)
        ds.FailedSOPSequence = failed
    return ds


def _item(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


class ReportWorker:
    """Delivers due Storage Commitment Results (N-EVENT-REPORT).

    Parameters
    ----------
    outbox
        Where the reports are.
    config
        ``dimse.ae_title`` (our title, the calling AE of new associations and
        the Retrieve AE Title), ``dimse.peers`` (the requesters' addresses),
        ``dimse.commitment_on_same_association`` and the timeouts.
    schedule
        When to retry a failed delivery and when to give up.
    poll_interval
        Seconds between looks at the outbox.
    """

    def __init__(
        self,
        outbox: CommitmentOutbox,
        config: Config,
        *,
        schedule: RetrySchedule | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.outbox = outbox
        self.config = config
        self.schedule = schedule or RetrySchedule()
        self.poll_interval = poll_interval
        self._wake = threading.Event()
        self._lock = threading.Lock()
        #: report id -> the association its request came on (this process only)
        self._open: dict[int, Association] = {}
        self._message_ids = itertools.count(1)

    def attach(self, report_id: int, assoc: Association) -> None:
        """Deliver report *report_id* on *assoc* if it is still open then."""
        with self._lock:
            self._open[report_id] = assoc

    def wake(self) -> None:
        """Look at the outbox now rather than at the next poll."""
        self._wake.set()

    def run(
        self, should_stop: Callable[[], bool], ready: Callable[[], bool] = lambda: True
    ) -> None:
        """Deliver due reports, when *ready* says so, every
        :attr:`poll_interval` seconds or when woken, until *should_stop*
        returns True."""
        LOGGER.debug("storage commitment report worker started")
        while not should_stop():
            try:
                if ready():
                    self.deliver_due()
            except Exception:
                LOGGER.exception("storage commitment report worker: delivery round failed")
            self._wake.wait(self.poll_interval)
            self._wake.clear()
        LOGGER.debug("storage commitment report worker stopped")

    def deliver_due(self, now: dt.datetime | None = None) -> int:
        """Claim and deliver every due report; the number attempted.

        A report whose requesting association is still open (and
        ``commitment_on_same_association``) is sent on it from a thread of
        its own, so that an SCU slow to answer holds up no other report;
        the others are delivered here, one after the other.
        """
        self._forget_closed()
        wait_limit = dt.timedelta(seconds=self.config.dimse.commitment_forward_wait)
        self.outbox.settle_waiting(wait_limit, now)
        attempted = 0
        for report in self.outbox.claim_due(now):
            attempted += 1
            with self._lock:
                assoc = self._open.pop(report.id, None)
            if assoc is not None and self.config.dimse.commitment_on_same_association:
                threading.Thread(
                    target=self._deliver_guarded,
                    args=(report, assoc),
                    name="commitment-report-same",
                    daemon=True,
                ).start()
            else:
                self.deliver(report)
        return attempted

    def deliver(self, report: CommitmentReport, assoc: Association | None = None) -> None:
        """One delivery attempt of a claimed *report*: on *assoc* (the
        requesting association) if given and still open, else, or if that
        fails, on a new association to the requester.  Marks the report
        delivered, or failed with its next attempt (or none)."""
        errors: list[str] = []
        if assoc is not None and assoc.is_established:
            error = self._send(assoc, report, timeout=SAME_ASSOCIATION_TIMEOUT)
            stats_of(assoc).record("N-EVENT-REPORT", "failure" if error else "success")
            if error is None:
                self._delivered(report, "same")
                return
            errors.append(f"same association: {error}")
        peer = peer_of(self.config, report.requester_ae)
        if peer is None:
            errors.append(
                f"AE '{report.requester_ae}' is not in dimse.peers: no address for a new "
                "association"
            )
            self._failed(report, errors, give_up=True)
            return
        error = self._send_new(peer, report)
        if error is None:
            self._delivered(report, "new")
            return
        errors.append(f"new association to {peer.ae_title}@{peer.host}:{peer.port}: {error}")
        self._failed(report, errors, give_up=False)

    def _deliver_guarded(self, report: CommitmentReport, assoc: Association) -> None:
        try:
            self.deliver(report, assoc)
        except Exception:
            # the claim runs out and another attempt is made then
            LOGGER.exception(
                "storage commitment result %s: delivery failed", report.transaction_uid
            )

    # ------------------------------------------------------------ helpers

    def _send_new(self, peer: PeerConfig, report: CommitmentReport) -> str | None:
        """Open an association to *peer* proposing the SCP role for the
        Storage Commitment Push Model (PS3.4 J.3.3.1.3 Note), send, release."""
        dimse = self.config.dimse
        ae = AE(ae_title=dimse.ae_title)
        ae.connection_timeout = dimse.acse_timeout  # TCP connect, else the OS's
        ae.acse_timeout = dimse.acse_timeout
        ae.dimse_timeout = dimse.dimse_timeout
        ae.network_timeout = dimse.network_timeout
        ae.add_requested_context(StorageCommitmentPushModel, REPORT_TRANSFER_SYNTAXES)
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        try:
            # a tls = true peer: DICOM TLS, its certificate verified
            tls = access.tls_args(self.config, peer) if peer.tls else None
            assoc = ae.associate(
                peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role], tls_args=tls
            )
        except Exception as exc:  # noqa: BLE001 - e.g. an unresolvable host
            return f"cannot associate ({exc.__class__.__name__})"
        if not assoc.is_established:
            if assoc.is_rejected:
                return "association rejected"
            # pynetdicom reports a refused connection as an abort too
            return "no association (connection refused or timed out, or aborted)"
        try:
            return self._send(assoc, report)
        finally:
            if assoc.is_established:
                assoc.release()

    def _send(
        self, assoc: Association, report: CommitmentReport, timeout: float | None = None
    ) -> str | None:
        """Send the report on *assoc*; None on Success, else why not.  With
        *timeout*, the response is awaited at most that long (pynetdicom
        aborts the association when it does not come)."""
        dataset = event_information(report, self.config.dimse.ae_title)
        message_id = next(self._message_ids) % 65536 or 1
        configured = assoc.dimse_timeout
        if timeout is not None:
            assoc.dimse_timeout = timeout if configured is None else min(timeout, configured)
        try:
            status, _reply = assoc.send_n_event_report(
                dataset,
                report.result.event_type,
                StorageCommitmentPushModel,
                StorageCommitmentPushModelInstance,
                msg_id=message_id,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. released meanwhile, no context
            return f"not sent ({exc.__class__.__name__})"
        finally:
            assoc.dimse_timeout = configured
        code = status.get("Status") if status else None
        if code is None:
            return "no response (timeout, abort or invalid response)"
        if code != Status.SUCCESS:
            return f"the peer answered status 0x{int(code):04X}"
        return None

    def _delivered(self, report: CommitmentReport, via: str) -> None:
        result = report.result
        if self.outbox.mark_delivered(report, via):
            LOGGER.info(
                "storage commitment result %s sent to AE '%s' on the %s association "
                "(event type %d: %d committed, %d failed; attempt %d)",
                report.transaction_uid,
                report.requester_ae,
                via,
                result.event_type,
                len(result.committed),
                len(result.failed),
                report.attempts,
            )
        else:
            LOGGER.warning(
                "storage commitment result %s was sent but its claim had expired; "
                "the requester may receive it twice",
                report.transaction_uid,
            )

    def _failed(self, report: CommitmentReport, errors: list[str], *, give_up: bool) -> None:
        now = dt.datetime.now(dt.UTC)
        error = "; ".join(errors)
        retry_at = (
            None if give_up else self.schedule.next_attempt(report.attempts, report.created_at, now)
        )
        if not self.outbox.mark_failed(report, error, retry_at, now):
            LOGGER.warning(
                "storage commitment result %s: attempt failed after its claim expired (%s)",
                report.transaction_uid,
                error,
            )
        elif retry_at is None:
            LOGGER.error(
                "storage commitment result %s for AE '%s' NOT delivered, given up after "
                "%d attempt(s): %s",
                report.transaction_uid,
                report.requester_ae,
                report.attempts,
                error,
            )
        else:
            LOGGER.warning(
                "storage commitment result %s for AE '%s' not delivered (attempt %d: %s); "
                "next attempt at %s",
                report.transaction_uid,
                report.requester_ae,
                report.attempts,
                error,
                retry_at.isoformat(timespec="seconds"),
            )

    def _forget_closed(self) -> None:
        """Drop associations that have ended (their reports, if still due,
        go on a new association)."""
        with self._lock:
            for report_id in [k for k, a in self._open.items() if not a.is_established]:
                del self._open[report_id]
