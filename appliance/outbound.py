"""What the appliance's calls to other HTTP services (``[[forward]]``
upstreams, the ``[fhir]`` server) share:

- credentials: none, HTTP Basic, a bearer token kept in a file, or an OAuth
  2.0 client credentials grant, chosen by the ``auth`` key and the keys it
  needs (README "Forwarding");
- which answers are worth another try, how long the server asked to wait
  (Retry-After), and the backoff between tries.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import os
import random
import threading
import time
from typing import Protocol

import httpx

#: HTTP answers worth another try later.
TRANSIENT_HTTP = frozenset({408, 429})
#: HTTP answers that mean the credentials were refused.
AUTH_HTTP = frozenset({401, 403})
#: Server errors that trying again cannot cure: the method or the HTTP
#: version is not implemented there (RFC 9110 15.6.2, 15.6.6).
PERMANENT_5XX = frozenset({501, 505})
#: The longest Retry-After honoured, in seconds.
RETRY_AFTER_MAX = 3600.0


def http_client(
    *,
    timeout: float,
    concurrency: int,
    user_agent: str,
    transport: httpx.BaseTransport | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Client:
    """A keep-alive client for one service: a connection per sender and one
    spare, no redirects followed (a redirect would carry the credentials
    elsewhere)."""
    limits = httpx.Limits(
        max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1
    )
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        limits=limits,
        transport=transport,
        follow_redirects=False,
        headers={"User-Agent": user_agent, **(headers or {})},
    )


def transient_http(status: int) -> bool:
    """Whether an answer with *status* is worth another try later."""
    return status in TRANSIENT_HTTP or (status >= 500 and status not in PERMANENT_5XX)


def retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """The Retry-After of *response* in seconds (RFC 9110 10.2.3: a number of
    seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff(attempts: int, retry_max: float, retry_after: float | None = None) -> float:
    """Seconds to wait before try number *attempts* + 1: ``min(retry_max,
    2 ** attempts)`` scaled by a random factor from 0.5 to 1 (jitter, so a
    recovered server is not hit by every sender at once), or the server's
    Retry-After if that is longer (up to an hour)."""
    delay = min(retry_max, 2.0 ** min(attempts, 30)) * random.uniform(0.5, 1.0)  # noqa: S311
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_MAX))
    return delay


class AuthSettings(Protocol):
    """The keys of a configuration section that names credentials."""

    @property
    def auth(self) -> str: ...
    @property
    def token_file(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def token_url(self) -> str: ...
    @property
    def client_id(self) -> str: ...
    @property
    def client_secret(self) -> str: ...
    @property
    def scope(self) -> str: ...


class CredentialsError(Exception):
    """No credentials could be had (token file, token endpoint)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Credentials:
    """No credentials."""

    def headers(self) -> dict[str, str]:
        return {}

    def refused(self) -> None:
        """The upstream refused them (401/403): fetch new ones next time."""


class _Basic(Credentials):
    """HTTP Basic authentication (RFC 7617), the pair encoded as UTF-8."""

    def __init__(self, username: str, password: str) -> None:
        pair = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._header = f"Basic {pair}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": self._header}


class _BearerFile(Credentials):
    """A token kept in a file (e.g. renewed by another program): read again
    whenever the file changes."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._seen: tuple[float, int] | None = None
        self._token = ""
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        with self._lock:
            try:
                stat = os.stat(self._path)
                if self._seen != (stat.st_mtime, stat.st_size):
                    with open(self._path, encoding="utf-8") as fh:
                        self._token = fh.read().strip()
                    self._seen = (stat.st_mtime, stat.st_size)
            except OSError as exc:
                raise CredentialsError(
                    f"cannot read the token file {self._path}: {exc.strerror}"
                ) from None
            if not self._token:
                raise CredentialsError(f"the token file {self._path} is empty")
            return {"Authorization": f"Bearer {self._token}"}


class _ClientCredentials(Credentials):
    """OAuth 2.0 client credentials grant (RFC 6749 4.4): a token from the
    token endpoint, kept until a minute before it expires or until the
    upstream refuses it."""

    def __init__(self, settings: AuthSettings, client: httpx.Client) -> None:
        self._settings = settings
        self._client = client
        self._token = ""
        self._expires = 0.0
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        with self._lock:
            if not self._token or time.monotonic() >= self._expires:
                self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def refused(self) -> None:
        with self._lock:
            self._token = ""

    def _fetch(self) -> None:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._settings.client_id,
            "client_secret": self._settings.client_secret,
        }
        if self._settings.scope:
            form["scope"] = self._settings.scope
        try:
            response = self._client.post(self._settings.token_url, data=form)
        except httpx.HTTPError as exc:
            raise CredentialsError(
                f"cannot reach the token endpoint ({type(exc).__name__})"
            ) from None
        if not response.is_success:
            raise CredentialsError(f"the token endpoint answered HTTP {response.status_code}")
        try:
            grant = response.json()
            token = str(grant["access_token"])
            lifetime = float(grant.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise CredentialsError("the token endpoint's answer has no access_token") from None
        self._token = token
        self._expires = time.monotonic() + max(lifetime - 60, lifetime / 2)


def credentials_for(settings: AuthSettings, client: httpx.Client) -> Credentials:
    if settings.auth == "basic":
        return _Basic(settings.username, settings.password)
    if settings.auth == "bearer":
        return _BearerFile(settings.token_file)
    if settings.auth == "oauth2":
        return _ClientCredentials(settings, client)
    return Credentials()
