"""pynetdicom event handlers: plain functions, their dependencies bound in
through ``evt_handlers`` entries ``(event, handler, [args])``.

Log lines name AE titles and addresses only, never data set contents.
"""

from __future__ import annotations

import logging

from pynetdicom.events import Event

from appliance.status import Status

LOGGER = logging.getLogger(__name__)


def handle_echo(event: Event) -> int:
    """Answer a C-ECHO request (PS3.4 Annex A, Verification Service Class).

    Parameters
    ----------
    event
        The ``EVT_C_ECHO`` event.

    Returns
    -------
    int
        The response Status; this handler sends:

        - ``0x0000`` :attr:`~appliance.status.Status.SUCCESS`.
    """
    return int(Status.SUCCESS)


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    try:
        return f"{requestor.address}:{requestor.port}"
    except ValueError:  # no address information (not seen on a real socket)
        return "unknown address"


def log_accepted(event: Event) -> None:
    """Log an association accepted (``EVT_ACCEPTED``)."""
    LOGGER.info(
        "association accepted: calling AE '%s' from %s",
        event.assoc.requestor.ae_title,
        _peer(event),
    )


def log_released(event: Event) -> None:
    """Log an association released (``EVT_RELEASED``)."""
    LOGGER.info(
        "association released: calling AE '%s' from %s",
        event.assoc.requestor.ae_title,
        _peer(event),
    )


def log_aborted(event: Event) -> None:
    """Log an association aborted by either side (``EVT_ABORTED``).

    A connection closed before any A-ASSOCIATE-RQ (a TCP health probe) is
    only a DEBUG line.
    """
    if event.assoc.requestor.primitive is None:
        LOGGER.debug("connection from %s closed without an association request", _peer(event))
        return
    LOGGER.warning(
        "association aborted: calling AE '%s' from %s",
        event.assoc.requestor.ae_title,
        _peer(event),
    )


def log_rejected(event: Event) -> None:
    """Log an association request rejected (``EVT_REJECTED``), with the
    likely reason (PS3.8 9.3.4, A-ASSOCIATE-RJ Reason/Diag.)."""
    assoc = event.assoc
    calling = assoc.requestor.ae_title
    primitive = assoc.requestor.primitive
    called = primitive.called_ae_title if primitive is not None else ""
    allowed = [title.strip() for title in assoc.ae.require_calling_aet]
    if assoc.ae.require_called_aet and called.strip() != assoc.acceptor.ae_title.strip():
        reason = "called AE title not recognised (reason 7)"
    elif allowed and calling.strip() not in allowed:
        reason = "calling AE title not recognised (reason 3)"
    else:
        reason = "see the preceding pynetdicom message"
    LOGGER.warning(
        "association rejected: calling AE '%s', called AE '%s' from %s: %s",
        calling,
        called,
        _peer(event),
        reason,
    )
