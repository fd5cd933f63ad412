"""gunicorn's threaded worker with a deadline for request headers.

gunicorn's default ``sync`` worker serves one connection at a time, so
``http.workers`` clients that open a connection and send their headers a
byte a second (slowloris) hold every worker and nobody else is served.
This worker is gunicorn's ``gthread`` worker (``http.threads`` threads per
process; a connection kept alive between requests waits in the worker's
poller without holding a thread) plus two rules gunicorn has no setting
for: a new connection that has sent nothing yet goes to the poller at once
(gunicorn holds a thread up to 5 s for it first) and is closed there after
gunicorn's ``keepalive`` (2 s) if it stays idle; and a request's line and
headers must arrive within ``http.header_timeout`` seconds of its first
byte, else the connection is shut down and its thread freed.  Once the
headers are in, a body or a response that stalls (no byte moving for
``http.idle_timeout`` seconds) ends the request.  A body is not timed as a
whole: a big STOW-RS upload or a WADO-RS download from a slow but steady
client may take as long as it takes (a reverse proxy that buffers request
bodies adds more, see docs/security.md).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import socket
import struct
import threading
import time
from typing import Any

from gunicorn.workers.gthread import _DEFER, ThreadWorker

LOGGER = logging.getLogger("dicomweb.http_worker")

#: How often the watchdog looks for connections past their deadline.
_TICK = 0.5


def _timeval(seconds: float) -> bytes:
    """*seconds* as a ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO."""
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


class HeaderDeadlines:
    """Connections whose headers must arrive by a deadline; a daemon thread
    shuts down each one still waiting when its deadline passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._counter = itertools.count()
        self.expired = 0
        self._thread = threading.Thread(target=self._run, name="header-deadlines", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, deadline: float) -> int:
        """Watch *sock* until :meth:`discard` with the token returned."""
        token = next(self._counter)
        with self._lock:
            heapq.heappush(self._heap, (deadline, token, sock))
            self._live.add(token)
        return token

    def discard(self, token: int) -> None:
        """The headers arrived (or the connection ended): stop watching."""
        with self._lock:
            self._live.discard(token)

    def _run(self) -> None:
        while True:
            time.sleep(_TICK)
            now = time.monotonic()
            due: list[socket.socket] = []
            with self._lock:
                while self._heap and self._heap[0][0] <= now:
                    _, token, sock = heapq.heappop(self._heap)
                    if token in self._live:
                        self._live.discard(token)
                        due.append(sock)
            for sock in due:
                self.expired += 1
                # the blocked recv() returns b"": gunicorn drops the
                # connection as a premature disconnection (OSError: closed)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                LOGGER.info("a client did not send its request headers in time: closed")


class HeaderTimeoutWorker(ThreadWorker):  # type: ignore[misc]
    """``gthread`` with a deadline on request headers and a stall timeout on
    bodies and responses.  :func:`appliance.server.gunicorn_settings` makes a
    subclass with ``header_timeout`` and ``idle_timeout`` from the config
    (gunicorn instantiates the worker class itself)."""

    header_timeout: float = 20.0
    #: seconds a request's body or its response may stall, no byte moving
    idle_timeout: float = 60.0

    def init_process(self) -> None:
        self._deadlines = HeaderDeadlines()
        self._current = threading.local()
        super().init_process()

    def handle(self, conn: Any) -> Any:
        if not conn.initialized and not conn.data_ready and not conn.wait_for_data(0):
            # a new connection that has sent nothing yet waits in the poller,
            # not in a thread (gunicorn would hold a thread up to 5 s for
            # it: a few hundred idle connections would starve every thread);
            # the poller closes it after gunicorn's keepalive seconds
            return _DEFER
        token = self._deadlines.add(conn.sock, time.monotonic() + self.header_timeout)
        self._current.token = token
        self._current.conn = conn
        try:
            return super().handle(conn)
        finally:
            self._deadlines.discard(token)

    def headers_received(self) -> None:
        """gunicorn's ``pre_request`` hook, in the thread handling the request:
        its headers are in."""
        token = getattr(self._current, "token", None)
        if token is not None:
            self._deadlines.discard(token)
        conn = getattr(self._current, "conn", None)
        if conn is not None:
            # from here on a stall (no byte received, or none sent, for this
            # long) ends the request: a read fails (the app answers 400), a
            # write drops the connection.  SO_RCVTIMEO/SO_SNDTIMEO bound each
            # recv()/send() call, so any progress restarts the clock (a
            # socket timeout would bound a whole sendall() of a 1 MiB chunk).
            stall = _timeval(self.idle_timeout)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, stall)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)
