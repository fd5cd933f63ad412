"""The Storage Commitment outbox (:mod:`appliance.commitment`) on SQLite and
PostgreSQL: results (PS3.3 C.14.1.1 failure reasons), durability across a
new engine, one claim per report among concurrent workers, the back-off
schedule and the give-up state."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
from sqlalchemy import Engine

from appliance.commitment import (
    EVENT_FAILURES_EXIST,
    EVENT_SUCCESSFUL,
    MAX_ITEMS,
    CommitmentOutbox,
    CommitmentReport,
    InvalidCommitmentRequest,
    Reference,
    ReportState,
    RetrySchedule,
)
from appliance.index.engine import create_index_engine
from appliance.index.sql import SqlIndex
from appliance.model import (
    InstanceAttributes,
    InstanceRecord,
    PatientAttributes,
    SeriesAttributes,
    StudyAttributes,
)
from appliance.status import Status
from appliance.storage.base import BlobInfo

pytestmark = pytest.mark.integration

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def store(engine: Engine, sop_class_uid: str = CT_IMAGE) -> Reference:
    """Index one instance the way the ingest pipeline does; its reference."""
    sop_uid = new_uid()
    record = InstanceRecord(
        patient=PatientAttributes(),
        study=StudyAttributes(study_instance_uid=new_uid()),
        series=SeriesAttributes(series_instance_uid=new_uid()),
        instance=InstanceAttributes(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class_uid, transfer_syntax_uid=EXPLICIT_LE
        ),
    )
    SqlIndex(engine).add_instance(record, BlobInfo(key=uuid.uuid4().hex, size=1))
    return Reference(sop_class_uid, sop_uid)


@pytest.fixture
def outbox(index_engine: Engine) -> CommitmentOutbox:
    return CommitmentOutbox(index_engine)


# ------------------------------------------------------------------ results


def test_a_request_of_stored_instances_is_all_committed(
    index_engine: Engine, outbox: CommitmentOutbox
) -> None:
    refs = [store(index_engine), store(index_engine, MR_IMAGE)]
    outcome = outbox.request(new_uid(), "MODALITY", refs, now=T0)
    assert not outcome.repeated
    assert outcome.result.committed == tuple(refs)
    assert outcome.result.failed == ()
    assert outcome.result.event_type == EVENT_SUCCESSFUL
    report = outbox.get(outcome.report_id)
    assert report is not None
    assert report.state is ReportState.PENDING
    assert report.attempts == 0
    assert report.next_attempt_at == T0  # due at once
    assert report.result == outcome.result


def test_missing_instances_and_class_conflicts_fail_with_their_reasons(
    index_engine: Engine, outbox: CommitmentOutbox
) -> None:
    stored = store(index_engine)
    missing = Reference(CT_IMAGE, new_uid())
    conflict = Reference(MR_IMAGE, store(index_engine, CT_IMAGE).sop_instance_uid)
    outcome = outbox.request(new_uid(), "MODALITY", [missing, stored, conflict])
    result = outcome.result
    assert result.event_type == EVENT_FAILURES_EXIST
    assert result.committed == (stored,)
    # request order kept; PS3.3 C.14.1.1 reasons
    assert [(f.sop_instance_uid, f.reason) for f in result.failed] == [
        (missing.sop_instance_uid, Status.NO_SUCH_OBJECT_INSTANCE),
        (conflict.sop_instance_uid, Status.CLASS_INSTANCE_CONFLICT),
    ]
    assert result.failed[1].sop_class_uid == MR_IMAGE  # as the request named it


def test_a_repeated_request_is_answered_once_and_a_reused_uid_fails_0131(
    index_engine: Engine, outbox: CommitmentOutbox
) -> None:
    ref = store(index_engine)
    uid = new_uid()
    first = outbox.request(uid, "MODALITY", [ref])
    again = outbox.request(uid, " MODALITY ", [ref])  # AE titles compare stripped
    assert again.repeated
    assert again.report_id == first.report_id
    assert again.result == first.result
    reused = outbox.request(uid, "MODALITY", [ref, Reference(CT_IMAGE, new_uid())])
    assert not reused.repeated
    assert reused.result.committed == ()
    assert {f.reason for f in reused.result.failed} == {Status.DUPLICATE_TRANSACTION_UID}
    assert len(outbox.reports(uid)) == 2


@pytest.mark.parametrize(
    ("uid", "items", "status"),
    [
        ("", [Reference(CT_IMAGE, "1.2.3")], Status.INVALID_ARGUMENT_VALUE),
        ("1.02.3", [Reference(CT_IMAGE, "1.2.3")], Status.INVALID_ARGUMENT_VALUE),
        ("1.2.3", [], Status.INVALID_ARGUMENT_VALUE),
        ("1.2.3", [Reference("", "1.2.3")], Status.INVALID_ARGUMENT_VALUE),
        ("1.2.3", [Reference(CT_IMAGE, "1.2.3/../x")], Status.INVALID_ARGUMENT_VALUE),
        ("1.2.3", [Reference(CT_IMAGE, "1.2.3")] * (MAX_ITEMS + 1), Status.RESOURCE_LIMITATION),
    ],
)
def test_a_malformed_request_is_refused_and_not_recorded(
    outbox: CommitmentOutbox, uid: str, items: list[Reference], status: Status
) -> None:
    with pytest.raises(InvalidCommitmentRequest) as raised:
        outbox.request(uid, "MODALITY", items)
    assert raised.value.status is status
    assert outbox.counts() == {"waiting": 0, "pending": 0, "delivered": 0, "failed": 0}


def test_many_references_are_assessed_in_chunks(
    index_engine: Engine, outbox: CommitmentOutbox
) -> None:
    stored = [store(index_engine) for _ in range(3)]
    missing = [Reference(CT_IMAGE, new_uid()) for _ in range(1200)]
    outcome = outbox.request(new_uid(), "MODALITY", missing[:600] + stored + missing[600:])
    assert outcome.result.committed == tuple(stored)
    assert len(outcome.result.failed) == 1200


# --------------------------------------------------------------- durability


def test_a_report_survives_a_restart(index_url: str, index_engine: Engine) -> None:
    ref = store(index_engine)
    outcome = CommitmentOutbox(index_engine).request(new_uid(), "MODALITY", [ref], now=T0)
    index_engine.dispose()
    fresh = create_index_engine(index_url)
    try:
        outbox = CommitmentOutbox(fresh)
        assert outbox.due(T0) == [outcome.report_id]
        report = outbox.claim(outcome.report_id, T0)
        assert report is not None
        assert report.result.committed == (ref,)
    finally:
        fresh.dispose()


# ------------------------------------------------------------------- claims


def test_a_claim_counts_the_attempt_and_holds_off_others_for_the_lease(
    outbox: CommitmentOutbox,
) -> None:
    rid = outbox.request(new_uid(), "MODALITY", [Reference(CT_IMAGE, new_uid())], now=T0).report_id
    claimed = outbox.claim(rid, T0)
    assert claimed is not None
    assert claimed.attempts == 1
    assert claimed.claim_token
    assert outbox.claim(rid, T0) is None  # taken
    assert outbox.due(T0 + outbox.lease - dt.timedelta(seconds=1)) == []
    # the claimer died: after the lease another worker takes it over
    again = outbox.claim(rid, T0 + outbox.lease)
    assert again is not None
    assert again.attempts == 2
    # the first claimer's late answer is ignored
    assert not outbox.mark_delivered(claimed, "new")
    assert outbox.mark_delivered(again, "same")
    final = outbox.get(rid)
    assert final is not None
    assert final.state is ReportState.DELIVERED
    assert final.delivered_via == "same"
    assert final.claim_token is None
    assert outbox.due(T0 + dt.timedelta(days=9)) == []


def test_concurrent_workers_claim_each_report_once(
    index_engine: Engine, outbox: CommitmentOutbox
) -> None:
    ids = {
        outbox.request(new_uid(), "MODALITY", [Reference(CT_IMAGE, new_uid())]).report_id
        for _ in range(12)
    }
    claimed: list[list[int]] = [[] for _ in range(4)]
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(mine: list[int]) -> None:
        worker = CommitmentOutbox(index_engine)
        try:
            start.wait()
            for report in worker.claim_due():
                mine.append(report.id)
                worker.mark_delivered(report, "new")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(mine,)) for mine in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    every = [rid for mine in claimed for rid in mine]
    assert sorted(every) == sorted(ids)  # each once, none lost
    assert outbox.counts() == {"waiting": 0, "pending": 0, "delivered": 12, "failed": 0}


# ------------------------------------------------------- back-off, give-up


def test_the_default_schedule_doubles_from_10_s_to_10_min_for_24_h() -> None:
    schedule = RetrySchedule()
    delays = [schedule.delay(n).total_seconds() for n in range(1, 10)]
    assert delays == [10, 20, 40, 80, 160, 320, 600, 600, 600]
    assert schedule.delay(10_000) == dt.timedelta(minutes=10)
    assert schedule.next_attempt(3, T0, T0 + dt.timedelta(hours=1)) == T0 + dt.timedelta(
        hours=1, seconds=40
    )
    assert schedule.next_attempt(99, T0, T0 + dt.timedelta(hours=24)) is None


def _claim(outbox: CommitmentOutbox, report_id: int, now: dt.datetime) -> CommitmentReport:
    report = outbox.claim(report_id, now)
    assert report is not None
    return report


def test_failed_attempts_are_retried_on_the_schedule_then_given_up(
    outbox: CommitmentOutbox,
) -> None:
    schedule = RetrySchedule(
        first_delay=dt.timedelta(seconds=10),
        max_delay=dt.timedelta(seconds=30),
        give_up_after=dt.timedelta(seconds=100),
    )
    rid = outbox.request(new_uid(), "MODALITY", [Reference(CT_IMAGE, new_uid())], now=T0).report_id
    now, waits = T0, []
    while True:
        report = _claim(outbox, rid, now)
        retry_at = schedule.next_attempt(report.attempts, report.created_at, now)
        assert outbox.mark_failed(report, f"connection refused #{report.attempts}", retry_at, now)
        if retry_at is None:
            break
        waits.append((retry_at - now).total_seconds())
        assert outbox.due(retry_at - dt.timedelta(microseconds=1)) == []
        assert outbox.due(retry_at) == [rid]
        now = retry_at
    # attempts at T0, +10, +30, +60, +90 and +120, which is past give_up_after
    assert waits == [10, 20, 30, 30, 30]
    final = outbox.get(rid)
    assert final is not None
    assert final.state is ReportState.FAILED
    assert final.attempts == 6
    assert final.last_error == "connection refused #6"
    assert outbox.due(now + dt.timedelta(days=2)) == []
    assert outbox.counts()["failed"] == 1


def test_a_permanent_failure_keeps_its_reason(outbox: CommitmentOutbox) -> None:
    rid = outbox.request(new_uid(), "NOBODY", [Reference(CT_IMAGE, new_uid())], now=T0).report_id
    report = _claim(outbox, rid, T0)
    assert outbox.mark_failed(report, "AE 'NOBODY' is not in dimse.peers", None, T0)
    final = outbox.get(rid)
    assert final is not None
    assert final.state is ReportState.FAILED
    assert final.last_error == "AE 'NOBODY' is not in dimse.peers"
    assert not outbox.mark_delivered(report, "new")  # a failed report stays failed
