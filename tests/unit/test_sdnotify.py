"""sd_notify by hand (:mod:`appliance.sdnotify`) on real unix datagram
sockets, and where the supervisor probes its own readiness."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import sdnotify
from appliance.config import load_config
from appliance.server import probe_host, probe_ready


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and its path."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def test_nothing_is_sent_without_notify_socket() -> None:
    assert sdnotify.notify("READY=1", environ={}) is False


def test_a_path_socket_gets_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver

    sent = sdnotify.notify(
        "READY=1", sdnotify.status("ready:\nall\tgood"), environ={"NOTIFY_SOCKET": path}
    )

    assert sent is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=ready: all good"


def test_an_abstract_socket_is_named_with_an_at_sign() -> None:
    name = f"dicom-appliance-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)

        sent = sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})

        assert sent is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_an_unusable_address_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.sdnotify")

    nobody = sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "none")})
    vsock = sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})

    assert (nobody, vsock) == (False, False)
    assert "could not notify systemd" in caplog.text
    assert "is not a unix socket" in caplog.text


def test_children_do_not_get_the_notify_socket() -> None:
    env = sdnotify.child_environment({"NOTIFY_SOCKET": "/run/x", "PATH": "/bin"})

    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize(
    ("bound", "probed"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("::", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("localhost", "localhost"),
    ],
)
def test_a_wildcard_bind_is_probed_on_loopback(bound: str, probed: str) -> None:
    assert probe_host(bound) == probed


def test_probe_names_the_failing_checks(tmp_path: Path) -> None:
    body = json.dumps(
        {
            "status": "fail",
            "checks": {
                "index": [{"status": "pass"}],
                "dimse": [{"status": "fail", "output": "the dimse-1 process has not said"}],
            },
        }
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 503 if self.path == "/health/ready" else 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = load_config(environ={"APPLIANCE_HTTP_PORT": str(server.server_port)}, cwd=tmp_path)
        problem = probe_ready(config)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

    assert problem == "/health/ready answers 503: dimse: the dimse-1 process has not said"


def test_probe_without_a_listener_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        config = load_config(environ={"APPLIANCE_HTTP_PORT": str(port)}, cwd=tmp_path)

        problem = probe_ready(config)

    assert problem is not None
    assert problem.startswith(f"DICOMweb does not answer on 127.0.0.1:{port} yet")
