"""The Application Entity: who may associate, which services it offers, and
the listener loop run by the ``dimse`` child of ``dicom-appliance serve``."""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import pkgutil
import signal
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pynetdicom import AE, _config
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from appliance import dicom_tls
from appliance.activity import AssociationLog
from appliance.config import Config
from appliance.services import Services
from dimse_bridge import access, handlers, partitions, reactor
from dimse_bridge import services as dimse_services
from dimse_bridge.services import ServiceSetup

LOGGER = logging.getLogger(__name__)

#: Seconds open associations get to finish after SIGTERM before they are
#: aborted (below the supervisor's stop timeout).
DRAIN_TIMEOUT = 5.0
#: Seconds between checks for a stop request.
POLL_INTERVAL = 0.2
#: Seconds each background task gets to return once told to stop.
TASK_STOP_TIMEOUT = 10.0


def build_ae(config: Config, services: Services) -> ServiceSetup:
    """The acceptor AE for *config*, with its event handlers and background
    tasks (a :class:`~dimse_bridge.services.ServiceSetup`).

    - Its title is ``dimse.ae_title``; with ``dimse.require_called_ae_title``
      an association whose Called AE Title is another one is rejected
      (A-ASSOCIATE-RJ, rejected-permanent, service-user, reason 7
      "called-AE-title-not-recognized", PS3.8 9.3.4).
    - With ``dimse.require_known_peers`` only the AE titles of
      ``dimse.peers`` may associate (others: reason 3
      "calling-AE-title-not-recognized"); a peer only from its
      ``addresses`` (or its host's, with ``dimse.check_peer_address``), a
      ``tls = true`` peer only over TLS, and each caller may use only its
      ``services`` (see :mod:`dimse_bridge.access`).
    - Limits: ``max_associations``, ``max_pdu``, and the ACSE, DIMSE and
      network timeouts.
    - Each module of :mod:`dimse_bridge.services` adds its presentation
      contexts and handlers.
    - Each association (released, aborted or rejected) is added to the
      association log (:class:`appliance.activity.AssociationLog`), whose
      writer is a background task.
    """
    quiet_pynetdicom()
    reactor.install()  # pynetdicom's loops wait for work instead of polling
    dimse = config.dimse
    ae = AE(ae_title=dimse.ae_title)
    # with partitions, the listener answers to more titles than its own:
    # the Called AE Title is checked by dimse_bridge.partitions instead
    several_titles = len(partitions.accepted_titles(config)) > 1
    ae.require_called_aet = dimse.require_called_ae_title and not several_titles
    if dimse.require_known_peers:
        # never empty: load_config refuses require_known_peers without peers
        ae.require_calling_aet = [peer.ae_title.strip() for peer in dimse.peers]
    ae.maximum_associations = dimse.max_associations
    ae.maximum_pdu_size = dimse.max_pdu
    ae.acse_timeout = dimse.acse_timeout
    ae.dimse_timeout = dimse.dimse_timeout
    ae.network_timeout = dimse.network_timeout
    setup = ServiceSetup(ae, config, services)
    for module in service_modules():
        module.register(setup)
    # each request handler works in its association's data partition
    setup.handlers[:] = partitions.bind_handlers(setup.handlers, config, services.partitions)
    if several_titles and dimse.require_called_ae_title:
        setup.handlers.extend(partitions.called_title_handlers(config))
    # who may use which service: one wrapper around every DIMSE request
    # handler, and the address/TLS check before negotiation
    policy = access.AccessPolicy(config)
    setup.handlers[:] = access.guard_handlers(setup.handlers, config, policy)
    setup.handlers.extend(access.association_handlers(policy))
    # each association's row in the association log, written off its thread
    log = AssociationLog(services.engine)
    setup.handlers.extend(handlers.association_handlers(config, log))
    setup.tasks.append(("association-log", log.run))
    return setup


def quiet_pynetdicom() -> None:
    """Keep pynetdicom from formatting log lines nobody sees.

    Its logger is held at WARNING (:data:`appliance.logs.PHI_LOGGERS`: it
    would print identifiers, patient names among them), yet by default it
    binds debug handlers to every PDU and DIMSE message of an association
    and renders every C-FIND/C-GET/C-MOVE identifier as text before asking
    the logger whether to print it: about a tenth of the CPU of a C-FIND
    with many matches, and work on every C-STORE.  Process-wide settings of
    pynetdicom (``_config``), set before any association.
    """
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def service_modules() -> list[Any]:
    """The modules of :mod:`dimse_bridge.services`, by name."""
    package = dimse_services
    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)
    ]


class SharedSyntaxContexts(list[PresentationContext]):
    """The acceptor's presentation contexts, as the server holds them.

    pynetdicom gives each accepted association a ``deepcopy`` of the
    server's contexts (it writes the negotiation's outcome into its own
    copies).  With every storage SOP class and transfer syntax that is some
    thousands of UIDs, and a ``UID`` (a ``str`` subclass) is deep-copied
    through ``__reduce_ex__``: most of the work of accepting an association.
    UIDs are immutable, so this list's deep copy copies the contexts but
    shares their UIDs (entered in the copy's memo as their own copies).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedSyntaxContexts:
        for context in self:
            for uid in (context.abstract_syntax, *context.transfer_syntax):
                memo[id(uid)] = uid
        return SharedSyntaxContexts(copy.deepcopy(context, memo) for context in self)


class SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's association server on a listening socket it is given
    (bound and listening already, shared by the DIMSE worker processes)
    instead of one it binds itself.

    Every worker waits on the same socket; the kernel wakes them on a new
    connection and the first to ``accept()`` serves it.  The socket is
    non-blocking, so a worker that lost the race gets EAGAIN, which
    :mod:`socketserver` ignores, rather than blocking in ``accept()``.
    Closing the server closes only this process's descriptor: a
    ``shutdown()`` of a listening socket would stop it for every worker.
    """

    def __init__(
        self,
        *args: Any,
        listen_socket: socket.socket,
        handshake_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._listen_socket = listen_socket
        self.handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; with TLS, wrap it without the handshake.

        pynetdicom's own ``get_request`` runs the TLS handshake here, in the
        one thread that accepts every connection, with no timeout: a client
        that connects and sends nothing would stop every other from being
        accepted.  The handshake runs in the connection's own thread instead
        (:meth:`process_request_thread`), bounded by ``handshake_timeout``.
        """
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, client_address: Any) -> bool:
        """The TLS handshake of an accepted connection; False (logged) if it
        fails: a plain-TCP client, an old protocol version, no common cipher
        suite, no or an untrusted client certificate, or silence."""
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            LOGGER.warning(
                "TLS connection from %s refused: handshake failed (%s)",
                _address_text(client_address),
                reason,
            )
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)
        return True

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the one TCPServer made; never bound
        self.socket = self._listen_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # the supervisor called listen()

    def server_close(self) -> None:
        if self.socket is not None:
            self.socket.close()

    def shutdown(self) -> None:
        # not pynetdicom's: this server is not in the AE's list of servers
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def run_listener(
    config: Config,
    services: Services,
    stop: threading.Event | None = None,
    on_listening: Callable[[], None] | None = None,
    listen_socket: socket.socket | None = None,
    tls_socket: socket.socket | None = None,
    on_tls_listening: Callable[[], None] | None = None,
) -> None:
    """Listen on ``dimse.host:dimse.port`` (unless ``dimse.tls_only``) and,
    with ``dimse.tls_port``, for DICOM TLS on ``dimse.host:dimse.tls_port``,
    until asked to stop.

    Parameters
    ----------
    config
        The appliance configuration.
    services
        The core's services.
    stop
        Stop when this is set.  When None, SIGTERM and SIGINT stop the
        listener (this must then run in the main thread).
    on_listening
        Called once every listener is up (to tell readiness).
    listen_socket, tls_socket
        Sockets already bound to those addresses and listening, shared with
        other worker processes (see :mod:`appliance.server`); None to bind
        them here.
    on_tls_listening
        Called once the TLS listener is up.

    Raises
    ------
    OSError
        if an address cannot be bound (e.g. the port is in use).
    """
    setup = build_ae(config, services)
    ae = setup.ae
    dimse = config.dimse
    stop = threading.Event() if stop is None else stop
    received: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    address = (dimse.host, dimse.port)
    contexts = SharedSyntaxContexts(ae.supported_contexts)
    tasks_stop = threading.Event()
    tasks: list[threading.Thread] = []
    servers: list[Any] = []
    try:
        if not dimse.tls_only and listen_socket is None:
            server = ae.start_server(
                address, block=False, evt_handlers=setup.handlers, contexts=contexts
            )
            assert server is not None  # block=False returns the server
            servers.append(server)
        elif not dimse.tls_only and listen_socket is not None:
            servers.append(_serve_shared(ae, setup, contexts, address, listen_socket))
        if not dimse.tls_only:
            LOGGER.info(
                "listening for DICOM associations as '%s' on %s:%d", dimse.ae_title, *address
            )
        if dimse.tls_port:
            tls_address = (dimse.host, dimse.tls_port)
            if tls_socket is None:
                family = socket.AF_INET6 if ":" in dimse.host else socket.AF_INET
                tls_socket = socket.create_server(tls_address, family=family, backlog=128)
            servers.append(
                _serve_shared(
                    ae,
                    setup,
                    contexts,
                    tls_address,
                    tls_socket,
                    ssl_context=dicom_tls.server_context(dimse),
                    handshake_timeout=dimse.acse_timeout,
                )
            )
            LOGGER.info(
                "listening for DICOM TLS associations as '%s' on %s:%d (client certificate %s)",
                dimse.ae_title,
                *tls_address,
                "required" if dimse.tls_require_client_cert else "optional",
            )
            if on_tls_listening is not None:
                on_tls_listening()
        for name, task in setup.tasks:
            thread = threading.Thread(target=task, args=(tasks_stop,), name=name, daemon=True)
            thread.start()
            tasks.append(thread)
        if on_listening is not None:
            on_listening()
        while not received and not stop.is_set():
            time.sleep(POLL_INTERVAL)
        LOGGER.info("stopping the DIMSE listener")
        for server in servers:
            server.shutdown()
        _drain(ae)
        ae.shutdown()
    finally:
        tasks_stop.set()
        for thread in tasks:
            thread.join(timeout=TASK_STOP_TIMEOUT)
            if thread.is_alive():
                LOGGER.warning("background task %s did not stop in time", thread.name)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_shared(
    ae: AE,
    setup: ServiceSetup,
    contexts: SharedSyntaxContexts,
    address: tuple[str, int],
    listen_socket: socket.socket,
    **options: Any,
) -> SharedSocketServer:
    """A :class:`SharedSocketServer` on *listen_socket*, serving in a thread
    of its own."""
    server = ae.make_server(
        address,
        evt_handlers=setup.handlers,
        contexts=contexts,
        server_class=SharedSocketServer,
        listen_socket=listen_socket,
        **options,
    )
    assert isinstance(server, SharedSocketServer)
    threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
    return server


def _address_text(address: Any) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)


def _established(ae: AE) -> int:
    return sum(1 for assoc in ae.active_associations if assoc.is_established)


def _drain(ae: AE, timeout: float = DRAIN_TIMEOUT) -> None:
    """Give established associations *timeout* seconds to finish.

    Connections that never sent an A-ASSOCIATE-RQ (a bare TCP connect, which
    pynetdicom keeps for ``acse_timeout``) are not waited for.
    """
    deadline = time.monotonic() + timeout
    while _established(ae) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _established(ae):
        LOGGER.warning(
            "aborting %d association(s) still open after %.0f s", _established(ae), timeout
        )
