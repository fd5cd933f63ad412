"""Configuration: one TOML file plus ``APPLIANCE_<SECTION>_<KEY>`` overrides,
validated once at start into one frozen object.

Unknown keys, unknown ``APPLIANCE_`` variables and bad values raise
:class:`~appliance.errors.ConfigError` naming the key.  Nothing is silently
repaired.  Relative paths are resolved against the working directory at load
time, so child processes that inherit the object see absolute paths.

``index.url`` is parsed with SQLAlchemy, imported only when a URL is checked
(it costs a process about 25 MB): the supervisor and gunicorn's master, which
never open the index, load the configuration without checking it (``serve``
checked the same configuration before it started them).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from appliance.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("config/appliance.toml")
ENV_PREFIX = "APPLIANCE_"

Validator = Callable[[Any], str | None]  # returns a problem, or None if fine


def _field(default: Any, *, check: Validator | None = None, secret: bool = False) -> Any:
    meta = {"check": check, "secret": secret}
    if isinstance(default, list | tuple):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port from 1 to 65535"


def _positive(value: int) -> str | None:
    return None if value >= 1 else "must be 1 or more"


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _ae_title(value: str) -> str | None:
    # PS3.5 6.2 (AE VR): up to 16 characters of the default repertoire, no
    # backslash, no control characters; leading/trailing spaces insignificant
    # and an all-space value is not allowed.
    if not value.strip():
        return "must not be empty"
    if len(value) > 16:
        return "must be at most 16 characters (PS3.5 6.2, VR AE)"
    if any(c == "\\" or not (0x20 <= ord(c) < 0x7F) for c in value):
        return "may hold only printable ASCII characters and no backslash (VR AE)"
    return None


def _host(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if re.fullmatch(r"[A-Za-z0-9._:-]+", value) is None:
        return "must be an IP address or a host name"
    return None


def _one_of(*choices: str) -> Validator:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _index_url(value: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        return "is not a database URL (e.g. sqlite:///./data/index.db)"
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        return "must be a sqlite:// or postgresql+psycopg:// URL"
    if url.get_backend_name() == "sqlite" and not url.database:
        return "must name a SQLite file (in-memory databases cannot be shared)"
    return None


def _retries(value: int) -> str | None:
    return None if 0 <= value <= 10 else "must be between 0 and 10"


def _origins(value: tuple[str, ...]) -> str | None:
    for origin in value:
        if origin != "*" and re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin) is None:
            return f"{origin!r} is not an origin such as https://viewer.example:8443 or *"
    return None


#: An http(s) URL without credentials, query or trailing slash.
_HTTP_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/]*[^/])?")


def _http_url(value: str) -> str | None:
    if _HTTP_URL.fullmatch(value) is None:
        return "must be an http(s) URL without a trailing slash or query"
    return None


def _public_url(value: str) -> str | None:
    if value and _HTTP_URL.fullmatch(value) is None:
        return "must be empty or an http(s) URL without a trailing slash or query"
    return None


def _between(low: int, high: int) -> Validator:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be from {low} to {high}"

    return check


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    host: str = _field("127.0.0.1", check=_host)
    port: int = _field(8080, check=_port)
    workers: int = _field(2, check=_positive)
    #: threads per worker process: requests each process serves at once
    threads: int = _field(8, check=_between(1, 256))
    #: seconds a client gets to send a request's line and headers (slowloris)
    header_timeout: int = _field(20, check=_between(1, 3600))
    #: seconds a request's body or response may stall (no byte moving)
    idle_timeout: int = _field(60, check=_between(1, 3600))
    #: browser origins allowed to call the API from another origin (CORS); "*" for any
    cors_allowed_origins: tuple[str, ...] = _field((), check=_origins)
    #: the largest request body accepted (STOW-RS); larger ones get 413
    max_request_mb: int = _field(4096, check=_positive)
    #: the most parts of one multipart request (STOW-RS); more get 413
    max_parts: int = _field(10000, check=_positive)
    #: the URL clients reach this server by (e.g. behind a reverse proxy), used
    #: in RetrieveURL and BulkDataURI; "" = as each request addressed it
    public_url: str = _field("", check=_public_url)
    #: HTTPS (README "HTTPS"): the server's certificate (PEM, the chain after
    #: it) and its private key (PEM, unencrypted); both set = HTTPS only on
    #: port, neither = plain HTTP.  Read at start and again on SIGHUP.
    tls_cert_file: str = _field("")
    tls_key_file: str = _field("")
    #: the lowest TLS version accepted (BCP 195, RFC 9325 3.1.1: 1.2 or 1.3)
    tls_min_version: Literal["1.2", "1.3"] = _field("1.2", check=_one_of("1.2", "1.3"))
    #: client certificates (mutual TLS): none | optional (verified when one is
    #: offered) | required; verified against the CA certificates in tls_ca_file
    tls_client_certs: Literal["none", "optional", "required"] = _field(
        "none", check=_one_of("none", "optional", "required")
    )
    tls_ca_file: str = _field("")

    @property
    def tls(self) -> bool:
        """Whether the DICOMweb port speaks HTTPS."""
        return bool(self.tls_cert_file)

    @property
    def scheme(self) -> str:
        """``https`` or ``http``."""
        return "https" if self.tls else "http"


#: The DIMSE services a peer may be allowed (``[[dimse.peers]] services``):
#: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET, Storage Commitment (N-ACTION).
DIMSE_SERVICES = ("echo", "store", "find", "move", "get", "commitment")


def _services(value: tuple[str, ...]) -> str | None:
    for item in value:
        if item not in DIMSE_SERVICES:
            return f"{item!r} is not one of {', '.join(DIMSE_SERVICES)}"
    return None


def _networks(value: tuple[str, ...]) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an IP address or a CIDR network (e.g. 10.0.0.0/8)"
    return None


def _optional_port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be 0 (off) or a TCP port from 1 to 65535"


@dataclasses.dataclass(frozen=True)
class PeerConfig:
    ae_title: str = _field("", check=_ae_title)
    host: str = _field("", check=_host)
    port: int = _field(104, check=_port)
    #: Storage Commitment from this peer: report an instance committed only
    #: once it is delivered to this [[forward]] destination ("" = once
    #: stored here)
    commit_after_forward: str = _field("")
    #: the DIMSE services this peer may use when it calls us (others are
    #: answered 0x0124 "Refused: Not Authorized")
    services: tuple[str, ...] = _field(DIMSE_SERVICES, check=_services)
    #: IP addresses or CIDR networks this peer may call from; empty = its
    #: host's addresses, checked only with dimse.check_peer_address
    addresses: tuple[str, ...] = _field((), check=_networks)
    #: DICOM TLS both ways: associations we open to it use TLS, and it may
    #: call only on the TLS listener
    tls: bool = _field(False)
    #: with tls: the names (subject CN, DNS or IP subject alternative names)
    #: one of which its client certificate must carry; empty = any
    #: certificate from dimse.tls_ca_file
    tls_names: tuple[str, ...] = _field(())
    #: with partitions.enabled: the data partition this peer's associations
    #: use, whatever AE title it calls ("" = the one its Called AE Title
    #: selects, see partitions.ae_titles)
    partition: str = _field("", check=lambda v: _partition_name(v) if v else None)


def _uid_list(value: tuple[str, ...]) -> str | None:
    for uid in value:
        if re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", uid) is None or len(uid) > 64:
            return f"{uid!r} is not a UID"
    return None


def _workers(value: int) -> str | None:
    return None if 1 <= value <= 32 else "must be from 1 to 32"


def _pdu(value: int) -> str | None:
    # PS3.8 D.1: 0 means unlimited; pynetdicom needs a positive length
    return None if 4096 <= value <= 2**32 - 1 else "must be from 4096 to 4294967295 bytes"


@dataclasses.dataclass(frozen=True)
class DimseConfig:
    ae_title: str = _field("DICOM_EDGE", check=_ae_title)
    host: str = _field("127.0.0.1", check=_host)
    port: int = _field(11112, check=_port)
    #: listener processes sharing the port (one per core uses every core:
    #: each process runs Python code one thread at a time)
    workers: int = _field(2, check=_workers)
    require_known_peers: bool = _field(False)
    peers: tuple[PeerConfig, ...] = _field(())
    #: reject an association whose Called AE Title is not ae_title (reason 7)
    require_called_ae_title: bool = _field(True)
    #: a peer without addresses must also call from its host's address(es)
    check_peer_address: bool = _field(False)
    #: associations each worker serves at once; more are rejected (transient,
    #: reason 2)
    max_associations: int = _field(16, check=_positive)
    #: largest P-DATA-TF PDU we receive (PS3.8 D.1 Maximum Length)
    max_pdu: int = _field(262144, check=_pdu)
    #: seconds to wait for association messages, DIMSE messages, and network data
    acse_timeout: int = _field(30, check=_positive)
    dimse_timeout: int = _field(60, check=_positive)
    network_timeout: int = _field(120, check=_positive)
    #: transfer syntaxes accepted for storage; empty = every one listed in
    #: docs/conformance.md (uncompressed, deflated, JPEG family, JPEG-LS,
    #: JPEG 2000, RLE, HTJ2K, MPEG/H.264/H.265 video)
    storage_transfer_syntaxes: tuple[str, ...] = _field((), check=_uid_list)
    #: Storage Commitment tied to forwarding (a peer's commit_after_forward):
    #: seconds to wait for the upstream's confirmation before the instances
    #: not yet delivered are reported failed (0x0110)
    commitment_forward_wait: int = _field(43200, check=_positive)
    #: Storage Commitment: send the N-EVENT-REPORT on the requesting
    #: association if it is still open (true), or always on a new one (false)
    commitment_on_same_association: bool = _field(True)
    #: callers whose AE title is not in peers (require_known_peers = false):
    #: the services they may use
    unknown_peer_services: tuple[str, ...] = _field(DIMSE_SERVICES, check=_services)
    #: DICOM TLS listener (PS3.15 B.9/B.10, BCP 195) on host: 0 = none
    #: (2762 is IANA's dicom-tls port)
    tls_port: int = _field(0, check=_optional_port)
    #: with tls_port: do not open the plain TCP port
    tls_only: bool = _field(False)
    #: PEM files: our certificate (chain) and its private key, for the TLS
    #: listener and as client certificate on associations we open with TLS
    tls_cert_file: str = _field("")
    tls_key_file: str = _field("")
    #: PEM file of the CAs that sign the peers' certificates (client
    #: certificates on the listener; servers of tls = true peers)
    tls_ca_file: str = _field("")
    #: the TLS listener accepts only clients with a certificate from tls_ca_file
    tls_require_client_cert: bool = _field(True)


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    backend: Literal["filesystem", "azure", "s3"] = _field(
        "filesystem", check=_one_of("filesystem", "azure", "s3")
    )
    path: Path = _field(Path("./data/blobs"))
    #: filesystem: below this much free space (MB) on the folder's disk new
    #: instances are refused (C-STORE 0xA700, STOW-RS 503) rather than the
    #: disk filled; 0 = never
    min_free_mb: int = _field(256, check=_non_negative)
    # azure: connection_string, or account_url with credential (a SAS token
    # or the account key)
    connection_string: str = _field("", secret=True)
    container: str = _field("")
    account_url: str = _field("")
    credential: str = _field("", secret=True)
    #: create the container (or bucket) if it is missing
    create_container: bool = _field(True)
    #: cloud backends: tries after the first of a request that failed
    #: transiently (unreachable, timeout, throttled, 5xx), with backoff
    retries: int = _field(3, check=_retries)
    # s3
    endpoint_url: str = _field("")
    bucket: str = _field("")
    region: str = _field("")
    access_key_id: str = _field("")
    secret_access_key: str = _field("", secret=True)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    url: str = _field("sqlite:///./data/index.db", check=_index_url, secret=True)
    #: migrate the database on ``serve`` instead of refusing to start
    auto_migrate: bool = _field(False)
    #: PostgreSQL: connections each process keeps open, the extra ones it may
    #: open under load (closed when returned), and the seconds a request waits
    #: for a free one before it fails as "index unavailable" (SQLite: unused)
    pool_size: int = _field(5, check=_positive)
    max_overflow: int = _field(10, check=_non_negative)
    pool_timeout: int = _field(30, check=_positive)


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    #: what to do when a SOP Instance UID is stored again (docs/conformance.md)
    duplicate_policy: Literal["keep", "replace", "reject"] = _field(
        "keep", check=_one_of("keep", "replace", "reject")
    )


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    """What may be deleted here to keep room (README "Retention"): never an
    instance still waiting to be forwarded; deletions are local (not
    forwarded upstream)."""

    #: delete the studies nothing was stored in for this many days (0: keep)
    max_age_days: int = _field(0, check=_non_negative)
    #: filesystem: while the storage disk has less free space than this (MB),
    #: delete the studies stored in longest ago (0: never)
    free_target_mb: int = _field(0, check=_non_negative)
    #: minutes between two runs (in serve's worker process)
    interval_minutes: int = _field(60, check=_positive)


@dataclasses.dataclass(frozen=True)
class QueryConfig:
    #: the most matches one query (QIDO-RS or C-FIND) returns
    max_results: int = _field(1000, check=_positive)


#: The areas of ``log.levels`` and the loggers each names.
LOG_AREAS: dict[str, tuple[str, ...]] = {
    "http": ("dicomweb", "gunicorn.error", "gunicorn.access"),
    "dimse": ("dimse_bridge",),
    "ingest": ("appliance.ingest",),
    "query": ("appliance.query",),
    "retrieve": ("appliance.retrieve",),
    "index": ("appliance.index",),
    "storage": ("appliance.storage",),
    "forward": ("appliance.forward",),
    "fhir": ("appliance.fhir",),
    "commitment": ("appliance.commitment", "dimse_bridge.services.commitment"),
    "server": ("appliance.server",),
}


def _log_levels(value: tuple[str, ...]) -> str | None:
    for item in value:
        area, sep, level = item.partition("=")
        if not sep or level.strip() not in ("debug", "info", "warning", "error"):
            return f"{item!r} is not AREA=LEVEL (LEVEL: debug, info, warning or error)"
        area = area.strip()
        if (
            area not in LOG_AREAS
            and re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", area) is None
        ):
            return f"{area!r} is neither an area ({', '.join(LOG_AREAS)}) nor a logger name"
    return None


@dataclasses.dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = _field(
        "info", check=_one_of("debug", "info", "warning", "error")
    )
    #: json: one JSON object per line; text: readable lines; auto: text on a
    #: terminal, JSON otherwise (journald, a container's log, a file)
    format: Literal["auto", "text", "json"] = _field("auto", check=_one_of("auto", "text", "json"))
    #: levels per area, "AREA=LEVEL" (areas: README "Logs"; or a logger name)
    levels: tuple[str, ...] = _field((), check=_log_levels)


#: A name of ours (a [[forward]] destination, a data partition): 1 to 64
#: ASCII letters, digits, '.', '_' or '-'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _forward_name(value: str) -> str | None:
    if NAME_PATTERN.fullmatch(value) is None:
        return "must be 1 to 64 letters, digits, '.', '_' or '-'"
    return None


def _ae_titles(value: tuple[str, ...]) -> str | None:
    for title in value:
        problem = _ae_title(title)
        if problem:
            return f"{title!r} {problem}"
    return None


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """One upstream DICOMweb destination (``[[forward]]``): what is sent
    there, how, and with which credentials (README "Forwarding")."""

    name: str = _field("", check=_forward_name)
    #: the upstream's DICOMweb service root (STOW-RS goes to {url}/studies)
    url: str = _field("", check=_http_url)
    #: none | bearer (token_file) | basic (username, password) |
    #: oauth2 (client credentials: token_url, client_id, client_secret, scope)
    auth: Literal["none", "bearer", "basic", "oauth2"] = _field(
        "none", check=_one_of("none", "bearer", "basic", "oauth2")
    )
    #: bearer: a file holding the token, read again whenever it changes
    token_file: str = _field("")
    username: str = _field("")
    password: str = _field("", secret=True)
    token_url: str = _field("", check=_public_url)
    client_id: str = _field("")
    client_secret: str = _field("", secret=True)
    scope: str = _field("")
    #: filters (empty: any): the sender's Calling AE Title (C-STORE only;
    #: STOW-RS has none), the series' Modality, the SOP Class UID
    calling_ae_titles: tuple[str, ...] = _field((), check=_ae_titles)
    modalities: tuple[str, ...] = _field(())
    sop_classes: tuple[str, ...] = _field((), check=_uid_list)
    #: re-encode Implicit VR Little Endian as Explicit VR Little Endian
    #: before sending (e.g. Azure's DICOM service accepts only explicit VR)
    explicit_vr_only: bool = _field(False)
    #: forward deletions (DELETE of the instance upstream)
    forward_deletes: bool = _field(True)
    #: instances per STOW-RS request, and requests in flight at once
    batch_size: int = _field(20, check=_between(1, 500))
    concurrency: int = _field(2, check=_between(1, 16))
    #: seconds for one request, and the longest wait between two tries
    timeout: int = _field(60, check=_positive)
    retry_max_seconds: int = _field(300, check=_positive)


def _uri(value: str) -> str | None:
    # FHIR's uri type (R4 datatypes.html#uri): no whitespace
    if value and re.search(r"\s", value):
        return "must be a URI (no spaces), e.g. urn:oid:1.2.36.146.595.217.0.1"
    return None


def _timezone(value: str) -> str | None:
    if not value:
        return None
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return "must be empty (the machine's time zone) or an IANA time zone such as Europe/Berlin"
    return None


@dataclasses.dataclass(frozen=True)
class FhirConfig:
    """DICOMcast: the FHIR R4 server the studies are published to
    (``[fhir]``, README "DICOMcast to FHIR")."""

    #: the FHIR server's base URL (e.g. https://fhir.example/R4); "" = off
    url: str = _field("", check=_public_url)
    #: none | bearer (token_file) | basic (username, password) |
    #: oauth2 (client credentials: token_url, client_id, client_secret, scope)
    auth: Literal["none", "bearer", "basic", "oauth2"] = _field(
        "none", check=_one_of("none", "bearer", "basic", "oauth2")
    )
    token_file: str = _field("")
    username: str = _field("")
    password: str = _field("", secret=True)
    token_url: str = _field("", check=_public_url)
    client_id: str = _field("")
    client_secret: str = _field("", secret=True)
    scope: str = _field("")
    #: Patient.identifier.system of the PatientID ("" = an identifier with no system)
    patient_system: str = _field("", check=_uri)
    #: Endpoint.address: this appliance's DICOMweb service root as the FHIR
    #: server's users reach it ("" = http.public_url + "/v1", else
    #: http://HOST:PORT/v1 of [http])
    dicomweb_url: str = _field("", check=_public_url)
    #: time zone of StudyDate/StudyTime when the study has no Timezone
    #: Offset From UTC ("" = the machine's)
    timezone: str = _field("", check=_timezone)
    #: ImagingStudy.status once every instance of the study is deleted here
    deleted_status: Literal["entered-in-error", "cancelled", "unknown"] = _field(
        "entered-in-error", check=_one_of("entered-in-error", "cancelled", "unknown")
    )
    #: seconds a changed study waits before it is published, so a study that
    #: is still arriving is sent once every settle_seconds, not per instance
    settle_seconds: int = _field(5, check=_non_negative)
    #: studies claimed at once by a sender, and senders
    batch_size: int = _field(10, check=_between(1, 500))
    concurrency: int = _field(2, check=_between(1, 16))
    #: seconds for one request, and the longest wait between two tries
    timeout: int = _field(30, check=_positive)
    retry_max_seconds: int = _field(300, check=_positive)


#: The roles a token may carry (SPEC ``token create --role``); what each
#: permits is :data:`appliance.access.ROLE_PERMISSIONS`.
AUTH_ROLES = ("read", "write", "delete", "admin")

#: JWT signature algorithms that take a public key from a JWKS.  "none" and
#: the HMAC family (HS256...) are never accepted: with a JWKS a shared secret
#: would be a published key (RFC 8725 3.1, 3.2).
JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


def is_loopback_host(host: str) -> bool:
    """Whether *host* is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _oidc_url(value: str) -> str | None:
    """Empty, or https (http only to a loopback host: a test or a local
    identity provider; a JWKS fetched in the clear could be swapped)."""
    if not value:
        return None
    # an issuer may end in "/" (its "iss" claim is compared as written)
    if _HTTP_URL.fullmatch(value.rstrip("/")) is None:
        return "must be an https URL without a query"
    if value.startswith("http://"):
        host = re.sub(r":\d+$", "", value[len("http://") :].split("/", 1)[0])
        if not is_loopback_host(host):
            return "must be https (http is allowed only to a loopback address)"
    return None


def _algorithms(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must name at least one algorithm"
    for name in value:
        if name not in JWT_ALGORITHMS:
            return (
                f"{name!r} is not allowed; use asymmetric ones ({', '.join(JWT_ALGORITHMS)}): "
                '"none" and HS* are refused with a JWKS'
            )
    return None


def _role_map(value: tuple[str, ...]) -> str | None:
    for item in value:
        claim, sep, role = item.rpartition("=")
        if not sep or not claim.strip() or role.strip() not in AUTH_ROLES:
            return f"{item!r} is not CLAIM_VALUE=ROLE (ROLE: {', '.join(AUTH_ROLES)})"
    return None


def _claim_path(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*", value) is None:
        return "must be a claim name or a dotted path such as realm_access.roles"
    return None


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Who may use the DICOMweb API (README "Security", docs/security.md)."""

    #: anonymous (everyone may do everything; only with a loopback http.host)
    #: | token (API tokens from ``dicom-appliance token create``) | oidc
    #: (JWTs from ``issuer``, and API tokens too)
    mode: Literal["anonymous", "token", "oidc"] = _field(
        "anonymous", check=_one_of("anonymous", "token", "oidc")
    )
    #: /health/live and /health/ready answer without a token (load balancers,
    #: systemd and Docker probe them); false: they need the read role
    health_anonymous: bool = _field(True)
    #: /metrics answers without a token (no PHI in it); false: it needs the
    #: read role
    metrics_anonymous: bool = _field(True)
    #: seconds a verified API token is trusted without asking the index
    #: again: a revocation takes effect within this time
    token_cache_seconds: int = _field(30, check=_between(0, 300))
    #: oidc: the issuer (its "iss" claim), and the audience tokens must name
    issuer: str = _field("", check=_oidc_url)
    audience: str = _field("")
    #: oidc: where the signing keys are; "" = the jwks_uri of
    #: {issuer}/.well-known/openid-configuration
    jwks_url: str = _field("", check=_oidc_url)
    algorithms: tuple[str, ...] = _field(("RS256", "ES256"), check=_algorithms)
    #: oidc: leeway for exp, nbf and iat against clock drift
    clock_skew_seconds: int = _field(60, check=_between(0, 600))
    #: oidc: the claim holding the caller's roles or groups (a dotted path
    #: reaches into objects, e.g. Keycloak's realm_access.roles)
    roles_claim: str = _field("roles", check=_claim_path)
    #: oidc: "CLAIM_VALUE=ROLE" per mapping; empty = claim values that are a
    #: role's name (read, write, delete, admin) are taken as they are
    role_map: tuple[str, ...] = _field((), check=_role_map)
    #: oidc: "SCOPE=ROLE" per mapping of an OAuth2 scope ("scope"/"scp" claim)
    scope_map: tuple[str, ...] = _field((), check=_role_map)
    #: oidc: the claim naming the caller in logs and the audit trail
    name_claim: str = _field("sub", check=_claim_path)


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """The audit trail (``[audit]``, README "Audit trail"): one JSON line per
    access to patient data, in files of their own (:mod:`appliance.audit`)."""

    #: record audit events (false: none are written)
    enabled: bool = _field(True)
    #: the folder of the daily files (audit-YYYY-MM-DD.jsonl, UTC days);
    #: created with mode 0700, files with 0600
    path: Path = _field(Path("./data/audit"))
    #: days a daily file is kept after its day; older ones are deleted
    #: (0: never)
    retention_days: int = _field(365, check=_non_negative)
    #: fsync each event (true) or leave it to the kernel (false: a power
    #: loss, not a process crash, may lose the last seconds of events)
    fsync: bool = _field(False)
    #: also write the values of query keys (QIDO-RS parameters, C-FIND
    #: identifiers), which may be patient names or IDs; false: their names only
    record_query_values: bool = _field(False)


def _partition_name(value: str) -> str | None:
    if NAME_PATTERN.fullmatch(value) is None:
        return f"{value!r} is not a partition name (1 to 64 of A-Z a-z 0-9 . _ -)"
    return None


def _partition_map(value: tuple[str, ...]) -> str | None:
    seen: set[str] = set()
    for item in value:
        title, sep, name = item.partition("=")
        problem = _ae_title(title) if sep else "is not CALLED_AE_TITLE=PARTITION"
        problem = problem or _partition_name(name)
        if problem:
            return f"{item!r}: {problem}"
        if title.strip() in seen:
            return f"the AE title {title.strip()!r} is listed twice"
        seen.add(title.strip())
    return None


@dataclasses.dataclass(frozen=True)
class PartitionsConfig:
    """Data partitions (``[partitions]``, README "Data partitions",
    :mod:`appliance.partitions`)."""

    #: every DICOMweb data path then has a partition segment
    #: (``/v1/partitions/{name}/studies...``); off, everything is in the
    #: default partition, Microsoft.Default
    enabled: bool = _field(False)
    #: the DIMSE side: "CALLED_AE_TITLE=PARTITION" pairs; the listener also
    #: answers to these titles, and an association's Called AE Title selects
    #: its partition (dimse.ae_title, unless listed: Microsoft.Default)
    ae_titles: tuple[str, ...] = _field((), check=_partition_map)

    def partition_of(self, called_ae_title: str) -> str | None:
        """The partition the Called AE Title selects, None if none does."""
        wanted = called_ae_title.strip()
        for item in self.ae_titles:
            title, _, name = item.partition("=")
            if title.strip() == wanted:
                return name
        return None


@dataclasses.dataclass(frozen=True)
class ViewerConfig:
    """The OHIF viewer served at ``/viewer`` (``[viewer]``, README "Viewer"):
    a published build that ``dicom-appliance viewer install`` puts in
    ``folder`` (:mod:`appliance.viewer`)."""

    #: the folder of the installed build; "" = no viewer (``/viewer`` is 404)
    folder: str = _field("./data/viewer")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole effective configuration; built by :func:`load_config`."""

    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
    dimse: DimseConfig = dataclasses.field(default_factory=DimseConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    query: QueryConfig = dataclasses.field(default_factory=QueryConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    #: upstream DICOMweb destinations (``[[forward]]``, an array of tables)
    forward: tuple[ForwardConfig, ...] = ()
    #: DICOMcast to a FHIR server
    fhir: FhirConfig = dataclasses.field(default_factory=FhirConfig)
    #: who may use the DICOMweb API
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    #: the audit trail
    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)
    #: the web viewer served at /viewer
    viewer: ViewerConfig = dataclasses.field(default_factory=ViewerConfig)
    #: data partitions
    partitions: PartitionsConfig = dataclasses.field(default_factory=PartitionsConfig)
    #: the file it was read from, if any (not a key)
    source: Path | None = dataclasses.field(default=None, compare=False)


SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}

#: The top-level arrays of tables (``[[forward]]``); in the environment the
#: whole array is one variable, ``APPLIANCE_FORWARD``, a TOML inline array.
LIST_SECTIONS = frozenset({"forward"})


# --------------------------------------------------------------------------
# loading


#: The keys :func:`load_config` leaves unchecked with ``index_url=False``.
_INDEX_URL = "index.url"


def load_config(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    *,
    index_url: bool = True,
) -> Config:
    """Read the TOML file (or the default one if present), apply the
    ``APPLIANCE_*`` variables of *environ*, validate, and freeze.

    With *index_url* False, ``index.url`` is kept as written, neither
    checked nor made absolute, and SQLAlchemy is not imported: for a process
    that never opens the index itself, whose configuration was checked
    whole before (:func:`resolve_index_url` finishes it).

    Raises
    ------
    ConfigError
        naming the first unknown key or bad value.
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    data: dict[str, Any] = {}
    source: Path | None = None
    if path is None and (cwd / DEFAULT_CONFIG_FILE).is_file():
        path = cwd / DEFAULT_CONFIG_FILE
    if path is not None:
        source = Path(path) if Path(path).is_absolute() else cwd / path
        try:
            with source.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"file {source} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{source} is not valid TOML: {exc}") from None
    _apply_environment(data, environ)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(name, "unknown section")
        if name in LIST_SECTIONS:
            sections[name] = _coerce(SECTIONS[name], value, name)
            continue
        if not isinstance(value, dict):
            raise ConfigError(name, "must be a table")
        sections[name] = _build(
            SECTIONS[name],
            value,
            name,
            unchecked=frozenset() if index_url else frozenset({_INDEX_URL}),
        )
    config = Config(**sections, source=source)
    if config.dimse.require_known_peers and not config.dimse.peers:
        raise ConfigError(
            "dimse.peers",
            "dimse.require_known_peers is true but no peer is listed, so no one could associate",
        )
    _check_storage(config.storage)
    _check_http_tls(config.http)
    _check_forward(config.forward)
    _check_auth(config.fhir, "fhir")
    _check_access(config)
    _check_partitions(config)
    names = {destination.name for destination in config.forward}
    for i, peer in enumerate(config.dimse.peers):
        if peer.commit_after_forward and peer.commit_after_forward not in names:
            raise ConfigError(
                f"dimse.peers[{i}].commit_after_forward",
                f"names no [[forward]] destination ({', '.join(sorted(names)) or 'none'})",
            )
    config = _resolve_folders(config, cwd)
    config = _resolve_tls_files(config, cwd)
    _check_dimse_tls(config.dimse)
    config = _resolve_tls_paths(config, cwd)
    return resolve_index_url(config, cwd) if index_url else config


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :]
        if rest.lower() in LIST_SECTIONS:
            data[rest.lower()] = _parse_env_value(var, environ[var], SECTIONS[rest.lower()])
            continue
        section, _, key = rest.partition("_")
        section, key = section.lower(), key.lower()
        cls = SECTIONS.get(section) if section not in LIST_SECTIONS else None
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if cls is None or key not in hints:
            raise ConfigError(var, "environment variable names no known configuration key")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table")
        table[key] = _parse_env_value(var, environ[var], hints[key])


def _parse_env_value(var: str, raw: str, hint: Any) -> Any:
    """Turn a variable's text into the TOML-typed value its key expects."""
    if hint is bool:
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(var, f"must be true or false, not {raw!r}")
    if hint is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(var, f"must be a whole number, not {raw!r}") from None
    if get_origin(hint) is tuple and get_args(hint)[0] is str:
        # a list of strings: comma-separated
        return [item.strip() for item in raw.split(",") if item.strip()]
    if get_origin(hint) is tuple:
        # a list of tables, written as a TOML inline array
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(var, "must be a TOML inline array of tables") from None
    return raw


def _build(
    cls: type[Any], table: Mapping[str, Any], where: str, unchecked: frozenset[str] = frozenset()
) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{where}.{key}"
        if key not in hints:
            raise ConfigError(name, "unknown key")
        values[key] = _coerce(hints[key], value, name)
    obj = cls(**values)
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if f"{where}.{f.name}" in unchecked:
            check = None
        problem = check(getattr(obj, f.name)) if check else None
        if problem:
            raise ConfigError(f"{where}.{f.name}", problem)
    return obj


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, "must be a whole number")
        return value
    if hint is str or origin is Literal:
        if not isinstance(value, str):
            raise ConfigError(name, "must be a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(name, "must be a non-empty path string")
        return Path(value)
    if origin is tuple and get_args(hint)[0] is str:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, "must be an array of strings")
        return tuple(value)
    if origin is tuple:
        item_cls = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(name, "must be an array of tables")
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{name}[{i}]", "must be a table")
            items.append(_build(item_cls, item, f"{name}[{i}]"))
        return tuple(items)
    raise TypeError(f"{name}: no coercion for {hint!r}")  # a programming error


def _check_storage(storage: StorageConfig) -> None:
    """The keys the configured backend needs."""
    if storage.backend == "azure":
        if not storage.container:
            raise ConfigError("storage.container", "is required with storage.backend = azure")
        if not storage.connection_string and not storage.account_url:
            raise ConfigError(
                "storage.connection_string",
                "storage.backend = azure needs a connection_string or an account_url",
            )
        if storage.connection_string and storage.account_url:
            raise ConfigError(
                "storage.account_url", "give a connection_string or an account_url, not both"
            )
    if storage.backend == "s3":
        if not storage.bucket:
            raise ConfigError("storage.bucket", "is required with storage.backend = s3")
        if bool(storage.access_key_id) != bool(storage.secret_access_key):
            raise ConfigError(
                "storage.secret_access_key",
                "give both access_key_id and secret_access_key, or neither (boto3's own chain)",
            )


def _check_http_tls(http: HttpConfig) -> None:
    """The HTTPS keys that go together (the files themselves are checked when
    ``serve`` starts: :func:`appliance.https.check_files`)."""
    if bool(http.tls_cert_file) != bool(http.tls_key_file):
        missing = "http.tls_key_file" if http.tls_cert_file else "http.tls_cert_file"
        raise ConfigError(missing, "give both tls_cert_file and tls_key_file, or neither")
    if http.tls_client_certs != "none" and not http.tls_ca_file:
        raise ConfigError(
            "http.tls_ca_file",
            f"is required with tls_client_certs = {http.tls_client_certs} "
            "(the CA certificates client certificates are verified against)",
        )
    if http.tls_ca_file and http.tls_client_certs == "none":
        raise ConfigError(
            "http.tls_ca_file", "is used only with tls_client_certs = optional or required"
        )
    if http.tls_client_certs != "none" and not http.tls_cert_file:
        raise ConfigError("http.tls_client_certs", "needs HTTPS (tls_cert_file and tls_key_file)")


def _resolve_tls_paths(config: Config, cwd: Path) -> Config:
    """The HTTPS files made absolute against *cwd* (children start elsewhere)."""
    http = config.http
    paths: dict[str, Any] = {}
    for key in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
        value = getattr(http, key)
        if value and not Path(value).is_absolute():
            paths[key] = str((cwd / value).resolve())
    if not paths:
        return config
    return dataclasses.replace(config, http=dataclasses.replace(http, **paths))


#: The keys each auth mode of [[forward]] and [fhir] needs.
_AUTH_NEEDS = {
    "bearer": ("token_file",),
    "basic": ("username", "password"),
    "oauth2": ("token_url", "client_id", "client_secret"),
}


def _check_auth(settings: Any, where: str) -> None:
    for key in _AUTH_NEEDS.get(settings.auth, ()):
        if not getattr(settings, key):
            raise ConfigError(f"{where}.{key}", f"is required with auth = {settings.auth}")


def _check_access(config: Config) -> None:
    """``[auth]``: anonymous only on loopback; what oidc needs."""
    auth = config.auth
    if auth.mode == "anonymous" and not is_loopback_host(config.http.host):
        raise ConfigError(
            "auth.mode",
            f"anonymous is allowed only when http.host is a loopback address "
            f"(127.0.0.0/8, ::1, localhost), and http.host is {config.http.host!r}: "
            'set auth.mode = "token" or "oidc"',
        )
    if auth.mode == "oidc":
        if not auth.issuer:
            raise ConfigError("auth.issuer", "is required with auth.mode = oidc")
        if not auth.audience.strip():
            raise ConfigError("auth.audience", "is required with auth.mode = oidc")


def _check_partitions(config: Config) -> None:
    """Partition settings only with ``partitions.enabled``."""
    if config.partitions.enabled:
        return
    if config.partitions.ae_titles:
        raise ConfigError("partitions.ae_titles", "needs partitions.enabled = true")
    for i, peer in enumerate(config.dimse.peers):
        if peer.partition:
            raise ConfigError(f"dimse.peers[{i}].partition", "needs partitions.enabled = true")


def _check_forward(destinations: tuple[ForwardConfig, ...]) -> None:
    """Names unique, and the keys each auth mode needs."""
    seen: set[str] = set()
    for i, destination in enumerate(destinations):
        if destination.name in seen:
            raise ConfigError(f"forward[{i}].name", f"{destination.name!r} is used twice")
        seen.add(destination.name)
        _check_auth(destination, f"forward[{i}]")


#: The [dimse] keys naming files, made absolute at load.
_TLS_FILES = ("tls_cert_file", "tls_key_file", "tls_ca_file")


def _resolve_tls_files(config: Config, cwd: Path) -> Config:
    dimse = config.dimse
    for key in _TLS_FILES:
        value = getattr(dimse, key)
        if value and not Path(value).is_absolute():
            dimse = dataclasses.replace(dimse, **{key: str((cwd / value).resolve())})  # type: ignore[arg-type]
    return dataclasses.replace(config, dimse=dimse)


def _check_dimse_tls(dimse: DimseConfig) -> None:
    """The DICOM TLS keys fit together.  The files themselves are loaded
    when ``serve`` starts (:func:`appliance.dicom_tls.check_files`), as the
    HTTPS ones are: a command that never opens a TLS socket does not need to
    read the private key."""
    outgoing = any(peer.tls for peer in dimse.peers)
    for i, peer in enumerate(dimse.peers):
        if peer.tls_names and not peer.tls:
            raise ConfigError(f"dimse.peers[{i}].tls_names", "needs tls = true for this peer")
    if dimse.tls_only and not dimse.tls_port:
        raise ConfigError("dimse.tls_only", "needs dimse.tls_port (the TLS listener)")
    if dimse.tls_port and dimse.tls_port == dimse.port and not dimse.tls_only:
        raise ConfigError("dimse.tls_port", "must differ from dimse.port (or set tls_only)")
    if not (dimse.tls_port or outgoing):
        return
    for key in ("tls_cert_file", "tls_key_file"):
        if not getattr(dimse, key):
            need = "dimse.tls_port" if dimse.tls_port else "a peer with tls = true"
            raise ConfigError(f"dimse.{key}", f"is required with {need}")
    if outgoing and not dimse.tls_ca_file:
        raise ConfigError(
            "dimse.tls_ca_file", "is required with a tls = true peer (to verify its certificate)"
        )
    if dimse.tls_port and dimse.tls_require_client_cert and not dimse.tls_ca_file:
        raise ConfigError(
            "dimse.tls_ca_file",
            "is required with dimse.tls_require_client_cert (to verify client certificates)",
        )


def _resolve_folders(config: Config, cwd: Path) -> Config:
    storage_path = config.storage.path
    if not storage_path.is_absolute():
        storage_path = (cwd / storage_path).resolve()
    storage = dataclasses.replace(config.storage, path=storage_path)
    audit_path = config.audit.path
    if not audit_path.is_absolute():
        audit_path = (cwd / audit_path).resolve()
    audit = dataclasses.replace(config.audit, path=audit_path)
    viewer = config.viewer
    if viewer.folder and not Path(viewer.folder).is_absolute():
        viewer = dataclasses.replace(viewer, folder=str((cwd / viewer.folder).resolve()))
    return dataclasses.replace(config, storage=storage, audit=audit, viewer=viewer)


def resolve_index_url(config: Config, cwd: Path | None = None) -> Config:
    """*config* with ``index.url`` checked and a relative SQLite file made
    absolute against *cwd* (the working directory by default); what
    :func:`load_config` does unless told not to.

    Raises
    ------
    ConfigError
        if the URL is not one the index can use.
    """
    from sqlalchemy.engine import make_url

    problem = _index_url(config.index.url)
    if problem:
        raise ConfigError(_INDEX_URL, problem)
    cwd = Path.cwd() if cwd is None else cwd
    url = make_url(config.index.url)
    if url.get_backend_name() == "sqlite" and url.database:
        db = Path(url.database)
        if not db.is_absolute():
            url = url.set(database=str((cwd / db).resolve()))
    index = dataclasses.replace(config.index, url=url.render_as_string(hide_password=False))
    return dataclasses.replace(config, index=index)


# --------------------------------------------------------------------------
# showing

MASK = "********"


def render_config(config: Config) -> str:
    """The effective configuration as TOML, with secrets masked."""
    lines: list[str] = []
    if config.source is not None:
        lines.append(f"# read from {config.source}")
    for section in SECTIONS:
        if section in LIST_SECTIONS:
            for item in getattr(config, section):
                lines.append(f"[[{section}]]")
                lines.extend(_render_fields(item))
                lines.append("")
            continue
        obj = getattr(config, section)
        lines.append(f"[{section}]")
        nested: list[tuple[str, tuple[Any, ...]]] = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if typing.get_type_hints(type(obj))[f.name] == tuple[str, ...]:
                lines.append(f"{f.name} = [{', '.join(_toml_value(v) for v in value)}]")
                continue
            if isinstance(value, tuple):
                nested.append((f.name, value))
                continue
            if f.metadata.get("secret") and value:
                value = _mask(f.name, value)
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
        for name, items in nested:
            for item in items:
                lines.append(f"[[{section}.{name}]]")
                lines.extend(_render_fields(item))
                lines.append("")
    return "\n".join(lines)


def _render_fields(obj: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            lines.append(f"{f.name} = [{', '.join(_toml_value(v) for v in value)}]")
            continue
        if f.metadata.get("secret") and value:
            value = _mask(f.name, value)
        lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def _mask(name: str, value: str) -> str:
    if name == "url":
        from sqlalchemy.engine import make_url

        # a database URL is shown with only its password hidden (as "***")
        return make_url(value).render_as_string(hide_password=True)
    return MASK


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if ord(c) >= 0x20 else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'
