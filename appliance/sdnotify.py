"""Telling systemd how the service is doing: the sd_notify(3) protocol, by hand.

systemd starts a ``Type=notify`` service with ``NOTIFY_SOCKET`` naming a unix
datagram socket: a file path, or a name in the abstract namespace written
with a leading ``@``.  The service sends it one datagram of newline-separated
assignments per notification: ``READY=1`` once it serves, ``STOPPING=1``
when it begins to stop, ``STATUS=<one line>`` for ``systemctl status``.
systemd tells senders apart by the credentials the kernel attaches to each
datagram; with ``NotifyAccess=main`` it listens to the main process only, so
:func:`child_environment` keeps the variable from the children (gunicorn's
master would otherwise say ``READY=1`` as soon as it listens).

Without ``NOTIFY_SOCKET`` (started by hand, in a container) nothing is sent.
A notification that cannot be sent is logged and otherwise ignored: the
service runs on, and systemd's start timeout judges it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

LOGGER = logging.getLogger(__name__)

#: The variable systemd sets for a ``Type=notify`` service.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send *assignments* (``"READY=1"``, ``status("...")``) to systemd in one
    datagram.

    Parameters
    ----------
    assignments
        ``KEY=value`` strings without newlines.
    environ
        Where to read ``NOTIFY_SOCKET`` (default: this process's environment).

    Returns
    -------
    bool
        True if the datagram was sent; False without ``NOTIFY_SOCKET``, for
        an address this module does not speak (systemd's ``vsock:``), or if
        sending failed (logged).
    """
    address = (os.environ if environ is None else environ).get(NOTIFY_SOCKET, "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        LOGGER.warning("%s=%r is not a unix socket: systemd not notified", NOTIFY_SOCKET, address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        LOGGER.warning("could not notify systemd through %s: %s", NOTIFY_SOCKET, exc)
        return False
    return True


def status(text: str) -> str:
    """The ``STATUS=`` assignment of *text*, on one line."""
    return "STATUS=" + " ".join(text.split())


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """*environ* (default: this process's) without ``NOTIFY_SOCKET``: what a
    child process is started with, so that only the main process notifies."""
    source = os.environ if environ is None else environ
    return {name: value for name, value in source.items() if name != NOTIFY_SOCKET}
