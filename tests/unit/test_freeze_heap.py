"""Each worker takes its start-up heap out of the garbage collector's sight
(appliance.server.freeze_heap): gunicorn's workers once the app is loaded,
the DIMSE and background workers once they are ready."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.server import freeze_heap, gunicorn_settings


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process keeps collecting as before


def test_freeze_heap_moves_the_live_objects_out_of_the_collections(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    gc.collect()  # what earlier tests left unreachable is not alive
    alive = len(gc.get_objects())
    freeze_heap()
    assert gc.get_freeze_count() >= alive * 0.9
    assert len(gc.get_objects()) < alive * 0.1
    # objects made afterwards are collected as usual
    cycle: list[object] = []
    cycle.append(cycle)
    assert any(obj is cycle for obj in gc.get_objects())
    del cycle
    assert gc.collect() >= 1


def test_gunicorn_workers_freeze_once_the_app_is_loaded(unfrozen: None, tmp_path: Path) -> None:
    hook = gunicorn_settings(load_config(environ={}, cwd=tmp_path))["post_worker_init"]
    hook(object())
    assert gc.get_freeze_count() > 0
