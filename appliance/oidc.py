"""OpenID Connect bearer tokens: JWTs signed by the issuer's keys (JWKS).

A token is accepted when its signature verifies with a key of the
issuer's JWKS (matched by ``kid``) under an allowed asymmetric algorithm
(never ``none`` nor HS*: RFC 8725 3.1/3.2), its ``iss`` is ``auth.issuer``,
its ``aud`` names ``auth.audience``, and ``exp``/``nbf``/``iat`` hold
within ``auth.clock_skew_seconds`` (RFC 7519 4.1).  Roles come from the
``roles_claim`` (through ``role_map``) and the ``scope``/``scp`` claim
(through ``scope_map``).

The JWKS is fetched once and kept: a ``kid`` it lacks (the issuer rotated
its keys) fetches it again, at most once per :data:`REFETCH_SECONDS`, so a
flood of tokens with made-up ``kid`` values cannot turn into a flood of
requests to the issuer.  The keys are also fetched again after
:data:`MAX_AGE_SECONDS`.  ``jwks_url`` empty: it is the ``jwks_uri`` of
``{issuer}/.well-known/openid-configuration`` (OpenID Connect Discovery
1.0, section 4).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from appliance.access import Principal, Unauthenticated
from appliance.config import AUTH_ROLES, AuthConfig

LOGGER = logging.getLogger(__name__)

#: Seconds between two fetches of the JWKS for an unknown kid, at least.
REFETCH_SECONDS = 10.0
#: Seconds a fetched JWKS is used before it is fetched again.
MAX_AGE_SECONDS = 3600.0
#: Seconds for one request to the issuer.
FETCH_TIMEOUT = 5.0

Fetch = Callable[[str], Any]


def _fetch_json(url: str) -> Any:
    response = httpx.get(url, timeout=FETCH_TIMEOUT, follow_redirects=False)
    response.raise_for_status()
    return response.json()


def _mapping(items: tuple[str, ...]) -> dict[str, frozenset[str]]:
    """``("VALUE=ROLE", ...)`` as value -> roles."""
    found: dict[str, set[str]] = {}
    for item in items:
        value, _, role = item.rpartition("=")
        found.setdefault(value.strip(), set()).add(role.strip())
    return {value: frozenset(roles) for value, roles in found.items()}


def _claim(claims: dict[str, Any], path: str) -> Any:
    """The claim at a dotted *path* (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _strings(value: Any, *, split: bool = False) -> list[str]:
    if isinstance(value, str):
        return value.split() if split else [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


class OidcVerifier:
    """Checks JWTs for one ``[auth]`` section (``mode = "oidc"``).

    Parameters
    ----------
    auth
        The ``[auth]`` section.
    fetch
        GETs a URL and returns its JSON (tests may pass their own; the
        default uses httpx).
    clock
        Monotonic seconds.
    """

    def __init__(
        self,
        auth: AuthConfig,
        fetch: Fetch = _fetch_json,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.auth = auth
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._jwks_url = auth.jwks_url or None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._role_map = _mapping(auth.role_map)
        self._scope_map = _mapping(auth.scope_map)
        self._algorithms = list(auth.algorithms)
        self.fetches = 0  # JWKS fetches so far (for tests and logs)

    # ------------------------------------------------------------------ keys

    def _discover(self) -> str:
        url = self.auth.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = self._fetch(url)
        jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise ValueError(f"{url} names no jwks_uri")
        return jwks_uri

    def _refresh(self) -> None:
        """Fetch the JWKS (the lock is held)."""
        self._fetched_at = self._clock()
        self.fetches += 1
        if self._jwks_url is None:
            self._jwks_url = self._discover()
        document = self._fetch(self._jwks_url)
        keys: dict[str, jwt.PyJWK] = {}
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError) as exc:
                LOGGER.info("JWKS key %s skipped: %s", entry.get("kid"), exc)
                continue
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys
        LOGGER.info("JWKS fetched from %s: %d signing key(s)", self._jwks_url, len(keys))

    def _key(self, kid: str) -> jwt.PyJWK:
        with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at > MAX_AGE_SECONDS
            may_refetch = self._fetched_at is None or now - self._fetched_at >= REFETCH_SECONDS
            if stale or (kid not in self._keys and may_refetch):
                try:
                    self._refresh()
                except (httpx.HTTPError, ValueError) as exc:
                    LOGGER.warning("the issuer's keys could not be fetched: %s", exc)
                    if not self._keys:
                        raise Unauthenticated(
                            "the issuer's signing keys are unavailable", "invalid_token"
                        ) from exc
            key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated(f"no signing key {kid[:64]!r} at the issuer", "invalid_token")
        return key

    # ---------------------------------------------------------------- tokens

    def verify(self, token: str) -> Principal:
        """The principal of the JWT *token*.

        Raises
        ------
        Unauthenticated
            (``invalid_token``) for anything that does not verify.
        """
        return self.check(token)[0]

    def check(self, token: str) -> tuple[Principal, dt.datetime]:
        """The principal of the JWT *token* and when it expires (``exp``).

        Raises
        ------
        Unauthenticated
            (``invalid_token``) for anything that does not verify.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthenticated("the token is not a JWT", "invalid_token") from None
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise Unauthenticated(f"JWT algorithm {algorithm!r} is not accepted", "invalid_token")
        key = self._key(str(header.get("kid", "")))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=self._algorithms,
                audience=self.auth.audience,
                issuer=self.auth.issuer,
                leeway=self.auth.clock_skew_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the JWT has expired", "invalid_token") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the JWT is for another audience", "invalid_token") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the JWT is from another issuer", "invalid_token") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the JWT is not valid yet", "invalid_token") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the JWT's signature does not verify", "invalid_token") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the JWT is invalid: {exc}", "invalid_token") from None
        name = _claim(claims, self.auth.name_claim)
        if not isinstance(name, str) or not name:
            name = str(claims.get("sub") or claims.get("azp") or claims.get("client_id") or "?")
        expires = dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC)
        return Principal(name, self.roles(claims), "oidc"), expires

    def roles(self, claims: dict[str, Any]) -> frozenset[str]:
        """The roles the verified *claims* grant."""
        roles: set[str] = set()
        for value in _strings(_claim(claims, self.auth.roles_claim)):
            if self._role_map:
                roles |= self._role_map.get(value, frozenset())
            elif value in AUTH_ROLES:
                roles.add(value)
        if self._scope_map:
            scopes = _strings(claims.get("scope"), split=True) + _strings(
                claims.get("scp"), split=True
            )
            for scope in scopes:
                roles |= self._scope_map.get(scope, frozenset())
        return frozenset(roles)
