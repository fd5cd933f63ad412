"""HTTPS for the DICOMweb port: the TLS profile, the checks of the
certificate files, and the readiness probe's own TLS client.

The profile follows BCP 195 (RFC 9325) as Mozilla's "intermediate"
configuration applies it: TLS 1.2 or 1.3 only (``http.tls_min_version``),
on TLS 1.2 only AEAD cipher suites with forward secrecy (ECDHE with
AES-GCM or ChaCha20-Poly1305, RFC 9325 4.2), no TLS compression (RFC 9325
3.3), no renegotiation.  TLS 1.3's suites are OpenSSL's (all AEAD).

When the files are read (README "HTTPS"): gunicorn asks its ``ssl_context``
setting for a context on every accepted connection, and its default builds a
new one from the files each time (its ``sock.ssl_context``).  Here gunicorn's
master builds it once, at start and on SIGHUP (:class:`ServedContext`), and
its workers inherit it, so a certificate renewed on disk is served once
``serve`` gets SIGHUP (the supervisor checks the new files, then gunicorn's
master loads them and starts new workers, and lets the old ones finish).

``cryptography`` is imported only inside the functions that check files or
make the probe's identity, i.e. only when HTTPS is configured.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.config import HttpConfig

LOGGER = logging.getLogger(__name__)

#: TLS 1.2 cipher suites (OpenSSL names): Mozilla's "intermediate" list
#: (ssl-config.mozilla.org, guidelines 5.7) without its DHE suites, which
#: need DH parameters Python's ssl module does not set; RFC 9325 4.2
#: recommends exactly these ECDHE + AEAD suites.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
CLIENT_CERTS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
#: A certificate that ends within this many days is warned about at start
#: and on reload.
EXPIRY_WARNING_DAYS = 30
#: The readiness probe's client certificate and key (with
#: ``tls_client_certs = "required"``), in the supervisor's run folder.
PROBE_CERT = "probe-client.crt"
PROBE_KEY = "probe-client.key"


def server_context(http: HttpConfig, run_dir: Path | None = None) -> ssl.SSLContext:
    """A server-side TLS context for *http*'s files and profile.

    With client certificates required, the readiness probe's certificate in
    *run_dir* (made by :func:`make_probe_identity`) is trusted too, so the
    supervisor can probe its own port.

    Raises
    ------
    OSError, ssl.SSLError
        if a file cannot be read or OpenSSL refuses it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[http.tls_min_version]
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(certfile=http.tls_cert_file, keyfile=http.tls_key_file)
    context.verify_mode = CLIENT_CERTS[http.tls_client_certs]
    if http.tls_ca_file:
        context.load_verify_locations(cafile=http.tls_ca_file)
    if http.tls_client_certs == "required" and run_dir is not None:
        probe = run_dir / PROBE_CERT
        if probe.is_file():
            context.load_verify_locations(cafile=str(probe))
    return context


class ServedContext:
    """gunicorn's ``ssl_context`` setting: the one context every connection
    of every worker is wrapped with.

    gunicorn's own default builds a new context, reading the files, on each
    accepted connection; a worker that did so after a half-done renewal
    (the certificate copied, the key not yet) would fail its handshakes.
    Here gunicorn's master builds the context (:meth:`load`) when it starts
    and on each SIGHUP, and the workers it forks inherit it: they never read
    the files, a worker respawned after a crash serves what its siblings
    serve, and session tickets work across workers.  A reload that fails
    keeps the context in use (logged).
    """

    def __init__(self, http: HttpConfig, run_dir: Path | None) -> None:
        self.http = http
        self.run_dir = run_dir
        self.context: ssl.SSLContext | None = None

    def load(self) -> None:
        """Build the context from the files now.

        Raises
        ------
        OSError, ssl.SSLError
            at the first load, if the files cannot be used (on a reload the
            error is logged and the last context kept).
        """
        try:
            context = server_context(self.http, self.run_dir)
        except (OSError, ssl.SSLError) as exc:
            if self.context is None:
                raise
            LOGGER.error("the HTTPS files cannot be used, the old certificate stays: %s", exc)
            return
        self.context = context

    def __call__(self, _conf: Any, _default_factory: Callable[[], ssl.SSLContext]) -> Any:
        if self.context is None:  # not loaded: gunicorn's master never ran load()
            self.load()
        return self.context


def check_files(http: HttpConfig, *, now: datetime.datetime | None = None) -> list[str]:
    """Check the HTTPS files as ``serve`` starts and before a reload.

    Returns
    -------
    list of str
        Warnings (to be logged): a certificate that has expired, is not yet
        valid, or expires within :data:`EXPIRY_WARNING_DAYS` days.  An
        expired certificate does not stop the start: the DIMSE side must go
        on receiving from modalities (docs/security.md "HTTPS").

    Raises
    ------
    ConfigError
        naming the key of a file that is missing or unreadable, holds no
        PEM certificate or key, an encrypted key, a key that does not match
        the certificate, or a CA file OpenSSL refuses.
    """
    if not http.tls:
        return []
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read("http.tls_cert_file", http.tls_cert_file)
    key_pem = _read("http.tls_key_file", http.tls_key_file)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError(
            "http.tls_cert_file", f"{http.tls_cert_file} holds no PEM certificate"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            "http.tls_key_file",
            f"{http.tls_key_file} is encrypted: give the key unencrypted, "
            "in a file only the service's user can read",
        ) from None
    except ValueError:
        raise ConfigError(
            "http.tls_key_file", f"{http.tls_key_file} holds no PEM private key"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ConfigError(
            "http.tls_key_file",
            f"{http.tls_key_file} is not the key of the certificate in {http.tls_cert_file}",
        )
    if http.tls_ca_file:
        _read("http.tls_ca_file", http.tls_ca_file)
    try:
        server_context(http)
    except ssl.SSLError as exc:
        key_name = "http.tls_ca_file" if http.tls_ca_file else "http.tls_cert_file"
        raise ConfigError(key_name, f"OpenSSL refuses the files: {exc.reason or exc}") from None
    return _validity_warnings(http.tls_cert_file, certificate, now)


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _validity_warnings(path: str, certificate: Any, now: datetime.datetime | None) -> list[str]:
    now = now or datetime.datetime.now(datetime.UTC)
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    serial = f"serial {certificate.serial_number:x}"
    if now > not_after:
        return [
            f"the HTTPS certificate in {path} ({serial}) expired on {not_after:%Y-%m-%d %H:%M} "
            "UTC: clients that verify it refuse to connect; renew it and send SIGHUP"
        ]
    if now < not_before:
        return [
            f"the HTTPS certificate in {path} ({serial}) is not valid before "
            f"{not_before:%Y-%m-%d %H:%M} UTC (is this system's clock right?)"
        ]
    left = not_after - now
    if left < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        return [
            f"the HTTPS certificate in {path} ({serial}) expires on "
            f"{not_after:%Y-%m-%d %H:%M} UTC, in {left.days} days: renew it and send SIGHUP"
        ]
    return []


def describe(http: HttpConfig) -> str:
    """The certificate served, for the log: subject, serial and end date."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificates(Path(http.tls_cert_file).read_bytes())[0]
    return (
        f"{certificate.subject.rfc4514_string()}, serial {certificate.serial_number:x}, "
        f"valid until {certificate.not_valid_after_utc:%Y-%m-%d}"
    )


def make_probe_identity(run_dir: Path) -> tuple[Path, Path]:
    """A fresh key and self-signed client certificate in *run_dir* (a
    private folder of this start) for the supervisor's readiness probe when
    client certificates are required; the workers of this start trust it
    (:func:`server_context`).  Returns (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicom-appliance readiness probe")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = run_dir / PROBE_CERT, run_dir / PROBE_KEY
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def probe_context(run_dir: Path | None) -> ssl.SSLContext:
    """The readiness probe's TLS client context.

    It does not verify the server: the supervisor probes the port its own
    child listens on, from the same host, sends no credentials, and reads
    only the readiness status; a host name check would fail for a
    certificate issued for the public name only.  It offers the probe's own
    certificate when there is one in *run_dir*.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if run_dir is not None and (run_dir / PROBE_CERT).is_file():
        context.load_cert_chain(run_dir / PROBE_CERT, run_dir / PROBE_KEY)
    return context
