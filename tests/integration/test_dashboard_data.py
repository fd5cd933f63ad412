"""The operator dashboard's data (issue 10): instances received per hour by
protocol and sending AE, the DIMSE association log and its bound, the
snapshot of :mod:`appliance.dashboard` after a known workload from real
peers (dcmtk's storescu and echoscu, STOW-RS over HTTP), and
``GET /v1/admin/dashboard`` for the admin role only."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine, func, inspect, select

from appliance import activity, dashboard
from appliance.access import ApiTokens
from appliance.activity import AssociationLog, AssociationRecord
from appliance.config import IngestConfig
from appliance.dicomio import extract_record, read_header
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.schema import association_log, instance
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Origin
from appliance.storage.base import BlobInfo
from appliance.storage.filesystem import FilesystemBlobStore
from tests.conftest import appliance_config, dcmtk, make_config, started_appliance, started_server
from tests.helpers import data_set_of, part10_of, small_study, stow

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 12, 3, 10, 30, tzinfo=dt.UTC)


def _record(n: int, outcome: str = "released") -> AssociationRecord:
    moment = NOW + dt.timedelta(seconds=n)
    return AssociationRecord(
        started_at=moment,
        ended_at=moment,
        calling_ae=f"AE{n}",
        called_ae="DICOM_EDGE",
        address="127.0.0.1",
        tls=False,
        outcome=outcome,
        stored=n,
    )


# ------------------------------------------------------------ received


def _index_at(engine: Engine, ds_bytes: bytes, protocol: str, ae: str, at: dt.datetime) -> None:
    """Index one instance as first stored at *at* (the blob is not needed)."""
    record = extract_record(read_header(io.BytesIO(ds_bytes)))  # type: ignore[arg-type]
    record = dataclasses.replace(
        record,
        instance=dataclasses.replace(record.instance, source_ae=ae, source_protocol=protocol),
    )
    key = record.instance.sop_instance_uid.replace(".", "")[-32:].rjust(32, "0")
    SqlIndex(engine).add_instance(record, BlobInfo(key, len(ds_bytes)), written_at=at)


def test_received_per_hour_by_protocol_and_ae(index_engine: Engine) -> None:
    """Grouped by UTC hour of first storage, protocol and AE; the window is
    the last *hours* hours including the current one, on both backends."""
    files = [part10_of(ds) for ds in small_study(9, "HOURS")]
    at = [
        (NOW - dt.timedelta(minutes=25), "dimse", "MODALITY1"),  # 10:05
        (NOW - dt.timedelta(minutes=1), "dimse", "MODALITY1"),  # 10:29
        (NOW + dt.timedelta(minutes=29), "dimse", "MODALITY1"),  # 10:59
        (NOW - dt.timedelta(minutes=10), "dicomweb", ""),  # 10:20
        (NOW - dt.timedelta(hours=1), "dicomweb", ""),  # 09:30
        (NOW - dt.timedelta(hours=2, minutes=30), "import", ""),  # 08:00
        (NOW - dt.timedelta(hours=2, minutes=31), "import", ""),  # 07:59: outside 3 h
        (NOW - dt.timedelta(days=2), "dimse", "OLD"),  # outside
        (NOW + dt.timedelta(hours=1), "dimse", "FUTURE"),  # 11:30: after the current hour
    ]
    for data, (when, protocol, ae) in zip(files, at, strict=True):
        _index_at(index_engine, data, protocol, ae, when)

    found = activity.received_per_hour(index_engine, hours=3, now=NOW)

    hour = dt.datetime(2026, 12, 3, 10, tzinfo=dt.UTC)
    assert [(c.hour, c.protocol, c.ae, c.instances) for c in found] == [
        (hour - dt.timedelta(hours=2), "import", "", 1),
        (hour - dt.timedelta(hours=1), "dicomweb", "", 1),
        (hour, "dicomweb", "", 1),
        (hour, "dimse", "MODALITY1", 3),
    ]
    assert all(c.hour.tzinfo is not None for c in found)
    assert found[0].as_json()["hour"] == "2026-12-03T08:00:00+00:00"
    assert activity.received_per_hour(index_engine, hours=1, now=NOW)[-1].instances == 3
    with pytest.raises(ValueError, match="hours"):
        activity.received_per_hour(index_engine, hours=0)


def test_the_protocol_is_kept_on_insert_and_replace(index_engine: Engine, tmp_path: Path) -> None:
    """source_protocol follows source_ae: set from the Origin when stored,
    and again when the instance is replaced."""
    ds = small_study(1, "PROTO")[0]
    ingest = IngestService(
        FilesystemBlobStore(tmp_path / "blobs"),
        SqlIndex(index_engine),
        IngestConfig(duplicate_policy="replace"),
    )

    def kept() -> tuple[str, str]:
        with index_engine.connect() as conn:
            row = conn.execute(select(instance.c.source_protocol, instance.c.source_ae)).one()
        return row[0], row[1]

    assert ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("dicomweb")).stored
    assert kept() == ("dicomweb", "")
    origin = Origin("dimse", calling_ae="MODALITY1")
    assert ingest.store_dataset(
        data_set_of(part10_of(ds)),
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        origin=origin,
    ).stored
    assert kept() == ("dimse", "MODALITY1")
    # reindex reads the sender back from the File Meta written for the C-STORE
    with index_engine.connect() as conn:
        key = conn.execute(select(instance.c.blob_key)).scalar_one()
    with FilesystemBlobStore(tmp_path / "blobs").open(key) as blob:
        record = extract_record(read_header(blob))
    assert (record.instance.source_protocol, record.instance.source_ae) == ("dimse", "MODALITY1")


# --------------------------------------------------------- association log


def test_the_association_log_keeps_the_newest_thousand(index_engine: Engine) -> None:
    for start in range(1, 1101, 10):
        activity.record_associations(index_engine, [_record(n) for n in range(start, start + 10)])
    with index_engine.connect() as conn:
        ids = sorted(conn.execute(select(association_log.c.id)).scalars())
    assert len(ids) == activity.KEEP
    assert ids[0] == 101
    assert ids[-1] == 1100
    newest = activity.recent_associations(index_engine, limit=3)
    assert [r.calling_ae for r in newest] == ["AE1100", "AE1099", "AE1098"]
    assert newest[0].stored == 1100
    assert newest[0].started_at.tzinfo is not None

    # one at a time: never more than KEEP + PRUNE_EVERY rows
    for n in range(1101, 1301):
        activity.record_association(index_engine, _record(n))
        if n % 50 == 0:
            with index_engine.connect() as conn:
                count = conn.execute(select(func.count()).select_from(association_log)).scalar()
            assert activity.KEEP <= count < activity.KEEP + activity.PRUNE_EVERY
    with index_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(association_log)).scalar() == 1000


def test_a_failed_write_is_a_warning_naming_only_ae_titles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An index the writer cannot write to (no association_log table): the
    record is dropped with a warning, add() never raises, the writer goes on."""
    engine = create_index_engine(f"sqlite:///{tmp_path / 'unmigrated.db'}")
    log = AssociationLog(engine)
    stop = threading.Event()
    writer = threading.Thread(target=log.run, args=(stop,))
    writer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="appliance.activity"):
            log.add(_record(7))
            assert log.wait(10)
        assert any(
            "not logged" in r.getMessage() and "AE7 -> DICOM_EDGE" in r.getMessage()
            for r in caplog.records
        ), caplog.text
        migrate.upgrade(engine)  # the next record is written
        log.add(_record(8))
        assert log.wait(10)
        assert [r.calling_ae for r in activity.recent_associations(engine)] == ["AE8"]
    finally:
        stop.set()
        writer.join(10)
        engine.dispose()


# ------------------------------------------------------------- workload


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _wait_for(engine: Engine, count: int) -> list[AssociationRecord]:
    deadline = time.monotonic() + 20
    while True:
        found = activity.recent_associations(engine)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_the_snapshot_of_a_known_workload(tmp_path: Path) -> None:
    """N instances by storescu from MODALITY1, M by STOW-RS, one
    association of an unknown AE rejected (require_known_peers), one C-ECHO
    whose association pynetdicom aborts: the snapshot counts each protocol
    and AE, the log shows the released association with its N stores, the
    rejected and the aborted one, and the endpoint says the same in JSON."""
    n, m = 4, 3
    config = appliance_config(
        tmp_path,
        APPLIANCE_DIMSE_REQUIRE_KNOWN_PEERS="true",
        APPLIANCE_DIMSE_PEERS='[{ae_title="MODALITY1", host="127.0.0.1", port=104}]',
    )
    files = []
    for number, ds in enumerate(small_study(n, "WORKLOAD-DIMSE")):
        path = tmp_path / f"dimse-{number}.dcm"
        path.write_bytes(part10_of(ds))
        files.append(path)
    for live in started_appliance(config):
        sent = _run(
            [
                dcmtk("storescu"),
                "-aet",
                "MODALITY1",
                "-aec",
                live.ae_title,
                "127.0.0.1",
                str(live.dimse_port),
                *map(str, files),
            ]
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        response = stow(live.base_url, *(part10_of(ds) for ds in small_study(m, "WORKLOAD-WEB")))
        assert response.status_code == 200, response.text
        refused = _run(
            [
                dcmtk("echoscu"),
                "-aet",
                "STRANGER",
                "-aec",
                live.ae_title,
                "127.0.0.1",
                str(live.dimse_port),
            ]
        )
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        peer = AE(ae_title="MODALITY1")
        peer.add_requested_context(Verification)
        assoc = peer.associate("127.0.0.1", live.dimse_port, ae_title=live.ae_title)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.abort()
        assert len(_wait_for(live.services.engine, 3)) == 3

        found = dashboard.snapshot(live.services, live.config)

        received = {(c.protocol, c.ae): c.instances for c in found.received}
        assert received == {("dimse", "MODALITY1"): n, ("dicomweb", ""): m}
        assert found.index is not None
        assert (found.index.studies, found.index.instances) == (2, n + m)
        assert found.storage.backend == "filesystem"
        assert found.storage.used_bytes == found.index.bytes > 0
        assert found.storage.free_bytes is not None
        assert found.storage.total_bytes is not None
        assert 0 < found.storage.free_bytes <= found.storage.total_bytes
        assert found.storage.refusing is False
        assert found.forwarding == []
        assert found.fhir is None

        aborted, rejected, released = found.associations
        assert (aborted.outcome, aborted.calling_ae, aborted.echoes) == ("aborted", "MODALITY1", 1)
        assert aborted.stored == 0
        assert aborted.detail == "aborted by the peer (A-ABORT)"
        assert (rejected.outcome, rejected.calling_ae, rejected.called_ae) == (
            "rejected",
            "STRANGER",
            live.ae_title,
        )
        assert "reason 3" in rejected.detail
        assert (released.outcome, released.calling_ae, released.stored) == (
            "released",
            "MODALITY1",
            n,
        )
        assert (released.store_failed, released.finds, released.echoes) == (0, 0, 0)
        assert released.address == "127.0.0.1"
        assert released.tls is False
        assert released.started_at <= released.ended_at <= found.generated_at

        checks = {c.name: c for c in found.health}
        assert checks["index"].status == "ok"
        assert checks["storage"].status == "ok"
        assert checks["disk"].status == "ok"
        # outside 'serve' no DIMSE worker marks itself ready, as /health/ready says
        assert checks["dimse"].status == "fail"

        body = httpx.get(f"{live.base_url}/v1/admin/dashboard", timeout=30).json()
        assert list(body) == [
            "generated_at",
            "hours",
            "received",
            "storage",
            "index",
            "forwarding",
            "fhir",
            "associations",
            "health",
        ]
        assert dt.datetime.fromisoformat(body["generated_at"]).tzinfo == dt.UTC
        assert sum(c["instances"] for c in body["received"]) == n + m
        assert body["associations"][2]["stored"] == n
        assert body["associations"][1]["outcome"] == "rejected"
        assert dt.datetime.fromisoformat(body["associations"][1]["ended_at"]).tzinfo == dt.UTC
        ready = httpx.get(f"{live.base_url}/health/ready", timeout=30).json()
        assert {c["name"] for c in body["health"]} == set(ready["checks"])
        assert httpx.get(f"{live.base_url}/v1/admin/dashboard?hours=0").status_code == 400


def test_the_endpoint_is_for_the_admin_role(tmp_path: Path) -> None:
    for server in started_server(make_config(tmp_path, APPLIANCE_AUTH_MODE="token")):
        tokens = ApiTokens(server.services.engine)
        url = f"{server.base_url}/v1/admin/dashboard"
        assert httpx.get(url).status_code == 401
        read, _ = tokens.create(["read"])
        assert httpx.get(url, headers={"Authorization": f"Bearer {read}"}).status_code == 403
        admin, _ = tokens.create(["admin"])
        answer = httpx.get(url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        assert answer.status_code == 200
        assert answer.json()["index"]["instances"] == 0


# ------------------------------------------------------------- migration


def test_migration_0011_goes_down_and_up_keeping_rows(tmp_path: Path) -> None:
    """SQLite (PostgreSQL: test_migrations' down-and-up test): rows stored
    at 0011 survive 0010 and back; the protocol is then ""."""
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        migrate.upgrade(engine)
        ingest = IngestService(
            FilesystemBlobStore(tmp_path / "b"), SqlIndex(engine), IngestConfig()
        )
        for ds in small_study(2, "UPDOWN"):
            assert ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("dicomweb")).stored
        activity.record_association(engine, _record(1))
        migrate.downgrade(engine, "0010")
        inspector = inspect(engine)
        assert "association_log" not in inspector.get_table_names()
        assert "source_protocol" not in {c["name"] for c in inspector.get_columns("instance")}
        migrate.upgrade(engine)
        assert migrate.stored_revision(engine) == migrate.head_revision()
        with engine.connect() as conn:
            assert conn.execute(select(instance.c.source_protocol)).scalars().all() == ["", ""]
        assert activity.recent_associations(engine) == []
    finally:
        engine.dispose()


def test_the_forwarding_and_dicomcast_queues(tmp_path: Path) -> None:
    """A destination with entries pending and one parked with its reason,
    DICOMcast with a study queued and a change not read yet: the snapshot
    says so, as /v1/admin/forward and /v1/admin/fhir count them."""
    from appliance.config import ForwardConfig
    from appliance.fhir.queue import StudyQueue
    from appliance.forward.outbox import Outbox
    from appliance.services import build_services

    config = make_config(tmp_path)
    config = dataclasses.replace(
        config,
        forward=(
            dataclasses.replace(ForwardConfig(), name="cloud", url="http://127.0.0.1:9/dicomweb"),
        ),
        fhir=dataclasses.replace(config.fhir, url="http://127.0.0.1:9/fhir"),
    )
    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    services = build_services(config)
    try:
        first, second, third = small_study(3, "QUEUES")
        for ds in (first, second):
            result = services.ingest.store_part10(io.BytesIO(part10_of(ds)), Origin("dicomweb"))
            assert result.stored
        outbox = Outbox(services.engine)
        claim = outbox.claim("cloud", 1, dt.timedelta(minutes=5))
        assert claim is not None
        assert outbox.park(claim.token, [e.id for e in claim.entries], "HTTP 400 from upstream")
        assert StudyQueue(services.engine).pull(dt.timedelta(0)) == 2  # two changes read
        stored = services.ingest.store_part10(io.BytesIO(part10_of(third)), Origin("dicomweb"))
        assert stored.stored

        found = dashboard.snapshot(
            services, config, now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
        )

        (cloud,) = found.forwarding
        assert (cloud.name, cloud.pending, cloud.in_flight, cloud.parked) == ("cloud", 2, 0, 1)
        assert cloud.oldest_age_seconds is not None
        assert cloud.oldest_age_seconds >= 59
        assert cloud.last_error == "HTTP 400 from upstream"
        assert cloud.last_error_at is not None
        assert found.fhir is not None
        assert (found.fhir.pending, found.fhir.parked, found.fhir.behind) == (1, 0, 1)
        assert found.fhir.lag_seconds is not None
        assert found.fhir.last_error is None
        checks = {c.name: c.status for c in found.health}
        assert checks["forward:cloud"] == "ok"  # parked, not waiting: /health/ready's rule
        assert checks["fhir"] == "ok"
        body = found.as_json()
        assert body["forwarding"][0]["last_error_at"].endswith("+00:00")
        assert body["fhir"]["behind"] == 1
    finally:
        services.close()
