"""The contract every BlobStore backend passes, and the filesystem backend's
crash safety."""

from __future__ import annotations

import base64
import datetime as dt
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import BlobNotFound, StorageError, StorageUnavailable
from appliance.status import Status
from appliance.storage.base import BlobStore
from appliance.storage.filesystem import FilesystemBlobStore
from tests.conftest import start_azurite, start_seaweedfs
from tests.peers import (
    AZURITE_KEY,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    Azurite,
    SeaweedS3,
    azurite_connection_string,
)


@pytest.fixture(params=["filesystem", "azure", "s3"])
def twin(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[BlobStore, BlobStore]:
    """Two store objects on one container, bucket or folder: two processes
    or two nodes sharing it."""
    if request.param == "s3":
        first = _s3(request.getfixturevalue("seaweedfs"))
        return first, _s3(request.getfixturevalue("seaweedfs"), bucket=first.bucket)
    if request.param == "azure":
        first = _azure(request.getfixturevalue("azurite"))
        return first, _azure(request.getfixturevalue("azurite"), container=first.container_name)
    return FilesystemBlobStore(tmp_path / "blobs"), FilesystemBlobStore(tmp_path / "blobs")


def test_two_stores_on_one_container_share_it(twin: tuple[BlobStore, BlobStore]) -> None:
    """The second one to arrive finds the container already made, and each
    reads what the other wrote."""
    first, second = twin
    first.check()
    second.check()
    a = first.put(io.BytesIO(b"from the first"))
    b = second.put(io.BytesIO(b"from the second"))
    with second.open(a.key) as fh:
        assert fh.read() == b"from the first"
    with first.open(b.key) as fh:
        assert fh.read() == b"from the second"


@pytest.fixture(params=["filesystem", "azure", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each backend on its real service: the local disk, Azurite and
    SeaweedFS (a container or bucket of its own per test)."""
    if request.param == "s3":
        return _s3(request.getfixturevalue("seaweedfs"))
    if request.param == "azure":
        azurite: Azurite = request.getfixturevalue("azurite")
        from appliance.storage.azure import AzureBlobStore

        return AzureBlobStore(
            f"contract-{uuid.uuid4().hex}", connection_string=azurite.connection_string
        )
    return FilesystemBlobStore(tmp_path / "blobs")


def test_put_then_open_returns_the_same_bytes(store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk
    info = store.put(io.BytesIO(data))
    assert info.size == len(data)
    with store.open(info.key) as fh:
        assert fh.read() == data
    assert store.exists(info.key)


def test_each_put_gets_a_new_key(store: BlobStore) -> None:
    a = store.put(io.BytesIO(b"same"))
    b = store.put(io.BytesIO(b"same"))
    assert a.key != b.key


def test_empty_blob(store: BlobStore) -> None:
    info = store.put(io.BytesIO(b""))
    assert info.size == 0
    with store.open(info.key) as fh:
        assert fh.read() == b""


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [(0, 4, b"0123"), (5, 3, b"567"), (8, None, b"89"), (9, 10, b"9"), (10, 5, b"")],
)
def test_open_range(store: BlobStore, offset: int, length: int | None, expected: bytes) -> None:
    info = store.put(io.BytesIO(b"0123456789"))
    with store.open_range(info.key, offset, length) as fh:
        assert fh.read() == expected


def test_open_range_streams_in_pieces(store: BlobStore) -> None:
    info = store.put(io.BytesIO(bytes(range(256)) * 100))
    with store.open_range(info.key, 10, 1000) as fh:
        parts = [fh.read(300) for _ in range(5)]
    assert b"".join(parts) == (bytes(range(256)) * 100)[10:1010]


def test_local_path_holds_the_blob(store: BlobStore) -> None:
    data = os.urandom(2 * 1024 * 1024 + 3)
    info = store.put(io.BytesIO(data))
    with store.local_path(info.key) as path:
        assert path.read_bytes() == data
    store.delete(info.key)
    with pytest.raises(BlobNotFound), store.local_path(info.key):
        pass


def test_delete_is_idempotent(store: BlobStore) -> None:
    info = store.put(io.BytesIO(b"x"))
    store.delete(info.key)
    store.delete(info.key)
    assert not store.exists(info.key)
    with pytest.raises(BlobNotFound):
        store.open(info.key)


@pytest.mark.parametrize(
    "key", ["../../etc/passwd", "/etc/passwd", "", "A" * 32, "0" * 31, "0" * 32 + "/..", "\x00"]
)
def test_foreign_keys_never_reach_the_disk(store: BlobStore, key: str) -> None:
    assert not store.exists(key)
    with pytest.raises(BlobNotFound):
        store.open(key)
    with pytest.raises(BlobNotFound):
        store.delete(key)


def test_check_passes_on_a_writable_store(store: BlobStore) -> None:
    store.check()


def test_iter_blobs_lists_only_old_enough_blobs(store: BlobStore) -> None:
    info = store.put(io.BytesIO(b"x"))
    assert list(store.iter_blobs(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))) == []
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    assert list(store.iter_blobs(later)) == [info.key]


def test_list_blobs_lists_every_blob_in_key_order_with_size_and_time(store: BlobStore) -> None:
    """The listing ``verify`` and ``reindex`` walk: every blob once, in key
    order, its size and write time (the servers' clocks are this host's;
    cloud stores keep whole seconds)."""
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2)
    infos = [store.put(io.BytesIO(b"x" * size)) for size in (0, 1, 7, 1000, 5, 3)]
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    listed = list(store.list_blobs())
    assert [entry.key for entry in listed] == sorted(info.key for info in infos)
    assert {entry.key: entry.size for entry in listed} == {info.key: info.size for info in infos}
    for entry in listed:
        assert entry.modified.tzinfo is not None
        assert before <= entry.modified <= after
    store.delete(infos[0].key)
    assert infos[0].key not in [entry.key for entry in store.list_blobs()]


# ------------------------------------------------------------ filesystem only


def test_filesystem_listing_is_in_key_order_across_folders_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Keys of several hours (folders) come in key order; a temporary file
    of a put in progress and a stray file are neither listed nor removed
    (``iter_blobs`` removes old temporary files, the listing must not)."""
    root = tmp_path / "blobs"
    store = FilesystemBlobStore(root)
    keys = ["ffff" + "0" * 28, "0000" + "f" * 28, "00ff" + "1" * 28, "a0b1" + "2" * 28]
    for key in keys:
        path = root / key[:2] / key[2:4] / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())
    made = store.put(io.BytesIO(b"made by put"))
    temporary = root / made.key[:2] / made.key[2:4] / ".tmp-0123456789abcdef"
    temporary.write_bytes(b"a put in progress")
    old = time.time() - 7200
    os.utime(temporary, (old, old))
    stray = root / "00" / "ff" / ("ab" + "3" * 30)  # a key outside its folder
    stray.write_bytes(b"not where a key of this store lives")
    listed = [entry.key for entry in store.list_blobs()]
    assert listed == sorted([*keys, made.key])
    assert temporary.exists()
    assert stray.exists()


def test_keys_are_opaque_and_paths_hold_no_dicom_data(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    info = store.put(io.BytesIO(b"DICM 1.2.840.10008"))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.name for p in files] == [info.key]
    assert files[0].relative_to(tmp_path).parts == (info.key[:2], info.key[2:4], info.key)


class _FailingSource(io.RawIOBase):
    """A source that breaks (like a peer going away) once more than *after*
    bytes were read from it."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.sent > self.after:
            raise ConnectionResetError("peer went away")
        buffer[:] = b"x" * len(buffer)
        self.sent += len(buffer)
        return len(buffer)


def test_a_put_whose_source_fails_leaves_nothing(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    with pytest.raises(ConnectionResetError):
        store.put(_FailingSource(after=10))  # type: ignore[arg-type]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


LIMITED_WRITER = textwrap.dedent(
    """
    import io, resource, signal, sys
    from pathlib import Path
    from appliance.errors import StorageError
    from appliance.storage.filesystem import FilesystemBlobStore

    store = FilesystemBlobStore(Path(sys.argv[1]))
    # a real write failure: files may not grow past 4 KiB (EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        store.put(io.BytesIO(b"x" * 100_000))
    except StorageError as exc:
        print("StorageError:", exc.status.name)
    """
)


def test_disk_errors_become_storage_errors_and_leave_nothing(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    out = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITER, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "StorageError: PROCESSING_FAILURE"
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_check_fails_when_the_folder_is_gone(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs").rmdir()
    (tmp_path / "blobs").write_text("now a file")
    with pytest.raises(StorageError):
        store.check()


WRITER = textwrap.dedent(
    """
    import io, sys, time
    from pathlib import Path
    from appliance.storage.filesystem import FilesystemBlobStore

    class Slow(io.RawIOBase):
        def readable(self): return True
        def readinto(self, b):
            sys.stdout.write("writing\\n"); sys.stdout.flush()
            time.sleep(0.05)
            b[:1024] = b"y" * 1024
            return 1024

    FilesystemBlobStore(Path(sys.argv[1])).put(io.BufferedReader(Slow()))
    """
)


def test_a_process_killed_mid_put_leaves_no_visible_blob(tmp_path: Path) -> None:
    """SIGKILL during the write: no key is visible, and the leftover temporary
    file is removed by the sweep listing."""
    root = tmp_path / "blobs"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(5):
        assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    store = FilesystemBlobStore(root)
    leftovers = [p for p in root.rglob("*") if p.is_file()]
    assert leftovers, "the writer should have left its temporary file"
    assert all(p.name.startswith(".tmp-") for p in leftovers)
    time.sleep(0.01)
    assert list(store.iter_blobs(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))) == []
    assert [p for p in root.rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------- azure only


def _azure(azurite: Azurite | int, container: str = "", **options: Any) -> Any:
    from appliance.storage.azure import AzureBlobStore

    port = azurite if isinstance(azurite, int) else azurite.port
    return AzureBlobStore(
        container or f"t-{uuid.uuid4().hex}",
        connection_string=azurite_connection_string(port),
        **options,
    )


def _names(store: Any) -> list[str]:
    return [blob.name for blob in store._client().list_blobs()]


def test_azure_blob_names_are_the_opaque_keys(azurite: Azurite) -> None:
    store = _azure(azurite)
    info = store.put(io.BytesIO(b"DICM 1.2.840.10008"))
    assert _names(store) == [info.key]


def test_azure_put_whose_source_fails_leaves_nothing(azurite: Azurite) -> None:
    """The source fails after some blocks were sent: nothing is committed."""
    store = _azure(azurite)
    store.check()

    with pytest.raises(ConnectionResetError):
        # past two 4 MiB blocks
        store.put(_FailingSource(after=9 * 1024 * 1024))  # type: ignore[arg-type]
    assert _names(store) == []


class _Unseekable(io.RawIOBase):
    """A stream that cannot tell its length (as a socket)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._data.readinto(buffer)


def test_azure_small_blob_of_known_length_goes_in_one_request(azurite: Azurite) -> None:
    """A source that knows its length is written with one Put Blob (no
    blocks), from where the source is; one that does not is written as
    blocks and a block list.  Both read back the same."""
    store = _azure(azurite)
    data = os.urandom(100_000)
    source = io.BytesIO(b"skipped" + data)
    source.seek(7)
    whole = store.put(source)
    streamed = store.put(io.BufferedReader(_Unseekable(data)))
    for info, blocks in ((whole, 0), (streamed, 1)):
        assert info.size == len(data)
        with store.open(info.key) as fh:
            assert fh.read() == data
        blob = store._client().get_blob_client(info.key)
        committed, _ = blob.get_block_list("committed")
        assert len(committed) == blocks


def test_azure_large_blob_streams_in_blocks(azurite: Azurite) -> None:
    """A blob larger than one block (4 MiB) is uploaded in blocks and read
    back whole, and by range across a block boundary."""
    store = _azure(azurite)
    data = os.urandom(9 * 1024 * 1024 + 5)
    info = store.put(io.BytesIO(data))
    assert info.size == len(data)
    with store.open(info.key) as fh:
        assert fh.read() == data
    with store.open_range(info.key, 4 * 1024 * 1024 - 3, 10) as fh:
        assert fh.read() == data[4 * 1024 * 1024 - 3 : 4 * 1024 * 1024 + 7]


def test_azure_service_down_is_transient_and_the_store_recovers(tmp_path: Path) -> None:
    """Azurite stopped: every operation fails with StorageUnavailable (out of
    resources: C-STORE 0xA700, HTTP 503), not a permanent error; started
    again (empty: it keeps nothing), the same store object works again,
    creating its container anew."""
    service = start_azurite(tmp_path / "a")
    store = _azure(service, retries=0)
    info = store.put(io.BytesIO(b"before"))
    service.stop()
    for action in (
        lambda: store.put(io.BytesIO(b"during")),
        lambda: store.open(info.key),
        lambda: store.exists(info.key),
        store.check,
    ):
        with pytest.raises(StorageUnavailable) as caught:
            action()
        assert caught.value.status is Status.OUT_OF_RESOURCES
    service = start_azurite(tmp_path / "b", port=service.port)
    try:
        after = store.put(io.BytesIO(b"after"))
        with store.open(after.key) as fh:
            assert fh.read() == b"after"
    finally:
        service.stop()


def test_azure_transient_failures_are_retried(tmp_path: Path) -> None:
    """The service comes up while the store is waiting to try again: the
    put succeeds without the caller seeing the failure."""
    from tests.peers import free_port

    port = free_port()
    store = _azure(port, retries=3)
    started: list[Azurite] = []
    starter = threading.Timer(0.3, lambda: started.append(start_azurite(tmp_path, port=port)))
    starter.start()
    try:
        info = store.put(io.BytesIO(b"patient"))
        assert store.exists(info.key)
    finally:
        starter.join()
        for service in started:
            service.stop()


def test_azure_missing_container_not_created_is_a_permanent_error(azurite: Azurite) -> None:
    store = _azure(azurite, create_container=False)
    with pytest.raises(StorageError) as caught:
        store.check()
    assert not isinstance(caught.value, StorageUnavailable)
    assert "container does not exist" in caught.value.reason


def test_azure_wrong_key_is_a_permanent_error_without_secrets(azurite: Azurite) -> None:
    from appliance.storage.azure import AzureBlobStore

    wrong = azurite.connection_string.replace(AZURITE_KEY, base64.b64encode(b"x" * 64).decode())
    store = AzureBlobStore(f"t-{uuid.uuid4().hex}", connection_string=wrong, retries=0)
    with pytest.raises(StorageError) as caught:
        store.check()
    assert not isinstance(caught.value, StorageUnavailable)
    assert "403" in caught.value.reason
    assert AZURITE_KEY not in caught.value.reason


# -------------------------------------------------------------------- s3 only


def _s3(service: SeaweedS3, bucket: str = "", **options: Any) -> Any:
    from appliance.storage.s3 import S3BlobStore

    return S3BlobStore(
        bucket or f"t-{uuid.uuid4().hex[:20]}",
        endpoint_url=service.endpoint,
        access_key_id=S3_ACCESS_KEY,
        secret_access_key=S3_SECRET_KEY,
        **options,
    )


def _keys(store: Any) -> list[str]:
    listed = store._client().list_objects_v2(Bucket=store.bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_s3_object_names_are_the_opaque_keys(seaweedfs: SeaweedS3) -> None:
    store = _s3(seaweedfs)
    info = store.put(io.BytesIO(b"DICM 1.2.840.10008"))
    assert _keys(store) == [info.key]


def test_s3_large_blob_goes_in_parts_and_a_failed_one_leaves_nothing(
    seaweedfs: SeaweedS3,
) -> None:
    """Above 16 MiB a put is a multipart upload: read back whole and by a
    range across a part boundary; a source failing after the first part
    leaves no object (the upload is aborted)."""
    store = _s3(seaweedfs)
    data = os.urandom(17 * 1024 * 1024 + 5)
    info = store.put(io.BytesIO(data))
    assert info.size == len(data)
    with store.open(info.key) as fh:
        assert fh.read() == data
    boundary = 16 * 1024 * 1024
    with store.open_range(info.key, boundary - 3, 10) as fh:
        assert fh.read() == data[boundary - 3 : boundary + 7]

    with pytest.raises(ConnectionResetError):
        store.put(_FailingSource(after=20 * 1024 * 1024))  # type: ignore[arg-type]
    assert _keys(store) == [info.key]


@pytest.mark.slow
def test_s3_service_down_is_transient_and_the_store_recovers(tmp_path: Path) -> None:
    """SeaweedFS stopped: every operation fails with StorageUnavailable (out
    of resources); started again on its data, the same store object reads
    what it wrote before and writes again."""
    service = start_seaweedfs(tmp_path / "weed")
    store = _s3(service, retries=0)
    info = store.put(io.BytesIO(b"before"))
    service.stop()
    try:
        for action in (
            lambda: store.put(io.BytesIO(b"during")),
            lambda: store.open(info.key),
            lambda: store.exists(info.key),
            store.check,
        ):
            with pytest.raises(StorageUnavailable) as caught:
                action()
            assert caught.value.status is Status.OUT_OF_RESOURCES
    finally:
        service = start_seaweedfs(tmp_path / "weed", ports=service.ports)
    try:
        with store.open(info.key) as fh:
            assert fh.read() == b"before"
        after = store.put(io.BytesIO(b"after"))
        assert store.exists(after.key)
    finally:
        service.stop()


def test_s3_missing_bucket_not_created_is_a_permanent_error(seaweedfs: SeaweedS3) -> None:
    store = _s3(seaweedfs, create_bucket=False)
    with pytest.raises(StorageError) as caught:
        store.check()
    assert not isinstance(caught.value, StorageUnavailable)
    assert "bucket does not exist" in caught.value.reason


def test_s3_wrong_secret_is_a_permanent_error_without_secrets(seaweedfs: SeaweedS3) -> None:
    from appliance.storage.s3 import S3BlobStore

    store = S3BlobStore(
        f"t-{uuid.uuid4().hex[:20]}",
        endpoint_url=seaweedfs.endpoint,
        access_key_id=S3_ACCESS_KEY,
        secret_access_key="not-the-secret",
        retries=0,
    )
    with pytest.raises(StorageError) as caught:
        store.check()
    assert not isinstance(caught.value, StorageUnavailable)
    assert "403" in caught.value.reason
    assert "not-the-secret" not in caught.value.reason


def test_azure_account_url_with_the_account_key_or_a_sas_token(azurite: Azurite) -> None:
    """The other way to name the account: its Blob service URL with the
    account key, or with a SAS token (made here with the key)."""
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    from appliance.storage.azure import AzureBlobStore

    url = f"http://127.0.0.1:{azurite.port}/devstoreaccount1"
    sas = generate_account_sas(
        "devstoreaccount1",
        AZURITE_KEY,
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=AccountSasPermissions(
            read=True, write=True, delete=True, list=True, create=True, add=True
        ),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    for credential in (AZURITE_KEY, sas):
        store = AzureBlobStore(f"t-{uuid.uuid4().hex}", account_url=url, credential=credential)
        store.check()
        info = store.put(io.BytesIO(b"by account URL"))
        with store.open(info.key) as fh:
            assert fh.read() == b"by account URL"
