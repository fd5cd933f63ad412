"""Header -> checks -> durable blob -> one index transaction.

The order is the acknowledgement promise (SPEC.md): a success is returned only
after the blob is durably written *and* the index row committed.  If the index
refuses after the blob was written, the blob is removed at once; if the process
dies in between, :func:`appliance.ingest.sweep.sweep_orphans` removes it later.
So an index row never points at a missing blob.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Sequence
from typing import IO

from appliance import metrics
from appliance.config import IngestConfig
from appliance.dicomio import (
    extract_record,
    part10_prefix,
    read_header,
    validate_uid,
)
from appliance.errors import ApplianceError, InvalidInstance
from appliance.extended_tags import ExtendedTags, read_values, values_writer
from appliance.forward.routes import Routes
from appliance.index.sql import AddOutcome, AddResult, AlsoWrite, SqlIndex, rebound
from appliance.ingest.streams import PrefixedStream
from appliance.model import InstanceRecord, Origin
from appliance.status import Status, StatusCategory
from appliance.storage.base import BlobInfo, BlobStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """The outcome of storing one instance, for either edge to put on the wire."""

    status: Status
    #: why, for a warning or a failure ("" on plain success); no PHI
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    outcome: AddOutcome | None = None

    @property
    def stored(self) -> bool:
        """True if the instance is in the index after this call (new, replaced
        or kept from before)."""
        return self.status.category in (StatusCategory.SUCCESS, StatusCategory.WARNING)


@dataclasses.dataclass
class Prepared:
    """An instance whose blob is written durably and which waits for its
    index transaction (:meth:`IngestService.commit`)."""

    ids: IngestResult
    record: InstanceRecord
    blob: BlobInfo
    origin: Origin
    forward_to: Sequence[str] = ()
    also: AlsoWrite | None = None


class IngestService:
    """Stores instances through one path, whatever protocol brought them."""

    def __init__(
        self,
        storage: BlobStore,
        index: SqlIndex,
        config: IngestConfig,
        routes: Routes | None = None,
        extended: ExtendedTags | None = None,
    ) -> None:
        self.storage = storage
        #: the extended query tags whose values are indexed with each
        #: instance, in its own index transaction (None: none)
        self.extended = extended
        self.index = index
        self.policy = config.duplicate_policy
        #: the forwarding destinations: an instance stored is queued for
        #: those that take it, in its own index transaction
        self.routes = routes if routes is not None else Routes(())

    def in_partition(self, partition_key: int) -> IngestService:
        """This service on the data partition *partition_key*."""
        return rebound(self, partition_key)

    def store_part10(
        self, source: IO[bytes], origin: Origin, *, expected_study_uid: str | None = None
    ) -> IngestResult:
        """Store a DICOM Part 10 stream (preamble, File Meta, data set), as
        STOW-RS receives it.  *source* must be seekable.

        Parameters
        ----------
        source
            The Part 10 bytes, seekable.
        origin
            Who sent them.
        expected_study_uid
            When given (STOW-RS to ``/studies/{study}``, PS3.18 10.5.1), an
            instance of another study is refused with
            :attr:`Status.STUDY_INSTANCE_UID_MISMATCH`, checked on the header
            before anything is written.
        """
        return _counted(origin, self._store(source, origin, expected_study_uid))

    def store_dataset(
        self,
        dataset: bytes | IO[bytes],
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        origin: Origin,
    ) -> IngestResult:
        """Store a bare data set encoded in *transfer_syntax_uid*, as C-STORE
        receives it; File Meta Information is put in front of the bytes, which
        are otherwise stored exactly as received."""
        try:
            for value, keyword in (
                (sop_class_uid, "AffectedSOPClassUID"),
                (sop_instance_uid, "AffectedSOPInstanceUID"),
                (transfer_syntax_uid, "TransferSyntaxUID"),
            ):
                validate_uid(value, keyword)
        except InvalidInstance as exc:
            return _counted(origin, IngestResult(exc.status, exc.reason))
        prefix = part10_prefix(
            sop_class_uid, sop_instance_uid, transfer_syntax_uid, origin.calling_ae
        )
        body = io.BytesIO(dataset) if isinstance(dataset, bytes) else dataset
        return _counted(
            origin,
            self._store(
                io.BufferedReader(PrefixedStream(prefix, body)),
                origin,
                expected_sop=(sop_class_uid, sop_instance_uid),
            ),
        )

    def _store(
        self,
        source: IO[bytes],
        origin: Origin,
        expected_study_uid: str | None = None,
        expected_sop: tuple[str, str] | None = None,
    ) -> IngestResult:
        prepared = self._prepare(source, origin, expected_study_uid, expected_sop)
        if isinstance(prepared, IngestResult):
            return prepared
        try:
            added = self.index.add_instance(
                prepared.record, prepared.blob, self.policy, prepared.forward_to, also=prepared.also
            )
        except BaseException as exc:
            self._drop(prepared)
            if not isinstance(exc, ApplianceError):
                raise
            return self._refused_by_index(prepared, exc)
        return self._finish(prepared, added)

    def _prepare(
        self,
        source: IO[bytes],
        origin: Origin,
        expected_study_uid: str | None = None,
        expected_sop: tuple[str, str] | None = None,
    ) -> IngestResult | Prepared:
        """Everything before the index transaction: the header read and
        checked, the duplicate look-up, the blob written durably, the
        forwarding destinations and the extended tags' values; an
        IngestResult when the instance ends here (refused, a duplicate not
        written again, a storage failure)."""
        try:
            record = extract_record(read_header(source))
        except ApplianceError as exc:
            sender = " ".join(part for part in (origin.protocol, origin.calling_ae) if part)
            log.warning("refused an instance from %s: %s", sender, exc.reason)
            return IngestResult(exc.status, exc.reason)

        source_ae = origin.calling_ae.strip()[:16]
        protocol = origin.protocol[:16]
        if record.instance.source_ae != source_ae or record.instance.source_protocol != protocol:
            # who sent it, and how, is the protocol's word, not the File Meta's
            instance_ = dataclasses.replace(
                record.instance, source_ae=source_ae, source_protocol=protocol
            )
            record = dataclasses.replace(record, instance=instance_)
        ids = _identified(record)
        sop_uid = record.instance.sop_instance_uid
        if expected_study_uid is not None and record.study.study_instance_uid != expected_study_uid:
            reason = (
                f"StudyInstanceUID {record.study.study_instance_uid} differs from the study "
                f"{expected_study_uid} the request was addressed to"
            )
            log.warning("refused %s from %s: %s", sop_uid, origin.protocol, reason)
            return dataclasses.replace(
                ids, status=Status.STUDY_INSTANCE_UID_MISMATCH, reason=reason
            )
        if expected_sop is not None:
            # PS3.4 B.2.3: a data set that is not the instance the C-STORE
            # request names "does not match SOP Class" (0xA900)
            reason = _identity_mismatch(record, *expected_sop)
            if reason:
                log.warning("refused %s from %s: %s", sop_uid, origin.protocol, reason)
                return dataclasses.replace(
                    ids, status=Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, reason=reason
                )
        try:
            existing = self.index.find_instance(sop_uid)
        except ApplianceError as exc:
            log.error("index look-up failed for %s: %s", sop_uid, exc.reason)
            return dataclasses.replace(ids, status=exc.status, reason=exc.reason)
        if existing is not None and self.policy != "replace":
            # no need to write the bytes at all; the race where another writer
            # commits between here and our insert is handled by add_instance
            return self._duplicate(ids)

        try:
            source.seek(0)
            blob = self.storage.put(source)
        except ApplianceError as exc:
            log.error("storage failed for %s: %s", sop_uid, exc.reason)
            return dataclasses.replace(ids, status=exc.status, reason=exc.reason)

        prepared = Prepared(ids, record, blob, origin)
        try:
            prepared.forward_to = self.routes.destinations(record, origin) if self.routes else ()
            prepared.also = self._extended_values(source, sop_uid)
        except BaseException as exc:
            self._drop(prepared)
            if not isinstance(exc, ApplianceError):
                raise
            return self._refused_by_index(prepared, exc)
        return prepared

    def commit(self, batch: Sequence[Prepared]) -> list[IngestResult]:
        """Index the prepared instances of *batch* in one transaction (one
        commit, one WAL flush for all of them), their results in order.
        Nothing of the batch is acknowledged before this returns: the
        caller answers only then (STOW-RS answers a request at its end).

        If the transaction fails (an instance whose series belongs to
        another study, a lost insert race, the database), each instance is
        indexed on its own instead, so one instance's failure is its own.
        """
        if not batch:
            return []
        items = [(p.record, p.blob, p.forward_to, p.also) for p in batch]
        try:
            added = self.index.add_instances(items, self.policy)
        except ApplianceError as exc:
            log.info("a batch of %d instances is indexed one by one: %s", len(batch), exc.reason)
        else:
            done = zip(batch, added, strict=True)
            return [
                _counted(prepared.origin, self._finish(prepared, one)) for prepared, one in done
            ]
        results = []
        for prepared in batch:
            try:
                one = self.index.add_instance(
                    prepared.record,
                    prepared.blob,
                    self.policy,
                    prepared.forward_to,
                    also=prepared.also,
                )
            except BaseException as exc:
                self._drop(prepared)
                if not isinstance(exc, ApplianceError):
                    raise
                results.append(_counted(prepared.origin, self._refused_by_index(prepared, exc)))
                continue
            results.append(_counted(prepared.origin, self._finish(prepared, one)))
        return results

    def prepare_part10(
        self, source: IO[bytes], origin: Origin, *, expected_study_uid: str | None = None
    ) -> IngestResult | Prepared:
        """:meth:`store_part10` up to the index transaction (see
        :meth:`commit`): an IngestResult if the instance ends there, else
        what :meth:`commit` indexes.  Nothing is acknowledged yet: a
        prepared instance whose commit never comes leaves an orphan blob,
        which the sweep removes."""
        prepared = self._prepare(source, origin, expected_study_uid)
        return _counted(origin, prepared) if isinstance(prepared, IngestResult) else prepared

    def _drop(self, prepared: Prepared) -> None:
        """Delete the blob of an instance that will not be indexed (a
        failure is left to the sweeper)."""
        with contextlib.suppress(Exception):
            self.storage.delete(prepared.blob.key)

    def _refused_by_index(self, prepared: Prepared, exc: ApplianceError) -> IngestResult:
        """The result of an instance whose blob was written (and dropped)
        but which could not be indexed."""
        sop_uid = prepared.record.instance.sop_instance_uid
        log.error("index refused %s: %s", sop_uid, exc.reason)
        return dataclasses.replace(prepared.ids, status=exc.status, reason=exc.reason)

    def _finish(self, prepared: Prepared, added: AddResult) -> IngestResult:
        """The result of an instance the index took (*added*)."""
        if added.outcome in (AddOutcome.DUPLICATE_KEPT, AddOutcome.DUPLICATE_REJECTED):
            self._forget(prepared.blob.key)
            return self._duplicate(prepared.ids)
        if added.orphaned_blob_key is not None:
            self._forget(added.orphaned_blob_key)
        log.debug(
            "stored %s (study %s) via %s from %r",
            prepared.record.instance.sop_instance_uid,
            prepared.record.study.study_instance_uid,
            prepared.origin.protocol,
            prepared.origin.calling_ae,
        )
        return dataclasses.replace(prepared.ids, outcome=added.outcome)

    def _extended_values(self, source: IO[bytes], sop_uid: str) -> AlsoWrite | None:
        """What writes the values of the extended query tags of the
        instance in *source* (None when no tag is defined).  A header that
        cannot be read for them, or an invalid value, is an error of the
        tag (``eqt_error``), never a refusal of the instance."""
        tags = self.extended.indexed() if self.extended is not None else ()
        if not tags:
            return None
        source.seek(0)
        return values_writer(read_values(source, tags))

    def _duplicate(self, ids: IngestResult) -> IngestResult:
        if self.policy == "reject":
            return dataclasses.replace(
                ids,
                status=Status.DUPLICATE_SOP_INSTANCE,
                reason="an instance with this SOP Instance UID is already stored",
                outcome=AddOutcome.DUPLICATE_REJECTED,
            )
        return dataclasses.replace(
            ids,
            status=Status.DUPLICATE_INSTANCE_KEPT,
            reason="an instance with this SOP Instance UID was already stored; "
            "the stored copy was kept",
            outcome=AddOutcome.DUPLICATE_KEPT,
        )

    def _forget(self, key: str) -> None:
        """Delete a blob the index does not reference; a failure is left to
        the sweeper, never to the client."""
        try:
            self.storage.delete(key)
        except ApplianceError as exc:
            log.warning("could not delete unreferenced blob %s (the sweeper will): %s", key, exc)


def _identified(record: InstanceRecord) -> IngestResult:
    """A success result carrying the instance's UIDs, to be varied."""
    return IngestResult(
        Status.SUCCESS,
        sop_class_uid=record.instance.sop_class_uid,
        sop_instance_uid=record.instance.sop_instance_uid,
        study_instance_uid=record.study.study_instance_uid,
        series_instance_uid=record.series.series_instance_uid,
    )


def _identity_mismatch(record: InstanceRecord, sop_class: str, sop_instance: str) -> str:
    """Why the data set is not the instance a request names, or ""."""
    if record.instance.sop_instance_uid != sop_instance:
        return f"SOPInstanceUID {record.instance.sop_instance_uid} differs from the request's"
    if record.instance.sop_class_uid != sop_class:
        return f"SOPClassUID {record.instance.sop_class_uid} differs from the request's"
    return ""


def _counted(origin: Origin, result: IngestResult) -> IngestResult:
    """*result*, counted in ``appliance_ingest_instances_total``: its index
    outcome, or "failed" (this side could not store it: out of resources,
    processing failure) or "refused" (the instance was at fault)."""
    if result.outcome is not None:
        outcome = result.outcome.value
    elif result.stored:
        outcome = "stored"
    elif result.status in (Status.OUT_OF_RESOURCES, Status.PROCESSING_FAILURE):
        outcome = "failed"
    else:
        outcome = "refused"
    metrics.INGESTED.labels(origin.protocol, outcome).inc()
    return result
