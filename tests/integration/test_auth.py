"""DICOMweb access control over real HTTP on loopback: each ``[auth]`` mode,
each role against each endpoint family (200 / 401 / 403 as RFC 9110 and
RFC 6750 say), API tokens revoked and expired (and the cache's bound),
JWTs from an issuer served on loopback, CORS preflights without a token,
health and metrics open or closed, dicomweb-client with a bearer session,
the ``token`` commands, and what the logs say (never the token)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from dicomweb_client import DICOMwebClient
from flask import g
from pydicom.uid import generate_uid
from sqlalchemy import event

from appliance.access import ROLE_PERMISSIONS, ApiTokens, Principal, Unauthenticated
from appliance.cli import main
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from dicomweb.app import create_app
from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import part10_of, small_study
from tests.oidc_issuer import AUDIENCE, Issuer, running_issuer

pytestmark = pytest.mark.integration

CHALLENGE = 'Bearer realm="dicom-appliance"'
BOUNDARY = "auth-test-boundary"


def serve(tmp_path: Path, **environ: str) -> Iterator[LiveServer]:
    yield from started_server(make_config(tmp_path, APPLIANCE_AUTH_MODE="token", **environ))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    yield from serve(tmp_path)


def token_for(server: LiveServer, *roles: str, **options: Any) -> str:
    token, _ = ApiTokens(server.services.engine).create(list(roles), **options)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stow_body(*parts: bytes) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


STOW_HEADERS = {
    "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    "Accept": "application/dicom+json",
}


def family_request(server: LiveServer, family: str, headers: dict[str, str]) -> httpx.Response:
    """One request of each endpoint family."""
    root = server.root
    if family == "read":
        return httpx.get(f"{root}/studies", headers=headers, timeout=30)
    if family == "write":
        body = stow_body(part10_of(small_study(1, patient_id="AUTH-1")[0]))
        return httpx.post(
            f"{root}/studies", content=body, headers={**STOW_HEADERS, **headers}, timeout=30
        )
    if family == "delete":
        return httpx.delete(f"{root}/studies/{generate_uid()}", headers=headers, timeout=30)
    assert family == "admin"
    return httpx.get(f"{root}/admin/forward", headers=headers, timeout=30)


#: What a request of each family answers once it is let in.
LET_IN = {"read": 200, "write": 200, "delete": 404, "admin": 200}


# --------------------------------------------------------------------------
# token mode


@pytest.mark.parametrize("family", ["read", "write", "delete", "admin"])
def test_no_token_is_401_with_a_bare_bearer_challenge(server: LiveServer, family: str) -> None:
    response = family_request(server, family, {})
    assert response.status_code == 401
    # RFC 6750 3.1: no credentials at all, so no error code
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    body = response.json()
    assert body["status"] == 401
    assert "Authorization: Bearer" in body["error"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize("role", ["read", "write", "delete", "admin"])
def test_each_role_against_each_family(server: LiveServer, role: str) -> None:
    headers = bearer(token_for(server, role))
    for family in ("read", "write", "delete", "admin"):
        response = family_request(server, family, headers)
        if family in ROLE_PERMISSIONS[role]:
            assert response.status_code == LET_IN[family], (role, family, response.text)
        else:
            assert response.status_code == 403, (role, family, response.text)
            challenge = response.headers["WWW-Authenticate"]
            assert challenge.startswith(f'{CHALLENGE}, error="insufficient_scope"')
            assert f"lacks the {family} permission" in response.json()["error"]


def test_every_read_endpoint_family_needs_the_read_role(server: LiveServer) -> None:
    ds = small_study(1, patient_id="AUTH-2")[0]
    writer = bearer(token_for(server, "write"))
    reader = bearer(token_for(server, "read"))
    stowed = httpx.post(
        f"{server.root}/studies",
        content=stow_body(part10_of(ds)),
        headers={**STOW_HEADERS, **writer},
        timeout=30,
    )
    assert stowed.status_code == 200
    instance = (
        f"{server.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    paths = [
        f"{server.root}/studies?PatientID=AUTH-2",
        f"{server.root}/series",
        f"{server.root}/instances",
        f"{server.root}/studies/{ds.StudyInstanceUID}/metadata",
        instance,
        f"{instance}/frames/1",
        f"{instance}/rendered",
        f"{instance}/thumbnail",
        f"{server.root}/changefeed",
        f"{server.root}/changefeed/latest",
    ]
    for url in paths:
        assert httpx.get(url, timeout=30).status_code == 401, url
        assert httpx.get(url, headers=writer, timeout=30).status_code == 403, url
        answered = httpx.get(url, headers=reader, timeout=30)
        assert answered.status_code not in (401, 403), url
        assert answered.status_code < 400 or answered.status_code == 406, (url, answered.text)


def test_bad_tokens_are_401_invalid_token(server: LiveServer) -> None:
    good = token_for(server, "admin")
    token_id = good.split("_")[1]
    wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for token, words in [
        (wrong_secret, f"API token {token_id} is unknown"),
        ("dap_0123456789ab_" + "x" * 43, "API token 0123456789ab is unknown"),
        ("dap_short", "malformed"),
        ("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "not an API token"),
    ]:
        response = httpx.get(f"{server.root}/studies", headers=bearer(token), timeout=30)
        assert response.status_code == 401, token
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith(f'{CHALLENGE}, error="invalid_token"'), challenge
        assert words in response.json()["error"]


def test_other_schemes_and_malformed_headers(server: LiveServer) -> None:
    basic = httpx.get(f"{server.root}/studies", auth=("admin", "admin"), timeout=30)
    assert basic.status_code == 401
    assert basic.headers["WWW-Authenticate"] == CHALLENGE  # Basic is not accepted
    for value in ("Bearer", "Bearer a b", "Bearer ???"):
        response = httpx.get(f"{server.root}/studies", headers={"Authorization": value}, timeout=30)
        assert response.status_code == 400, value  # RFC 6750 3.1 invalid_request
        assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]


def test_an_unknown_path_asks_for_credentials_first(server: LiveServer) -> None:
    assert httpx.get(f"{server.root}/nothing-here", timeout=30).status_code == 401
    reader = bearer(token_for(server, "read"))
    assert httpx.get(f"{server.root}/nothing-here", headers=reader, timeout=30).status_code == 404


def test_a_revoked_token_is_refused_within_the_cache_time(tmp_path: Path) -> None:
    for server in serve(tmp_path, APPLIANCE_AUTH_TOKEN_CACHE_SECONDS="1"):
        token = token_for(server, "read")
        url = f"{server.root}/studies"
        assert httpx.get(url, headers=bearer(token), timeout=30).status_code == 200
        assert ApiTokens(server.services.engine).revoke(token.split("_")[1])
        # still trusted from the cache (the documented bound), then refused
        assert httpx.get(url, headers=bearer(token), timeout=30).status_code == 200
        time.sleep(1.2)
        response = httpx.get(url, headers=bearer(token), timeout=30)
        assert response.status_code == 401
        assert "is revoked" in response.json()["error"]
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_without_a_cache_revocation_is_immediate(tmp_path: Path) -> None:
    for server in serve(tmp_path, APPLIANCE_AUTH_TOKEN_CACHE_SECONDS="0"):
        token = token_for(server, "read")
        url = f"{server.root}/studies"
        assert httpx.get(url, headers=bearer(token), timeout=30).status_code == 200
        ApiTokens(server.services.engine).revoke(token.split("_")[1])
        assert httpx.get(url, headers=bearer(token), timeout=30).status_code == 401


def test_expired_tokens_are_refused_even_from_the_cache(server: LiveServer) -> None:
    url = f"{server.root}/studies"
    expired = token_for(server, "read", expires_in=dt.timedelta(seconds=-1))
    response = httpx.get(url, headers=bearer(expired), timeout=30)
    assert response.status_code == 401
    assert "is expired" in response.json()["error"]
    # cached for at most its remaining life, not the 30 s of the cache
    short = token_for(server, "read", expires_in=dt.timedelta(seconds=1))
    assert httpx.get(url, headers=bearer(short), timeout=30).status_code == 200
    time.sleep(1.2)
    assert httpx.get(url, headers=bearer(short), timeout=30).status_code == 401


def test_a_cached_token_costs_no_index_query(server: LiveServer) -> None:
    token = token_for(server, "read")
    url = f"{server.root}/changefeed/latest"
    lookups: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if "api_token" in statement:
            lookups.append(statement)

    event.listen(server.services.engine, "before_cursor_execute", count)
    try:
        with httpx.Client(headers=bearer(token), timeout=30) as client:
            for _ in range(50):
                assert client.get(url).status_code == 204  # an empty feed
    finally:
        event.remove(server.services.engine, "before_cursor_execute", count)
    # one SELECT, and one UPDATE of last_used_at, for 50 requests
    assert len(lookups) == 2, lookups
    assert sum("SELECT" in s for s in lookups) == 1


def test_the_principal_is_on_flask_g(server: LiveServer) -> None:
    app = create_app(server.config, server.services)
    seen: list[Principal] = []

    @app.after_request
    def record(response: Any) -> Any:
        seen.append(g.principal)
        return response

    token = token_for(server, "read", "delete")
    client = app.test_client()
    assert client.get("/v1/studies", headers=bearer(token)).status_code == 200
    token_id = token.split("_")[1]
    assert seen[-1] == Principal(f"token:{token_id}", frozenset({"read", "delete"}), "token")
    assert client.get("/health/live").status_code == 200
    assert seen[-1].name == "anonymous"
    assert seen[-1].roles == frozenset()


def test_cors_preflight_needs_no_token(tmp_path: Path) -> None:
    for server in serve(tmp_path, APPLIANCE_HTTP_CORS_ALLOWED_ORIGINS="https://viewer.example"):
        origin = {"Origin": "https://viewer.example"}
        preflight = httpx.request(
            "OPTIONS",
            f"{server.root}/studies",
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
            timeout=30,
        )
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
        # the 401 itself carries the CORS headers, so the page can read it
        refused = httpx.get(f"{server.root}/studies", headers=origin, timeout=30)
        assert refused.status_code == 401
        assert refused.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        assert "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"]
        reader = bearer(token_for(server, "read"))
        answered = httpx.get(f"{server.root}/studies", headers={**origin, **reader}, timeout=30)
        assert answered.status_code == 200


def test_health_and_metrics_are_open_by_default(server: LiveServer) -> None:
    for path in ("/health/live", "/health/ready", "/metrics"):
        response = httpx.get(f"{server.base_url}{path}", timeout=30)
        assert response.status_code in (200, 503), path  # ready: no DIMSE here
        assert response.status_code != 401


def test_health_and_metrics_closed_need_the_read_role(tmp_path: Path) -> None:
    for server in serve(
        tmp_path,
        APPLIANCE_AUTH_HEALTH_ANONYMOUS="false",
        APPLIANCE_AUTH_METRICS_ANONYMOUS="false",
    ):
        reader = bearer(token_for(server, "read"))
        writer = bearer(token_for(server, "write"))
        for path in ("/health/live", "/metrics"):
            url = f"{server.base_url}{path}"
            assert httpx.get(url, timeout=30).status_code == 401, path
            assert httpx.get(url, headers=writer, timeout=30).status_code == 403, path
            assert httpx.get(url, headers=reader, timeout=30).status_code == 200, path


def test_dicomweb_client_with_a_bearer_session(server: LiveServer) -> None:
    ds = small_study(2, patient_id="AUTH-DWC")
    session = requests.Session()
    session.headers.update(bearer(token_for(server, "read", "write", name="viewer")))
    client = DICOMwebClient(url=server.root, session=session)
    result = client.store_instances(ds)
    assert len(result.ReferencedSOPSequence) == 2
    found = client.search_for_studies(search_filters={"PatientID": "AUTH-DWC"})
    assert len(found) == 1
    assert client.retrieve_study(ds[0].StudyInstanceUID)[0].PatientID == "AUTH-DWC"

    reader = requests.Session()
    reader.headers.update(bearer(token_for(server, "read")))
    with pytest.raises(requests.HTTPError) as caught:
        DICOMwebClient(url=server.root, session=reader).store_instances(small_study(1))
    assert caught.value.response.status_code == 403
    with pytest.raises(requests.HTTPError) as caught:
        DICOMwebClient(url=server.root).search_for_studies()
    assert caught.value.response.status_code == 401


def test_logs_name_the_token_id_and_the_reason_never_the_token(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token = token_for(server, "read")
    token_id = token.split("_")[1]
    ApiTokens(server.services.engine).revoke(token_id)
    httpx.get(f"{server.root}/studies", headers=bearer(token), timeout=30)
    writer = token_for(server, "write")
    httpx.get(f"{server.root}/studies", headers=bearer(writer), timeout=30)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert f"API token {token_id} is revoked" in text
    assert f"token:{writer.split('_')[1]} (roles: write) lacks the read permission" in text
    # dap_<id>_<secret>: the secret may hold "_" itself, so it is all after
    # the second one (its last piece alone can be one letter, found in any log)
    secret_parts = [token.split("_", 2)[2], writer.split("_", 2)[2]]
    for secret in secret_parts:
        assert secret not in text


# --------------------------------------------------------------------------
# anonymous mode


def test_anonymous_mode_on_loopback_lets_everything_in(live_server: LiveServer) -> None:
    for family in ("read", "write", "delete", "admin"):
        assert family_request(live_server, family, {}).status_code == LET_IN[family]


# --------------------------------------------------------------------------
# oidc mode


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    yield from running_issuer()


def test_oidc_mode_takes_jwts_and_api_tokens(tmp_path: Path, issuer: Issuer) -> None:
    for server in started_server(
        make_config(
            tmp_path,
            APPLIANCE_AUTH_MODE="oidc",
            APPLIANCE_AUTH_ISSUER=issuer.url,
            APPLIANCE_AUTH_AUDIENCE=AUDIENCE,
            APPLIANCE_AUTH_ROLE_MAP="dicom-readers=read,dicom-uploaders=write",
        )
    ):
        url = f"{server.root}/studies"
        reader = issuer.token(roles=["dicom-readers"])
        assert httpx.get(url, headers=bearer(reader), timeout=30).status_code == 200
        assert family_request(server, "write", bearer(reader)).status_code == 403
        uploader = issuer.token(roles=["dicom-uploaders"])
        assert family_request(server, "write", bearer(uploader)).status_code == 200
        # no mapped role: authenticated, but nothing is permitted
        nobody = issuer.token(roles=["read"])
        assert httpx.get(url, headers=bearer(nobody), timeout=30).status_code == 403
        for bad in (
            issuer.token(exp=int(time.time()) - 3600),
            issuer.token(aud="someone-else"),
            issuer.token(iss="https://other.example"),
        ):
            response = httpx.get(url, headers=bearer(bad), timeout=30)
            assert response.status_code == 401
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        # API tokens work in oidc mode too (scripts, on-prem viewers)
        assert httpx.get(url, headers=bearer(token_for(server, "read")), timeout=30).is_success


# --------------------------------------------------------------------------
# the token commands


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPLIANCE_INDEX_URL", f"sqlite:///{tmp_path / 'index.db'}")
    monkeypatch.setenv("APPLIANCE_STORAGE_PATH", str(tmp_path / "blobs"))
    return tmp_path


def test_token_commands(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "list"]) == 2  # the index is not migrated yet
    assert "migrate" in capsys.readouterr().err
    engine = create_index_engine(f"sqlite:///{site / 'index.db'}")
    migrate.upgrade(engine)

    assert main(["token", "create", "--role", "read", "--role", "write", "--name", "viewer"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("dap_")
    token_id = token.split("_")[1]
    assert f"id {token_id}, roles read,write, never expires" in err
    principal, _ = ApiTokens(engine).verify(token)
    assert principal.roles == {"read", "write"}

    assert main(["token", "create", "--role", "admin", "--expires-days", "7", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["token"].startswith("dap_")
    assert created["roles"] == ["admin"]
    assert created["expires_at"] is not None

    assert main(["token", "list"]) == 0
    listing = capsys.readouterr().out
    assert token_id in listing
    assert "viewer" in listing
    assert "read,write" in listing
    assert token.rsplit("_", 1)[1] not in listing
    assert created["token"].rsplit("_", 1)[1] not in listing

    assert main(["token", "revoke", token_id]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["token", "revoke", token_id]) == 1
    assert "no active API token" in capsys.readouterr().err
    assert main(["token", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tokens"]
    assert {t["id"]: t["state"] for t in listed}[token_id] == "revoked"
    assert all("digest" not in t and "token" not in t for t in listed)

    assert main(["token", "create", "--role", "owner"]) == 2
    assert "'owner' is not a role" in capsys.readouterr().err
    assert main(["token", "create"]) == 2  # --role is required
    engine.dispose()


def test_serve_refuses_anonymous_on_a_public_bind(
    site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_HTTP_HOST", "0.0.0.0")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "auth.mode" in err
    assert "loopback" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------
# the real thing: serve (gunicorn workers) with tokens from the command


def test_serve_in_token_mode_with_a_token_from_the_command(tmp_path: Path) -> None:
    from tests.integration.test_serve import migrated_site, running

    site = migrated_site(
        tmp_path / "app",
        {"APPLIANCE_AUTH_MODE": "token", "APPLIANCE_AUTH_TOKEN_CACHE_SECONDS": "2"},
    )
    created = site.run("token", "create", "--role", "read", "--role", "write", "--name", "e2e")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    with running(site) as app:  # its readiness probe needs no token
        url = f"{app.base_url}/v1/studies"
        assert httpx.get(url, timeout=30).status_code == 401
        body = stow_body(*(part10_of(ds) for ds in small_study(2, patient_id="AUTH-E2E")))
        stored = httpx.post(
            url, content=body, headers={**STOW_HEADERS, **bearer(token)}, timeout=60
        )
        assert stored.status_code == 200, stored.text
        # every gunicorn worker takes it (each has its own cache)
        for _ in range(6):
            found = httpx.get(url, params={"PatientID": "AUTH-E2E"}, headers=bearer(token))
            assert found.status_code == 200
            assert len(found.json()) == 1
        assert site.run("token", "revoke", token.split("_")[1]).returncode == 0
        deadline = time.monotonic() + 15  # token_cache_seconds (2) and a margin
        while time.monotonic() < deadline:
            statuses = {httpx.get(url, headers=bearer(token)).status_code for _ in range(6)}
            if statuses == {401}:
                break
            assert statuses <= {200, 401}
            time.sleep(1)
        assert statuses == {401}


# --------------------------------------------------------------------------
# the token table on both index backends


def test_api_tokens_on_each_index_backend(index_engine: Any) -> None:
    tokens = ApiTokens(index_engine)
    token, info = tokens.create(["delete", "read"], name="both backends")
    assert info.roles == ("read", "delete")
    principal, expires = tokens.verify(token)
    assert principal == Principal(f"token:{info.id}", frozenset({"read", "delete"}), "token")
    assert expires is None
    [listed] = tokens.list()
    assert listed.id == info.id
    assert listed.last_used_at is not None  # the verification was recorded
    assert listed.state() == "active"
    assert tokens.revoke(info.id)
    assert not tokens.revoke(info.id)
    assert tokens.list()[0].state() == "revoked"
    with pytest.raises(Unauthenticated, match="is revoked"):
        tokens.verify(token)
    short, _ = tokens.create(["read"], expires_in=dt.timedelta(seconds=-5))
    with pytest.raises(Unauthenticated, match="is expired"):
        tokens.verify(short)
