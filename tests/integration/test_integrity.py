"""``dicom-appliance verify``, ``sweep`` and ``reindex`` on real data
folders: pydicom's bundled test files and generated studies stored through
the ingest, on SQLite and PostgreSQL (and one Azure container), then
damaged on purpose, checked, repaired, lost and rebuilt."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from appliance.cli import main
from appliance.config import Config, load_config
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.schema import forward_entry
from appliance.ingest.sweep import claimed_sweep, sweep_orphans
from appliance.integrity import IndexNotEmpty, SweepBusy, reindex, verify
from appliance.model import Origin
from appliance.services import Services, build_services
from appliance.status import Status
from tests.conftest import make_config, started_server, throwaway_pg_database
from tests.helpers import part10_of, small_study
from tests.peers import Azurite

pytestmark = pytest.mark.integration

ORIGIN = Origin("dicomweb", remote="127.0.0.1")
CORPUS = sorted((Path(pydicom.__file__).parent / "data").rglob("*.dcm"))
HOUR = dt.timedelta(hours=1)


# ------------------------------------------------------------------ helpers


def fill(services: Services, *, corpus: bool = True) -> list[str]:
    """Store pydicom's corpus (the files the ingest takes; a SOP Instance UID
    the corpus reuses is kept once, policy "keep") and two generated studies
    through the ingest; the SOP Instance UIDs stored."""
    stored = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in CORPUS if corpus else []:
            with path.open("rb") as fh:
                result = services.ingest.store_part10(fh, ORIGIN)
            if result.status is Status.SUCCESS:
                stored.append(result.sop_instance_uid)
    for ds in small_study(4, "INTEGRITY-1") + small_study(3, "INTEGRITY-2"):
        result = services.ingest.store_part10(io.BytesIO(part10_of(ds)), ORIGIN)
        assert result.status is Status.SUCCESS, result.reason
        stored.append(result.sop_instance_uid)
    if corpus:
        assert len(stored) > 50
    return stored


def blob_path(config: Config, key: str) -> Path:
    return config.storage.path / key[:2] / key[2:4] / key


def blob_files(config: Config) -> list[Path]:
    return [p for p in config.storage.path.rglob("*") if p.is_file()]


def age(config: Config, key: str, by: dt.timedelta = 2 * HOUR) -> None:
    """Make a blob look written *by* ago."""
    then = time.time() - by.total_seconds()
    os.utime(blob_path(config, key), (then, then))


def put(services: Services, data: bytes) -> str:
    return services.storage.put(io.BytesIO(data)).key


def identity(services: Services, sop_uid: str) -> dict[str, Any]:
    stored = services.index.find_instance(sop_uid)
    assert stored is not None
    return {
        "sop_instance_uid": stored.sop_instance_uid,
        "series_instance_uid": stored.series_instance_uid,
        "study_instance_uid": stored.study_instance_uid,
        "blob_key": stored.blob_key,
    }


@contextlib.contextmanager
def appliance_on(config: Config) -> Iterator[Services]:
    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    services = build_services(config)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def config(tmp_path: Path, index_url: str) -> Config:
    """An appliance on the data folder tmp_path/blobs, its index on SQLite
    and on PostgreSQL, forwarding to one destination (never started, so its
    outbox shows what was queued)."""
    return make_config(
        tmp_path,
        APPLIANCE_INDEX_URL=index_url,
        APPLIANCE_FORWARD='[{name = "cloud", url = "http://127.0.0.1:9/v1"}]',
    )


@pytest.fixture
def services(config: Config) -> Iterator[Services]:
    with appliance_on(config) as built:
        yield built


# ------------------------------------------------------------------- verify


def test_verify_on_a_clean_store(config: Config, services: Services) -> None:
    stored = fill(services)
    for deep in (False, True):
        report = verify(services, deep=deep)
        assert report.clean, report.as_json()
        assert report.instances == report.blobs == len(stored) == len(blob_files(config))
        assert report.recent_unindexed == 0
        assert report.notes == []
        assert report.as_json()["problems_remaining"] == 0


def test_verify_finds_an_orphan_and_a_missing_blob_and_repairs_what_it_is_told(
    config: Config, services: Services
) -> None:
    stored = fill(services)
    # a row whose blob is gone
    victim = identity(services, stored[3])
    blob_path(config, victim["blob_key"]).unlink()
    # a blob a crash left without its row, two hours ago, and one being
    # written now by an ingest in flight
    orphan = put(services, part10_of(small_study(1)[0]))
    age(config, orphan)
    in_flight = put(services, part10_of(small_study(1)[0]))
    files = len(blob_files(config))

    report = verify(services)
    assert not report.clean
    assert report.remaining == 2
    assert (report.missing_blob.count, report.missing_blob.examples) == (1, [victim])
    assert report.orphan_blob.count == 1
    assert report.orphan_blob.examples[0]["blob_key"] == orphan
    assert report.recent_unindexed == 1
    assert (report.instances, report.blobs) == (len(stored), len(stored) + 1)
    assert len(blob_files(config)) == files  # looking changes nothing

    report = verify(services, repair=True)
    assert (report.orphan_blob.count, report.orphans_removed) == (1, 1)
    assert not services.storage.exists(orphan)
    assert services.storage.exists(in_flight)  # younger than the grace period
    # the row whose blob is missing is reported, not deleted
    assert (report.missing_blob.count, report.rows_dropped, report.remaining) == (1, 0, 1)
    assert services.index.find_instance(victim["sop_instance_uid"]) is not None

    report = verify(services, repair=True, drop_missing=True)
    assert (report.missing_blob.count, report.rows_dropped) == (1, 1)
    assert report.clean
    assert services.index.find_instance(victim["sop_instance_uid"]) is None
    # deleted as a DELETE deletes: the change feed and the forwarding outbox
    assert services.index.last_action(victim["sop_instance_uid"]) == "delete"
    with services.engine.connect() as conn:
        actions = conn.execute(
            select(forward_entry.c.action).where(
                forward_entry.c.sop_instance_uid == victim["sop_instance_uid"],
                forward_entry.c.destination == "cloud",
            )
        ).scalars()
        assert sorted(actions) == ["delete", "store"]

    report = verify(services, deep=True)
    assert report.clean, report.as_json()
    assert report.instances == len(stored) - 1
    assert report.recent_unindexed == 1


def test_drop_missing_drops_nothing_when_the_store_lists_no_blob(
    config: Config, services: Services
) -> None:
    """A storage setting pointing at an empty folder or bucket makes every
    row look blobless: that is no reason to empty the index."""
    stored = fill(services, corpus=False)
    shutil.rmtree(config.storage.path)
    config.storage.path.mkdir()
    report = verify(services, repair=True, drop_missing=True)
    assert (report.missing_blob.count, report.rows_dropped) == (len(stored), 0)
    assert any("storage configured" in note for note in report.notes)
    assert services.index.count_instances() == len(stored)


def test_deep_verify_reads_each_header(tmp_path: Path) -> None:
    """Two blobs that swapped contents (same sizes) and one overwritten with
    junk of its size: only the header read sees them."""
    config = make_config(tmp_path)
    with appliance_on(config) as services:
        stored = fill(services, corpus=False)
        a, b, c = (identity(services, uid)["blob_key"] for uid in stored[:3])
        first, second = blob_path(config, a).read_bytes(), blob_path(config, b).read_bytes()
        assert len(first) == len(second)
        blob_path(config, a).write_bytes(second)
        blob_path(config, b).write_bytes(first)
        size = blob_path(config, c).stat().st_size
        blob_path(config, c).write_bytes(b"\0" * size)

        assert verify(services).clean
        report = verify(services, deep=True)
        assert report.remaining == 3
        assert report.size_differs.count == 0
        assert report.other_instance.count == 2
        swapped = {
            e["blob_key"]: e["blob_holds"]["sop_instance_uid"]
            for e in report.other_instance.examples
        }
        assert swapped == {a: stored[1], b: stored[0]}
        assert [e["blob_key"] for e in report.unreadable.examples] == [c]


def test_verify_sees_a_size_that_differs(config: Config, services: Services) -> None:
    stored = fill(services, corpus=False)
    key = identity(services, stored[0])["blob_key"]
    with blob_path(config, key).open("ab") as fh:
        fh.write(b"\0\0")
    report = verify(services)
    assert report.size_differs.count == 1
    example = report.size_differs.examples[0]
    assert example["blob_size"] == example["index_size"] + 2
    assert not report.clean


# -------------------------------------------------------------------- sweep


def test_sweep_removes_old_orphans_only_and_one_node_at_a_time(
    config: Config, services: Services
) -> None:
    stored = fill(services, corpus=False)
    orphan = put(services, b"left by a crash before the index commit")
    age(config, orphan)
    in_flight = put(services, b"an ingest in flight")
    with claimed_sweep(services.index, "node-a:1") as lease:
        assert lease is not None
        with claimed_sweep(services.index, "node-b:2") as other:
            assert other is None
        report = sweep_orphans(services.storage, services.index, lease=lease)
    # only the blobs older than the grace period are looked at
    assert (report.checked, report.removed, report.ok) == (1, 1, True)
    assert len(stored) == 7
    assert not services.storage.exists(orphan)
    assert services.storage.exists(in_flight)
    assert verify(services).clean
    with claimed_sweep(services.index, "node-b:2") as lease:  # released
        assert lease is not None


def test_no_sweep_removes_the_blobs_of_a_lost_index(tmp_path: Path) -> None:
    """The index is lost and made again (migrate): every blob looks like an
    orphan.  Neither ``sweep`` nor ``serve``'s sweep at start nor ``verify
    --repair`` removes one; they say to reindex."""
    from appliance.server import _sweep

    config = make_config(tmp_path)
    with appliance_on(config) as services:
        stored = fill(services, corpus=False)
        for key in (identity(services, uid)["blob_key"] for uid in stored):
            age(config, key)
    for path in tmp_path.glob("index.db*"):
        path.unlink()
    with appliance_on(config) as services:
        report = sweep_orphans(services.storage, services.index)
        assert report.removed == 0
        assert "reindex" in report.refused
        assert not report.ok
        _sweep(services)
        found = verify(services, repair=True)
        assert (found.orphan_blob.count, found.orphans_removed) == (len(stored), 0)
        assert any("reindex" in note for note in found.notes)
        assert len(blob_files(config)) == len(stored)
        # an index whose instances were all deleted is no lost index: its
        # orphans (blobs whose delete failed) go
        assert reindex(services).indexed == len(stored)
        for uid in stored:
            record = identity(services, uid)
            services.index.delete(record["study_instance_uid"], record["series_instance_uid"], uid)
        assert sweep_orphans(services.storage, services.index).removed == len(stored)
        assert blob_files(config) == []


# ------------------------------------------------------------------ reindex


def qido_answers(server_url: str) -> dict[str, list[Any]]:
    """Every study, series and instance as QIDO-RS answers with
    includefield=all, each list sorted."""

    def ordered(items: list[Any]) -> list[Any]:
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))

    answers: dict[str, list[Any]] = {}
    with httpx.Client(base_url=f"{server_url}/v1", timeout=120) as http:

        def get(path: str) -> list[Any]:
            response = http.get(path, params={"includefield": "all"})
            assert response.status_code == 200, (path, response.text)
            found: list[Any] = response.json()
            return found

        studies = get("/studies")
        answers["studies"] = ordered(studies)
        for study in studies:
            study_uid = study["0020000D"]["Value"][0]
            series = get(f"/studies/{study_uid}/series")
            answers[study_uid] = ordered(series)
            for one in series:
                series_uid = one["0020000E"]["Value"][0]
                path = f"/studies/{study_uid}/series/{series_uid}/instances"
                answers[f"{study_uid}/{series_uid}"] = ordered(get(path))
    return answers


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reindex_after_the_index_was_lost_answers_qido_as_before(
    tmp_path: Path, backend: str
) -> None:
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            first = second = f"sqlite:///{tmp_path / 'index.db'}"
        else:  # the database is lost; a new, empty one is made
            first = stack.enter_context(throwaway_pg_database("appliance_lost"))
            second = stack.enter_context(throwaway_pg_database("appliance_rebuilt"))
        public = {"APPLIANCE_HTTP_PUBLIC_URL": "http://pacs.example/dicom"}
        config = make_config(tmp_path, APPLIANCE_INDEX_URL=first, **public)
        for server in started_server(config):
            stored = fill(server.services)
            before = qido_answers(server.base_url)
            written = {uid: server.services.index.find_instance(uid) for uid in stored}
        assert len(before["studies"]) > 20

        if backend == "sqlite":
            for path in tmp_path.glob("index.db*"):
                path.unlink()
        config = make_config(tmp_path, APPLIANCE_INDEX_URL=second, **public)
        files = sorted(p.stat().st_mtime_ns for p in blob_files(config))
        with appliance_on(config) as services:  # migrated, empty
            report = reindex(services)
            assert report.ok, report.as_json()
            assert (report.blobs, report.indexed) == (len(stored), len(stored))
            assert report.duplicates.count == 0
            for uid, old in written.items():
                new = services.index.find_instance(uid)
                assert new is not None
                assert old is not None
                assert (new.blob_key, new.size) == (old.blob_key, old.size)
                assert new.updated_at is not None
                assert old.updated_at is not None
                # the row keeps the time its blob was written
                gap = _aware(new.updated_at) - _aware(old.updated_at)
                assert abs(gap.total_seconds()) < 1
            # nothing was forwarded again, nothing was written to the store
            with services.engine.connect() as conn:
                assert conn.execute(select(forward_entry.c.id)).first() is None
        assert sorted(p.stat().st_mtime_ns for p in blob_files(config)) == files

        for server in started_server(config):
            after = qido_answers(server.base_url)
            assert verify(server.services, deep=True).clean
        assert after == before


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def test_reindex_refuses_a_non_empty_index_and_force_adds_only_what_is_missing(
    config: Config, services: Services
) -> None:
    stored = fill(services, corpus=False)
    with pytest.raises(IndexNotEmpty):
        reindex(services)
    # an instance whose blob was written but never indexed
    extra = small_study(1)[0]
    extra_key = put(services, part10_of(extra))
    # an instance deleted here whose blob was left behind (a failed delete)
    deleted = identity(services, stored[0])
    services.index.delete(deleted["study_instance_uid"], deleted["series_instance_uid"], stored[0])
    # a second copy of an indexed instance, and a blob that is no DICOM file
    kept = identity(services, stored[1])
    with services.storage.open(kept["blob_key"]) as fh:
        copy_key = put(services, fh.read())
    junk = put(services, b"not a DICOM file")

    report = reindex(services, force=True)
    assert report.blobs == len(stored) + 3
    assert report.already_indexed == len(stored) - 1
    assert report.indexed == 1
    assert services.index.find_instance(str(extra.SOPInstanceUID)) is not None
    assert report.deleted_here.examples == [
        {"blob_key": deleted["blob_key"], "sop_instance_uid": stored[0]}
    ]
    assert services.index.find_instance(stored[0]) is None
    assert report.duplicates.examples == [
        {
            "sop_instance_uid": stored[1],
            "indexed_blob_key": kept["blob_key"],
            "other_blob_key": copy_key,
        }
    ]
    assert [e["blob_key"] for e in report.unreadable.examples] == [junk]
    assert not report.ok
    # reindex never deletes: the unreadable blob and the leftovers stay
    for key in (junk, copy_key, deleted["blob_key"], extra_key):
        assert services.storage.exists(key)


@pytest.mark.parametrize("newer_first", [False, True])
@pytest.mark.parametrize(("policy", "winner"), [("keep", "older"), ("replace", "newer")])
def test_reindex_settles_two_copies_of_an_instance_by_the_duplicate_policy(
    tmp_path: Path, policy: str, winner: str, newer_first: bool
) -> None:
    """Two blobs of one SOP Instance UID with other contents; the walk meets
    the older first (same hour) or the newer first (an earlier key)."""
    config = make_config(tmp_path, APPLIANCE_INGEST_DUPLICATE_POLICY=policy)
    ds = small_study(1)[0]
    older_bytes = part10_of(ds)
    ds.SeriesDescription = "the copy stored again"
    with appliance_on(config) as services:
        older = put(services, older_bytes)
        if newer_first:  # a key of an earlier hour folder, written later
            newer = "0000" + uuid.uuid4().hex[4:]
            blob_path(config, newer).parent.mkdir(parents=True, exist_ok=True)
            blob_path(config, newer).write_bytes(part10_of(ds))
        else:
            newer = put(services, part10_of(ds))
        age(config, older, 2 * HOUR)
        age(config, newer, HOUR)
        report = reindex(services)
        expected = older if winner == "older" else newer
        found = services.index.find_instance(str(ds.SOPInstanceUID))
        assert found is not None
        assert found.blob_key == expected
        assert report.indexed + report.duplicates.count == 2
        assert report.duplicates.count == 1
        assert report.duplicates.examples[0]["indexed_blob_key"] == expected
        assert report.ok
        assert verify(services).orphan_blob.examples[0]["blob_key"] != expected


def test_reindex_on_postgresql_and_azure_reads_only_headers(
    tmp_path: Path, azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object store's blobs are read by ranges (their streams cannot
    seek), as far as the header goes: an 8 MiB instance costs well under
    its size; pydicom's deflated file (read whole, as pydicom must) too."""
    names = ("CT_small.dcm", "MR_small.dcm", "image_dfl.dcm", "examples_overlay.dcm")
    large = small_study(1, "INTEGRITY-LARGE", size=2048)[0]
    environ = {
        "APPLIANCE_STORAGE_BACKEND": "azure",
        "APPLIANCE_STORAGE_CONTAINER": f"reindex-{uuid.uuid4().hex}",
        "APPLIANCE_STORAGE_CONNECTION_STRING": azurite.connection_string,
    }
    with (
        throwaway_pg_database("appliance_azure_lost") as first,
        throwaway_pg_database("appliance_azure_rebuilt") as second,
    ):
        config = make_config(tmp_path, APPLIANCE_INDEX_URL=first, **environ)
        with appliance_on(config) as services:
            sources = [Path(get_testdata_file(name)).read_bytes() for name in names]  # type: ignore[arg-type]
            stored = []
            for data in [*sources, part10_of(large)]:
                result = services.ingest.store_part10(io.BytesIO(data), ORIGIN)
                assert result.status is Status.SUCCESS, result.reason
                stored.append(services.index.find_instance(result.sop_instance_uid))
        config = make_config(tmp_path, APPLIANCE_INDEX_URL=second, **environ)
        with appliance_on(config) as services:
            read: dict[str, int] = {}
            monkeypatch.setattr(services.storage, "open_range", _counting(services.storage, read))
            report = reindex(services)
            assert report.ok, report.as_json()
            assert report.indexed == len(stored)
            for old in stored:
                assert old is not None
                new = services.index.find_instance(old.sop_instance_uid)
                assert new is not None
                assert (new.blob_key, new.size, new.transfer_syntax_uid) == (
                    old.blob_key,
                    old.size,
                    old.transfer_syntax_uid,
                )
            big = stored[-1]
            assert big is not None
            assert big.size > 8 * 2**20
            assert read[big.blob_key] < 2**20
            assert verify(services, deep=True).clean


def _counting(storage: Any, read: dict[str, int]) -> Any:
    """*storage*'s ``open_range``, counting the bytes read per key."""
    original = storage.open_range

    class Counted:
        def __init__(self, stream: Any, key: str) -> None:
            self.stream, self.key = stream, key

        def read(self, size: int = -1) -> bytes:
            data: bytes = self.stream.read(size)
            read[self.key] = read.get(self.key, 0) + len(data)
            return data

        def close(self) -> None:
            self.stream.close()

    def open_range(key: str, offset: int, length: int | None = None) -> Any:
        return Counted(original(key, offset, length), key)

    return open_range


# ---------------------------------------------------------------------- CLI


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_commands_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "appliance.toml"
    config_file.write_text(
        f'[storage]\npath = "{tmp_path / "blobs"}"\n'
        f'[index]\nurl = "sqlite:///{tmp_path / "index.db"}"\n'
    )
    config = load_config(config_file, environ={})

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--config", str(config_file)])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    def run_json(*args: str) -> tuple[int, dict[str, Any]]:
        code, out, err = run(*args, "--json")
        assert "it/s" not in err  # no progress bar: stderr is not a terminal
        return code, json.loads(out)

    assert run("migrate")[0] == 0
    with appliance_on(config) as services:
        stored = fill(services, corpus=False)
        victim = identity(services, stored[2])
        orphan = put(services, b"an orphan")
    capsys.readouterr()

    code, found = run_json("verify")
    assert code == 0
    assert found["clean"] is True
    assert (found["instances"], found["blobs"]) == (len(stored), len(stored) + 1)
    assert found["recent_blobs_without_row"] == 1
    code, out, _ = run("verify")
    assert (code, out.splitlines()[-1]) == (0, "clean")

    blob_path(config, victim["blob_key"]).unlink()
    code, found = run_json("verify", "--grace", "0")
    assert code == 1
    assert found["rows_without_blob"] == {"count": 1, "examples": [victim]}
    assert found["blobs_without_row"]["count"] == 1
    assert found["problems_remaining"] == 2
    code, out, _ = run("verify", "--grace", "0")
    assert code == 1
    assert "2 problem(s) remain" in out.splitlines()[-1]
    assert "--drop-missing" in out

    code, found = run_json("verify", "--repair", "--grace", "0")
    assert (code, found["orphans_removed"], found["problems_remaining"]) == (1, 1, 1)
    assert not config.storage.path.joinpath(orphan[:2], orphan[2:4], orphan).exists()
    code, _, err = run("verify", "--drop-missing")
    assert code == 2
    assert err.strip() == "dicom-appliance: error: --drop-missing needs --repair"
    code, out, err = run("verify", "--repair", "--drop-missing", "--json")
    found = json.loads(out)
    assert (code, found["rows_dropped"], found["clean"]) == (0, 1, True)
    # the log (stderr) names what was dropped, by UIDs and blob key only
    assert victim["sop_instance_uid"] in err
    assert victim["blob_key"] in err
    assert "Nodes^Test" not in err + out
    assert run("verify")[0] == 0

    # sweep: one node at a time
    with appliance_on(config) as services:
        orphan = put(services, b"another orphan")
        age(config, orphan)
        assert services.index.claim("orphan-sweep", "other-node:7", HOUR)
        code, _, err = run("sweep")
        assert code == 1
        assert len(err.strip().splitlines()) == 1
        assert "other-node:7" in err
        assert services.storage.exists(orphan)
        services.index.release("orphan-sweep", "other-node:7")
        code, swept = run_json("sweep")
        assert (code, swept["removed"], swept["ok"]) == (0, 1, True)
        assert not services.storage.exists(orphan)

    # reindex: refused on a non-empty index, then the index is lost
    code, _, err = run("reindex")
    assert code == 1
    assert "the index is not empty" in err
    for path in tmp_path.glob("index.db*"):
        path.unlink()
    code, _, err = run("reindex")
    assert code == 2
    assert "migrate" in err
    assert run("migrate")[0] == 0
    code, rebuilt = run_json("reindex")
    assert code == 0
    assert (rebuilt["ok"], rebuilt["indexed"]) == (True, len(stored) - 1)
    code, found = run_json("verify", "--deep")
    assert (code, found["instances"]) == (0, len(stored) - 1)

    # the progress bar: on a terminal only, and not with --quiet
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["verify", "--config", str(config_file)]) == 0
    assert "verify" in terminal.getvalue()
    assert f"{len(stored) - 1}/{len(stored) - 1}" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main(["verify", "--quiet", "--config", str(config_file)]) == 0
    assert quiet.getvalue() == ""


def test_reindex_does_not_run_beside_a_sweep(config: Config, services: Services) -> None:
    """reindex holds the sweep's claim for its whole run, and will not start
    while another holder sweeps."""
    fill(services, corpus=False)
    with claimed_sweep(services.index, "node-a:1"), pytest.raises(SweepBusy):
        reindex(services, force=True)
