"""Extended query tags (issue 11): attributes the index does not hold by
default, added by an administrator and then matched by QIDO-RS and C-FIND.

The shapes follow Microsoft's DICOM server (REFERENCE.md, "Extended query
tags"): a tag is named by its ``path`` (eight hex digits, or a keyword on
input), has a VR, a private creator for a private tag, a level (Study,
Series or Instance), a ``status`` (Adding, Ready, Deleting), a
``queryStatus`` (Enabled, Disabled) and a count of the instances whose value
failed validation.  Adding tags starts a re-index of the instances already
stored (:mod:`appliance.reindex`); while it runs the tags are ``Adding`` and
cannot be queried.

Only top-level attributes are supported (no attribute inside a sequence),
of the VRs in :data:`VR_FAMILY`.  Each value is kept in a typed table of its
VR family (``eqt_string``, ``eqt_long``, ``eqt_double``, ``eqt_datetime``,
:mod:`appliance.index.schema`) with an index on ``(tag_key, value)``; a
multi-valued attribute has a row per value and matches if one value does.

A value that fails validation for the tag's VR is never a reason to refuse
the instance: the instance is stored, the value left out of the index, and
an ``eqt_error`` row names the tag, the instance and the problem (never the
value: it may be patient data).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from appliance.dicomio import HEADER_ERRORS, is_valid_uid, normalize_da, tm_key
from appliance.errors import ApplianceError, Conflict, IndexUnavailable, NotFound, QueryError
from appliance.index.engine import as_utc
from appliance.index.schema import (
    eqt_datetime,
    eqt_double,
    eqt_error,
    eqt_long,
    eqt_operation,
    eqt_string,
    extended_query_tag,
    instance,
    series,
    study,
)
from appliance.index.sql import AlsoWrite
from appliance.model import Level
from appliance.query import matching
from appliance.query.keys import ATTRIBUTES, Attribute, rank
from appliance.status import Status

log = logging.getLogger(__name__)

#: The VRs an extended query tag may have, and the value table of each.
VR_FAMILY: Mapping[str, str] = {
    **dict.fromkeys(("AE", "AS", "CS", "LO", "PN", "SH", "UI"), "string"),
    **dict.fromkeys(("IS", "SL", "SS", "UL", "US"), "long"),
    **dict.fromkeys(("DS", "FD", "FL"), "double"),
    **dict.fromkeys(("DA", "DT", "TM"), "datetime"),
}
_TABLES: Mapping[str, Table] = {
    "string": eqt_string,
    "long": eqt_long,
    "double": eqt_double,
    "datetime": eqt_datetime,
}


def value_tables() -> tuple[Table, ...]:
    """The value tables, one per VR family."""
    return tuple(_TABLES.values())


#: The column each family matches on (the one its index covers).
_MATCH_COLUMN: Mapping[str, str] = {
    "string": "value_norm",
    "long": "value",
    "double": "value",
    "datetime": "value_key",
}

#: Tag status (Microsoft's ``ExtendedQueryTagStatus``).
ADDING, READY, DELETING = "Adding", "Ready", "Deleting"
#: Query status (Microsoft's ``QueryStatus``).
ENABLED, DISABLED = "Enabled", "Disabled"
#: Operation status (Microsoft's ``OperationStatus``).
NOT_STARTED, RUNNING, COMPLETED, FAILED = "NotStarted", "Running", "Completed", "Failed"
REINDEX = "Reindex"

#: Tag level names of the API, and the Q/R level of each.
LEVELS: Mapping[str, Level] = {
    "study": Level.STUDY,
    "series": Level.SERIES,
    "instance": Level.IMAGE,
}
LEVEL_NAMES: Mapping[Level, str] = {
    Level.STUDY: "Study",
    Level.SERIES: "Series",
    Level.IMAGE: "Instance",
}
#: The most tags one request may add (as Microsoft's server).
MAX_TAGS_PER_REQUEST = 128
#: How long a process trusts its list of tags before reading it again.  A
#: re-index does not finish before twice this has passed since its tags
#: were added, so that every ingest has seen them by then.
CACHE_SECONDS = 2.0

_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
_AS = re.compile(r"\d{3}[DWMY]")
_CS = re.compile(r"[A-Z0-9 _]*")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")
#: PS3.5 6.2: the longest value of each string VR (PN: per component group).
_MAX_LENGTH: Mapping[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DS": 16,
    "IS": 12,
    "LO": 64,
    "PN": 64,
    "SH": 16,
    "UI": 64,
}
#: struct formats of the binary VRs (little endian: the transfer syntaxes
#: this appliance stores are little endian but for the retired big endian).
_BINARY: Mapping[str, str] = {"FD": "d", "FL": "f", "SL": "l", "SS": "h", "UL": "L", "US": "H"}


class InvalidTag(ApplianceError):
    """A tag to add, or a tag named in a request, is not acceptable: 400."""

    status = Status.CANNOT_UNDERSTAND


# --------------------------------------------------------------------------
# the tags


@dataclasses.dataclass(frozen=True)
class ExtendedTag:
    """One extended query tag, as stored."""

    key: int
    path: str  # eight upper-case hex digits
    vr: str
    private_creator: str
    level: Level
    status: str
    query_status: str
    error_count: int
    operation_id: str | None
    created_at: dt.datetime

    @property
    def tag(self) -> int:
        """The tag as a number."""
        return int(self.path, 16)

    @property
    def keyword(self) -> str:
        """The PS3.6 keyword ("" for a private tag)."""
        return "" if self.private_creator else keyword_for_tag(self.tag)

    @property
    def family(self) -> str:
        """The value table family of its VR."""
        return VR_FAMILY[self.vr]

    @property
    def queryable(self) -> bool:
        """True if a query may match on it: Ready and Enabled."""
        return self.status == READY and self.query_status == ENABLED

    def as_json(self, root: str) -> dict[str, Any]:
        """The tag as the API shows it (*root*: the service root URL)."""
        body: dict[str, Any] = {
            "path": self.path,
            "vr": self.vr,
            "level": LEVEL_NAMES[self.level],
            "status": self.status,
            "queryStatus": self.query_status,
        }
        if self.error_count:  # as Microsoft's server: only when there are some
            body["errors"] = {
                "count": self.error_count,
                "href": f"{root}/extendedquerytags/{self.path}/errors",
            }
        if self.private_creator:
            body["privateCreator"] = self.private_creator
        if self.operation_id and self.status == ADDING:
            body["operation"] = operation_reference(root, self.operation_id)
        return body


def operation_reference(root: str, operation_id: str) -> dict[str, str]:
    """``{id, href}`` of an operation (Microsoft's ``OperationReference``)."""
    return {"id": operation_id, "href": f"{root}/operations/{operation_id}"}


def tag_of(row: Any) -> ExtendedTag:
    created = as_utc(row.created_at)
    return ExtendedTag(
        key=int(row.key),
        path=str(row.path),
        vr=str(row.vr),
        private_creator=str(row.private_creator),
        level=LEVELS[str(row.level).lower()],
        status=str(row.status),
        query_status=str(row.query_status),
        error_count=int(row.error_count),
        operation_id=row.operation_id,
        created_at=created,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True)
class NewTag:
    """A tag to add, validated."""

    path: str
    vr: str
    private_creator: str
    level: Level


def parse_new_tag(entry: object) -> NewTag:
    """Validate one entry of ``POST /extendedquerytags``: ``{path, vr?,
    privateCreator?, level}``.

    Raises
    ------
    InvalidTag
        naming what is wrong.
    """
    if not isinstance(entry, dict):
        raise InvalidTag("each extended query tag must be a JSON object")
    # member names in any case, as Microsoft's server takes them ("Path",
    # "VR", "PrivateCreator", "Level" in its guide)
    names = {"path": "path", "vr": "vr", "privatecreator": "privateCreator", "level": "level"}
    unknown = sorted(str(name) for name in entry if str(name).lower() not in names)
    if unknown:
        raise InvalidTag(f"unknown member(s) {unknown} of an extended query tag")
    if len({str(name).lower() for name in entry}) != len(entry):
        raise InvalidTag("a member of an extended query tag is given twice")
    entry = {names[str(name).lower()]: value for name, value in entry.items()}
    name, vr, creator, level = (
        entry.get("path"),
        entry.get("vr"),
        entry.get("privateCreator"),
        entry.get("level"),
    )
    if not isinstance(name, str) or not name.strip():
        raise InvalidTag("an extended query tag needs a path (a keyword or ggggeeee)")
    name = name.strip()
    if "." in name:
        raise InvalidTag(f"{name}: only top-level attributes can be extended query tags")
    if _HEX8.fullmatch(name):
        tag = int(name, 16)
    else:
        found = tag_for_keyword(name)
        if found is None:
            raise InvalidTag(f"{name!r} is neither a DICOM keyword nor a tag ggggeeee")
        tag = int(found)
    path = f"{tag:08X}"
    group, element = tag >> 16, tag & 0xFFFF
    if group in (0x0000, 0x0002, 0x0006, 0xFFFE) or group < 0x0008:
        raise InvalidTag(f"{path}: the tag is not an attribute of a data set")
    private = group % 2 == 1
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise InvalidTag(f"{path}: level must be Study, Series or Instance")
    if vr is not None and (not isinstance(vr, str) or not vr.strip()):
        raise InvalidTag(f"{path}: vr must be a two-letter VR")
    if creator is not None and not isinstance(creator, str):
        raise InvalidTag(f"{path}: privateCreator must be a string")
    vr = vr.strip().upper() if vr else None
    creator = (creator or "").strip()
    if private:
        if element < 0x1000:
            raise InvalidTag(
                f"{path}: a private creator element or group length cannot be a query tag"
            )
        if not creator:
            raise InvalidTag(f"{path}: a private tag needs its privateCreator")
        if len(creator) > 64 or "\\" in creator:
            raise InvalidTag(f"{path}: privateCreator is not a valid LO value")
        if vr is None:
            raise InvalidTag(f"{path}: a private tag needs its vr")
    else:
        if creator:
            raise InvalidTag(f"{path}: privateCreator is only for a private tag")
        keyword = keyword_for_tag(tag)
        if not keyword:
            raise InvalidTag(f"{path}: the tag is not in the DICOM dictionary (PS3.6)")
        if keyword in ATTRIBUTES:
            raise InvalidTag(f"{path} ({keyword}) is already a query key of this server")
        known = dictionary_VR(tag)
        if vr is None:
            vr = known
        elif vr != known:
            raise InvalidTag(f"{path}: vr {vr} differs from the dictionary's {known}")
    if vr not in VR_FAMILY:
        raise InvalidTag(
            f"{path}: VR {vr} is not supported for an extended query tag "
            f"(supported: {' '.join(sorted(VR_FAMILY))})"
        )
    return NewTag(path, vr, creator, LEVELS[level.lower()])


# --------------------------------------------------------------------------
# values


@dataclasses.dataclass(frozen=True)
class Extracted:
    """The values of one tag in one instance, or why they are not valid."""

    tag: ExtendedTag
    rows: tuple[dict[str, Any], ...]
    error: str = ""


def read_tags(source: IO[bytes], tags: Sequence[ExtendedTag]) -> Dataset:
    """The elements of *tags* (and of their private creators) of the Part 10
    stream *source*, read up to the pixel data."""
    wanted = {Tag(0x0008, 0x0005)}
    for tag in tags:
        wanted.add(Tag(tag.tag))
        if tag.private_creator:
            group, block = tag.tag >> 16, (tag.tag >> 8) & 0xFF
            wanted.add(Tag(group, block))
    return dcmread(source, stop_before_pixels=True, specific_tags=sorted(wanted), force=True)


#: What reading a header for the tags may raise.
READ_ERRORS: tuple[type[Exception], ...] = (InvalidDicomError, *HEADER_ERRORS)


def read_values(source: IO[bytes], tags: Sequence[ExtendedTag]) -> list[Extracted]:
    """The values of *tags* in the Part 10 stream *source*; a header that
    cannot be read is an error of each tag (never raised)."""
    try:
        return extract(read_tags(source, tags), tags)
    except READ_ERRORS as exc:
        log.warning("extended query tags not read: %s", exc.__class__.__name__)
        reason = "the header could not be read for the extended query tags"
        return [Extracted(tag, (), reason) for tag in tags]


def values_writer(extracted: Sequence[Extracted]) -> AlsoWrite:
    """What writes *extracted* in the transaction that indexes the instance
    (:meth:`appliance.index.sql.SqlIndex.add_instance`'s ``also``)."""

    def write(conn: Connection, instance_id: int, study: int, series: int, again: bool) -> None:
        write_values(conn, extracted, instance_id, study, series, replace=again)

    return write


def extract(ds: Dataset, tags: Iterable[ExtendedTag]) -> list[Extracted]:
    """The values of *tags* in *ds*, each validated for its VR.  A tag the
    instance lacks (or has empty) gives nothing; an invalid value an
    :class:`Extracted` with an error."""
    found = []
    for tag in tags:
        try:
            values = _element_values(ds, tag)
            rows = tuple(_row(tag, value) for value in values)
        except ValueError as exc:
            found.append(Extracted(tag, (), str(exc)[:250]))
            continue
        if rows:
            found.append(Extracted(tag, rows))
    return found


def _element_values(ds: Dataset, tag: ExtendedTag) -> list[Any]:
    number = tag.tag
    if number not in ds:
        return []
    if tag.private_creator:
        group, block = number >> 16, (number >> 8) & 0xFF
        creator = ds.get((group, block))
        if creator is None or str(creator.value).strip() != tag.private_creator:
            return []  # the block belongs to another creator: not this attribute
    try:
        elem = ds[number]
        value = elem.value
    except HEADER_ERRORS:
        # pydicom's own text may quote the value (patient data): not kept
        raise ValueError(f"the value could not be read as {tag.vr}") from None
    if elem.VR == "SQ":
        raise ValueError(f"{tag.path} is a sequence, not a value of VR {tag.vr}")
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, bytes):
        return values_from_bytes(value, tag.vr)
    if elem.VR not in (tag.vr, "UN") and not (
        VR_FAMILY.get(elem.VR) == tag.family and tag.family != "string"
    ):
        raise ValueError(f"{tag.path} has VR {elem.VR} in the instance, not {tag.vr}")
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [item for item in items if str(item).strip() != ""]


def values_from_bytes(raw: bytes, vr: str) -> list[Any]:
    """Values of an element read without its VR (implicit VR, or UN)."""
    if vr in _BINARY:
        size = struct.calcsize("<" + _BINARY[vr])
        if len(raw) % size:
            raise ValueError(f"the value's length {len(raw)} is not a multiple of {size} ({vr})")
        return list(struct.unpack(f"<{len(raw) // size}{_BINARY[vr]}", raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [item for item in text.rstrip(" \0").split("\\") if item.strip(" \0")]


def _row(tag: ExtendedTag, value: Any) -> dict[str, Any]:
    """The value-table columns of one value (without the keys), validated.

    Raises
    ------
    ValueError
        naming the problem (never the value).
    """
    vr = tag.vr
    if tag.family == "long":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"the value is not an integer ({vr})")
        try:
            number = int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"the value is not an integer ({vr})") from None
        low, high = matching.INTEGER_RANGES[vr]
        if not low <= number <= high:
            raise ValueError(f"the value is outside the range of {vr} (PS3.5 6.2)")
        return {"value": number}
    if tag.family == "double":
        try:
            number_f = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"the value is not a number ({vr})") from None
        if vr == "DS" and isinstance(value, str) and len(value.strip()) > _MAX_LENGTH["DS"]:
            raise ValueError("the value is longer than 16 characters (DS)")
        if not math.isfinite(number_f):
            raise ValueError(f"the value is not a finite number ({vr})")
        return {"value": number_f}
    text = str(value).strip(" \0")
    if tag.family == "datetime":
        key = _time_key(vr, text)
        if not key:
            raise ValueError(f"the value is not a valid {vr} (PS3.5 6.2)")
        return {"value": text, "value_key": key}
    if vr == "PN":
        if any(len(group) > _MAX_LENGTH["PN"] for group in text.split("=")):
            raise ValueError("a component group is longer than 64 characters (PN)")
        return {"value": text, "value_norm": text.casefold()}
    if len(text) > _MAX_LENGTH[vr]:
        raise ValueError(f"the value is longer than {_MAX_LENGTH[vr]} characters ({vr})")
    if vr == "UI" and not is_valid_uid(text):
        raise ValueError("the value is not a valid UID (PS3.5 9.1)")
    if vr == "AS" and not _AS.fullmatch(text):
        raise ValueError("the value is not an age nnnD|W|M|Y (AS)")
    if vr == "CS" and not _CS.fullmatch(text):
        raise ValueError("the value holds characters CS does not allow (PS3.5 6.2)")
    if any(ord(char) < 0x20 for char in text):
        raise ValueError(f"the value holds control characters ({vr})")
    return {"value": text, "value_norm": text}


def _time_key(vr: str, text: str) -> str:
    """The sortable key of a DA, TM or DT value, "" if it is not valid."""
    if vr == "DA":
        text = normalize_da(text)
        if not re.fullmatch(r"\d{8}", text):
            return ""
        try:
            dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            return ""
        return text
    if vr == "TM":
        key = tm_key(text)
        if not key or int(key[0:2]) > 23 or int(key[2:4]) > 59 or int(key[4:6]) > 60:
            return ""
        return key
    return dt_key(text)


def dt_key(text: str) -> str:
    """A DT value as ``YYYYMMDDHHMMSS.FFFFFF`` (omitted components: month and
    day 01, the rest 0), "" if it is not a DT (PS3.5 6.2).  The UTC offset,
    if any, is not applied: values compare as written."""
    m = _DT.fullmatch(text.strip())
    if m is None:
        return ""
    year, month, day, hour, minute, second, fraction, _offset = m.groups()
    try:
        dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            min(int(second or 0), 59),
        )
    except ValueError:
        return ""
    return (
        f"{year}{month or '01'}{day or '01'}{hour or '00'}{minute or '00'}{second or '00'}"
        f".{(fraction or '').ljust(6, '0')}"
    )


def write_values(
    conn: Connection,
    extracted: Sequence[Extracted],
    instance_id: int,
    study_fk: int,
    series_fk: int,
    *,
    replace: bool = False,
) -> None:
    """Write the values of one instance, in the caller's transaction.

    Tags deleted since the caller's list of tags was read are skipped (their
    rows are read with a shared lock, so a deletion waits for this
    transaction); *replace* removes the instance's earlier values first."""
    if replace:
        for table in (*_TABLES.values(), eqt_error):
            conn.execute(delete(table).where(table.c.instance_fk == instance_id))
    if not extracted:
        return
    keys = sorted({item.tag.key for item in extracted})
    live = set(
        conn.execute(
            select(extended_query_tag.c.key)
            .where(
                extended_query_tag.c.key.in_(keys),
                extended_query_tag.c.status != DELETING,
            )
            .with_for_update(read=True)
        ).scalars()
    )
    ids = {"instance_fk": instance_id, "study_fk": study_fk, "series_fk": series_fk}
    now = _now()
    for item in extracted:
        if item.tag.key not in live:
            continue
        if item.error:
            done = conn.execute(
                insert(eqt_error).values(
                    tag_key=item.tag.key,
                    instance_fk=instance_id,
                    message=item.error,
                    created_at=now,
                )
            )
            if done.rowcount:
                conn.execute(
                    update(extended_query_tag)
                    .where(extended_query_tag.c.key == item.tag.key)
                    .values(error_count=extended_query_tag.c.error_count + 1)
                )
            continue
        conn.execute(
            insert(_TABLES[item.tag.family]),
            [{"tag_key": item.tag.key, **ids, **row} for row in item.rows],
        )


# --------------------------------------------------------------------------
# the registry


class ExtendedTags:
    """The extended query tags of one index: their administration, a cached
    list for ingest and queries, and their matching conditions.

    Parameters
    ----------
    engine
        The index database.
    cache_seconds
        How long the list of tags is trusted before it is read again (a
        change made through this object is seen at once).
    """

    def __init__(self, engine: Engine, cache_seconds: float = CACHE_SECONDS) -> None:
        self._engine = engine
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._tags: tuple[ExtendedTag, ...] = ()
        self._read_at = -math.inf

    # ---------------------------------------------------------------- reads

    def all(self, *, fresh: bool = False) -> tuple[ExtendedTag, ...]:
        """Every tag, in path order (from the cache unless *fresh*)."""
        with self._lock:
            if fresh or time.monotonic() - self._read_at > self._cache_seconds:
                try:
                    with self._engine.connect() as conn:
                        rows = conn.execute(
                            select(extended_query_tag).order_by(extended_query_tag.c.path)
                        ).all()
                        # counted, not the stored counter: an instance deleted
                        # takes its errors with it (ON DELETE CASCADE)
                        counted = select(eqt_error.c.tag_key, func.count(eqt_error.c.id)).group_by(
                            eqt_error.c.tag_key
                        )
                        counts = {int(key): int(n) for key, n in conn.execute(counted)}
                except SQLAlchemyError as exc:
                    raise IndexUnavailable(
                        f"the index database failed ({exc.__class__.__name__})"
                    ) from exc
                self._tags = tuple(
                    dataclasses.replace(tag_of(row), error_count=int(counts.get(row.key, 0)))
                    for row in rows
                )
                self._read_at = time.monotonic()
            return self._tags

    def invalidate(self) -> None:
        """Forget the cached list: the next read goes to the database."""
        with self._lock:
            self._read_at = -math.inf

    def indexed(self) -> tuple[ExtendedTag, ...]:
        """The tags whose values ingest writes: Adding and Ready."""
        return tuple(tag for tag in self.all() if tag.status in (ADDING, READY))

    def find(self, name: str) -> ExtendedTag | None:
        """The tag named *name* (``ggggeeee`` or a keyword), or None."""
        if _HEX8.fullmatch(name):
            path = name.upper()
            return next((tag for tag in self.all() if tag.path == path), None)
        return next((tag for tag in self.all() if tag.keyword and tag.keyword == name), None)

    def get(self, name: str) -> ExtendedTag:
        """The tag named *name*, read from the database.

        Raises
        ------
        NotFound
            if there is none.
        """
        self.invalidate()
        found = self.find(name)
        if found is None:
            raise NotFound(f"no extended query tag is named {name!r}")
        return found

    def operation(self, operation_id: str) -> dict[str, Any]:
        """An operation's row as a dict.

        Raises
        ------
        NotFound
            if there is none.
        """
        with self._engine.connect() as conn:
            row = conn.execute(
                select(eqt_operation).where(eqt_operation.c.id == operation_id)
            ).first()
        if row is None:
            raise NotFound(f"no operation has the id {operation_id!r}")
        return dict(row._mapping)

    def errors(self, name: str, limit: int, offset: int) -> list[dict[str, Any]]:
        """The errors of one tag: ``{studyInstanceUid, seriesInstanceUid,
        sopInstanceUid, createdTime, errorMessage}`` in the order found."""
        tag = self.get(name)
        query = (
            select(
                study.c.study_instance_uid,
                series.c.series_instance_uid,
                instance.c.sop_instance_uid,
                eqt_error.c.created_at,
                eqt_error.c.message,
            )
            .select_from(
                eqt_error.join(instance, instance.c.id == eqt_error.c.instance_fk)
                .join(series, series.c.id == instance.c.series_fk)
                .join(study, study.c.id == instance.c.study_fk)
            )
            .where(eqt_error.c.tag_key == tag.key)
            .order_by(eqt_error.c.id)
            .limit(limit)
            .offset(offset)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "studyInstanceUid": row.study_instance_uid,
                "seriesInstanceUid": row.series_instance_uid,
                "sopInstanceUid": row.sop_instance_uid,
                "createdTime": as_utc(row.created_at).isoformat(),
                "errorMessage": row.message,
            }
            for row in rows
        ]

    # ---------------------------------------------------------------- writes

    def add(self, entries: Sequence[object]) -> str:
        """Add the tags of a ``POST /extendedquerytags`` body and the
        re-index operation that indexes the instances already stored; the id
        of the operation.

        Raises
        ------
        InvalidTag
            for a malformed entry, too many, or the same tag twice.
        Conflict
            if a tag already exists.
        """
        if not entries:
            raise InvalidTag("the request names no extended query tag")
        if len(entries) > MAX_TAGS_PER_REQUEST:
            raise InvalidTag(f"at most {MAX_TAGS_PER_REQUEST} tags can be added at once")
        tags = [parse_new_tag(entry) for entry in entries]
        paths = [tag.path for tag in tags]
        if len(set(paths)) != len(paths):
            raise InvalidTag("the request names a tag more than once")
        operation_id = str(uuid.uuid4())
        now = _now()
        try:
            with self._engine.begin() as conn:
                existing = (
                    conn.execute(
                        select(extended_query_tag.c.path).where(
                            extended_query_tag.c.path.in_(paths)
                        )
                    )
                    .scalars()
                    .all()
                )
                if existing:
                    raise Conflict(f"extended query tag(s) {', '.join(existing)} already exist")
                end_id, total = conn.execute(
                    select(func.coalesce(func.max(instance.c.id), 0), func.count(instance.c.id))
                ).one()
                conn.execute(
                    insert(eqt_operation).values(
                        id=operation_id,
                        type=REINDEX,
                        status=NOT_STARTED,
                        tag_paths=",".join(paths),
                        cursor=0,
                        end_id=int(end_id),
                        done=0,
                        total=int(total),
                        created_at=now,
                        updated_at=now,
                    )
                )
                conn.execute(
                    insert(extended_query_tag),
                    [
                        {
                            "path": tag.path,
                            "vr": tag.vr,
                            "private_creator": tag.private_creator,
                            "level": LEVEL_NAMES[tag.level],
                            "status": ADDING,
                            "query_status": ENABLED,
                            "error_count": 0,
                            "operation_id": operation_id,
                            "created_at": now,
                        }
                        for tag in tags
                    ],
                )
        except IntegrityError:
            raise Conflict("an extended query tag of this request was added meanwhile") from None
        self.invalidate()
        return operation_id

    def set_query_status(self, name: str, query_status: str) -> ExtendedTag:
        """PATCH a tag's query status (Enabled | Disabled)."""
        if query_status not in (ENABLED, DISABLED):
            raise InvalidTag("queryStatus must be Enabled or Disabled")
        tag = self.get(name)
        with self._engine.begin() as conn:
            conn.execute(
                update(extended_query_tag)
                .where(extended_query_tag.c.key == tag.key)
                .values(query_status=query_status)
            )
        return self.get(name)

    def delete(self, name: str, batch: int = 5000) -> None:
        """Delete a tag: marked Deleting first (queries refuse it, ingest
        stops writing it), then its values removed in batches, then the tag.

        Raises
        ------
        NotFound
            if there is no such tag.
        """
        tag = self.get(name)
        with self._engine.begin() as conn:
            conn.execute(
                update(extended_query_tag)
                .where(extended_query_tag.c.key == tag.key)
                .values(status=DELETING)
            )
        self.invalidate()
        for table in (*_TABLES.values(), eqt_error):
            while True:
                with self._engine.begin() as conn:
                    ids = (
                        conn.execute(
                            select(table.c.id).where(table.c.tag_key == tag.key).limit(batch)
                        )
                        .scalars()
                        .all()
                    )
                    if not ids:
                        break
                    conn.execute(delete(table).where(table.c.id.in_(ids)))
        with self._engine.begin() as conn:
            conn.execute(delete(extended_query_tag).where(extended_query_tag.c.key == tag.key))
        self.invalidate()

    # ------------------------------------------------------------- matching

    def resolve(self, name: str) -> ExtendedTag | None:
        """The tag a query key *name* names (``ggggeeee`` or keyword), or
        None if it names none.

        Raises
        ------
        QueryError
            if the tag exists but may not be queried (being added, being
            deleted, or its query status Disabled).
        """
        tag = self.find(name)
        if tag is None:
            return None
        if tag.status == DELETING:
            raise QueryError(f"{name} is not a supported matching key (it is being deleted)")
        if tag.status == ADDING:
            raise QueryError(
                f"the extended query tag {tag.path} is not queryable yet: its re-index "
                "operation is running"
            )
        if tag.query_status != ENABLED:
            raise QueryError(
                f"the extended query tag {tag.path} is not queryable: its queryStatus is "
                "Disabled (some values failed validation; PATCH it to Enabled to query)"
            )
        return tag


#: The entity table and value-table column of each tag level.
def _entity(tag_level: Level) -> tuple[Table, str]:
    return {
        Level.STUDY: (study, "study_fk"),
        Level.SERIES: (series, "series_fk"),
        Level.IMAGE: (instance, "instance_fk"),
    }[tag_level]


def condition(tag: ExtendedTag, value: str, query_level: Level) -> ColumnElement[bool] | None:
    """The condition of a query at *query_level* on the extended *tag*, or
    None for Universal Matching: the entity of the tag's level is among
    those with a matching value.  The rules are those of the standard keys
    (PS3.4 C.2.2.2, :mod:`appliance.query.matching`).

    Raises
    ------
    QueryError
        for a tag below the query level (PS3.4 C.4.1.2.1) or a value
        malformed for the tag's VR.
    """
    name = tag.keyword or tag.path
    if query_level is Level.PATIENT or rank(tag.level) > rank(query_level):
        raise QueryError(
            f"{name} is a {tag.level.value}-level extended query tag and cannot be "
            f"matched in a {query_level.value}-level query"
        )
    table = _TABLES[tag.family]
    column = table.c[_MATCH_COLUMN[tag.family]]
    found = _value_condition(tag, name, column, value)
    if found is None:
        return None
    entity, fk = _entity(tag.level)
    return entity.c.id.in_(select(table.c[fk]).where(table.c.tag_key == tag.key, found))


def _value_condition(
    tag: ExtendedTag, name: str, column: ColumnElement[Any], value: str
) -> ColumnElement[bool] | None:
    value = value.strip()
    if matching.is_universal(value):
        return None  # PS3.4 C.2.2.2.3
    vr = tag.vr
    if vr in ("AE", "CS", "LO", "SH", "PN", "UI", "DA", "TM", *matching.INTEGER_RANGES):
        # the standard keys' rules: Single Value, Wild Card (AE CS LO SH PN),
        # List of UID (UI), Range (DA TM), integers as numbers; the PN
        # column is casefolded
        return matching.condition(Attribute(name, tag.level, vr, "value"), column, value)
    if matching.has_wildcard(value):
        # PS3.4 C.2.2.2.4: wild cards only for the VRs listed there
        raise QueryError(f"{name}: wild cards are not allowed for {vr} (PS3.4 C.2.2.2.4)")
    if vr == "AS":
        return column == value  # C.2.2.2.1 Single Value Matching
    if vr == "DT":
        return _dt_condition(column, value, name)
    try:
        number_f = float(value)
    except ValueError:
        raise QueryError(f"{name}: the value is not a number ({vr})") from None
    return column == number_f  # C.2.2.2.1 on the number (DS FD FL)


def _dt_condition(column: ColumnElement[Any], value: str, name: str) -> ColumnElement[bool]:
    """PS3.4 C.2.2.2.5.3 Range Matching of DT (and C.2.2.2.1 single value) on
    the fixed-width key.  A range is ``a-b``; a ``-`` inside a UTC offset
    (``...-0500``) is not a range separator only when the value parses as
    one DT."""
    single = dt_key(value)
    if single:
        return column == single
    if value.count("-") != 1:
        raise QueryError(f"{name}: the value is not a DT or a range of DT (PS3.5 6.2)")
    low, high = (side.strip() for side in value.split("-"))
    low_key, high_key = dt_key(low) if low else "", dt_key(high) if high else ""
    if (low and not low_key) or (high and not high_key) or not (low or high):
        raise QueryError(f"{name}: the value is not a range of DT (PS3.4 C.2.2.2.5)")
    if low_key and high_key and low_key > high_key:
        raise QueryError(f"{name}: the range's lower bound is after its upper bound")
    conditions = []
    if low_key:
        conditions.append(column >= low_key)
    if high_key:
        conditions.append(column <= high_key)
    return and_(*conditions)


def returned_values(conn: Connection, tag: ExtendedTag, ids: Sequence[int]) -> dict[int, list[Any]]:
    """The values of *tag* of the entities *ids* (of the tag's level): the
    values of the first instance (lowest row id) that has it."""
    if not ids:
        return {}
    table = _TABLES[tag.family]
    _, fk = _entity(tag.level)
    rows = conn.execute(
        select(table.c[fk], table.c.instance_fk, table.c.value)
        .where(table.c.tag_key == tag.key, table.c[fk].in_(sorted(set(ids))))
        .order_by(table.c.instance_fk, table.c.id)
    ).all()
    found: dict[int, list[Any]] = {}
    first: dict[int, int] = {}
    for entity_id, instance_id, value in rows:
        if first.setdefault(entity_id, instance_id) == instance_id:
            found.setdefault(entity_id, []).append(value)
    return found


def entity_column(tag: ExtendedTag) -> ColumnElement[Any]:
    """The primary key of the entity a tag of *tag*'s level belongs to."""
    entity, _ = _entity(tag.level)
    return entity.c.id


__all__ = [
    "ADDING",
    "DELETING",
    "DISABLED",
    "ENABLED",
    "READY",
    "VR_FAMILY",
    "ExtendedTag",
    "ExtendedTags",
    "Extracted",
    "InvalidTag",
    "condition",
    "extract",
    "read_tags",
    "write_values",
]
