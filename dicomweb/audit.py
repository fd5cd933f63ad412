"""The audit events of the HTTP side (:mod:`appliance.audit`), in one place.

Which action a request is follows from its route's blueprint
(:data:`ACTIONS`); the study UID of the path, the principal (``g.principal``,
set by the authentication layer when there is one) and the client's address
are read when the request's context ends (:func:`capture`, a
``teardown_request``), together with what the view noted with :func:`note`
(the studies a STOW-RS stored, the keys and the matches of a QIDO-RS).  The
event is written once the answer's body has been sent
(:func:`finish`, called by :class:`dicomweb.instrument.Counting`), with the
status sent, or as a serious failure if the body was cut short: a streamed
WADO-RS answer can fail after its 200.

A request refused before its view runs (400, 401, 403, 406...) is recorded
with its action and a failure outcome; a request that matched no route, and
an ``OPTIONS`` request (answered without the view), are not recorded (they
touched nothing).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from flask import g, request

from appliance.audit import Action, AuditEvent, AuditLog, Outcome, study_uids
from appliance.logs import CORRELATION_ID
from appliance.partitions import DEFAULT_NAME
from dicomweb.partitioning import ENVIRON_KEY as PARTITION_KEY

#: The action of each audited blueprint; routes of others (health, metrics,
#: admin) touch no patient data.
ACTIONS: dict[str, Action] = {
    "stow": Action.STORE,
    "qido": Action.QUERY,
    "changefeed": Action.QUERY,
    "wado": Action.RETRIEVE,
    "frames": Action.RETRIEVE,
    "rendered": Action.RETRIEVE,
    "delete": Action.DELETE,
}

#: The action of each audited endpoint of a blueprint that mixes actions
#: (the operator console); its other endpoints (the dashboard, login) touch
#: no patient data.
ENDPOINT_ACTIONS: dict[str, Action] = {
    "console.studies": Action.QUERY,
    "console.study": Action.QUERY,
    "console.confirm_delete": Action.QUERY,
    # the study's Part 10 files leave as WADO-RS's do
    "console.download_study": Action.RETRIEVE,
    "console.delete_study": Action.DELETE,
}

#: Where the view's notes and then the pending event wait in the WSGI environ.
_NOTES = "appliance.audit.notes"
_PENDING = "appliance.audit.pending"


@dataclasses.dataclass
class Pending:
    """An event waiting for the end of its answer."""

    log: AuditLog
    event: AuditEvent


def note(
    *,
    studies: tuple[str, ...] | None = None,
    instances: int | None = None,
    failed: int | None = None,
    query_keys: tuple[str, ...] | None = None,
    query: dict[str, str] | None = None,
) -> None:
    """Add to the current request's audit event what only the view knows."""
    notes: dict[str, Any] = request.environ.setdefault(_NOTES, {})
    given = {
        "studies": studies,
        "instances": instances,
        "failed": failed,
        "query_keys": query_keys,
        "query": query,
    }
    notes.update((key, value) for key, value in given.items() if value is not None)


def note_broken(environ: dict[str, Any]) -> None:
    """Say that the answer's body, begun with a success status, could not be
    completed (called from the body's generator, outside the request's
    context: hence the WSGI *environ*)."""
    environ.setdefault(_NOTES, {})["broken"] = True


def capture(log: AuditLog) -> None:
    """Build the request's event (``teardown_request``; the status comes
    later); nothing for a request of no audited route."""
    if not log.enabled or request.method == "OPTIONS":
        return  # OPTIONS (a CORS preflight) runs no view: it touches nothing
    rule = request.url_rule
    blueprint = request.blueprint
    action = (
        ENDPOINT_ACTIONS.get(rule.endpoint) or ACTIONS.get(blueprint or "")
        if rule is not None
        else None
    )
    if action is None:
        return
    notes: dict[str, Any] = request.environ.get(_NOTES, {})
    studies = notes.get("studies")
    if studies is None:
        path_study = (request.view_args or {}).get("study")
        studies = (path_study,) if path_study else ()
    principal = getattr(g, "principal", None)
    who = str(getattr(principal, "name", "") or "anonymous")
    event = AuditEvent(
        action=action,
        outcome=Outcome.SUCCESS,
        protocol="dicomweb",
        who=who,
        address=request.remote_addr or "",
        studies=study_uids(studies),
        instances=int(notes.get("instances", 0)),
        failed=int(notes.get("failed", 0)),
        transaction=rule.endpoint if rule is not None else "",
        query_keys=tuple(notes.get("query_keys", ())),
        query=notes.get("query") if log.record_query_values else None,
        correlation_id=CORRELATION_ID.get(),
        partition=_partition(),
    )
    request.environ[_PENDING] = Pending(log, event)


def _partition() -> str:
    """The request's data partition, if not the default one."""
    name = request.environ.get(PARTITION_KEY)
    return "" if name in (None, DEFAULT_NAME) else str(name)


def finish(environ: dict[str, Any], status: str, broken: bool) -> None:
    """Write the request's event, if it has one, with the *status* sent
    (``"200"``...) and *broken* if the body could not be sent whole."""
    pending = environ.pop(_PENDING, None)
    if not isinstance(pending, Pending):
        return
    code = int(status) if status.isdigit() else 0
    event = pending.event
    broken = broken or bool(environ.get(_NOTES, {}).get("broken"))
    if broken or code >= 500 or code == 0:
        outcome = Outcome.SERIOUS_FAILURE
    elif code >= 400 or event.failed:
        outcome = Outcome.MINOR_FAILURE
    else:
        outcome = Outcome.SUCCESS
    pending.log.record(
        dataclasses.replace(
            event, outcome=outcome, status=code or None, time=dt.datetime.now(dt.UTC)
        )
    )
