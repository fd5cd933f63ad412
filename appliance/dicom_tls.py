"""DICOM TLS: the :class:`ssl.SSLContext` objects of the DIMSE listener and
of the associations this appliance opens, from the ``[dimse]`` TLS keys.

The profile is PS3.15 B.9 "BCP 195 TLS Secure Transport Connection Profile"
and B.10 "Non-downgrading BCP 195 TLS Secure Transport Connection Profile"
(dcmtk's ``+px``/``+py``; BCP 195 is RFC 8996 and RFC 9325):

- TLS 1.2 or 1.3, nothing older (RFC 8996 forbids TLS 1.0 and 1.1; B.10
  forbids falling back below the profile: an older client is refused, not
  served with a weaker protocol);
- for TLS 1.2 only the cipher suites RFC 9325 4.2 recommends: ECDHE or DHE
  key exchange (forward secrecy) with AES-GCM (authenticated encryption).
  The DHE ones are offered as a client; as a server Python's ssl module
  loads no DH parameters, so the listener negotiates ECDHE ones.  TLS 1.3
  has only AEAD suites, all allowed;
- no TLS compression (RFC 9325 3.3, CRIME), no renegotiation;
- certificates are verified: a client certificate against ``tls_ca_file``
  (required with ``tls_require_client_cert``), a server's against it with
  its host name or IP address (:func:`client_context`).

Contexts are built once per process and configuration (they are cached), and
:func:`appliance.config.load_config` builds them at start so that a missing
file, a key that does not match the certificate or an unreadable CA file
stops ``serve`` with the key's name.  Certificates are read at start only: a
renewed certificate takes effect at the next restart.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.config import DimseConfig

#: TLS 1.2 cipher suites (OpenSSL names) of RFC 9325 4.2, as PS3.15 B.9
#: lists them: TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
#: TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, the DHE_RSA pair, and the ECDSA
#: variants for EC certificates.
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _readable(key: str, path: str, marker: str, what: str) -> None:
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"dimse.{key}", f"cannot read {path}: {exc.strerror or exc}") from None
    if marker not in text:
        raise ConfigError(f"dimse.{key}", f"{path} holds no PEM {what}")


def _load_identity(context: ssl.SSLContext, dimse: DimseConfig) -> None:
    """Our certificate (chain) and private key into *context*."""
    _readable("tls_cert_file", dimse.tls_cert_file, "-----BEGIN CERTIFICATE-----", "certificate")
    _readable("tls_key_file", dimse.tls_key_file, "PRIVATE KEY-----", "private key")
    try:
        context.load_cert_chain(dimse.tls_cert_file, dimse.tls_key_file)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            reason = f"the key in {dimse.tls_key_file} does not match the certificate"
        else:
            reason = f"certificate and key cannot be loaded ({exc.reason or exc})"
        raise ConfigError("dimse.tls_key_file", reason) from None


def _load_cas(context: ssl.SSLContext, dimse: DimseConfig) -> None:
    _readable("tls_ca_file", dimse.tls_ca_file, "-----BEGIN CERTIFICATE-----", "certificate")
    try:
        context.load_verify_locations(cafile=dimse.tls_ca_file)
    except ssl.SSLError as exc:
        raise ConfigError("dimse.tls_ca_file", f"cannot be loaded ({exc.reason or exc})") from None


@functools.lru_cache(maxsize=4)
def server_context(dimse: DimseConfig) -> ssl.SSLContext:
    """The context of the TLS listener: our certificate, the BCP 195
    profile, and client certificates verified against ``tls_ca_file``
    (required with ``tls_require_client_cert``, else checked if sent).

    Raises
    ------
    ConfigError
        naming the key whose file is missing, unreadable or unusable.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_identity(context, dimse)
    if dimse.tls_ca_file:
        _load_cas(context, dimse)
        context.verify_mode = (
            ssl.CERT_REQUIRED if dimse.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


@functools.lru_cache(maxsize=4)
def client_context(dimse: DimseConfig) -> ssl.SSLContext:
    """The context of associations opened to a ``tls = true`` peer: its
    server certificate must chain to ``tls_ca_file`` and name the peer's
    ``host`` (host name or IP address, RFC 6125); ours is presented as the
    client certificate.

    Raises
    ------
    ConfigError
        naming the key whose file is missing, unreadable or unusable.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks the host name
    _harden(context)
    _load_identity(context, dimse)
    _load_cas(context, dimse)
    return context


def check_files(dimse: DimseConfig) -> None:
    """Load what the DICOM TLS listener and the ``tls = true`` peers will use
    (a certificate and key that do not match, an unreadable CA file), so
    ``serve`` refuses to start rather than fail at the first association.

    Raises
    ------
    ConfigError
        naming the key of the file that does not load.
    """
    if dimse.tls_port:
        server_context(dimse)
    if any(peer.tls for peer in dimse.peers):
        client_context(dimse)
