"""The audit trail: who touched which studies, how, and with what outcome.

Every access to patient data (store, query, retrieve, delete, export) is one
:class:`AuditEvent`, written as one JSON object per line to a file of its
own per UTC day (``audit.path``/``audit-YYYY-MM-DD.jsonl``), apart from the
service log.  The events follow the audit messages of DICOM PS3.15 Annex
A.5 (IHE ATNA): the EventID and EventActionCode of the message each action
corresponds to (:data:`ATNA_EVENTS`), the EventOutcomeIndicator
(:class:`Outcome`), the active participant (a user or a Calling AE Title,
with its network address), the participant objects (Study Instance UIDs),
and the time.

What is never written (unless ``audit.record_query_values``): the values of
query keys, which may be a patient's name or ID.  UIDs, AE titles, user
names, addresses and key names are written; a study's UIDs are patient data
in the eyes of the law, so the files are created readable by their owner
only (folder 0700, files 0600).

Writing: each process (gunicorn workers, DIMSE workers, the background
worker) opens the day's file with ``O_APPEND`` and writes each event with one
``write()`` of one whole line, so lines of several processes never mix (the
kernel appends each write whole to a regular file on a local file system).
Nothing is buffered in the process: once :meth:`AuditLog.record` returns, a
crash of the process loses nothing; with ``audit.fsync`` a power loss does
not either.  A failure to write is logged (``appliance.audit``) and counted
(``appliance_audit_write_failures_total``), never raised into the request
that caused it.

Retention: a file whose day is more than ``audit.retention_days`` ago is
deleted when a process opens its first file of a day.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from appliance import metrics
from appliance.config import AuditConfig
from appliance.logs import CORRELATION_ID

LOGGER = logging.getLogger(__name__)

#: The name of a daily file, and its day.
FILE_PATTERN = re.compile(r"audit-(\d{4}-\d{2}-\d{2})\.jsonl")
FOLDER_MODE = 0o700
FILE_MODE = 0o600


class Action(enum.StrEnum):
    """What was done to patient data."""

    STORE = "store"
    QUERY = "query"
    RETRIEVE = "retrieve"
    DELETE = "delete"
    EXPORT = "export"


@dataclasses.dataclass(frozen=True)
class AtnaEvent:
    """An audit message of PS3.15 A.5.3: its EventID (a code of DCM, the
    DICOM Controlled Terminology of PS3.16) and EventActionCode."""

    code: str
    meaning: str
    #: C create, R read, U update, D delete, E execute (PS3.15 A.5.1)
    action_code: str


#: The message each action corresponds to.
ATNA_EVENTS: Mapping[Action, AtnaEvent] = {
    # A.5.3.7: instances received (the receiver records Create)
    Action.STORE: AtnaEvent("110104", "DICOM Instances Transferred", "C"),
    # A.5.3.10: a query (QIDO-RS, C-FIND, the change feed)
    Action.QUERY: AtnaEvent("110112", "Query", "E"),
    # A.5.3.7: instances sent (the sender records Read): WADO-RS, C-GET, C-MOVE
    Action.RETRIEVE: AtnaEvent("110104", "DICOM Instances Transferred", "R"),
    # A.5.3.8: DICOM Study Deleted
    Action.DELETE: AtnaEvent("110105", "DICOM Study Deleted", "D"),
    # A.5.3.4 (Data Export): data leaving our control (forwarding, DICOMcast)
    Action.EXPORT: AtnaEvent("110106", "Export", "R"),
}


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881 5.1.4)."""

    SUCCESS = 0
    #: the action was not completed, e.g. refused (invalid request,
    #: authentication or permission), or partly done
    MINOR_FAILURE = 4
    #: the action ended abnormally (a failure of the appliance)
    SERIOUS_FAILURE = 8
    #: a failure that made the function unavailable
    MAJOR_FAILURE = 12


@dataclasses.dataclass(frozen=True)
class AuditEvent:
    """One access to patient data.

    Attributes
    ----------
    action
        What was done.
    outcome
        How it went.
    protocol
        How: ``dicomweb``, ``dimse``, ``forward``, ``fhir`` or ``system``.
    who
        The user (HTTP: the authenticated principal, else ``anonymous``),
        the Calling AE Title (DIMSE), or the appliance's task (``forward``,
        ``dicomcast``, ``retention``).
    address
        The requestor's network address (HTTP: the socket peer; a reverse
        proxy's X-Forwarded-For is not trusted), or the destination's URL
        for an export.
    destination
        Where data went, when not to *who*: the Move Destination of a
        C-MOVE, the ``[[forward]]`` destination, the FHIR server.
    studies
        The Study Instance UIDs touched (stored, found, sent, deleted).
    instances
        Instances stored, sent or deleted; matches of a query.
    failed
        Instances (or sub-operations) that failed.
    status
        The HTTP status or the DIMSE status code sent; None if none applies.
    transaction
        The protocol's name of the operation (``stow.store_instances``,
        ``C-FIND``, ``C-MOVE``...).
    query_keys
        The names of the query's matching keys (never their values).
    query
        The query keys with their values: only with
        ``audit.record_query_values``.
    correlation_id
        The request's or association's id, as on the service log's lines.
    partition
        The data partition of the studies, when partitions are on and it is
        not the default one (README "Data partitions"): the same UIDs may
        name other studies in another partition.
    time
        When it ended (UTC).
    """

    action: Action
    outcome: Outcome
    protocol: str
    who: str
    address: str = ""
    destination: str = ""
    studies: tuple[str, ...] = ()
    instances: int = 0
    failed: int = 0
    status: int | None = None
    transaction: str = ""
    query_keys: tuple[str, ...] = ()
    query: Mapping[str, str] | None = None
    correlation_id: str | None = None
    partition: str = ""
    time: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def as_json(self) -> dict[str, Any]:
        """The event as its JSON line's object (empty fields left out, but
        ``instances``, even 0: a query that matched nothing)."""
        atna = ATNA_EVENTS[self.action]
        out: dict[str, Any] = {
            "time": self.time.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
            "action": self.action.value,
            "outcome": int(self.outcome),
            "event": {"code": atna.code, "meaning": atna.meaning, "action": atna.action_code},
            "protocol": self.protocol,
            "who": self.who,
        }
        optional: dict[str, Any] = {
            "address": self.address,
            "destination": self.destination,
            "transaction": self.transaction,
            "studies": list(self.studies),
            "failed": self.failed,
            "query_keys": list(self.query_keys),
            "query": dict(self.query) if self.query else None,
            "correlation_id": self.correlation_id,
            "partition": self.partition,
        }
        out.update((key, value) for key, value in optional.items() if value)
        out["instances"] = self.instances
        if self.status is not None:
            out["status"] = self.status
        return out


def outcome_of_counts(done: int, failed: int) -> Outcome:
    """Success if nothing failed; a minor failure if some of it was done; a
    serious failure if none of it was."""
    if not failed:
        return Outcome.SUCCESS
    return Outcome.MINOR_FAILURE if done else Outcome.SERIOUS_FAILURE


class AuditLog:
    """Writes :class:`AuditEvent` lines to the daily files of
    ``audit.path``.  One per process is enough; several (in one process or
    many) may write to the same folder.  Files are opened on first use in
    the process that writes (never inherited through a fork)."""

    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._pid = -1
        self._day: dt.date | None = None
        self._fd = -1

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def record_query_values(self) -> bool:
        return self.config.record_query_values

    def record(self, event: AuditEvent) -> None:
        """Append *event* as one line (when enabled); never raises."""
        if not self.config.enabled:
            return
        try:
            if event.correlation_id is None:
                found = CORRELATION_ID.get()
                if found:
                    event = dataclasses.replace(event, correlation_id=found)
            line = json.dumps(event.as_json(), ensure_ascii=False, separators=(",", ":"))
            self._append((line + "\n").encode("utf-8"), event.time.astimezone(dt.UTC).date())
        except Exception as exc:  # noqa: BLE001 - auditing never fails the audited work
            metrics.AUDIT_WRITE_FAILURES.inc()
            LOGGER.error(
                "an audit event (%s by %s) could not be written: %s: %s",
                event.action.value,
                event.who,
                exc.__class__.__name__,
                exc,
            )

    def _append(self, data: bytes, day: dt.date) -> None:
        with self._lock:
            if self._pid != os.getpid() or self._day != day:
                self._open(day)
            written = os.write(self._fd, data)
            if written != len(data):
                # a regular file takes a whole write unless the disk is full
                raise OSError(f"only {written} of {len(data)} bytes written")
            if self.config.fsync:
                os.fsync(self._fd)

    def _open(self, day: dt.date) -> None:
        """Open *day*'s file (closing the previous day's), and delete the
        files past retention."""
        if self._fd >= 0:  # the previous day's, or one inherited through a fork
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        folder = self.config.path
        folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        path = folder / file_name(day)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self._pid, self._day = os.getpid(), day
        self.prune(day)

    def prune(self, today: dt.date | None = None) -> list[Path]:
        """Delete the daily files older than ``audit.retention_days`` before
        *today* (default: the current UTC day); the files deleted."""
        if not self.config.retention_days:
            return []
        today = today or dt.datetime.now(dt.UTC).date()
        oldest = today - dt.timedelta(days=self.config.retention_days)
        removed = []
        for path, day in daily_files(self.config.path):
            if day < oldest:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        if removed:
            LOGGER.info(
                "audit: %d daily file(s) older than %d days deleted",
                len(removed),
                self.config.retention_days,
            )
        return removed

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._fd, self._day = -1, None


def file_name(day: dt.date) -> str:
    return f"audit-{day.isoformat()}.jsonl"


def daily_files(folder: Path) -> list[tuple[Path, dt.date]]:
    """The daily files in *folder*, oldest first (none if it is missing)."""
    found = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        match = FILE_PATTERN.fullmatch(name)
        if match is None:
            continue
        try:
            day = dt.date.fromisoformat(match.group(1))
        except ValueError:
            continue
        found.append((folder / name, day))
    return sorted(found, key=lambda item: item[1])


# ------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class EventFilter:
    """Which events :func:`read_events` yields (None / empty: any)."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    study: str | None = None
    who: str | None = None
    actions: frozenset[str] = frozenset()
    #: True: success only; False: failures only
    success: bool | None = None

    def matches(self, event: Mapping[str, Any]) -> bool:
        if self.actions and event.get("action") not in self.actions:
            return False
        if self.who is not None and event.get("who") != self.who:
            return False
        if self.study is not None and self.study not in (event.get("studies") or ()):
            return False
        if self.success is not None and (event.get("outcome") == 0) is not self.success:
            return False
        if self.since is not None or self.until is not None:
            try:
                when = dt.datetime.fromisoformat(str(event.get("time")))
            except ValueError:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True


@dataclasses.dataclass
class ReadReport:
    """What :func:`read_events` skipped."""

    #: lines that are not a JSON object (e.g. cut short by a full disk)
    unreadable: int = 0


def read_events(
    folder: Path, selected: EventFilter, report: ReadReport | None = None
) -> Iterator[dict[str, Any]]:
    """The events of *folder*'s daily files that *selected* matches, in the
    order written (by day, then line)."""
    report = report if report is not None else ReadReport()
    first = selected.since.astimezone(dt.UTC).date() if selected.since else None
    last = selected.until.astimezone(dt.UTC).date() if selected.until else None
    for path, day in daily_files(folder):
        if (first is not None and day < first) or (last is not None and day > last):
            continue
        try:
            fh = path.open("rb")
        except FileNotFoundError:  # deleted by retention meanwhile
            continue
        with fh:
            for raw in fh:
                event = _parse(raw)
                if event is None:
                    report.unreadable += 1
                elif selected.matches(event):
                    yield event


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def study_uids(values: Iterable[object]) -> tuple[str, ...]:
    """The distinct non-empty UIDs of *values*, in first-seen order."""
    return tuple(dict.fromkeys(str(v) for v in values if v))
