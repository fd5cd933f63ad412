"""The HTTPS files as ``serve`` checks them at start and on SIGHUP
(:func:`appliance.https.check_files`), the server's TLS profile, and
gunicorn's TLS settings; certificates from :mod:`tests.certs`."""

from __future__ import annotations

import dataclasses
import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import https
from appliance.config import HttpConfig, load_config
from appliance.errors import ConfigError
from appliance.server import gunicorn_settings
from tests.certs import Issued, issue_cert, make_ca


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Issued:
    folder = tmp_path_factory.mktemp("pki")
    return issue_cert(make_ca(folder), folder, "server", ["127.0.0.1", "localhost"])


def http_config(files: Issued, **keys: str) -> HttpConfig:
    return HttpConfig(tls_cert_file=str(files.cert_file), tls_key_file=str(files.key_file), **keys)


def not_after(files: Issued) -> datetime.datetime:
    return x509.load_pem_x509_certificate(files.cert_file.read_bytes()).not_valid_after_utc


def test_good_files_pass_without_a_warning(server: Issued) -> None:
    assert https.check_files(http_config(server)) == []
    assert https.check_files(HttpConfig()) == []  # no HTTPS: nothing to check


def test_a_missing_or_unreadable_file_is_refused_naming_its_key(
    server: Issued, tmp_path: Path
) -> None:
    missing = dataclasses.replace(http_config(server), tls_cert_file=str(tmp_path / "none.crt"))
    with pytest.raises(ConfigError) as raised:
        https.check_files(missing)
    assert raised.value.key == "http.tls_cert_file"
    assert "none.crt" in raised.value.reason

    folder = tmp_path / "folder.key_file"
    folder.mkdir()  # a folder cannot be read as a file (also when run as root)
    unreadable = dataclasses.replace(http_config(server), tls_key_file=str(folder))
    with pytest.raises(ConfigError) as raised:
        https.check_files(unreadable)
    assert raised.value.key == "http.tls_key_file"


def test_files_that_are_not_pem_are_refused(server: Issued, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate") as raised:
        https.check_files(dataclasses.replace(http_config(server), tls_cert_file=str(garbage)))
    assert raised.value.key == "http.tls_cert_file"
    with pytest.raises(ConfigError, match="holds no PEM private key") as raised:
        https.check_files(dataclasses.replace(http_config(server), tls_key_file=str(garbage)))
    assert raised.value.key == "http.tls_key_file"


def test_a_key_of_another_certificate_is_refused(server: Issued, tmp_path: Path) -> None:
    other = issue_cert(make_ca(tmp_path / "ca"), tmp_path, "other", ["127.0.0.1"])
    config = dataclasses.replace(http_config(server), tls_key_file=str(other.key_file))

    with pytest.raises(ConfigError, match="is not the key of the certificate") as raised:
        https.check_files(config)
    assert raised.value.key == "http.tls_key_file"


def test_an_encrypted_key_is_refused(server: Issued, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(server.key_file.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key_file"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = dataclasses.replace(http_config(server), tls_key_file=str(encrypted))

    with pytest.raises(ConfigError, match="is encrypted") as raised:
        https.check_files(config)
    assert raised.value.key == "http.tls_key_file"


def test_a_ca_file_openssl_refuses_is_refused(server: Issued, tmp_path: Path) -> None:
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    config = http_config(server, tls_client_certs="required", tls_ca_file=str(bad_ca))

    with pytest.raises(ConfigError) as raised:
        https.check_files(config)
    assert raised.value.key == "http.tls_ca_file"


def test_expiry_is_warned_about_not_refused(server: Issued) -> None:
    """An expired web certificate must not stop serve: the DIMSE side goes
    on receiving from modalities (docs/security.md)."""
    end = not_after(server)
    config = http_config(server)

    expired = https.check_files(config, now=end + datetime.timedelta(days=1))
    soon = https.check_files(config, now=end - datetime.timedelta(days=10))
    early = https.check_files(config, now=end - datetime.timedelta(days=3650))
    fine = https.check_files(config, now=end - datetime.timedelta(days=60))

    assert len(expired) == 1
    assert "expired on" in expired[0]
    assert "in 9 days" in soon[0] or "in 10 days" in soon[0]
    assert "is not valid before" in early[0]
    assert fine == []


def test_the_profile_is_tls_1_2_or_later_with_forward_secret_aead_suites(
    server: Issued,
) -> None:
    context = https.server_context(http_config(server))
    tls13 = https.server_context(http_config(server, tls_min_version="1.3"))

    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls13.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.verify_mode == ssl.CERT_NONE
    tls12_suites = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12_suites
    # the check sees what it looks for: Python's default (gunicorn's) has CBC suites
    default = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).get_ciphers()
    assert any(not suite["aead"] for suite in default if suite["protocol"] == "TLSv1.2")
    for suite in tls12_suites:
        assert suite["kea"] == "kx-ecdhe", suite["name"]
        assert suite["aead"], suite["name"]


def test_client_certificate_modes(server: Issued, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "clients")
    required = https.server_context(
        http_config(server, tls_client_certs="required", tls_ca_file=str(ca.cert_file))
    )
    optional = https.server_context(
        http_config(server, tls_client_certs="optional", tls_ca_file=str(ca.cert_file))
    )

    assert required.verify_mode == ssl.CERT_REQUIRED
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    assert len(required.get_ca_certs()) == 1


def test_the_probe_identity_is_private_and_trusted_under_required_only(
    server: Issued, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cert, key = https.make_probe_identity(run_dir)
    ca = make_ca(tmp_path / "clients")
    required = http_config(server, tls_client_certs="required", tls_ca_file=str(ca.cert_file))
    optional = http_config(server, tls_client_certs="optional", tls_ca_file=str(ca.cert_file))

    assert key.stat().st_mode & 0o777 == 0o600
    # the store counts every trusted certificate (get_ca_certs only CA ones)
    assert https.server_context(required, run_dir).cert_store_stats()["x509"] == 2
    assert https.server_context(optional, run_dir).cert_store_stats()["x509"] == 1
    probe = https.probe_context(run_dir)
    assert probe.verify_mode == ssl.CERT_NONE
    assert cert.is_file()


def test_gunicorn_gets_its_tls_keys_and_one_context(server: Issued, tmp_path: Path) -> None:
    plain = gunicorn_settings(load_config(environ={}, cwd=tmp_path))
    config = load_config(
        environ={
            "APPLIANCE_HTTP_TLS_CERT_FILE": str(server.cert_file),
            "APPLIANCE_HTTP_TLS_KEY_FILE": str(server.key_file),
        },
        cwd=tmp_path,
    )
    served = https.ServedContext(config.http, None)
    served.load()
    settings = gunicorn_settings(config, served)

    assert "certfile" not in plain
    assert "ssl_context" not in plain
    assert settings["certfile"] == str(server.cert_file)
    assert settings["keyfile"] == str(server.key_file)
    assert settings["cert_reqs"] == ssl.CERT_NONE
    # every connection gets the same context: no file read per connection
    first = settings["ssl_context"](None, None)
    assert first is settings["ssl_context"](None, None) is served.context


def test_a_failed_reload_keeps_the_served_context(server: Issued, tmp_path: Path) -> None:
    files = Issued(tmp_path / "live.crt", tmp_path / "live.key_file")
    files.cert_file.write_bytes(server.cert_file.read_bytes())
    files.key_file.write_bytes(server.key_file.read_bytes())
    served = https.ServedContext(http_config(files), None)
    served.load()
    before = served.context
    files.key_file.write_text("half-written\n")

    served.load()

    assert served.context is before
    files.key_file.write_bytes(server.key_file.read_bytes())
    served.load()
    assert served.context is not before


def test_the_fhir_endpoint_address_is_https_with_https_on(server: Issued, tmp_path: Path) -> None:
    from appliance.fhir.publisher import dicomweb_root

    plain = load_config(environ={"APPLIANCE_HTTP_PORT": "8443"}, cwd=tmp_path)
    tls = load_config(
        environ={
            "APPLIANCE_HTTP_PORT": "8443",
            "APPLIANCE_HTTP_TLS_CERT_FILE": str(server.cert_file),
            "APPLIANCE_HTTP_TLS_KEY_FILE": str(server.key_file),
        },
        cwd=tmp_path,
    )

    assert dicomweb_root(plain) == "http://127.0.0.1:8443/v1"
    assert dicomweb_root(tls) == "https://127.0.0.1:8443/v1"
