"""The packaging files agree with the code they start: the systemd unit
with the supervisor and install.sh, the env example with the configuration,
the Dockerfile with the command, ports and health route the tests use.
(tests/integration/test_packaging.py runs them.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from appliance import __version__, server
from appliance.config import DimseConfig, HttpConfig, load_config
from dicomweb.app import create_app
from tests import packaging
from tests.integration.test_serve import appliance_command

INSTALL = packaging.INSTALL_SH.read_text(encoding="utf-8")


# --------------------------------------------------------------------------
# systemd/


def test_the_unit_is_a_notify_service_the_main_process_speaks_for() -> None:
    assert packaging.service("Type") == "notify"
    assert packaging.service("NotifyAccess") == "main"
    # systemd signals the supervisor alone; it stops its children itself
    assert packaging.service("KillMode") == "mixed"


def test_reload_sends_sighup_to_serve() -> None:
    """``systemctl reload``: SIGHUP to the supervisor, which reloads the HTTPS
    files (tests/integration/test_https.py sends the same signal)."""
    assert packaging.service("ExecReload") == "/bin/kill -HUP $MAINPID"


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


# --------------------------------------------------------------------------
# Dockerfile


def test_the_image_runs_the_command_the_serve_tests_run() -> None:
    command = [
        *packaging.exec_form(packaging.image_setting("ENTRYPOINT")),
        *packaging.exec_form(packaging.image_setting("CMD")),
    ]

    tested = [Path(appliance_command()[0]).name, "serve"]  # tests/integration/test_serve.py
    assert command == tested == ["dicom-appliance", "serve"]


def test_the_image_exposes_the_default_ports() -> None:
    exposed = packaging.image_setting("EXPOSE").split()

    assert exposed == [str(HttpConfig().port), str(DimseConfig().port)]


def test_the_healthcheck_asks_the_readiness_route_on_the_http_port(tmp_path: Path) -> None:
    command = packaging.healthcheck_command()
    program = command[-1]

    assert command[:2] == ["python", "-c"]
    url = re.search(r"'http://127\.0\.0\.1:' \+ (.+?) \+ '(/[a-z/]+)'", program)
    assert url, program
    assert url.group(1) == f"os.environ.get('APPLIANCE_HTTP_PORT', '{HttpConfig().port}')"
    app = create_app(load_config(environ={}, cwd=tmp_path))
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    assert url.group(2) == "/health/ready"
    assert url.group(2) in routes


def test_the_image_listens_on_every_interface_with_known_keys(tmp_path: Path) -> None:
    env = packaging.image_env()

    assert env["APPLIANCE_HTTP_HOST"] == "0.0.0.0"
    assert env["APPLIANCE_DIMSE_HOST"] == "0.0.0.0"
    config = load_config(environ=env, cwd=tmp_path)  # unknown names would raise
    assert (config.http.host, config.dimse.host) == ("0.0.0.0", "0.0.0.0")


def test_the_image_runs_as_a_user_in_the_data_volume() -> None:
    assert packaging.image_setting("USER") == "10001:10001"
    assert packaging.image_setting("WORKDIR") == "/data"
    assert packaging.image_setting("VOLUME") == "/data"


def test_the_image_installs_this_version_with_every_backend() -> None:
    project = tomllib.loads((packaging.ROOT / "pyproject.toml").read_text())["project"]
    text = packaging.DOCKERFILE.read_text()
    pins = re.findall(r'"dicom-appliance\[([a-z0-9,]+)\]==([^"]+)"', text)

    assert pins == [("postgres,azure,s3", project["version"])]
    assert project["version"] == __version__
    assert {"postgres", "azure", "s3"} <= set(project["optional-dependencies"])
    assert '".[postgres,azure,s3]"' in text  # the builder's wheels


def test_the_image_and_install_sh_build_from_the_same_parts() -> None:
    """What the builder copies is what .dockerignore lets through, what
    install.sh copies, and holds every package pyproject.toml names."""
    ignore = [
        line
        for line in (packaging.ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for word, rest in packaging.dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            copied.update(rest.split()[:-1])
    listed = re.search(r"for part in ([^;]+); do", INSTALL)
    pyproject = tomllib.loads((packaging.ROOT / "pyproject.toml").read_text())
    packages = {
        name.rstrip("*") for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }

    assert ignore[0] == "*"
    assert copied == allowed
    assert listed
    assert set(listed.group(1).split()) == copied
    assert packages <= copied
