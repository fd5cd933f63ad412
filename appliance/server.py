"""The supervisor behind ``dicom-appliance serve``.

It runs the two protocol edges as child processes and keeps them together:

``http``
    gunicorn serving :func:`dicomweb.app.create_app` (DICOMweb, health).
``dimse-1`` .. ``dimse-N``
    ``dimse.workers`` pynetdicom listeners (:mod:`dimse_bridge.ae`) sharing
    one listening socket: the supervisor binds ``dimse.host:dimse.port``
    (so a port in use stops ``serve`` at once) and hands the socket to each
    worker, and the kernel gives each new connection to one of them.  One
    Python process runs Python code on one core at a time; several workers
    use every core for the associations of several modalities at once.

This is the composition root: the only module that imports both edges, and
it does so only inside the child entry points (:func:`run_http`,
:func:`run_dimse`), so the supervisor process itself loads neither.

Each child is started as ``python -m appliance.server ROLE [--config FILE]``
with the supervisor's environment and working directory, so it loads the
same effective configuration.  Each child leads its own process group (the
gunicorn workers join the ``http`` group), so the supervisor alone decides
when children stop, and can kill a whole group if a child hangs.  On Linux a
child also gets SIGTERM if the supervisor dies without stopping it.

Readiness: once the children are started, the supervisor asks the HTTP
child's ``GET /health/ready`` (the probe a load balancer uses: index and
storage reachable, every DIMSE worker listening) until it passes, then logs
``ready`` and, under systemd (``Type=notify``), sends ``READY=1``
(:mod:`appliance.sdnotify`).  The children do not get ``NOTIFY_SOCKET``.

SIGHUP (once ready; one received before waits until then): with HTTPS,
the supervisor checks the certificate files again
(:func:`appliance.https.check_files`) and, if they are fine, passes SIGHUP to
gunicorn's master, which loads them anew, starts new workers and lets
the old ones finish their requests; bad files are logged and the running
workers keep serving the old certificate.  The DIMSE workers and
the background worker are not signalled.  Without HTTPS, SIGHUP is passed
to gunicorn's master likewise (its workers restart) and nothing else happens.

Stopping: SIGTERM or SIGINT to the supervisor sends ``STOPPING=1`` to
systemd, SIGTERM to each child, waits up to :data:`STOP_TIMEOUT` seconds,
kills what is left, and returns 0.  A child that exits by itself is logged
with its exit code, the other children are stopped, and :func:`serve`
returns 1, so that systemd restarts the service.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import http.client
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from appliance import https, runstate, sdnotify
from appliance.config import Config, LogConfig, load_config, resolve_index_url
from appliance.errors import ApplianceError, ConfigError
from appliance.logs import ACCESS_LOG_FORMAT, logging_config, set_process_name, setup_logging

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from appliance.services import Services

#: Named explicitly: a child runs this module as ``__main__``.
LOGGER = logging.getLogger("appliance.server")

#: prometheus-client keeps each child's metrics in files in this folder
#: (:mod:`appliance.metrics`); named here so the supervisor need not import it.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The kinds of children, in start order (``worker`` only when there is
#: background work configured: forwarding, DICOMcast or retention).
ROLES = ("http", "dimse", "worker")
#: What ``python -m appliance.server`` runs: a child, or the supervisor.
COMMANDS = ("supervise", *ROLES)
#: Connections the kernel queues on the DIMSE socket before the workers
#: accept them.
DIMSE_BACKLOG = 128
#: Seconds the children get to stop after SIGTERM before they are killed.
STOP_TIMEOUT = 10.0
#: Seconds gunicorn gives its workers to finish requests (below STOP_TIMEOUT).
HTTP_GRACEFUL_TIMEOUT = 7
#: Seconds between checks on the children.
POLL_INTERVAL = 0.2
#: Seconds between two readiness probes while the appliance is not ready.
READY_PROBE_INTERVAL = 0.5
#: Seconds one readiness probe may take.
READY_PROBE_TIMEOUT = 2.0
#: Seconds after which (and then every so many seconds) the supervisor warns
#: that the appliance is still not ready, with the reason.
NOT_READY_WARNING = 60.0
#: Linux prctl(2) option: the signal sent when the parent dies.
_PR_SET_PDEATHSIG = 1
#: gunicorn settings that older releases lack (skipped there).
_NEWER_GUNICORN_SETTINGS = frozenset({"control_socket_disable"})


# --------------------------------------------------------------------------
# the supervisor


@dataclasses.dataclass
class Child:
    """A started child process; *name* is its role, and its number for a
    DIMSE worker (``dimse-2``)."""

    name: str
    process: subprocess.Popen[bytes]

    @property
    def role(self) -> str:
        return self.name.split("-")[0]

    @property
    def pid(self) -> int:
        """The child's process id, also the id of its process group."""
        return self.process.pid


def child_command(
    role: str,
    config: Config,
    run_dir: Path,
    *,
    worker: int = 0,
    listen_fd: int | None = None,
    tls_listen_fd: int | None = None,
) -> list[str]:
    """The command line that starts the child *role* with *config*'s file
    and the run folder shared by the children (see :mod:`appliance.runstate`);
    for a DIMSE worker, its number and the listening sockets' descriptors."""
    command = [sys.executable, "-m", "appliance.server", role, "--run-dir", str(run_dir)]
    if config.source is not None:
        command += ["--config", str(config.source)]
    if worker:
        command += ["--worker", str(worker)]
    if listen_fd is not None:
        command += ["--listen-fd", str(listen_fd)]
    if tls_listen_fd is not None:
        command += ["--tls-listen-fd", str(tls_listen_fd)]
    return command


@dataclasses.dataclass
class DimseSockets:
    """The listening sockets the DIMSE workers share: the plain one (None
    with ``dimse.tls_only``) and the DICOM TLS one (None without
    ``dimse.tls_port``)."""

    plain: socket.socket | None
    tls: socket.socket | None

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(s.fileno() for s in (self.plain, self.tls) if s is not None)

    def close(self) -> None:
        for sock in (self.plain, self.tls):
            if sock is not None:
                sock.close()


def bind_dimse_sockets(config: Config) -> DimseSockets:
    """Bind the DIMSE listening sockets *config* asks for.

    Raises
    ------
    OSError
        if one cannot be bound (e.g. in use); its port is in the message.
    """
    dimse = config.dimse
    plain = None if dimse.tls_only else bind_dimse(config)
    tls = None
    if dimse.tls_port:
        try:
            tls = bind_dimse(config, dimse.tls_port)
        except OSError as exc:
            if plain is not None:
                plain.close()
            raise OSError(exc.errno, f"port {dimse.tls_port} (dimse.tls_port): {exc}") from None
    return DimseSockets(plain, tls)


def bind_dimse(config: Config, port: int | None = None) -> socket.socket:
    """A listening socket the DIMSE workers share, on ``dimse.host`` and
    *port* (``dimse.port`` by default).

    Raises
    ------
    OSError
        if ``dimse.host:port`` cannot be bound (e.g. in use).
    """
    host = config.dimse.host
    port = config.dimse.port if port is None else port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a restart may bind while connections of the last run are in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(DIMSE_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(config: Config) -> int:
    """Run both children until a signal or until one of them exits.

    Parameters
    ----------
    config
        The validated configuration; its file (if any) is passed on to the
        children, which inherit the environment and working directory.

    Returns
    -------
    int
        0 after a clean stop on SIGTERM/SIGINT, 1 if a child exited by itself.
    """
    received: list[int] = []
    hangups: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    def on_hangup(signum: int, _frame: FrameType | None) -> None:
        hangups.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    children: list[Child] = []
    run_dir = Path(tempfile.mkdtemp(prefix="dicom-appliance-run-"))
    try:
        try:
            sockets = bind_dimse_sockets(config)
        except OSError as exc:
            LOGGER.error("cannot listen for DICOM associations on %s: %s", config.dimse.host, exc)
            return 1
        # the children's metrics files (appliance.metrics), in this start's
        # own run folder, so no value of an earlier start is counted again
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        if config.http.tls and config.http.tls_client_certs == "required":
            # the readiness probe's own client certificate (trusted by the
            # http workers of this start only)
            https.make_probe_identity(run_dir)
        env = {**sdnotify.child_environment(), METRICS_DIR_ENV: str(metrics_dir)}
        try:
            for name, command in _children(config, run_dir, sockets):
                if received:
                    break
                children.append(_start(name, command, sockets.fds, env))
        finally:
            sockets.close()
        # the workers hold the socket now; the port frees when they stop
        readiness = ReadinessWatch(config, run_dir)
        while not received:
            # SIGHUP waits until ready: before, gunicorn's master may not
            # handle it yet (SIGHUP's default would stop it), and it reads
            # the files when it starts anyway
            if hangups and readiness.ready:
                hangups.clear()
                reload_http(config, children)
            for child in children:
                code = child.process.poll()
                if code is not None:
                    why = f"child '{child.name}' (pid {child.pid}) {describe_exit(code)}"
                    LOGGER.error("%s; stopping the appliance", why)
                    sdnotify.notify("STOPPING=1", sdnotify.status(f"stopping: {why}"))
                    stop_children(children)
                    return 1
            if not received and readiness.check():
                LOGGER.info("ready: %s", readiness.describe())
                sdnotify.notify("READY=1", sdnotify.status(f"ready: {readiness.describe()}"))
            time.sleep(POLL_INTERVAL)
        name = signal.Signals(received[0]).name
        LOGGER.info("received %s: stopping", name)
        sdnotify.notify("STOPPING=1", sdnotify.status(f"stopping on {name}"))
        stop_children(children)
        LOGGER.info("stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(run_dir, ignore_errors=True)


class ReadinessWatch:
    """Whether the started appliance is ready yet, by its own readiness probe.

    :meth:`check` asks ``GET /health/ready`` of the HTTP child (at most every
    :data:`READY_PROBE_INTERVAL` seconds) until it answers 200; meanwhile
    it keeps systemd's status line on the reason and warns in the log every
    :data:`NOT_READY_WARNING` seconds.
    """

    def __init__(self, config: Config, run_dir: Path | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.ready = False
        self._started = time.monotonic()
        self._next_probe = self._started
        self._next_warning = self._started + NOT_READY_WARNING
        self._problem = ""

    def check(self) -> bool:
        """Probe if one is due; True once, when the appliance is first found
        ready."""
        now = time.monotonic()
        if self.ready or now < self._next_probe:
            return False
        problem = probe_ready(self.config, self.run_dir)
        if problem is None:
            self.ready = True
            return True
        self._next_probe = time.monotonic() + READY_PROBE_INTERVAL
        if problem != self._problem:
            self._problem = problem
            sdnotify.notify(sdnotify.status(f"starting: {problem}"))
        if now >= self._next_warning:
            LOGGER.warning("not ready after %.0f s: %s", now - self._started, problem)
            self._next_warning = now + NOT_READY_WARNING
        return False

    def describe(self) -> str:
        """Where the appliance listens, for the log and systemd's status."""
        web, dimse = self.config.http, self.config.dimse
        listeners = [] if dimse.tls_only else [_address(dimse.host, dimse.port)]
        if dimse.tls_port:
            listeners.append(f"{_address(dimse.host, dimse.tls_port)} (TLS)")
        scheme = "https://" if web.tls else ""  # plain HTTP: the address alone
        return (
            f"DICOMweb on {scheme}{_address(web.host, web.port)}, DIMSE {dimse.ae_title} "
            f"on {' and '.join(listeners)}"
        )


def probe_ready(config: Config, run_dir: Path | None = None) -> str | None:
    """None if the HTTP child's ``GET /health/ready`` answers 200, else why
    not (no answer yet, or the checks that fail).  Over HTTPS when the port
    speaks it (:func:`appliance.https.probe_context`: the server is not
    verified; the probe's client certificate in *run_dir* is offered)."""
    host = probe_host(config.http.host)
    connection: http.client.HTTPConnection
    if config.http.tls:
        connection = http.client.HTTPSConnection(
            host,
            config.http.port,
            timeout=READY_PROBE_TIMEOUT,
            context=https.probe_context(run_dir),
        )
    else:
        connection = http.client.HTTPConnection(host, config.http.port, timeout=READY_PROBE_TIMEOUT)
    try:
        connection.request("GET", "/health/ready")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"DICOMweb does not answer on {_address(host, config.http.port)} yet ({exc})"
    finally:
        connection.close()
    if response.status == 200:
        return None
    return f"/health/ready answers {response.status}: {_failed_checks(body)}"


def reload_http(config: Config, children: Sequence[Child]) -> None:
    """SIGHUP: check the HTTPS files, then have gunicorn's master restart its
    workers gracefully (they read the certificate again); the DIMSE and
    background workers go on untouched."""
    certificate = ""
    if config.http.tls:
        try:
            warnings = https.check_files(config.http)
            certificate = f" with the certificate {https.describe(config.http)}"
        except ApplianceError as exc:
            LOGGER.error("SIGHUP: not reloading, the old certificate stays in use: %s", exc.reason)
            return
        except (OSError, ValueError) as exc:  # changed again since the check
            LOGGER.error("SIGHUP: not reloading, the old certificate stays in use: %s", exc)
            return
        for warning in warnings:
            LOGGER.warning("%s", warning)
    for child in children:
        if child.role == "http" and child.process.poll() is None:
            LOGGER.info("SIGHUP: restarting the DICOMweb workers%s", certificate)
            _signal_process(child.pid, signal.SIGHUP)


def probe_host(host: str) -> str:
    """The address the supervisor reaches a listener bound to *host* at: the
    loopback address for a wildcard bind (``0.0.0.0``, ``::``)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a host name
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _failed_checks(body: bytes) -> str:
    """``dimse: the dimse-1 process has not said it is ready; ...`` from a
    health+json body (or its first 200 characters if it is not one)."""
    try:
        checks = json.loads(body)["checks"]
        failed = [
            f"{name}: {entry.get('output', 'fail')}"
            for name, entries in checks.items()
            for entry in entries
            if entry.get("status") != "pass"
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode(errors="replace")
    return "; ".join(failed) or "no failed check named"


def tls_marker(worker_name: str) -> str:
    """The readiness marker of a DIMSE worker's TLS listener."""
    return f"{worker_name}-tls"


def dimse_worker_names(config: Config) -> list[str]:
    """The names of the DIMSE workers (and of their readiness markers)."""
    return [f"dimse-{number}" for number in range(1, config.dimse.workers + 1)]


def _children(config: Config, run_dir: Path, sockets: DimseSockets) -> list[tuple[str, list[str]]]:
    """(name, command line) of each child, in start order."""
    children = [("http", child_command("http", config, run_dir))]
    plain = sockets.plain.fileno() if sockets.plain is not None else None
    tls = sockets.tls.fileno() if sockets.tls is not None else None
    for number, name in enumerate(dimse_worker_names(config), start=1):
        command = child_command(
            "dimse", config, run_dir, worker=number, listen_fd=plain, tls_listen_fd=tls
        )
        children.append((name, command))
    retention = config.retention
    if config.forward or config.fhir.url or retention.max_age_days or retention.free_target_mb:
        children.append(("worker", child_command("worker", config, run_dir)))
    return children


def _start(
    name: str, command: list[str], listen_fds: tuple[int, ...], env: dict[str, str]
) -> Child:
    process = subprocess.Popen(
        command,
        env=env,  # only the supervisor talks to systemd (no NOTIFY_SOCKET)
        process_group=0,
        preexec_fn=_die_with_parent(),
        pass_fds=listen_fds if name.startswith("dimse") else (),
    )
    LOGGER.info("started child '%s' (pid %d)", name, process.pid)
    return Child(name, process)


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec function asking Linux to SIGTERM the child when the
    supervisor dies (even by SIGKILL); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def pre_exec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return pre_exec


def stop_children(children: Sequence[Child], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every running child, wait up to *timeout* seconds in all, then
    SIGKILL the process groups of those still running.  Leftovers of a child
    group (e.g. workers of a gunicorn master that died) are stopped too."""
    running = [child for child in children if child.process.poll() is None]
    for child in running:
        _signal_process(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in running:
        _await_exit(child, deadline, timeout)
    for child in children:
        _reap_group(child.pid)


def _await_exit(child: Child, deadline: float, timeout: float) -> None:
    try:
        child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        LOGGER.warning(
            "child '%s' (pid %d) did not stop within %.0f s: killing it",
            child.name,
            child.pid,
            timeout,
        )
        _signal_group(child.pid, signal.SIGKILL)
        child.process.wait()
    else:
        LOGGER.info(
            "child '%s' (pid %d) %s", child.name, child.pid, describe_exit(child.process.returncode)
        )


def _signal_process(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send *sig* to a process group (0: only check it exists); False if the
    group is empty."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _reap_group(pgid: int, grace: float = 2.0) -> None:
    """Stop processes left in a child's group after its leader has exited."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not _signal_group(pgid, 0):
            return
    LOGGER.warning("killing processes left in process group %d", pgid)
    _signal_group(pgid, signal.SIGKILL)


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by signal SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"was killed by signal {name}"
    return f"exited with code {returncode}"


# --------------------------------------------------------------------------
# the children


def run_dimse(
    config: Config,
    run_dir: Path | None,
    worker: int = 1,
    listen_fd: int | None = None,
    tls_listen_fd: int | None = None,
) -> int:
    """Child entry point: DIMSE worker number *worker*, until SIGTERM, on
    the listening sockets *listen_fd* and *tls_listen_fd* (inherited from
    the supervisor), or on sockets of its own if None."""
    from appliance.services import build_services
    from dimse_bridge.ae import run_listener

    services = build_services(config)
    name = f"dimse-{worker}"
    listener = socket.socket(fileno=listen_fd) if listen_fd is not None else None
    tls_listener = socket.socket(fileno=tls_listen_fd) if tls_listen_fd is not None else None

    def tls_listening() -> None:
        if run_dir is not None:
            runstate.mark_ready(run_dir, tls_marker(name))

    def listening() -> None:
        freeze_heap()
        if run_dir is not None:
            runstate.mark_ready(run_dir, name)
        if worker == 1:  # once per start, not once per worker
            threading.Thread(
                target=_sweep, args=(services,), name="orphan-sweep", daemon=True
            ).start()
            # the re-index operations of extended query tags (one node at a
            # time: appliance/reindex.py)
            threading.Thread(
                target=_reindex, args=(services,), name="eqt-reindex", daemon=True
            ).start()

    try:
        run_listener(
            config,
            services,
            on_listening=listening,
            listen_socket=listener,
            tls_socket=tls_listener,
            on_tls_listening=tls_listening,
        )
    except OSError as exc:
        LOGGER.error("cannot listen for DICOM associations on %s: %s", config.dimse.host, exc)
        return 1
    finally:
        if run_dir is not None:
            runstate.clear(run_dir, name)
            runstate.clear(run_dir, tls_marker(name))
        services.close()
    return 0


def run_worker(config: Config) -> int:
    """Child entry point: background work (the forwarding senders, DICOMcast,
    retention) until SIGTERM or SIGINT."""
    from appliance.services import build_services

    services = build_services(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    jobs: list[tuple[str, Callable[[threading.Event], None], Callable[[], None]]] = []
    try:
        if config.forward:
            from appliance.forward.outbox import Outbox
            from appliance.forward.worker import Forwarder

            forwarder = Forwarder(
                config.forward,
                Outbox(services.engine),
                services.index,
                services.retrieve,
                audit=services.audit,
            )
            jobs.append(("forward", forwarder.run, forwarder.close))
        if config.fhir.url:
            from appliance.fhir.worker import DicomCast

            cast = DicomCast(config, services.engine, audit=services.audit)
            jobs.append(("fhir", cast.run, cast.close))
        retention = _retention(config, services)
        if retention.enabled:
            jobs.append(("retention", retention.serve, lambda: None))
        freeze_heap()
        threads = [
            threading.Thread(target=run, args=(stop,), name=name, daemon=True)
            for name, run, _ in jobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for _, _, close in jobs:
            close()
        services.close()
    LOGGER.info("background worker stopped")
    return 0


def _retention(config: Config, services: Services) -> Any:
    from appliance.retention import Retention

    return Retention(
        config.retention, services.engine, services.index, services.storage, services.audit
    )


def _reindex(services: Services) -> None:
    """Run the extended query tags' re-index operations until the process
    ends (a daemon thread of DIMSE worker 1, like the orphan sweep)."""
    from appliance.reindex import Reindexer

    reindexer = Reindexer(services.engine, services.index, services.storage, services.extended)
    reindexer.serve(threading.Event())


def _sweep(services: Services) -> None:
    """Remove blobs a crash left without an index row (once, at start).
    Nodes sharing the index and the store sweep one at a time: the sweep is
    claimed in the index (``task_lease``), and a node that finds it claimed
    by another (or by ``reindex``) leaves it to that one."""
    from appliance.ingest.sweep import claimed_sweep, sweep_orphans

    try:
        with claimed_sweep(services.index) as lease:
            if lease is None:
                LOGGER.info("orphan sweep skipped: another node is running it")
                return
            sweep_orphans(services.storage, services.index, lease=lease)
    except Exception:
        LOGGER.exception("the orphan sweep failed; it runs again at the next start")


def gunicorn_settings(config: Config, served: https.ServedContext | None = None) -> dict[str, Any]:
    """gunicorn's settings for *config*: bind, workers, logging to stdout,
    and with HTTPS, TLS with the context *served*.

    No ``preload_app``: each worker imports and builds the app (and its own
    services, database connections included) after the fork.
    """
    from appliance.http_worker import HeaderTimeoutWorker

    host, port = config.http.host, config.http.port
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # threads, and a deadline for request headers: slow clients cannot hold
    # every worker (docs/security.md, "Hostile input")
    worker_class = type(
        "HeaderTimeoutWorker",
        (HeaderTimeoutWorker,),
        {
            "header_timeout": float(config.http.header_timeout),
            "idle_timeout": float(config.http.idle_timeout),
        },
    )
    return {
        **_tls_settings(config, served),
        "bind": [bind],
        "workers": config.http.workers,
        "worker_class": worker_class,
        "threads": config.http.threads,
        "pre_request": _pre_request,
        "preload_app": False,
        "proc_name": "dicom-appliance-http",
        "graceful_timeout": HTTP_GRACEFUL_TIMEOUT,
        "loglevel": config.log.level,
        "logconfig_dict": logging_config(config.log),
        "access_log_format": ACCESS_LOG_FORMAT,
        # no control socket under $HOME: the supervisor is the only controller
        "control_socket_disable": True,
        "post_fork": _post_fork,
        "post_worker_init": _post_worker_init,
        "worker_exit": _worker_exit,
        "child_exit": _child_exit,
    }


def _tls_settings(config: Config, served: https.ServedContext | None) -> dict[str, Any]:
    """gunicorn's TLS settings: its own keys (so that it wraps every
    connection and names the scheme https), and our ``ssl_context`` with the
    profile of :mod:`appliance.https`, built in gunicorn's master."""
    web = config.http
    if not web.tls:
        return {}
    return {
        "certfile": web.tls_cert_file,
        "keyfile": web.tls_key_file,
        "ca_certs": web.tls_ca_file or None,
        "cert_reqs": int(https.CLIENT_CERTS[web.tls_client_certs]),
        "ssl_context": served if served is not None else https.ServedContext(web, None),
    }


def _pre_request(worker: Any, _request: Any) -> None:
    # the request line and headers are in: the header deadline is met
    headers_received = getattr(worker, "headers_received", None)
    if headers_received is not None:
        headers_received()


def _post_fork(_server: Any, _worker: Any) -> None:
    set_process_name("http-worker")


def _post_worker_init(_worker: Any) -> None:
    # the app is loaded and its services built
    freeze_heap()


def freeze_heap() -> None:
    """Take what is alive once a worker has started (the modules, pydicom's
    dictionaries, the services) out of the garbage collector's sight
    (``gc.freeze``), so that a full collection looks only at what came
    after.  Measured in a DIMSE worker: a full collection of the ~83,000
    objects of start-up took 85-90 ms of CPU, 0.003 ms after the freeze;
    pynetdicom forces one every 60 passes of its accept loop, and Python
    makes its own as objects are allocated.  Nothing frozen was ever going
    to be freed: it lives as long as the process."""
    gc.collect()
    gc.freeze()


def _worker_exit(_server: Any, worker: Any) -> None:
    from dicomweb.app import close_app

    app = getattr(worker, "wsgi", None)
    if app is not None:
        close_app(app)


def _child_exit(_server: Any, worker: Any) -> None:
    # in gunicorn's master: the worker's metrics files are let go of (its
    # counts stay in the totals)
    if os.environ.get(METRICS_DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def run_http(config: Config, run_dir: Path | None) -> int:
    """Child entry point: gunicorn serving DICOMweb, until SIGTERM."""
    from gunicorn.app.base import BaseApplication

    # the TLS context, loaded by gunicorn's master at start and on SIGHUP
    # (load_config runs again then), inherited by the workers it forks
    served = https.ServedContext(config.http, run_dir) if config.http.tls else None

    class HttpApplication(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            if served is not None:
                served.load()
            for key, value in gunicorn_settings(config, served).items():
                if key in self.cfg.settings or key not in _NEWER_GUNICORN_SETTINGS:
                    self.cfg.set(key, value)

        def load(self) -> WSGIApplication:
            # in each worker, after the fork: the master never imports the
            # web stack or pydicom (its memory would count in every process)
            from dicomweb.app import create_app

            return create_app(resolve_index_url(config), run_dir=run_dir)

    HttpApplication(prog="dicom-appliance").run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a child process (``python -m appliance.server ROLE``)."""
    parser = argparse.ArgumentParser(
        prog="python -m appliance.server",
        description="One process of the appliance; started by 'dicom-appliance serve'.",
    )
    parser.add_argument("role", choices=COMMANDS)
    parser.add_argument("--config", metavar="FILE", help="the TOML configuration file")
    parser.add_argument("--run-dir", metavar="DIR", type=Path, help="the supervisor's run folder")
    parser.add_argument("--worker", type=int, default=1, help="the DIMSE worker's number")
    parser.add_argument(
        "--listen-fd", type=int, help="the DIMSE listening socket, inherited from the supervisor"
    )
    parser.add_argument(
        "--tls-listen-fd",
        type=int,
        help="the DICOM TLS listening socket, inherited from the supervisor",
    )
    args = parser.parse_args(argv)
    set_process_name(
        {"supervise": "supervisor", "http": "http", "worker": "worker"}.get(
            args.role, f"dimse-{args.worker}"
        )
    )
    try:
        # the supervisor and gunicorn's master never open the index: they
        # leave index.url to the processes that do (no SQLAlchemy import)
        config = load_config(args.config, index_url=args.role in ("dimse", "worker"))
    except ConfigError as exc:
        setup_logging(LogConfig(), dicom=False)
        LOGGER.error("%s", exc.reason)
        return 2
    # the supervisor and gunicorn's master read no DICOM: they never import pydicom
    setup_logging(config.log, dicom=args.role in ("dimse", "worker"))
    try:
        if args.role == "supervise":
            return serve(config)
        if args.role == "http":
            return run_http(config, args.run_dir)
        if args.role == "worker":
            return run_worker(config)
        return run_dimse(config, args.run_dir, args.worker, args.listen_fd, args.tls_listen_fd)
    except ApplianceError as exc:
        LOGGER.error("%s", exc.reason)
        return 2
    except Exception:
        LOGGER.exception("the '%s' process failed", args.role)
        return 1


if __name__ == "__main__":
    sys.exit(main())
