"""Data partitions (issue 11) and the work that spans them: forwarding reads
each instance from its own partition, retention deletes the old studies of
every partition, and ``verify --drop-missing`` drops the row of the
partition whose blob is gone, leaving the other partition's copy of the
same UIDs.  On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from appliance.config import RetentionConfig
from appliance.forward.outbox import Outbox
from appliance.forward.worker import Forwarder
from appliance.index.schema import forward_entry, instance, study
from appliance.integrity import verify
from appliance.model import Origin
from appliance.retention import Retention
from appliance.services import Services
from tests.conftest import make_config, started_server
from tests.helpers import part10_of, small_study

pytestmark = pytest.mark.integration

ORIGIN = Origin("dicomweb")


def store(services: Services, ds: Dataset) -> None:
    result = services.ingest.store_part10(io.BytesIO(part10_of(ds)), ORIGIN)
    assert result.stored, result


def in_partition(services: Services, name: str) -> Services:
    return services.in_partition(services.partitions.ensure(name))


def test_forwarding_reads_each_instance_from_its_partition(tmp_path: Path, index_url: str) -> None:
    """An instance stored only in partition A is found there by the sender
    (not taken for deleted because the default partition lacks it) and
    delivered to the upstream, another dicom-appliance."""
    for upstream in started_server(make_config(tmp_path / "upstream")):
        config = make_config(
            tmp_path / "local",
            APPLIANCE_INDEX_URL=index_url,
            APPLIANCE_PARTITIONS_ENABLED="1",
            APPLIANCE_FORWARD=f'[{{name = "up", url = "{upstream.root}", timeout = 5}}]',
        )
        for local in started_server(config):
            ds = small_study(1, "FORWARD-A")[0]
            partition_a = in_partition(local.services, "A")
            store(partition_a, ds)
            outbox = Outbox(local.services.engine)
            forwarder = Forwarder(
                config.forward, outbox, local.services.index, local.services.retrieve
            )
            try:
                for _ in range(10):
                    if not forwarder.send_once(config.forward[0]):
                        break
            finally:
                forwarder.close()
            with local.services.engine.connect() as conn:
                rows = conn.execute(
                    select(forward_entry.c.partition_key, forward_entry.c.state)
                ).all()
            assert [tuple(row) for row in rows] == [(partition_a.partition_key, "delivered")]
            got = httpx.get(f"{upstream.root}/studies/{ds.StudyInstanceUID}/metadata", timeout=10)
            assert got.status_code == 200
            assert got.json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]


def test_retention_deletes_the_old_studies_of_every_partition(
    tmp_path: Path, index_url: str
) -> None:
    config = make_config(tmp_path, APPLIANCE_INDEX_URL=index_url, APPLIANCE_PARTITIONS_ENABLED="1")
    for server in started_server(config):
        services = server.services
        old, recent = small_study(2, "OLD"), small_study(1, "RECENT")
        partition_a = in_partition(services, "A")
        for target in (services, partition_a):
            for ds in old:
                store(target, ds)
        store(partition_a, recent[0])
        when = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
        with services.engine.begin() as conn:
            conn.execute(
                update(study)
                .where(study.c.study_instance_uid == old[0].StudyInstanceUID)
                .values(updated_at=when)
            )
            conn.execute(
                update(instance)
                .where(instance.c.sop_instance_uid.in_([ds.SOPInstanceUID for ds in old]))
                .values(updated_at=when)
            )
        retention = Retention(
            RetentionConfig(max_age_days=30), services.engine, services.index, services.storage
        )
        report = retention.run()
        # the same study UID, once per partition
        assert report.deleted == [old[0].StudyInstanceUID] * 2
        assert (report.studies, report.instances) == (2, 4)
        with services.engine.connect() as conn:
            left = conn.execute(select(study.c.study_instance_uid, study.c.partition_key)).all()
        assert [tuple(row) for row in left] == [
            (recent[0].StudyInstanceUID, partition_a.partition_key)
        ]


def test_drop_missing_drops_the_row_of_the_partition_whose_blob_is_gone(
    tmp_path: Path, index_url: str
) -> None:
    config = make_config(tmp_path, APPLIANCE_INDEX_URL=index_url, APPLIANCE_PARTITIONS_ENABLED="1")
    for server in started_server(config):
        services: Services = server.services
        ds = small_study(1, "DROP")[0]
        partition_a = in_partition(services, "A")
        store(services, ds)
        store(partition_a, ds)
        in_a = partition_a.index.find_instance(ds.SOPInstanceUID)
        in_default = services.index.find_instance(ds.SOPInstanceUID)
        assert in_a is not None
        assert in_default is not None
        assert in_a.blob_key != in_default.blob_key
        services.storage.delete(in_a.blob_key)

        report = verify(services, repair=True, drop_missing=True)
        assert (report.missing_blob.count, report.rows_dropped) == (1, 1)
        assert partition_a.index.find_instance(ds.SOPInstanceUID) is None
        assert partition_a.index.last_action(ds.SOPInstanceUID) == "delete"
        kept = services.index.find_instance(ds.SOPInstanceUID)
        assert kept is not None
        assert kept.blob_key == in_default.blob_key
        assert services.index.last_action(ds.SOPInstanceUID) == "create"
        assert verify(services).clean


def test_dicomcast_takes_only_the_default_partitions_studies(
    tmp_path: Path, index_url: str
) -> None:
    """DICOMcast publishes the default partition: another partition's
    changes move its cursor on without queueing their studies."""
    from appliance.fhir.queue import StudyQueue
    from appliance.index.schema import fhir_study

    config = make_config(tmp_path, APPLIANCE_INDEX_URL=index_url, APPLIANCE_PARTITIONS_ENABLED="1")
    for server in started_server(config):
        services = server.services
        mine, theirs = small_study(1, "DEFAULT")[0], small_study(1, "OTHER")[0]
        store(in_partition(services, "A"), theirs)
        store(services, mine)
        assert StudyQueue(services.engine).pull(dt.timedelta(0)) == 2
        with services.engine.connect() as conn:
            queued = set(conn.execute(select(fhir_study.c.study_instance_uid)).scalars())
        assert queued == {mine.StudyInstanceUID}
