"""One upstream DICOMweb service: STOW-RS of a batch, DELETE of an
instance, WADO-RS of one instance (to check a duplicate), with its
credentials, over one keep-alive httpx client.

The answer to a STOW-RS is sorted per instance (PS3.18 10.5.3, Table
10.5.3-1 and the Store Instances Response Module, Table I.1-1):

- **delivered**: listed in the Referenced SOP Sequence (0008,1199), or the
  whole request answered 200;
- **duplicate**: the upstream says it holds the instance already (failure
  or warning reason 0x0111, or 0xB00E = 45070, Microsoft's "already
  exists"); the sender checks the content before counting it delivered;
- **transient** (tried again later): the upstream could not be reached or
  timed out; 408, 429 and 5xx answers but 501 and 505 (honouring
  Retry-After); 401 and 403
  (credentials are refreshed, and a fixed token file is picked up without a
  restart); per-instance reasons 0x0110 (processing failure) and 0xA7xx (out
  of resources); an instance the answer does not mention;
- **permanent** (parked with the upstream's reason): every other failure
  reason or 4xx answer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import httpx

from appliance.config import ForwardConfig
from appliance.errors import ApplianceError
from appliance.outbound import (
    AUTH_HTTP,
    PERMANENT_5XX,
    CredentialsError,
    credentials_for,
    http_client,
    retry_after,
    transient_http,
)
from appliance.storage.base import CHUNK_SIZE

log = logging.getLogger(__name__)

#: PS3.18 Table I.1-1 / PS3.3 C.12.1 attribute tags of the STOW-RS answer.
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

#: "The instance is already there": DIMSE's duplicate SOP instance (PS3.7
#: C.4.2.1.4 / 0x0111) and Microsoft's 45070 (0xB00E), which this appliance
#: sends too when it keeps the first copy.
DUPLICATE_REASONS = frozenset({0x0111, 0xB00E})
#: Failure reasons that say the upstream, not the instance, failed.
TRANSIENT_REASONS = frozenset({0x0110})

_BOUNDARY = "dicom-appliance-forward-7f3a9c"
_TEXT_MAX = 300


@dataclasses.dataclass(frozen=True)
class Part:
    """One instance to send: its SOP Instance UID, its size and a way to
    open its Part 10 bytes (called while the request body is sent)."""

    sop_instance_uid: str
    size: int
    open: Callable[[], IO[bytes]]


@dataclasses.dataclass
class Outcome:
    """An upstream answer, sorted per SOP Instance UID."""

    delivered: set[str] = dataclasses.field(default_factory=set)
    duplicate: set[str] = dataclasses.field(default_factory=set)
    transient: dict[str, str] = dataclasses.field(default_factory=dict)
    permanent: dict[str, str] = dataclasses.field(default_factory=dict)
    #: seconds the upstream asked to wait (Retry-After), if it did
    retry_after: float | None = None

    @classmethod
    def all_transient(
        cls, uids: Sequence[str], reason: str, retry_after: float | None = None
    ) -> Outcome:
        return cls(transient=dict.fromkeys(uids, reason), retry_after=retry_after)

    @classmethod
    def all_permanent(cls, uids: Sequence[str], reason: str) -> Outcome:
        return cls(permanent=dict.fromkeys(uids, reason))


class Upstream:
    """The DICOMweb service of one ``[[forward]]`` destination.

    Parameters
    ----------
    config
        The destination.
    transport
        An httpx transport (tests); None for a real connection.
    """

    def __init__(self, config: ForwardConfig, transport: httpx.BaseTransport | None = None):
        self.config = config
        self._client = http_client(
            timeout=config.timeout,
            concurrency=config.concurrency,
            user_agent="dicom-appliance-forward",
            transport=transport,
        )
        self._credentials = credentials_for(config, self._client)

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- STOW-RS

    def store_instances(self, parts: Sequence[Part]) -> Outcome:
        """STOW-RS of *parts* in one multipart/related request (PS3.18
        10.5), its answer sorted per instance."""
        uids = [part.sop_instance_uid for part in parts]
        heads = [
            f"--{_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() for _ in parts
        ]
        closing = f"\r\n--{_BOUNDARY}--\r\n".encode()
        separator = b"\r\n"
        length = sum(map(len, heads)) + sum(part.size for part in parts)
        length += len(separator) * (len(parts) - 1) + len(closing)

        def body() -> Iterator[bytes]:
            for number, (head, part) in enumerate(zip(heads, parts, strict=True)):
                if number:
                    yield separator
                yield head
                sent = 0
                with part.open() as stream:
                    while chunk := stream.read(CHUNK_SIZE):
                        sent += len(chunk)
                        yield chunk
                if sent != part.size:
                    # the length was announced: a short blob would corrupt
                    # the request, so it is abandoned
                    raise OSError(
                        f"instance {part.sop_instance_uid} has {sent} bytes, {part.size} expected"
                    )
            yield closing

        headers = {
            "Content-Type": (f'multipart/related; type="application/dicom"; boundary={_BOUNDARY}'),
            "Content-Length": str(length),
            "Accept": "application/dicom+json",
        }
        try:
            response = self._send("POST", f"{self.config.url}/studies", headers, body())
        except _Unreachable as exc:
            return Outcome.all_transient(uids, exc.reason)
        return sort_stow_answer(response, uids)

    # ----------------------------------------------------------------- DELETE

    def delete_instance(self, study: str, series: str, sop: str) -> Outcome:
        """DELETE of one instance upstream; 404 counts as delivered (it is
        not there), 405 and 501 park it (no DELETE upstream)."""
        url = f"{self.config.url}/studies/{study}/series/{series}/instances/{sop}"
        try:
            response = self._send("DELETE", url, {}, None)
        except _Unreachable as exc:
            return Outcome.all_transient([sop], exc.reason)
        if response.is_success or response.status_code == 404:
            return Outcome(delivered={sop})
        return _http_failure(response, [sop])

    # ---------------------------------------------------------------- WADO-RS

    def retrieve_instance(self, study: str, series: str, sop: str) -> bytes | None:
        """The instance's Part 10 bytes as the upstream stores them (PS3.18
        10.4, ``transfer-syntax=*``), or None if it answers 404.

        Raises
        ------
        UpstreamError
            if it cannot be reached or answers otherwise.
        """
        url = f"{self.config.url}/studies/{study}/series/{series}/instances/{sop}"
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        try:
            response = self._send("GET", url, headers, None)
        except _Unreachable as exc:
            raise UpstreamError(exc.reason) from None
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise UpstreamError(f"retrieving {sop} answered HTTP {response.status_code}")
        return first_part(response)

    # ---------------------------------------------------------------- helpers

    def _send(
        self, method: str, url: str, headers: dict[str, str], content: Iterator[bytes] | None
    ) -> httpx.Response:
        try:
            headers = {**headers, **self._credentials.headers()}
            response = self._client.request(method, url, headers=headers, content=content)
        except httpx.TimeoutException as exc:
            raise _Unreachable(
                f"the upstream did not answer in time ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise _Unreachable(f"cannot reach the upstream ({type(exc).__name__})") from None
        except OSError as exc:  # reading a blob for the body failed
            raise _Unreachable(f"reading a stored instance failed ({exc})") from None
        except ApplianceError as exc:  # the store failed while the body was sent
            raise _Unreachable(f"reading a stored instance failed ({exc.reason})") from None
        except CredentialsError as exc:
            raise _Unreachable(exc.reason) from None
        if response.status_code in AUTH_HTTP:
            self._credentials.refused()
        return response


class UpstreamError(Exception):
    """The upstream could not answer a request."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unreachable(UpstreamError):
    pass


def sort_stow_answer(response: httpx.Response, uids: Sequence[str]) -> Outcome:
    """Sort the STOW-RS answer *response* to a request of *uids*."""
    status = response.status_code
    if transient_http(status) or status in AUTH_HTTP or status in PERMANENT_5XX:
        return _http_failure(response, uids)
    answer = _dicom_json(response)
    if status == 200 and answer is None:
        return Outcome(delivered=set(uids))
    if answer is None:
        return _http_failure(response, uids)
    outcome = Outcome()
    for item in _items(answer, REFERENCED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid is None:
            continue
        warning = _first(item, WARNING_REASON)
        if isinstance(warning, int) and warning in DUPLICATE_REASONS:
            outcome.duplicate.add(str(uid))
        else:
            outcome.delivered.add(str(uid))
    for item in _items(answer, FAILED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid is None:
            continue
        reason = _first(item, FAILURE_REASON)
        code = reason if isinstance(reason, int) else None
        text = f"the upstream refused it: failure reason {_hex(code)}"
        if code in DUPLICATE_REASONS:
            outcome.duplicate.add(str(uid))
        elif code is not None and (code in TRANSIENT_REASONS or code & 0xFF00 == 0xA700):
            outcome.transient[str(uid)] = text
        else:
            outcome.permanent[str(uid)] = text
    for uid in uids:
        if uid in outcome.delivered or uid in outcome.duplicate:
            continue
        if uid in outcome.transient or uid in outcome.permanent:
            continue
        if status == 200:
            outcome.delivered.add(uid)
        else:
            outcome.transient[uid] = f"the upstream's answer (HTTP {status}) does not name it"
    return outcome


def _http_failure(response: httpx.Response, uids: Sequence[str]) -> Outcome:
    status = response.status_code
    reason = f"the upstream answered HTTP {status}"
    text = _snippet(response)
    if text:
        reason += f": {text}"
    if status in AUTH_HTTP:
        return Outcome.all_transient(uids, reason + " (credentials refused)")
    if transient_http(status):
        return Outcome.all_transient(uids, reason, retry_after(response))
    return Outcome.all_permanent(uids, reason)


def _dicom_json(response: httpx.Response) -> dict[str, Any] | None:
    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media not in ("application/dicom+json", "application/json"):
        return None
    try:
        answer = response.json()
    except ValueError:
        return None
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    return answer if isinstance(answer, dict) else None


def _items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = answer.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values or [] if isinstance(item, dict)]


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _hex(code: int | None) -> str:
    return "(none)" if code is None else f"0x{code:04X} ({code})"


def _snippet(response: httpx.Response) -> str:
    try:
        text = response.text
    except (UnicodeDecodeError, httpx.ResponseNotRead):
        return ""
    return " ".join(text.split())[:_TEXT_MAX]


def first_part(response: httpx.Response) -> bytes:
    """The content of the first part of a multipart/related *response*, or
    the whole body if it is not multipart (application/dicom)."""
    content_type = response.headers.get("Content-Type", "")
    boundary = None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    body = response.content
    if boundary is None:
        return body
    delimiter = b"--" + boundary.encode()
    start = body.find(delimiter)
    if start < 0:
        raise UpstreamError("the upstream's multipart answer has no part")
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, head_end)
    if head_end < 0 or end < 0:
        raise UpstreamError("the upstream's multipart answer is cut short")
    return body[head_end + 4 : end]
