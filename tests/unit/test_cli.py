"""The ``dicom-appliance`` command in-process: ``config show``, ``migrate``,
``--version``, and refusals of bad configuration (exit 2, the key named,
no stack trace)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from appliance import __version__
from appliance.cli import main
from appliance.config import MASK, LogConfig
from appliance.index import migrate


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No APPLIANCE_* variable of the caller leaks in; cwd is a fresh folder
    (so no config/appliance.toml is picked up)."""
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text


def _line(text: str, key: str, section: str | None = None) -> str:
    """The one line of *text* (of its *section*, if given) that sets *key*."""
    if section is not None:
        text = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
    lines = [line for line in text.splitlines() if line.startswith(f"{key} = ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_config_show_masks_secrets_from_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "APPLIANCE_INDEX_URL", "postgresql+psycopg://edge:s3cr3t-pw@db.example/appliance"
    )
    monkeypatch.setenv("APPLIANCE_STORAGE_SECRET_ACCESS_KEY", "very-secret-key")

    assert main(["config", "show"]) == 0

    out = capsys.readouterr().out
    assert "s3cr3t-pw" not in out
    assert "very-secret-key" not in out
    # shown, with only the secret part hidden
    url_line = _line(out, "url", "index")
    assert url_line.startswith('url = "postgresql+psycopg://edge:')
    assert url_line.endswith('@db.example/appliance"')
    assert _line(out, "secret_access_key") == f'secret_access_key = "{MASK}"'


def test_config_show_masks_secrets_from_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(
        "[index]\n"
        'url = "postgresql+psycopg://edge:file-pw@db.example/appliance"\n'
        "[storage]\n"
        'secret_access_key = "file-secret"\n'
        'connection_string = "AccountKey=azure-secret"\n'
    )

    assert main(["config", "show", "--config", str(config)]) == 0

    out = capsys.readouterr().out
    for secret in ("file-pw", "file-secret", "azure-secret"):
        assert secret not in out
    assert f"# read from {config}" in out


def test_config_show_prints_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0

    out = capsys.readouterr().out
    assert '[http]\nhost = "127.0.0.1"\nport = 8080\n' in out
    assert 'ae_title = "DICOM_EDGE"' in out


def test_unknown_key_in_file_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[dimse]\nae_title = "EDGE"\ncolour = "red"\n')

    assert main(["config", "show", "--config", str(config)]) == 2

    err = capsys.readouterr().err
    assert "dimse.colour" in err
    _no_traceback(err)


def test_bad_value_is_refused_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_HTTP_PORT", "70000")

    assert main(["config", "show"]) == 2

    err = capsys.readouterr().err
    assert "http.port" in err
    _no_traceback(err)


def test_unknown_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_HTTP_PROT", "8080")

    assert main(["serve"]) == 2

    err = capsys.readouterr().err
    assert "APPLIANCE_HTTP_PROT" in err
    _no_traceback(err)


def test_missing_config_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--config", "nowhere.toml"]) == 2

    err = capsys.readouterr().err
    assert "nowhere.toml" in err
    _no_traceback(err)


def test_migrate_prints_from_and_to_revision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_INDEX_URL", f"sqlite:///{tmp_path / 'index.db'}")
    head = migrate.head_revision()

    assert main(["migrate"]) == 0
    assert capsys.readouterr().out == f"index migrated from an empty database to revision {head}\n"

    assert main(["migrate"]) == 0
    assert capsys.readouterr().out == f"index already at revision {head}\n"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dicom-appliance {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: dicom-appliance" in capsys.readouterr().err


def test_logging_setup_keeps_pydicom_from_quoting_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pydicom quotes a malformed value it converts on read ("Invalid value
    for VR IS: '...'"), through its logger and to stderr; after the
    service's logging set-up it must not."""
    import io
    import warnings

    from pydicom import config as pydicom_config
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from appliance.logs import setup_logging

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.SeriesNumber = "77"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    # (0020,0011) IS, length 2, value "77" -> "7Q": malformed on disk
    data = buf.getvalue().replace(b"\x20\x00\x11\x00IS\x02\x0077", b"\x20\x00\x11\x00IS\x02\x007Q")

    def read_quotes_value() -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with contextlib.suppress(ValueError):
                dcmread(io.BytesIO(data)).get("SeriesNumber")
        return any("7Q" in str(w.message) for w in caught)

    before = pydicom_config.settings.reading_validation_mode
    try:
        # pydicom's default (another test in this process may have quieted it)
        pydicom_config.settings.reading_validation_mode = pydicom_config.WARN
        assert read_quotes_value(), "pydicom's default should quote the value (test premise)"
        capsys.readouterr()
        setup_logging(LogConfig(level="debug"))
        assert not read_quotes_value()
        assert "7Q" not in "".join(capsys.readouterr())
        # a process that reads no DICOM leaves pydicom alone
        pydicom_config.settings.reading_validation_mode = pydicom_config.WARN
        setup_logging(LogConfig(level="debug"), dicom=False)
        assert read_quotes_value()
    finally:
        pydicom_config.settings.reading_validation_mode = before
