"""``[auth] mode = "oidc"`` against an OpenID provider nobody here wrote:
panva's oidc-provider (tests/oidc_peer), found through its discovery
document, issuing RFC 9068 JWT access tokens by the client credentials
grant; roles from its ``scope`` claim through ``auth.scope_map``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client import DICOMwebClient

from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import small_study
from tests.peers import OidcProvider

pytestmark = [pytest.mark.integration, pytest.mark.interop]


@pytest.fixture
def server(tmp_path: Path, oidc_provider: OidcProvider) -> Iterator[LiveServer]:
    yield from started_server(
        make_config(
            tmp_path,
            APPLIANCE_AUTH_MODE="oidc",
            APPLIANCE_AUTH_ISSUER=oidc_provider.issuer,
            APPLIANCE_AUTH_AUDIENCE=OidcProvider.AUDIENCE,
            APPLIANCE_AUTH_SCOPE_MAP="dicom.read=read,dicom.write=write,dicom.delete=delete",
        )
    )


def session_with(token: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def test_a_script_stores_and_searches_with_its_access_token(
    server: LiveServer, oidc_provider: OidcProvider
) -> None:
    token = oidc_provider.token("dicom-script", "dicom.read dicom.write")
    client = DICOMwebClient(url=server.root, session=session_with(token))
    study = small_study(2, patient_id="OIDC-1")
    assert len(client.store_instances(study).ReferencedSOPSequence) == 2
    found = client.search_for_studies(search_filters={"PatientID": "OIDC-1"})
    assert [s["0020000D"]["Value"][0] for s in found] == [study[0].StudyInstanceUID]
    # it asked for no dicom.delete, so it may not delete
    refused = httpx.delete(
        f"{server.root}/studies/{study[0].StudyInstanceUID}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]


def test_a_viewer_reads_but_cannot_store(server: LiveServer, oidc_provider: OidcProvider) -> None:
    token = oidc_provider.token("dicom-viewer", "dicom.read")
    viewer = DICOMwebClient(url=server.root, session=session_with(token))
    assert viewer.search_for_studies() == []
    with pytest.raises(requests.HTTPError) as caught:
        viewer.store_instances(small_study(1))
    assert caught.value.response.status_code == 403


def test_a_tampered_access_token_is_refused(
    server: LiveServer, oidc_provider: OidcProvider
) -> None:
    token = oidc_provider.token("dicom-viewer", "dicom.read")
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    response = httpx.get(
        f"{server.root}/studies",
        headers={"Authorization": f"Bearer {header}.{payload}.{flipped}"},
        timeout=30,
    )
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
