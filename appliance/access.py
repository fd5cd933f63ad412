"""Who may use the DICOMweb API: principals, roles, permissions, and the
API tokens kept hashed in the index.

Roles follow Microsoft's DICOM server (its ``DataActions``: read, write,
delete, and an administrative action; its ``globalAdmin`` role holds
``*``).  A role is a named set of permissions; roles do not imply one
another, except ``admin``, which holds every permission.  So a modality's
``write`` token can store but not read back what it stored, and a viewer's
``read`` token cannot delete.

An API token is ``dap_<id>_<secret>``: ``id`` is 12 hex digits (not secret:
it names the token in logs and in ``token list``), ``secret`` 256 random
bits.  The index keeps the SHA-256 of the secret only.  No slow password
hash is needed: those exist to make guessing a low-entropy password costly,
and nobody guesses 256 random bits, however fast each try is; a fast hash
keeps the check cheap.

This module is the core's (no flask); the HTTP edge maps
:class:`Unauthenticated` and :class:`Forbidden` to 401 and 403.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from appliance.config import AUTH_ROLES, AuthConfig
from appliance.errors import ApplianceError, IndexUnavailable
from appliance.index.engine import as_utc, write_transaction
from appliance.index.schema import api_token

if TYPE_CHECKING:
    from appliance.oidc import OidcVerifier

LOGGER = logging.getLogger(__name__)

# permissions (what an endpoint needs)
READ = "read"
WRITE_PERMISSION = "write"
DELETE = "delete"
ADMIN = "admin"
PERMISSIONS = (READ, WRITE_PERMISSION, DELETE, ADMIN)

#: What each role permits (Microsoft's DICOM server: globalReader = read,
#: globalAdmin = "*").  Roles do not imply one another, except admin.
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset({READ}),
    "write": frozenset({WRITE_PERMISSION}),
    "delete": frozenset({DELETE}),
    "admin": frozenset(PERMISSIONS),
}
assert set(ROLE_PERMISSIONS) == set(AUTH_ROLES)


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who makes a request: *name* (``anonymous``, ``token:<id>``, or the
    JWT's ``sub``), the *roles* it holds, and how it was established
    (*method*: ``anonymous``, ``none`` on an open endpoint, ``token``,
    ``oidc``)."""

    name: str
    roles: frozenset[str]
    method: str

    def may(self, permission: str) -> bool:
        """Whether one of the roles grants *permission*."""
        return any(permission in ROLE_PERMISSIONS.get(role, ()) for role in self.roles)


#: Everyone, in ``[auth] mode = "anonymous"`` (loopback only).
ANONYMOUS = Principal("anonymous", frozenset(AUTH_ROLES), "anonymous")
#: A caller without credentials on an endpoint open to all (health, metrics).
NOBODY = Principal("anonymous", frozenset(), "none")


class AccessDenied(Exception):
    """A request is refused; *reason* may be shown to the client (it never
    holds a token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthenticated(AccessDenied):
    """No usable credentials (HTTP 401).  *error* is RFC 6750 3.1's code:
    None when the request had no credentials at all, ``invalid_token`` for a
    token that is bad, expired or revoked, ``invalid_request`` for a
    malformed Authorization header (HTTP 400)."""

    def __init__(self, reason: str, error: str | None = None) -> None:
        super().__init__(reason)
        self.error = error


class Forbidden(AccessDenied):
    """Valid credentials whose roles lack the permission (HTTP 403,
    RFC 6750 ``insufficient_scope``)."""


# --------------------------------------------------------------------------
# API tokens

TOKEN_PREFIX = "dap_"  # noqa: S105 - the public prefix, not a secret
_TOKEN = re.compile(r"dap_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else as_utc(value)


def parse_roles(text: Iterable[str]) -> tuple[str, ...]:
    """Role names from *text* items (each may be comma-separated), checked,
    deduplicated, in the order of :data:`AUTH_ROLES`.

    Raises
    ------
    ValueError
        naming an unknown role.
    """
    roles: set[str] = set()
    for item in text:
        for role in item.split(","):
            role = role.strip()
            if role not in AUTH_ROLES:
                raise ValueError(f"{role!r} is not a role ({', '.join(AUTH_ROLES)})")
            roles.add(role)
    if not roles:
        raise ValueError("at least one role is needed")
    return tuple(r for r in AUTH_ROLES if r in roles)


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What ``token list`` shows of a token (never its secret)."""

    id: str
    name: str
    roles: tuple[str, ...]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    def state(self, now: dt.datetime | None = None) -> str:
        now = _now() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def as_json(self) -> dict[str, Any]:
        def iso(value: dt.datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": self.id,
            "name": self.name,
            "roles": list(self.roles),
            "state": self.state(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
        }


class ApiTokens:
    """The API tokens in the index database behind *engine*."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self, roles: Sequence[str], name: str = "", expires_in: dt.timedelta | None = None
    ) -> tuple[str, TokenInfo]:
        """A new token with *roles*: the token itself (shown once, never
        stored) and its row."""
        roles = parse_roles(roles)
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)  # 256 bits, 43 characters
        now = _now()
        info = TokenInfo(
            id=token_id,
            name=name,
            roles=roles,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
            revoked_at=None,
            last_used_at=None,
        )
        with self._writing() as conn:
            conn.execute(
                insert(api_token).values(
                    id=token_id,
                    name=name,
                    roles=",".join(roles),
                    digest=_digest(secret),
                    created_at=now,
                    expires_at=info.expires_at,
                )
            )
        return f"{TOKEN_PREFIX}{token_id}_{secret}", info

    def list(self) -> list[TokenInfo]:
        """Every token, oldest first (revoked and expired ones too)."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(select(api_token).order_by(api_token.c.created_at)).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({exc.__class__.__name__})") from exc
        return [_info(row) for row in rows]

    def revoke(self, token_id: str) -> bool:
        """Revoke the token *token_id*; False if there is none (or it was
        revoked before)."""
        with self._writing() as conn:
            result = conn.execute(
                update(api_token)
                .where(api_token.c.id == token_id, api_token.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        return result.rowcount == 1

    def verify(self, token: str) -> tuple[Principal, dt.datetime | None]:
        """The principal *token* stands for, and when the token expires.

        Raises
        ------
        Unauthenticated
            for a malformed, unknown, wrong, revoked or expired token.
        IndexUnavailable
            if the index cannot be read.
        """
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise Unauthenticated("the API token is malformed", "invalid_token")
        token_id, secret = match.groups()
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(api_token).where(api_token.c.id == token_id)).first()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index database failed ({exc.__class__.__name__})") from exc
        # compared even for an unknown id, so both cost the same
        expected = row.digest if row is not None else "0" * 64
        if not hmac.compare_digest(expected, _digest(secret)) or row is None:
            raise Unauthenticated(f"API token {token_id} is unknown", "invalid_token")
        info = _info(row)
        state = info.state()
        if state != "active":
            raise Unauthenticated(f"API token {token_id} is {state}", "invalid_token")
        self._note_use(token_id, row.last_used_at)
        return Principal(f"token:{token_id}", frozenset(info.roles), "token"), info.expires_at

    def _note_use(self, token_id: str, last: dt.datetime | None) -> None:
        """Record the use, at most once a minute per token (best effort: a
        busy index never fails the request for it)."""
        now = _now()
        last = _aware(last)
        if last is not None and now - last < dt.timedelta(minutes=1):
            return
        try:
            with self._writing() as conn:
                conn.execute(
                    update(api_token).where(api_token.c.id == token_id).values(last_used_at=now)
                )
        except ApplianceError as exc:
            LOGGER.warning("could not record the use of API token %s: %s", token_id, exc.reason)

    def _writing(self) -> contextlib.AbstractContextManager[Connection]:
        return write_transaction(self.engine)


def _info(row: Any) -> TokenInfo:
    created = _aware(row.created_at)
    assert created is not None
    return TokenInfo(
        id=row.id,
        name=row.name,
        roles=tuple(r for r in row.roles.split(",") if r),
        created_at=created,
        expires_at=_aware(row.expires_at),
        revoked_at=_aware(row.revoked_at),
        last_used_at=_aware(row.last_used_at),
    )


# --------------------------------------------------------------------------
# authentication of a request

#: RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: Verified API tokens kept per process, at most (then the cache starts over).
CACHE_ENTRIES = 4096


class Authenticator:
    """Turns a request's ``Authorization`` header into a :class:`Principal`
    for the configured ``[auth]`` mode.

    A verified API token is remembered (by the SHA-256 of the whole token)
    for ``token_cache_seconds``, so a hot path costs no index query; a
    revocation takes effect within that time.  JWTs are checked against
    the issuer's keys, which :class:`~appliance.oidc.OidcVerifier` caches.

    Parameters
    ----------
    auth
        The ``[auth]`` section.
    engine
        Returns the index engine (built on first use, after a fork).
    clock
        Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        auth: AuthConfig,
        engine: Callable[[], Engine],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.auth = auth
        self._engine = engine
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        self._oidc: OidcVerifier | None = None
        if auth.mode == "oidc":
            from appliance.oidc import OidcVerifier

            self._oidc = OidcVerifier(auth)

    @property
    def anonymous(self) -> bool:
        return self.auth.mode == "anonymous"

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a request with this ``Authorization`` header.

        Raises
        ------
        Unauthenticated
            no credentials, a header that is not ``Bearer``, or a token that
            does not verify.
        IndexUnavailable
            if an API token cannot be looked up.
        """
        if self.anonymous:
            return ANONYMOUS
        if not authorization:
            raise Unauthenticated("authentication is required: send Authorization: Bearer TOKEN")
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            # another scheme (Basic...) is not a bearer token: a challenge
            # without an error code (RFC 6750 3.1, RFC 9110 11.6.1)
            raise Unauthenticated("only bearer tokens are accepted (Authorization: Bearer TOKEN)")
        token = credentials.strip()
        if _B64TOKEN.fullmatch(token) is None:
            raise Unauthenticated("the Authorization header is malformed", "invalid_request")
        if token.startswith(TOKEN_PREFIX):
            return self._cached(token, lambda: ApiTokens(self._engine()).verify(token))
        if self._oidc is not None:
            oidc = self._oidc
            return self._cached(token, lambda: oidc.check(token))
        raise Unauthenticated("the token is not an API token of this appliance", "invalid_token")

    def _cached(
        self, token: str, verify: Callable[[], tuple[Principal, dt.datetime | None]]
    ) -> Principal:
        """The principal of *token* from the cache, else from *verify*
        (which raises for a token that does not verify: those are never
        kept).  A JWT is kept like an API token: it cannot be revoked before
        its ``exp`` anyway, and its signature check costs ~0.1 ms."""
        key = hashlib.sha256(token.encode("ascii")).hexdigest()
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        principal, expires_at = verify()
        ttl = float(self.auth.token_cache_seconds)
        if expires_at is not None:
            ttl = min(ttl, (expires_at - _now()).total_seconds())
        if ttl > 0:
            with self._lock:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[key] = (now + ttl, principal)
        return principal


def authorize(principal: Principal, permission: str) -> None:
    """Raise :class:`Forbidden` unless *principal* may do *permission*."""
    if not principal.may(permission):
        roles = ", ".join(sorted(principal.roles)) or "none"
        raise Forbidden(
            f"{principal.name} (roles: {roles}) lacks the {permission} permission "
            "this request needs"
        )
