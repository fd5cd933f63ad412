"""Who may do what over DIMSE: per-peer services, addresses and TLS
(``[[dimse.peers]]`` ``services``, ``addresses``, ``tls``), in the spirit of
Orthanc's per-modality ``AllowEcho``/``AllowFind``/``AllowMove``/
``AllowGet``/``AllowStore``/``AllowStorageCommitment`` and
``DicomCheckModalityHost``.

Two places apply it, both here:

- **Association** (``EVT_REQUESTED``, before negotiation): a known AE title
  calling from an address its peer entry does not allow, or a ``tls = true``
  peer calling on the plain TCP port, is rejected with A-ASSOCIATE-RJ
  (rejected-permanent, service-user, reason 3 "calling-AE-title-not-
  recognized", PS3.8 9.3.4: the title is not recognised *from there*).
  Unknown titles are rejected by pynetdicom itself with
  ``dimse.require_known_peers``; without it they get
  ``dimse.unknown_peer_services``.  The services allowed are then kept on
  the association, looked up once.
- **Each request** (:func:`guard`): the service handlers registered by
  :mod:`dimse_bridge.services` are wrapped so that a service the caller may
  not use is answered with Status 0x0124 "Refused: Not Authorized" (PS3.7
  Annex C.5, a Failure status: the DIMSE-service-user is not authorized to
  invoke the operation) and an Error Comment, without the handler running.

Log lines carry the AE title, the address and the service; never data set
contents.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_context, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance import dicom_tls
from appliance.config import DIMSE_SERVICES, Config, PeerConfig
from appliance.status import Status
from dimse_bridge.stats import stats_of

LOGGER = logging.getLogger(__name__)

#: The attribute of a pynetdicom Association holding the services its
#: caller may use (a frozenset of :data:`appliance.config.DIMSE_SERVICES`).
_ALLOWED = "_appliance_allowed_services"
#: The attribute holding why this module rejected the association.
REFUSAL = "_appliance_refusal"

#: The DIMSE request events and the service name a peer is allowed by.
SERVICE_EVENTS: dict[Any, str] = {
    evt.EVT_C_ECHO: "echo",
    evt.EVT_C_STORE: "store",
    evt.EVT_C_FIND: "find",
    evt.EVT_C_MOVE: "move",
    evt.EVT_C_GET: "get",
    evt.EVT_N_ACTION: "commitment",
}
#: The DIMSE command of each service, for log lines and counts.
_COMMANDS = {
    "echo": "C-ECHO",
    "store": "C-STORE",
    "find": "C-FIND",
    "move": "C-MOVE",
    "get": "C-GET",
    "commitment": "N-ACTION",
}
#: Error Comment (0000,0902) of a refusal (LO, at most 64 characters).
_COMMENT = "the calling AE title is not authorized for {}"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class PeerAccess:
    """What one ``[[dimse.peers]]`` entry allows."""

    services: frozenset[str]
    #: the networks it may call from; empty = anywhere (or its host's
    #: addresses, if ``check_host``)
    networks: tuple[Network, ...]
    check_host: bool
    host: str
    tls: bool
    #: names one of which its client certificate must carry (empty: any)
    names: frozenset[str] = frozenset()

    def allows_address(self, address: str) -> bool:
        if not (self.networks or self.check_host):
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 caller of a dual-stack listener ("::")
        if self.networks:
            return any(ip in network for network in self.networks)
        return str(ip) in host_addresses(self.host)


@functools.lru_cache(maxsize=256)
def host_addresses(host: str) -> frozenset[str]:
    """The IP addresses *host* (a configured peer's) stands for, resolved
    once per process."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome for one association: the services allowed, or why it is
    rejected."""

    services: frozenset[str] = frozenset()
    refusal: str = ""


class AccessPolicy:
    """The access rules of a configuration, looked up by Calling AE Title."""

    def __init__(self, config: Config) -> None:
        dimse = config.dimse
        self.require_known = dimse.require_known_peers
        self.unknown_services = frozenset(dimse.unknown_peer_services)
        self.peers: dict[str, list[PeerAccess]] = {}
        #: some peer's client certificate names are checked
        self.names_checked = any(peer.tls_names for peer in dimse.peers)
        for peer in dimse.peers:
            self.peers.setdefault(peer.ae_title.strip(), []).append(
                PeerAccess(
                    services=frozenset(peer.services),
                    networks=tuple(ipaddress.ip_network(a, strict=False) for a in peer.addresses),
                    check_host=dimse.check_peer_address,
                    host=peer.host,
                    tls=peer.tls,
                    names=frozenset(peer.tls_names),
                )
            )

    def decide(
        self,
        calling_ae: str,
        address: str,
        tls: bool,
        certificate_names: frozenset[str] = frozenset(),
    ) -> Decision:
        """The services *calling_ae* may use from *address* (on the TLS
        listener if *tls*, with a client certificate carrying
        *certificate_names*), or why it may not associate.

        A title listed more than once (e.g. the same AE on two hosts) gets
        the first entry whose addresses allow *address*.
        """
        entries = self.peers.get(calling_ae.strip())
        if entries is None:
            if self.require_known:  # pynetdicom rejected it already (reason 3)
                return Decision(refusal="not a configured peer")
            return Decision(services=self.unknown_services)
        entry = next((e for e in entries if e.allows_address(address)), None)
        if entry is None:
            return Decision(refusal=f"not allowed from {address}")
        if entry.tls and not tls:
            return Decision(refusal="a tls = true peer must use the DICOM TLS port")
        if entry.names and not entry.names & certificate_names:
            shown = ", ".join(sorted(certificate_names)) or "no certificate"
            return Decision(refusal=f"its client certificate ({shown}) names none of tls_names")
        return Decision(services=entry.services)


def association_handlers(policy: AccessPolicy) -> list[EventHandlerType]:
    """The association-level check, bound to *policy*."""
    return [(evt.EVT_REQUESTED, on_requested, [policy])]


def on_requested(event: Event, policy: AccessPolicy) -> None:
    """``EVT_REQUESTED`` (an A-ASSOCIATE-RQ arrived, nothing negotiated yet):
    reject it if the caller may not associate from where it calls, else
    keep the services it may use on the association.

    pynetdicom negotiates only if the association is neither rejected nor
    aborted after this handler.  The rejection goes out as A-ASSOCIATE-RJ
    rejected-permanent (1), service-user (1), reason 3 (PS3.8 9.3.4), and
    ``EVT_REJECTED`` is triggered as for pynetdicom's own rejections (its
    handler logs :data:`REFUSAL` as the reason).
    """
    assoc = event.assoc
    if assoc.is_rejected:
        return  # another check rejected it already (dimse_bridge.partitions)
    primitive = assoc.requestor.primitive
    calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
    try:
        names = certificate_names(assoc) if policy.names_checked else frozenset()
        decision = policy.decide(calling, str(assoc.requestor.address), over_tls(assoc), names)
    except Exception as exc:  # noqa: BLE001 - pynetdicom would log it and negotiate
        decision = Decision(refusal=f"the access check failed ({exc.__class__.__name__})")
    if not decision.refusal:
        setattr(assoc, _ALLOWED, decision.services)
        return
    if policy.require_known and calling not in policy.peers:
        return  # pynetdicom's own rejection follows (reason 3)
    setattr(assoc, REFUSAL, decision.refusal)
    assoc.requestor.ae_title = calling
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def over_tls(assoc: Any) -> bool:
    """True if *assoc* runs over TLS (came in on the TLS listener)."""
    transport = assoc.dul.socket
    return isinstance(getattr(transport, "socket", None), ssl.SSLSocket)


def certificate_names(assoc: Any) -> frozenset[str]:
    """The names of the client certificate of *assoc* (over TLS): its
    subject's Common Name and its DNS and IP subject alternative names."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return frozenset()
    certificate: dict[str, Any] = dict(sock.getpeercert() or {})
    names = {
        str(value)
        for rdn in certificate.get("subject", ())
        for key, value in rdn
        if key == "commonName"
    }
    names.update(
        str(value)
        for kind, value in certificate.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    )
    return frozenset(names)


def allowed(assoc: Any, service: str) -> bool:
    """True if the caller of *assoc* may use *service*; False for an
    association :func:`on_requested` did not pass (fails closed)."""
    services: frozenset[str] = getattr(assoc, _ALLOWED, frozenset())
    return service in services


def _refused(event: Event, service: str) -> Dataset:
    assoc = event.assoc
    requestor = assoc.requestor
    LOGGER.warning(
        "%s from AE '%s' at %s:%s refused (0x%04X Not Authorized): '%s' is not among "
        "the services this AE may use",
        _COMMANDS[service],
        str(requestor.ae_title).strip(),
        requestor.address,
        requestor.port,
        int(Status.NOT_AUTHORIZED),
        service,
    )
    stats_of(assoc).record(_COMMANDS[service], "refused")
    status = Dataset()
    status.Status = int(Status.NOT_AUTHORIZED)
    status.ErrorComment = _COMMENT.format(_COMMANDS[service])
    return status


def guard(
    service: str, handler: Callable[..., Any], config: Config, policy: AccessPolicy
) -> Callable[..., Any]:
    """*handler* (bound to the DIMSE request event of *service*) wrapped so
    that a caller not allowed *service* is refused with 0x0124 before it
    runs.

    - C-ECHO, C-STORE, N-ACTION: the status is returned (N-ACTION with no
      Action Reply).  A refused C-STORE's data set has been received (DIMSE
      answers only after the whole message) and is discarded by pynetdicom.
    - C-FIND: the generator yields the status.
    - C-GET: one sub-operation is announced and fails with the status
      (pynetdicom 3 sends a final response only after a count).
    - C-MOVE: pynetdicom 3 opens the association to the Move Destination
      before any final response; for a known destination it is opened with
      only the Verification context (no C-STORE) and the final response
      carries 0x0124; an unknown destination gets 0xA801, as it would
      anyway.

    C-MOVE is also where a ``tls = true`` Move Destination gets TLS: the
    destination the handler yields is given ``tls_args`` (see
    :func:`move_destination_tls`).
    """
    if service == "find":

        def find(event: Event, *args: Any) -> Iterator[Any]:
            if not allowed(event.assoc, service):
                yield _refused(event, service), None
                return
            yield from handler(event, *args)

        return find
    if service == "get":

        def get(event: Event, *args: Any) -> Iterator[Any]:
            if not allowed(event.assoc, service):
                yield 1
                yield _refused(event, service), None
                return
            yield from handler(event, *args)

        return get
    if service == "move":

        def move(event: Event, *args: Any) -> Iterator[Any]:
            if not allowed(event.assoc, service):
                yield from _refused_move(event, config)
                return
            yield from move_destination_tls(event, handler(event, *args), config)

        return move
    if service == "commitment":

        def n_action(event: Event, *args: Any) -> Any:
            if not allowed(event.assoc, service):
                return _refused(event, service), None
            return handler(event, *args)

        return n_action

    def plain(event: Event, *args: Any) -> Any:
        if not allowed(event.assoc, service):
            return _refused(event, service)
        return handler(event, *args)

    return plain


def _refused_move(event: Event, config: Config) -> Iterator[Any]:
    status = _refused(event, "move")
    peer = _peer(config, str(event.move_destination or ""))
    if peer is None:
        yield None, None
        return
    options: dict[str, Any] = {
        "ae_title": peer.ae_title.strip(),
        "contexts": [build_context(Verification)],
    }
    if peer.tls:
        options["tls_args"] = tls_args(config, peer)
    yield peer.host, peer.port, options
    yield 1
    yield status, None


def _peer(config: Config, ae_title: str) -> PeerConfig | None:
    title = ae_title.strip()
    return next((p for p in config.dimse.peers if p.ae_title.strip() == title), None)


def tls_args(config: Config, peer: PeerConfig) -> tuple[ssl.SSLContext, str]:
    """pynetdicom's ``tls_args`` for an association to *peer*: the client
    context (BCP 195, our certificate, the peer's verified against
    ``dimse.tls_ca_file``) and the name its certificate must carry."""
    return dicom_tls.client_context(config.dimse), peer.host


def move_destination_tls(event: Event, responses: Iterator[Any], config: Config) -> Iterator[Any]:
    """The C-MOVE handler's *responses*, its first (the destination:
    ``(host, port[, options])``) given ``tls_args`` when the Move
    Destination is a ``tls = true`` peer; everything else passed through."""
    first = next(responses, None)
    if first is None:
        return
    peer = _peer(config, str(event.move_destination or ""))
    if peer is not None and peer.tls and first[0] is not None:
        options = dict(first[2]) if len(first) >= 3 and first[2] else {}
        options["tls_args"] = tls_args(config, peer)
        first = (first[0], first[1], options)
    try:
        yield first
        yield from responses
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            close()


def guard_handlers(
    handlers: list[EventHandlerType], config: Config, policy: AccessPolicy
) -> list[EventHandlerType]:
    """*handlers* with every DIMSE request handler wrapped by :func:`guard`."""
    guarded: list[EventHandlerType] = []
    for entry in handlers:
        service = SERVICE_EVENTS.get(entry[0])
        if service is None:
            guarded.append(entry)
            continue
        wrapped = guard(service, entry[1], config, policy)
        guarded.append((entry[0], wrapped, *entry[2:]))
    return guarded


__all__ = [
    "DIMSE_SERVICES",
    "AccessPolicy",
    "association_handlers",
    "guard_handlers",
    "tls_args",
]
