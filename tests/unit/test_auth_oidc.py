"""JWT verification (``[auth] mode = "oidc"``) against an issuer whose
discovery document and JWKS are served over real HTTP on loopback, with
keys generated here: expiry, audience, issuer, signature, ``alg=none`` and
HMAC confusion, clock skew, key rotation (an unknown kid fetches the JWKS
again, at most once per interval), and the role mapping."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from appliance import oidc
from appliance.access import Unauthenticated
from appliance.config import AuthConfig, load_config
from appliance.oidc import OidcVerifier
from tests.oidc_issuer import AUDIENCE, Issuer, running_issuer


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    yield from running_issuer()


def auth_config(tmp_path: Path, issuer: Issuer, **environ: str) -> AuthConfig:
    env = {
        "APPLIANCE_AUTH_MODE": "oidc",
        "APPLIANCE_AUTH_ISSUER": issuer.url,
        "APPLIANCE_AUTH_AUDIENCE": AUDIENCE,
        **environ,
    }
    return load_config(environ=env, cwd=tmp_path).auth


def refused(verifier: OidcVerifier, token: str, words: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    assert caught.value.error == "invalid_token"
    assert words in caught.value.reason


def test_a_valid_token_gives_its_subject_and_roles(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    principal = verifier.verify(issuer.token(sub="alice", roles=["read", "write", "other"]))
    assert principal.name == "alice"
    assert principal.roles == {"read", "write"}
    assert principal.method == "oidc"
    # the keys were found through discovery, once, and are kept
    verifier.verify(issuer.token())
    assert issuer.discovery_requests == 1
    assert issuer.jwks_requests == 1


def test_an_es256_key_works_too(tmp_path: Path, issuer: Issuer) -> None:
    kid = issuer.add_key("EC")
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    assert verifier.verify(issuer.token(kid=kid)).roles == {"read"}


def test_expired_not_yet_valid_and_clock_skew(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(auth_config(tmp_path, issuer, APPLIANCE_AUTH_CLOCK_SKEW_SECONDS="60"))
    now = int(time.time())
    refused(verifier, issuer.token(exp=now - 120), "expired")
    refused(verifier, issuer.token(nbf=now + 120), "not valid yet")
    # within the leeway both ways
    assert verifier.verify(issuer.token(exp=now - 30)).name == "user-1"
    assert verifier.verify(issuer.token(nbf=now + 30, iat=now + 30)).name == "user-1"
    strict = OidcVerifier(auth_config(tmp_path, issuer, APPLIANCE_AUTH_CLOCK_SKEW_SECONDS="0"))
    refused(strict, issuer.token(exp=now - 30), "expired")


def test_a_token_without_exp_is_refused(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    refused(verifier, issuer.token(exp=None), "exp")


def test_wrong_audience_and_wrong_issuer(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    refused(verifier, issuer.token(aud="another-api"), "another audience")
    refused(verifier, issuer.token(aud=None), "aud")
    refused(verifier, issuer.token(iss="https://evil.example/realm"), "another issuer")


def test_a_signature_by_another_key_is_refused(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    forger = issuer.add_key(publish=False)
    token = jwt.encode(
        issuer.claims(roles=["admin"]),
        issuer.keys[forger],
        algorithm="RS256",
        headers={"kid": issuer.kid},  # claims to be the published key
    )
    refused(verifier, token, "signature")
    # a payload altered after signing
    header, payload, signature = issuer.token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["roles"] = ["admin"]
    altered = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    refused(verifier, f"{header}.{altered}.{signature}", "signature")


def test_alg_none_is_refused(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    token = jwt.encode(
        issuer.claims(roles=["admin"]), None, algorithm="none", headers={"kid": issuer.kid}
    )
    refused(verifier, token, "'none' is not accepted")


def test_hmac_with_the_public_key_as_secret_is_refused(tmp_path: Path, issuer: Issuer) -> None:
    """The classic algorithm confusion: HS256 keyed with the RSA public key
    (which anyone can fetch from the JWKS)."""
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    public = (
        issuer.keys[issuer.kid]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    signing_input = b".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")
        for part in (header, issuer.claims(roles=["admin"]))
    )
    import hashlib
    import hmac

    mac = hmac.new(public, signing_input, hashlib.sha256).digest()
    token = f"{signing_input.decode()}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    refused(verifier, token, "'HS256' is not accepted")


def test_garbage_is_refused(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(auth_config(tmp_path, issuer))
    refused(verifier, "not.a.jwt", "not a JWT")
    refused(verifier, "abc", "not a JWT")


def test_key_rotation_fetches_the_jwks_again_once(
    tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    verifier = OidcVerifier(
        auth_config(tmp_path, issuer, APPLIANCE_AUTH_JWKS_URL=f"{issuer.url}/jwks"),
        clock=lambda: clock[0],
    )
    assert verifier.verify(issuer.token()).name == "user-1"
    assert issuer.jwks_requests == 1
    assert issuer.discovery_requests == 0  # jwks_url given: no discovery
    clock[0] += oidc.REFETCH_SECONDS
    new_kid = issuer.rotate()
    # a token under the new kid: the JWKS is fetched again, once, and works
    assert verifier.verify(issuer.token(kid=new_kid, sub="bob")).name == "bob"
    assert issuer.jwks_requests == 2
    # made-up kids right after do not make the issuer be asked again
    for n in range(20):
        forged = jwt.encode(issuer.claims(), issuer.keys[new_kid], "RS256", {"kid": f"x{n}"})
        refused(verifier, forged, "no signing key")
    assert issuer.jwks_requests == 2
    # the old key is gone from the JWKS after rotation
    old = next(kid for kid in issuer.keys if kid != new_kid)
    clock[0] += oidc.REFETCH_SECONDS
    refused(verifier, issuer.token(kid=old), "no signing key")
    assert issuer.jwks_requests == 3


def test_an_unreachable_issuer_refuses_with_401_not_500(tmp_path: Path, issuer: Issuer) -> None:
    config = auth_config(tmp_path, issuer)
    token = issuer.token()
    issuer.close()
    refused(OidcVerifier(config), token, "unavailable")


def test_role_map_on_a_dotted_claim_and_scope_map(tmp_path: Path, issuer: Issuer) -> None:
    verifier = OidcVerifier(
        auth_config(
            tmp_path,
            issuer,
            APPLIANCE_AUTH_ROLES_CLAIM="realm_access.roles",
            APPLIANCE_AUTH_ROLE_MAP="dicom-readers=read,dicom-admins=admin,uploaders=write",
            APPLIANCE_AUTH_SCOPE_MAP="dicom.delete=delete",
        )
    )
    claims = {"realm_access": {"roles": ["dicom-readers", "read", "offline_access"]}}
    # with a role_map only mapped values count ("read" itself is not mapped)
    assert verifier.verify(issuer.token(roles=None, **claims)).roles == {"read"}
    token = issuer.token(
        roles=None, realm_access={"roles": "uploaders"}, scope="openid dicom.delete"
    )
    assert verifier.verify(token).roles == {"write", "delete"}
    assert verifier.verify(issuer.token(roles=None, scp=["dicom.delete"])).roles == {"delete"}
    # a token without the claim authenticates with no role (403 later, not 401)
    assert verifier.verify(issuer.token(roles=None)).roles == frozenset()


def test_keys_already_fetched_keep_working_while_the_issuer_is_down(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = [0.0]
    verifier = OidcVerifier(auth_config(tmp_path, issuer), clock=lambda: clock[0])
    token = issuer.token()
    assert verifier.verify(token).name == "user-1"
    issuer.close()
    clock[0] += oidc.MAX_AGE_SECONDS + 1  # stale: a fetch is tried, and fails
    assert verifier.verify(token).name == "user-1"
    assert verifier.fetches == 2


def test_a_verified_jwt_is_kept_no_longer_than_the_cache_time_or_its_exp(
    tmp_path: Path, issuer: Issuer
) -> None:
    from appliance.access import Authenticator

    clock = [0.0]
    config = auth_config(tmp_path, issuer, APPLIANCE_AUTH_TOKEN_CACHE_SECONDS="30")
    authenticator = Authenticator(config, engine=lambda: None, clock=lambda: clock[0])  # type: ignore[arg-type,return-value]
    verifier = authenticator._oidc
    assert verifier is not None
    checked: list[str] = []
    real_check = verifier.check

    def counting_check(token: str) -> Any:
        checked.append(token)
        return real_check(token)

    verifier.check = counting_check  # type: ignore[method-assign]
    token = issuer.token(sub="carol")
    for _ in range(5):
        assert authenticator.authenticate(f"Bearer {token}").name == "carol"
    assert len(checked) == 1  # one signature check for five requests
    clock[0] += 29
    assert authenticator.authenticate(f"Bearer {token}").name == "carol"
    assert len(checked) == 1
    clock[0] += 2  # past the cache time: checked again
    assert authenticator.authenticate(f"Bearer {token}").name == "carol"
    assert len(checked) == 2
    # a token with 5 s left is kept 5 s at most
    short = issuer.token(sub="dave", exp=int(time.time()) + 5)
    assert authenticator.authenticate(f"Bearer {short}").name == "dave"
    clock[0] += 6
    assert authenticator.authenticate(f"Bearer {short}").name == "dave"  # within the leeway
    assert len(checked) == 4
    # a refused token is never kept
    expired = issuer.token(exp=int(time.time()) - 3600)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="expired"):
            authenticator.authenticate(f"Bearer {expired}")
    assert len(checked) == 6
