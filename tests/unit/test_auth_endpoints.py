"""Every endpoint of the DICOMweb app has a permission (so a new view
cannot be left open by accident), an unlisted one is refused even in
anonymous mode, and the role table follows Microsoft's DICOM server
(roles do not imply one another, admin holds every permission)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask, g

from appliance.access import (
    ANONYMOUS,
    PERMISSIONS,
    ROLE_PERMISSIONS,
    Forbidden,
    Principal,
    authorize,
    parse_roles,
)
from appliance.config import load_config
from dicomweb.app import create_app
from dicomweb.auth import ENDPOINT_PERMISSIONS, HEALTH, METRICS, PUBLIC


def app_for(tmp_path: Path, **environ: str) -> Flask:
    env = {
        "APPLIANCE_STORAGE_PATH": str(tmp_path / "blobs"),
        "APPLIANCE_INDEX_URL": f"sqlite:///{tmp_path / 'index.db'}",
        **environ,
    }
    return create_app(load_config(environ=env, cwd=tmp_path))


def test_every_endpoint_has_a_permission(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    missing = sorted(e for e in endpoints if e not in ENDPOINT_PERMISSIONS)
    assert not missing, f"endpoints without a permission in dicomweb/auth.py: {missing}"
    stale = sorted(e for e in ENDPOINT_PERMISSIONS if e not in endpoints)
    assert not stale, f"permissions for endpoints that no longer exist: {stale}"
    allowed = {*PERMISSIONS, HEALTH, METRICS, PUBLIC}
    assert {p for p in ENDPOINT_PERMISSIONS.values()} <= allowed


def test_the_families(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    for rule in app.url_map.iter_rules():
        permission = ENDPOINT_PERMISSIONS[rule.endpoint]
        methods = rule.methods or set()
        if rule.endpoint in ("console.login", "console.logout", "console.static"):
            assert permission == PUBLIC, rule  # signing in, out, the CSS and JS
        elif rule.endpoint.startswith("console."):
            # the console: its pages read, its actions (the download, and
            # the delete's confirmation page) admin
            action = "POST" in methods or rule.endpoint in (
                "console.confirm_delete",
                "console.download_study",
            )
            assert permission == ("admin" if action else "read"), rule
        elif rule.rule.startswith("/v1/admin"):
            assert permission == "admin", rule
        elif rule.rule.startswith(("/v1/extendedquerytags", "/v1/operations")):
            # Microsoft's manageExtendedQueryTags data action: reads as well
            assert permission == "admin", rule
        elif "POST" in methods:
            assert permission == "write", rule  # STOW-RS
        elif "DELETE" in methods:
            assert permission == "delete", rule
        elif rule.rule.startswith("/v1"):
            assert permission == "read", rule  # QIDO, WADO, frames, rendered, feed
        elif rule.rule.startswith("/viewer"):
            assert permission == PUBLIC, rule  # the viewer's static files
        else:
            assert permission in (HEALTH, METRICS), rule


def test_an_unlisted_endpoint_is_refused_even_anonymously(tmp_path: Path) -> None:
    app = app_for(tmp_path)

    @app.get("/v1/forgotten")
    def forgotten() -> str:
        return "PHI"

    response = app.test_client().get("/v1/forgotten")
    assert response.status_code == 403
    assert b"PHI" not in response.data


def test_anonymous_mode_gives_the_anonymous_principal(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    seen: list[Principal] = []

    @app.after_request
    def record(response: object) -> object:
        seen.append(g.principal)
        return response

    assert app.test_client().get("/health/live").status_code == 200
    assert seen[-1] == ANONYMOUS
    assert app.test_client().get("/v1/studies/1.2.3/metadata").status_code in (404, 503)
    assert seen[-1] == ANONYMOUS
    assert seen[-1].roles == {"read", "write", "delete", "admin"}
    assert seen[-1].method == "anonymous"


def test_roles_do_not_imply_each_other_but_admin_holds_all() -> None:
    assert ROLE_PERMISSIONS["admin"] == set(PERMISSIONS)
    for role in ("read", "write", "delete"):
        assert ROLE_PERMISSIONS[role] == {role}
    writer = Principal("token:x", frozenset({"write"}), "token")
    assert writer.may("write")
    assert not writer.may("read")
    with pytest.raises(Forbidden) as caught:
        authorize(writer, "read")
    assert "token:x" in caught.value.reason
    assert "lacks the read permission" in caught.value.reason
    authorize(Principal("root", frozenset({"admin"}), "oidc"), "delete")


def test_parse_roles() -> None:
    assert parse_roles(["write,read", "read"]) == ("read", "write")
    with pytest.raises(ValueError, match="'owner' is not a role"):
        parse_roles(["owner"])
    with pytest.raises(ValueError, match="at least one"):
        parse_roles([])
