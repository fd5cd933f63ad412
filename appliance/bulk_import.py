"""``dicom-appliance import``: files, folders and DICOMDIRs into the
appliance, through the one ingest pipeline.

Every file goes through :meth:`IngestService.store_part10` with the origin
``import`` (no calling AE title: a ``[[forward]]`` destination filtered by
``calling_ae_titles`` does not take imported instances, one without that
filter does), so an imported instance is indexed, written, fed to the change
feed and queued for forwarding exactly as a STOW-RS of the same file would
be.  Files are read by a pool of threads (the ingest waits on fsync and the
database most of the time).

What each file counts as:

- **stored**: a new instance;
- **duplicate**: its SOP Instance UID was stored already, handled by
  ``ingest.duplicate_policy``: ``kept`` (the stored copy kept), ``replaced``
  (the file replaced it) or ``rejected`` (the stored copy kept, the file
  refused); never a failure, the instance is there;
- **failed**: the ingest refused it (with its status and reason), it could
  not be read, or a DICOMDIR names it but it is missing or outside the
  DICOMDIR's folder;
- **skipped**: not a DICOM Part 10 file (no ``DICM`` prefix: anything that
  is not DICOM, and bare data sets without File Meta Information, which the
  appliance cannot store as received), or done by an earlier run.

A DICOMDIR (a Part 10 file of the Media Storage Directory class, PS3.10 7.2)
is not an instance: the files its records reference (Referenced File ID,
PS3.3 F.3) are imported instead.  Each component of a File ID must be a
plain name; the path it makes is resolved (symbolic links followed) and
refused unless it stays inside the DICOMDIR's folder.  A component that is
missing as written is looked for case-insensitively (media written on one
system and mounted on another often change the case of names).

**Resumable.**  A journal file records each file done (stored, duplicate or
skipped as not DICOM) by its resolved path, size and modification time; a
later run skips a file the journal lists with the same size and time, so an
interrupted import is finished by running the same command again.  Failed
files and DICOMDIRs are not recorded: they are tried (read) again.  The
journal is flushed after every line; a line lost in a crash only makes its
file a duplicate on the next run.  Its first line names the index (a hash
of ``index.url`` without password), and a journal written for another index
is refused.

Logs name UIDs and statuses only: a path may carry a patient's name, so
paths appear only in the report the command prints.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import MediaStorageDirectoryStorage
from sqlalchemy.engine import URL, make_url

from appliance.errors import ApplianceError
from appliance.index.sql import AddOutcome
from appliance.model import Origin
from appliance.services import Services
from appliance.status import Status, StatusCategory

LOGGER = logging.getLogger(__name__)

#: The journal's default name, in the working folder.
DEFAULT_JOURNAL = ".dicom-appliance-import.journal"
#: What the first line of a journal says it is.
JOURNAL_FORMAT = "dicom-appliance import journal"
JOURNAL_VERSION = 1

ORIGIN = Origin("import")

BACKSLASH = "\\"

#: PS3.10 7.1: a 128-byte preamble, then "DICM".
_PREAMBLE = 128
_PREFIX = b"DICM"

#: Failures of the storage or the index (not of the file) that, this many
#: times in a row, stop the run: a full disk or a database that went away
#: would otherwise fail every remaining file.  Those files are not recorded
#: in the journal, so the next run takes them up.
STOP_AFTER = 20
_RESOURCE_FAILURES = frozenset({Status.PROCESSING_FAILURE, Status.OUT_OF_RESOURCES})


class Kind(enum.Enum):
    """What one file turned out to be."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    NOT_DICOM = "not-dicom"
    DICOMDIR = "dicomdir"


@dataclasses.dataclass(frozen=True)
class Failure:
    """A file not imported, and why (the ingest's status and reason, or the
    read error); *path* as the report shows it."""

    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class FileOutcome:
    """The outcome of one file (built in a worker thread)."""

    kind: Kind
    reason: str = ""
    #: the ingest's status, for a file that reached it
    status: Status | None = None
    #: kept | replaced | rejected, for a duplicate
    duplicate: str = ""
    #: DICOMDIR: the files it references, inside its folder
    references: tuple[Path, ...] = ()
    #: DICOMDIR: the references refused (what the report shows, why)
    refused: tuple[Failure, ...] = ()


@dataclasses.dataclass
class ImportReport:
    """What an import did (printed as its summary, ``--json`` as is)."""

    stored: int = 0
    duplicates: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"kept": 0, "replaced": 0, "rejected": 0}
    )
    failed: list[Failure] = dataclasses.field(default_factory=list)
    skipped_not_dicom: int = 0
    skipped_done_before: int = 0
    dicomdirs: int = 0
    #: the size of the files stored or found duplicate
    bytes: int = 0
    seconds: float = 0.0
    #: files found so far (walked, plus those DICOMDIRs added)
    total: int = 0
    #: why the run stopped before the end ("" if it did not)
    stopped: str = ""

    @property
    def duplicate(self) -> int:
        return sum(self.duplicates.values())

    @property
    def skipped(self) -> int:
        return self.skipped_not_dicom + self.skipped_done_before

    @property
    def done(self) -> int:
        """Files handled so far (DICOMDIRs not counted)."""
        return self.stored + self.duplicate + len(self.failed) + self.skipped

    @property
    def instances_per_second(self) -> float:
        instances = self.stored + self.duplicate
        return instances / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "stored": self.stored,
            "duplicate": self.duplicate,
            "duplicates": dict(self.duplicates),
            "failed": len(self.failed),
            "failures": [dataclasses.asdict(f) for f in self.failed],
            "skipped": self.skipped,
            "skipped_not_dicom": self.skipped_not_dicom,
            "skipped_done_before": self.skipped_done_before,
            "dicomdirs": self.dicomdirs,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "instances_per_second": round(self.instances_per_second, 1),
            "stopped": self.stopped or None,
        }


# --------------------------------------------------------------------------
# the journal


class Journal:
    """The record of the files done, one JSON object per line, appended.

    Held with an exclusive ``flock`` while open: two imports never share a
    journal.
    """

    def __init__(self, path: Path, index_url: str, partition: str | None = None) -> None:
        self.path = path
        # an import into another data partition is another import
        self._index = index_identity(index_url) + (f"/{partition}" if partition else "")
        self._done: dict[str, tuple[int, int]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ApplianceError(
                    f"another import is using the journal {path} (give another --journal)"
                ) from None
            self._load()
        except BaseException:
            self._file.close()
            raise

    def _load(self) -> None:
        self._file.seek(0)
        text = self._file.read()
        lines = text.splitlines()
        if not lines:
            self._write(
                {"journal": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "index": self._index}
            )
            return
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_FORMAT:
            raise ApplianceError(f"{self.path} is not an import journal (give another --journal)")
        if header.get("index") != self._index:
            raise ApplianceError(
                f"the journal {self.path} was written for another index or partition "
                "(give another --journal, or remove it to import everything again)"
            )
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                self._done[str(entry["path"])] = (int(entry["size"]), int(entry["mtime_ns"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: its file is simply read again
        if not text.endswith("\n"):
            self._file.write("\n")  # the next line must not join the cut one

    def is_done(self, key: str, size: int, mtime_ns: int) -> bool:
        return self._done.get(key) == (size, mtime_ns)

    def record(self, key: str, size: int, mtime_ns: int) -> None:
        self._done[key] = (size, mtime_ns)
        self._write({"path": key, "size": size, "mtime_ns": mtime_ns})

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.fsync(self._file.fileno())
        self._file.close()


def index_identity(index_url: str) -> str:
    """A short hash naming an index (its URL without the password)."""
    url = make_url(index_url)
    # URL.set() takes None as "unchanged": a new URL is made without the password
    bare = URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    )
    return hashlib.sha256(bare.render_as_string().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# DICOMDIR


class ReferenceRefused(Exception):
    """A DICOMDIR's Referenced File ID that is not imported."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_dicomdir(path: Path) -> tuple[list[Path], list[Failure]]:
    """The files the records of the DICOMDIR *path* reference, resolved
    inside its folder, and the references refused.

    Raises
    ------
    ApplianceError
        if the DICOMDIR cannot be read.
    """
    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad files
        raise ApplianceError(f"the DICOMDIR cannot be read: {exc.__class__.__name__}") from None
    root = path.parent.resolve()
    found: list[Path] = []
    refused: list[Failure] = []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if file_id is None or file_id == "":
            continue
        components = [file_id] if isinstance(file_id, str) else [str(c) for c in file_id]
        shown = f"{path} -> {BACKSLASH.join(components)}"  # as DICOM writes a multi-value
        try:
            found.append(resolve_file_id(root, components))
        except ReferenceRefused as exc:
            refused.append(Failure(shown, exc.reason))
    return found, refused


def resolve_file_id(root: Path, components: Sequence[str]) -> Path:
    """The file a Referenced File ID (PS3.3 F.3.2.2, *components*) names in
    the folder *root* (resolved), which it must not leave.

    Raises
    ------
    ReferenceRefused
        for a component that is not a plain name, a path that leaves
        *root* (``..``, an absolute component, a symbolic link out of it),
        or a file that is not there.
    """
    names = [component.rstrip(" ") for component in components]  # CS values pad with spaces
    for name in names:
        if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
            raise ReferenceRefused(
                f"refused: the Referenced File ID component {name!r} is not a plain name "
                "(it could leave the DICOMDIR's folder)"
            )
    candidate = root.joinpath(*names)
    if not candidate.exists():
        candidate = _case_insensitive(root, names) or candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise ReferenceRefused("refused: the referenced file is outside the DICOMDIR's folder")
    if not resolved.is_file():
        raise ReferenceRefused("the DICOMDIR references a file that is not there")
    return resolved


def _case_insensitive(root: Path, names: Sequence[str]) -> Path | None:
    """*root* joined with *names*, each matched without regard to case."""
    here = root
    for name in names:
        try:
            entries = {entry.lower(): entry for entry in os.listdir(here)}
        except OSError:
            return None
        match = entries.get(name.lower())
        if match is None:
            return None
        here = here / match
    return here


def _is_dicomdir(path: Path) -> bool:
    try:
        meta = read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - a damaged File Meta is the ingest's to report
        return False
    return bool(meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage)


# --------------------------------------------------------------------------
# one file


def import_file(services: Services, path: Path) -> FileOutcome:
    """Import one file (called in a worker thread); never raises."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_PREAMBLE + len(_PREFIX))
            if head[_PREAMBLE:] != _PREFIX:
                return FileOutcome(Kind.NOT_DICOM)
            if _is_dicomdir(path):
                try:
                    references, refused = read_dicomdir(path)
                except ApplianceError as exc:
                    return FileOutcome(Kind.FAILED, exc.reason)
                return FileOutcome(
                    Kind.DICOMDIR, references=tuple(references), refused=tuple(refused)
                )
            fh.seek(0)
            result = services.ingest.store_part10(fh, ORIGIN)
    except OSError as exc:
        return FileOutcome(Kind.FAILED, f"the file cannot be read: {exc.strerror or exc}")
    except Exception as exc:  # one bad file must not end a long import
        # the class only: the message may quote a path, and paths stay out of logs
        LOGGER.error("import: unexpected error: %s", exc.__class__.__name__)
        LOGGER.debug("import: unexpected error", exc_info=True)
        return FileOutcome(Kind.FAILED, f"unexpected error: {exc.__class__.__name__}: {exc}")
    if result.outcome is AddOutcome.CREATED:
        return FileOutcome(Kind.STORED, status=result.status)
    if result.outcome is not None:
        label = {
            AddOutcome.DUPLICATE_KEPT: "kept",
            AddOutcome.REPLACED: "replaced",
            AddOutcome.DUPLICATE_REJECTED: "rejected",
        }[result.outcome]
        return FileOutcome(Kind.DUPLICATE, result.reason, result.status, label)
    if result.status.category is StatusCategory.FAILURE:
        reason = f"{result.status.name} (0x{int(result.status):04X}): {result.reason}"
        return FileOutcome(Kind.FAILED, reason, result.status)
    # a success or warning without an index outcome is not made by the ingest
    return FileOutcome(Kind.STORED, status=result.status)


# --------------------------------------------------------------------------
# the run


@dataclasses.dataclass(frozen=True)
class _Pending:
    path: Path
    size: int
    mtime_ns: int


def walk(paths: Sequence[Path], failed: list[Failure]) -> Iterator[Path]:
    """Every file under *paths* (folders recursively, in name order;
    symbolic links to folders are not followed); a folder that cannot be
    read is added to *failed*."""
    for path in paths:
        if not path.is_dir():
            yield path
            continue

        def unreadable(exc: OSError) -> None:
            failed.append(
                Failure(str(exc.filename), f"the folder cannot be read: {exc.strerror or exc}")
            )

        for folder, subfolders, files in os.walk(path, onerror=unreadable):
            subfolders.sort()
            for name in sorted(files):
                yield Path(folder) / name


def import_paths(
    services: Services,
    paths: Sequence[Path],
    journal: Journal,
    *,
    workers: int = 2,
    progress: Callable[[ImportReport], None] | None = None,
    scanned: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> ImportReport:
    """Import every file under *paths* (see the module docstring) with
    *workers* threads; *scanned* is called as files are found, *progress*
    after each file.  Once *stop* is set (the command sets it on Ctrl-C) no
    new file is taken, the files in progress finish and are recorded, and
    the report says ``stopped: interrupted``.
    """
    report = ImportReport()
    started = time.monotonic()
    seen: set[str] = set()
    queue: collections.deque[Path] = collections.deque()
    stop = stop if stop is not None else threading.Event()
    for path in walk(paths, report.failed):
        if stop.is_set():
            break
        key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            queue.append(Path(key))
            if scanned is not None and len(queue) % 1000 == 0:
                scanned(len(queue))
    report.total = len(queue) + len(report.failed)
    if scanned is not None:
        scanned(len(queue))

    in_flight: dict[concurrent.futures.Future[FileOutcome], _Pending] = {}
    resource_failures = 0
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="import") as pool:
        while queue or in_flight:
            if stop.is_set() and not report.stopped:
                report.stopped = "interrupted"
            while queue and not report.stopped and len(in_flight) < 2 * workers:
                pending = _admit(queue.popleft(), journal, report)
                if pending is not None:
                    in_flight[pool.submit(import_file, services, pending.path)] = pending
                elif progress is not None:
                    progress(report)
            if not in_flight:
                if report.stopped:
                    break
                continue
            # a timeout, so that a stop is seen while a slow file is read
            finished, _ = concurrent.futures.wait(
                in_flight, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                pending = in_flight.pop(future)
                outcome = future.result()
                _count(outcome, pending, journal, report, queue, seen)
                if outcome.kind is Kind.FAILED and outcome.status in _RESOURCE_FAILURES:
                    resource_failures += 1
                elif outcome.kind is not Kind.DICOMDIR:
                    resource_failures = 0
                if resource_failures >= STOP_AFTER and not report.stopped:
                    report.stopped = (
                        f"{STOP_AFTER} storage or index failures in a row "
                        f"(the last: {outcome.reason})"
                    )
                    LOGGER.error("import: stopped after %s", report.stopped)
                report.seconds = time.monotonic() - started
                if progress is not None:
                    progress(report)
    report.seconds = time.monotonic() - started
    LOGGER.info(
        "import: %d stored, %d duplicate, %d failed, %d skipped in %.1f s%s",
        report.stored,
        report.duplicate,
        len(report.failed),
        report.skipped,
        report.seconds,
        f" ({report.stopped})" if report.stopped else "",
    )
    return report


def _admit(path: Path, journal: Journal, report: ImportReport) -> _Pending | None:
    """*path* to import, or None if it is done before, not a regular file, or
    gone (each counted in *report*)."""
    try:
        info = path.stat()
    except OSError as exc:
        report.failed.append(Failure(str(path), f"the file cannot be read: {exc.strerror or exc}"))
        return None
    if not stat.S_ISREG(info.st_mode):
        report.skipped_not_dicom += 1  # a device, socket or FIFO: never DICOM
        return None
    if journal.is_done(str(path), info.st_size, info.st_mtime_ns):
        report.skipped_done_before += 1
        return None
    return _Pending(path, info.st_size, info.st_mtime_ns)


def _count(
    outcome: FileOutcome,
    pending: _Pending,
    journal: Journal,
    report: ImportReport,
    queue: collections.deque[Path],
    seen: set[str],
) -> None:
    """Add one file's *outcome* to *report* and the journal."""
    kind = outcome.kind
    if kind is Kind.STORED:
        report.stored += 1
        report.bytes += pending.size
    elif kind is Kind.DUPLICATE:
        report.duplicates[outcome.duplicate] += 1
        report.bytes += pending.size
    elif kind is Kind.NOT_DICOM:
        report.skipped_not_dicom += 1
    elif kind is Kind.FAILED:
        report.failed.append(Failure(str(pending.path), outcome.reason))
    else:
        report.dicomdirs += 1
        report.total -= 1  # a DICOMDIR is a list, not a file to count
        report.failed.extend(outcome.refused)
        report.total += len(outcome.refused)
        for reference in outcome.references:
            key = str(reference)
            if key not in seen:
                seen.add(key)
                queue.append(reference)
                report.total += 1
    if kind in (Kind.STORED, Kind.DUPLICATE, Kind.NOT_DICOM):
        journal.record(str(pending.path), pending.size, pending.mtime_ns)
