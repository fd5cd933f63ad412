"""Association-level event handlers: the socket options of an accepted
connection, the one log line per association (who may associate from
where: :mod:`dimse_bridge.access`) and its row in the association log
(:class:`appliance.activity.AssociationLog`: queued here, written by a
thread of its own, so an association never waits for the database).
Plain functions; dependencies are bound in through ``(event, handler,
[args])`` entries.

Log lines name AE titles, addresses and counts only, never data set contents.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import uuid
from typing import Any

from pynetdicom import evt
from pynetdicom.events import Event, EventHandlerType

from appliance import metrics
from appliance.activity import AssociationLog, AssociationRecord
from appliance.config import Config
from appliance.logs import CORRELATION_ID
from dimse_bridge import audit
from dimse_bridge.access import REFUSAL, over_tls
from dimse_bridge.stats import stats_of

#: The attribute of a pynetdicom Association holding its correlation id.
_CORRELATION = "_appliance_correlation"
#: The attribute holding when its connection was opened (UTC).
_OPENED = "_appliance_opened_at"
#: The attribute set once the association is in the association log.
_LOGGED = "_appliance_logged"
LOGGER = logging.getLogger(__name__)


def association_handlers(
    config: Config, log: AssociationLog | None = None
) -> list[EventHandlerType]:
    """Handlers for association events, bound to *config* and to the
    association *log* (None: associations are not logged)."""
    handlers: list[EventHandlerType] = [
        (evt.EVT_CONN_OPEN, on_connection_open),
        (evt.EVT_ACCEPTED, on_accepted, [config]),
        (evt.EVT_RELEASED, on_released, [log]),
        (evt.EVT_ABORTED, on_aborted, [log]),
        (evt.EVT_REJECTED, on_rejected, [log]),
    ]
    return handlers


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    try:
        return f"{requestor.address}:{requestor.port}"
    except ValueError:  # no address information (not seen on a real socket)
        return "unknown address"


def correlate(assoc: Any) -> str:
    """Give *assoc* its correlation id (made on first use) and put it on
    the log lines of this thread: pynetdicom runs an association's events
    in more than one thread (the connection's, the association's), so each
    handler calls this first."""
    found = getattr(assoc, _CORRELATION, None)
    if found is None:
        found = f"assoc-{uuid.uuid4().hex[:12]}"
        setattr(assoc, _CORRELATION, found)
    CORRELATION_ID.set(found)
    return str(found)


def on_connection_open(event: Event) -> None:
    """``EVT_CONN_OPEN``: switch Nagle's algorithm off on the accepted socket.

    pynetdicom writes each PDU with its own ``send()`` and leaves
    ``TCP_NODELAY`` unset.  A DIMSE message with a data set is two PDUs or
    more (the command, then the data set: a C-FIND pending response, a
    C-GET sub-operation's C-STORE), so the second write waits under Nagle
    for the peer's ACK of the first, which a peer delaying its ACKs sends
    only after its delayed-ACK timer (about 40 ms on Linux).  Measured on
    loopback: a C-FIND with one match took 54 ms with Nagle and 15 ms
    without; dcmtk and Orthanc answer with ``TCP_NODELAY`` set for the same
    reason.  The handler runs in the connection's thread before the
    association's first PDU is read.
    """
    correlate(event.assoc)
    setattr(event.assoc, _OPENED, dt.datetime.now(dt.UTC))
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket (never seen): leave Nagle on
        LOGGER.debug("TCP_NODELAY not set on %s: %s", _peer(event), exc)


def on_accepted(event: Event, config: Config) -> None:
    """``EVT_ACCEPTED``: start the association's statistics and log it (the
    address and TLS checks ran before negotiation: :mod:`dimse_bridge.access`)."""
    assoc = event.assoc
    correlate(assoc)
    stats = stats_of(assoc)
    calling = assoc.requestor.ae_title
    metrics.ASSOCIATIONS.labels(stats.calling_ae, "accepted").inc()
    LOGGER.info(
        "association accepted: calling AE '%s' from %s%s",
        calling,
        _peer(event),
        " over TLS" if over_tls(assoc) else "",
    )


def on_released(event: Event, log: AssociationLog | None = None) -> None:
    """``EVT_RELEASED``: the association's one summary line, its C-STORE
    audit events and its row in the association *log*."""
    correlate(event.assoc)
    audit.flush(event.assoc)
    log_association(event.assoc, log, "released")
    metrics.ASSOCIATIONS.labels(stats_of(event.assoc).calling_ae, "released").inc()
    LOGGER.info(
        "association released: calling AE '%s' from %s: %s",
        event.assoc.requestor.ae_title,
        _peer(event),
        stats_of(event.assoc).summary(),
    )


def on_aborted(event: Event, log: AssociationLog | None = None) -> None:
    """``EVT_ABORTED``: the summary line, as a warning, and the row in the
    association *log*.  A connection closed before any A-ASSOCIATE-RQ is
    only a DEBUG line (and not logged: a port probe is no association)."""
    if event.assoc.requestor.primitive is None:
        LOGGER.debug("connection from %s closed without an association request", _peer(event))
        return
    correlate(event.assoc)
    audit.flush(event.assoc)
    log_association(event.assoc, log, "aborted", _abort_detail(event.assoc))
    metrics.ASSOCIATIONS.labels(stats_of(event.assoc).calling_ae, "aborted").inc()
    LOGGER.warning(
        "association aborted: calling AE '%s' from %s: %s",
        event.assoc.requestor.ae_title,
        _peer(event),
        stats_of(event.assoc).summary(),
    )


def on_rejected(event: Event, log: AssociationLog | None = None) -> None:
    """``EVT_REJECTED``: log the rejection with the likely reason (PS3.8
    9.3.4, A-ASSOCIATE-RJ Reason/Diag.), and its row in the association *log*."""
    assoc = event.assoc
    correlate(assoc)
    calling = assoc.requestor.ae_title
    metrics.ASSOCIATIONS.labels(metrics.ae_label(str(calling)), "rejected").inc()
    primitive = assoc.requestor.primitive
    called = primitive.called_ae_title if primitive is not None else ""
    reason = rejection_reason(assoc)
    LOGGER.warning(
        "association rejected: calling AE '%s', called AE '%s' from %s: %s",
        calling,
        called,
        _peer(event),
        reason,
    )
    log_association(assoc, log, "rejected", reason)


def rejection_reason(assoc: Any) -> str:
    """The likely reason this listener rejected *assoc* (PS3.8 9.3.4)."""
    calling = str(assoc.requestor.ae_title)
    primitive = assoc.requestor.primitive
    called = str(primitive.called_ae_title if primitive is not None else "")
    allowed = [title.strip() for title in assoc.ae.require_calling_aet]
    refusal = getattr(assoc, REFUSAL, "")
    if refusal:
        return f"calling AE title not recognised from there (reason 3): {refusal}"
    if assoc.ae.require_called_aet and called.strip() != assoc.acceptor.ae_title.strip():
        return "called AE title not recognised (reason 7)"
    if allowed and calling.strip() not in allowed:
        return "calling AE title not recognised (reason 3)"
    if len(assoc.ae.active_associations) > assoc.ae.maximum_associations:
        return "too many associations (transient, local limit exceeded)"
    return "see the preceding pynetdicom message"


def _abort_detail(assoc: Any) -> str:
    """Who aborted *assoc*, as far as pynetdicom tells."""
    try:
        if getattr(assoc, "_sent_abort", False):
            return "aborted by this appliance"
        if assoc.acse.is_aborted("a-p-abort"):
            return "A-P-ABORT: the connection was lost or a protocol error"
    except Exception:  # noqa: BLE001 - a detail never fails an association
        return ""
    return "aborted by the peer (A-ABORT)"


def log_association(assoc: Any, log: AssociationLog | None, outcome: str, detail: str = "") -> None:
    """Queue *assoc*'s row for the association *log* (once per association,
    with the counts of :func:`~dimse_bridge.stats.stats_of`); never raises."""
    if log is None or getattr(assoc, _LOGGED, False):
        return
    calling = ""
    try:
        setattr(assoc, _LOGGED, True)
        requestor = assoc.requestor
        primitive = requestor.primitive
        calling = str(
            primitive.calling_ae_title if primitive is not None else requestor.ae_title
        ).strip()
        called = str(primitive.called_ae_title if primitive is not None else "").strip()
        try:
            tls = over_tls(assoc)
        except Exception:  # noqa: BLE001 - the socket may be gone already
            tls = False
        now = dt.datetime.now(dt.UTC)
        log.add(
            AssociationRecord(
                started_at=getattr(assoc, _OPENED, now),
                ended_at=now,
                calling_ae=calling,
                called_ae=called,
                address=str(requestor.address),
                tls=tls,
                outcome=outcome,
                detail=detail,
                **stats_of(assoc).activity_counts(),
            )
        )
    except Exception as exc:  # noqa: BLE001 - the log never fails an association
        LOGGER.warning(
            "association of calling AE '%s' not logged (%s)", calling, exc.__class__.__name__
        )
