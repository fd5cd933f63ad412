"""Verification Service Class (PS3.4 Annex A): C-ECHO."""

from __future__ import annotations

from pynetdicom import AE, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.config import Config
from appliance.services import Services
from appliance.status import Status
from dimse_bridge.stats import stats_of


def register(ae: AE, config: Config, services: Services) -> list[EventHandlerType]:
    """Support Verification with every transfer syntax pynetdicom offers."""
    ae.add_supported_context(Verification)
    return [(evt.EVT_C_ECHO, handle_echo)]


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
