"""The packaging files agree with the code they start: the systemd unit
with the supervisor and install.sh, the env example with the configuration.
(tests/integration/test_packaging.py runs them.)"""

from __future__ import annotations

from pathlib import Path

from appliance import server
from appliance.config import load_config
from tests import packaging

INSTALL = packaging.INSTALL_SH.read_text(encoding="utf-8")


# --------------------------------------------------------------------------
# systemd/


def test_the_unit_is_a_notify_service_the_main_process_speaks_for() -> None:
    assert packaging.service("Type") == "notify"
    assert packaging.service("NotifyAccess") == "main"
    # systemd signals the supervisor alone; it stops its children itself
    assert packaging.service("KillMode") == "mixed"


def test_the_unit_runs_serve_with_the_installed_config() -> None:
    argv = packaging.exec_start()

    assert argv == [
        "/opt/dicom-appliance/venv/bin/dicom-appliance",
        "serve",
        "--config",
        "/etc/dicom-appliance/appliance.toml",
    ]
    # where install.sh puts them
    assert "venv=$root/opt/$NAME/venv" in INSTALL
    assert "etc=$root/etc/$NAME" in INSTALL
    assert '"$etc/appliance.toml"' in INSTALL


def test_the_unit_waits_longer_than_the_supervisor_stops() -> None:
    stop = int(packaging.service("TimeoutStopSec"))
    # the supervisor's own limit, then up to 2 s per child to reap its group
    assert stop > server.STOP_TIMEOUT + 2 * 4


def test_the_state_folder_is_the_working_folder_and_the_only_one_written() -> None:
    state = packaging.service("StateDirectory")
    assert packaging.service("WorkingDirectory") == f"/var/lib/{state}"
    assert packaging.service("ReadWritePaths") == f"/var/lib/{state}"
    assert packaging.service("ProtectSystem") == "strict"
    assert "state=$root/var/lib/$NAME" in INSTALL


def test_the_unit_reads_secrets_from_the_optional_env_file() -> None:
    assert packaging.service("EnvironmentFile") == "-/etc/dicom-appliance/appliance.env"
    assert '"$etc/appliance.env"' in INSTALL


def test_the_unit_may_bind_port_104_and_nothing_more() -> None:
    assert packaging.service("User") == "dicom-appliance"
    assert packaging.service("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert packaging.service("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert packaging.service("NoNewPrivileges") == "yes"


def test_every_env_example_block_is_a_configuration_that_loads(tmp_path: Path) -> None:
    blocks = packaging.env_example_blocks()

    assert len(blocks) >= 4
    for block in blocks:
        assert all(name.startswith("APPLIANCE_") for name in block)
        load_config(environ=block, cwd=tmp_path)  # unknown names or bad values raise


def test_install_sh_is_strict_posix_sh() -> None:
    assert INSTALL.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in INSTALL
