"""DICOMcast's cursor and queue on SQLite and PostgreSQL: a pull queues each
study the change feed names once and moves the cursor in the same
transaction; a change takes a study from the sender publishing its older
state; pulls from two nodes at once neither skip nor repeat a change;
claims need their token; retry, park, re-queue and replay."""

from __future__ import annotations

import datetime as dt
import io
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select

from appliance.config import IngestConfig
from appliance.fhir.queue import StudyQueue
from appliance.index.engine import create_index_engine
from appliance.index.schema import feed_cursor, fhir_study
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Origin
from appliance.storage.filesystem import FilesystemBlobStore
from tests.helpers import part10_of, small_study

pytestmark = pytest.mark.integration

NOW = dt.timedelta(0)
LEASE = dt.timedelta(minutes=5)


def ingest(engine: Engine, root: Path) -> IngestService:
    return IngestService(FilesystemBlobStore(root), SqlIndex(engine), IngestConfig())


def store(service: IngestService, ds: Dataset) -> None:
    result = service.store_part10(io.BytesIO(part10_of(ds)), Origin("dicomweb"))
    assert result.stored, result


def rows(engine: Engine) -> dict[str, tuple[str, int]]:
    with engine.connect() as conn:
        return {
            r.study_instance_uid: (r.state, r.attempts)
            for r in conn.execute(
                select(fhir_study.c.study_instance_uid, fhir_study.c.state, fhir_study.c.attempts)
            )
        }


def cursor(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(feed_cursor.c.sequence)).scalar_one())


def test_a_pull_queues_each_study_once_and_moves_the_cursor(
    index_engine: Engine, tmp_path: Path
) -> None:
    service = ingest(index_engine, tmp_path)
    one, two = small_study(3, "Q-1"), small_study(2, "Q-2")
    for ds in [*one, *two]:
        store(service, ds)
    queue = StudyQueue(index_engine)
    assert queue.pull(NOW, limit=4) == 4
    assert queue.pull(NOW, limit=4) == 1
    assert queue.pull(NOW) == 0
    assert cursor(index_engine) == queue.status("").latest
    assert rows(index_engine) == {
        one[0].StudyInstanceUID: ("queued", 0),
        two[0].StudyInstanceUID: ("queued", 0),
    }
    claim = queue.claim(10, LEASE)
    assert claim is not None
    assert {s.study_instance_uid for s in claim.studies} == set(rows(index_engine))
    assert queue.claim(10, LEASE) is None  # held
    assert queue.synced(claim.token, one[0].StudyInstanceUID, "ImagingStudy/1")
    assert not queue.synced("not-the-token", two[0].StudyInstanceUID, None)
    assert queue.park(claim.token, two[0].StudyInstanceUID, "refused: 400")
    status = queue.status("http://fhir")
    assert (status.synced, status.parked, status.queued) == (1, 1, 0)
    assert status.last_error == "refused: 400"
    assert status.behind == 0
    assert queue.requeue_parked() == 1
    assert rows(index_engine)[two[0].StudyInstanceUID] == ("queued", 0)


def test_a_change_takes_the_study_from_the_sender_of_its_older_state(
    index_engine: Engine, tmp_path: Path
) -> None:
    service = ingest(index_engine, tmp_path)
    study = small_study(2, "Q-3")
    store(service, study[0])
    queue = StudyQueue(index_engine)
    queue.pull(NOW)
    claim = queue.claim(10, LEASE)
    assert claim is not None
    store(service, study[1])  # arrives while the first state is published
    queue.pull(NOW)
    assert not queue.synced(claim.token, study[0].StudyInstanceUID, "ImagingStudy/1")
    again = queue.claim(10, LEASE)
    assert again is not None
    assert [s.study_instance_uid for s in again.studies] == [study[0].StudyInstanceUID]
    assert queue.synced(again.token, study[0].StudyInstanceUID, "ImagingStudy/1")


def test_a_waiting_study_keeps_its_backoff_when_it_changes(
    index_engine: Engine, tmp_path: Path
) -> None:
    """The server is away: a study waiting for its next try is not hurried
    by more changes (each would otherwise cost a failed request)."""
    service = ingest(index_engine, tmp_path)
    study = small_study(2, "Q-4")
    store(service, study[0])
    queue = StudyQueue(index_engine)
    queue.pull(NOW)
    claim = queue.claim(10, LEASE)
    assert claim is not None
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert queue.retry(claim.token, study[0].StudyInstanceUID, "server away", later)
    store(service, study[1])
    queue.pull(NOW)
    assert queue.claim(10, LEASE) is None
    assert rows(index_engine)[study[0].StudyInstanceUID] == ("queued", 1)
    assert queue.status("").last_error == "server away"


def test_two_nodes_pulling_at_once_take_every_change_once(
    index_url: str, index_engine: Engine, tmp_path: Path
) -> None:
    service = ingest(index_engine, tmp_path)
    studies = [small_study(1, f"Q-N{n}") for n in range(40)]
    for study in studies:
        store(service, study[0])
    engines = [create_index_engine(index_url) for _ in range(2)]
    taken: list[int] = []
    lock = threading.Lock()

    def node(engine: Engine) -> None:
        queue = StudyQueue(engine)
        while True:
            read = queue.pull(NOW, limit=3)
            if not read:
                return
            with lock:
                taken.append(read)

    threads = [threading.Thread(target=node, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for engine in engines:
        engine.dispose()
    assert sum(taken) == 40
    assert len(rows(index_engine)) == 40
    assert cursor(index_engine) == StudyQueue(index_engine).status("").latest


def test_replay_moves_the_cursor_back(index_engine: Engine, tmp_path: Path) -> None:
    service = ingest(index_engine, tmp_path)
    for ds in small_study(3, "Q-R"):
        store(service, ds)
    queue = StudyQueue(index_engine)
    queue.pull(NOW)
    assert queue.replay() == 3
    assert cursor(index_engine) == 0
    queue.pull(NOW)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert queue.replay(future) == 0
    assert queue.replay(dt.datetime(2000, 1, 1, tzinfo=dt.UTC)) == 3
