"""The operator console over plain HTTP (no browser): the login cookie and
its attributes, the redirect to the login page, CSRF and same-origin checks
on the console's actions and on DICOMweb requests authenticated by the
cookie, a revoked token's cookie, the open-redirect guard, tokens never in
the logs, the zip download's errors and what the audit trail records."""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from appliance.access import ApiTokens
from dicomweb.auth import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, csrf_token
from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import part10_of, small_study, stow

pytestmark = pytest.mark.integration

BOUNDARY = "console-test-boundary"


def serve(tmp_path: Path, **environ: str) -> Iterator[LiveServer]:
    yield from started_server(
        make_config(tmp_path, APPLIANCE_AUDIT_PATH=str(tmp_path / "audit"), **environ)
    )


@pytest.fixture
def anonymous(tmp_path: Path) -> Iterator[LiveServer]:
    yield from serve(tmp_path)


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[LiveServer]:
    # no cache: a revocation is seen at once
    yield from serve(tmp_path, APPLIANCE_AUTH_MODE="token", APPLIANCE_AUTH_TOKEN_CACHE_SECONDS="0")


def token_for(server: LiveServer, *roles: str) -> str:
    return ApiTokens(server.services.engine).create(list(roles))[0]


def stow_body(*parts: bytes) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def signed_in(server: LiveServer, token: str) -> httpx.Client:
    """A client holding the session cookie the login page set."""
    client = httpx.Client(base_url=server.base_url, timeout=30)
    response = client.post("/console/login", data={"token": token, "next": "/console/studies"})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/console/studies"
    assert client.cookies.get(SESSION_COOKIE) == token
    return client


def audit_events(tmp_path: Path) -> list[dict[str, object]]:
    events = []
    for path in sorted((tmp_path / "audit").glob("audit-*.jsonl")):
        events.extend(json.loads(line) for line in path.read_text().splitlines())
    return events


# --------------------------------------------------------------------------
# token mode


def test_login_sets_a_strict_http_only_cookie(token_server: LiveServer) -> None:
    token = token_for(token_server, "read")
    response = httpx.post(
        f"{token_server.base_url}/console/login", data={"token": token, "next": "/"}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=", 1)[0].lower() for part in cookie.split(";")}
    assert cookie.startswith(f"{SESSION_COOKIE}={token};")
    assert {"httponly", "max-age", "path", "samesite"} <= attributes
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    assert "Max-Age=28800" in cookie
    assert "secure" not in attributes  # plain HTTP; Secure over HTTPS (request.is_secure)
    assert response.headers["cache-control"] == "no-store"


def test_signed_out_pages_redirect_and_the_api_still_says_401(token_server: LiveServer) -> None:
    base = token_server.base_url
    for path in ("/", "/console/studies?patient=DOE", f"/console/studies/{generate_uid()}"):
        response = httpx.get(base + path)
        assert response.status_code == 302, path
        location = response.headers["location"]
        assert location.startswith("/console/login?next=")
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert httpx.get(base + "/").headers["location"] == "/console/login?next=/"
    assert httpx.get(f"{token_server.root}/studies").status_code == 401
    # an action without a session is refused, not redirected
    assert httpx.post(f"{base}/console/forward/x/retry").status_code == 401
    # the login page and the static files need nobody
    assert httpx.get(base + "/console/login").status_code == 200
    css = httpx.get(base + "/console/static/style.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


def test_a_wrong_token_is_refused_and_no_token_is_logged(
    token_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = token_for(token_server, "admin")
    wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    base = token_server.base_url
    refused = httpx.post(f"{base}/console/login", data={"token": wrong})
    assert refused.status_code == 401
    assert "set-cookie" not in refused.headers
    assert "is unknown" in refused.text
    assert wrong not in refused.text  # not echoed back
    client = signed_in(token_server, good)
    assert client.get("/console/studies").status_code == 200
    assert client.get("/").status_code == 200
    # what the appliance logged (not the test's own HTTP client)
    logged = "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name.split(".")[0] in ("appliance", "dicomweb", "werkzeug")
    )
    assert "console login" in logged
    secret = good.rsplit("_", 1)[1]
    assert secret not in logged
    assert wrong.rsplit("_", 1)[1] not in logged


def test_the_next_page_is_never_another_site(token_server: LiveServer) -> None:
    token = token_for(token_server, "read")
    for target in ("//evil.example/", "/\\evil.example", "https://evil.example/", "javascript:x"):
        response = httpx.post(
            f"{token_server.base_url}/console/login", data={"token": token, "next": target}
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/", target


def test_cookie_requests_that_change_things_need_the_csrf_token(
    token_server: LiveServer,
) -> None:
    token = token_for(token_server, "admin")
    client = signed_in(token_server, token)
    body = stow_body(part10_of(small_study(1, patient_id="CSRF-1")[0]))
    headers = {"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"}
    # STOW-RS through the cookie: the CSRF header is needed
    refused = client.post("/v1/studies", content=body, headers=headers)
    assert refused.status_code == 403
    assert CSRF_HEADER in refused.json()["error"]
    wrong = client.post(
        "/v1/studies", content=body, headers={**headers, CSRF_HEADER: csrf_token(token + "x")}
    )
    assert wrong.status_code == 403
    stored = client.post(
        "/v1/studies", content=body, headers={**headers, CSRF_HEADER: csrf_token(token)}
    )
    assert stored.status_code == 200
    # ...and from our own origin only, even with the token
    foreign = client.post(
        "/v1/studies",
        content=body,
        headers={**headers, CSRF_HEADER: csrf_token(token), "Origin": "http://evil.example"},
    )
    assert foreign.status_code == 403
    # a bearer header needs no CSRF token: no browser adds it by itself
    bearer = httpx.post(
        f"{token_server.root}/studies",
        content=stow_body(part10_of(small_study(1, patient_id="CSRF-2")[0])),
        headers={**headers, "Authorization": f"Bearer {token}"},
    )
    assert bearer.status_code == 200
    # console actions: the form field
    study = small_study(1)[0].StudyInstanceUID
    form = {"confirm": study}
    assert client.post(f"/console/studies/{study}/delete", data=form).status_code == 403
    form[CSRF_FIELD] = csrf_token(token)
    missing = client.post(f"/console/studies/{study}/delete", data=form)
    assert missing.status_code == 404  # let in: no such study
    assert "text/html" in missing.headers["content-type"]


def test_a_revoked_token_ends_the_session(token_server: LiveServer) -> None:
    tokens = ApiTokens(token_server.services.engine)
    token, info = tokens.create(["read"])
    client = signed_in(token_server, token)
    assert client.get("/console/studies").status_code == 200
    assert tokens.revoke(info.id)
    response = client.get("/console/studies")
    assert response.status_code == 302
    assert response.headers["location"].startswith("/console/login")
    # the cookie that no longer verifies is dropped
    assert f'{SESSION_COOKIE}=""' in response.headers["set-cookie"] or (
        "Max-Age=0" in response.headers["set-cookie"]
    )
    assert client.get("/v1/studies").status_code == 401


def test_logout_drops_the_cookie(token_server: LiveServer) -> None:
    client = signed_in(token_server, token_for(token_server, "read"))
    response = client.post("/console/logout")
    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert client.cookies.get(SESSION_COOKIE) is None
    assert client.get("/").status_code == 302


# --------------------------------------------------------------------------
# anonymous mode


def test_anonymous_mode_needs_no_login_but_refuses_foreign_forms(anonymous: LiveServer) -> None:
    base = anonymous.base_url
    login = httpx.get(base + "/console/login")
    assert login.status_code == 303
    assert login.headers["location"] == "/"
    study = small_study(1)[0].StudyInstanceUID
    url = f"{base}/console/studies/{study}/delete"
    for header in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = httpx.post(url, data={"confirm": study}, headers=header)
        assert response.status_code == 403, header
    own = httpx.post(
        url,
        data={"confirm": study},
        headers={"Origin": base, "Sec-Fetch-Site": "same-origin"},
    )
    assert own.status_code == 404  # let in: nothing stored there


# --------------------------------------------------------------------------
# download and the audit trail


def test_download_errors_and_audit(tmp_path: Path, anonymous: LiveServer) -> None:
    base = anonymous.base_url
    assert httpx.get(f"{base}/console/studies/1.2.3.x/download").status_code == 400
    assert httpx.get(f"{base}/console/studies/{generate_uid()}/download").status_code == 404
    instances = small_study(2, patient_id="ZIP-1")
    assert stow(base, *map(part10_of, instances)).status_code == 200
    study = instances[0].StudyInstanceUID
    response = httpx.get(f"{base}/console/studies/{study}/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert "content-length" not in response.headers  # streamed as it is made
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == sorted(
            f"{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm" for ds in instances
        )
    confirm = httpx.get(f"{base}/console/studies/{study}/delete")
    assert confirm.status_code == 200
    # without the confirm field: back to the confirmation, nothing deleted
    unconfirmed = httpx.post(f"{base}/console/studies/{study}/delete")
    assert unconfirmed.status_code == 303
    assert unconfirmed.headers["location"].endswith(f"/console/studies/{study}/delete")
    deleted = httpx.post(f"{base}/console/studies/{study}/delete", data={"confirm": study})
    assert deleted.status_code == 303
    # an event is written once its answer has been sent: wait for the last
    events: list[dict[str, object]] = []
    for _ in range(50):
        events = [
            e for e in audit_events(tmp_path) if str(e.get("transaction")).startswith("console.")
        ]
        if len(events) == 6:
            break
        time.sleep(0.1)
    assert len(events) == 6, events
    by_transaction = {str(e["transaction"]): e for e in events}
    download = by_transaction["console.download_study"]
    assert download["action"] == "retrieve"
    assert download["studies"] == [study]
    assert download["instances"] == 2
    assert download["outcome"] == 0
    removal = by_transaction["console.delete_study"]
    assert removal["action"] == "delete"
    assert removal["instances"] == 2
    assert by_transaction["console.confirm_delete"]["action"] == "query"
    # the failed download of an unknown study is recorded as such
    failures = [e for e in events if e["transaction"] == "console.download_study" and e["status"]]
    assert any(e["status"] == 404 and e["outcome"] == 4 for e in failures)
    # no patient name in the trail
    assert "Nodes^Test" not in json.dumps(events)


def test_a_bad_cookie_on_the_api_is_401_and_a_huge_token_is_refused(
    token_server: LiveServer,
) -> None:
    cookies = {SESSION_COOKIE: "dap_bad,token"}
    response = httpx.get(f"{token_server.root}/studies", cookies=cookies)
    assert response.status_code == 401
    assert "sign in again" in response.json()["error"]
    huge = httpx.post(f"{token_server.base_url}/console/login", data={"token": "a" * 5000})
    assert huge.status_code == 401
    assert "set-cookie" not in huge.headers
    assert "longer than a browser keeps" in huge.text
