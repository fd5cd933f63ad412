"""The admin commands through ``appliance.cli.main``: ``import`` (files,
folders, DICOMDIRs; counts; the journal; resuming after a failure, Ctrl-C
and kill -9), ``stats`` (cross-checked with SQL), ``backup`` / ``restore``
(SQLite while another thread keeps storing; PostgreSQL with pg_dump)."""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import MediaStorageDirectoryStorage
from sqlalchemy import func, select

from appliance.backup import dump_command, libpq, restore_command
from appliance.bulk_import import STOP_AFTER
from appliance.cli import main
from appliance.config import load_config
from appliance.dicomio import is_valid_uid
from appliance.errors import StorageFull
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.schema import instance, series, study
from appliance.ingest import IngestService
from appliance.model import Level, Origin
from appliance.query import Query
from appliance.services import Services, build_services
from appliance.status import Status
from appliance.storage.filesystem import FilesystemBlobStore
from tests.conftest import missing_peer, throwaway_pg_database
from tests.helpers import part10_of, small_study

pytestmark = pytest.mark.integration

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No APPLIANCE_* variable of the caller leaks in; the working folder
    (where the journal goes by default) is the test's own."""
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def appliance(
    folder: Path, *, index_url: str | None = None, migrated: bool = True, **extra: str
) -> Path:
    """The configuration file of an appliance in *folder* (SQLite + disk
    unless *index_url*), migrated; *extra* adds ``[section] key = "value"``
    lines as ``section_key="value"``."""
    folder.mkdir(parents=True, exist_ok=True)
    url = index_url or f"sqlite:///{folder / 'index.db'}"
    lines = [f'[storage]\npath = "{folder / "blobs"}"', f'[index]\nurl = "{url}"']
    for name, value in extra.items():
        section, key = name.split("_", 1)
        lines.append(f'[{section}]\n{key} = "{value}"')
    path = folder / "appliance.toml"
    path.write_text("\n".join(lines) + "\n")
    if migrated:
        engine = create_index_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
    return path


def services_of(config_file: Path) -> Services:
    return build_services(load_config(config_file, environ={}))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``dicom-appliance ARGV``: exit code, stdout, stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def index_counts(services: Services) -> tuple[int, int, int, int]:
    """Studies, series, instances, bytes, counted by SQL."""
    with services.engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(study)).scalar_one(),
            conn.execute(select(func.count()).select_from(series)).scalar_one(),
            conn.execute(select(func.count()).select_from(instance)).scalar_one(),
            conn.execute(select(func.coalesce(func.sum(instance.c.size), 0))).scalar_one(),
        )


def study_list(services: Services) -> list[tuple[str, int, int]]:
    """The study list as QIDO-RS answers it: UID, series, instances."""
    found = services.query.search(Query(Level.STUDY, {}))
    return sorted(
        (m["StudyInstanceUID"], m["NumberOfStudyRelatedSeries"], m["NumberOfStudyRelatedInstances"])
        for m in found.matches
    )


def write_study(folder: Path, count: int, patient_id: str = "NODES-1") -> list[Path]:
    """*count* generated instances of one new study as files in *folder*."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(small_study(count, patient_id), start=1):
        path = folder / f"IMG{number:05d}.dcm"
        path.write_bytes(part10_of(ds))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------
# what each file should count as, found without the appliance


#: pydicom's cut-short files: an element runs past the end of the data set,
#: which ingest refuses (0xC000) before pydicom reads it
CUT_SHORT = frozenset({"MR_truncated.dcm", "rtplan_truncated.dcm"})


class Expected:
    """The counts an import of a folder must report, from pydicom alone (and
    :data:`CUT_SHORT`)."""

    def __init__(self) -> None:
        self.not_dicom = 0
        self.dicomdirs = 0
        self.refused: list[Path] = []
        #: accepted files by SOP Instance UID
        self.by_sop: dict[str, list[Path]] = collections.defaultdict(list)
        self.headers: dict[str, Any] = {}

    @property
    def stored(self) -> int:
        return len(self.by_sop)

    @property
    def duplicate(self) -> int:
        return sum(len(paths) - 1 for paths in self.by_sop.values())

    def add(self, path: Path) -> None:
        with path.open("rb") as fh:
            if fh.read(132)[128:] != b"DICM":
                self.not_dicom += 1
                return
        if read_file_meta_info(path).get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            self.dicomdirs += 1
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, stop_before_pixels=True)
        uids = [
            ds.get(k)
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        ]
        if (
            path.name in CUT_SHORT
            or "TransferSyntaxUID" not in ds.file_meta
            or not all(isinstance(u, str) and is_valid_uid(u) for u in uids)
        ):
            self.refused.append(path)
            return
        self.by_sop[str(ds.SOPInstanceUID)].append(path)
        self.headers.setdefault(str(ds.SOPInstanceUID), ds)


def expected_for(folder: Path) -> Expected:
    expected = Expected()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        expected.add(path)
    return expected


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A real data folder: pydicom's whole test corpus (its DICOMDIRs and
    the files they reference, files that are not DICOM, defective files,
    variants sharing a SOP Instance UID), two generated studies, a copy of
    one of their files elsewhere (a duplicate), and a text file."""
    root = tmp_path / "data"
    shutil.copytree(TEST_FILES, root / "pydicom")
    first = write_study(root / "generated" / "one", 12)
    write_study(root / "generated" / "two", 7, patient_id="NODES-2")
    (root / "copies").mkdir()
    shutil.copy(first[0], root / "copies" / "again.dcm")
    (root / "notes.txt").write_text("not DICOM\n")
    return root


# --------------------------------------------------------------------------
# import


def test_import_counts_each_kind_then_a_second_run_skips_everything(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = appliance(tmp_path / "appliance")
    expected = expected_for(data)
    assert expected.dicomdirs == 8
    assert expected.refused
    assert expected.duplicate > 1

    code, report = run_json(capsys, "import", str(data), "--config", str(config), "--workers", "3")

    assert code == 1, "the defective files failed"
    assert report["stored"] == expected.stored
    assert report["duplicates"] == {"kept": expected.duplicate, "replaced": 0, "rejected": 0}
    assert report["skipped_not_dicom"] == expected.not_dicom
    assert report["skipped_done_before"] == 0
    assert report["dicomdirs"] == expected.dicomdirs
    assert sorted(f["path"] for f in report["failures"]) == sorted(
        str(p.resolve()) for p in expected.refused
    )
    assert all(
        f["reason"].startswith(
            "CANNOT_UNDERSTAND" if Path(f["path"]).name in CUT_SHORT else "DATASET_DOES_NOT_MATCH"
        )
        for f in report["failures"]
    ), report["failures"]
    sizes = {p: p.stat().st_size for paths in expected.by_sop.values() for p in paths}
    assert report["bytes"] == sum(sizes.values())
    assert report["seconds"] > 0
    assert report["instances_per_second"] > 0

    services = services_of(config)
    try:
        studies, series_count, instances, _ = index_counts(services)
        assert instances == expected.stored
        assert studies == len({str(ds.StudyInstanceUID) for ds in expected.headers.values()})
        assert series_count == len({str(ds.SeriesInstanceUID) for ds in expected.headers.values()})
    finally:
        services.close()

    code, again = run_json(capsys, "import", str(data), "--config", str(config))
    assert code == 1, "the defective files are tried again, and fail again"
    assert again["stored"] == again["duplicate"] == 0
    assert again["skipped_done_before"] == expected.stored + expected.duplicate + expected.not_dicom
    assert again["failed"] == len(expected.refused)

    # the text summary names the counts and each failure (no PHI: paths only)
    code, out, _ = run(capsys, "import", str(data), "--config", str(config))
    assert code == 1
    assert f"0 stored, 0 duplicate, {len(expected.refused)} failed" in out
    assert out.count("failed: ") == len(expected.refused)


def _utc_day() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def test_stats_equal_what_was_imported(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str], index_url: str
) -> None:
    """On SQLite and PostgreSQL: the import through the CLI, then its
    figures against SQL counts, QIDO-RS's study list and pydicom's reading
    of the files."""
    config = appliance(tmp_path / "appliance", index_url=index_url, migrated=False)
    code, report = run_json(capsys, "stats", "--config", str(config))
    assert code == 0
    assert report["totals"] == {"studies": 0, "series": 0, "instances": 0, "bytes": 0}
    first_day = _utc_day()
    run(capsys, "import", str(data), "--config", str(config))
    expected = expected_for(data)

    code, stats = run_json(capsys, "stats", "--config", str(config))
    assert code == 0
    services = services_of(config)
    try:
        studies, series_count, instances, size = index_counts(services)
        qido = study_list(services)
    finally:
        services.close()
    assert stats["totals"] == {
        "studies": studies,
        "series": series_count,
        "instances": instances,
        "bytes": size,
    }
    assert instances == expected.stored
    assert len(qido) == studies
    assert sum(n for _, _, n in qido) == instances
    by_modality = {row["key"]: row for row in stats["by_modality"]}
    wanted = collections.Counter(str(ds.get("Modality", "")) for ds in expected.headers.values())
    assert {key: row["instances"] for key, row in by_modality.items()} == dict(wanted)
    assert sum(row["bytes"] for row in by_modality.values()) == size
    assert sum(row["series"] for row in by_modality.values()) == series_count
    days = stats["by_day"]
    assert {day["key"] for day in days} <= {first_day, _utc_day()}, "stored today (UTC)"
    assert sum(day["instances"] for day in days) == instances
    if len(days) == 1:  # not across midnight
        assert {k: v for k, v in days[0].items() if k != "key"} == stats["totals"]
    # imported files have no sending AE (only a C-STORE's Calling AE Title is kept)
    assert {row["key"]: row["instances"] for row in stats["by_ae"]} == {"": instances}

    code, only = run_json(capsys, "stats", "--config", str(config), "--by", "modality")
    assert code == 0
    assert "by_day" not in only
    assert only["by_modality"] == stats["by_modality"]
    code, out, _ = run(capsys, "stats", "--config", str(config))
    assert code == 0
    assert f"{instances} instances" in out
    assert "per modality" in out
    assert "per sending AE" in out
    code, by_ae = run_json(capsys, "stats", "--config", str(config), "--by", "ae")
    assert code == 0
    assert "by_modality" not in by_ae
    assert by_ae["by_ae"] == stats["by_ae"]


@pytest.mark.parametrize(("policy", "label"), [("replace", "replaced"), ("reject", "rejected")])
def test_a_duplicate_is_counted_by_the_policy_never_as_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str, label: str
) -> None:
    config = appliance(tmp_path / "appliance", ingest_duplicate_policy=policy)
    paths = write_study(tmp_path / "data" / "a", 3)
    (tmp_path / "data" / "b").mkdir()
    shutil.copy(paths[1], tmp_path / "data" / "b" / "same.dcm")

    code, report = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))

    assert code == 0
    assert report["stored"] == 3
    assert report["failed"] == 0
    assert report["duplicates"][label] == 1
    assert report["duplicate"] == 1


def test_an_import_whose_worker_fails_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker raises after k files: those k are done and recorded, the rest
    failed; the next run stores exactly the rest."""
    config = appliance(tmp_path / "appliance")
    paths = write_study(tmp_path / "data", 40)
    original = IngestService.store_part10
    calls, lock, k = [0], threading.Lock(), 15

    def failing(self: IngestService, *args: Any, **kwargs: Any) -> Any:
        with lock:
            calls[0] += 1
            if calls[0] > k:
                raise RuntimeError("the worker broke")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IngestService, "store_part10", failing)
    code, first = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert code == 1
    assert first["stored"] == k
    assert first["failed"] == len(paths) - k
    assert {f["reason"] for f in first["failures"]} == {
        "unexpected error: RuntimeError: the worker broke"
    }
    journal = tmp_path / ".dicom-appliance-import.journal"
    assert len(journal.read_text().splitlines()) == 1 + k  # the header, one line per file done

    monkeypatch.setattr(IngestService, "store_part10", original)
    code, second = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert code == 0
    assert second["stored"] == len(paths) - k
    assert second["skipped_done_before"] == k
    assert second["duplicate"] == second["failed"] == 0
    services = services_of(config)
    try:
        assert index_counts(services)[2] == len(paths)
    finally:
        services.close()


def test_an_import_stops_when_the_storage_fails_again_and_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk fails every file alike: the run stops after 20 such
    failures in a row instead of failing all the rest; the next run, the
    disk freed, stores everything."""
    config = appliance(tmp_path / "appliance")
    paths = write_study(tmp_path / "data", 60)

    def full(self: Any, source: Any) -> Any:
        raise StorageFull("no space left on the device")

    original = FilesystemBlobStore.put
    monkeypatch.setattr(FilesystemBlobStore, "put", full)
    code, first = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert code == 1
    assert first["stored"] == 0
    assert STOP_AFTER <= first["failed"] < len(paths)
    assert first["stopped"].startswith(f"{STOP_AFTER} storage or index failures in a row")
    assert "OUT_OF_RESOURCES (0xA700): no space left" in first["failures"][0]["reason"]

    monkeypatch.setattr(FilesystemBlobStore, "put", original)  # the disk freed
    code, second = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert code == 0
    assert second["stored"] == len(paths)


def _journal_lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _start_import(tmp_path: Path, config: Path, data: Path, journal: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "import",
            str(data),
            "--config",
            str(config),
            "--journal",
            str(journal),
            "--workers",
            "2",
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lines(journal: Path, process: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 120
    while _journal_lines(journal) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the import made no progress"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_import_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """Ctrl-C (the files in progress finish, a summary, exit 130) or kill -9
    in the middle: the next run stores the rest, skips what the journal
    lists, and no instance is stored twice."""
    config = appliance(tmp_path / "appliance")
    total = 600
    for number in range(6):
        write_study(tmp_path / "data" / f"s{number}", total // 6)
    journal = tmp_path / "import.journal"

    process = _start_import(tmp_path, config, tmp_path / "data", journal)
    _wait_for_lines(journal, process, 60)
    process.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGKILL)
    out, _ = process.communicate(timeout=60)
    done_before = _journal_lines(journal) - 1
    assert done_before < total, "it was stopped in the middle"
    if how == "SIGINT":
        assert process.returncode == 130
        summary = json.loads(out)
        assert summary["stopped"] == "interrupted"
        assert summary["stored"] == done_before, "what it stored is what it recorded"
    else:
        assert process.returncode == -signal.SIGKILL

    code, report = run_json(
        capsys, "import", str(tmp_path / "data"), "--config", str(config), "--journal", str(journal)
    )
    assert code == 0
    assert report["skipped_done_before"] == done_before
    # a file stored but not yet recorded when it was killed is a duplicate now
    assert report["stored"] + report["duplicate"] == total - done_before
    assert report["duplicate"] <= (0 if how == "SIGINT" else 4)
    assert report["failed"] == 0
    services = services_of(config)
    try:
        assert index_counts(services)[2] == total
    finally:
        services.close()


def test_a_journal_cut_short_is_read_and_the_import_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = appliance(tmp_path / "appliance")
    write_study(tmp_path / "data", 10)
    code, _ = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert code == 0
    journal = tmp_path / ".dicom-appliance-import.journal"
    text = journal.read_text()
    lines = text.splitlines(keepends=True)
    # as if the machine died while the last three lines were written
    journal.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])

    code, report = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert code == 0
    assert report["skipped_done_before"] == 7
    assert report["duplicates"]["kept"] == 3
    assert report["stored"] == 0
    code, report = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert report["skipped_done_before"] == 10, "the cut line did not swallow the next one"

    # a file changed since: imported again (here: a duplicate of itself)
    changed = sorted((tmp_path / "data").iterdir())[0]
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    code, report = run_json(capsys, "import", str(tmp_path / "data"), "--config", str(config))
    assert report["skipped_done_before"] == 9
    assert report["duplicate"] == 1


def test_a_journal_of_another_index_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_study(tmp_path / "data", 2)
    first = appliance(tmp_path / "one")
    second = appliance(tmp_path / "two")
    assert run(capsys, "import", str(tmp_path / "data"), "--config", str(first))[0] == 0
    code, _, err = run(capsys, "import", str(tmp_path / "data"), "--config", str(second))
    assert code == 1
    assert "written for another index" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "import", str(tmp_path / "nothing"), "--config", str(second))
    assert code == 2
    assert "no such file or folder" in err


def _dicomdir_media(tmp_path: Path) -> Path:
    """pydicom's DICOMDIR and the files it references, in their own folder."""
    media = tmp_path / "media"
    shutil.copytree(
        TEST_FILES / "dicomdirtests",
        media,
        ignore=shutil.ignore_patterns("TINY_ALPHA", "DICOMDIR-*", "*.txt"),
    )
    return media


def test_a_dicomdir_loads_what_it_references_and_nothing_outside_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = appliance(tmp_path / "appliance")
    media = _dicomdir_media(tmp_path)
    dicomdir = dcmread(media / "DICOMDIR")
    records = [r for r in dicomdir.DirectoryRecordSequence if "ReferencedFileID" in r]
    referenced = [media.joinpath(*r.ReferencedFileID) for r in records]
    # outside the folder: two valid instances a crafted DICOMDIR points at
    outside = write_study(tmp_path / "outside", 2, patient_id="OUTSIDE")
    records[0].ReferencedFileID = ["..", "outside", outside[0].name]
    (media / "LINK").symlink_to(outside[1])
    records[1].ReferencedFileID = ["LINK"]
    records[2].ReferencedFileID = ["/etc", "passwd"]
    # a name written in another case than the file's (media mounted elsewhere)
    lowered = referenced[3].with_name(referenced[3].name.lower() + "x")
    referenced[3].rename(lowered)
    records[3].ReferencedFileID = [*records[3].ReferencedFileID[:-1], lowered.name.upper()]
    dicomdir.save_as(media / "DICOMDIR")
    expected = Expected()
    for path in referenced[3:]:
        expected.add(path if path.exists() else lowered)

    # the DICOMDIR alone, as a path: only its references are read
    code, report = run_json(capsys, "import", str(media / "DICOMDIR"), "--config", str(config))

    assert code == 1
    assert report["dicomdirs"] == 1
    assert report["stored"] == expected.stored
    assert report["duplicate"] == expected.duplicate
    reasons = {f["path"].rsplit(" -> ", 1)[1]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {f"..\\outside\\{outside[0].name}", "LINK", "/etc\\passwd"}
    assert "not a plain name" in reasons[f"..\\outside\\{outside[0].name}"]
    assert "outside the DICOMDIR's folder" in reasons["LINK"]
    assert "not a plain name" in reasons["/etc\\passwd"]
    services = services_of(config)
    try:
        for path in outside:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert services.index.find_instance(uid) is None, "a file outside was stored"
        assert index_counts(services)[2] == expected.stored
    finally:
        services.close()


def test_import_logs_no_patient_data_and_shows_progress_only_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = appliance(tmp_path / "appliance", log_level="debug")
    folder = tmp_path / "DOE^JOHN"
    write_study(folder, 3, patient_id="PID-SECRET-7")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1\2\3")

    code, out, err = run(capsys, "import", str(folder), "--config", str(config))
    assert code == 1
    assert "DOE^JOHN" in out, "the summary names the file that failed"
    for secret in ("DOE^JOHN", "PID-SECRET-7", "Nodes^Test"):
        assert secret not in err, f"{secret} in the log"
    assert "%|" not in err, "no progress bar when stderr is not a terminal"

    class Terminal:
        def __init__(self) -> None:
            self.text: list[str] = []

        def write(self, text: str) -> int:
            self.text.append(text)
            return len(text)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    for quiet in (False, True):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        argv = [
            "import",
            str(folder),
            "--config",
            str(config),
            "--journal",
            str(tmp_path / f"j{quiet}"),
        ]
        assert main([*argv, "--quiet"] if quiet else argv) == 1
        shown = "".join(terminal.text)
        assert ("import: 100%" in shown) is not quiet, shown[-500:]


# --------------------------------------------------------------------------
# backup and restore: SQLite


class Writer(threading.Thread):
    """Keeps storing new studies through the ingest until stopped; every
    acknowledged SOP Instance UID in :attr:`acknowledged`."""

    def __init__(self, services: Services) -> None:
        super().__init__(name="writer", daemon=True)
        self.services = services
        self.acknowledged: list[str] = []
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for ds in small_study(5, patient_id="WRITER"):
                    result = self.services.ingest.store_part10(
                        _bytes_io(part10_of(ds)), Origin("dicomweb")
                    )
                    assert result.status is Status.SUCCESS, result.reason
                    self.acknowledged.append(str(ds.SOPInstanceUID))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure = exc


def _bytes_io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def _sop_uids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT sop_instance_uid FROM instance")}


def test_sqlite_backup_while_storing_then_restore_into_a_fresh_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source_config = appliance(tmp_path / "source")
    source = services_of(source_config)
    try:
        for number in range(3):
            for ds in small_study(10, patient_id=f"P{number}"):
                assert source.ingest.store_part10(_bytes_io(part10_of(ds)), Origin("import")).stored
        initial = _sop_uids(tmp_path / "source" / "index.db")
        writer = Writer(source)
        writer.start()
        while len(writer.acknowledged) < 20:
            time.sleep(0.01)
        before = set(writer.acknowledged)
        backup_file = tmp_path / "backups" / "index.sqlite"
        backup_file.parent.mkdir()
        code, report = run_json(capsys, "backup", str(backup_file), "--config", str(source_config))
        after = set(writer.acknowledged)
        time.sleep(0.2)
        writer.stop.set()
        writer.join(30)
        assert writer.failure is None, writer.failure
        assert code == 0, report
        assert report["kind"] == "sqlite"
        assert report["revision"] == migrate.SCHEMA_REVISION
        assert len(after) > len(before), "the writer kept storing during the backup"

        # the blobs after the index (rsync of an immutable folder)
        target_config = appliance(tmp_path / "target", migrated=False)
        shutil.copytree(tmp_path / "source" / "blobs", tmp_path / "target" / "blobs")
        code, restored = run_json(
            capsys, "restore", str(backup_file), "--config", str(target_config)
        )
        assert code == 0, restored
        assert restored["needs_migrate"] is False
        assert restored["replaced"] is False

        uids = _sop_uids(tmp_path / "target" / "index.db")
        assert before <= uids, "everything acknowledged before the backup is in it"
        assert uids <= initial | after, "nothing acknowledged after it ended"
        assert restored["instances"] == len(uids) == report["instances"]
        target = services_of(target_config)
        try:
            listed = study_list(target)
            # one consistent moment: every study's counters equal its rows
            for uid, _, count in listed:
                with target.engine.connect() as conn:
                    rows = conn.execute(
                        select(func.count())
                        .select_from(instance.join(study, study.c.id == instance.c.study_fk))
                        .where(study.c.study_instance_uid == uid)
                    ).scalar_one()
                assert rows == count, uid
            some = next(iter(before))
            stored = target.index.find_instance(some)
            assert stored is not None
            with target.retrieve.open(stored) as fh:
                assert dcmread(fh).SOPInstanceUID == some
        finally:
            target.close()

        # quiet now: a backup restored elsewhere answers the same study list
        again = tmp_path / "backups" / "quiet.sqlite"
        assert run(capsys, "backup", str(again), "--config", str(source_config))[0] == 0
        fresh_config = appliance(tmp_path / "fresh", migrated=False)
        code, out, _ = run(capsys, "restore", str(again), "--config", str(fresh_config))
        assert code == 0
        assert "index restored from" in out
        fresh = services_of(fresh_config)
        try:
            assert study_list(fresh) == study_list(source)
        finally:
            fresh.close()
    finally:
        source.close()

    # over an index that holds data: refused, unless --force
    code, _, err = run(capsys, "restore", str(backup_file), "--config", str(fresh_config))
    assert code == 1
    assert "not empty" in err
    assert "--force" in err
    code, forced = run_json(
        capsys, "restore", str(backup_file), "--config", str(fresh_config), "--force"
    )
    assert code == 0
    assert forced["replaced"] is True
    assert _sop_uids(tmp_path / "fresh" / "index.db") == uids
    # an existing backup file is not overwritten unless --force
    code, _, err = run(capsys, "backup", str(backup_file), "--config", str(source_config))
    assert code == 1
    assert "exists" in err


def test_restore_checks_the_backups_schema_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_config = appliance(tmp_path / "old", migrated=False)
    engine = create_index_engine(f"sqlite:///{tmp_path / 'old' / 'index.db'}")
    migrate.upgrade(engine, "0007")
    engine.dispose()
    old_backup = tmp_path / "old.sqlite"
    code, report = run_json(capsys, "backup", str(old_backup), "--config", str(old_config))
    assert code == 0
    assert report["revision"] == "0007"

    # older: restored, and the user is told to migrate
    target_config = appliance(tmp_path / "target", migrated=False)
    code, out, _ = run(capsys, "restore", str(old_backup), "--config", str(target_config))
    assert code == 0
    assert "run 'dicom-appliance migrate'" in out
    code, _, err = run(capsys, "stats", "--config", str(target_config))
    assert code == 2
    assert "dicom-appliance migrate" in err
    assert run(capsys, "migrate", "--config", str(target_config))[0] == 0
    assert run(capsys, "stats", "--config", str(target_config))[0] == 0

    # newer than this version: refused
    newer = tmp_path / "newer.sqlite"
    shutil.copy(old_backup, newer)
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", ("9999",))
    fresh_config = appliance(tmp_path / "fresh", migrated=False)
    code, _, err = run(capsys, "restore", str(newer), "--config", str(fresh_config))
    assert code == 1
    assert "revision 9999" in err
    assert len(err.strip().splitlines()) == 1
    # not a backup at all
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run(
        capsys, "restore", str(tmp_path / "notes.txt"), "--config", str(fresh_config)
    )
    assert code == 1
    assert "not an SQLite database" in err


# --------------------------------------------------------------------------
# backup and restore: PostgreSQL


@pytest.fixture
def pg_tools() -> None:
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        missing_peer("pg_dump/pg_restore are not installed (apt-get install postgresql-client)")


@pytest.fixture
def two_databases() -> Iterator[tuple[str, str]]:
    with (
        throwaway_pg_database("appliance_backup_src") as source,
        throwaway_pg_database("appliance_backup_dst") as target,
    ):
        yield source, target


def _with_password(url: str, password: str) -> str:
    """*url* with a password (the local server trusts loopback and ignores it)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


@pytest.mark.interop
def test_postgresql_backup_and_restore_with_pg_dump(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pg_tools: None,
    two_databases: tuple[str, str],
) -> None:
    source_url, target_url = (_with_password(u, "s3cret-pw") for u in two_databases)
    source_config = appliance(tmp_path / "source", index_url=source_url)
    source = services_of(source_config)
    try:
        for number in range(3):
            for ds in small_study(4, patient_id=f"P{number}"):
                assert source.ingest.store_part10(_bytes_io(part10_of(ds)), Origin("import")).stored
        listed = study_list(source)
    finally:
        source.close()
    dump = tmp_path / "index.dump"
    code, out, err = run(capsys, "backup", str(dump), "--config", str(source_config), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "postgresql"
    assert report["revision"] == migrate.SCHEMA_REVISION
    assert dump.read_bytes()[:5] == b"PGDMP"
    assert "s3cret-pw" not in out + err

    target_config = appliance(tmp_path / "target", index_url=target_url, migrated=False)
    code, restored = run_json(capsys, "restore", str(dump), "--config", str(target_config))
    assert code == 0, restored
    assert restored["instances"] == 12
    assert restored["studies"] == 3
    target = services_of(target_config)
    try:
        assert study_list(target) == listed
    finally:
        target.close()

    code, _, err = run(capsys, "restore", str(dump), "--config", str(target_config))
    assert code == 1
    assert "not empty" in err
    code, forced = run_json(capsys, "restore", str(dump), "--config", str(target_config), "--force")
    assert code == 0
    assert forced["replaced"] is True
    assert forced["instances"] == 12
    # an SQLite file is not a dump
    sqlite_file = tmp_path / "x.sqlite"
    sqlite3.connect(sqlite_file).execute("CREATE TABLE t (x)").connection.commit()
    code, _, err = run(
        capsys, "restore", str(sqlite_file), "--config", str(target_config), "--force"
    )
    assert code == 1
    assert "SQLite" in err


def test_postgresql_without_the_tools_prints_the_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = appliance(
        tmp_path / "a",
        index_url="postgresql+psycopg://edge:s3cret-pw@db.example:5433/dicom?sslmode=require",
        migrated=False,
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = run(capsys, "backup", str(tmp_path / "b.dump"), "--config", str(config))
    assert code == 1
    assert "pg_dump is not installed" in err
    assert len(err.strip().splitlines()) == 1
    assert out.strip() == (
        "PGPASSWORD='<the password of index.url>' pg_dump --format=custom --no-password "
        f"--file={tmp_path / 'b.dump'} "
        "'--dbname=postgresql://edge@db.example:5433/dicom?sslmode=require'"
    )
    assert "s3cret-pw" not in out + err
    # nor on the command lines the tools run with (they are in ps)
    url = load_config(config, environ={}).index.url
    for argv in (dump_command(url, tmp_path / "b"), restore_command(url, tmp_path / "b")):
        assert "s3cret-pw" not in " ".join(argv)
    assert libpq(url) == (
        "postgresql://edge@db.example:5433/dicom?sslmode=require",
        {"PGPASSWORD": "s3cret-pw"},
    )
