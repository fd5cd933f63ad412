"""The WADO-RS metadata cache: filled on the first metadata request, served
without reading blobs afterwards, never stale (replaced and deleted
instances), independent of the service root, byte for byte what building
the metadata gives, and never a reason for a request to fail."""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx
import pydicom
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, func, inspect, select, text

from appliance.errors import UnreadableInstance
from appliance.index import migrate
from appliance.index.engine import WRITE, create_index_engine
from appliance.index.metadata_cache import MetadataCache
from appliance.index.schema import instance, metadata, metadata_cache
from appliance.index.sql import StoredInstance
from appliance.model import Origin
from appliance.status import Status
from dicomweb.metadata import CACHE_VERSION, instance_metadata, serialise
from dicomweb.views import wado
from tests.conftest import LiveServer, make_config, started_server

pytestmark = [
    pytest.mark.integration,
    # pydicom's words on its corpus' deliberately broken files
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning"),
]

DICOM_JSON = {"Accept": "application/dicom+json"}
DATA = Path(pydicom.__file__).parent / "data"


# ------------------------------------------------------------------ helpers


def make_instance(study: str, series: str, sop: str | None = None, comment: str = "") -> bytes:
    """A small image whose metadata has what the cache must keep exactly:
    bulk data at the top level and inside a sequence, inline binary, and
    text that JSON escapes (quotes, backslash, a control character,
    non-ASCII)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 1
    ds.PatientName = "Müller^Zoë"
    ds.ImageComments = comment or 'a "quoted" \\ back\tslash'
    item = Dataset()
    item.add_new(0x00091010, "LO", "private creator")
    item.add_new(0x00091011, "OB", bytes(range(256)) * 8)  # 2 KiB: a BulkDataURI
    ds.add_new(0x00091010, "LO", "private creator")
    ds.add_new(0x00091020, "SQ", [item])
    ds.add_new(0x00091030, "OB", b"\x01\x02\x03\x04")  # InlineBinary
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ingest(server: LiveServer, data: bytes) -> Status:
    return server.services.ingest.store_part10(io.BytesIO(data), Origin("import")).status


def store_study(server: LiveServer, count: int = 3) -> tuple[str, str, list[str]]:
    """A study of *count* instances in one series: its UIDs."""
    study, series = generate_uid(), generate_uid()
    sops = []
    for _ in range(count):
        sop = generate_uid()
        assert ingest(server, make_instance(study, series, sop)) is Status.SUCCESS
        sops.append(sop)
    return study, series, sops


class OpenCounter:
    """Counts the blobs the server opens (wraps its RetrieveService.open)."""

    def __init__(self, server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        retrieve = server.services.retrieve
        original: Callable[[StoredInstance], IO[bytes]] = retrieve.open

        def counting(stored: StoredInstance) -> IO[bytes]:
            self.count += 1
            return original(stored)

        monkeypatch.setattr(retrieve, "open", counting)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class Writes:
    """The server's cache writes as they finish (they run once a response
    is closed, after the client has it): ``next()`` waits for one and gives
    the number of transactions it committed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._done: queue.Queue[int] = queue.Queue()
        store = MetadataCache.store

        def recording(cache: MetadataCache, new: Mapping[str, bytes], version: int) -> int:
            committed = -1
            try:
                committed = store(cache, new, version)
            finally:
                self._done.put(committed)
            return committed

        monkeypatch.setattr(MetadataCache, "store", recording)

    def next(self) -> int:
        return self._done.get(timeout=60)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    return Writes(monkeypatch)


def entries(engine: Engine) -> dict[str, bytes]:
    """The cache's rows: JSON by blob key."""
    with engine.connect() as conn:
        rows = conn.execute(select(metadata_cache.c.blob_key, metadata_cache.c.json))
        return {key: bytes(data) for key, data in rows}


def stored_instances(server: LiveServer, study: str) -> list[StoredInstance]:
    return server.services.retrieve.instances(study)


def expected_body(server: LiveServer, root: str, instances: list[StoredInstance]) -> bytes:
    """The metadata array as building it from the blobs gives it."""
    objects = [serialise(instance_metadata(server.services.retrieve, root, s)) for s in instances]
    return b"[" + b",".join(objects) + b"]"


def get_metadata(url: str) -> httpx.Response:
    r = httpx.get(f"{url}/metadata", headers=DICOM_JSON)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    return r


@pytest.fixture
def server(tmp_path: Path, index_url: str) -> Iterator[LiveServer]:
    """A live server on the SQLite, then the PostgreSQL index."""
    yield from started_server(make_config(tmp_path, APPLIANCE_INDEX_URL=index_url))


# --------------------------------------------------------------- the cache


def test_filled_on_the_first_request_and_served_from_it_after(
    server: LiveServer, writes: Writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = OpenCounter(server, monkeypatch)
    study, series, sops = store_study(server)
    root = server.root
    url = f"{root}/studies/{study}"
    instances = stored_instances(server, study)
    expected = expected_body(server, root, instances)
    opened.take()

    first = get_metadata(url)
    assert first.content == expected
    assert opened.take() == 3
    assert writes.next() == 1
    assert set(entries(server.services.engine)) == {s.blob_key for s in instances}

    second = get_metadata(url)
    assert second.content == expected
    assert opened.take() == 0, "the second request read no blob"
    assert second.headers["etag"] == first.headers["etag"]
    assert second.headers["last-modified"] == first.headers["last-modified"]
    uri = second.json()[0]["7FE00010"]["BulkDataURI"]
    assert uri == f"{url}/series/{series}/instances/{sops[0]}/bulk/7FE00010"

    # the series and instance levels are served from the same entries
    expected_one = expected_body(server, root, instances[1:2])
    opened.take()
    series_body = get_metadata(f"{url}/series/{series}").content
    assert series_body == expected
    one = get_metadata(f"{url}/series/{series}/instances/{sops[1]}").content
    assert one == expected_one
    assert opened.take() == 0

    # conditional requests are as before: 304 without building anything
    r = httpx.get(f"{url}/metadata", headers=DICOM_JSON | {"If-None-Match": second.headers["etag"]})
    assert r.status_code == 304
    assert r.content == b""


def test_a_large_study_reads_and_writes_its_entries_a_batch_at_a_time(
    tmp_path: Path, writes: Writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads by windows of instances, writes every few new entries while
    the body is sent (so neither a read nor a write grows with the study)."""
    monkeypatch.setattr(wado, "_METADATA_WINDOW", 2)
    monkeypatch.setattr(wado, "WRITE_BATCH", 2)
    loads: list[int] = []
    load = MetadataCache.load

    def counting(cache: MetadataCache, keys: list[str], version: int) -> dict[str, bytes]:
        loads.append(len(keys))
        return load(cache, keys, version)

    for server in started_server(make_config(tmp_path)):
        study, _, _ = store_study(server, 5)
        url = f"{server.root}/studies/{study}"
        expected = expected_body(server, server.root, stored_instances(server, study))
        monkeypatch.setattr(MetadataCache, "load", counting)
        opened = OpenCounter(server, monkeypatch)
        assert get_metadata(url).content == expected
        assert opened.take() == 5
        assert [writes.next() for _ in range(3)] == [1, 1, 1]  # 2 + 2 + 1 entries
        assert len(entries(server.services.engine)) == 5
        assert get_metadata(url).content == expected
        assert opened.take() == 0
        assert loads == [2, 2, 1] * 2


def test_a_replaced_instance_never_serves_its_old_metadata(
    tmp_path: Path, index_url: str, writes: Writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(
        tmp_path, APPLIANCE_INDEX_URL=index_url, APPLIANCE_INGEST_DUPLICATE_POLICY="replace"
    )
    for server in started_server(config):
        engine = server.services.engine
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        url = f"{server.root}/studies/{study}"
        assert ingest(server, make_instance(study, series, sop, "first")) is Status.SUCCESS
        assert get_metadata(url).json()[0]["00204000"]["Value"] == ["first"]
        assert writes.next() == 1
        old_key = stored_instances(server, study)[0].blob_key
        assert set(entries(engine)) == {old_key}

        # the same place in the hierarchy, new bytes (the instance row stays)
        assert ingest(server, make_instance(study, series, sop, "second")) is Status.SUCCESS
        (replaced,) = stored_instances(server, study)
        assert replaced.blob_key != old_key
        expected = expected_body(server, server.root, [replaced])
        opened = OpenCounter(server, monkeypatch)
        r = get_metadata(url)
        assert opened.take() == 1
        assert writes.next() == 1
        assert r.json()[0]["00204000"]["Value"] == ["second"]
        assert r.content == expected
        assert set(entries(engine)) == {replaced.blob_key}, "the old entry was overwritten"
        assert get_metadata(url).json()[0]["00204000"]["Value"] == ["second"]
        assert opened.take() == 0

        # into another series: the old row goes, and its entry with it
        other = generate_uid()
        assert ingest(server, make_instance(study, other, sop, "third")) is Status.SUCCESS
        assert entries(engine) == {}
        r = get_metadata(f"{url}/series/{other}")
        assert r.json()[0]["00204000"]["Value"] == ["third"]
        assert opened.take() == 1
        assert writes.next() == 1
        (moved,) = stored_instances(server, study)
        assert set(entries(engine)) == {moved.blob_key}


def test_an_entry_goes_with_its_instance(server: LiveServer, writes: Writes) -> None:
    engine = server.services.engine
    study, series, sops = store_study(server)
    kept_study, _, _ = store_study(server, 1)
    url = f"{server.root}/studies/{study}"
    get_metadata(url)
    assert writes.next() == 1
    get_metadata(f"{server.root}/studies/{kept_study}")
    assert writes.next() == 1
    assert len(entries(engine)) == 4

    r = httpx.delete(f"{url}/series/{series}/instances/{sops[0]}")
    assert r.status_code in (200, 202, 204), r.text
    remaining = {s.blob_key for s in stored_instances(server, study)}
    kept = stored_instances(server, kept_study)[0].blob_key
    assert len(remaining) == 2
    assert set(entries(engine)) == remaining | {kept}

    assert httpx.delete(url).status_code in (200, 202, 204)
    assert set(entries(engine)) == {kept}


def test_a_new_public_url_changes_the_cached_bulk_data_uris(
    tmp_path: Path, writes: Writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = ""
    for server in started_server(make_config(tmp_path)):
        study, series, sops = store_study(server, 2)
        body = get_metadata(f"{server.root}/studies/{study}").content
        assert f'"{server.root}/studies/{study}/series/'.encode() in body
        assert writes.next() == 1
        assert len(entries(server.services.engine)) == 2

    public = "https://pacs.example:8443/edge"
    config = make_config(tmp_path, APPLIANCE_HTTP_PUBLIC_URL=public)
    for server in started_server(config):
        opened = OpenCounter(server, monkeypatch)
        instances = stored_instances(server, study)
        expected = expected_body(server, f"{public}/v1", instances)
        opened.take()
        r = get_metadata(f"{server.root}/studies/{study}")
        assert opened.take() == 0, "served from the entries the first server made"
        assert r.content == expected
        uri = r.json()[1]["00091020"]["Value"][0]["00091011"]["BulkDataURI"]
        assert uri == (
            f"{public}/v1/studies/{study}/series/{series}/instances/{sops[1]}"
            "/bulk/00091020.0.00091011"
        )
        assert httpx.get(uri.replace(f"{public}/v1", server.root)).status_code == 200
        assert server.base_url.encode() not in r.content


def test_a_locked_index_serves_the_metadata_uncached(tmp_path: Path, writes: Writes) -> None:
    """SQLite: another process holding the write lock (a long ingest) makes
    the cache write give up at once; the request is answered all the same."""
    for server in started_server(make_config(tmp_path)):
        study, _, _ = store_study(server)
        url = f"{server.root}/studies/{study}"
        expected = expected_body(server, server.root, stored_instances(server, study))
        blocker = create_index_engine(server.config.index.url)
        with hold_write_lock(blocker):
            assert get_metadata(url).content == expected
            assert writes.next() == 0, "the write gave up"
        blocker.dispose()
        assert entries(server.services.engine) == {}
        assert get_metadata(url).content == expected
        assert writes.next() == 1
        assert len(entries(server.services.engine)) == 3


def test_every_corpus_file_is_served_from_its_entry_byte_for_byte(
    tmp_path: Path, writes: Writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom's test files, every transfer syntax and character set: the
    cached form gives exactly the bytes that building the metadata gives."""
    files = sorted((DATA / "test_files").rglob("*.dcm")) + sorted(
        (DATA / "charset_files").glob("*.dcm")
    )
    for server in started_server(make_config(tmp_path)):
        urls = set()
        for path in files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if ingest(server, path.read_bytes()) is not Status.SUCCESS:
                    continue
                ds = dcmread(path, stop_before_pixels=True)
            urls.add(f"{server.root}/studies/{ds.StudyInstanceUID}")
        assert len(urls) > 20
        opened = OpenCounter(server, monkeypatch)
        for url in sorted(urls):
            study = url.rsplit("/", 1)[1]
            instances = stored_instances(server, study)
            try:
                expected = expected_body(server, server.root, instances)
            except UnreadableInstance:
                continue  # not served either: the request fails before its status
            opened.take()
            assert get_metadata(url).content == expected, url
            assert opened.take() == len(instances)
            assert writes.next() == 1
            assert get_metadata(url).content == expected, url
            assert opened.take() == 0, url


# ----------------------------------------------------------- the cache module


def test_a_fill_for_a_blob_no_instance_has_writes_nothing(server: LiveServer) -> None:
    engine = server.services.engine
    study, _, _ = store_study(server, 1)
    (stored,) = stored_instances(server, study)
    cache = MetadataCache(engine)
    cache.store({"no-such-blob": b"{}", stored.blob_key: b'{"a": 1}'}, CACHE_VERSION)
    assert entries(engine) == {stored.blob_key: b'{"a": 1}'}
    assert cache.load(["no-such-blob", stored.blob_key], CACHE_VERSION) == {
        stored.blob_key: b'{"a": 1}'
    }
    # an entry of another format is not served, and is overwritten
    assert cache.load([stored.blob_key], CACHE_VERSION + " other") == {}
    cache.store({stored.blob_key: b'{"a": 2}'}, CACHE_VERSION + " other")
    assert cache.load([stored.blob_key], CACHE_VERSION + " other") == {stored.blob_key: b'{"a": 2}'}
    assert cache.load([stored.blob_key], CACHE_VERSION) == {}
    assert cache.load([], CACHE_VERSION) == {}


def test_a_write_gives_up_on_a_held_lock_instead_of_waiting(server: LiveServer) -> None:
    """The lock is released after 3 s; the engine's busy timeout would have
    waited for that (and written), the cache's short wait does not."""
    engine = server.services.engine
    study, _, _ = store_study(server, 1)
    (stored,) = stored_instances(server, study)
    cache = MetadataCache(engine)
    blocker = create_index_engine(server.config.index.url)
    with hold_write_lock(blocker, release_after=3.0, row_of=stored.blob_key):
        assert cache.store({stored.blob_key: b"{}"}, CACHE_VERSION) == 0
    blocker.dispose()
    assert entries(engine) == {}
    assert cache.store({stored.blob_key: b"{}"}, CACHE_VERSION) == 1
    if engine.dialect.name == "sqlite":
        # the pooled connection has its busy timeout back
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000


@contextlib.contextmanager
def hold_write_lock(
    engine: Engine, release_after: float | None = None, row_of: str | None = None
) -> Iterator[None]:
    """Hold what an ingest holds: SQLite's write lock; on PostgreSQL the
    instance rows' locks (or the row of blob key *row_of*) taken FOR UPDATE.
    Released on exit, or by a timer after *release_after* seconds."""
    conn = engine.connect().execution_options(**WRITE)
    guard = threading.Lock()

    def release() -> None:
        with guard:
            if not conn.closed:
                conn.rollback()
                conn.close()

    conn.begin()
    if conn.dialect.name == "postgresql":
        query = select(instance.c.id).with_for_update()
        if row_of is not None:
            query = query.where(instance.c.blob_key == row_of)
        conn.execute(query).all()
    timer = None if release_after is None else threading.Timer(release_after, release)
    if timer is not None:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        release()


# ---------------------------------------------------------------- migration


def alembic_config(conn: Any) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrate.MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def test_migration_0003_adds_and_removes_the_cache_table(index_engine: Engine) -> None:
    with index_engine.connect() as conn:
        command.downgrade(alembic_config(conn), "0002")
        conn.commit()
    assert "metadata_cache" not in inspect(index_engine).get_table_names()
    assert migrate.current_revision(index_engine) == "0002"
    migrate.upgrade(index_engine, "0003")
    assert "metadata_cache" in inspect(index_engine).get_table_names()
    migrate.upgrade(index_engine)
    assert migrate.current_revision(index_engine) == migrate.head_revision()
    with index_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert conn.execute(select(func.count()).select_from(metadata_cache)).scalar() == 0
    (fk,) = inspect(index_engine).get_foreign_keys("metadata_cache")
    assert fk["referred_table"] == "instance"
    assert fk["options"].get("ondelete") == "CASCADE"
