"""The load driver of ``make load`` / ``make soak`` (bench/load.py), short.

For about 30 seconds, dcmtk ``storescu`` associations, pynetdicom C-STORE
associations, STOW-RS clients and QIDO-RS / WADO-RS readers run at once
against ``dicom-appliance serve`` on loopback; then every acknowledged
instance must be found (QIDO-RS, C-FIND) and retrieved as it was sent
(WADO-RS), ``verify --deep`` must be clean, and no request may have failed.
The figures are printed (``-s``) but never compared with a target: this
machine is shared and small.  The memory and descriptor sampler of the soak
runs too, its figures checked for being there, not for being flat (30 s is
mostly warm-up).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import Mix, flatness, run, table
from tests.conftest import dcmtk

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECONDS = 30


def test_a_short_load_loses_nothing_and_fails_no_request(tmp_path: Path) -> None:
    dcmtk("storescu")  # skips (fails under CI) without dcmtk

    document = run(tmp_path, SECONDS, Mix(), "load-test", interval=2.0)

    found, check = document["figures"], document["check"]
    print("\n" + table(found))
    assert found["instances_acknowledged"] > 0
    assert set(found["instances_acknowledged_by"]) == {"storescu", "c-store", "stow"}
    assert {"qido", "wado"} <= set(found["kinds"])
    assert found["error_rate"] == 0, document["error_examples"]
    assert document["problems_during_load"] == []
    assert check["acknowledged"] == check["retrieved_identical"] == found["instances_acknowledged"]
    for key in ("missing_qido", "missing_cfind", "missing_wado", "altered"):
        assert check[key] == 0, (key, check["examples"])
    assert check["verify_exit"] == 0, check["verify"]
    # the soak's sampler saw every serve process (supervisor, gunicorn and
    # its 2 workers, 2 DIMSE listeners) every 2 s
    samples = document["soak"]["samples"]
    assert len(samples) >= SECONDS // 2 - 2
    assert all(len(s["processes"]) >= 6 for s in samples), samples[0]
    assert all(s["rss_kb"] > 0 and s["fds"] > 0 for s in samples)


def test_flatness_tells_growth_from_noise() -> None:
    noisy = [100.0, 104, 98, 103, 99, 105, 101, 97, 102, 100, 103, 99]
    growing = [100.0 + 10 * i for i in range(12)]

    assert flatness(noisy, ratio=0.10, slack=0)["flat"] is True
    assert flatness(growing, ratio=0.10, slack=0)["flat"] is False
    # a step up that stops is not steady growth
    step = [100.0] * 3 + [180.0] * 9
    assert flatness(step, ratio=0.10, slack=0)["flat"] is True
    assert flatness(growing[:5], ratio=0.10, slack=0)["flat"] is None
