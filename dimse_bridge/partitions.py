"""Data partitions on the DIMSE side (issue 11; :mod:`appliance.partitions`).

With ``[partitions] enabled``, each association works in one data
partition, chosen when it is requested:

1. the ``partition`` of the ``[[dimse.peers]]`` entry of its Calling AE
   Title, if set (a modality that must always land in one department);
2. else the partition its Called AE Title names in
   ``partitions.ae_titles`` (``"CARDIO_EDGE=cardiology"``): one appliance
   answers to one AE title per department;
3. else the default partition, ``Microsoft.Default``.

The listener then answers to ``dimse.ae_title`` and to every title of
``partitions.ae_titles``; with ``dimse.require_called_ae_title`` an
association calling another title is rejected (A-ASSOCIATE-RJ
rejected-permanent, service-user, reason 7, PS3.8 9.3.4), as pynetdicom
does for one title.

Every DIMSE request handler is wrapped (:func:`bind_handlers`) so that the
core's services it was given are bound to the association's partition:
C-STORE writes into it (creating it: the first write into a partition
creates it), C-FIND matches in it, C-MOVE and C-GET send from it, and a
Storage Commitment request is assessed against it.  A partition nobody has
written into yet has no key: reads in it find nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event, EventHandlerType

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.index.schema import DEFAULT_PARTITION_KEY
from appliance.partitions import DEFAULT_NAME, NO_PARTITION_KEY, Partitions
from appliance.services import Services
from dimse_bridge.access import REFUSAL

#: The association's attribute holding its partition's name, once known.
_NAME = "_appliance_partition_name"
#: The association's attribute holding its partition's key, once known.
_KEY = "_appliance_partition_key"
#: ... and the key its request being handled works in
#: (:data:`NO_PARTITION_KEY` while the partition does not exist).
_REQUEST_KEY = "_appliance_request_partition_key"

#: The request events whose handlers work in the association's partition.
_GENERATORS = frozenset({evt.EVT_C_FIND, evt.EVT_C_GET, evt.EVT_C_MOVE})
_PLAIN = frozenset({evt.EVT_C_STORE, evt.EVT_N_ACTION})


def partition_name(config: Config, calling_ae: str, called_ae: str) -> str:
    """The partition an association from *calling_ae* to *called_ae* works
    in (the rules of the module's text)."""
    calling = calling_ae.strip()
    for peer in config.dimse.peers:
        if peer.partition and peer.ae_title.strip() == calling:
            return peer.partition
    found = config.partitions.partition_of(called_ae)
    return found if found is not None else DEFAULT_NAME


def _titles(assoc: Any) -> tuple[str, str]:
    primitive = assoc.requestor.primitive
    if primitive is None:
        return str(assoc.requestor.ae_title), str(assoc.acceptor.ae_title)
    return str(primitive.calling_ae_title), str(primitive.called_ae_title)


def association_key(assoc: Any, config: Config, partitions: Partitions, *, create: bool) -> int:
    """The key of the partition of *assoc*; with *create* the partition is
    created if it does not exist yet, else :data:`NO_PARTITION_KEY` stands
    for it (nothing is stored there)."""
    if not config.partitions.enabled:
        return DEFAULT_PARTITION_KEY
    known = getattr(assoc, _KEY, None)
    if known is not None:
        return int(known)
    name = partition_name(config, *_titles(assoc))
    setattr(assoc, _NAME, name)
    key = partitions.ensure(name) if create else partitions.key_of(name)
    if key is None:
        return NO_PARTITION_KEY
    setattr(assoc, _KEY, key)
    return key


def partition_of(assoc: Any) -> str:
    """The name of the data partition *assoc* works in, if it is not the
    default one ("" before its first request, or with partitions off)."""
    name = getattr(assoc, _NAME, "")
    return "" if name == DEFAULT_NAME else str(name)


def current_key(assoc: Any) -> int:
    """The partition key the request of *assoc* being handled works in (the
    default partition's when partitions are off)."""
    found = getattr(assoc, _REQUEST_KEY, None)
    return DEFAULT_PARTITION_KEY if found is None else int(found)


def _bound(args: tuple[Any, ...], key: int) -> list[Any]:
    return [a.in_partition(key) if isinstance(a, Services) else a for a in args]


def bind(
    event_type: Any, handler: Callable[..., Any], config: Config, partitions: Partitions
) -> Callable[..., Any]:
    """*handler* of *event_type* run with its services bound to the
    association's partition."""
    create = event_type == evt.EVT_C_STORE

    if event_type in _GENERATORS:

        def generator(event: Event, *args: Any) -> Iterator[Any]:
            try:
                key = association_key(event.assoc, config, partitions, create=False)
            except ApplianceError:
                key = NO_PARTITION_KEY  # the handler meets the index's failure itself
            setattr(event.assoc, _REQUEST_KEY, key)
            yield from handler(event, *_bound(args, key))

        return generator

    def plain(event: Event, *args: Any) -> Any:
        try:
            key = association_key(event.assoc, config, partitions, create=create)
        except ApplianceError as exc:
            if not create:
                key = NO_PARTITION_KEY
            else:
                # never into another partition: the instance is not stored
                status = Dataset()
                status.Status = int(exc.status)
                status.ErrorComment = "the data partition could not be created"
                return status
        setattr(event.assoc, _REQUEST_KEY, key)
        return handler(event, *_bound(args, key))

    return plain


def bind_handlers(
    handlers: list[EventHandlerType], config: Config, partitions: Partitions
) -> list[EventHandlerType]:
    """*handlers* with each DIMSE request handler bound by :func:`bind`
    (unchanged while partitions are off)."""
    if not config.partitions.enabled:
        return handlers
    bound: list[EventHandlerType] = []
    for entry in handlers:
        if entry[0] in _GENERATORS or entry[0] in _PLAIN:
            bound.append((entry[0], bind(entry[0], entry[1], config, partitions), *entry[2:]))
        else:
            bound.append(entry)
    return bound


def accepted_titles(config: Config) -> frozenset[str]:
    """The Called AE Titles the listener answers to."""
    titles = {config.dimse.ae_title.strip()}
    if config.partitions.enabled:
        titles.update(item.partition("=")[0].strip() for item in config.partitions.ae_titles)
    return frozenset(titles)


def called_title_handlers(config: Config) -> list[EventHandlerType]:
    """The check of the Called AE Title when the listener answers to more
    than one (pynetdicom's own check knows one title: it is turned off)."""
    return [(evt.EVT_REQUESTED, on_requested, [accepted_titles(config)])]


def on_requested(event: Event, titles: frozenset[str]) -> None:
    """``EVT_REQUESTED``: reject an association whose Called AE Title is
    none of *titles* (rejected-permanent, service-user, reason 7
    "called-AE-title-not-recognized", PS3.8 9.3.4)."""
    assoc = event.assoc
    _, called = _titles(assoc)
    if called.strip() in titles:
        return
    setattr(assoc, REFUSAL, f"called AE title {called.strip()!r} is not one of ours")
    assoc.acse.send_reject(0x01, 0x01, 0x07)
    assoc.is_rejected = True
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()
