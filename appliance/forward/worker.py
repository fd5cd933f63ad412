"""The senders: each destination's outbox, sent upstream.

Each ``[[forward]]`` destination gets ``concurrency`` sender threads; each
loops: claim a batch of due entries (up to ``batch_size``), send its store
entries in one STOW-RS request and its delete entries one DELETE each, and
mark every entry by the upstream's answer:

- delivered (or a duplicate whose content the upstream's copy matches);
- tried again later, after ``min(retry_max_seconds, 2 ** attempts)`` seconds
  scaled by a random factor from 0.5 to 1 (jitter, so a recovered upstream
  is not hit by every sender at once), or after the upstream's Retry-After
  if that is longer; transient failures are retried for as long as they
  last: an upstream away for days gets everything once it is back;
- parked, with the upstream's reason (a permanent failure; ``forward retry``
  queues it again);
- superseded, if the instance was deleted here before it could be sent.

Senders run in the ``worker`` process of ``serve`` (started when a
destination is configured); several nodes may run them over one index.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import IO

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.audit import Action, AuditEvent, AuditLog, outcome_of_counts, study_uids
from appliance.config import ForwardConfig
from appliance.encoding import data_set_of
from appliance.errors import ApplianceError, IndexUnavailable
from appliance.forward.outbox import Claim, Entry, Outbox
from appliance.forward.upstream import (
    Outcome,
    Part,
    Upstream,
    UpstreamError,
)
from appliance.index.sql import SqlIndex, StoredInstance
from appliance.outbound import backoff
from appliance.retrieve import RetrieveService
from appliance.transcode import TranscodeError, transcode

log = logging.getLogger(__name__)

#: Seconds a sender with nothing to send waits before looking again.
POLL_INTERVAL = 1.0
#: Seconds a sender waits after the index failed before trying again.
INDEX_RETRY = 5.0


@dataclasses.dataclass
class _Prepared:
    entry: Entry
    part: Part
    #: the bytes sent, when re-encoded (else read from the store again)
    reencoded: bytes | None = None


class Forwarder:
    """The senders of *destinations* over the index and storage of
    *retrieve* and *outbox*.

    Parameters
    ----------
    upstream_factory
        Makes the :class:`Upstream` of a destination (tests pass transports).
    audit
        The audit trail: each batch sent is an ``export`` event (a deletion
        sent, a ``delete`` event) of the studies in it; None: not recorded.
    """

    def __init__(
        self,
        destinations: Sequence[ForwardConfig],
        outbox: Outbox,
        index: SqlIndex,
        retrieve: RetrieveService,
        upstream_factory: Callable[[ForwardConfig], Upstream] = Upstream,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit
        self.destinations = tuple(destinations)
        self.outbox = outbox
        self.index = index
        self.retrieve = retrieve
        self._upstreams = {d.name: upstream_factory(d) for d in self.destinations}

    def close(self) -> None:
        for upstream in self._upstreams.values():
            upstream.close()

    def run(self, stop: threading.Event) -> None:
        """Run every sender until *stop* is set."""
        threads = [
            threading.Thread(
                target=self._sender,
                args=(destination, stop),
                name=f"forward-{destination.name}-{number}",
                daemon=True,
            )
            for destination in self.destinations
            for number in range(1, destination.concurrency + 1)
        ]
        for thread in threads:
            thread.start()
        log.info("forwarding to %s", ", ".join(f"{d.name} ({d.url})" for d in self.destinations))
        for thread in threads:
            thread.join()

    def _sender(self, destination: ForwardConfig, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = self.send_once(destination)
            except IndexUnavailable as exc:
                log.warning("forward %s: %s; trying again", destination.name, exc.reason)
                stop.wait(INDEX_RETRY)
                continue
            except Exception:
                log.exception("forward %s: the sender failed; it goes on", destination.name)
                stop.wait(INDEX_RETRY)
                continue
            if not busy:
                stop.wait(POLL_INTERVAL)

    def send_once(self, destination: ForwardConfig) -> bool:
        """Claim and send one batch of *destination*; False if none was due.

        Raises
        ------
        IndexUnavailable
            if the index fails (the claim, if any, runs out and the entries
            are sent again later).
        """
        lease = dt.timedelta(seconds=destination.timeout * 2 + 10)
        claim = self.outbox.claim(destination.name, destination.batch_size, lease)
        if claim is None:
            return False
        upstream = self._upstreams[destination.name]
        stores = [e for e in claim.entries if e.action == "store"]
        deletes = [e for e in claim.entries if e.action == "delete"]
        if stores:
            self._send_stores(destination, upstream, claim, stores)
        for entry in deletes:
            outcome = upstream.delete_instance(
                entry.study_instance_uid, entry.series_instance_uid, entry.sop_instance_uid
            )
            self._mark(destination, claim, {entry.sop_instance_uid: [entry]}, outcome)
        return True

    def _send_stores(
        self, destination: ForwardConfig, upstream: Upstream, claim: Claim, entries: list[Entry]
    ) -> None:
        prepared: list[_Prepared] = []
        gone: list[int] = []
        failed: dict[str, str] = {}
        by_uid: dict[str, list[Entry]] = {}
        for entry in entries:
            if entry.sop_instance_uid in by_uid:
                # the same instance queued twice in one batch (a replay):
                # sent once, both entries marked by its outcome
                by_uid[entry.sop_instance_uid].append(entry)
                continue
            stored = self.index.in_partition(entry.partition_key).find_instance(
                entry.sop_instance_uid
            )
            if stored is None:
                gone.append(entry.id)
                continue
            by_uid[entry.sop_instance_uid] = [entry]
            try:
                prepared.append(self._prepare(destination, entry, stored))
            except TranscodeError as exc:
                failed[entry.sop_instance_uid] = exc.reason
        if gone:
            self.outbox.superseded(claim.token, gone, "deleted here before it was sent")
        outcome = Outcome(permanent=dict(failed))
        if prepared:
            sent = upstream.store_instances([p.part for p in prepared])
            self._check_duplicates(upstream, prepared, sent)
            outcome.delivered |= sent.delivered
            outcome.transient.update(sent.transient)
            outcome.permanent.update(sent.permanent)
            outcome.retry_after = sent.retry_after
        self._mark(destination, claim, by_uid, outcome)

    def _prepare(
        self, destination: ForwardConfig, entry: Entry, stored: StoredInstance
    ) -> _Prepared:
        if destination.explicit_vr_only and stored.transfer_syntax_uid == ImplicitVRLittleEndian:
            # e.g. Azure's DICOM service takes explicit VR only: both are
            # native, so only the element headers change (each gets the VR
            # of the data dictionary, UN for an unknown private element,
            # PS3.5 6.2.2); every value and the pixel data stay as stored
            with self.retrieve.stream(stored) as source:
                data = transcode(source.read(), ExplicitVRLittleEndian)
            return _Prepared(
                entry, Part(entry.sop_instance_uid, len(data), lambda: io.BytesIO(data)), data
            )

        def opener(stored: StoredInstance = stored) -> IO[bytes]:
            return self.retrieve.stream(stored)

        return _Prepared(entry, Part(entry.sop_instance_uid, stored.size, opener))

    def _check_duplicates(
        self, upstream: Upstream, prepared: list[_Prepared], outcome: Outcome
    ) -> None:
        """Count a duplicate answer as delivered only if the upstream's copy
        has the same data set as the one sent; park it if not."""
        for item in prepared:
            uid = item.entry.sop_instance_uid
            if uid not in outcome.duplicate:
                continue
            outcome.duplicate.discard(uid)
            try:
                theirs = upstream.retrieve_instance(
                    item.entry.study_instance_uid, item.entry.series_instance_uid, uid
                )
                if item.reencoded is not None:
                    ours = item.reencoded
                else:
                    with item.part.open() as stream:
                        ours = stream.read()
            except (UpstreamError, ApplianceError) as exc:
                outcome.transient[uid] = f"the upstream has it already; checking it failed: {exc}"
                continue
            if theirs is None:
                outcome.transient[uid] = "the upstream says it has it, but does not serve it"
            elif _same_data_set(theirs, ours):
                outcome.delivered.add(uid)
            else:
                outcome.permanent[uid] = (
                    "the upstream holds other content under this SOP Instance UID"
                )

    def _mark(
        self,
        destination: ForwardConfig,
        claim: Claim,
        by_uid: dict[str, list[Entry]],
        outcome: Outcome,
    ) -> None:
        def ids(uids: Iterable[str]) -> list[int]:
            return [entry.id for uid in uids for entry in by_uid.get(uid, [])]

        if self.audit is not None:
            _audit(self.audit, destination, by_uid, outcome)
        delivered = ids(outcome.delivered)
        if delivered:
            self.outbox.delivered(claim.token, delivered)
            log.info("forward %s: %d delivered", destination.name, len(delivered))
        for reason, uids in _grouped(outcome.permanent).items():
            log.warning("forward %s: %d parked: %s", destination.name, len(uids), reason)
            self.outbox.park(claim.token, ids(uids), reason)
        if outcome.transient:
            attempts = max(
                (entry.attempts for uid in outcome.transient for entry in by_uid.get(uid, [])),
                default=0,
            )
            delay = backoff(attempts, destination.retry_max_seconds, outcome.retry_after)
            at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
            for reason, uids in _grouped(outcome.transient).items():
                log.warning(
                    "forward %s: %d not delivered (%s); next try in %.0f s",
                    destination.name,
                    len(uids),
                    reason,
                    delay,
                )
                self.outbox.retry(claim.token, ids(uids), reason, at)


def _audit(
    audit: AuditLog, destination: ForwardConfig, by_uid: dict[str, list[Entry]], outcome: Outcome
) -> None:
    """One batch's audit event: the studies sent, the instances delivered
    and not delivered (for now or for good)."""
    entries = [entries[0] for entries in by_uid.values() if entries]
    if not entries:
        return
    delivered = sum(uid in outcome.delivered for uid in by_uid)
    failed = sum(uid in outcome.transient or uid in outcome.permanent for uid in by_uid)
    audit.record(
        AuditEvent(
            action=Action.DELETE if entries[0].action == "delete" else Action.EXPORT,
            outcome=outcome_of_counts(delivered, failed),
            protocol="forward",
            who="forward",
            address=destination.url,
            destination=destination.name,
            studies=study_uids(entry.study_instance_uid for entry in entries),
            instances=delivered,
            failed=failed,
            transaction="STOW-RS" if entries[0].action != "delete" else "DELETE",
        )
    )


def _grouped(reasons: dict[str, str]) -> dict[str, list[str]]:
    """SOP Instance UIDs by reason."""
    grouped: dict[str, list[str]] = {}
    for uid, reason in reasons.items():
        grouped.setdefault(reason, []).append(uid)
    return grouped


def _same_data_set(theirs: bytes, ours: bytes) -> bool:
    try:
        return data_set_of(theirs) == data_set_of(ours)
    except Exception:  # noqa: BLE001 - unreadable: not the same
        return False
