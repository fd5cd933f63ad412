"""The index tables (SQLAlchemy 2 Core).

Columns hold attribute values as the header gave them (decoded to Unicode),
plus derived *match* columns where DICOM matching needs another form:

- ``*_norm``: Person Name values casefolded, so PN matching is
  case-insensitive (PS3.4 C.2.2.2.1 allows it; PS3.18 viewers expect it).
- ``*_time_key``: TM values as fixed-width ``HHMMSS.FFFFFF`` so that range
  matching (PS3.4 C.2.2.2.5) can compare text.
- DA values are stored normalised as ``YYYYMMDD``.

Patient attributes are kept twice on purpose: in ``patient`` for the PATIENT
level of C-FIND, and on ``study`` as the study's own header said them, so a
study-level query matches the study's values even when several studies share
an empty or reused Patient ID.

The schema's history lives in Alembic migrations under ``migrations/``; a
test checks that the migrations produce exactly these tables.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: A 64-bit key that is still SQLite's ROWID (only INTEGER PRIMARY KEY is).
Id = BigInteger().with_variant(Integer(), "sqlite")

#: PostgreSQL operator class of the indexes of columns matched with wild
#: cards (LIKE, PS3.4 C.2.2.2.4) as well as "=": only it serves a LIKE prefix
#: in a database whose collation is not "C" (migration 0004).
PATTERN_OPS = {
    column: {column: "varchar_pattern_ops"}
    for column in ("patient_name_norm", "patient_id", "accession_number")
}

UID = String(64)  # PS3.5 6.2: UI is at most 64 characters

#: The key of the default data partition (``Microsoft.Default``, the only
#: one while partitions are off; :mod:`appliance.partitions`).
DEFAULT_PARTITION_KEY = 1


def _partition_column() -> Column[Any]:
    """The data partition a row belongs to (migration 0013): every row of
    the default partition has key 1, which is also the column's default."""
    return Column(
        "partition_key",
        Id,
        nullable=False,
        server_default=str(DEFAULT_PARTITION_KEY),
    )


SHORT = String(64)  # CS, SH, LO, DA, TM, IS values (LO is the longest, 64)
TEXT = String(1024)  # PN (3 groups x 64 chars x up to 4 bytes) and LO multi-values

#: The data partitions (issue 11; the seed service's feature of the same
#: name, REFERENCE.md): a partition is created by the first write into it;
#: the same UIDs may exist in two partitions, as two independent records.
#: Key 1 is ``Microsoft.Default`` (written by migration 0013).
data_partition = Table(
    "data_partition",
    metadata,
    Column("key", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

patient = Table(
    "patient",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    _partition_column(),
    Column("patient_id", SHORT, nullable=False),
    Column("issuer_of_patient_id", SHORT, nullable=False),
    Column("patient_name", TEXT, nullable=False),
    Column("patient_name_norm", TEXT, nullable=False),
    Column("patient_birth_date", SHORT, nullable=False),
    Column("patient_sex", SHORT, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("patient_id", "issuer_of_patient_id", "partition_key"),
    Index(None, "patient_name_norm", postgresql_ops=PATTERN_OPS["patient_name_norm"]),
)

study = Table(
    "study",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("patient_fk", Id, ForeignKey("patient.id"), nullable=False, index=True),
    _partition_column(),
    # unique in its partition; the UID leads the index, so a look-up by UID
    # alone (change feed followers, retention) is served by it too
    Column("study_instance_uid", UID, nullable=False),
    Column("study_date", SHORT, nullable=False, index=True),
    Column("study_time", SHORT, nullable=False),
    Column("study_time_key", SHORT, nullable=False),
    Column("accession_number", SHORT, nullable=False),
    Column("study_id", SHORT, nullable=False),
    Column("study_description", TEXT, nullable=False),
    Column("referring_physician_name", TEXT, nullable=False),
    Column("referring_physician_name_norm", TEXT, nullable=False),
    Column("timezone_offset_from_utc", SHORT, nullable=False),
    # the patient as this study's header gave it
    Column("patient_id", SHORT, nullable=False),
    Column("issuer_of_patient_id", SHORT, nullable=False),
    Column("patient_name", TEXT, nullable=False),
    Column("patient_name_norm", TEXT, nullable=False),
    Column("patient_birth_date", SHORT, nullable=False),
    Column("patient_sex", SHORT, nullable=False),
    # maintained in the ingest transaction (faster than counting per query)
    Column("num_series", Integer, nullable=False),
    Column("num_instances", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("study_instance_uid", "partition_key"),
    # matched with LIKE as well as "=" (migration 0004)
    Index(None, "accession_number", postgresql_ops=PATTERN_OPS["accession_number"]),
    Index(None, "patient_id", postgresql_ops=PATTERN_OPS["patient_id"]),
    Index(None, "patient_name_norm", postgresql_ops=PATTERN_OPS["patient_name_norm"]),
)

series = Table(
    "series",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_fk", Id, ForeignKey("study.id"), nullable=False, index=True),
    _partition_column(),
    Column("series_instance_uid", UID, nullable=False),
    Column("modality", SHORT, nullable=False, index=True),
    Column("series_number", Integer, nullable=True),
    Column("series_description", TEXT, nullable=False),
    Column("body_part_examined", SHORT, nullable=False),
    Column("performed_procedure_step_start_date", SHORT, nullable=False),
    Column("performed_procedure_step_start_time", SHORT, nullable=False),
    Column("performed_procedure_step_start_time_key", SHORT, nullable=False),
    Column("num_instances", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("series_instance_uid", "partition_key"),
)

#: The items of a series' Request Attributes Sequence (0040,0275), as its
#: first instance gave them: PS3.18 Table 10.6.1-5 matches on two of their
#: attributes (sequence matching, PS3.4 C.2.2.2.6).
request_attribute = Table(
    "request_attribute",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("series_fk", Id, ForeignKey("series.id"), nullable=False, index=True),
    Column("scheduled_procedure_step_id", SHORT, nullable=False, index=True),
    Column("requested_procedure_id", SHORT, nullable=False, index=True),
)

instance = Table(
    "instance",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("series_fk", Id, ForeignKey("series.id"), nullable=False, index=True),
    Column("study_fk", Id, ForeignKey("study.id"), nullable=False, index=True),
    _partition_column(),
    Column("sop_instance_uid", UID, nullable=False),
    Column("sop_class_uid", UID, nullable=False, index=True),
    Column("instance_number", Integer, nullable=True),
    Column("rows", Integer, nullable=True),
    Column("columns", Integer, nullable=True),
    Column("bits_allocated", Integer, nullable=True),
    Column("number_of_frames", Integer, nullable=True),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("specific_character_set", SHORT, nullable=False),
    Column("blob_key", String(128), nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    # the time the instance was first stored: "received per hour" is a
    # range of it (migration 0011)
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # the Calling AE Title of the C-STORE that brought it, "" otherwise
    # (migration 0009)
    Column("source_ae", String(16), nullable=False, server_default=""),
    # the protocol it came by (Origin.protocol: dimse | dicomweb | import),
    # "" for instances stored before migration 0011
    Column("source_protocol", String(16), nullable=False, server_default=""),
    UniqueConstraint("sop_instance_uid", "partition_key"),
)

#: Each instance's WADO-RS metadata (DICOM JSON, PS3.18 Annex F) as UTF-8
#: text, its BulkDataURIs' instance URL left as a placeholder (it depends on
#: the service root of the request): filled on the first metadata request,
#: served without reading the blob afterwards (``metadata_cache.py``).  An
#: entry is valid only for the ``blob_key`` and format ``version`` it was
#: made from; deleting the instance row deletes it (ON DELETE CASCADE).
metadata_cache = Table(
    "metadata_cache",
    metadata,
    Column(
        "instance_fk",
        Id,
        ForeignKey("instance.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("blob_key", String(128), nullable=False, unique=True),
    Column("version", String(64), nullable=False),
    Column("json", LargeBinary, nullable=False),
)

#: One row per change, in commit order of the ingest/delete transactions.
#: Mirrors Microsoft's DICOM server change feed (REFERENCE.md): ``state`` is
#: current | replaced | deleted and is updated when a later change supersedes
#: the entry.
changefeed = Table(
    "changefeed",
    metadata,
    Column("sequence", Id, primary_key=True, autoincrement=True),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("action", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("study_instance_uid", UID, nullable=False),
    Column("series_instance_uid", UID, nullable=False),
    Column("sop_instance_uid", UID, nullable=False, index=True),
    _partition_column(),
    # SQLite: never reuse a sequence number, even after the newest row is gone
    sqlite_autoincrement=True,
)

#: Storage Commitment Push Model (PS3.4 J.3): one row per N-ACTION request,
#: its result computed when it was received (or, for a requester whose
#: commitment waits for forwarding, ``state`` waiting, settled once the
#: instances are delivered to ``await_destination``), and the delivery of its
#: N-EVENT-REPORT (an outbox: ``state`` pending | delivered | failed; a
#: pending row is claimed by setting ``claim_token`` and moving
#: ``next_attempt_at`` past the claim's lease).  ``result`` is JSON:
#: ``{"committed": [[class, instance], ...], "failed": [[class, instance,
#: reason], ...]}`` in request order.
commitment_report = Table(
    "commitment_report",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("transaction_uid", UID, nullable=False),
    # the SCU's Calling AE Title (16 characters, PS3.5 6.2 AE)
    Column("requester_ae", String(16), nullable=False),
    # sha256 of the requester and the referenced instances: tells a repeated
    # request (same digest) from a reuse of the Transaction UID
    Column("request_digest", String(64), nullable=False),
    Column("event_type", Integer, nullable=False),
    Column("result", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("claim_token", String(32), nullable=True),
    Column("last_error", String(1024), nullable=True),
    # "same" or "new" association, once delivered
    Column("delivered_via", String(16), nullable=True),
    # the [[forward]] destination whose delivery a "waiting" report awaits
    Column("await_destination", String(64), nullable=True),
    # the data partition of the requesting association (migration 0013)
    _partition_column(),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("transaction_uid", "request_digest"),
    Index(None, "state", "next_attempt_at"),
)

#: Background tasks that one node of several sharing the index runs at a
#: time (e.g. the orphan sweep): a task is claimed by writing its row with
#: the claimant and an expiry, which succeeds only if the row is missing or
#: expired (``SqlIndex.claim``).  The database is the only arbiter.
task_lease = Table(
    "task_lease",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

#: Forwarding outbox (``appliance/forward``): one row per instance stored
#: (``action`` store) or deleted (delete) that a ``[[forward]]`` destination
#: takes, written in the same transaction as the instance's own rows.
#: ``state`` is queued | delivered | parked (a permanent failure, kept with
#: the upstream's reason until re-queued) | superseded (the instance was
#: deleted here before it could be sent).  A queued row is claimed by setting
#: ``claim_token`` and moving ``next_attempt_at`` past the claim's lease, so
#: one sender of one node has it at a time; a sender that dies leaves it to be
#: claimed again when the lease runs out (at-least-once delivery).
forward_entry = Table(
    "forward_entry",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("destination", String(64), nullable=False),
    Column("action", String(8), nullable=False),
    Column("study_instance_uid", UID, nullable=False),
    Column("series_instance_uid", UID, nullable=False),
    Column("sop_instance_uid", UID, nullable=False),
    _partition_column(),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("claim_token", String(32), nullable=True),
    Column("last_error", String(1024), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "destination", "state", "next_attempt_at"),
)

#: Where a follower of the change feed has got to: the sequence of the last
#: change it has taken in (``name`` "fhir": DICOMcast).
feed_cursor = Table(
    "feed_cursor",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("sequence", Id, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: DICOMcast (``appliance/fhir``): one row per study the change feed has
#: named, to be published to the FHIR server.  ``state`` is queued | synced |
#: parked (a permanent failure, kept with the server's reason until
#: re-queued).  A change to a study queues it again (and takes it from a
#: sender that has it in flight, so the newest state is what ends up there).
#: Claimed like ``forward_entry``: ``claim_token`` set and ``next_attempt_at``
#: moved past a lease.  ``imaging_study`` is the FHIR ImagingStudy it last
#: wrote (e.g. ``ImagingStudy/123``).
fhir_study = Table(
    "fhir_study",
    metadata,
    Column("study_instance_uid", UID, primary_key=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("claim_token", String(32), nullable=True),
    Column("last_error", String(1024), nullable=True),
    Column("imaging_study", String(128), nullable=True),
    Column("queued_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "state", "next_attempt_at"),
)

#: API tokens for the DICOMweb API (``[auth]``, :mod:`appliance.access`).
#: A token is ``dap_<id>_<secret>``; only the SHA-256 of the secret is kept
#: (the secret is 256 random bits, so a fast hash is enough: see
#: docs/security.md).  ``roles`` is a comma-separated list of role names.
api_token = Table(
    "api_token",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("roles", String(64), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
)

#: The DIMSE associations this appliance accepted or rejected, one row
#: written when each ended (:mod:`appliance.activity`): who called from
#: where, how it ended (``outcome`` released | aborted | rejected, with a
#: ``detail`` naming no patient data) and what it did.  Only the newest
#: 1,000 rows are kept (older ones are pruned as rows are added).
association_log = Table(
    "association_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("started_at", DateTime(timezone=True), nullable=False, index=True),
    Column("ended_at", DateTime(timezone=True), nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("called_ae", String(16), nullable=False),
    # the peer's IP address (IPv6 at most 45 characters)
    Column("address", String(64), nullable=False),
    Column("tls", Boolean, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("detail", String(200), nullable=False),
    # C-STOREs answered with success or a warning, and with a failure
    Column("stored", Integer, nullable=False),
    Column("store_failed", Integer, nullable=False),
    Column("finds", Integer, nullable=False),
    # C-MOVE and C-GET requests
    Column("retrieves", Integer, nullable=False),
    Column("echoes", Integer, nullable=False),
)

#: Extended query tags (issue 11; Microsoft's DICOM server's feature of the
#: same name, REFERENCE.md): attributes the index does not hold by default,
#: added by an administrator and then matched by QIDO-RS and C-FIND like
#: the standard keys.  ``path`` is the tag as eight upper-case hex digits;
#: ``private_creator`` is "" for a standard attribute.  ``status`` is
#: Adding | Ready | Deleting, ``query_status`` Enabled | Disabled;
#: ``error_count`` counts the instances whose value failed validation
#: (:data:`eqt_error`).  ``operation_id`` is the re-index that adds it.
extended_query_tag = Table(
    "extended_query_tag",
    metadata,
    Column("key", Id, primary_key=True, autoincrement=True),
    Column("path", String(8), nullable=False, unique=True),
    Column("vr", String(2), nullable=False),
    Column("private_creator", SHORT, nullable=False),
    Column("level", String(8), nullable=False),
    Column("status", String(16), nullable=False),
    Column("query_status", String(16), nullable=False),
    Column("error_count", Integer, nullable=False),
    Column("operation_id", String(36), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The background operations of extended query tags (a re-index of the
#: instances stored before a tag was added): ``status`` NotStarted |
#: Running | Completed | Failed; ``cursor`` is the row id of the last
#: instance done (a restart resumes after it), ``end_id`` the highest row id
#: when it started; ``tag_paths`` the tags it adds, comma-separated.  One
#: node runs it at a time (``task_lease`` ``reindex:<id>``).
eqt_operation = Table(
    "eqt_operation",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("type", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("tag_paths", String(1024), nullable=False),
    Column("cursor", Id, nullable=False),
    Column("end_id", Id, nullable=False),
    Column("done", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "status"),
)


def _value_table(name: str, *value_columns: Column[Any]) -> Table:
    """One typed value table of extended query tags: a row per value of a
    tag in an instance, with the instance's series and study, so a query at
    any level finds its entities through the ``(tag_key, <match column>)``
    index.  Deleting the instance row deletes its values (ON DELETE CASCADE,
    SQLite's foreign keys are on: ``engine.py``)."""
    match = value_columns[-1].name
    return Table(
        name,
        metadata,
        Column("id", Id, primary_key=True, autoincrement=True),
        Column(
            "tag_key",
            Id,
            ForeignKey("extended_query_tag.key", ondelete="CASCADE"),
            nullable=False,
        ),
        # the values returned with a page of studies or series are found by these
        Column("study_fk", Id, nullable=False, index=True),
        Column("series_fk", Id, nullable=False, index=True),
        Column(
            "instance_fk",
            Id,
            ForeignKey("instance.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        *value_columns,
        # PostgreSQL: the pattern operator class serves a LIKE prefix (wild
        # card matching) as well as "=" in any collation (as migration 0004)
        Index(
            None,
            "tag_key",
            match,
            postgresql_ops={match: "varchar_pattern_ops"} if match == "value_norm" else {},
        ),
    )


#: AE AS CS LO SH UI PN values: ``value`` as stored, ``value_norm`` what is
#: matched (casefolded for PN, as ``*_norm`` of the standard keys; the value
#: itself otherwise).
eqt_string = _value_table(
    "eqt_string", Column("value", TEXT, nullable=False), Column("value_norm", TEXT, nullable=False)
)
#: IS SL SS UL US values.
eqt_long = _value_table("eqt_long", Column("value", BigInteger, nullable=False))
#: DS FD FL values.
eqt_double = _value_table("eqt_double", Column("value", Float, nullable=False))
#: DA DT TM values: ``value`` as stored, ``value_key`` a fixed-width text
#: that sorts in time order (DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``, DT
#: ``YYYYMMDDHHMMSS.FFFFFF``) for range matching (PS3.4 C.2.2.2.5).
eqt_datetime = _value_table(
    "eqt_datetime",
    Column("value", SHORT, nullable=False),
    Column("value_key", SHORT, nullable=False),
)

#: Values of an extended query tag that failed validation for its VR: kept
#: as an error of the instance, never a refusal of it (the instance is stored
#: and indexed without that value).
eqt_error = Table(
    "eqt_error",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("tag_key", Id, ForeignKey("extended_query_tag.key", ondelete="CASCADE"), nullable=False),
    Column("instance_fk", Id, ForeignKey("instance.id", ondelete="CASCADE"), nullable=False),
    Column("message", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tag_key", "instance_fk"),
    Index(None, "instance_fk"),
)
