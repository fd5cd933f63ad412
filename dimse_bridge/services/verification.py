"""Verification Service Class (PS3.4 Annex A): C-ECHO."""

from __future__ import annotations

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.status import Status
from dimse_bridge.services import ServiceSetup
from dimse_bridge.stats import stats_of


def register(setup: ServiceSetup) -> None:
    """Support Verification with every transfer syntax pynetdicom offers."""
    setup.ae.add_supported_context(Verification)
    setup.handlers.append((evt.EVT_C_ECHO, handle_echo))


def handle_echo(event: Event) -> int:
    """Answer a C-ECHO request (PS3.4 A.4).

    Returns
    -------
    int
        The response Status; this handler sends:

        - ``0x0000`` :attr:`~appliance.status.Status.SUCCESS`.
    """
    stats_of(event.assoc).record("C-ECHO", "success")
    return int(Status.SUCCESS)
