"""config/secure.example.toml, the production configuration docs/security.md
describes, loads, and its certificate files pass the checks serve makes at start."""

from __future__ import annotations

from pathlib import Path

from appliance import dicom_tls, https
from appliance.config import load_config
from tests.certs import issue_cert, make_ca

EXAMPLE = Path(__file__).parents[2] / "config" / "secure.example.toml"


def test_the_secure_example_loads_with_its_files(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    server = issue_cert(ca, tmp_path / "pki", "appliance")
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "server.pem").write_bytes(server.cert_file.read_bytes())
    (tls / "server.key").write_bytes(server.key_file.read_bytes())
    (tls / "dicom-ca.pem").write_bytes(ca.cert_file.read_bytes())
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("/etc/dicom-appliance/tls", str(tls))
    text = text.replace("/var/lib/dicom-appliance", str(tmp_path / "var"))
    written = tmp_path / "appliance.toml"
    written.write_text(text, encoding="utf-8")

    config = load_config(written, environ={}, cwd=tmp_path)
    dicom_tls.check_files(config.dimse)  # what serve loads before it starts
    assert https.check_files(config.http) == []

    assert config.auth.mode == "oidc"
    assert config.http.tls
    assert config.http.tls_min_version == "1.2"
    assert config.dimse.tls_port == 2762
    assert config.dimse.tls_require_client_cert
    assert config.dimse.require_known_peers
    assert len(config.dimse.peers) == 2
    assert config.dimse.peers[0].services == ("echo", "store")
    assert config.audit.enabled
    assert not config.audit.record_query_values
