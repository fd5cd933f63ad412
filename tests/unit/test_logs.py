"""The log format: JSON lines or text, the correlation id, levels per area
that never open the loggers printing patient data."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import logging.config

import pytest

from appliance.config import LogConfig, load_config
from appliance.errors import ConfigError
from appliance.logs import CORRELATION_ID, logging_config


@pytest.fixture
def captured() -> io.StringIO:
    return io.StringIO()


def configure(log: LogConfig, out: io.StringIO) -> None:
    logging.config.dictConfig(logging_config(log))
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in ("pynetdicom", "dimse_bridge", "appliance.forward", "dicomweb"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_json_lines_carry_the_correlation_id(captured: io.StringIO) -> None:
    configure(LogConfig(format="json"), captured)
    token = CORRELATION_ID.set("abc-123")
    try:
        logging.getLogger("appliance.ingest").info("stored %s", "1.2.3")
    finally:
        CORRELATION_ID.reset(token)
    token = CORRELATION_ID.set(None)  # outside any request or association
    try:
        logging.getLogger("appliance.ingest").warning("no id here")
    finally:
        CORRELATION_ID.reset(token)
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["message"] == "stored 1.2.3"
    assert first["level"] == "info"
    assert first["logger"] == "appliance.ingest"
    assert first["correlation_id"] == "abc-123"
    assert first["time"].endswith("+00:00")
    assert "correlation_id" not in second


def test_text_lines_show_the_id_in_braces(captured: io.StringIO) -> None:
    configure(LogConfig(format="text"), captured)
    token = CORRELATION_ID.set("assoc-1")
    try:
        logging.getLogger("dimse_bridge.handlers").info("association accepted")
    finally:
        CORRELATION_ID.reset(token)
    line = captured.getvalue().strip()
    assert "{assoc-1} dimse_bridge.handlers: association accepted" in line


def test_auto_is_json_when_stdout_is_no_terminal(captured: io.StringIO) -> None:
    configure(LogConfig(format="auto"), captured)
    logging.getLogger("appliance").info("hello")
    assert json.loads(captured.getvalue())["message"] == "hello"


def test_levels_per_area_never_open_the_phi_loggers(captured: io.StringIO) -> None:
    configure(
        LogConfig(level="warning", format="json", levels=("dimse=debug", "forward=error")),
        captured,
    )
    logging.getLogger("dimse_bridge.services.query").debug("a debug line")
    logging.getLogger("appliance.forward.worker").warning("hidden")
    logging.getLogger("appliance.ingest").info("hidden too")
    logging.getLogger("pynetdicom.dimse").info("(0010,0010) PN [Doe^Jane]")
    messages = [json.loads(line)["message"] for line in captured.getvalue().splitlines()]
    assert messages == ["a debug line"]


def test_levels_from_the_environment_and_bad_ones(tmp_path: object) -> None:
    config = load_config(
        environ={"APPLIANCE_LOG_LEVELS": "dimse=debug, appliance.fhir=warning"}, cwd=tmp_path
    )
    assert config.log.levels == ("dimse=debug", "appliance.fhir=warning")
    for bad in ("dimse", "dimse=loud", "no such=debug"):
        with pytest.raises(ConfigError, match=r"log\.levels"):
            load_config(environ={"APPLIANCE_LOG_LEVELS": bad}, cwd=tmp_path)
    assert dataclasses.replace(config.log, format="json").format == "json"
