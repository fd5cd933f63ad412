"""The forwarding outbox on SQLite and PostgreSQL: entries are written with
the instance in one transaction, by the destinations' filters; claims are
exclusive and run out; marks need the claim; status, re-queue and replay;
deletions go to the destinations that took the instance."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine, func, select

from appliance.config import ForwardConfig, IngestConfig
from appliance.delete import DeleteService
from appliance.forward.outbox import EntryState, Outbox
from appliance.forward.routes import Routes
from appliance.index.schema import forward_entry, instance
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Origin
from appliance.storage.filesystem import FilesystemBlobStore
from tests.helpers import part10_of, small_study

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
LEASE = dt.timedelta(minutes=5)


def destination(name: str, **keys: object) -> ForwardConfig:
    return dataclasses.replace(ForwardConfig(), name=name, url=f"http://127.0.0.1:9/{name}", **keys)  # type: ignore[arg-type]


@dataclasses.dataclass
class Site:
    engine: Engine
    ingest: IngestService
    delete: DeleteService
    outbox: Outbox
    index: SqlIndex


def site(engine: Engine, root: Path, *destinations: ForwardConfig) -> Site:
    routes = Routes(destinations)
    index = SqlIndex(engine)
    storage = FilesystemBlobStore(root)
    return Site(
        engine,
        IngestService(storage, index, IngestConfig(), routes),
        DeleteService(index, storage, routes.deletes_to),
        Outbox(engine),
        index,
    )


def store(site: Site, ds: Dataset, calling_ae: str = "CT_SCANNER") -> None:
    result = site.ingest.store_part10(
        io.BytesIO(part10_of(ds)), Origin("dimse", calling_ae=calling_ae)
    )
    assert result.stored, result


def entries(engine: Engine) -> list[tuple[str, str, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                forward_entry.c.destination,
                forward_entry.c.action,
                forward_entry.c.sop_instance_uid,
                forward_entry.c.state,
            ).order_by(forward_entry.c.id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def test_each_stored_instance_is_queued_for_the_destinations_that_take_it(
    index_engine: Engine, tmp_path: Path
) -> None:
    s = site(
        index_engine,
        tmp_path,
        destination("all"),
        destination("ct-only", modalities=("CT",)),
        destination("mr-class", sop_classes=(MR,)),
        destination("from-scanner", calling_ae_titles=("CT_SCANNER",)),
    )
    ct = small_study(1)[0]
    store(s, ct)
    mr = small_study(1)[0]
    mr.Modality, mr.SOPClassUID = "MR", MR
    store(s, mr, calling_ae="OTHER")
    assert entries(index_engine) == [
        ("all", "store", ct.SOPInstanceUID, "queued"),
        ("ct-only", "store", ct.SOPInstanceUID, "queued"),
        ("from-scanner", "store", ct.SOPInstanceUID, "queued"),
        ("all", "store", mr.SOPInstanceUID, "queued"),
        ("mr-class", "store", mr.SOPInstanceUID, "queued"),
    ]
    # the same instance again, kept as the first copy: nothing more to send
    store(s, ct)
    assert len(entries(index_engine)) == 5


def test_no_entry_without_its_instance_and_no_instance_without_its_entry(
    index_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entries are written in the instance's transaction: when that
    transaction fails at its last statement (the change-feed insert), neither
    the instance nor its entry is left."""
    s = site(index_engine, tmp_path, destination("up"))

    def fail(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the database went away at the commit")

    monkeypatch.setattr(SqlIndex, "_log_change", fail)
    with pytest.raises(RuntimeError):
        s.ingest.store_part10(io.BytesIO(part10_of(small_study(1)[0])), Origin("dicomweb"))
    with index_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(instance)).scalar_one() == 0
    assert entries(index_engine) == []


def test_claims_are_exclusive_run_out_and_guard_the_marks(
    index_engine: Engine, tmp_path: Path
) -> None:
    s = site(index_engine, tmp_path, destination("up"))
    for ds in small_study(5):
        store(s, ds)
    first = s.outbox.claim("up", 3, LEASE)
    second = s.outbox.claim("up", 3, LEASE)
    assert first is not None
    assert second is not None
    assert len(first.entries) == 3
    assert len(second.entries) == 2
    assert not {e.id for e in first.entries} & {e.id for e in second.entries}
    assert s.outbox.claim("up", 3, LEASE) is None  # all held

    # only the holder marks; the others' token changes nothing
    ids = [e.id for e in first.entries]
    assert s.outbox.delivered(second.token, ids) == 0
    assert s.outbox.delivered(first.token, ids) == 3

    # a claim that runs out (its sender died) is claimed again
    later = dt.datetime.now(dt.UTC) + LEASE + dt.timedelta(seconds=1)
    again = s.outbox.claim("up", 10, LEASE, now=later)
    assert again is not None
    assert [e.id for e in again.entries] == [e.id for e in second.entries]
    # and the first holder's late mark is refused
    assert s.outbox.park(second.token, [e.id for e in second.entries], "late") == 0


def test_concurrent_claimants_never_share_an_entry(index_engine: Engine, tmp_path: Path) -> None:
    s = site(index_engine, tmp_path, destination("up"))
    for ds in small_study(60):
        store(s, ds)
    taken: list[int] = []
    lock = threading.Lock()

    def claimant() -> None:
        outbox = Outbox(index_engine)
        while (claim := outbox.claim("up", 4, LEASE)) is not None:
            with lock:
                taken.extend(e.id for e in claim.entries)

    threads = [threading.Thread(target=claimant) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(taken) == 60
    assert len(set(taken)) == 60


def test_status_retry_and_requeue(index_engine: Engine, tmp_path: Path) -> None:
    s = site(index_engine, tmp_path, destination("up"), destination("idle", modalities=("XA",)))
    for ds in small_study(4):
        store(s, ds)
    claim = s.outbox.claim("up", 4, LEASE)
    assert claim is not None
    a, b, c, _ = (e.id for e in claim.entries)
    s.outbox.delivered(claim.token, [a])
    s.outbox.park(claim.token, [b], "the upstream refused it: failure reason 0xA900 (43264)")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    s.outbox.retry(claim.token, [c], "cannot reach the upstream (ConnectError)", soon)
    up, idle = s.outbox.status(["up", "idle"])
    assert (up.queued, up.in_flight, up.delivered, up.parked) == (2, 1, 1, 1)
    assert up.oldest_queued_age is not None
    assert up.oldest_queued_age >= 0
    assert up.last_error == "cannot reach the upstream (ConnectError)"
    assert idle.queued == idle.delivered == idle.parked == 0
    assert idle.last_error is None

    assert s.outbox.requeue_parked("up") == 1
    up = s.outbox.status(["up"])[0]
    assert (up.queued, up.parked) == (3, 0)
    again = s.outbox.claim("up", 10, LEASE)
    assert again is not None
    assert [e.id for e in again.entries] == [b]
    assert again.entries[0].attempts == 0


def test_replay_queues_what_was_stored_since_by_the_filters(
    index_engine: Engine, tmp_path: Path
) -> None:
    s = site(index_engine, tmp_path)  # no destination while storing
    ct, mr = small_study(1)[0], small_study(1)[0]
    mr.Modality, mr.SOPClassUID = "MR", MR
    store(s, ct)
    store(s, mr, calling_ae="MR_SCANNER")
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    assert s.outbox.replay(destination("ct", modalities=("CT",)), since) == 1
    # the calling AE title the index kept (migration 0009) filters too
    assert s.outbox.replay(destination("nobody", calling_ae_titles=("ANYONE",)), since) == 0
    assert (
        s.outbox.replay(destination("all", calling_ae_titles=("CT_SCANNER", "MR_SCANNER")), since)
        == 2
    )
    future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    assert s.outbox.replay(destination("all"), future) == 0
    assert sorted(entries(index_engine)) == sorted(
        [
            ("ct", "store", ct.SOPInstanceUID, "queued"),
            ("all", "store", ct.SOPInstanceUID, "queued"),
            ("all", "store", mr.SOPInstanceUID, "queued"),
        ]
    )


def test_deletions_go_where_the_instance_went(index_engine: Engine, tmp_path: Path) -> None:
    s = site(
        index_engine,
        tmp_path,
        destination("mirror"),
        destination("no-deletes", forward_deletes=False),
        destination("mr-only", modalities=("MR",)),
    )
    ds = small_study(1)[0]
    store(s, ds)
    s.delete.delete(ds.StudyInstanceUID)
    assert [e for e in entries(index_engine) if e[1] == "delete"] == [
        ("mirror", "delete", ds.SOPInstanceUID, EntryState.QUEUED.value)
    ]
