"""Logging: one line per event on stdout, the same format in every process.

The format names the process (``supervisor``, ``http``, ``http-worker``,
``dimse``) so the interleaved output of ``dicom-appliance serve`` can be read
apart.  What is logged is UIDs, AE titles, addresses and key names, never a
patient's name or ID.  Libraries that print data sets at INFO or DEBUG
(pynetdicom logs every C-FIND identifier, PatientName included, at INFO) are
held at WARNING whatever the configured level.
"""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
from typing import Any, Literal

Stream = Literal["stdout", "stderr"]

FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s"

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
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'


def logging_config(level: str, stream: Stream = "stdout") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dictionary for *level*.

    gunicorn takes the same dictionary (its ``logconfig_dict`` setting), so
    its error and access lines go through the same handler and format.

    Parameters
    ----------
    level
        ``debug``, ``info``, ``warning`` or ``error`` (``log.level``).
    stream
        ``stdout`` (the service) or ``stderr`` (admin commands whose stdout
        is their result, e.g. ``import --json``).
    """
    name = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"appliance": {"format": FORMAT}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "appliance",
                "stream": f"ext://sys.{stream}",
            }
        },
        "root": {"level": name, "handlers": ["console"]},
        "loggers": {
            **{logger: {"level": "WARNING"} for logger in PHI_LOGGERS + QUIET_LOGGERS},
            **{logger: {"level": "ERROR"} for logger in VALUE_QUOTING_LOGGERS},
            "gunicorn.error": {"level": name, "handlers": [], "propagate": True},
            "gunicorn.access": {"level": name, "handlers": [], "propagate": True},
        },
    }


def setup_logging(level: str, *, dicom: bool = True, stream: Stream = "stdout") -> None:
    """Send this process's log records to *stream* (``stdout`` or
    ``stderr``) at *level*, and (*dicom*) keep pydicom from quoting element
    values in warnings (see
    :func:`quiet_pydicom`; processes that read no DICOM, the supervisor and
    gunicorn's master, skip it and never import pydicom).
    """
    logging.config.dictConfig(logging_config(level, stream))
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
