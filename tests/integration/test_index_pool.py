"""The PostgreSQL connection pool is sized by ``[index]`` (pool_size,
max_overflow, pool_timeout), and a request that finds no free connection in
time fails as "index unavailable" (503 / a failure status) instead of
hanging.  SQLite keeps no pool of its own size: the keys are unused there."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from sqlalchemy import text

from appliance.config import Config, IndexConfig
from appliance.errors import IndexUnavailable
from appliance.index.engine import engine_for
from appliance.model import Level
from appliance.query.service import Query, QueryService

pytestmark = pytest.mark.integration

#: a search that matches nothing, whatever other tests left in the database
NOTHING = {"StudyInstanceUID": "1.2.826.0.1.3680043.2.1143.999999"}


def _index(url: str, **pool: int) -> IndexConfig:
    return dataclasses.replace(Config().index, url=url, **pool)


def test_the_pool_takes_its_sizes_from_the_config(pg_database_url: str) -> None:
    engine = engine_for(_index(pg_database_url, pool_size=3, max_overflow=7, pool_timeout=9))
    try:
        pool = engine.pool
        assert pool.size() == 3  # type: ignore[attr-defined]
        assert pool._max_overflow == 7  # type: ignore[attr-defined]
        assert pool._timeout == 9  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_no_free_connection_in_time_is_index_unavailable(pg_database_url: str) -> None:
    engine = engine_for(_index(pg_database_url, pool_size=1, max_overflow=0, pool_timeout=1))
    query = QueryService(engine, max_results=10)
    held = engine.connect()  # the only connection the pool may hand out
    try:
        held.execute(text("SELECT 1"))
        started = time.monotonic()
        with pytest.raises(IndexUnavailable, match="TimeoutError"):
            query.search(Query(Level.STUDY, NOTHING))
        waited = time.monotonic() - started
        assert 0.9 <= waited < 10  # waited for pool_timeout, then gave up
    finally:
        held.close()
    try:
        # the connection is back: the same service answers again
        assert query.search(Query(Level.STUDY, NOTHING)).matches == []
        # and a waiter is served as soon as a connection is returned
        second = engine.connect()
        results: list[int] = []
        worker = threading.Thread(
            target=lambda: results.append(len(query.search(Query(Level.STUDY, NOTHING)).matches))
        )
        worker.start()
        time.sleep(0.3)
        second.close()
        worker.join(timeout=5)
        assert results == [0]
    finally:
        engine.dispose()
