"""Counting and naming what the HTTP side does: each request gets a
correlation id (the client's ``X-Request-ID`` if it is a sane token, else a
new one), sent back in ``X-Request-ID`` and put on every log line of the
request (:data:`appliance.logs.CORRELATION_ID`).

Counting what the HTTP side does (``appliance_http_*``, bytes in and
out): a WSGI middleware around the Flask app, so a request is counted once
its answer's body has been sent (a streamed WADO-RS answer included) and
whatever answered it (a view, an error handler, a 404 for no route).

The transaction label is the Flask endpoint (e.g. ``stow.store``,
``qido.search_studies``): bounded, and with no UIDs in it; a request that
matched no route is ``unmatched``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import request

from appliance import metrics
from appliance.logs import CORRELATION_ID
from dicomweb import audit

#: Where the view records its transaction in the WSGI environ.
TRANSACTION = "appliance.transaction"

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def note_transaction() -> None:
    """``before_request``: name the transaction of this request."""
    rule = request.url_rule
    request.environ[TRANSACTION] = rule.endpoint if rule is not None else "unmatched"


class Counting:
    """The WSGI app *app*, counted."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        status: list[str] = []
        correlation = _request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        CORRELATION_ID.set(correlation)

        def counting_start(code: str, headers: Any, *rest: Any) -> Any:
            status[:] = [code.split(" ", 1)[0]]
            headers = [(k, v) for k, v in headers if k.lower() != "x-request-id"]
            headers.append(("X-Request-ID", correlation))
            return start_response(code, headers, *rest)

        length = environ.get("CONTENT_LENGTH")
        if length and length.isdigit():
            metrics.RECEIVED_BYTES.labels("http").inc(int(length))
        body = self.app(environ, counting_start)
        return _Body(body, environ, status, started)


class _Body:
    """An answer's body that counts its bytes and, when closed, the request."""

    def __init__(
        self, body: Iterable[bytes], environ: dict[str, Any], status: list[str], started: float
    ) -> None:
        self._body = body
        self._environ = environ
        self._status = status
        self._started = started
        self._sent = 0
        #: the body was iterated to its end (not: it failed after its status
        #: was sent, or the client left before the end)
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._sent += len(chunk)
            yield chunk
        self._finished = True

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            transaction = self._environ.get(TRANSACTION, "unmatched")
            method = self._environ.get("REQUEST_METHOD", "")
            metrics.HTTP_REQUESTS.labels(
                transaction, method, self._status[0] if self._status else "0"
            ).inc()
            metrics.HTTP_SECONDS.labels(transaction).observe(time.perf_counter() - self._started)
            if self._sent:
                metrics.SENT_BYTES.labels("http").inc(self._sent)
            audit.finish(
                self._environ, self._status[0] if self._status else "0", not self._finished
            )
            CORRELATION_ID.set(None)


def _request_id(offered: str) -> str:
    """The client's request id if it is a short token (letters, digits and
    ``-_.:``; it goes into logs), else a new random one."""
    if 0 < len(offered) <= 64 and re.fullmatch(r"[A-Za-z0-9._:-]+", offered):
        return offered
    return uuid.uuid4().hex[:16]
