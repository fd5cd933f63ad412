"""DICOMcast's threads, in the ``worker`` process of ``serve`` (started
when ``fhir.url`` is set): one follows the change feed and queues the
studies it names (:class:`~appliance.fhir.queue.StudyQueue`), and
``fhir.concurrency`` senders publish them (:class:`Publisher`).

A study whose publishing failed transiently (the FHIR server away, busy or
refusing the credentials) is tried again after ``min(retry_max_seconds,
2 ** attempts)`` seconds with jitter, or the server's Retry-After: for as
long as it takes, so the server being down delays, never loses.  When one
study finds the server unreachable, the rest of the sender's batch waits
with it instead of each timing out in turn.  A permanent failure (the
server refuses the resource) parks the study with the server's reason;
``fhir retry`` queues it again.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine

from appliance.audit import Action, AuditEvent, AuditLog, Outcome
from appliance.config import Config
from appliance.errors import IndexUnavailable
from appliance.fhir.client import FhirClient, FhirError
from appliance.fhir.publisher import Publisher
from appliance.fhir.queue import StudyClaim, StudyQueue
from appliance.outbound import backoff

log = logging.getLogger(__name__)

#: Seconds the follower and an idle sender wait before looking again.
POLL_INTERVAL = 1.0
#: Seconds a thread waits after the index failed.
INDEX_RETRY = 5.0


class DicomCast:
    """Publishes the studies of *engine*'s change feed to ``config.fhir.url``."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        client_factory: Callable[[Config], FhirClient] = lambda c: FhirClient(c.fhir),
        audit: AuditLog | None = None,
    ) -> None:
        #: each study published (or parked) is an ``export`` audit event
        self.audit = audit
        self.config = config
        self.settings = config.fhir
        self.queue = StudyQueue(engine)
        self.client = client_factory(config)
        self.publisher = Publisher(config, self.client, engine)

    def close(self) -> None:
        self.client.close()

    def run(self, stop: threading.Event) -> None:
        """Follow the feed and publish until *stop* is set."""
        threads = [threading.Thread(target=self._follow, args=(stop,), name="fhir-feed")]
        threads += [
            threading.Thread(target=self._send, args=(stop,), name=f"fhir-{number}")
            for number in range(1, self.settings.concurrency + 1)
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        log.info("DICOMcast to %s (Endpoint %s)", self.settings.url, self.publisher.address)
        for thread in threads:
            thread.join()

    def _follow(self, stop: threading.Event) -> None:
        settle = dt.timedelta(seconds=self.settings.settle_seconds)
        while not stop.is_set():
            try:
                read = self.queue.pull(settle)
            except IndexUnavailable as exc:
                log.warning("fhir: reading the change feed failed: %s", exc.reason)
                stop.wait(INDEX_RETRY)
                continue
            if not read:
                stop.wait(POLL_INTERVAL)

    def _send(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = self.send_once()
            except IndexUnavailable as exc:
                log.warning("fhir: %s; trying again", exc.reason)
                stop.wait(INDEX_RETRY)
                continue
            except Exception:
                log.exception("fhir: the sender failed; it goes on")
                stop.wait(INDEX_RETRY)
                continue
            if not busy:
                stop.wait(POLL_INTERVAL)

    def send_once(self) -> bool:
        """Claim and publish one batch of due studies; False if none was due."""
        lease = dt.timedelta(seconds=self.settings.timeout * 8 + 10)
        claim = self.queue.claim(self.settings.batch_size, lease)
        if claim is None:
            return False
        self._publish(claim)
        return True

    def _audit(self, study_uid: str, outcome: Outcome) -> None:
        """A study's metadata (the patient's name and ID among it) sent to
        the FHIR server, or refused by it for good."""
        if self.audit is None:
            return
        self.audit.record(
            AuditEvent(
                action=Action.EXPORT,
                outcome=outcome,
                protocol="fhir",
                who="dicomcast",
                address=self.settings.url,
                destination="fhir",
                studies=(study_uid,),
                transaction="DICOMcast",
            )
        )

    def _publish(self, claim: StudyClaim) -> None:
        # the Endpoint is looked up once per batch: one removed on the
        # server is made again, not referred to
        self.publisher.forget_endpoint()
        for number, item in enumerate(claim.studies):
            uid = item.study_instance_uid
            try:
                published = self.publisher.publish(uid)
            except FhirError as exc:
                if not exc.transient:
                    self._audit(uid, Outcome.SERIOUS_FAILURE)
                    log.warning("fhir: study %s parked: %s", uid, exc.reason)
                    self.queue.park(claim.token, uid, exc.reason)
                    continue
                delay = backoff(item.attempts, self.settings.retry_max_seconds, exc.retry_after)
                at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
                rest = claim.studies[number:]
                log.warning(
                    "fhir: %d stud%s not published (%s); next try in %.0f s",
                    len(rest),
                    "y" if len(rest) == 1 else "ies",
                    exc.reason,
                    delay,
                )
                # the server is away or busy: the rest of the batch waits too
                for other in rest:
                    self.queue.retry(claim.token, other.study_instance_uid, exc.reason, at)
                return
            self._audit(uid, Outcome.SUCCESS)
            if self.queue.synced(claim.token, uid, published.imaging_study):
                log.info(
                    "fhir: study %s published as %s (%d write%s)",
                    uid,
                    published.imaging_study or "nothing",
                    published.writes,
                    "" if published.writes == 1 else "s",
                )
