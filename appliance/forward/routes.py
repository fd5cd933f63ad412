"""Which ``[[forward]]`` destinations take an instance.

A destination's filters (calling AE titles, modalities, SOP classes) each
match anything when empty; an instance goes to every destination whose
filters all match.  Evaluated at ingest, inside the pipeline, so the outbox
entries are written in the instance's own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from appliance.config import ForwardConfig
from appliance.model import InstanceRecord, Origin


class Routes:
    """The destinations of *destinations* (``config.forward``), as filters."""

    def __init__(self, destinations: Sequence[ForwardConfig]) -> None:
        self._destinations = tuple(destinations)

    def __bool__(self) -> bool:
        return bool(self._destinations)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self._destinations)

    @property
    def deletes_to(self) -> tuple[str, ...]:
        """The destinations that are sent deletions too."""
        return tuple(d.name for d in self._destinations if d.forward_deletes)

    def destinations(self, record: InstanceRecord, origin: Origin) -> tuple[str, ...]:
        """The names of the destinations that take *record*, sent by *origin*."""
        return tuple(
            d.name
            for d in self._destinations
            if matches(d, record.series.modality, record.instance.sop_class_uid, origin.calling_ae)
        )


def matches(
    destination: ForwardConfig, modality: str, sop_class_uid: str, calling_ae: str | None
) -> bool:
    """True if *destination*'s filters take an instance of *modality* and
    *sop_class_uid* sent by *calling_ae* (None: not known, e.g. on a replay
    from the index, which does not keep the sender: the filter is left out)."""
    if destination.modalities and modality not in destination.modalities:
        return False
    if destination.sop_classes and sop_class_uid not in destination.sop_classes:
        return False
    if calling_ae is not None and destination.calling_ae_titles:
        # AE titles compare without their insignificant spaces (PS3.5 6.2)
        titles = {title.strip() for title in destination.calling_ae_titles}
        if calling_ae.strip() not in titles:
            return False
    return True
