"""Data partitions (issue 11): names, the ``[partitions]`` settings, the
partition an association works in, and the path rewriting of the DICOMweb
side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError
from appliance.partitions import DEFAULT_NAME, valid_name
from dicomweb.partitioning import ENVIRON_KEY, MISSING, PartitionRouting
from dimse_bridge.partitions import accepted_titles, partition_name


def config(tmp_path: Path, **environ: str) -> Any:
    return load_config(environ=environ, cwd=tmp_path)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("A", True),
        ("Microsoft.Default", True),
        ("1.2.840.99", True),
        ("c0ffee-00_x", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("a b", False),
        ("a/b", False),
        ("ü", False),
        ("a*", False),
    ],
)
def test_partition_names(name: str, valid: bool) -> None:
    assert valid_name(name) is valid


def test_partition_settings_need_partitions_on(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"partitions\.ae_titles"):
        config(tmp_path, APPLIANCE_PARTITIONS_AE_TITLES="CARDIO=cardiology")
    with pytest.raises(ConfigError, match=r"dimse.peers\[0\].partition"):
        config(
            tmp_path, APPLIANCE_DIMSE_PEERS='[{ae_title = "CT1", host = "ct1", partition = "x"}]'
        )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("CARDIO", "is not CALLED_AE_TITLE=PARTITION"),
        ("CARDIO=", "is not a partition name"),
        ("CARDIO=a b", "is not a partition name"),
        ("=cardiology", "must not be empty"),
        ("A_TITLE_LONGER_THAN_16=x", "at most 16 characters"),
        ("CARDIO=a,CARDIO=b", "listed twice"),
    ],
)
def test_bad_ae_title_maps_are_refused(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        config(tmp_path, APPLIANCE_PARTITIONS_ENABLED="1", APPLIANCE_PARTITIONS_AE_TITLES=value)


def test_an_association_works_in_its_peers_then_its_called_titles_partition(
    tmp_path: Path,
) -> None:
    settings = config(
        tmp_path,
        APPLIANCE_PARTITIONS_ENABLED="1",
        APPLIANCE_PARTITIONS_AE_TITLES="CARDIO=cardiology, ONCO=oncology",
        APPLIANCE_DIMSE_PEERS='[{ae_title = "CT1", host = "ct1", partition = "research"},'
        ' {ae_title = "MR1", host = "mr1"}]',
    )
    assert accepted_titles(settings) == {"DICOM_EDGE", "CARDIO", "ONCO"}
    assert partition_name(settings, "MR1", "CARDIO  ") == "cardiology"
    assert partition_name(settings, "MR1", "ONCO") == "oncology"
    assert partition_name(settings, "MR1", "DICOM_EDGE") == DEFAULT_NAME
    # the peer's own partition wins over the title it calls
    assert partition_name(settings, "CT1 ", "CARDIO") == "research"
    assert accepted_titles(config(tmp_path)) == {"DICOM_EDGE"}


def routed(path: str, *, enabled: bool) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], _start: Any) -> list[bytes]:
        seen.update(environ)
        return []

    PartitionRouting(app, enabled)({"PATH_INFO": path}, None)
    return seen


def test_the_partition_segment_is_taken_off_the_path() -> None:
    seen = routed("/v1/partitions/A.1/studies/1.2/series", enabled=True)
    assert seen["PATH_INFO"] == "/v1/studies/1.2/series"
    assert seen[ENVIRON_KEY] == "A.1"
    assert "appliance.partition_error" not in seen
    for path in ("/v1/partitions/A/instances", "/v1/partitions/A/series"):
        assert routed(path, enabled=True)["PATH_INFO"] == path.replace("/partitions/A", "")
    # not a data path: left alone (the list of partitions, the change feed)
    for path in (
        "/v1/partitions",
        "/v1/partitions/A/changefeed",
        "/v1/changefeed",
        "/health/ready",
    ):
        seen = routed(path, enabled=True)
        assert seen["PATH_INFO"] == path
        assert ENVIRON_KEY not in seen
        assert "appliance.partition_error" not in seen


def test_the_refusals_are_noted_for_the_app() -> None:
    assert routed("/v1/studies", enabled=True)["appliance.partition_error"] == MISSING
    assert "appliance.partition_error" not in routed("/v1/studies", enabled=False)
    off = routed("/v1/partitions/A/studies", enabled=False)
    assert off["appliance.partition_error"] == "Data partitions feature is disabled."
    bad = routed("/v1/partitions/a b/studies", enabled=True)
    assert bad["appliance.partition_error"].startswith("PartitionName must be")
