"""DICOM TLS (PS3.15 B.9/B.10, the BCP 195 profiles) with ``dicom-appliance
serve`` as a real process and real peers: dcmtk's echoscu, storescu and
storescp with ``+tls``, openssl s_client, and pynetdicom.

The certificates are made here (:mod:`tests.certs`): one CA signing the
appliance's, the modality's and the Move Destination's certificates, and
another CA whose certificates must be refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from appliance.commitment import CommitmentOutbox, ReportState
from appliance.status import Status
from tests.certs import Authority, Issued, issue_cert, make_ca
from tests.conftest import appliance_config, dcmtk, missing_peer, started_appliance
from tests.integration.test_dimse_commitment import (
    SCU_AE,
    ReportSink,
    load,
    n_action,
    request,
    wait_for,
)
from tests.integration.test_dimse_retrieve import wait_listening
from tests.integration.test_dimse_store import ct_dataset, write_part10
from tests.integration.test_serve import (
    AE_TITLE,
    Appliance,
    Site,
    free_port,
    make_site,
    migrated_site,
    running,
)

pytestmark = pytest.mark.integration


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Authority
    appliance: Issued
    modality: Issued
    dest: Issued
    other_ca: Authority
    stranger: Issued
    stranger_dest: Issued


@dataclasses.dataclass
class Tls:
    """A running appliance with a TLS listener, and what the tests need."""

    appliance: Appliance
    pki: Pki
    tls_port: int
    dest_port: int
    folder: Path

    @property
    def site(self) -> Site:
        return self.appliance.site


def make_pki(folder: Path) -> Pki:
    ca = make_ca(folder, "Hospital CA")
    other = make_ca(folder, "Other CA")
    return Pki(
        ca=ca,
        appliance=issue_cert(ca, folder, "appliance"),
        modality=issue_cert(ca, folder, "modality", hosts=(), server=False),
        dest=issue_cert(ca, folder, "dest"),
        other_ca=other,
        stranger=issue_cert(other, folder, "stranger", hosts=(), server=False),
        stranger_dest=issue_cert(other, folder, "stranger-dest"),
    )


def tls_environment(pki: Pki, tls_port: int, peers: str) -> dict[str, str]:
    return {
        "APPLIANCE_DIMSE_TLS_PORT": str(tls_port),
        "APPLIANCE_DIMSE_TLS_CERT_FILE": str(pki.appliance.cert_file),
        "APPLIANCE_DIMSE_TLS_KEY_FILE": str(pki.appliance.key_file),
        "APPLIANCE_DIMSE_TLS_CA_FILE": str(pki.ca.cert_file),
        "APPLIANCE_DIMSE_PEERS": peers,
        "APPLIANCE_DIMSE_WORKERS": "2",
    }


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    folder = tmp_path_factory.mktemp("tls")
    pki = make_pki(folder / "pki")
    tls_port, dest_port = free_port(), free_port()
    peers = (
        f'[{{ae_title="DEST", host="127.0.0.1", port={dest_port}, tls=true}},'
        ' {ae_title="TLSPEER", host="127.0.0.1", port=104, tls=true},'
        ' {ae_title="NAMED", host="127.0.0.1", port=104, tls=true, tls_names=["modality"]},'
        ' {ae_title="MOVER", host="127.0.0.1", port=104}]'
    )
    site = migrated_site(folder / "site", tls_environment(pki, tls_port, peers))
    with running(site) as appliance:
        yield Tls(appliance, pki, tls_port, dest_port, folder)


def run(args: list[str], timeout: float = 60) -> tuple[int, str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    return done.returncode, done.stdout + done.stderr


def tls_options(identity: Issued | None, ca: Authority, profile: str = "+py") -> list[str]:
    """dcmtk's TLS options: our key and certificate (anonymous TLS without),
    the CA that signs the other side's, the security profile."""
    mine = ["+tls", str(identity.key_file), str(identity.cert_file)] if identity else ["+tla"]
    return [*mine, "+cf", str(ca.cert_file), profile]


def echoscu(port: int, *options: str, aet: str = "MODALITY") -> tuple[int, str]:
    return run(
        [dcmtk("echoscu"), "-v", "-aet", aet, "-aec", AE_TITLE, *options, "127.0.0.1", str(port)]
    )


def openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        missing_peer("openssl is not installed")
    return str(found)


def s_client(tls: Tls, *options: str) -> tuple[int, str]:
    modality = tls.pki.modality
    return run(
        [
            openssl(),
            "s_client",
            "-connect",
            f"127.0.0.1:{tls.tls_port}",
            "-cert",
            str(modality.cert_file),
            "-key",
            str(modality.key_file),
            "-CAfile",
            str(tls.pki.ca.cert_file),
            *options,
        ],
        timeout=30,
    )


def log_has(appliance: Appliance, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in appliance.log:
            return True
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------
# the listener


def test_ready_counts_the_tls_listener_and_serve_logs_both(tls: Tls) -> None:
    body = tls.appliance.wait_ready().json()
    assert body["checks"]["dimse_tls"] == [{"status": "pass"}]
    log = tls.appliance.log
    assert f"listening for DICOM associations as '{AE_TITLE}' on 127.0.0.1:" in log
    assert (
        f"listening for DICOM TLS associations as '{AE_TITLE}' on 127.0.0.1:{tls.tls_port} "
        "(client certificate required)"
    ) in log
    # the supervisor's "ready" line: written once its own probe passed, which
    # may be just after the test's did
    deadline = time.monotonic() + 10
    while f"127.0.0.1:{tls.tls_port} (TLS)" not in log and time.monotonic() < deadline:
        time.sleep(0.1)
        log = tls.appliance.log
    assert f"127.0.0.1:{tls.tls_port} (TLS)" in log


@pytest.mark.parametrize("profile", ["+py", "+px"])
def test_dcmtk_echo_and_store_over_tls_then_qido_finds_it(
    tls: Tls, tmp_path: Path, profile: str
) -> None:
    """echoscu and storescu with TLS (dcmtk's Non-downgrading BCP 195
    profile, +py, and the BCP 195 one, +px); the stored instance is found by
    QIDO-RS."""
    options = tls_options(tls.pki.modality, tls.pki.ca, profile)
    code, out = echoscu(tls.tls_port, *options)
    assert code == 0, out
    study = generate_uid()
    file = write_part10(ct_dataset(study_uid=study), tmp_path / "ct.dcm")
    code, out = run(
        [
            dcmtk("storescu"),
            "-v",
            "-aet",
            "MODALITY",
            "-aec",
            AE_TITLE,
            *options,
            "127.0.0.1",
            str(tls.tls_port),
            str(file),
        ]
    )
    assert code == 0, out
    assert "Received Store Response (Success)" in out, out
    found = httpx.get(
        f"{tls.appliance.base_url}/v1/studies",
        params={"StudyInstanceUID": study},
        headers={"Accept": "application/dicom+json"},
        timeout=10,
    )
    assert found.status_code == 200, found.text
    assert found.json()[0]["0020000D"]["Value"] == [study]
    assert log_has(tls.appliance, "association accepted: calling AE 'MODALITY'")
    assert "over TLS" in tls.appliance.log


def test_plain_tcp_to_the_tls_port_fails(tls: Tls) -> None:
    code, out = echoscu(tls.tls_port)
    assert code != 0, out
    assert log_has(tls.appliance, "handshake failed (WRONG_VERSION_NUMBER)")
    # the listener goes on serving
    assert echoscu(tls.tls_port, *tls_options(tls.pki.modality, tls.pki.ca))[0] == 0


def test_silent_connections_do_not_block_the_tls_listener(tls: Tls) -> None:
    """Connections that never start the handshake (more than there are
    workers) hold only their own threads: the handshake runs there, with a
    time limit, not in the thread that accepts (pynetdicom's own server
    would block every later client of that worker)."""
    silent = [socket.create_connection(("127.0.0.1", tls.tls_port)) for _ in range(6)]
    try:
        started = time.monotonic()
        code, out = echoscu(tls.tls_port, *tls_options(tls.pki.modality, tls.pki.ca))
        assert code == 0, out
        assert time.monotonic() - started < 10
    finally:
        for sock in silent:
            sock.close()


def test_client_without_a_certificate_is_refused(tls: Tls) -> None:
    code, out = echoscu(tls.tls_port, *tls_options(None, tls.pki.ca))
    assert code != 0, out
    assert log_has(tls.appliance, "handshake failed (PEER_DID_NOT_RETURN_A_CERTIFICATE)")


def test_client_certificate_from_another_ca_is_refused(tls: Tls) -> None:
    code, out = echoscu(tls.tls_port, *tls_options(tls.pki.stranger, tls.pki.ca))
    assert code != 0, out
    assert log_has(tls.appliance, "handshake failed (CERTIFICATE_VERIFY_FAILED)")


def test_tls_1_1_and_weak_suites_are_refused_tls_1_2_gets_a_bcp195_suite(tls: Tls) -> None:
    """openssl s_client: TLS 1.1 (allowed on the client's side with security
    level 0) gets a protocol_version alert; TLS 1.2 with a static-RSA CBC
    suite gets handshake_failure; plain TLS 1.2 negotiates ECDHE with
    AES-GCM."""
    code, out = s_client(tls, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert code != 0, out
    assert "alert protocol version" in out, out
    code, out = s_client(tls, "-tls1_2", "-cipher", "AES128-SHA")
    assert code != 0, out
    assert "handshake failure" in out, out
    code, out = s_client(tls, "-tls1_2")
    assert code == 0, out
    assert "Protocol  : TLSv1.2" in out, out
    assert "Cipher    : ECDHE-RSA-AES128-GCM-SHA256" in out, out
    assert "Verify return code: 0 (ok)" in out, out


def test_pynetdicom_as_tls_scu(tls: Tls) -> None:
    """pynetdicom over TLS (verifying the appliance's certificate and its
    name, 127.0.0.1): C-ECHO and C-FIND."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.pki.ca.cert_file)
    context.load_cert_chain(tls.pki.modality.cert_file, tls.pki.modality.key_file)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(
        "127.0.0.1", tls.tls_port, ae_title=AE_TITLE, tls_args=(context, "127.0.0.1")
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == Status.SUCCESS
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        statuses = [
            status.Status
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        ]
        assert statuses[-1] == Status.SUCCESS
    finally:
        assoc.release()


def test_a_tls_peer_may_not_use_the_plain_port(tls: Tls) -> None:
    """TLSPEER has tls = true: on the plain port its association is rejected
    (reason 3); over TLS it is accepted."""
    code, out = echoscu(tls.site.dimse_port, aet="TLSPEER")
    assert code != 0
    assert "Calling AE Title Not Recognized" in out, out
    assert log_has(tls.appliance, "a tls = true peer must use the DICOM TLS port")
    options = tls_options(tls.pki.modality, tls.pki.ca)
    assert echoscu(tls.tls_port, *options, aet="TLSPEER")[0] == 0


def test_a_peer_bound_to_its_certificate_name(tls: Tls) -> None:
    """NAMED has tls_names = ["modality"]: the modality's certificate (CN
    modality) may call as NAMED; another certificate of the same CA (CN
    dest) is rejected (reason 3), though it may call as TLSPEER."""
    code, out = echoscu(tls.tls_port, *tls_options(tls.pki.modality, tls.pki.ca), aet="NAMED")
    assert code == 0, out
    other = tls_options(tls.pki.dest, tls.pki.ca)
    code, out = echoscu(tls.tls_port, *other, aet="NAMED")
    assert code != 0
    assert "Calling AE Title Not Recognized" in out, out
    assert log_has(tls.appliance, "names none of tls_names")
    assert echoscu(tls.tls_port, *other, aet="TLSPEER")[0] == 0


# --------------------------------------------------------------------------
# outgoing TLS: C-MOVE to a tls = true destination


@contextlib.contextmanager
def storescp_tls(port: int, out: Path, identity: Issued, ca: Authority) -> Iterator[Path]:
    """dcmtk's storescp as a TLS-only Move Destination on *port*, requiring
    a client certificate from *ca*."""
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("storescp"), "-aet", "DEST", "-od", str(out)]
    args += ["+tls", str(identity.key_file), str(identity.cert_file), "+cf", str(ca.cert_file)]
    log_path = out.parent / f"storescp-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*args, str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port)
        yield out
    finally:
        proc.terminate()
        proc.wait(10)


def stored(tls: Tls, tmp_path: Path) -> str:
    """Store one instance over TLS; its Study Instance UID."""
    study = generate_uid()
    file = write_part10(ct_dataset(study_uid=study), tmp_path / f"{study}.dcm")
    code, out = run(
        [
            dcmtk("storescu"),
            "-aet",
            "MODALITY",
            "-aec",
            AE_TITLE,
            *tls_options(tls.pki.modality, tls.pki.ca),
            "127.0.0.1",
            str(tls.tls_port),
            str(file),
        ]
    )
    assert code == 0, out
    return study


def movescu(tls: Tls, study: str) -> str:
    return run(
        [
            dcmtk("movescu"),
            "-v",
            "-S",
            "-aet",
            "MOVER",
            "-aec",
            AE_TITLE,
            "-aem",
            "DEST",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(tls.site.dimse_port),
        ]
    )[1]


def test_c_move_to_a_tls_destination_is_delivered_over_tls(tls: Tls, tmp_path: Path) -> None:
    """DEST (tls = true) is dcmtk's storescp listening with TLS only and
    requiring a client certificate of the hospital CA: the C-MOVE's
    sub-association uses TLS, presents the appliance's certificate, and
    the instance arrives."""
    study = stored(tls, tmp_path)
    with storescp_tls(tls.dest_port, tmp_path / "out", tls.pki.dest, tls.pki.ca) as out:
        log = movescu(tls, study)
        assert "Received Final Move Response (Success)" in log, log
        assert len(list(out.iterdir())) == 1


def test_c_move_to_a_destination_with_an_untrusted_certificate_fails(
    tls: Tls, tmp_path: Path
) -> None:
    """The destination's certificate is from another CA: the appliance does
    not send (its verification fails), the C-MOVE fails with 0xA801."""
    study = stored(tls, tmp_path)
    identity, ca = tls.pki.stranger_dest, tls.pki.ca
    with storescp_tls(tls.dest_port, tmp_path / "out", identity, ca) as out:
        log = movescu(tls, study)
        assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in log, log
        assert log_has(tls.appliance, "the association to 127.0.0.1")
        assert not list(out.iterdir())


# --------------------------------------------------------------------------
# start-up checks and tls_only


def test_a_key_that_does_not_match_the_certificate_stops_serve(tmp_path: Path) -> None:
    """Checked when the configuration is loaded: serve (and every other
    command) stops with exit code 2 naming the key."""
    pki = make_pki(tmp_path / "pki")
    env = tls_environment(pki, free_port(), "[]")
    env["APPLIANCE_DIMSE_TLS_KEY_FILE"] = str(pki.modality.key_file)
    site = make_site(tmp_path / "site", env)
    appliance = site.start()
    try:
        assert appliance.wait() == 2
    finally:
        appliance.kill()
    assert "dimse.tls_key_file" in appliance.log
    assert "does not match the certificate" in appliance.log


def test_tls_only_opens_no_plain_port(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    env = tls_environment(pki, tls_port, "[]")
    env["APPLIANCE_DIMSE_TLS_ONLY"] = "true"
    env["APPLIANCE_DIMSE_WORKERS"] = "1"
    site = migrated_site(tmp_path / "site", env)
    with running(site) as appliance:
        assert appliance.wait_ready().json()["checks"]["dimse_tls"] == [{"status": "pass"}]
        code, out = echoscu(site.dimse_port)
        assert code != 0
        assert "Connection refused" in out or "connect" in out.lower(), out
        assert echoscu(tls_port, *tls_options(pki.modality, pki.ca))[0] == 0


# --------------------------------------------------------------------------
# outgoing TLS: a Storage Commitment report on a new association


class TlsReportSink(ReportSink):
    """Also keeps the certificate the appliance presented on each report's
    association (read while it is open)."""

    def __init__(self) -> None:
        super().__init__()
        self.certificates: list[dict[str, Any]] = []

    def handle(self, event: Any) -> tuple[int, None]:
        sock = event.assoc.dul.socket.socket
        assert isinstance(sock, ssl.SSLSocket)
        self.certificates.append(sock.getpeercert())
        return super().handle(event)


def test_a_commitment_report_goes_to_a_tls_peer_over_tls(tmp_path: Path) -> None:
    """A tls = true requester (pynetdicom, on both sides of TLS) asks for
    Storage Commitment over the TLS listener of an appliance run in this
    process (its own TLS socket), releases, and gets the N-EVENT-REPORT on
    a new association: TLS, the appliance's client certificate presented
    and verified by the peer."""
    pki = make_pki(tmp_path / "pki")
    tls_port, peer_port = free_port(), free_port()
    env = tls_environment(
        pki, tls_port, f'[{{ae_title="{SCU_AE}", host="127.0.0.1", port={peer_port}, tls=true}}]'
    )
    env["APPLIANCE_DIMSE_COMMITMENT_ON_SAME_ASSOCIATION"] = "false"
    peer_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    peer_context.load_cert_chain(pki.dest.cert_file, pki.dest.key_file)
    peer_context.load_verify_locations(cafile=pki.ca.cert_file)
    peer_context.verify_mode = ssl.CERT_REQUIRED
    sink = TlsReportSink()
    peer = AE(ae_title=SCU_AE)
    peer.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = peer.start_server(
        ("127.0.0.1", peer_port),
        block=False,
        evt_handlers=sink.handlers(),
        ssl_context=peer_context,
    )
    try:
        for app in started_appliance(appliance_config(tmp_path / "app", **env)):
            ct = load(app, "CT_small.dcm")
            uid = generate_uid()
            client = ssl.create_default_context(cafile=pki.ca.cert_file)
            client.load_cert_chain(pki.modality.cert_file, pki.modality.key_file)
            scu = AE(ae_title=SCU_AE)
            scu.add_requested_context(StorageCommitmentPushModel)
            assoc = scu.associate(
                "127.0.0.1", tls_port, ae_title=app.ae_title, tls_args=(client, "127.0.0.1")
            )
            assert assoc.is_established
            assert n_action(assoc, request(uid, [ct])).Status == Status.SUCCESS
            assoc.release()
            got = sink.get()
            wait_for(CommitmentOutbox(app.services.engine), uid, state=ReportState.DELIVERED)
    finally:
        server.shutdown()
    assert (got.event_type, got.transaction_uid, got.committed) == (1, uid, [ct])
    [certificate] = sink.certificates
    subject = dict(item[0] for item in certificate["subject"])
    assert subject["commonName"] == "appliance"
