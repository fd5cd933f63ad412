"""The operator console: server-rendered pages at ``/`` and ``/console``
(issue 10), for the people who run the appliance.

Pages (``GET``, the read permission):

- ``/``: the dashboard (:mod:`appliance.dashboard`'s snapshot): images
  received per hour by sending AE and protocol, storage, index, forwarding
  queues, DICOMcast lag, recent associations, health of each dependency.
  It reloads its content every 15 seconds (``static/console/console.js``).
- ``/console/studies``: a search of studies by patient name (a prefix, or
  ``*``/``?`` wild cards as in QIDO-RS), patient ID, study date range,
  modality and accession number.  The server runs the query through the
  same query layer as QIDO-RS (:class:`appliance.query.QueryService`, PS3.4
  C.2.2.2 matching) rather than the page calling ``/v1/studies``: the list
  works without JavaScript and is one request.
- ``/console/studies/{study}``: the study's series, each with its thumbnail
  (``/v1/studies/{s}/series/{se}/thumbnail``, the rendered resource of
  PS3.18 10.4.1.1.4), its instances, and a link to the viewer when one is
  installed.
- ``/console/studies/{study}/download``: the study's stored Part 10 files
  as a zip (entries ``{series}/{instance}.dcm``), built while it is sent.

Actions (the admin permission; a form ``POST`` with the CSRF token, see
:mod:`dicomweb.auth`):

- ``/console/studies/{study}/delete``: ``GET`` asks for confirmation,
  ``POST`` deletes the study (as ``DELETE /v1/studies/{study}`` does);
- ``/console/forward/{name}/retry``: queue the parked entries of a
  ``[[forward]]`` destination again (as ``POST /v1/admin/forward/{name}/retry``).

``/console/login`` takes an API token (or, in oidc mode, a JWT) and keeps
it in the session cookie; ``/console/logout`` drops it.  Every page is sent
with a Content-Security-Policy that allows only our own scripts, styles
and images (no inline script), and is never cached.  Patient names are
shown in pages, to the authorized user, and never logged.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from flask import Blueprint, Response, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from appliance.access import AccessDenied, Unauthenticated
from appliance.audit import study_uids
from appliance.dashboard import snapshot
from appliance.dicomio import is_valid_uid
from appliance.errors import ApplianceError, NotFound, QueryError
from appliance.forward.outbox import Outbox
from appliance.index.sql import StoredInstance
from appliance.model import Level
from appliance.partitions import DEFAULT_NAME
from appliance.query import Query
from appliance.retrieve import RetrieveService
from appliance.storage.base import CHUNK_SIZE
from dicomweb import audit
from dicomweb.app import current_services, get_extension
from dicomweb.auth import CSRF_FIELD, SESSION_COOKIE, csrf_token
from dicomweb.errors import GENERIC_MESSAGE, check_uids, http_status_for
from dicomweb.views import viewer

_HERE = Path(__file__).resolve().parent.parent

bp = Blueprint(
    "console",
    __name__,
    template_folder=str(_HERE / "templates"),
    static_folder=str(_HERE / "static" / "console"),
    static_url_path="/console/static",
)
log = logging.getLogger(__name__)

#: How long the session cookie lives (a working shift); the token it holds
#: is checked on every request, so its own expiry or revocation ends the
#: session sooner.
SESSION_SECONDS: Final = 8 * 3600
#: The longest token kept in the cookie (RFC 6265 6.1: browsers keep at
#: least 4096 bytes per cookie, name and attributes included).
MAX_COOKIE_TOKEN: Final = 3800
#: Studies per page of the list.
PAGE_SIZE: Final = 50
#: Instances listed on a study page (the query layer's maximum caps it too).
INSTANCES_SHOWN: Final = 2000
#: The longest search value taken from the form (a PN component group is 64).
MAX_VALUE: Final = 64

#: The page's Content-Security-Policy: our own scripts, styles and images
#: only (the thumbnails; ``data:`` for none), no inline script, no framing.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_MODALITY = re.compile(r"[A-Z0-9]{1,16}")


@bp.after_request
def _security_headers(response: Response) -> Response:
    """The console's headers on every answer of its routes (the login
    redirect included)."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        # pages hold patient data: never kept by the browser or a proxy
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.app_template_filter("person_name")
def person_name(value: object) -> str:
    """A DICOM PN (``Family^Given^Middle^Prefix^Suffix``, PS3.5 6.2) as
    ``Family, Given Middle``: its alphabetic group only."""
    text = str(value or "").split("=", 1)[0]
    parts = [part.strip() for part in text.split("^")]
    family = parts[0] if parts else ""
    given = " ".join(p for p in parts[1:3] if p)
    return f"{family}, {given}" if family and given else family or given


@bp.app_template_filter("dicom_date")
def dicom_date(value: object) -> str:
    """A DA value (``YYYYMMDD``) as ``YYYY-MM-DD``; other text unchanged."""
    text = str(value or "")
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


@bp.context_processor
def _page_context() -> dict[str, Any]:
    """What every console template may use."""
    principal = getattr(g, "principal", None)
    session = getattr(g, "session_token", None)
    return {
        "principal": principal,
        "is_admin": bool(principal is not None and principal.may("admin")),
        "signed_in": bool(session),
        "csrf_field": CSRF_FIELD,
        "csrf_token": csrf_token(session) if session else "",
    }


# --------------------------------------------------------------------- errors


def _error_page(status: int, message: str) -> tuple[str, int]:
    return render_template("console/error.html", status=status, message=message), status


@bp.errorhandler(AccessDenied)
def _access_denied(exc: AccessDenied) -> tuple[str, int]:
    status = 401 if isinstance(exc, Unauthenticated) else 403
    log.info("%s %s -> %d: %s", request.method, request.path, status, exc.reason)
    return _error_page(status, exc.reason)


@bp.errorhandler(ApplianceError)
def _appliance_error(exc: ApplianceError) -> tuple[str, int]:
    status = http_status_for(exc)
    level = logging.ERROR if status >= 500 else logging.INFO
    log.log(level, "%s %s -> %d: %s", request.method, request.path, status, exc.reason)
    return _error_page(status, exc.reason if status < 500 else GENERIC_MESSAGE)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    return _error_page(status, exc.description or exc.name)


# ------------------------------------------------------------------ dashboard


@bp.get("/")
def dashboard() -> str:
    """The dashboard: where things stand, rendered from one snapshot
    (:func:`appliance.dashboard.snapshot`) for every reader, not only the
    admins who may read ``/v1/admin/dashboard``."""
    extension = get_extension()
    view = snapshot(extension.services, extension.config, run_dir=extension.run_dir)
    return render_template(
        "console/dashboard.html",
        dashboard=view,
        chart=received_chart(view.received, view.generated_at, view.hours),
        requeued=_message_count("requeued"),
        destination=request.args.get("destination", "")[:MAX_VALUE],
    )


@bp.app_template_filter("size")
def size(value: int | None) -> str:
    """Bytes as ``12.3 MB`` (SI prefixes, as ``df -H``); "-" for unknown."""
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if amount < 1000 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    raise AssertionError("unreachable")


@bp.app_template_filter("age")
def age(seconds: float | None) -> str:
    """Seconds as ``42 s``, ``7 min``, ``3.5 h``, ``2.0 d``; "-" for none."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@bp.app_template_filter("utc")
def utc(moment: dt.datetime | None) -> str:
    """A time as ``2026-12-03 05:12:09 UTC``."""
    if moment is None:
        return "-"
    aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclasses.dataclass(frozen=True)
class Bar:
    """One segment of the received-images chart (SVG user units)."""

    x: float
    y: float
    width: float
    height: float
    series: int
    label: str


@dataclasses.dataclass(frozen=True)
class Chart:
    """The received-images chart: stacked bars per hour, one colour per
    (protocol, sending AE)."""

    width: int
    height: int
    bars: list[Bar]
    legend: list[tuple[int, str, int]]  # series number, label, instances
    ticks: list[tuple[float, str]]  # x, hour label
    top: int  # the largest hourly total
    total: int


#: Colours of the chart's series, in order (style.css's .s0 ... .s7); the
#: eighth is "everything else".
CHART_SERIES: Final = 8


def received_chart(
    received: Sequence[Any], now: dt.datetime, hours: int = 24, width: int = 1200, height: int = 160
) -> Chart:
    """The stacked bar chart of *received* (``HourCount``: hour, protocol,
    ae, instances) over the *hours* up to *now*: one bar per hour, one
    segment per (protocol, AE), the seven busiest named and the rest summed
    as "other"."""
    end = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    slots = [end - dt.timedelta(hours=hours - 1 - i) for i in range(hours)]
    index = {slot: i for i, slot in enumerate(slots)}
    totals: dict[str, int] = {}
    cells: dict[tuple[int, str], int] = {}
    for row in received:
        hour = row.hour if row.hour.tzinfo else row.hour.replace(tzinfo=dt.UTC)
        slot = index.get(hour.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0))
        if slot is None:
            continue
        protocol = row.protocol or "earlier"  # stored before the protocol was recorded
        label = f"{row.ae} ({protocol})" if row.ae else protocol
        totals[label] = totals.get(label, 0) + row.instances
        cells[(slot, label)] = cells.get((slot, label), 0) + row.instances
    ranked = sorted(totals, key=lambda k: (-totals[k], k))
    named = ranked[: CHART_SERIES - 1]
    series_of = {label: n for n, label in enumerate(named)}
    other = len(named)
    per_hour = [0] * hours
    stacks: list[dict[int, int]] = [{} for _ in range(hours)]
    for (slot, label), count in cells.items():
        number = series_of.get(label, other)
        stacks[slot][number] = stacks[slot].get(number, 0) + count
        per_hour[slot] += count
    top = max(per_hour, default=0)
    bars: list[Bar] = []
    step = width / hours
    for slot, stack in enumerate(stacks):
        y = float(height)
        for number in sorted(stack):
            count = stack[number]
            h = height * count / top if top else 0.0
            y -= h
            name = named[number] if number < other else "other"
            when = slots[slot].strftime("%H:00")
            bars.append(Bar(slot * step + 1, y, step - 2, h, number, f"{when} {name}: {count}"))
    legend = [(n, label, totals[label]) for n, label in enumerate(named)]
    rest = sum(totals[label] for label in ranked[len(named) :])
    if rest:
        legend.append((other, "other", rest))
    ticks = [(i * step + step / 2, slots[i].strftime("%H")) for i in range(0, hours, 3)]
    return Chart(width, height, bars, legend, ticks, top, sum(per_hour))


@bp.post("/console/forward/<name>/retry")
def retry_forward(name: str) -> BaseResponse:
    """Queue the parked entries of destination *name* again (404 if no
    ``[[forward]]`` destination has that name); back to the dashboard."""
    extension = get_extension()
    if name not in {d.name for d in extension.config.forward}:
        raise NotFound("no [[forward]] destination has that name")
    count = Outbox(extension.services.engine).requeue_parked(name)
    log.info("console: %d parked entries of destination %s queued again", count, name)
    return redirect(url_for("console.dashboard", requeued=count, destination=name), code=303)


# -------------------------------------------------------------------- studies


@dataclasses.dataclass(frozen=True)
class StudySearch:
    """The study list's form, checked, and the query keys it makes."""

    form: dict[str, str]
    keys: dict[str, str]
    page: int


def parse_study_search(args: Mapping[str, str]) -> StudySearch:
    """The query keys of the study list's form fields.

    - ``patient``: the patient's name, matched as QIDO-RS matches
      PatientName (case-insensitive, PS3.4 C.2.2.2.1): with ``*`` or ``?``
      as wild cards (C.2.2.2.4), else as the start of the name (``doe``
      finds ``DOE^JOHN``);
    - ``patient_id``, ``accession``: exact, or with wild cards;
    - ``from``, ``to``: ``YYYY-MM-DD``, a StudyDate range (C.2.2.2.5), either
      end open;
    - ``modality``: ModalitiesInStudy;
    - ``page``: from 0.

    Raises
    ------
    QueryError
        naming the field that is malformed.
    """
    form = {
        name: (args.get(name) or "").strip()
        for name in ("patient", "patient_id", "from", "to", "modality", "accession")
    }
    for name, value in form.items():
        if len(value) > MAX_VALUE:
            raise QueryError(f"{name}: at most {MAX_VALUE} characters")
        if "\\" in value or "\0" in value:
            raise QueryError(f"{name}: a backslash or NUL is not allowed")
    keys: dict[str, str] = {}
    if form["patient"]:
        name = form["patient"]
        keys["PatientName"] = name if ("*" in name or "?" in name) else name + "*"
    if form["patient_id"]:
        keys["PatientID"] = form["patient_id"]
    if form["accession"]:
        keys["AccessionNumber"] = form["accession"]
    if form["modality"]:
        modality = form["modality"].upper()
        if not _MODALITY.fullmatch(modality):
            raise QueryError("modality: letters and digits only (CT, MR, US...)")
        form["modality"] = modality
        keys["ModalitiesInStudy"] = modality
    dates = [_date_key(name, form[name]) for name in ("from", "to")]
    if any(dates):
        if all(dates) and dates[0] > dates[1]:
            raise QueryError("from: the range starts after it ends")
        keys["StudyDate"] = f"{dates[0]}-{dates[1]}"
    page_text = (args.get("page") or "0").strip()
    if not page_text.isdigit() or int(page_text) > 100_000:
        raise QueryError("page: a number from 0")
    return StudySearch(form, keys, int(page_text))


def _date_key(name: str, value: str) -> str:
    if not value:
        return ""
    match = _DATE.fullmatch(value)
    if match is None:
        raise QueryError(f"{name}: a date as YYYY-MM-DD")
    try:
        dt.date(*(int(part) for part in match.groups()))
    except ValueError:
        raise QueryError(f"{name}: not a date") from None
    return "".join(match.groups())


#: The study list's columns (QueryService return keys).
_STUDY_COLUMNS: Final = frozenset(
    {
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "AccessionNumber",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    }
)


@bp.get("/console/studies")
def studies() -> tuple[str, int]:
    """The studies that match the form (all studies for an empty form), a
    page of :data:`PAGE_SIZE` at a time, in the order they were first
    stored."""
    try:
        search = parse_study_search(request.args)
    except QueryError as exc:
        form = {k: v[:MAX_VALUE] for k, v in request.args.items()}
        return render_template("console/studies.html", form=form, error=exc.reason), 400
    query = Query(
        Level.STUDY,
        search.keys,
        limit=PAGE_SIZE,
        offset=search.page * PAGE_SIZE,
        returned=_STUDY_COLUMNS,
    )
    result = current_services().query.search(query)
    audit.note(
        studies=study_uids(m.get("StudyInstanceUID") for m in result.matches),
        instances=len(result.matches),
        query_keys=tuple(search.keys),
        query=search.keys,
    )
    page_args: dict[str, Any] = {k: v for k, v in search.form.items() if v}
    return (
        render_template(
            "console/studies.html",
            form=search.form,
            matches=result.matches,
            page=search.page,
            first=search.page * PAGE_SIZE,
            previous_url=(
                url_for("console.studies", **page_args, page=search.page - 1)
                if search.page
                else None
            ),
            next_url=(
                url_for("console.studies", **page_args, page=search.page + 1)
                if result.truncated
                else None
            ),
            deleted=_message_count("deleted"),
            error=None,
        ),
        200,
    )


def _study_summary(study: str) -> dict[str, Any]:
    """The study's own attributes (404 if no instance of it is stored)."""
    found = current_services().query.search(
        Query(Level.STUDY, {"StudyInstanceUID": study}, limit=1, returned=_STUDY_COLUMNS)
    )
    if not found.matches:
        raise NotFound("no instance of this study is stored here")
    return found.matches[0]


@bp.get("/console/studies/<study>")
def study(study: str) -> str:
    """The study's series (with thumbnails) and instances."""
    check_uids(study)
    summary = _study_summary(study)
    query = current_services().query
    series = query.search(
        Query(
            Level.SERIES,
            {"StudyInstanceUID": study},
            returned=frozenset(
                {
                    "SeriesInstanceUID",
                    "SeriesNumber",
                    "SeriesDescription",
                    "Modality",
                    "BodyPartExamined",
                    "NumberOfSeriesRelatedInstances",
                }
            ),
        )
    )
    instances = query.search(
        Query(
            Level.IMAGE,
            {"StudyInstanceUID": study},
            limit=INSTANCES_SHOWN,
            returned=frozenset(
                {
                    "SeriesInstanceUID",
                    "SOPInstanceUID",
                    "SOPClassUID",
                    "InstanceNumber",
                    "Rows",
                    "Columns",
                    "NumberOfFrames",
                    "TransferSyntaxUID",
                }
            ),
        )
    )
    by_series: dict[str, list[dict[str, Any]]] = {}
    for match in instances.matches:
        by_series.setdefault(match["SeriesInstanceUID"], []).append(match)
    for rows in by_series.values():
        rows.sort(key=lambda m: (m.get("InstanceNumber") is None, m.get("InstanceNumber") or 0))
    ordered = sorted(
        series.matches,
        key=lambda m: (m.get("SeriesNumber") is None, m.get("SeriesNumber") or 0),
    )
    audit.note(instances=len(instances.matches))
    return render_template(
        "console/study.html",
        study=summary,
        series=ordered,
        instances=by_series,
        instances_truncated=instances.truncated,
        viewer_url=viewer_url(study),
        dicomweb_root=dicomweb_root(),
    )


def dicomweb_root() -> str:
    """The DICOMweb root the console's pages link to (thumbnails, rendered
    images): ``/v1``, or with data partitions on the default partition's,
    which the console shows (README "Data partitions")."""
    if get_extension().config.partitions.enabled:
        return f"/v1/partitions/{DEFAULT_NAME}"
    return "/v1"


def viewer_url(study: str) -> str | None:
    """The viewer's page of *study*, or None when no viewer is installed
    (:func:`dicomweb.views.viewer.viewer_folder`)."""
    if viewer.viewer_folder() is None:
        return None
    return viewer.study_url(study)


# ------------------------------------------------------------------- download


class _Sink:
    """What :class:`zipfile.ZipFile` writes to: it keeps the bytes until the
    response's generator takes them (no seeking, so zipfile writes each
    entry's sizes in a data descriptor after it, APPNOTE 4.3.9)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        if data:
            self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> list[bytes]:
        chunks, self._chunks = self._chunks, []
        return chunks


def zip_entry_name(stored: StoredInstance) -> str:
    """``{series}/{instance}.dcm``: both UIDs checked (PS3.5 9.1), so the
    name has no separator, dot segment or other character of its own."""
    for uid in (stored.series_instance_uid, stored.sop_instance_uid):
        if not is_valid_uid(uid):
            raise ApplianceError("an indexed UID is not a valid UID; the zip is not made")
    return f"{stored.series_instance_uid}/{stored.sop_instance_uid}.dcm"


def zip_study(
    retrieve: RetrieveService, instances: Sequence[StoredInstance], environ: dict[str, Any]
) -> Iterator[bytes]:
    """The zip of *instances*' stored Part 10 files, made while it is sent:
    one chunk of one blob in memory at a time, no temporary file.  Stored,
    not compressed (most pixel data is compressed already, and the machine
    is small); Zip64 where an entry or the archive needs it."""
    sink = _Sink()
    sent = 0
    names = [zip_entry_name(stored) for stored in instances]
    try:
        with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED) as archive:
            for stored, name in zip(instances, names, strict=True):
                when = (stored.updated_at or dt.datetime.now(dt.UTC)).timetuple()[:6]
                info = zipfile.ZipInfo(name, date_time=max(when, (1980, 1, 1, 0, 0, 0)))
                info.file_size = stored.size  # chooses Zip64 for a large entry
                with retrieve.stream(stored) as source, archive.open(info, "w") as entry:
                    while chunk := source.read(CHUNK_SIZE):
                        entry.write(chunk)
                        yield from sink.take()
                yield from sink.take()
                sent += 1
        yield from sink.take()  # the central directory
    except ApplianceError as exc:
        # the status is gone: the zip ends without its central directory,
        # which every reader notices
        log.error("console download stopped after %d instance(s): %s", sent, exc.reason)
        audit.note_broken(environ)
    finally:
        log.info("console download: %d of %d instance(s) sent", sent, len(instances))


@bp.get("/console/studies/<study>/download")
def download_study(study: str) -> Response:
    """The study as ``study-{uid}.zip`` (404 if nothing is stored)."""
    check_uids(study)
    retrieve = current_services().retrieve
    instances = retrieve.instances(study)
    for stored in instances:
        zip_entry_name(stored)  # a bad UID fails now, before the 200
    audit.note(instances=len(instances))
    response = Response(
        zip_study(retrieve, instances, request.environ),
        mimetype="application/zip",
        direct_passthrough=True,
    )
    response.headers["Content-Disposition"] = f'attachment; filename="study-{study}.zip"'
    return response


# --------------------------------------------------------------------- delete


@bp.get("/console/studies/<study>/delete")
def confirm_delete(study: str) -> str:
    """Ask before deleting: what would go, and a form to confirm."""
    check_uids(study)
    return render_template("console/confirm_delete.html", study=_study_summary(study))


@bp.post("/console/studies/<study>/delete")
def delete_study(study: str) -> BaseResponse:
    """Delete the study, as ``DELETE /v1/studies/{study}`` does, once the
    form confirms it (its ``confirm`` field is the study's UID); then back
    to the study list."""
    check_uids(study)
    if request.form.get("confirm") != study:
        return redirect(url_for("console.confirm_delete", study=study), code=303)
    removed = current_services().delete.delete(study)
    audit.note(instances=len(removed))
    log.info("console: study %s deleted (%d instance(s))", study, len(removed))
    return redirect(url_for("console.studies", deleted=len(removed)), code=303)


# ---------------------------------------------------------------------- login


def _safe_next(target: str | None) -> str:
    """Where to go after login: a path of this site only (never another
    host: ``//host`` and ``/\\host`` are one to a browser)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return url_for("console.dashboard")
    return target


@bp.route("/console/login", methods=["GET", "POST"])
def login() -> BaseResponse | tuple[str, int]:
    """The sign-in form (GET) and its check (POST): the token pasted is
    verified as a bearer token would be, then kept in the session cookie
    (HttpOnly, SameSite=Strict, Secure over HTTPS, Path=/)."""
    extension = get_extension()
    authenticator = extension.authenticator
    assert authenticator is not None
    target = _safe_next(request.values.get("next"))
    if authenticator.anonymous:
        return redirect(target, code=303)  # nobody signs in on a loopback appliance
    mode = authenticator.auth.mode
    if request.method == "GET":
        return render_template("console/login.html", next=target, mode=mode, error=None), 200
    token = (request.form.get("token") or "").strip()
    try:
        if len(token) > MAX_COOKIE_TOKEN:
            # a browser drops a cookie this large without a word
            raise Unauthenticated(
                f"the token is longer than a browser keeps in a cookie ({MAX_COOKIE_TOKEN} "
                "characters); send it as a bearer header instead"
            )
        principal = authenticator.authenticate(f"Bearer {token}")
    except Unauthenticated as exc:
        # the reason names a token's id at most, never the token
        log.info("console login refused: %s", exc.reason)
        return render_template("console/login.html", next=target, mode=mode, error=exc.reason), 401
    log.info("console login: %s", principal.name)
    response = redirect(target, code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/",
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )
    return response


@bp.route("/console/logout", methods=["GET", "POST"])
def logout() -> BaseResponse:
    """Drop the session cookie; to the login page."""
    response = redirect(url_for("console.login"), code=303)
    response.delete_cookie(
        SESSION_COOKIE, path="/", secure=request.is_secure, httponly=True, samesite="Strict"
    )
    return response


def _message_count(name: str) -> int | None:
    """A count a redirect passed back (``?deleted=3``), for the page's notice."""
    value = request.args.get(name, "")
    return int(value) if value.isdigit() and len(value) < 10 else None
