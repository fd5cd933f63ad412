"""The composition of the core's services from one configuration.

Each process (a gunicorn worker, the DIMSE listener, a CLI command) builds its
own :class:`Services` after it has started: database engines and file handles
are never shared across a fork.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import Engine

from appliance.audit import AuditLog
from appliance.config import Config
from appliance.delete import DeleteService
from appliance.extended_tags import ExtendedTags
from appliance.forward.routes import Routes
from appliance.index import migrate
from appliance.index.engine import engine_for
from appliance.index.schema import DEFAULT_PARTITION_KEY
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.logs import quiet_pydicom
from appliance.partitions import Partitions
from appliance.query import QueryService
from appliance.retrieve import RetrieveService
from appliance.storage import BlobStore, open_blob_store


@dataclasses.dataclass
class Services:
    """Everything the protocol edges call, bound to one configuration."""

    config: Config
    engine: Engine
    storage: BlobStore
    index: SqlIndex
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    delete: DeleteService
    #: the audit trail this process writes
    audit: AuditLog
    #: the extended query tags (their list cached in this process)
    extended: ExtendedTags
    #: the data partitions (their keys cached in this process)
    partitions: Partitions

    @property
    def partition_key(self) -> int:
        """The data partition these services read and write."""
        return self.index.partition_key

    def in_partition(self, partition_key: int) -> Services:
        """These services bound to the data partition *partition_key*: the
        index, queries, ingest, retrieve and delete see only its rows (light
        copies sharing the engine, the storage and the caches)."""
        if partition_key == self.index.partition_key:
            return self
        return dataclasses.replace(
            self,
            index=self.index.in_partition(partition_key),
            ingest=self.ingest.in_partition(partition_key),
            query=self.query.in_partition(partition_key),
            retrieve=self.retrieve.in_partition(partition_key),
            delete=self.delete.in_partition(partition_key),
        )

    def check_ready(self) -> dict[str, str]:
        """Probe the index and the storage; ``{"index": "ok", ...}`` or the
        failure's reason per dependency."""
        results: dict[str, str] = {}
        for name, probe in (("index", self.index.check), ("storage", self.storage.check)):
            try:
                probe()
            except Exception as exc:  # noqa: BLE001 - a probe reports, never raises
                results[name] = f"failed: {exc.__class__.__name__}: {exc}"
            else:
                results[name] = "ok"
        return results

    def close(self) -> None:
        self.engine.dispose()
        self.audit.close()


def build_services(config: Config, *, require_schema: bool = True) -> Services:
    """Open the storage and the index named by *config*.

    Raises
    ------
    SchemaNotCurrent
        if *require_schema* and the index is not migrated to this version.
    ConfigError
        for a storage backend that is not available.
    """
    quiet_pydicom()  # every process that reads DICOM builds its services
    engine = engine_for(config.index)
    try:
        if require_schema:
            migrate.require_current(engine)
        storage = open_blob_store(config.storage)
    except BaseException:
        engine.dispose()
        raise
    index = SqlIndex(engine)
    routes = Routes(config.forward)
    extended = ExtendedTags(engine)
    return Services(
        config=config,
        engine=engine,
        storage=storage,
        index=index,
        ingest=IngestService(storage, index, config.ingest, routes, extended),
        query=QueryService(
            engine,
            max_results=config.query.max_results,
            extended=extended,
            # partitions off: no partition condition at all (see QueryService)
            partition_key=DEFAULT_PARTITION_KEY if config.partitions.enabled else None,
        ),
        retrieve=RetrieveService(index, storage),
        delete=DeleteService(index, storage, routes.deletes_to),
        audit=AuditLog(config.audit),
        extended=extended,
        partitions=Partitions(engine),
    )
