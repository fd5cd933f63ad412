"""Logging: one line per event on stdout, the same format in every process:
readable text on a terminal, one JSON object per line otherwise (journald,
a container's log, a file: ``log.format``), levels per area
(``log.levels``), and a correlation id on every line of one HTTP request
(its ``X-Request-ID``) or one DIMSE association.

The format names the process (``supervisor``, ``http``, ``http-worker``,
``dimse``) so the interleaved output of ``dicom-appliance serve`` can be read
apart.  What is logged is UIDs, AE titles, addresses and key names, never a
patient's name or ID.  Libraries that print data sets at INFO or DEBUG
(pynetdicom logs every C-FIND identifier, PatientName included, at INFO) are
held at WARNING whatever the configured level.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import logging.config
import multiprocessing
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.config import LogConfig

FORMAT = "%(asctime)s %(levelname)s [%(processName)s]%(correlation)s %(name)s: %(message)s"

#: The correlation id of what this thread (or context) is doing: an HTTP
#: request's id, a DIMSE association's; None outside of them.
CORRELATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "correlation_id", default=None
)

#: Loggers that would print data set contents below WARNING.
PHI_LOGGERS = ("pynetdicom",)
#: Loggers whose warnings quote element values (pydicom: "Invalid value for
#: VR PN: '<the name>'"): held at ERROR.
VALUE_QUOTING_LOGGERS = ("pydicom",)
#: Loggers too chatty below WARNING (alembic's per-connection lines; the
#: Azure SDK's request and response lines, one pair per blob request).
QUIET_LOGGERS = ("alembic", "azure")

#: gunicorn's access line: the path without the query string (QIDO-RS query
#: parameters may carry PatientName or PatientID), status, bytes, duration.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms id=%({x-request-id}o)s'


class Correlation(logging.Filter):
    """Puts the correlation id on each record: ``correlation_id`` (or None)
    and ``correlation`` (`` {id}`` or "", for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = CORRELATION_ID.get()
        record.correlation_id = found
        record.correlation = f" {{{found}}}" if found else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, process,
    logger, message, correlation_id when there is one, exception when the
    record has one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        correlation = getattr(record, "correlation_id", None)
        if correlation:
            out["correlation_id"] = correlation
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def json_wanted(log: LogConfig, stream: str = "ext://sys.stdout") -> bool:
    """Whether *log* asks for JSON here: ``json``, or ``auto`` with the
    *stream* the lines go to not a terminal."""
    if log.format == "auto":
        out = sys.stderr if stream.endswith("stderr") else sys.stdout
        return not out.isatty()
    return log.format == "json"


def logging_config(log: LogConfig, stream: str = "ext://sys.stdout") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dictionary for *log* (``[log]``).

    gunicorn takes the same dictionary (its ``logconfig_dict`` setting), so
    its error and access lines go through the same handler and format.
    Per-area levels (``log.levels``) never lower the loggers that would
    print patient data.  *stream*: where the lines go (the admin commands,
    whose output is on stdout, log to ``ext://sys.stderr``).
    """
    from appliance.config import LOG_AREAS

    name = log.level.upper()
    loggers: dict[str, dict[str, Any]] = {
        "gunicorn.error": {"level": name, "handlers": [], "propagate": True},
        "gunicorn.access": {"level": name, "handlers": [], "propagate": True},
    }
    for item in log.levels:
        area, _, level = item.partition("=")
        for logger in LOG_AREAS.get(area.strip(), (area.strip(),)):
            loggers.setdefault(logger, {"handlers": [], "propagate": True})
            loggers[logger]["level"] = level.strip().upper()
    for logger in PHI_LOGGERS + QUIET_LOGGERS:
        loggers[logger] = {"level": "WARNING"}
    for logger in VALUE_QUOTING_LOGGERS:
        loggers[logger] = {"level": "ERROR"}
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if json_wanted(log, stream) else {"format": FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"appliance": formatter},
        "filters": {"correlation": {"()": Correlation}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "appliance",
                "filters": ["correlation"],
                "stream": stream,
            }
        },
        "root": {"level": name, "handlers": ["stdout"]},
        "loggers": loggers,
    }


def setup_logging(log: LogConfig, *, dicom: bool = True, stream: str = "ext://sys.stdout") -> None:
    """Send this process's log records to stdout (or *stream*) as *log* says, and
    (*dicom*) keep pydicom from quoting element values in warnings (see
    :func:`quiet_pydicom`; processes that read no DICOM, the supervisor and
    gunicorn's master, skip it and never import pydicom).
    """
    logging.config.dictConfig(logging_config(log, stream))
    if dicom:
        quiet_pydicom()


def quiet_pydicom() -> None:
    """Keep pydicom from quoting element values in warnings.

    pydicom checks values as it reads them and, in its default mode, warns
    with the value itself (through both its logger and :mod:`warnings`,
    which prints to stderr): for a malformed Person Name that is patient
    data.  The ingest validates what it relies on itself, so pydicom's read
    validation is turned off for the service's processes.
    """
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def set_process_name(name: str) -> None:
    """Name this process in log lines (the ``processName`` field)."""
    multiprocessing.current_process().name = name
