"""One module per DIMSE service.  Each exposes

``register(setup: ServiceSetup) -> None``

which adds the service's presentation contexts to ``setup.ae``, appends its
event handlers (dependencies bound in) to ``setup.handlers`` and, if it needs
one, a background task to ``setup.tasks``.  :func:`dimse_bridge.ae.build_ae`
finds the modules here, so adding a service touches no other file.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from pynetdicom import AE
from pynetdicom.events import EventHandlerType

from appliance.config import Config
from appliance.services import Services

#: A background task of a service: runs in its own thread while the listener
#: runs, and returns soon after the event it is given is set.
BackgroundTask = Callable[[threading.Event], None]


@dataclasses.dataclass
class ServiceSetup:
    """What a service module registers itself into."""

    ae: AE
    config: Config
    services: Services
    handlers: list[EventHandlerType] = dataclasses.field(default_factory=list)
    tasks: list[tuple[str, BackgroundTask]] = dataclasses.field(default_factory=list)
