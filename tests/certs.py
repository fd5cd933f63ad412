"""Test certificates made with ``cryptography``: a CA and the server and
client certificates it issues, as PEM files (for DICOM TLS, HTTPS, or any
other TLS test).

RSA 2048 keys: every TLS client here accepts them (dcmtk's BCP 195 profiles
offer ECDHE_RSA suites), and they are quick enough to make per test.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class Authority:
    """A CA: its certificate file, and what issuing needs."""

    cert_file: Path
    key_file: Path
    name: x509.Name
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate


@dataclasses.dataclass(frozen=True)
class Issued:
    """An issued certificate's files: the certificate and its private key
    (unencrypted PEM)."""

    cert_file: Path
    key_file: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(folder: Path, name: str = "Test CA") -> Authority:
    """A self-signed CA in *folder* (``<name>-ca.pem``, ``<name>-ca.key``)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before, not_after = _validity(3650)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    stem = name.lower().replace(" ", "-")
    cert_file, key_file = folder / f"{stem}-ca.pem", folder / f"{stem}-ca.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_file)
    return Authority(cert_file, key_file, subject, key, certificate)


def issue_cert(
    ca: Authority,
    folder: Path,
    name: str,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    *,
    client: bool = True,
    server: bool = True,
    days: int = 365,
) -> Issued:
    """A certificate for *name* signed by *ca*, in *folder* (``<name>.pem``,
    ``<name>.key``).

    Parameters
    ----------
    hosts
        Subject Alternative Names: IP addresses become IP entries, the rest
        DNS names (what a client checks the server's name against).
    client, server
        The Extended Key Usages: TLS client and/or server authentication.
    days
        Validity from now (negative: already expired).
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = _key()
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usages = [
        *([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
        *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
    ]
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = _validity(days)
    if days < 0:
        not_before, not_after = now - dt.timedelta(days=-days * 2), now + dt.timedelta(days=days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_file)
    return Issued(cert_file, key_file)
