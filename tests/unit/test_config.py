"""Configuration as SPEC.md fixes it: TOML + APPLIANCE_* overrides, refused
with the key's name when unknown or bad."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Config, load_config, render_config, resolve_index_url
from appliance.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_builtin_defaults_are_the_embedded_setup(tmp_path: Path) -> None:
    config = load_config(environ={}, cwd=tmp_path)
    assert config.http.host == "127.0.0.1"
    assert config.http.port == 8080
    assert config.http.workers == 2
    assert config.dimse.ae_title == "DICOM_EDGE"
    assert config.dimse.host == "127.0.0.1"
    assert config.dimse.port == 11112
    assert config.dimse.require_known_peers is False
    assert config.storage.backend == "filesystem"
    # relative paths are resolved against the working directory
    assert config.storage.path == tmp_path / "data" / "blobs"
    assert config.index.url == f"sqlite:///{tmp_path / 'data' / 'index.db'}"
    assert config.ingest.duplicate_policy == "keep"
    assert config.source is None


def test_default_file_is_read_when_present(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "appliance.toml").write_text("[http]\nport = 9000\n")
    config = load_config(environ={}, cwd=tmp_path)
    assert config.http.port == 9000
    assert config.source == tmp_path / "config" / "appliance.toml"


def test_file_with_peers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[dimse]
ae_title = "EDGE"
require_known_peers = true

[[dimse.peers]]
ae_title = "PACS1"
host = "127.0.0.1"
port = 104

[[dimse.peers]]
ae_title = "CT1"
host = "10.0.0.5"
port = 11112
""",
    )
    config = load_config(path, environ={}, cwd=tmp_path)
    assert config.dimse.require_known_peers is True
    assert [p.ae_title for p in config.dimse.peers] == ["PACS1", "CT1"]
    assert config.dimse.peers[1].port == 11112


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[http]\nport = 9000\nworkers = 4\n")
    env = {
        "APPLIANCE_HTTP_PORT": "9100",
        "APPLIANCE_DIMSE_REQUIRE_KNOWN_PEERS": "true",
        "APPLIANCE_INDEX_URL": "postgresql+psycopg://u:p@db/x",
        "APPLIANCE_STORAGE_PATH": "blobs",
        "APPLIANCE_DIMSE_PEERS": '[{ae_title = "PACS1", host = "127.0.0.1", port = 104}]',
        "UNRELATED": "x",
    }
    config = load_config(path, environ=env, cwd=tmp_path)
    assert config.http.port == 9100
    assert config.http.workers == 4
    assert config.dimse.require_known_peers is True
    assert config.index.url == "postgresql+psycopg://u:p@db/x"
    assert config.storage.path == tmp_path / "blobs"
    assert config.dimse.peers[0].ae_title == "PACS1"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(environ={}, cwd=tmp_path)
    with pytest.raises(AttributeError):
        config.http.port = 1  # type: ignore[misc]
    assert isinstance(config, Config)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[http]\nprot = 1\n", "http.prot"),
        ("[htp]\nport = 1\n", "htp"),
        ("[http]\nport = 0\n", "http.port"),
        ("[http]\nport = 70000\n", "http.port"),
        ('[http]\nport = "8080"\n', "http.port"),
        ("[http]\nworkers = 0\n", "http.workers"),
        ('[dimse]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n', "dimse.ae_title"),
        ('[dimse]\nae_title = "   "\n', "dimse.ae_title"),
        ('[dimse]\nae_title = "A\\\\B"\n', "dimse.ae_title"),
        ("[dimse]\nrequire_known_peers = 1\n", "dimse.require_known_peers"),
        (
            '[[dimse.peers]]\nae_title = "P"\nhost = "h"\nport = 104\ncolour = 1\n',
            "dimse.peers[0].colour",
        ),
        ('[[dimse.peers]]\nae_title = ""\nhost = "h"\n', "dimse.peers[0].ae_title"),
        ('[storage]\nbackend = "tape"\n', "storage.backend"),
        ('[index]\nurl = "mysql://x/y"\n', "index.url"),
        ('[index]\nurl = "not a url"\n', "index.url"),
        ('[index]\nurl = "sqlite://"\n', "index.url"),
        ("[index]\npool_size = 0\n", "index.pool_size"),
        ("[index]\nmax_overflow = -1\n", "index.max_overflow"),
        ("[index]\npool_timeout = 0\n", "index.pool_timeout"),
        ('[ingest]\nduplicate_policy = "ignore"\n', "ingest.duplicate_policy"),
        ("[query]\nmax_results = -5\n", "query.max_results"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ('[fhir]\nurl = "fhir.example/R4"\n', "fhir.url"),
        ('[fhir]\nauth = "bearer"\n', "fhir.token_file"),
        ('[fhir]\nauth = "oauth2"\ntoken_url = "https://id/token"\n', "fhir.client_id"),
        ('[fhir]\ntimezone = "Mars/Olympus"\n', "fhir.timezone"),
        ('[fhir]\ndeleted_status = "gone"\n', "fhir.deleted_status"),
        ("[fhir]\nsettle_seconds = -1\n", "fhir.settle_seconds"),
        ('[fhir]\npatient_system = "urn:x y"\n', "fhir.patient_system"),
        ("http = 5\n", "http"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={}, cwd=tmp_path)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("APPLIANCE_HTTP_PORT", "eighty"),
        ("APPLIANCE_HTTP_PORT", "99999"),
        ("APPLIANCE_DIMSE_REQUIRE_KNOWN_PEERS", "perhaps"),
        ("APPLIANCE_HTTP_COLOUR", "blue"),
        ("APPLIANCE_NOSUCH_KEY", "1"),
        ("APPLIANCE_HTTP", "1"),
        ("APPLIANCE_DIMSE_PEERS", "[not toml"),
    ],
)
def test_bad_environment_names_the_variable_or_key(var: str, value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={var: value}, cwd=tmp_path)
    message = str(info.value)
    section_key = var.removeprefix("APPLIANCE_").lower().replace("_", ".", 1)
    assert var in message or section_key in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[http\n"), environ={}, cwd=tmp_path)


def test_render_masks_secrets_and_round_trips(tmp_path: Path) -> None:
    env = {
        "APPLIANCE_INDEX_URL": "postgresql+psycopg://app:s3cret@db:5432/index",
        "APPLIANCE_STORAGE_SECRET_ACCESS_KEY": "AKIAsecret",
        "APPLIANCE_STORAGE_CONNECTION_STRING": "AccountKey=abc",
        "APPLIANCE_DIMSE_PEERS": '[{ae_title = "PACS1", host = "127.0.0.1", port = 104}]',
    }
    text = render_config(load_config(environ=env, cwd=tmp_path))
    assert "s3cret" not in text
    assert "AKIAsecret" not in text
    assert "AccountKey" not in text
    assert "postgresql+psycopg://app:***@db:5432/index" in text
    assert "[[dimse.peers]]" in text
    # what is shown (secrets aside) is itself a valid configuration
    shown = write(tmp_path, text.replace("********", "x").replace("***", "x"))
    again = load_config(shown, environ={}, cwd=tmp_path)
    assert again.dimse.peers[0].ae_title == "PACS1"
    assert again.http == load_config(environ={}, cwd=tmp_path).http


def test_the_example_file_is_valid_and_states_the_defaults(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "config" / "appliance.example.toml"
    config = load_config(example, environ={}, cwd=tmp_path)
    assert config == load_config(environ={}, cwd=tmp_path)


def test_known_peers_required_but_none_listed_is_refused(tmp_path: Path) -> None:
    """pynetdicom reads an empty allow-list as "everyone": refuse it."""
    with pytest.raises(ConfigError) as info:
        load_config(environ={"APPLIANCE_DIMSE_REQUIRE_KNOWN_PEERS": "true"}, cwd=tmp_path)
    assert info.value.key == "dimse.peers"


def test_lists_of_strings_from_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[http]\ncors_allowed_origins = ["https://viewer.example:8443"]\n')
    assert load_config(path, environ={}, cwd=tmp_path).http.cors_allowed_origins == (
        "https://viewer.example:8443",
    )
    env = {"APPLIANCE_HTTP_CORS_ALLOWED_ORIGINS": "http://a.example:3000, *"}
    config = load_config(environ=env, cwd=tmp_path)
    assert config.http.cors_allowed_origins == ("http://a.example:3000", "*")
    assert 'cors_allowed_origins = ["http://a.example:3000", "*"]' in render_config(config)
    assert "cors_allowed_origins = []" in render_config(load_config(environ={}, cwd=tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(
            write(tmp_path, '[http]\ncors_allowed_origins = ["javascript:x"]\n'),
            environ={},
            cwd=tmp_path,
        )
    assert info.value.key == "http.cors_allowed_origins"
    with pytest.raises(ConfigError) as info:
        load_config(
            write(tmp_path, "[http]\ncors_allowed_origins = [1]\n"), environ={}, cwd=tmp_path
        )
    assert info.value.key == "http.cors_allowed_origins"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("https://pacs.example", True),
        ("http://127.0.0.1:8080/dicom", True),
        ("https://pacs.example/", False),
        ("ftp://x", False),
        ("https://pacs.example/a?b=1", False),
    ],
)
def test_public_url(tmp_path: Path, value: str, ok: bool) -> None:
    env = {"APPLIANCE_HTTP_PUBLIC_URL": value}
    if ok:
        assert load_config(environ=env, cwd=tmp_path).http.public_url == value
    else:
        with pytest.raises(ConfigError, match=r"http\.public_url"):
            load_config(environ=env, cwd=tmp_path)


def test_index_url_left_to_the_processes_that_open_the_index(tmp_path: Path) -> None:
    """With index_url=False the URL is kept as written (the supervisor and
    gunicorn's master never open the index); resolve_index_url then checks
    it and makes a relative SQLite file absolute, as load_config does."""
    path = write(tmp_path, '[index]\nurl = "sqlite:///./db/index.db"\n')
    raw = load_config(path, environ={}, cwd=tmp_path, index_url=False)
    assert raw.index.url == "sqlite:///./db/index.db"
    assert raw.storage.path == tmp_path / "data" / "blobs"  # the rest as ever
    full = load_config(path, environ={}, cwd=tmp_path)
    assert resolve_index_url(raw, tmp_path) == full
    assert full.index.url == f"sqlite:///{tmp_path / 'db' / 'index.db'}"

    bad = write(tmp_path, '[index]\nurl = "mysql://x/y"\n')
    unchecked = load_config(bad, environ={}, cwd=tmp_path, index_url=False)
    with pytest.raises(ConfigError, match=r"'index\.url': must be a sqlite://"):
        resolve_index_url(unchecked, tmp_path)
    with pytest.raises(ConfigError, match=r"index\.url"):
        load_config(bad, environ={}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('backend = "azure"\ncontainer = "dicom"\n', "storage.connection_string"),
        ('backend = "azure"\nconnection_string = "x"\n', "storage.container"),
        (
            'backend = "azure"\ncontainer = "c"\nconnection_string = "x"\n'
            'account_url = "https://a.blob.core.windows.net"\n',
            "storage.account_url",
        ),
        ("retries = 11\n", "storage.retries"),
        ('backend = "s3"\n', "storage.bucket"),
        ('backend = "s3"\nbucket = "b"\naccess_key_id = "k"\n', "storage.secret_access_key"),
    ],
)
def test_azure_storage_needs_its_keys(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[storage]\n" + text), environ={}, cwd=tmp_path)
    assert info.value.key == key


def test_azure_secrets_are_masked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[storage]\nbackend = "azure"\ncontainer = "c"\n'
        'account_url = "https://a.blob.core.windows.net"\ncredential = "sv=2024&sig=SECRET"\n',
    )
    shown = render_config(load_config(path, environ={}, cwd=tmp_path))
    assert "SECRET" not in shown
    assert 'account_url = "https://a.blob.core.windows.net"' in shown


# --------------------------------------------------------------------------
# HTTPS keys (the files themselves are checked at serve start:
# tests/unit/test_https.py)


def test_https_is_off_by_default_and_on_with_a_certificate_and_key(tmp_path: Path) -> None:
    plain = load_config(environ={}, cwd=tmp_path)
    path = write(
        tmp_path,
        '[http]\ntls_cert_file = "tls/server.crt"\ntls_key_file = "/etc/tls/server.key"\n',
    )
    tls = load_config(path, environ={}, cwd=tmp_path)

    assert (plain.http.tls, plain.http.scheme) == (False, "http")
    assert (tls.http.tls, tls.http.scheme) == (True, "https")
    # relative to the working directory, like every path
    assert tls.http.tls_cert_file == str(tmp_path / "tls" / "server.crt")
    assert tls.http.tls_key_file == "/etc/tls/server.key"
    assert (tls.http.tls_min_version, tls.http.tls_client_certs) == ("1.2", "none")


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"APPLIANCE_HTTP_TLS_CERT_FILE": "s.crt"}, "http.tls_key_file"),
        ({"APPLIANCE_HTTP_TLS_KEY_FILE": "s.key"}, "http.tls_cert_file"),
        (
            {
                "APPLIANCE_HTTP_TLS_CERT_FILE": "s.crt",
                "APPLIANCE_HTTP_TLS_KEY_FILE": "s.key",
                "APPLIANCE_HTTP_TLS_CLIENT_CERTS": "required",
            },
            "http.tls_ca_file",
        ),
        (
            {
                "APPLIANCE_HTTP_TLS_CERT_FILE": "s.crt",
                "APPLIANCE_HTTP_TLS_KEY_FILE": "s.key",
                "APPLIANCE_HTTP_TLS_CA_FILE": "ca.crt",
            },
            "http.tls_ca_file",
        ),
        (
            {"APPLIANCE_HTTP_TLS_CLIENT_CERTS": "optional", "APPLIANCE_HTTP_TLS_CA_FILE": "c"},
            "http.tls_client_certs",
        ),
        ({"APPLIANCE_HTTP_TLS_CLIENT_CERTS": "sometimes"}, "http.tls_client_certs"),
        ({"APPLIANCE_HTTP_TLS_MIN_VERSION": "1.1"}, "http.tls_min_version"),
    ],
)
def test_https_keys_that_do_not_fit_are_refused_naming_the_key(
    tmp_path: Path, environ: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ=environ, cwd=tmp_path)
    assert raised.value.key == key


def test_mutual_tls_keys_load(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "APPLIANCE_HTTP_TLS_CERT_FILE": "s.crt",
            "APPLIANCE_HTTP_TLS_KEY_FILE": "s.key",
            "APPLIANCE_HTTP_TLS_CLIENT_CERTS": "required",
            "APPLIANCE_HTTP_TLS_CA_FILE": "clients-ca.crt",
            "APPLIANCE_HTTP_TLS_MIN_VERSION": "1.3",
        },
        cwd=tmp_path,
    )
    assert config.http.tls_client_certs == "required"
    assert config.http.tls_ca_file == str(tmp_path / "clients-ca.crt")
    assert config.http.tls_min_version == "1.3"
