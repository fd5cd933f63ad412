"""pynetdicom's loops wait for work instead of polling (dimse_bridge.reactor).

Both ends of the associations here are pynetdicom in this process, so the
requestor's and the acceptor's loops are the replaced ones.  What is shown:
an idle association's threads wake a few dozen times a second instead of
thousands; traffic still wakes them at once (50 C-ECHOs on one association
take far less than the 50 idle waits a missed wake-up would cost); the
user's send_* pauses, release and abort work as before.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, Association, evt
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification  # type: ignore

from dimse_bridge import reactor
from tests.peers import free_port


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Install the waits, counting how often each loop goes idle."""
    reactor.install()
    counts = {"dul": 0, "association": 0}
    dul_sleep, association_sleep = reactor._dul_sleep, reactor._association_sleep

    def dul(seconds: float) -> None:
        counts["dul"] += 1
        dul_sleep(seconds)

    def association(seconds: float) -> None:
        counts["association"] += 1
        association_sleep(seconds)

    import pynetdicom.association
    import pynetdicom.dul

    monkeypatch.setattr(pynetdicom.dul.time, "sleep", dul)
    monkeypatch.setattr(pynetdicom.association.time, "sleep", association)
    return counts


@pytest.fixture
def scp() -> Iterator[tuple[int, list[Dataset]]]:
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="REACTOR_SCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port, received
    finally:
        server.shutdown()


def _requestor() -> AE:
    ae = AE(ae_title="REACTOR_SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    return ae


@contextlib.contextmanager
def _association(port: int) -> Iterator[Association]:
    """An established association to the SCP on *port*, released after."""
    assoc = _requestor().associate("127.0.0.1", port, ae_title="REACTOR_SCP")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def test_idle_association_threads_wait_instead_of_polling(
    counted: dict[str, int], scp: tuple[int, list[Dataset]]
) -> None:
    port, _ = scp
    with _association(port):
        time.sleep(0.2)  # settle
        before = dict(counted)
        time.sleep(1.0)
        woken = {k: counted[k] - before[k] for k in counted}
        print(f"idle for 1 s, the loops slept: {woken}")
    # two associations' ends (requestor and acceptor) idle for a second:
    # polling every 1 ms would be ~2,000 per loop kind; waiting at most
    # IDLE_WAIT (20 ms) is ~100
    assert woken["dul"] < 400, woken
    assert woken["association"] < 400, woken
    assert woken["dul"] > 0, woken
    assert woken["association"] > 0, woken


def test_traffic_wakes_the_loops_at_once(
    counted: dict[str, int], scp: tuple[int, list[Dataset]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, received = scp
    # a long idle wait, so that a missed wake-up cannot hide in the noise of
    # a loaded machine: it would cost 0.2 s per message
    monkeypatch.setattr(reactor, "IDLE_WAIT", 0.2)
    with _association(port) as assoc:
        start = time.perf_counter()
        statuses = [assoc.send_c_echo().Status for _ in range(50)]
        seconds = time.perf_counter() - start
        for number in range(3):
            ds = Dataset()
            ds.SOPClassUID = SecondaryCaptureImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = number
            ds.file_meta = Dataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assert assoc.send_c_store(ds).Status == 0x0000
    assert statuses == [0x0000] * 50
    assert [int(ds.InstanceNumber) for ds in received] == [0, 1, 2]
    assert not assoc.is_established
    assert assoc.is_released
    # a missed wake-up costs IDLE_WAIT per message: 50 x 0.2 s = 10 s; each
    # echo takes a few milliseconds on loopback when the loops wake at once
    assert seconds < 50 * reactor.IDLE_WAIT / 2, f"50 C-ECHOs took {seconds:.3f} s"


def test_abort_from_another_thread_ends_the_association(
    counted: dict[str, int], scp: tuple[int, list[Dataset]]
) -> None:
    port, _ = scp
    assoc = _requestor().associate("127.0.0.1", port, ae_title="REACTOR_SCP")
    assert assoc.is_established
    threading.Thread(target=assoc.abort).start()
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.is_aborted
    assert not assoc.is_alive()
    assert not assoc.dul.is_alive()


def _echo_response() -> C_ECHO:
    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.Status = 0x0000
    return rsp


def _echo_request() -> C_ECHO:
    req = C_ECHO()
    req.MessageID = 8
    req.AffectedSOPClassUID = Verification
    return req


def test_a_response_is_left_to_the_user_who_is_sending(
    counted: dict[str, int], scp: tuple[int, list[Dataset]]
) -> None:
    """pynetdicom's race: a send_* right after another passes the reactor's
    stale pause flag, and the reactor's next non-blocking get_msg took the
    response the sender then waited dimse_timeout for.  The reactor's look
    at the queue now leaves a response there while a pause is asked for."""
    port, _ = scp
    with _association(port) as assoc:
        time.sleep(0.1)  # the reactor has gone idle once: its hooks are in
        queue = assoc.dimse.msg_queue
        assoc._reactor_checkpoint.clear()  # a sender pausing the reactor
        deadline = time.monotonic() + 5
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.001)
        response = _echo_response()
        queue.put((1, response))
        # what the reactor does when it resumes before seeing the pause
        assert assoc.dimse.get_msg(block=False) == (None, None)
        assert queue.qsize() == 1
        # the sender's own (blocking) look takes it
        assert assoc.dimse.get_msg(block=True) == (1, response)
        # a request is the reactor's to take, pause or not
        request = _echo_request()
        queue.put((1, request))
        assert assoc.dimse.get_msg(block=False) == (1, request)
        assoc._reactor_checkpoint.set()
        # with nobody sending, a stray response is taken (and dropped) as before
        queue.put((1, _echo_response()))
        deadline = time.monotonic() + 5
        while queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.qsize() == 0
        assert assoc.send_c_echo().Status == 0x0000
