"""Blobs as files on a local disk.

Layout: ``ROOT/ab/cd/abcdef0123...`` where the key is 32 hex digits made
here; nothing from the DICOM data reaches a path.  The first four digits
name the hour the blob was written (hours since the epoch, modulo 65536),
the other 28 are random: the blobs of one hour share a folder, so a put
rarely has to create (and fsync) new folders, and one hour's folder holds
at most a few hundred thousand files.  A put writes a
temporary file ``.tmp-<random>`` in the final folder, fsyncs it, renames it to
its key and fsyncs the folder, so the blob is durable when ``put`` returns and
a put interrupted at any point leaves at most a temporary file, never visible
under a key and removed by :meth:`FilesystemBlobStore.iter_blobs` later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import io
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from appliance import metrics
from appliance.errors import BlobNotFound, StorageError, StorageFull
from appliance.storage.base import CHUNK_SIZE, BlobEntry, BlobInfo

_KEY_RE = re.compile(r"[0-9a-f]{32}")
_PART_RE = re.compile(r"[0-9a-f]{2}")
_TMP_PREFIX = ".tmp-"


class FilesystemBlobStore:
    """A :class:`~appliance.storage.base.BlobStore` on a local folder."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        #: below this much free space on the folder's file system, put()
        #: refuses (StorageFull) instead of filling the disk (0: never)
        self.min_free_bytes = min_free_bytes
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the storage folder {root}: {exc}") from exc

    def _path(self, key: str) -> Path:
        # The only place a key becomes a path: refuse anything we did not make.
        if _KEY_RE.fullmatch(key) is None:
            raise BlobNotFound(f"not a blob key of this store: {key!r}")
        return self.root / key[:2] / key[2:4] / key

    def free_bytes(self) -> int:
        """Free space on the folder's file system, for an unprivileged user."""
        return shutil.disk_usage(self.root).free

    def below_floor(self) -> str | None:
        """Why new blobs are refused (free space below the floor), or None."""
        if not self.min_free_bytes:
            return None
        free = self.free_bytes()
        if free >= self.min_free_bytes:
            return None
        return (
            f"{free // 2**20} MB free on the storage folder's disk, below "
            f"storage.min_free_mb ({self.min_free_bytes // 2**20} MB): new instances are refused"
        )

    def put(self, source: IO[bytes]) -> BlobInfo:
        low = self.below_floor()
        if low is not None:
            with metrics.counting_storage_errors("filesystem"):
                raise StorageFull(low)
        key = f"{(int(time.time()) // 3600) & 0xFFFF:04x}{secrets.token_hex(14)}"
        final = self._path(key)
        folder = final.parent
        tmp = folder / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        size = 0
        try:
            new_folders = [p for p in (folder.parent, folder) if not p.is_dir()]
            with _disk_errors("write a blob"):
                folder.mkdir(parents=True, exist_ok=True)
                out = open(tmp, "xb")  # noqa: SIM115 - closed below, also on error
            with out:
                # errors of the source stream propagate as they are
                while chunk := source.read(CHUNK_SIZE):
                    with _disk_errors("write a blob"):
                        out.write(chunk)
                    size += len(chunk)
                with _disk_errors("write a blob"):
                    out.flush()
                    os.fsync(out.fileno())
            with _disk_errors("write a blob"):
                os.rename(tmp, final)
                _fsync_dir(folder)
                for created in new_folders:  # make the new folders' entries durable
                    _fsync_dir(created.parent)
        except BaseException:
            # a disk error, a failing source stream, a signal: leave nothing
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return BlobInfo(key=key, size=size)

    def open(self, key: str) -> IO[bytes]:
        with metrics.counting_storage_errors("filesystem"):
            return self._open(key)

    def _open(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {key}") from None
        except OSError as exc:
            raise StorageError(f"cannot read blob {key}: {exc.strerror}") from exc

    def open_range(self, key: str, offset: int, length: int | None = None) -> IO[bytes]:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        fh = self.open(key)
        fh.seek(offset)
        if length is None:
            return fh
        return io.BufferedReader(_BoundedReader(fh, length))

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(f"no blob {key}")
        yield path

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            with metrics.counting_storage_errors("filesystem"):
                raise StorageError(f"cannot delete blob {key}: {exc.strerror}") from exc
        with contextlib.suppress(OSError):
            _fsync_dir(path.parent)

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except BlobNotFound:
            return False

    def check(self) -> None:
        probe = self.root / f"{_TMP_PREFIX}probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            with metrics.counting_storage_errors("filesystem"):
                raise StorageError(
                    f"the storage folder {self.root} is not writable: {exc.strerror}"
                ) from exc

    def iter_blobs(self, older_than: dt.datetime) -> Iterator[str]:
        cutoff = older_than.timestamp()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(dirpath) / name
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if mtime >= cutoff:
                    continue
                if name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        path.unlink()
                elif _KEY_RE.fullmatch(name):
                    yield name

    def list_blobs(self) -> Iterator[BlobEntry]:
        # ROOT/ab/cd/abcd...: walking each level in name order lists the keys
        # in key order (one folder, the blobs of one hour, is held at a time)
        for first in _sorted_parts(self.root):
            for second in _sorted_parts(first):
                prefix = first.name + second.name
                try:
                    names = sorted(
                        entry.name
                        for entry in os.scandir(second)
                        if entry.name.startswith(prefix) and _KEY_RE.fullmatch(entry.name)
                    )
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StorageError(f"cannot list the storage folder: {exc.strerror}") from exc
                for name in names:
                    try:
                        stat = (second / name).stat()
                    except FileNotFoundError:
                        continue  # deleted since the folder was read
                    except OSError as exc:
                        raise StorageError(f"cannot read blob {name}: {exc.strerror}") from exc
                    modified = dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC)
                    yield BlobEntry(key=name, size=stat.st_size, modified=modified)


class _BoundedReader(io.RawIOBase):
    """Reads at most *length* bytes of an underlying file, then EOF."""

    def __init__(self, fh: IO[bytes], length: int) -> None:
        self._fh = fh
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        n = min(len(buffer), self._left)
        data = self._fh.read(n)
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def close(self) -> None:
        self._fh.close()
        super().close()


def _sorted_parts(folder: Path) -> list[Path]:
    """The sub-folders of *folder* named by two hex digits, in name order."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list the storage folder: {exc.strerror}") from exc
    return sorted(
        (Path(e.path) for e in entries if _PART_RE.fullmatch(e.name) and e.is_dir()),
        key=lambda path: path.name,
    )


@contextlib.contextmanager
def _disk_errors(action: str) -> Iterator[None]:
    """Disk errors, translated (below) and counted in
    ``appliance_storage_errors_total``."""
    with metrics.counting_storage_errors("filesystem"), _translated_disk_errors(action):
        yield


@contextlib.contextmanager
def _translated_disk_errors(action: str) -> Iterator[None]:
    """Turn the disk's OSErrors into StorageErrors (StorageFull when full)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"the storage folder is full: {exc.strerror}") from exc
        raise StorageError(f"cannot {action}: {exc.strerror or exc}") from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
