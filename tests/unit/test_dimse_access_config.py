"""The DIMSE access and DICOM TLS keys: defaults that keep existing
configurations working, refusals at load naming the key (a key that does
not match its certificate, an unreadable CA file...), the BCP 195 contexts,
and the access policy's decisions."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from appliance import dicom_tls
from appliance.config import DIMSE_SERVICES, load_config
from appliance.errors import ConfigError
from dimse_bridge.access import AccessPolicy
from tests.certs import issue_cert, make_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder)
    mine = issue_cert(ca, folder, "appliance")
    other = issue_cert(ca, folder, "other")
    return {
        "ca": ca.cert_file,
        "cert": mine.cert_file,
        "key": mine.key_file,
        "other_key": other.key_file,
    }


def tls_env(pki: dict[str, Path], **more: str) -> dict[str, str]:
    return {
        "APPLIANCE_DIMSE_TLS_PORT": "2762",
        "APPLIANCE_DIMSE_TLS_CERT_FILE": str(pki["cert"]),
        "APPLIANCE_DIMSE_TLS_KEY_FILE": str(pki["key"]),
        "APPLIANCE_DIMSE_TLS_CA_FILE": str(pki["ca"]),
        **more,
    }


def test_defaults_keep_existing_configurations_working(tmp_path: Path) -> None:
    config = load_config(
        environ={"APPLIANCE_DIMSE_PEERS": '[{ae_title="PACS1", host="10.0.0.2"}]'}, cwd=tmp_path
    )
    peer = config.dimse.peers[0]
    assert peer.services == DIMSE_SERVICES
    assert peer.addresses == ()
    assert peer.tls is False
    assert config.dimse.unknown_peer_services == DIMSE_SERVICES
    assert config.dimse.tls_port == 0


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ('{ae_title="A", host="h", services=["echo", "delete"]}', "dimse.peers[0].services"),
        ('{ae_title="A", host="h", addresses=["10.0.0.0/33"]}', "dimse.peers[0].addresses"),
        ('{ae_title="A", host="h", addresses=["pacs.example"]}', "dimse.peers[0].addresses"),
        ('{ae_title="A", host="h", tls_names=["ct1"]}', "dimse.peers[0].tls_names"),
    ],
)
def test_bad_peer_rules_name_the_key(tmp_path: Path, peer: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"APPLIANCE_DIMSE_PEERS": f"[{peer}]"}, cwd=tmp_path)
    assert info.value.key == key


def test_tls_files_are_checked_before_serve_starts(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = load_config(environ=tls_env(pki), cwd=tmp_path)
    assert config.dimse.tls_require_client_cert is True
    dicom_tls.check_files(config.dimse)
    cases = {
        "dimse.tls_key_file": {"APPLIANCE_DIMSE_TLS_KEY_FILE": str(pki["other_key"])},
        "dimse.tls_cert_file": {"APPLIANCE_DIMSE_TLS_CERT_FILE": str(tmp_path / "missing.pem")},
        "dimse.tls_ca_file": {"APPLIANCE_DIMSE_TLS_CA_FILE": str(pki["key"])},
    }
    for key, change in cases.items():
        loaded = load_config(environ=tls_env(pki, **change), cwd=tmp_path)
        with pytest.raises(ConfigError) as info:
            dicom_tls.check_files(loaded.dimse)
        assert info.value.key == key, info.value.reason
    mismatched = load_config(environ=tls_env(pki, **cases["dimse.tls_key_file"]), cwd=tmp_path)
    with pytest.raises(ConfigError, match="does not match the certificate"):
        dicom_tls.check_files(mismatched.dimse)


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"APPLIANCE_DIMSE_TLS_ONLY": "true"}, "dimse.tls_only"),
        ({"APPLIANCE_DIMSE_TLS_PORT": "11112"}, "dimse.tls_port"),
        ({"APPLIANCE_DIMSE_TLS_PORT": "70000"}, "dimse.tls_port"),
        ({"APPLIANCE_DIMSE_TLS_PORT": "2762"}, "dimse.tls_cert_file"),
        (
            {"APPLIANCE_DIMSE_PEERS": '[{ae_title="A", host="h", tls=true}]'},
            "dimse.tls_cert_file",
        ),
    ],
)
def test_tls_keys_that_do_not_fit_together(
    tmp_path: Path, environ: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ, cwd=tmp_path)
    assert info.value.key == key


def test_client_certificates_need_a_ca_file(tmp_path: Path, pki: dict[str, Path]) -> None:
    env = tls_env(pki)
    del env["APPLIANCE_DIMSE_TLS_CA_FILE"]
    with pytest.raises(ConfigError) as info:
        load_config(environ=env, cwd=tmp_path)
    assert info.value.key == "dimse.tls_ca_file"
    env["APPLIANCE_DIMSE_TLS_REQUIRE_CLIENT_CERT"] = "false"
    context = dicom_tls.server_context(load_config(environ=env, cwd=tmp_path).dimse)
    assert context.verify_mode == ssl.CERT_NONE


def test_relative_tls_files_are_made_absolute(tmp_path: Path, pki: dict[str, Path]) -> None:
    env = tls_env(pki, APPLIANCE_DIMSE_TLS_CA_FILE=pki["ca"].name)
    config = load_config(environ=env, cwd=pki["ca"].parent)
    assert config.dimse.tls_ca_file == str(pki["ca"])


def test_contexts_follow_bcp_195(tmp_path: Path, pki: dict[str, Path]) -> None:
    env = tls_env(pki, APPLIANCE_DIMSE_PEERS='[{ae_title="A", host="127.0.0.1", tls=true}]')
    dimse = load_config(environ=env, cwd=tmp_path).dimse
    server, client = dicom_tls.server_context(dimse), dicom_tls.client_context(dimse)
    for context in (server, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12
        assert all("GCM" in name and "DHE" in name for name in tls12), tls12
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is True
    # built once per process and configuration
    assert dicom_tls.server_context(dimse) is server


def test_policy_decisions(tmp_path: Path, pki: dict[str, Path]) -> None:
    peers = (
        '[{ae_title="CT1", host="10.1.2.3", services=["store", "echo"], '
        'addresses=["10.1.0.0/16", "127.0.0.1"]},'
        ' {ae_title="CT1", host="10.9.9.9", services=["find"], addresses=["10.9.0.0/16"]},'
        ' {ae_title="WS", host="127.0.0.1", tls=true},'
        ' {ae_title="HOSTED", host="127.0.0.1"}]'
    )
    config = load_config(
        environ={
            **tls_env(pki),
            "APPLIANCE_DIMSE_PEERS": peers,
            "APPLIANCE_DIMSE_UNKNOWN_PEER_SERVICES": "echo",
            "APPLIANCE_DIMSE_CHECK_PEER_ADDRESS": "true",
        },
        cwd=tmp_path,
    )
    policy = AccessPolicy(config)
    assert policy.decide("CT1", "10.1.7.7", tls=False).services == {"store", "echo"}
    assert policy.decide("CT1 ", "127.0.0.1", tls=False).services == {"store", "echo"}
    # an IPv4 caller of a dual-stack listener
    assert policy.decide("CT1", "::ffff:10.1.7.7", tls=False).services == {"store", "echo"}
    # the same title elsewhere: the entry whose networks hold the address
    assert policy.decide("CT1", "10.9.1.1", tls=False).services == {"find"}
    assert "not allowed from 192.168.1.1" in policy.decide("CT1", "192.168.1.1", False).refusal
    assert "TLS" in policy.decide("WS", "127.0.0.1", tls=False).refusal
    assert policy.decide("WS", "127.0.0.1", tls=True).services == set(DIMSE_SERVICES)
    # no addresses: its host's, with check_peer_address
    assert policy.decide("HOSTED", "127.0.0.1", tls=False).services == set(DIMSE_SERVICES)
    assert policy.decide("HOSTED", "10.0.0.1", tls=False).refusal
    assert policy.decide("NOBODY", "10.0.0.1", tls=False).services == {"echo"}


def test_policy_certificate_names(tmp_path: Path, pki: dict[str, Path]) -> None:
    peers = '[{ae_title="CT1", host="127.0.0.1", tls=true, tls_names=["ct1.example"]}]'
    config = load_config(environ={**tls_env(pki), "APPLIANCE_DIMSE_PEERS": peers}, cwd=tmp_path)
    policy = AccessPolicy(config)
    assert policy.names_checked
    named = frozenset({"ct1.example", "10.1.2.3"})
    assert policy.decide("CT1", "127.0.0.1", True, named).services == set(DIMSE_SERVICES)
    refusal = policy.decide("CT1", "127.0.0.1", True, frozenset({"ws.example"})).refusal
    assert "names none of tls_names" in refusal
    assert "no certificate" in policy.decide("CT1", "127.0.0.1", True).refusal
