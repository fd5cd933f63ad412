"""The FHIR R4 server of ``[fhir]``: search, conditional create and
version-checked update (FHIR R4 RESTful API, http.html), over one
keep-alive httpx client with the section's credentials.

Failures are sorted the way forwarding sorts them (:mod:`appliance.outbound`):

- **transient** (tried again later): the server could not be reached or
  timed out; 408, 429 and 5xx answers but 501 and 505 (honouring
  Retry-After); 401 and 403 (credentials are fetched again);
- **conflict**: 409 or 412, another writer changed the resource since it
  was read (the publisher reads again and retries at once);
- **permanent** (the study is parked with the server's reason): every
  other 4xx, e.g. 400 or 422 for a resource the server does not accept.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from appliance.config import FhirConfig
from appliance.outbound import (
    AUTH_HTTP,
    CredentialsError,
    credentials_for,
    http_client,
    retry_after,
    transient_http,
)

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
#: Matches asked for in one search: one is expected, two tell it is ambiguous.
_SEARCH_COUNT = 2
_TEXT_MAX = 300


class FhirError(Exception):
    """A request to the FHIR server failed."""

    def __init__(self, reason: str, *, transient: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after


class FhirConflict(FhirError):
    """409/412: the resource changed since it was read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=True)


class FhirClient:
    """The FHIR server of *config* (``config.url`` is its base URL)."""

    def __init__(self, config: FhirConfig, transport: httpx.BaseTransport | None = None):
        self.config = config
        self._client = http_client(
            timeout=config.timeout,
            concurrency=config.concurrency,
            user_agent="dicom-appliance-dicomcast",
            transport=transport,
            headers={"Accept": FHIR_JSON},
        )
        self._credentials = credentials_for(config, self._client)

    def close(self) -> None:
        self._client.close()

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """The *resource_type* resources the search *params* match (at
        most two: enough to tell one from several)."""
        response = self._send("GET", resource_type, params={**params, "_count": str(_SEARCH_COUNT)})
        bundle = self._json(response, f"searching {resource_type}")
        if bundle.get("resourceType") != "Bundle":
            raise FhirError(f"searching {resource_type} gave no Bundle", transient=False)
        found = []
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            mode = (entry.get("search") or {}).get("mode", "match")
            if (
                isinstance(resource, dict)
                and resource.get("resourceType") == resource_type
                and mode == "match"
            ):
                found.append(resource)
        return found

    def create(self, resource: dict[str, Any], if_none_exist: str) -> tuple[bool, dict[str, Any]]:
        """Conditional create (``If-None-Exist``): (True, the new resource),
        or (False, the one that matched) if the server had one already."""
        resource_type = resource["resourceType"]
        response = self._send(
            "POST", resource_type, body=resource, headers={"If-None-Exist": if_none_exist}
        )
        created = response.status_code == 201
        return created, self._json(response, f"creating a {resource_type}", resource)

    def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Update *resource* (``PUT [type]/[id]``), only if it is still the
        version read (``If-Match``, when the server gave a version)."""
        resource_type = resource["resourceType"]
        headers = {}
        version = (resource.get("meta") or {}).get("versionId")
        if version:
            headers["If-Match"] = f'W/"{version}"'
        response = self._send(
            "PUT", f"{resource_type}/{resource['id']}", body=resource, headers=headers
        )
        return self._json(response, f"updating {resource_type}/{resource['id']}", resource)

    # ---------------------------------------------------------------- helpers

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        headers = dict(headers or {})
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        try:
            headers.update(self._credentials.headers())
            response = self._client.request(
                method, f"{self.config.url}/{path}", params=params, content=content, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise FhirError(
                f"the FHIR server did not answer in time ({type(exc).__name__})", transient=True
            ) from None
        except httpx.TransportError as exc:
            raise FhirError(
                f"cannot reach the FHIR server ({type(exc).__name__})", transient=True
            ) from None
        except CredentialsError as exc:
            raise FhirError(exc.reason, transient=True) from None
        if response.is_success:
            return response
        status = response.status_code
        reason = f"the FHIR server answered HTTP {status} to {method} {path.split('/')[0]}"
        detail = _outcome_text(response)
        if detail:
            reason += f": {detail}"
        if status in AUTH_HTTP:
            self._credentials.refused()
            raise FhirError(reason + " (credentials refused)", transient=True)
        if status in (409, 412):
            raise FhirConflict(reason)
        if transient_http(status):
            raise FhirError(reason, transient=True, retry_after=retry_after(response))
        raise FhirError(reason, transient=False)

    def _json(
        self, response: httpx.Response, what: str, fallback: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if not response.content and fallback is not None:
            # "Prefer: return=minimal" servers answer with no body
            return fallback
        try:
            answer = response.json()
        except ValueError:
            raise FhirError(f"{what}: the answer is not JSON", transient=True) from None
        if not isinstance(answer, dict):
            raise FhirError(f"{what}: the answer is not a resource", transient=True)
        return answer


def _outcome_text(response: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome answer, or the start of the
    body, on one line."""
    try:
        answer = response.json()
    except ValueError:
        try:
            return " ".join(response.text.split())[:_TEXT_MAX]
        except UnicodeDecodeError:
            return ""
    texts = []
    if isinstance(answer, dict) and answer.get("resourceType") == "OperationOutcome":
        for issue in answer.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            where = ", ".join(issue.get("expression") or [])
            if text:
                texts.append(f"{text} ({where})" if where else str(text))
    return "; ".join(texts)[:_TEXT_MAX]
