"""``dicom-appliance serve`` as a real process on loopback: readiness, C-ECHO
from dcmtk's echoscu (accepted, wrong Called AE, unknown Calling AE), clean
stop on SIGTERM, stop when a child dies, refusals at start.

Every appliance runs in its own temporary working directory on free ports,
configured through ``APPLIANCE_*`` variables only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance import runstate
from appliance.config import load_config
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.server import Child, stop_children
from dicomweb.app import close_app, create_app
from tests.conftest import missing_peer

pytestmark = pytest.mark.integration

ECHOSCU = Path("/usr/bin/echoscu")
#: Seconds an appliance gets to become ready (gunicorn workers, imports).
READY_TIMEOUT = 60.0
#: Seconds a stopping appliance gets (the supervisor's own limit is 10 s).
STOP_TIMEOUT = 15.0
AE_TITLE = "DICOM_EDGE"


# --------------------------------------------------------------------------
# helpers


def free_port() -> int:
    """A TCP port nobody listens on right now (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Nothing accepts on *port* and it can be bound again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def appliance_command() -> list[str]:
    """The installed console script, or the module if it is missing."""
    script = Path(sys.executable).parent / "dicom-appliance"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "appliance.cli"]


def echoscu() -> str:
    """dcmtk's echoscu (not pynetdicom's script of the same name)."""
    if not ECHOSCU.is_file():
        missing_peer(f"dcmtk is not installed ({ECHOSCU} is missing)")
    version = subprocess.run(
        [str(ECHOSCU), "--version"], capture_output=True, text=True, check=False
    ).stdout
    if "dcmtk" not in version.lower() and "offis" not in version.lower():
        missing_peer(f"{ECHOSCU} is not dcmtk's echoscu: {version[:80]!r}")
    return str(ECHOSCU)


def run_echo(port: int, *, calling: str = "TESTSCU", called: str = AE_TITLE) -> tuple[int, str]:
    """C-ECHO with dcmtk; the exit code and the output."""
    result = subprocess.run(
        [echoscu(), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@dataclasses.dataclass
class Site:
    """A working directory and the environment of one appliance."""

    workdir: Path
    http_port: int
    dimse_port: int
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a short ``dicom-appliance`` command to completion."""
        return subprocess.run(
            [*appliance_command(), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *args: str) -> Appliance:
        """Start ``dicom-appliance serve`` in the background."""
        log_path = self.workdir / f"serve-{time.monotonic_ns()}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*appliance_command(), "serve", *args],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return Appliance(self, process, log_path)


@dataclasses.dataclass
class Appliance:
    """A running ``dicom-appliance serve``."""

    site: Site
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.site.http_port}"

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> httpx.Response:
        """Poll ``/health/ready`` until it answers 200."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"serve exited with {self.process.returncode} before ready:\n{self.log}"
                )
            try:
                response = httpx.get(f"{self.base_url}/health/ready", timeout=5)
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if response.status_code == 200:
                    return response
                last = f"{response.status_code} {response.text}"
            time.sleep(0.3)
        pytest.fail(f"not ready within {timeout} s (last: {last}):\n{self.log}")

    def child_pid(self, role: str) -> int:
        """The pid of a child, from the supervisor's start line."""
        match = re.search(rf"started child '{role}' \(pid (\d+)\)", self.log)
        assert match, self.log
        return int(match.group(1))

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the supervisor to exit; its exit code."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout} s:\n{self.log}")

    def kill(self) -> None:
        """Teardown: make sure nothing is left running."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_site(workdir: Path, extra: Mapping[str, str] | None = None) -> Site:
    """A site in *workdir* on free ports, with storage and index inside it."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dimse_port = free_port(), free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("APPLIANCE_")}
    env.update(
        {
            "APPLIANCE_HTTP_PORT": str(http_port),
            "APPLIANCE_HTTP_WORKERS": "2",
            "APPLIANCE_DIMSE_PORT": str(dimse_port),
            "APPLIANCE_DIMSE_AE_TITLE": AE_TITLE,
            "APPLIANCE_STORAGE_PATH": str(workdir / "blobs"),
            "APPLIANCE_INDEX_URL": f"sqlite:///{workdir / 'index.db'}",
        }
    )
    env.update(extra or {})
    return Site(workdir, http_port, dimse_port, env)


@contextlib.contextmanager
def running(site: Site) -> Iterator[Appliance]:
    """A started, ready appliance, stopped afterwards whatever happens."""
    appliance = site.start()
    try:
        appliance.wait_ready()
        yield appliance
    finally:
        appliance.kill()


def migrated_site(workdir: Path, extra: Mapping[str, str] | None = None) -> Site:
    site = make_site(workdir, extra)
    result = site.run("migrate")
    assert result.returncode == 0, result.stderr
    return site


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """One appliance shared by the read-only tests of this module."""
    site = migrated_site(tmp_path_factory.mktemp("serve"))
    with running(site) as running_appliance:
        yield running_appliance


# --------------------------------------------------------------------------
# a running appliance


def test_ready_lists_every_check(appliance: Appliance) -> None:
    response = appliance.wait_ready()

    assert response.headers["content-type"] == "application/health+json"
    body = response.json()
    assert body["status"] == "pass"
    # the required ones, and the storage disk's free space (filesystem)
    assert set(body["checks"]) == {"index", "storage", "dimse", "disk"}
    assert all(entry == [{"status": "pass"}] for entry in body["checks"].values())


def test_live(appliance: Appliance) -> None:
    response = httpx.get(f"{appliance.base_url}/health/live", timeout=5)

    assert response.status_code == 200
    assert response.json() == {"status": "pass"}


def test_unknown_path_is_a_json_404(appliance: Appliance) -> None:
    response = httpx.get(f"{appliance.base_url}/no/such/thing", timeout=5)

    assert response.status_code == 404
    assert response.json()["status"] == 404


def test_echo_from_dcmtk_succeeds(appliance: Appliance) -> None:
    code, output = run_echo(appliance.site.dimse_port)

    assert code == 0, output
    assert "association accepted: calling AE 'TESTSCU'" in appliance.log


def test_wrong_called_ae_title_is_rejected_with_reason_7(appliance: Appliance) -> None:
    code, output = run_echo(appliance.site.dimse_port, called="NOT_THE_EDGE")

    assert code != 0
    assert "Association Rejected" in output
    assert "Rejected Permanent" in output
    assert "Called AE Title Not Recognized" in output


def test_unknown_calling_ae_is_rejected_when_peers_are_required(tmp_path: Path) -> None:
    # starts on an empty database: index.auto_migrate migrates it first
    site = make_site(
        tmp_path,
        {
            "APPLIANCE_INDEX_AUTO_MIGRATE": "true",
            "APPLIANCE_DIMSE_REQUIRE_KNOWN_PEERS": "true",
            "APPLIANCE_DIMSE_PEERS": '[{ae_title = "PACS1", host = "127.0.0.1", port = 104}]',
        },
    )
    with running(site) as appliance:
        known_code, known_output = run_echo(site.dimse_port, calling="PACS1")
        unknown_code, unknown_output = run_echo(site.dimse_port, calling="STRANGER")

        assert known_code == 0, known_output
        assert unknown_code != 0
        assert "Calling AE Title Not Recognized" in unknown_output
        assert "calling AE title not recognised" in appliance.log


# --------------------------------------------------------------------------
# stopping


def test_sigterm_stops_everything_and_frees_the_ports(tmp_path: Path) -> None:
    site = migrated_site(tmp_path)
    appliance = site.start()
    try:
        appliance.wait_ready()  # also leaves the probe's TCP connection open in pynetdicom
        code, output = run_echo(site.dimse_port)
        assert code == 0, output

        started = time.monotonic()
        appliance.process.send_signal(signal.SIGTERM)
        exit_code = appliance.wait(STOP_TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        appliance.kill()

    assert exit_code == 0, appliance.log
    assert elapsed < STOP_TIMEOUT
    assert port_is_free(site.http_port)
    assert port_is_free(site.dimse_port)
    assert "child 'http'" in appliance.log
    assert "child 'dimse-1'" in appliance.log
    assert "child 'dimse-2'" in appliance.log
    assert "Traceback" not in appliance.log


def test_dimse_child_dying_stops_the_service(tmp_path: Path) -> None:
    site = migrated_site(tmp_path)
    appliance = site.start()
    try:
        appliance.wait_ready()
        dimse_pid = appliance.child_pid("dimse-2")

        os.kill(dimse_pid, signal.SIGKILL)
        exit_code = appliance.wait(STOP_TIMEOUT)
    finally:
        appliance.kill()

    assert exit_code != 0
    assert f"child 'dimse-2' (pid {dimse_pid}) was killed by signal SIGKILL" in appliance.log
    assert port_is_free(site.http_port)


def _group_child(code: str) -> Child:
    """A Python child leading its own process group, started like the
    supervisor's children; returns once it has printed 'ready'."""
    process = subprocess.Popen(
        [sys.executable, "-c", code], process_group=0, stdout=subprocess.PIPE, text=False
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"ready"
    return Child("test", process)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_children_kills_a_child_that_ignores_sigterm() -> None:
    child = _group_child(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )

    started = time.monotonic()
    stop_children([child], timeout=1.0)

    assert child.process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert not _group_alive(child.pid)


def test_stop_children_stops_what_a_child_left_in_its_group() -> None:
    # the child exits on SIGTERM but leaves a grandchild (as a gunicorn
    # master killed hard leaves its workers)
    child = _group_child(
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('ready', flush=True)\n"
        "import time; time.sleep(60)\n"
    )

    stop_children([child], timeout=5.0)

    assert child.process.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while _group_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(child.pid)


# --------------------------------------------------------------------------
# refusals at start


def test_serve_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    site = make_site(tmp_path)

    result = site.run("serve")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "dicom-appliance migrate" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert port_is_free(site.http_port)


def test_serve_refuses_an_unknown_key_naming_it(tmp_path: Path) -> None:
    site = migrated_site(tmp_path)
    config = tmp_path / "appliance.toml"
    config.write_text("[http]\nworkers = 1\nthread_count = 4\n")

    result = site.run("serve", "--config", str(config))

    assert result.returncode == 2
    assert "http.thread_count" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --------------------------------------------------------------------------
# readiness as the DIMSE process tells it (in-process app)


def test_ready_follows_the_dimse_readiness_marker(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    config = load_config(environ=site.env, cwd=tmp_path)
    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def dimse_check(app_run_dir: Path | None) -> tuple[int, dict[str, Any]]:
        app = create_app(config, run_dir=app_run_dir)
        try:
            response = app.test_client().get("/health/ready")
        finally:
            close_app(app)
        assert response.mimetype == "application/health+json"
        body = response.get_json(force=True)
        assert body["checks"]["index"] == [{"status": "pass"}]
        assert body["checks"]["storage"] == [{"status": "pass"}]
        return response.status_code, body["checks"]["dimse"][0]

    # no supervisor: nothing says the DIMSE listener runs
    status, dimse = dimse_check(None)
    assert (status, dimse["status"]) == (503, "fail")
    assert "serve" in dimse["output"]
    # the DIMSE process has not bound its socket yet
    status, dimse = dimse_check(run_dir)
    assert (status, dimse["status"]) == (503, "fail")
    # one of the two workers listens: not yet
    runstate.mark_ready(run_dir, "dimse-1")
    status, dimse = dimse_check(run_dir)
    assert (status, dimse["status"]) == (503, "fail")
    assert "dimse-2" in dimse["output"]
    # both listen, and are alive (this process stands in for them)
    runstate.mark_ready(run_dir, "dimse-2")
    assert dimse_check(run_dir) == (200, {"status": "pass"})
    # a process is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "dimse-2.ready").write_text(str(dead.pid))
    status, dimse = dimse_check(run_dir)
    assert status == 503
    assert "gone" in dimse["output"]


def test_readiness_probes_never_take_association_slots(appliance: Appliance) -> None:
    """pynetdicom holds a bare TCP connection for its whole ACSE timeout;
    30 probes in a row must still leave room for a modality's C-ECHO."""
    for _ in range(30):
        assert httpx.get(f"{appliance.base_url}/health/ready", timeout=5).status_code == 200
    code, output = run_echo(appliance.site.dimse_port)
    assert code == 0, output


def test_the_supervisor_and_gunicorns_master_stay_lean(appliance: Appliance) -> None:
    """Memory counts per process: the two processes that read no DICOM never
    load numpy (pydicom's first import) nor the web stack, and never open
    the index, so never load SQLAlchemy; the workers do."""

    def loaded(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    if not Path(f"/proc/{appliance.process.pid}/maps").exists():
        pytest.skip("no /proc on this system")
    supervisor = loaded(appliance.process.pid)
    master = loaded(appliance.child_pid("http"))
    worker = loaded(appliance.child_pid("dimse-1"))
    for library in ("numpy", "sqlalchemy"):  # both have compiled modules
        assert library in worker  # the check sees what it looks for
        assert library not in supervisor
        assert library not in master
