"""Storage Commitment Push Model SCP (PS3.4 J.3) over real associations on
loopback.

The requester is pynetdicom, acting as the SOP Class's SCU: it sends the
N-ACTION and receives the N-EVENT-REPORT, on the same association or as an
association acceptor listening as the configured peer.  dcmtk ships no
storage-commitment SCU tool (its ``storescu``, ``findscu``, ``movescu`` and
``getscu`` speak DIMSE-C only), so there is no interop peer here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy import Engine

from appliance.commitment import (
    CommitmentOutbox,
    CommitmentReport,
    Reference,
    ReportState,
    RetrySchedule,
)
from appliance.config import Config
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.model import Origin
from appliance.status import Status
from dimse_bridge.services.commitment import ReportWorker
from tests.conftest import LiveAppliance, appliance_config, started_appliance
from tests.peers import free_port

pytestmark = pytest.mark.integration

SCU_AE = "SCU"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
WAIT = 20.0  # seconds to wait for a report that should come at once


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def peers(port: int, title: str = SCU_AE) -> str:
    return f'[{{ae_title="{title}", host="127.0.0.1", port={port}}}]'


@dataclasses.dataclass(frozen=True)
class Received:
    """One N-EVENT-REPORT as the requester saw it."""

    event_type: int | None
    transaction_uid: str
    committed: list[tuple[str, str]]
    failed: list[tuple[str, str, int]]
    retrieve_ae_title: str | None
    assoc: Association
    proposed_scp_role: bool | None


class ReportSink:
    """An N-EVENT-REPORT handler that keeps what arrives."""

    def __init__(self) -> None:
        self.reports: queue.Queue[Received] = queue.Queue()

    def handle(self, event: Event) -> tuple[int, None]:
        info = event.event_information
        role = event.assoc.requestor.role_selection.get(StorageCommitmentPushModel)
        self.reports.put(
            Received(
                event_type=event.event_type,
                transaction_uid=str(info.TransactionUID),
                committed=[
                    (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                    for i in info.get("ReferencedSOPSequence", [])
                ],
                failed=[
                    (
                        str(i.ReferencedSOPClassUID),
                        str(i.ReferencedSOPInstanceUID),
                        int(i.FailureReason),
                    )
                    for i in info.get("FailedSOPSequence", [])
                ],
                retrieve_ae_title=info.get("RetrieveAETitle"),
                assoc=event.assoc,
                proposed_scp_role=None if role is None else bool(role.scp_role),
            )
        )
        return int(Status.SUCCESS), None

    def get(self, timeout: float = WAIT) -> Received:
        return self.reports.get(timeout=timeout)

    def handlers(self) -> list[Any]:
        return [(evt.EVT_N_EVENT_REPORT, self.handle)]


def request(transaction_uid: str | None, refs: list[tuple[str, str]]) -> Dataset:
    """Action Information of a Storage Commitment Request (PS3.4 Table J.3-1)."""
    ds = Dataset()
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def associate(app: LiveAppliance, sink: ReportSink, title: str = SCU_AE) -> Association:
    ae = AE(ae_title=title)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        app.dimse_host, app.dimse_port, ae_title=app.ae_title, evt_handlers=sink.handlers()
    )
    assert assoc.is_established
    return assoc


def n_action(
    assoc: Association,
    info: Dataset | None,
    action_type: int = 1,
    instance: str = StorageCommitmentPushModelInstance,
) -> Dataset:
    status, _reply = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, instance)
    assert "Status" in status, "no N-ACTION response"
    return status


@contextlib.contextmanager
def appliance(tmp_path: Path, **environ: str) -> Iterator[LiveAppliance]:
    running = started_appliance(appliance_config(tmp_path, **environ))
    try:
        yield next(running)
    finally:
        running.close()


@contextlib.contextmanager
def listening_peer(port: int, sink: ReportSink) -> Iterator[None]:
    """The requester's own SCP side: accepts an association from the
    appliance for Storage Commitment, allowing the SCP role it proposes."""
    ae = AE(ae_title=SCU_AE)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=sink.handlers())
    try:
        yield
    finally:
        server.shutdown()


def load(app: LiveAppliance, name: str) -> tuple[str, str]:
    with open(get_testdata_file(name), "rb") as f:  # type: ignore[arg-type]
        app.services.ingest.store_part10(f, Origin("import"))
    ds = dcmread(get_testdata_file(name), stop_before_pixels=True)  # type: ignore[arg-type]
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def wait_for(outbox: CommitmentOutbox, uid: str, *, state: ReportState) -> CommitmentReport:
    deadline = time.monotonic() + WAIT
    while True:
        [report] = outbox.reports(uid)
        if report.state is state or time.monotonic() > deadline:
            assert report.state is state, report
            return report
        time.sleep(0.05)


def answered(app: LiveAppliance, sink: ReportSink) -> Received:
    """The next report on the requesting association, once the appliance has
    its response: an SCU releasing before it answered would race its own
    response (pynetdicom then drops it)."""
    got = sink.get()
    wait_for(
        CommitmentOutbox(app.services.engine), got.transaction_uid, state=ReportState.DELIVERED
    )
    return got


# ------------------------------------------------------------------- (a)


def test_the_report_comes_on_the_same_association(tmp_path: Path) -> None:
    sink = ReportSink()
    with appliance(tmp_path) as app:
        ct = load(app, "CT_small.dcm")
        mr = load(app, "MR_small.dcm")
        missing = (CT_IMAGE, new_uid())
        conflict = (CT_IMAGE, mr[1])  # stored as MR
        uid = new_uid()
        assoc = associate(app, sink)
        try:
            assert n_action(assoc, request(uid, [ct, missing, mr, conflict])).Status == 0
            got = answered(app, sink)
        finally:
            assoc.release()
        [report] = CommitmentOutbox(app.services.engine).reports(uid)
    assert got.assoc is assoc  # the requesting association, no second one
    assert got.event_type == 2  # failures exist (PS3.4 J.3.3.1.2)
    assert got.transaction_uid == uid
    assert got.committed == [ct, mr]
    assert got.failed == [
        (*missing, int(Status.NO_SUCH_OBJECT_INSTANCE)),
        (*conflict, int(Status.CLASS_INSTANCE_CONFLICT)),
    ]
    assert got.retrieve_ae_title == "DICOM_EDGE"
    assert report.delivered_via == "same"
    assert report.attempts == 1


def test_all_committed_is_event_type_1(tmp_path: Path) -> None:
    sink = ReportSink()
    with appliance(tmp_path) as app:
        ct = load(app, "CT_small.dcm")
        assoc = associate(app, sink)
        try:
            assert n_action(assoc, request(new_uid(), [ct])).Status == 0
            got = answered(app, sink)
        finally:
            assoc.release()
    assert got.event_type == 1
    assert got.committed == [ct]
    assert got.failed == []


# ------------------------------------------------------------------- (b)


def test_the_report_comes_on_a_new_association_to_the_configured_peer(tmp_path: Path) -> None:
    sink, port = ReportSink(), free_port()
    env = {
        "APPLIANCE_DIMSE_PEERS": peers(port),
        "APPLIANCE_DIMSE_COMMITMENT_ON_SAME_ASSOCIATION": "false",
    }
    with listening_peer(port, sink), appliance(tmp_path, **env) as app:
        ct = load(app, "CT_small.dcm")
        uid = new_uid()
        assoc = associate(app, sink)
        assert n_action(assoc, request(uid, [ct])).Status == 0
        assoc.release()  # the SCU may release at once (PS3.4 J.3.2.1.2)
        got = sink.get()
        report = wait_for(CommitmentOutbox(app.services.engine), uid, state=ReportState.DELIVERED)
    assert got.assoc is not assoc
    assert got.assoc.is_acceptor  # the peer accepted an association...
    assert got.assoc.requestor.ae_title == "DICOM_EDGE"  # ...that the appliance requested
    assert got.proposed_scp_role is True  # PS3.4 J.3.3.1.3 Note
    assert (got.event_type, got.transaction_uid, got.committed) == (1, uid, [ct])
    assert report.delivered_via == "new"


@pytest.mark.slow
def test_an_scu_that_releases_at_once_still_gets_its_report_once(tmp_path: Path) -> None:
    """PS3.4 J.3.3.1.2 Note 1: the SCU may release right after the N-ACTION
    response, racing the report on the same association.  Whichever wins, the
    report arrives once (on the same association, or on a new one when the
    SCU released first or ignored it while releasing) and the release ends."""
    sink, port = ReportSink(), free_port()
    with listening_peer(port, sink), appliance(tmp_path, APPLIANCE_DIMSE_PEERS=peers(port)) as app:
        uid = new_uid()
        assoc = associate(app, sink)
        assert n_action(assoc, request(uid, [(CT_IMAGE, new_uid())])).Status == 0
        started = time.monotonic()
        assoc.release()
        assert time.monotonic() - started < 15  # SAME_ASSOCIATION_TIMEOUT, not 60 s
        got = sink.get()
        report = wait_for(CommitmentOutbox(app.services.engine), uid, state=ReportState.DELIVERED)
        time.sleep(0.5)
    assert got.transaction_uid == uid
    assert report.delivered_via in ("same", "new")
    assert sink.reports.empty()


# ------------------------------------------------------------------- (c)


@pytest.mark.slow
def test_a_report_to_a_peer_that_is_down_is_retried_until_it_arrives(tmp_path: Path) -> None:
    """The deployed schedule: the first retry comes 10 s after the failure."""
    sink, port = ReportSink(), free_port()
    env = {
        "APPLIANCE_DIMSE_PEERS": peers(port),
        "APPLIANCE_DIMSE_COMMITMENT_ON_SAME_ASSOCIATION": "false",
    }
    with appliance(tmp_path, **env) as app:
        outbox = CommitmentOutbox(app.services.engine)
        ct = load(app, "CT_small.dcm")
        uid = new_uid()
        assoc = associate(app, sink)
        assert n_action(assoc, request(uid, [ct])).Status == 0
        assoc.release()
        deadline = time.monotonic() + WAIT
        while not (outbox.reports(uid)[0].last_error or time.monotonic() > deadline):
            time.sleep(0.05)
        [failed_once] = outbox.reports(uid)
        assert failed_once.state is ReportState.PENDING
        assert failed_once.attempts == 1
        assert "no association" in (failed_once.last_error or "")
        assert sink.reports.empty()
        with listening_peer(port, sink):
            got = sink.get(timeout=30)
            report = wait_for(outbox, uid, state=ReportState.DELIVERED)
    assert (got.event_type, got.transaction_uid, got.committed) == (1, uid, [ct])
    assert report.attempts == 2
    assert report.delivered_via == "new"
    assert sink.reports.empty()  # once


# ------------------------------------------------------------------- (d)


def malformed(info: str) -> Dataset | None:
    """The Action Information of each malformed case."""
    good = [(CT_IMAGE, new_uid())]
    if info == "none":
        return None
    if info == "no-transaction":
        return request(None, good)
    if info == "no-references":
        return request(new_uid(), [])
    if info == "bad-uid":
        return request(new_uid(), [(CT_IMAGE, "1.2.03")])
    return request(new_uid(), good)


# pydicom warns of the malformed UI value (on both sides): that is the case
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
@pytest.mark.parametrize(
    ("info", "action_type", "instance", "status"),
    [
        ("none", 1, StorageCommitmentPushModelInstance, Status.INVALID_ARGUMENT_VALUE),
        ("no-transaction", 1, StorageCommitmentPushModelInstance, Status.INVALID_ARGUMENT_VALUE),
        ("no-references", 1, StorageCommitmentPushModelInstance, Status.INVALID_ARGUMENT_VALUE),
        ("bad-uid", 1, StorageCommitmentPushModelInstance, Status.INVALID_ARGUMENT_VALUE),
        ("good", 2, StorageCommitmentPushModelInstance, Status.NO_SUCH_ACTION),
        ("good", 1, "1.2.3.4", Status.NO_SUCH_OBJECT_INSTANCE),
    ],
    ids=[
        "no-information",
        "no-transaction-uid",
        "no-references",
        "bad-uid",
        "action-2",
        "instance",
    ],
)
def test_a_malformed_request_fails_and_the_next_request_works(
    tmp_path: Path, info: str, action_type: int, instance: str, status: Status
) -> None:
    sink = ReportSink()
    good = [(CT_IMAGE, new_uid())]
    with appliance(tmp_path) as app:
        assoc = associate(app, sink)
        try:
            answer = n_action(assoc, malformed(info), action_type, instance)
            assert answer.Status == status
            assert answer.ErrorComment  # why, in words
            uid = new_uid()
            assert n_action(assoc, request(uid, good)).Status == 0  # same association
            assert answered(app, sink).transaction_uid == uid
        finally:
            assoc.release()
        assoc = associate(app, sink)  # and the next association
        try:
            uid = new_uid()
            assert n_action(assoc, request(uid, good)).Status == 0
            assert answered(app, sink).transaction_uid == uid
        finally:
            assoc.release()
        assert CommitmentOutbox(app.services.engine).counts()["pending"] == 0
    assert sink.reports.empty()  # nothing for the refused request


def test_a_requester_without_an_address_is_refused_when_reports_need_one(
    tmp_path: Path,
) -> None:
    sink = ReportSink()
    env = {
        "APPLIANCE_DIMSE_PEERS": peers(free_port()),
        "APPLIANCE_DIMSE_COMMITMENT_ON_SAME_ASSOCIATION": "false",
    }
    with appliance(tmp_path, **env) as app:
        assoc = associate(app, sink, title="STRANGER")
        try:
            answer = n_action(assoc, request(new_uid(), [(CT_IMAGE, new_uid())]))
        finally:
            assoc.release()
        assert CommitmentOutbox(app.services.engine).counts()["pending"] == 0
    assert answer.Status == Status.PROCESSING_FAILURE
    assert "dimse.peers" in answer.ErrorComment


def test_the_worker_stops_with_the_listener(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    with appliance(tmp_path):
        [worker] = [
            t for t in threading.enumerate() if t.name == "commitment-reports" and t not in before
        ]
        assert worker.is_alive()
    worker.join(10)
    assert not worker.is_alive()


# ------------------------------------------ the worker with its own schedule


@pytest.fixture
def engine_and_config(tmp_path: Path) -> Iterator[tuple[Engine, Config, int]]:
    port = free_port()
    config = appliance_config(tmp_path, APPLIANCE_DIMSE_PEERS=peers(port))
    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    yield engine, config, port
    engine.dispose()


FAST = RetrySchedule(
    first_delay=dt.timedelta(milliseconds=200),
    max_delay=dt.timedelta(seconds=1),
    give_up_after=dt.timedelta(minutes=5),
)


def test_the_worker_retries_on_its_schedule(
    engine_and_config: tuple[Engine, Config, int],
) -> None:
    engine, config, port = engine_and_config
    outbox = CommitmentOutbox(engine)
    worker = ReportWorker(outbox, config, schedule=FAST)
    uid = new_uid()
    outbox.request(uid, SCU_AE, [Reference(CT_IMAGE, new_uid())])
    assert worker.deliver_due() == 1  # the peer is down
    [report] = outbox.reports(uid)
    assert report.state is ReportState.PENDING
    assert worker.deliver_due() == 0  # not due yet
    sink = ReportSink()
    with listening_peer(port, sink):
        time.sleep(FAST.first_delay.total_seconds())
        assert worker.deliver_due() == 1
        got = sink.get()
    assert (got.event_type, got.transaction_uid) == (2, uid)
    assert got.failed[0][2] == Status.NO_SUCH_OBJECT_INSTANCE
    [report] = outbox.reports(uid)
    assert (report.state, report.attempts) == (ReportState.DELIVERED, 2)


def test_the_worker_gives_up_after_its_schedule(
    engine_and_config: tuple[Engine, Config, int],
) -> None:
    engine, config, _port = engine_and_config
    outbox = CommitmentOutbox(engine)
    worker = ReportWorker(outbox, config, schedule=RetrySchedule(give_up_after=dt.timedelta(0)))
    uid = new_uid()
    outbox.request(uid, SCU_AE, [Reference(CT_IMAGE, new_uid())])
    assert worker.deliver_due() == 1
    [report] = outbox.reports(uid)
    assert report.state is ReportState.FAILED
    assert "no association" in (report.last_error or "")


def test_a_requester_unknown_to_the_peers_is_failed_at_once_with_the_reason(
    engine_and_config: tuple[Engine, Config, int],
) -> None:
    engine, config, _port = engine_and_config
    outbox = CommitmentOutbox(engine)
    worker = ReportWorker(outbox, config, schedule=FAST)
    uid = new_uid()
    outbox.request(uid, "NOBODY", [Reference(CT_IMAGE, new_uid())])
    worker.deliver_due()
    [report] = outbox.reports(uid)
    assert report.state is ReportState.FAILED
    assert report.attempts == 1
    assert "AE 'NOBODY' is not in dimse.peers" in (report.last_error or "")
