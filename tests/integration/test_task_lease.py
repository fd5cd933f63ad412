"""Background work claimed in the index (``task_lease``): one holder at a
time, released when done, taken over once a dead holder's lease expires;
on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import Engine

from appliance.index.sql import SqlIndex

pytestmark = pytest.mark.integration

HOUR = dt.timedelta(hours=1)


def test_one_holder_at_a_time(index_engine: Engine) -> None:
    index = SqlIndex(index_engine)
    assert index.claim("orphan-sweep", "node-a", HOUR)
    assert not index.claim("orphan-sweep", "node-b", HOUR)
    index.release("orphan-sweep", "node-b")  # not the holder: nothing changes
    assert not index.claim("orphan-sweep", "node-b", HOUR)
    assert index.claim("other-task", "node-b", HOUR)  # tasks are independent
    index.release("orphan-sweep", "node-a")
    assert index.claim("orphan-sweep", "node-b", HOUR)


def test_an_expired_lease_is_taken_over(index_engine: Engine) -> None:
    """A holder that died without releasing keeps the task only until its
    lease runs out."""
    index = SqlIndex(index_engine)
    assert index.claim("orphan-sweep", "dead-node", -dt.timedelta(seconds=1))
    assert index.claim("orphan-sweep", "node-b", HOUR)
    assert not index.claim("orphan-sweep", "dead-node", HOUR)


def test_claims_at_the_same_moment_give_the_task_once(index_engine: Engine) -> None:
    index = SqlIndex(index_engine)
    start = threading.Barrier(6)
    won: list[str] = []

    def claim(name: str) -> None:
        start.wait()
        if index.claim("orphan-sweep", name, HOUR):
            won.append(name)

    threads = [threading.Thread(target=claim, args=(f"node-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == 1
