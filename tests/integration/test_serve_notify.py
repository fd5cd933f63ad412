"""``dicom-appliance serve`` under a ``Type=notify`` service manager: the
test plays systemd's part with a real unix datagram socket in
``NOTIFY_SOCKET`` and reads each sender's pid from the kernel's credentials
(SO_PASSCRED), as systemd does for ``NotifyAccess=main``."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_serve import READY_TIMEOUT, STOP_TIMEOUT, migrated_site

pytestmark = pytest.mark.integration

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclasses.dataclass
class Notification:
    pid: int
    assignments: list[str]


class NotifySocket:
    """The service manager's end: a bound datagram socket that keeps every
    notification with its sender's pid."""

    def __init__(self, address: str) -> None:
        self.address = address  # what goes into NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.3)
        self.received: list[Notification] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self) -> Notification | None:
        try:
            data, ancillary, _flags, _address = self.sock.recvmsg(
                4096, socket.CMSG_SPACE(_UCRED.size)
            )
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        notification = Notification(pid, data.decode().split("\n"))
        self.received.append(notification)
        return notification

    def wait_for(
        self, assignment: str, process: subprocess.Popen[bytes], timeout: float, log: Path
    ) -> Notification:
        """The first notification (from now on) holding *assignment*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            notification = self._receive()
            if notification is not None and assignment in notification.assignments:
                return notification
            if notification is None and process.poll() is not None:
                break
        pytest.fail(
            f"no {assignment} within {timeout} s (got {self.received}, "
            f"exit {process.poll()}):\n{log.read_text(errors='replace')}"
        )

    def drain(self) -> None:
        while self._receive() is not None:
            pass


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


def test_ready_comes_from_the_main_process_once_ready_and_stopping_on_sigterm(
    tmp_path: Path, notify_path: NotifySocket
) -> None:
    site = migrated_site(tmp_path / "site")
    site.env["NOTIFY_SOCKET"] = notify_path.address
    appliance = site.start()
    try:
        ready = notify_path.wait_for(
            "READY=1", appliance.process, READY_TIMEOUT, appliance.log_path
        )
        # at once: READY=1 is sent only when the probe would pass
        probe = httpx.get(f"{appliance.base_url}/health/ready", timeout=5)
        appliance.process.send_signal(signal.SIGTERM)
        stopping = notify_path.wait_for(
            "STOPPING=1", appliance.process, STOP_TIMEOUT, appliance.log_path
        )
        exit_code = appliance.wait(STOP_TIMEOUT)
        notify_path.drain()
    finally:
        appliance.kill()

    assert probe.status_code == 200, probe.text
    assert ready.pid == appliance.process.pid  # `serve` itself, after its exec
    assert stopping.pid == appliance.process.pid
    assert exit_code == 0, appliance.log
    senders = {notification.pid for notification in notify_path.received}
    assert senders == {appliance.process.pid}, notify_path.received  # not gunicorn
    everything = [a for n in notify_path.received for a in n.assignments]
    assert everything.count("READY=1") == 1
    assert everything.count("STOPPING=1") == 1
    assert all(a == "READY=1" or a.startswith("STATUS=") for a in ready.assignments)
    assert f"STATUS=ready: DICOMweb on 127.0.0.1:{site.http_port}" in " ".join(ready.assignments)
    assert "ready: DICOMweb on" in appliance.log


def test_an_abstract_notify_socket_works(tmp_path: Path) -> None:
    receiver = NotifySocket(f"@dicom-appliance-test-{uuid.uuid4().hex}")
    try:
        site = migrated_site(tmp_path / "site")
        site.env["NOTIFY_SOCKET"] = receiver.address
        appliance = site.start()
        try:
            ready = receiver.wait_for(
                "READY=1", appliance.process, READY_TIMEOUT, appliance.log_path
            )
            appliance.process.send_signal(signal.SIGTERM)
            stopping = receiver.wait_for(
                "STOPPING=1", appliance.process, STOP_TIMEOUT, appliance.log_path
            )
            exit_code = appliance.wait(STOP_TIMEOUT)
        finally:
            appliance.kill()
    finally:
        receiver.close()

    assert ready.pid == stopping.pid == appliance.process.pid
    assert exit_code == 0, appliance.log


def test_a_child_dying_is_told_as_stopping_with_its_name(
    tmp_path: Path, notify_path: NotifySocket
) -> None:
    site = migrated_site(tmp_path / "site")
    site.env["NOTIFY_SOCKET"] = notify_path.address
    appliance = site.start()
    try:
        notify_path.wait_for("READY=1", appliance.process, READY_TIMEOUT, appliance.log_path)
        dimse_pid = appliance.child_pid("dimse-1")
        os.kill(dimse_pid, signal.SIGKILL)
        stopping = notify_path.wait_for(
            "STOPPING=1", appliance.process, STOP_TIMEOUT, appliance.log_path
        )
        exit_code = appliance.wait(STOP_TIMEOUT)
    finally:
        appliance.kill()

    assert exit_code == 1, appliance.log
    assert (
        f"STATUS=stopping: child 'dimse-1' (pid {dimse_pid}) was killed by signal SIGKILL"
        in stopping.assignments
    )
