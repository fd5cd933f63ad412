"""Storage Commitment tied to forwarding, on SQLite and PostgreSQL, and over
a real association: a requester whose peer entry names a ``[[forward]]``
destination (``commit_after_forward``) is told an instance is committed only
once it is delivered there; the waiting report is a row, so it survives a
restart, and it is settled as the deliveries decide."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import Engine

from appliance.commitment import CommitmentOutbox, Reference, ReportState
from appliance.config import ForwardConfig, IngestConfig
from appliance.forward.outbox import Outbox
from appliance.forward.routes import Routes
from appliance.forward.worker import Forwarder
from appliance.index.engine import create_index_engine
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Origin
from appliance.status import Status
from appliance.storage.filesystem import FilesystemBlobStore
from tests.conftest import appliance_config, start_orthanc, started_appliance
from tests.helpers import part10_of, small_study
from tests.integration.test_dimse_commitment import (
    SCU_AE,
    ReportSink,
    n_action,
    new_uid,
    request,
)
from tests.peers import free_port

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
LEASE = dt.timedelta(minutes=5)
WAIT_LIMIT = dt.timedelta(hours=1)


@dataclasses.dataclass
class Core:
    ingest: IngestService
    forward: Outbox
    commitment: CommitmentOutbox


def core(engine: Engine, root: Path) -> Core:
    destination = dataclasses.replace(ForwardConfig(), name="cloud", url="http://127.0.0.1:9")
    index = SqlIndex(engine)
    return Core(
        IngestService(FilesystemBlobStore(root), index, IngestConfig(), Routes([destination])),
        Outbox(engine),
        CommitmentOutbox(engine),
    )


def stored(c: Core, count: int) -> list[Reference]:
    refs = []
    for ds in small_study(count):
        result = c.ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("dimse", "MODALITY"))
        assert result.stored
        refs.append(Reference(CT, str(ds.SOPInstanceUID)))
    return refs


def deliver(c: Core, delivered: int, parked: int = 0) -> None:
    """Claim every queued entry and mark the first *delivered* delivered,
    the next *parked* parked; the rest go back to the queue."""
    claim = c.forward.claim("cloud", 1000, LEASE)
    assert claim is not None
    ids = [e.id for e in claim.entries]
    c.forward.delivered(claim.token, ids[:delivered])
    c.forward.park(claim.token, ids[delivered : delivered + parked], "refused upstream")
    later = dt.datetime.now(dt.UTC)
    c.forward.retry(claim.token, ids[delivered + parked :], "not yet", later)


def test_a_waiting_report_is_settled_once_every_instance_is_delivered(
    index_engine: Engine, tmp_path: Path
) -> None:
    c = core(index_engine, tmp_path)
    refs = stored(c, 3)
    missing = Reference(CT, new_uid())
    outcome = c.commitment.request(new_uid(), SCU_AE, [*refs, missing], await_destination="cloud")
    report = c.commitment.get(outcome.report_id)
    assert report is not None
    assert report.state is ReportState.WAITING
    assert report.await_destination == "cloud"
    assert c.commitment.due() == []  # nothing to send yet

    deliver(c, delivered=2)
    assert c.commitment.settle_waiting(WAIT_LIMIT) == 0  # one still queued
    deliver(c, delivered=1)
    # settled by another process, as after a restart: the waiting report is
    # only a row of the index
    restarted = create_index_engine(index_engine.url.render_as_string(hide_password=False))
    try:
        assert CommitmentOutbox(restarted).settle_waiting(WAIT_LIMIT) == 1
    finally:
        restarted.dispose()
    report = c.commitment.get(outcome.report_id)
    assert report is not None
    assert report.state is ReportState.PENDING
    assert [r.sop_instance_uid for r in report.result.committed] == [
        r.sop_instance_uid for r in refs
    ]
    # the instance never stored failed at once, as without forwarding
    assert [(f.sop_instance_uid, f.reason) for f in report.result.failed] == [
        (missing.sop_instance_uid, Status.NO_SUCH_OBJECT_INSTANCE)
    ]
    assert c.commitment.due() == [outcome.report_id]


def test_parked_instances_and_the_end_of_the_wait_fail_them(
    index_engine: Engine, tmp_path: Path
) -> None:
    c = core(index_engine, tmp_path)
    refs = stored(c, 3)
    outcome = c.commitment.request(new_uid(), SCU_AE, refs, await_destination="cloud")
    deliver(c, delivered=1, parked=1)
    assert c.commitment.settle_waiting(WAIT_LIMIT) == 0  # the third is still queued
    later = dt.datetime.now(dt.UTC) + WAIT_LIMIT + dt.timedelta(seconds=1)
    assert c.commitment.settle_waiting(WAIT_LIMIT, now=later) == 1
    report = c.commitment.get(outcome.report_id)
    assert report is not None
    assert [r.sop_instance_uid for r in report.result.committed] == [refs[0].sop_instance_uid]
    assert [(f.sop_instance_uid, f.reason) for f in report.result.failed] == [
        (refs[1].sop_instance_uid, Status.PROCESSING_FAILURE),
        (refs[2].sop_instance_uid, Status.PROCESSING_FAILURE),
    ]
    assert report.result.event_type == 2


def test_nothing_stored_here_needs_no_wait(index_engine: Engine, tmp_path: Path) -> None:
    c = core(index_engine, tmp_path)
    outcome = c.commitment.request(
        new_uid(), SCU_AE, [Reference(CT, new_uid())], await_destination="cloud"
    )
    report = c.commitment.get(outcome.report_id)
    assert report is not None
    assert report.state is ReportState.PENDING


def test_the_report_comes_once_the_upstream_has_the_instances(tmp_path: Path) -> None:
    """Over DIMSE: the SCU stores 3 instances and asks for commitment on one
    association; the upstream (Orthanc) is down, so no report comes; Orthanc
    starts, the senders deliver, and the report comes, all committed, on
    the association the SCU kept open."""
    port = free_port()
    sink = ReportSink()
    config = appliance_config(
        tmp_path / "app",
        APPLIANCE_FORWARD=(
            f'[{{name = "cloud", url = "http://127.0.0.1:{port}/dicom-web", '
            "timeout = 3, retry_max_seconds = 1}]"
        ),
        APPLIANCE_DIMSE_PEERS=(
            f'[{{ae_title="{SCU_AE}", host="127.0.0.1", port={free_port()}, '
            'commit_after_forward="cloud"}]'
        ),
    )
    instances = small_study(3)
    orthanc = None
    for app in started_appliance(config):
        stop = threading.Event()
        services = app.services
        forwarder = Forwarder(
            config.forward, Outbox(services.engine), services.index, services.retrieve
        )
        sender = threading.Thread(target=forwarder.run, args=(stop,), daemon=True)
        sender.start()
        try:
            ae = AE(ae_title=SCU_AE)
            ae.add_requested_context(CT, ExplicitVRLittleEndian)
            ae.add_requested_context(StorageCommitmentPushModel)
            assoc = ae.associate(
                app.dimse_host, app.dimse_port, ae_title=app.ae_title, evt_handlers=sink.handlers()
            )
            assert assoc.is_established
            try:
                for ds in instances:
                    assert assoc.send_c_store(ds).Status == 0x0000
                refs = [(CT, str(ds.SOPInstanceUID)) for ds in instances]
                transaction = new_uid()
                assert n_action(assoc, request(transaction, refs)).Status == 0x0000
                time.sleep(3)
                assert sink.reports.empty()  # nothing delivered upstream yet
                orthanc = start_orthanc(tmp_path / "orthanc", port)
                received = sink.reports.get(timeout=60)
                assert received.transaction_uid == transaction
                assert received.event_type == 1
                assert sorted(received.committed) == sorted(refs)
                assert received.failed == []
            finally:
                assoc.release()
        finally:
            stop.set()
            sender.join(30)
            forwarder.close()
            if orthanc is not None:
                orthanc.stop()
