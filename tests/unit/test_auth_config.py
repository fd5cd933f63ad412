"""``[auth]``: anonymous only on a loopback bind, what oidc needs, and the
values refused at start with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import AuthConfig, load_config, render_config
from appliance.errors import ConfigError


def load(tmp_path: Path, **environ: str) -> AuthConfig:
    return load_config(environ=environ, cwd=tmp_path).auth


def refused(tmp_path: Path, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ, cwd=tmp_path)
    return caught.value


def test_the_default_is_anonymous_on_loopback(tmp_path: Path) -> None:
    auth = load(tmp_path)
    assert auth.mode == "anonymous"
    assert auth.health_anonymous
    assert auth.metrics_anonymous
    assert auth.token_cache_seconds == 30
    assert auth.algorithms == ("RS256", "ES256")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_anonymous_is_allowed_on_loopback(tmp_path: Path, host: str) -> None:
    assert load(tmp_path, APPLIANCE_HTTP_HOST=host).mode == "anonymous"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "appliance.example"])
def test_anonymous_is_refused_on_any_other_bind(tmp_path: Path, host: str) -> None:
    error = refused(tmp_path, APPLIANCE_HTTP_HOST=host)
    assert error.key == "auth.mode"
    assert "loopback" in error.reason
    assert repr(host) in error.reason


def test_anonymous_on_a_public_bind_is_refused_from_a_file_too(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('[http]\nhost = "0.0.0.0"\n\n[auth]\nmode = "anonymous"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={}, cwd=tmp_path)
    assert caught.value.key == "auth.mode"


def test_token_mode_may_bind_every_interface(tmp_path: Path) -> None:
    auth = load(tmp_path, APPLIANCE_HTTP_HOST="0.0.0.0", APPLIANCE_AUTH_MODE="token")
    assert auth.mode == "token"


def test_oidc_needs_an_issuer_and_an_audience(tmp_path: Path) -> None:
    assert refused(tmp_path, APPLIANCE_AUTH_MODE="oidc").key == "auth.issuer"
    error = refused(
        tmp_path, APPLIANCE_AUTH_MODE="oidc", APPLIANCE_AUTH_ISSUER="https://idp.example/realm"
    )
    assert error.key == "auth.audience"


def test_an_oidc_section_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(
        '[auth]\nmode = "oidc"\nissuer = "https://login.example/realms/hospital/"\n'
        'audience = "dicom-appliance"\nroles_claim = "realm_access.roles"\n'
        'role_map = ["dicom-readers=read", "dicom-admins=admin", "a=b=write"]\n'
        'scope_map = ["dicom.read=read"]\nalgorithms = ["RS256", "PS256", "EdDSA"]\n'
    )
    auth = load_config(path, environ={}, cwd=tmp_path).auth
    assert auth.issuer.endswith("/hospital/")
    assert auth.roles_claim == "realm_access.roles"
    assert auth.role_map == ("dicom-readers=read", "dicom-admins=admin", "a=b=write")
    assert auth.algorithms == ("RS256", "PS256", "EdDSA")


def test_role_map_from_the_environment_is_comma_separated(tmp_path: Path) -> None:
    auth = load(tmp_path, APPLIANCE_AUTH_ROLE_MAP="dicom-readers=read, dicom-admins=admin")
    assert auth.role_map == ("dicom-readers=read", "dicom-admins=admin")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("ALGORITHMS", "none", "HS*"),
        ("ALGORITHMS", "RS256,HS256", "'HS256'"),
        ("ISSUER", "http://idp.example/realm", "https"),
        ("ISSUER", "ftp://idp.example", "https"),
        ("JWKS_URL", "http://10.0.0.9/jwks", "https"),
        ("ROLE_MAP", "dicom-readers", "CLAIM_VALUE=ROLE"),
        ("ROLE_MAP", "dicom-readers=superuser", "CLAIM_VALUE=ROLE"),
        ("SCOPE_MAP", "=read", "CLAIM_VALUE=ROLE"),
        ("ROLES_CLAIM", "roles..x", "dotted path"),
        ("CLOCK_SKEW_SECONDS", "3600", "from 0 to 600"),
        ("TOKEN_CACHE_SECONDS", "-1", "from 0 to 300"),
        ("MODE", "basic", "anonymous, token, oidc"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    tmp_path: Path, key: str, value: str, words: str
) -> None:
    error = refused(tmp_path, **{f"APPLIANCE_AUTH_{key}": value})
    assert error.key == f"auth.{key.lower()}"
    assert words in error.reason


def test_http_to_a_loopback_issuer_is_allowed(tmp_path: Path) -> None:
    auth = load(
        tmp_path,
        APPLIANCE_AUTH_MODE="oidc",
        APPLIANCE_AUTH_ISSUER="http://127.0.0.1:8081/realm",
        APPLIANCE_AUTH_JWKS_URL="http://localhost:8081/realm/jwks",
        APPLIANCE_AUTH_AUDIENCE="dicom",
    )
    assert auth.jwks_url == "http://localhost:8081/realm/jwks"


def test_config_show_lists_the_auth_section(tmp_path: Path) -> None:
    text = render_config(load_config(environ={"APPLIANCE_AUTH_MODE": "token"}, cwd=tmp_path))
    section = text.split("[auth]\n", 1)[1]
    assert section.startswith('mode = "token"\n')
    assert 'algorithms = ["RS256", "ES256"]' in section
