"""The accepted DIMSE connection: its socket has Nagle's algorithm off, so
that the second PDU of a message (a C-FIND pending response's identifier) is
not held back waiting for the peer's delayed ACK; and its copy of the
acceptor's presentation contexts shares their UIDs."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage, Verification

from dimse_bridge import handlers
from dimse_bridge.ae import SharedSyntaxContexts
from tests.conftest import make_config

pytestmark = pytest.mark.integration


def test_accepted_connections_have_tcp_nodelay(tmp_path: Path) -> None:
    """The association handlers set TCP_NODELAY on the accepted socket before
    the association is negotiated."""
    seen: list[int] = []

    def on_accepted(event: Event) -> None:
        sock = event.assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    bound = [*handlers.association_handlers(make_config(tmp_path)), (evt.EVT_ACCEPTED, on_accepted)]
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=bound)
    assert server is not None
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert len(seen) == 1
    assert seen[0] != 0


def test_contexts_copy_shares_uids_not_contexts() -> None:
    """The per-association deep copy gives new context objects (pynetdicom
    writes the negotiation's result into them) holding the same UID objects."""
    ae = AE()
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    contexts = SharedSyntaxContexts(ae.supported_contexts)

    copied = copy.deepcopy(contexts)

    assert isinstance(copied, SharedSyntaxContexts)
    assert [str(c) for c in copied] == [str(c) for c in contexts]
    for original, duplicate in zip(contexts, copied, strict=True):
        assert duplicate is not original
        assert duplicate.abstract_syntax is original.abstract_syntax
        assert duplicate.transfer_syntax is not original.transfer_syntax
        assert all(
            a is b for a, b in zip(duplicate.transfer_syntax, original.transfer_syntax, strict=True)
        )
    copied[0].result = 0x00
    copied[0].transfer_syntax = [ImplicitVRLittleEndian]
    assert contexts[0].result is None
    assert len(contexts[0].transfer_syntax) > 1


def test_listener_negotiates_with_shared_contexts(tmp_path: Path) -> None:
    """Two associations in a row on a server holding SharedSyntaxContexts each
    negotiate their own transfer syntax; the server's contexts stay as they
    were."""
    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    contexts = SharedSyntaxContexts(scp.supported_contexts)
    server = scp.start_server(("127.0.0.1", 0), block=False, contexts=contexts)
    assert server is not None
    try:
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            scu = AE(ae_title="SCU")
            scu.add_requested_context(CTImageStorage, [syntax])
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
            assert assoc.is_established
            assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [syntax]
            assoc.release()
    finally:
        server.shutdown()
    assert server.contexts is contexts
    assert contexts[0].transfer_syntax == [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert contexts[0].result is None


def test_pynetdicom_formats_no_log_lines_for_a_logger_held_at_warning() -> None:
    """pynetdicom's logger is held at WARNING (it would print identifiers);
    after quiet_pynetdicom an association binds none of its debug handlers
    and no identifier is rendered as text."""
    from pynetdicom import _config
    from pynetdicom._handlers import standard_pdu_recv_handler

    from dimse_bridge.ae import quiet_pynetdicom

    saved = (
        _config.LOG_HANDLER_LEVEL,
        _config.LOG_REQUEST_IDENTIFIERS,
        _config.LOG_RESPONSE_IDENTIFIERS,
    )
    try:
        quiet_pynetdicom()
        assert _config.LOG_HANDLER_LEVEL == "none"
        assert not _config.LOG_REQUEST_IDENTIFIERS
        assert not _config.LOG_RESPONSE_IDENTIFIERS
        scp = AE(ae_title="SCP")
        scp.add_supported_context(Verification)
        bound: list[object] = []

        def on_accepted(event: Event) -> None:
            bound.extend(h for h, _ in event.assoc.get_handlers(evt.EVT_PDU_RECV))

        server = scp.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_ACCEPTED, on_accepted)]
        )
        assert server is not None
        try:
            scu = AE(ae_title="SCU")
            scu.add_requested_context(Verification)
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
            assert assoc.is_established
            assoc.release()
        finally:
            server.shutdown()
        assert standard_pdu_recv_handler not in bound
    finally:
        (
            _config.LOG_HANDLER_LEVEL,
            _config.LOG_REQUEST_IDENTIFIERS,
            _config.LOG_RESPONSE_IDENTIFIERS,
        ) = saved
