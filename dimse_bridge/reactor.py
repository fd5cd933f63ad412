"""pynetdicom's two polling loops per association, made to wait for work.

Each pynetdicom association runs two threads that poll: the DUL reactor
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms)
whenever a pass found nothing to do, then looks at the socket again; the
association reactor (``Association._run_reactor``) sleeps 1 ms before every
look at the DIMSE message queue.  So every open association wakes its two
threads about 2,000 times a second, working or idle.  Measured on C-STORE
(``python -m bench profile``, 4 associations): those wake-ups are most of
the worker's system time, and each takes the GIL from the thread that is
storing an instance.

:func:`install` keeps pynetdicom's loops as they are and replaces only
their idle sleeps with waits that end as soon as there is work, or after
:data:`IDLE_WAIT` at most (the loops' own checks of timers and flags then
run as before, just less often while nothing happens):

- the DUL reactor waits for its socket to be readable or for a primitive
  to be queued for sending (a byte on a pipe, written by the queue's
  ``put``);
- the association reactor waits for a DIMSE message or an ACSE primitive
  to arrive (the queues' ``put``), or for a thread of the user to ask it to
  pause (``_reactor_checkpoint.clear()``, before every ``send_*``).

It also closes a race of pynetdicom's in which the association reactor
takes and drops a response that a ``send_*`` is waiting for
(:func:`_leave_responses_to_the_user`).

Nothing is decided differently: the loops only sleep less.  Every wait is
bounded by :data:`IDLE_WAIT`, so a wake-up source missed here costs latency
(ARTIM and idle timers seen up to that much later, a flag set by another
thread noticed then), never a hang.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

#: The longest idle wait of either loop, in seconds (pynetdicom's: 0.001).
IDLE_WAIT = 0.02
#: The association reactor's own sleep (pynetdicom 3: ``time.sleep(0.001)``).
ASSOCIATION_SLEEP = 0.001

_installed = False
_lock = threading.Lock()


def install() -> None:
    """Replace the idle sleeps of pynetdicom's loops in this process (once;
    later calls do nothing)."""
    global _installed
    with _lock:
        if _installed:
            return
        pynetdicom.dul.time = _module_with_sleep(_dul_sleep)  # type: ignore[attr-defined]
        pynetdicom.association.time = _module_with_sleep(_association_sleep)  # type: ignore[attr-defined]
        _installed = True


def _module_with_sleep(sleep: Callable[[float], None]) -> types.ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` is *sleep* (the
    rest is ``time``'s)."""
    module = types.ModuleType("time")
    module.__dict__.update(time.__dict__)
    module.sleep = sleep  # type: ignore[attr-defined]
    return module


# ----------------------------------------------------------------- DUL reactor


class _DulWake:
    """A pipe that a DUL's outgoing queue writes a byte to on every put."""

    def __init__(self, dul: DULServiceProvider) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        weakref.finalize(dul, _close_fds, self.read_fd, self.write_fd)
        queue = dul.to_provider_queue
        put = queue.put

        def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
            put(item, block, timeout)
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self.write_fd, b"\0")

        queue.put = put_and_wake  # type: ignore[method-assign]

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.read_fd, 4096):
                pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _dul_sleep(seconds: float) -> None:
    dul = threading.current_thread()
    if not isinstance(dul, DULServiceProvider) or seconds != dul._run_loop_delay:
        time.sleep(seconds)  # not the reactor's idle sleep (e.g. stop_dul)
        return
    wake: _DulWake | None = dul.__dict__.get("_appliance_wake")
    if wake is None:
        wake = dul.__dict__["_appliance_wake"] = _DulWake(dul)
    wake.drain()
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    raw = getattr(dul.socket, "socket", None)
    if raw is None or raw.fileno() < 0:
        # no connection (yet, or any more): pynetdicom's own sleep
        time.sleep(seconds)
        return
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return  # decrypted bytes select() cannot see
    try:
        select.select([raw, wake.read_fd], [], [], IDLE_WAIT)
    except (OSError, ValueError):
        return  # the socket closed under us: the reactor finds out itself


# --------------------------------------------------------- association reactor


def _association_sleep(seconds: float) -> None:
    assoc = threading.current_thread()
    if not isinstance(assoc, Association) or seconds != ASSOCIATION_SLEEP:
        time.sleep(seconds)
        return
    wake: threading.Event | None = assoc.__dict__.get("_appliance_wake")
    if wake is None:  # the first idle pass, before the reactor's first get_msg
        wake = assoc.__dict__["_appliance_wake"] = _association_wake(assoc)
        _leave_responses_to_the_user(assoc)
    wake.clear()
    if not assoc.dimse.msg_queue.empty() or not assoc.dul.to_user_queue.empty():
        return
    if assoc._kill or not assoc._reactor_checkpoint.is_set():
        return
    wake.wait(IDLE_WAIT)


def _association_wake(assoc: Association) -> threading.Event:
    """An event set whenever the association's reactor has work: a DIMSE
    message or an ACSE primitive queued for it, or a pause asked for."""
    wake = threading.Event()
    for queue in (assoc.dimse.msg_queue, assoc.dul.to_user_queue):
        put = queue.put

        def put_and_wake(
            item: Any,
            block: bool = True,
            timeout: float | None = None,
            put: Callable[..., None] = put,
        ) -> None:
            put(item, block, timeout)
            wake.set()

        queue.put = put_and_wake  # type: ignore[method-assign]
    checkpoint = assoc._reactor_checkpoint
    clear = checkpoint.clear

    def clear_and_wake() -> None:
        clear()
        wake.set()

    checkpoint.clear = clear_and_wake  # type: ignore[method-assign]
    return wake


def _leave_responses_to_the_user(assoc: Association) -> None:
    """Keep the reactor from taking a response that a user's ``send_*`` is
    about to wait for (pynetdicom's race, seen in ``make bench`` and the
    soak: a C-STORE-RSP lost, the sender then waiting ``dimse_timeout``).

    ``send_*`` pauses the reactor by clearing ``_reactor_checkpoint`` and
    waiting for ``_is_paused``, but that flag is still True from the
    reactor's previous pause until the reactor has run again: a ``send_*``
    right after another one can send its request before the reactor resumes
    from the last pause, and the reactor's next non-blocking ``get_msg``
    then takes the response and drops it ("Received unexpected ... service
    message").  Here the reactor's non-blocking ``get_msg`` leaves a
    response at the head of the queue while a user waits for one
    (a blocking ``get_msg``) or is pausing the reactor (the checkpoint
    cleared); with nobody waiting it takes it as before.

    Not fixed at the flag (``_is_paused`` reset when a pause is asked for):
    a C-GET's C-STORE sub-operations are sent from the reactor's own thread,
    which would then wait for itself to pause."""
    dimse = assoc.dimse
    queue = dimse.msg_queue
    get_msg = dimse.get_msg
    waiting = [0]
    lock = threading.Lock()

    def get_msg_for(block: bool = False) -> Any:
        if block:
            with lock:
                waiting[0] += 1
            try:
                return get_msg(block)
            finally:
                with lock:
                    waiting[0] -= 1
        with queue.mutex:
            head = queue.queue[0] if queue.queue else None
        if head is not None and _is_response(head[1]):
            with lock:
                someone = waiting[0] > 0
            if someone or not assoc._reactor_checkpoint.is_set():
                return None, None
        return get_msg(block)

    dimse.get_msg = get_msg_for  # type: ignore[method-assign]


def _is_response(message: Any) -> bool:
    return bool(getattr(message, "is_valid_response", False)) and not bool(
        getattr(message, "is_valid_request", False)
    )
