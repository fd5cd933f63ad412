"""``dicom-appliance serve`` over HTTPS, with real clients: curl (OpenSSL),
httpx, dicomweb-client on a requests session, Python's ssl module and
openssl s_client; certificates made by the test (:mod:`tests.certs`).

What is shown: the port speaks HTTPS only (plain HTTP gets no answer), TLS
1.1 and a CBC cipher suite are refused, a client that
trusts another CA refuses the server; client certificates when required
(none, or one from another CA: refused; one from the CA: served); the
supervisor's readiness probe and READY=1 over HTTPS, mutual TLS included;
RetrieveURL in https; a renewed certificate served after SIGHUP with no
failed request meanwhile, the DIMSE side untouched; bad files refused at
start, and a bad renewal refused on SIGHUP (the old certificate stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from cryptography import x509
from dicomweb_client import DICOMwebClient

from tests.certs import Authority, Issued, issue_cert, make_ca
from tests.conftest import missing_peer
from tests.helpers import part10_of, small_study
from tests.integration.test_serve import (
    READY_TIMEOUT,
    STOP_TIMEOUT,
    Appliance,
    Site,
    migrated_site,
    run_echo,
)
from tests.integration.test_serve_notify import NotifySocket

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


@dataclasses.dataclass
class Pki:
    """The test's certificates: a CA and the server's certificate from it,
    a client CA and a client certificate from it, and a CA nobody trusts
    with a client certificate of its own."""

    ca: Authority
    server: Issued
    client_ca: Authority
    client: Issued
    stranger_ca: Authority
    stranger: Issued


def make_pki(folder: Path) -> Pki:
    ca = make_ca(folder / "server-ca")
    client_ca = make_ca(folder / "client-ca")
    stranger_ca = make_ca(folder / "stranger-ca")
    return Pki(
        ca=ca,
        server=issue_cert(ca, folder / "server", "server", [HOST, "localhost"]),
        client_ca=client_ca,
        client=issue_cert(client_ca, folder / "client", "viewer", [], client=True),
        stranger_ca=stranger_ca,
        stranger=issue_cert(stranger_ca, folder / "stranger", "stranger", [], client=True),
    )


def tls_site(workdir: Path, pki: Pki, **keys: str) -> Site:
    """A migrated site with HTTPS on (and more ``http.*`` *keys*)."""
    extra = {
        "APPLIANCE_HTTP_TLS_CERT_FILE": str(pki.server.cert_file),
        "APPLIANCE_HTTP_TLS_KEY_FILE": str(pki.server.key_file),
    }
    extra.update({f"APPLIANCE_HTTP_{key.upper()}": value for key, value in keys.items()})
    return migrated_site(workdir, extra)


def url(site: Site, path: str = "") -> str:
    return f"https://{HOST}:{site.http_port}{path}"


def wait_ready_https(
    appliance: Appliance, ca: Authority, cert: Issued | None = None
) -> httpx.Response:
    """Poll ``/health/ready`` over HTTPS until it answers 200."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if appliance.process.poll() is not None:
            pytest.fail(f"serve exited with {appliance.process.returncode}:\n{appliance.log}")
        try:
            response = httpx.get(
                url(appliance.site, "/health/ready"),
                verify=ssl_client(ca, cert),
                timeout=5,
            )
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if response.status_code == 200:
                return response
            last = f"{response.status_code} {response.text}"
        time.sleep(0.3)
    pytest.fail(f"not ready within {READY_TIMEOUT} s (last: {last}):\n{appliance.log}")


def ssl_client(ca: Authority, cert: Issued | None = None) -> ssl.SSLContext:
    """A client context trusting *ca* (only), offering *cert* if given."""
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    if cert is not None:
        context.load_cert_chain(cert.cert_file, cert.key_file)
    return context


@contextlib.contextmanager
def running_tls(site: Site, pki: Pki, cert: Issued | None = None) -> Iterator[Appliance]:
    appliance = site.start()
    try:
        wait_ready_https(appliance, pki.ca, cert)
        yield appliance
    finally:
        appliance.kill()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        missing_peer("curl is not installed")
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def served_serial(site: Site) -> int:
    """The serial number of the certificate the server presents on a new
    connection."""
    pem = ssl.get_server_certificate((HOST, site.http_port), timeout=5)
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def serial_of(files: Issued) -> int:
    return x509.load_pem_x509_certificate(files.cert_file.read_bytes()).serial_number


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_appliance(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Appliance]:
    """One HTTPS appliance (no client certificates) for the read-mostly tests."""
    site = tls_site(tmp_path_factory.mktemp("https"), pki)
    with running_tls(site, pki) as appliance:
        yield appliance


# --------------------------------------------------------------------------
# server authentication and the profile


def test_curl_reads_readiness_and_a_qido_over_https(https_appliance: Appliance, pki: Pki) -> None:
    site = https_appliance.site
    ready = curl("--cacert", str(pki.ca.cert_file), url(site, "/health/ready"))
    qido = curl(
        "--cacert",
        str(pki.ca.cert_file),
        "-w",
        "\n%{http_code} %{ssl_verify_result}",
        url(site, "/v1/studies?limit=5"),
    )

    assert ready.returncode == 0, ready.stderr
    assert '"status": "pass"' in ready.stdout
    assert qido.returncode == 0, qido.stderr
    status, verify = qido.stdout.rsplit("\n", 1)[1].split()
    assert status in ("200", "204")  # an empty index may answer 204
    assert verify == "0"  # curl verified the chain and the name


def test_httpx_and_dicomweb_client_store_and_retrieve_over_https(
    https_appliance: Appliance, pki: Pki
) -> None:
    site = https_appliance.site
    session = requests.Session()
    session.verify = str(pki.ca.cert_file)
    # else REQUESTS_CA_BUNDLE, if set, overrides session.verify (requests#3829)
    session.trust_env = False
    client = DICOMwebClient(url=url(site, "/v1"), session=session)
    instances = small_study(2, patient_id="HTTPS-1")
    study = instances[0].StudyInstanceUID

    result = client.store_instances(instances)
    found = client.search_for_instances(study_instance_uid=study)
    retrieved = client.retrieve_study(study)
    metadata = httpx.get(
        url(site, f"/v1/studies/{study}/metadata"), verify=ssl_client(pki.ca), timeout=10
    )

    # dicomweb-client sends a Host header without the port (docs/conformance.md)
    assert result.RetrieveURL == f"https://{HOST}/v1/studies/{study}"
    assert all(item.RetrieveURL.startswith("https://") for item in result.ReferencedSOPSequence)
    assert len(found) == 2
    assert {ds.SOPInstanceUID for ds in retrieved} == {ds.SOPInstanceUID for ds in instances}
    assert metadata.status_code == 200
    assert len(metadata.json()) == 2


def test_stow_over_https_answers_https_urls(https_appliance: Appliance, pki: Pki) -> None:
    site = https_appliance.site
    (instance,) = small_study(1, patient_id="HTTPS-2")
    boundary = "https-test"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part10_of(instance)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = httpx.post(
        url(site, "/v1/studies"),
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        verify=ssl_client(pki.ca),
        timeout=30,
    )

    assert response.status_code == 200, response.text
    retrieve_url = response.json()["00081190"]["Value"][0]
    assert retrieve_url == url(site, f"/v1/studies/{instance.StudyInstanceUID}")


def test_plain_http_on_the_port_gets_no_answer(https_appliance: Appliance) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{HOST}:{https_appliance.site.http_port}/health/ready", timeout=5)


def test_tls_1_1_and_a_cbc_suite_are_refused(https_appliance: Appliance, pki: Pki) -> None:
    """TLS 1.1; and on TLS 1.2 a CBC (non-AEAD) suite with an ECDSA key, one
    that Python's and gunicorn's default server context would accept."""
    site = https_appliance.site
    old = curl("--cacert", str(pki.ca.cert_file), "--tls-max", "1.1", url(site, "/health/live"))
    cbc = curl(
        "--cacert",
        str(pki.ca.cert_file),
        "--tls-max",
        "1.2",
        "--ciphers",
        "ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256",
        url(site, "/health/live"),
    )
    tls12 = curl(
        "--cacert",
        str(pki.ca.cert_file),
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        url(site, "/health/live"),
    )

    assert old.returncode != 0
    assert "alert protocol version" in old.stderr or "no protocols available" in old.stderr
    assert cbc.returncode != 0, cbc.stdout
    assert "handshake failure" in cbc.stderr, cbc.stderr
    assert tls12.returncode == 0, tls12.stderr


def test_the_negotiated_suites_are_aead_with_forward_secrecy(
    https_appliance: Appliance, pki: Pki
) -> None:
    site = https_appliance.site
    negotiated = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = ssl_client(pki.ca)
        context.minimum_version = context.maximum_version = version
        with (
            socket.create_connection((HOST, site.http_port)) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            negotiated[version] = tls.cipher()

    name12, protocol12, _ = negotiated[ssl.TLSVersion.TLSv1_2]
    name13, protocol13, _ = negotiated[ssl.TLSVersion.TLSv1_3]
    assert protocol12 == "TLSv1.2"
    assert name12.startswith("ECDHE-")
    assert "GCM" in name12 or "CHACHA20" in name12
    assert protocol13 == "TLSv1.3"
    assert name13.startswith("TLS_")


def test_a_client_that_trusts_another_ca_refuses_the_server(
    https_appliance: Appliance, pki: Pki
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(
            url(https_appliance.site, "/health/live"),
            verify=ssl_client(pki.stranger_ca),
            timeout=5,
        )
    refused = curl(
        "--cacert", str(pki.stranger_ca.cert_file), url(https_appliance.site, "/health/live")
    )
    assert refused.returncode == 60, refused.stderr  # curl: peer certificate cannot be verified


# --------------------------------------------------------------------------
# client certificates


def test_required_client_certificates(tmp_path: Path, pki: Pki) -> None:
    """Only a client with a certificate from tls_ca_file gets in; READY=1
    still comes (the supervisor's probe has its own certificate)."""
    site = tls_site(
        tmp_path / "site",
        pki,
        tls_client_certs="required",
        tls_ca_file=str(pki.client_ca.cert_file),
    )
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    site.env["NOTIFY_SOCKET"] = notify.address
    appliance = site.start()
    try:
        ready = notify.wait_for("READY=1", appliance.process, READY_TIMEOUT, appliance.log_path)
        ca = ["--cacert", str(pki.ca.cert_file)]
        live = url(site, "/health/live")
        without = curl(*ca, live)
        stranger = curl(
            *ca, "--cert", str(pki.stranger.cert_file), "--key", str(pki.stranger.key_file), live
        )
        with_cert = curl(
            *ca, "--cert", str(pki.client.cert_file), "--key", str(pki.client.key_file), live
        )
        qido = httpx.get(
            url(site, "/v1/studies"), verify=ssl_client(pki.ca, pki.client), timeout=10
        )
    finally:
        appliance.kill()
        notify.close()

    assert ready.pid == appliance.process.pid
    assert f"STATUS=ready: DICOMweb on https://{HOST}:{site.http_port}" in " ".join(
        ready.assignments
    )
    assert without.returncode != 0, without.stdout
    assert stranger.returncode != 0, stranger.stdout
    assert with_cert.returncode == 0, with_cert.stderr
    assert '"pass"' in with_cert.stdout
    assert qido.status_code in (200, 204)


def test_optional_client_certificates(tmp_path: Path, pki: Pki) -> None:
    """No certificate: served; one from the CA: served; one from another CA:
    refused (a certificate offered is verified)."""
    site = tls_site(
        tmp_path / "site",
        pki,
        tls_client_certs="optional",
        tls_ca_file=str(pki.client_ca.cert_file),
    )
    with running_tls(site, pki):
        live = url(site, "/health/live")
        ca = ["--cacert", str(pki.ca.cert_file)]
        without = curl(*ca, live)
        with_cert = curl(
            *ca, "--cert", str(pki.client.cert_file), "--key", str(pki.client.key_file), live
        )
        stranger = curl(
            *ca, "--cert", str(pki.stranger.cert_file), "--key", str(pki.stranger.key_file), live
        )

    assert without.returncode == 0, without.stderr
    assert with_cert.returncode == 0, with_cert.stderr
    assert stranger.returncode != 0, stranger.stdout


def test_tls_1_3_only(tmp_path: Path, pki: Pki) -> None:
    site = tls_site(tmp_path / "site", pki, tls_min_version="1.3")
    with running_tls(site, pki):
        tls12 = curl(
            "--cacert", str(pki.ca.cert_file), "--tls-max", "1.2", url(site, "/health/live")
        )
        tls13 = curl("--cacert", str(pki.ca.cert_file), "--tlsv1.3", url(site, "/health/live"))

    assert tls12.returncode != 0
    assert tls13.returncode == 0, tls13.stderr


# --------------------------------------------------------------------------
# renewal on SIGHUP


def test_sighup_serves_a_renewed_certificate_without_failing_a_request(
    tmp_path: Path, pki: Pki
) -> None:
    folder = tmp_path / "tls"
    live_files = issue_cert(pki.ca, folder, "live", [HOST])
    site = migrated_site(
        tmp_path / "site",
        {
            "APPLIANCE_HTTP_TLS_CERT_FILE": str(live_files.cert_file),
            "APPLIANCE_HTTP_TLS_KEY_FILE": str(live_files.key_file),
        },
    )
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal answered
        context = ssl_client(pki.ca)
        while not stop.is_set():
            try:
                # a new connection each time: each is a handshake with
                # whichever worker accepts it
                response = httpx.get(url(site, "/health/live"), verify=context, timeout=10)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            else:
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                answered += 1

    with running_tls(site, pki) as appliance:
        old_serial = served_serial(site)
        dimse_pid = appliance.child_pid("dimse-1")
        # renewal as certbot or an operator does it: new files in place
        renewed = issue_cert(pki.ca, tmp_path / "renewed", "live", [HOST])
        loader = threading.Thread(target=load)
        loader.start()
        try:
            time.sleep(0.5)
            shutil.copyfile(renewed.key_file, live_files.key_file)
            shutil.copyfile(renewed.cert_file, live_files.cert_file)
            # before the signal the old certificate is still served
            before_hup = served_serial(site)
            appliance.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            new_serial = served_serial(site)
            while new_serial != serial_of(renewed) and time.monotonic() < deadline:
                time.sleep(0.2)
                new_serial = served_serial(site)
            time.sleep(1.0)  # the loop goes on against the new workers
        finally:
            stop.set()
            loader.join()
        alive = appliance.process.poll() is None
        echo_code, echo_output = run_echo(site.dimse_port)
        log = appliance.log

    assert before_hup == old_serial
    assert new_serial == serial_of(renewed) != old_serial, log
    assert failures == [], failures[:5]
    assert answered > 10
    assert alive, log
    assert echo_code == 0, echo_output
    assert f"started child 'dimse-1' (pid {dimse_pid})" in log
    assert log.count("started child 'dimse-1'") == 1  # the DIMSE worker was not restarted
    assert "SIGHUP: restarting the DICOMweb workers" in log


def test_sighup_with_a_mismatched_key_keeps_the_old_certificate(tmp_path: Path, pki: Pki) -> None:
    folder = tmp_path / "tls"
    live_files = issue_cert(pki.ca, folder, "live", [HOST])
    site = migrated_site(
        tmp_path / "site",
        {
            "APPLIANCE_HTTP_TLS_CERT_FILE": str(live_files.cert_file),
            "APPLIANCE_HTTP_TLS_KEY_FILE": str(live_files.key_file),
        },
    )
    with running_tls(site, pki) as appliance:
        old_serial = served_serial(site)
        renewed = issue_cert(pki.ca, tmp_path / "renewed", "live", [HOST])
        shutil.copyfile(renewed.cert_file, live_files.cert_file)  # the key not (yet) copied
        appliance.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "not reloading" not in appliance.log and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        serial_after = served_serial(site)
        ready = httpx.get(url(site, "/health/ready"), verify=ssl_client(pki.ca), timeout=5)
        log = appliance.log

    assert "configuration key 'http.tls_key_file'" in log
    assert "not reloading, the old certificate stays in use" in log
    assert serial_after == old_serial
    assert ready.status_code == 200


def test_sighup_without_https_keeps_serve_running(tmp_path: Path) -> None:
    """Before HTTPS existed SIGHUP killed the supervisor (Python's default).
    One sent while the children start waits until ready (gunicorn's master
    may not handle it yet)."""
    site = migrated_site(tmp_path / "site")
    appliance = site.start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while "started child 'http'" not in appliance.log and time.monotonic() < deadline:
            time.sleep(0.05)
        appliance.process.send_signal(signal.SIGHUP)  # the children are starting
        appliance.wait_ready()
        while "SIGHUP: restarting" not in appliance.log and time.monotonic() < deadline:
            time.sleep(0.1)
        appliance.process.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        ready = appliance.wait_ready()
        alive = appliance.process.poll() is None
        echo_code, echo_output = run_echo(site.dimse_port)
        appliance.process.send_signal(signal.SIGTERM)
        exit_code = appliance.wait(STOP_TIMEOUT)
    finally:
        appliance.kill()

    assert alive, appliance.log
    assert ready.status_code == 200
    assert echo_code == 0, echo_output
    assert exit_code == 0, appliance.log
    # the early one applied once ready, and the later one
    assert appliance.log.count("SIGHUP: restarting the DICOMweb workers") == 2, appliance.log


# --------------------------------------------------------------------------
# refused at start


def test_serve_refuses_a_missing_certificate_file_naming_the_key(tmp_path: Path, pki: Pki) -> None:
    site = migrated_site(
        tmp_path / "site",
        {
            "APPLIANCE_HTTP_TLS_CERT_FILE": str(tmp_path / "nowhere.crt"),
            "APPLIANCE_HTTP_TLS_KEY_FILE": str(pki.server.key_file),
        },
    )
    result = site.run("serve", timeout=60)

    assert result.returncode == 2
    assert "configuration key 'http.tls_cert_file'" in result.stderr
    assert "nowhere.crt" in result.stderr


def test_serve_refuses_a_key_of_another_certificate(tmp_path: Path, pki: Pki) -> None:
    site = migrated_site(
        tmp_path / "site",
        {
            "APPLIANCE_HTTP_TLS_CERT_FILE": str(pki.server.cert_file),
            "APPLIANCE_HTTP_TLS_KEY_FILE": str(pki.client.key_file),
        },
    )
    result = site.run("serve", timeout=60)

    assert result.returncode == 2
    assert "configuration key 'http.tls_key_file'" in result.stderr
    assert "is not the key of the certificate" in result.stderr
