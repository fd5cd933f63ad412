"""The audit trail's core: the event's JSON line and its ATNA mapping, the
daily files (modes, whole lines from several processes at once), retention,
a write failure that never reaches the audited work, reading with filters,
and ``dicom-appliance audit``."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from appliance import metrics
from appliance.audit import (
    ATNA_EVENTS,
    Action,
    AuditEvent,
    AuditLog,
    EventFilter,
    Outcome,
    ReadReport,
    file_name,
    outcome_of_counts,
    read_events,
)
from appliance.cli import main
from appliance.config import AuditConfig
from appliance.logs import CORRELATION_ID

STUDY_A = "1.2.826.0.1.3680043.8.498.1"
STUDY_B = "1.2.826.0.1.3680043.8.498.2"


def audit_log(tmp_path: Path, **settings: object) -> AuditLog:
    return AuditLog(AuditConfig(path=tmp_path / "audit", **settings))  # type: ignore[arg-type]


def lines(folder: Path) -> list[dict[str, object]]:
    found = []
    for path in sorted(folder.glob("audit-*.jsonl")):
        found += [json.loads(line) for line in path.read_text().splitlines()]
    return found


def test_an_event_is_one_json_line_with_its_atna_message(tmp_path: Path) -> None:
    log = audit_log(tmp_path)
    when = dt.datetime(2026, 12, 3, 10, 0, 0, 123000, tzinfo=dt.UTC)
    token = CORRELATION_ID.set("req-1")
    try:
        log.record(
            AuditEvent(
                action=Action.RETRIEVE,
                outcome=Outcome.SUCCESS,
                protocol="dimse",
                who="VIEWER",
                address="10.0.0.7",
                destination="PACS1 (10.0.0.9:104)",
                studies=(STUDY_A,),
                instances=3,
                status=0,
                transaction="C-MOVE",
                time=when,
            )
        )
    finally:
        CORRELATION_ID.reset(token)
    path = tmp_path / "audit" / "audit-2026-12-03.jsonl"
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1
    assert json.loads(raw) == {
        "time": "2026-12-03T10:00:00.123+00:00",
        "action": "retrieve",
        "outcome": 0,
        # PS3.15 A.5.3.7: the sender of instances records Read
        "event": {"code": "110104", "meaning": "DICOM Instances Transferred", "action": "R"},
        "protocol": "dimse",
        "who": "VIEWER",
        "address": "10.0.0.7",
        "destination": "PACS1 (10.0.0.9:104)",
        "transaction": "C-MOVE",
        "studies": [STUDY_A],
        "instances": 3,
        "correlation_id": "req-1",
        "status": 0,
    }


def test_every_action_has_its_ps3_15_message() -> None:
    assert {a: (e.code, e.action_code) for a, e in ATNA_EVENTS.items()} == {
        Action.STORE: ("110104", "C"),
        Action.QUERY: ("110112", "E"),
        Action.RETRIEVE: ("110104", "R"),
        Action.DELETE: ("110105", "D"),
        Action.EXPORT: ("110106", "R"),
    }
    assert [int(o) for o in Outcome] == [0, 4, 8, 12]
    assert outcome_of_counts(3, 0) is Outcome.SUCCESS
    assert outcome_of_counts(3, 1) is Outcome.MINOR_FAILURE
    assert outcome_of_counts(0, 1) is Outcome.SERIOUS_FAILURE


def test_query_values_are_written_only_when_configured(tmp_path: Path) -> None:
    event = AuditEvent(
        Action.QUERY,
        Outcome.SUCCESS,
        "dicomweb",
        "alice",
        query_keys=("PatientName",),
        query={"PatientName": "Doe^Jane"},
    )
    assert event.as_json()["query"] == {"PatientName": "Doe^Jane"}
    # the edges pass the values only when the option is on; the event writes
    # what it is given (tests/integration/test_audit.py checks the edges)
    assert "query" not in AuditEvent(Action.QUERY, Outcome.SUCCESS, "dicomweb", "a").as_json()


def test_files_are_private_and_disabled_writes_nothing(tmp_path: Path) -> None:
    log = audit_log(tmp_path)
    log.record(AuditEvent(Action.STORE, Outcome.SUCCESS, "dimse", "CT1", studies=(STUDY_A,)))
    folder = tmp_path / "audit"
    (path,) = folder.iterdir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    off = audit_log(tmp_path / "off", enabled=False)
    off.record(AuditEvent(Action.STORE, Outcome.SUCCESS, "dimse", "CT1"))
    assert not (tmp_path / "off" / "audit").exists()


def _write_many(folder: str, writer: int, count: int) -> None:
    log = AuditLog(AuditConfig(path=Path(folder)))
    # long lines (about 7 kB: 200 UIDs), more than a pipe's atomic 4 kB
    studies = tuple(f"1.2.826.0.1.3680043.8.498.{writer}.{n}" for n in range(200))
    for number in range(count):
        log.record(
            AuditEvent(
                Action.QUERY,
                Outcome.SUCCESS,
                "dicomweb",
                f"writer-{writer}",
                studies=studies,
                instances=number,
            )
        )


def test_several_processes_append_whole_lines(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    context = multiprocessing.get_context("fork")
    writers = [
        context.Process(target=_write_many, args=(str(folder), writer, 300)) for writer in range(6)
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    events = lines(folder)  # json.loads fails on a torn or mixed line
    assert len(events) == 6 * 300
    for writer in range(6):
        mine = [e["instances"] for e in events if e["who"] == f"writer-{writer}"]
        assert sorted(mine) == list(range(300))  # type: ignore[type-var]
        assert all(
            len(e["studies"]) == 200  # type: ignore[arg-type]
            for e in events
            if e["who"] == f"writer-{writer}"
        )


def test_retention_deletes_old_daily_files_when_a_day_is_opened(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    today = dt.datetime.now(dt.UTC).date()
    old = folder / file_name(today - dt.timedelta(days=31))
    kept = folder / file_name(today - dt.timedelta(days=30))
    other = folder / "notes.txt"
    for path in (old, kept, other):
        path.write_text("{}\n")
    audit_log(tmp_path, retention_days=30).record(
        AuditEvent(Action.DELETE, Outcome.SUCCESS, "system", "retention")
    )
    assert not old.exists()
    assert kept.exists()
    assert other.exists()
    assert (folder / file_name(today)).exists()
    # 0: kept for ever
    old.write_text("{}\n")
    assert audit_log(tmp_path, retention_days=0).prune() == []
    assert old.exists()


def test_a_write_failure_is_counted_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "audit").write_text("a file where the folder should be")
    log = audit_log(tmp_path)
    before = metrics.AUDIT_WRITE_FAILURES._value.get()
    log.record(AuditEvent(Action.STORE, Outcome.SUCCESS, "dimse", "CT1"))
    assert metrics.AUDIT_WRITE_FAILURES._value.get() == before + 1
    assert "could not be written" in caplog.text


def _seed(tmp_path: Path) -> Path:
    folder = tmp_path / "audit"
    log = AuditLog(AuditConfig(path=folder))
    day1 = dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC)
    day2 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)
    log.record(
        AuditEvent(Action.STORE, Outcome.SUCCESS, "dimse", "CT1", studies=(STUDY_A,), time=day1)
    )
    log.record(
        AuditEvent(
            Action.RETRIEVE,
            Outcome.MINOR_FAILURE,
            "dicomweb",
            "alice",
            studies=(STUDY_B,),
            status=404,
            time=day2,
        )
    )
    log.record(
        AuditEvent(
            Action.QUERY,
            Outcome.SUCCESS,
            "dicomweb",
            "alice",
            studies=(STUDY_A, STUDY_B),
            time=day2 + dt.timedelta(hours=1),
        )
    )
    return folder


def test_reading_filters_by_time_study_who_action_and_outcome(tmp_path: Path) -> None:
    folder = _seed(tmp_path)
    with (folder / "audit-2026-12-01.jsonl").open("ab") as fh:
        fh.write(b'{"time": "2026-12-01T09:30:00+00:00", "act')  # cut short
    report = ReadReport()

    def actions(**criteria: object) -> list[str]:
        chosen = EventFilter(**criteria)  # type: ignore[arg-type]
        return [str(e["action"]) for e in read_events(folder, chosen, report)]

    assert actions() == ["store", "retrieve", "query"]
    assert report.unreadable == 1
    assert actions(since=dt.datetime(2026, 12, 1, tzinfo=dt.UTC)) == ["retrieve", "query"]
    assert actions(until=dt.datetime(2026, 12, 1, 8, 30, tzinfo=dt.UTC)) == ["store", "retrieve"]
    assert actions(study=STUDY_A) == ["store", "query"]
    assert actions(who="alice") == ["retrieve", "query"]
    assert actions(actions=frozenset({"store", "query"})) == ["store", "query"]
    assert actions(success=False) == ["retrieve"]
    assert actions(success=True, who="alice") == ["query"]


def test_the_audit_command_prints_a_table_or_json_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _seed(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("APPLIANCE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("APPLIANCE_AUDIT_PATH", str(folder))

    assert main(["audit", "--study", STUDY_B, "--outcome", "failure"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "time",
        "action",
        "outcome",
        "who",
        "address",
        "via",
        "studies",
        "n",
        "status",
    ]
    assert len(out) == 3
    assert out[-1] == "1 event(s)"
    assert "retrieve" in out[1]
    assert "minor-failure" in out[1]
    assert "404" in out[1]
    assert STUDY_B in out[1]

    assert main(["audit", "--json", "--who", "alice", "--action", "query"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["studies"] == [STUDY_A, STUDY_B]

    assert main(["audit", "--json", "--since", "2026-12-01T08:30:00"]) == 0
    assert [json.loads(x)["action"] for x in capsys.readouterr().out.splitlines()] == ["query"]

    # --days counts back from now: the seeded events are older than a day
    assert main(["audit", "--days", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 event(s)"
    assert main(["audit", "--action", "copy"]) == 2  # not an action
