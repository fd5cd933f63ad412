"""``dicom-appliance copy``: an embedded appliance (SQLite + disk) into
PostgreSQL + an Azure container (Azurite), byte for byte, and completed by
running it again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from appliance.cli import main
from appliance.config import load_config
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.model import Origin
from appliance.services import build_services
from appliance.status import Status
from tests.conftest import throwaway_pg_database
from tests.peers import Azurite

pytestmark = [pytest.mark.integration, pytest.mark.interop]

FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "image_dfl.dcm", "SC_rgb_rle.dcm")


@pytest.fixture
def database() -> Iterator[str]:
    with throwaway_pg_database("appliance_copy") as url:
        yield url


def _write(path: Path, text_: str) -> Path:
    path.write_text(text_)
    return path


def test_copy_embedded_into_postgresql_and_azure_then_finish_it(
    tmp_path: Path, database: str, azurite: Azurite, capsys: pytest.CaptureFixture[str]
) -> None:
    source_file = _write(
        tmp_path / "source.toml",
        f'[storage]\npath = "{tmp_path / "blobs"}"\n'
        f'[index]\nurl = "sqlite:///{tmp_path / "index.db"}"\nauto_migrate = true\n',
    )
    target_file = _write(
        tmp_path / "target.toml",
        f'[storage]\nbackend = "azure"\ncontainer = "copy-{uuid.uuid4().hex}"\n'
        f'connection_string = "{azurite.connection_string}"\n'
        f'[index]\nurl = "{database}"\n',
    )
    source_config = load_config(source_file, environ={})
    engine = create_index_engine(source_config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    source = build_services(source_config)
    paths = [Path(get_testdata_file(name)) for name in FILES]  # type: ignore[arg-type]
    for path in paths:
        with path.open("rb") as fh:
            assert source.ingest.store_part10(fh, Origin("import")).status is Status.SUCCESS
    source.close()

    # the target must be migrated first: refused, exit 2, naming the command
    assert main(["copy", "--config", str(source_file), "--to", str(target_file)]) == 2
    assert "dicom-appliance migrate" in capsys.readouterr().err
    assert main(["migrate", "--config", str(target_file)]) == 0

    assert main(["copy", "--config", str(source_file), "--to", str(target_file)]) == 0
    out = capsys.readouterr().out
    assert f"{len(FILES)} instance(s) copied, 0 already there, 0 failed" in out

    target = build_services(load_config(target_file, environ={}))
    try:
        for path in paths:
            header = dcmread(path, stop_before_pixels=True)
            stored = target.index.find_instance(str(header.SOPInstanceUID))
            assert stored is not None, path.name
            with target.retrieve.open(stored) as fh:
                assert fh.read() == path.read_bytes(), path.name
        # one instance lost on the target (as if the copy had stopped before it)
        gone = dcmread(paths[0], stop_before_pixels=True)
        target.delete.delete(str(gone.StudyInstanceUID))
    finally:
        target.close()

    assert main(["copy", "--config", str(source_file), "--to", str(target_file)]) == 0
    out = capsys.readouterr().out
    assert f"1 instance(s) copied, {len(FILES) - 1} already there, 0 failed" in out


def test_copy_refuses_a_target_that_is_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = _write(tmp_path / "same.toml", f'[index]\nurl = "sqlite:///{tmp_path / "i.db"}"\n')
    assert main(["copy", "--config", str(same), "--to", str(same)]) == 2
    assert "the target's index is this appliance's own" in capsys.readouterr().err
