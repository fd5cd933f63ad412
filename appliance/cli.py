"""The ``dicom-appliance`` command.

``serve``
    check the configuration, the index schema and the storage, then run the
    supervisor (:mod:`appliance.server`) in the foreground.
``migrate``
    bring the index database to the schema revision of this version.
``copy --to FILE``
    copy every stored instance into the appliance *FILE* configures (see
    :mod:`appliance.copy`).
``forward status | retry NAME | replay NAME --since TIME``
    the forwarding outbox (:mod:`appliance.forward`): counts and last error
    per destination, parked entries queued again, stored instances queued
    again.
``fhir status | retry | replay [--since TIME]``
    DICOMcast (:mod:`appliance.fhir`): where it is in the change feed and
    what it has queued, synced and parked; parked studies queued again; the
    change feed read again (from a time, or from its start).
``retention run [--dry-run]``
    one run of the retention policy (:mod:`appliance.retention`).
``verify [--deep] [--repair [--drop-missing]] [--grace SECONDS]``
    check the index against the blob store: every row's blob is there (and
    as large as the row says; with ``--deep`` its header names the row's
    instance), every blob has its row (see :mod:`appliance.integrity`);
    ``--repair`` removes the blobs without a row older than the grace
    period, ``--drop-missing`` too the rows whose blob is missing.
``sweep [--grace SECONDS]``
    remove the blobs without an index row older than the grace period, as
    ``serve`` does at start (:mod:`appliance.ingest.sweep`).
``reindex [--force]``
    rebuild a lost index from the blobs' headers (blobs untouched).
``import PATH... [--workers N] [--journal FILE]``
    load files, folders and DICOMDIRs through the ingest pipeline, in
    parallel, resumably (see :mod:`appliance.bulk_import`).
``stats [--by modality|day]``
    counts and sizes of what the index holds (:mod:`appliance.stats`).
``backup FILE`` / ``restore FILE [--force]``
    the index database, online (:mod:`appliance.backup`).
``token create --role ROLE [--name N] [--expires-days D]`` / ``token list`` / ``token revoke ID``
    the API tokens of the DICOMweb API (:mod:`appliance.access`): a new
    token printed once (only its hash is kept), the tokens without their
    secrets, a token revoked.
``audit [--since TIME | --days N] [--until TIME] [--study UID] [--who NAME]
[--action ACTION] [--outcome success|failure] [--json]``
    the audit trail (:mod:`appliance.audit`): who stored, queried,
    retrieved, deleted or exported which studies, when, with what outcome.
``viewer install [--version X] [--folder F] [--from-tarball PATH]``
    the OHIF web viewer served at ``/viewer`` (:mod:`appliance.viewer`):
    its published build fetched with ``npm pack`` (or taken from a tarball),
    set up for this appliance, and put in ``viewer.folder``.
``config show``
    print the effective configuration (file plus ``APPLIANCE_*``
    variables), secrets masked.

Exit codes: 0 success, 1 failure while running (``verify``: problems
remain), 2 a configuration that cannot start (a bad key or value, an
un-migrated index).  The admin commands (``verify``, ``sweep``,
``reindex``, ``import``, ``stats``, ``backup``, ``restore``, ``viewer
install``) show progress
on stderr when it is a terminal (not with ``--quiet``), log to stderr, and
print a summary on stdout (``--json``: as JSON).  Errors are one
line on stderr naming the cause, never a stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from appliance import __version__, dicom_tls, https
from appliance.access import ApiTokens, parse_roles
from appliance.config import Config, ForwardConfig, load_config, render_config
from appliance.errors import ApplianceError, ConfigError, SchemaNotCurrent
from appliance.fhir.queue import StudyQueue
from appliance.forward.outbox import Outbox
from appliance.index import migrate
from appliance.index.engine import engine_for
from appliance.logs import set_process_name, setup_logging
from appliance.partitions import Partitions, valid_name
from appliance.storage import open_blob_store

if TYPE_CHECKING:
    from appliance.services import Services

PROG = "dicom-appliance"
LOGGER = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the TOML configuration file (default: config/appliance.toml if present, "
        "else built-in defaults); APPLIANCE_<SECTION>_<KEY> variables override it",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dicom-appliance``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Edge DICOM appliance: DIMSE and DICOMweb over one store."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="run DICOMweb and the DIMSE listener in the foreground"
    )
    _add_config_option(serve)
    serve.set_defaults(func=cmd_serve)

    upgrade = commands.add_parser("migrate", help="upgrade the index database schema")
    _add_config_option(upgrade)
    upgrade.set_defaults(func=cmd_migrate)

    copy = commands.add_parser(
        "copy",
        help="copy every stored instance into another appliance's index and storage "
        "(e.g. from SQLite + disk to PostgreSQL + an object store); run it again to "
        "finish an interrupted copy",
    )
    _add_config_option(copy)
    copy.add_argument(
        "--to",
        metavar="FILE",
        required=True,
        help="the target's TOML configuration (read from the file only, without "
        "APPLIANCE_ variables); its index must be migrated",
    )
    copy.set_defaults(func=cmd_copy)

    forward = commands.add_parser(
        "forward", help="the forwarding outbox: status, re-queue parked entries, replay"
    )
    forward_commands = forward.add_subparsers(
        dest="forward_command", metavar="ACTION", required=True
    )
    status = forward_commands.add_parser(
        "status",
        help="per destination: queued, in flight, delivered, parked, oldest queued age, last error",
    )
    _add_config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_forward_status)
    retry = forward_commands.add_parser(
        "retry", help="queue a destination's parked entries again (after fixing their cause)"
    )
    _add_config_option(retry)
    retry.add_argument("destination", help="the [[forward]] entry's name")
    retry.set_defaults(func=cmd_forward_retry)
    replay = forward_commands.add_parser(
        "replay",
        help="queue again, for one destination, every instance stored since a time "
        "(its modality and SOP class filters apply)",
    )
    _add_config_option(replay)
    replay.add_argument("destination", help="the [[forward]] entry's name")
    replay.add_argument(
        "--since",
        required=True,
        type=_timestamp,
        metavar="TIME",
        help="ISO 8601 date or time (UTC unless it names an offset), e.g. 2026-12-01 "
        "or 2026-12-01T08:00:00+01:00",
    )
    replay.set_defaults(func=cmd_forward_replay)

    fhir = commands.add_parser(
        "fhir", help="DICOMcast to FHIR: status, re-queue parked studies, replay the change feed"
    )
    fhir_commands = fhir.add_subparsers(dest="fhir_command", metavar="ACTION", required=True)
    fhir_status = fhir_commands.add_parser(
        "status",
        help="change-feed position, studies queued, in flight, synced, parked, last error",
    )
    _add_config_option(fhir_status)
    fhir_status.add_argument("--json", action="store_true", help="print JSON instead of text")
    fhir_status.set_defaults(func=cmd_fhir_status)
    fhir_retry = fhir_commands.add_parser(
        "retry", help="queue the parked studies again (after fixing their cause)"
    )
    _add_config_option(fhir_retry)
    fhir_retry.set_defaults(func=cmd_fhir_retry)
    fhir_replay = fhir_commands.add_parser(
        "replay",
        help="read the change feed again from a time (default: its start), publishing "
        "every study it names again; harmless to the FHIR server's resources",
    )
    _add_config_option(fhir_replay)
    fhir_replay.add_argument(
        "--since",
        type=_timestamp,
        metavar="TIME",
        help="ISO 8601 date or time (UTC unless it names an offset); default: the whole feed",
    )
    fhir_replay.set_defaults(func=cmd_fhir_replay)

    retention = commands.add_parser(
        "retention", help="delete what [retention] says, now (serve runs it on its own)"
    )
    retention_commands = retention.add_subparsers(
        dest="retention_command", metavar="ACTION", required=True
    )
    retention_run = retention_commands.add_parser(
        "run", help="one retention run: by age, then to the free-space target"
    )
    _add_config_option(retention_run)
    retention_run.add_argument(
        "--dry-run", action="store_true", help="only list what would be deleted"
    )
    retention_run.add_argument("--json", action="store_true", help="print JSON")
    retention_run.set_defaults(func=cmd_retention_run)
    verify = commands.add_parser(
        "verify",
        help="check that every index row's blob is in the store and every blob has its row; "
        "--repair fixes what is safe",
    )
    _add_config_option(verify)
    verify.add_argument(
        "--deep",
        action="store_true",
        help="also read each blob's header (not its pixel data): it must be the row's instance",
    )
    verify.add_argument(
        "--repair",
        action="store_true",
        help="remove the blobs without a row written more than --grace seconds ago "
        "(as the orphan sweep does)",
    )
    verify.add_argument(
        "--drop-missing",
        action="store_true",
        help="with --repair: also delete the index rows whose blob is missing (through the "
        "index's delete: change feed and forwarded deletions as for a DELETE)",
    )
    _add_grace_option(verify)
    _add_summary_options(verify, examples=True)
    verify.set_defaults(func=cmd_verify)

    sweep = commands.add_parser(
        "sweep",
        help="remove the blobs without an index row written more than --grace seconds ago "
        "(serve does it at start); one node sweeps at a time",
    )
    _add_config_option(sweep)
    _add_grace_option(sweep)
    _add_summary_options(sweep, examples=False)
    sweep.set_defaults(func=cmd_sweep)

    reindex = commands.add_parser(
        "reindex",
        help="rebuild a lost index from the headers of the blobs in the store (blobs are "
        "neither rewritten nor deleted); the index must be migrated and empty",
    )
    _add_config_option(reindex)
    reindex.add_argument(
        "--force",
        action="store_true",
        help="run on an index that is not empty: add the instances it is missing",
    )
    _add_summary_options(reindex, examples=True)
    reindex.set_defaults(func=cmd_reindex)
    _add_admin_commands(commands)
    _add_audit_command(commands)

    _add_token_commands(commands)
    _add_viewer_command(commands)

    config = commands.add_parser("config", help="inspect the configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser(
        "show", help="print the effective configuration, secrets masked"
    )
    _add_config_option(show)
    show.set_defaults(func=cmd_config_show)
    return parser


def _add_viewer_command(commands: Any) -> None:
    from appliance.viewer import DEFAULT_VERSION, PACKAGE

    viewer = commands.add_parser("viewer", help="the OHIF web viewer served at /viewer")
    viewer_commands = viewer.add_subparsers(dest="viewer_command", metavar="ACTION", required=True)
    install = viewer_commands.add_parser(
        "install",
        help=f"fetch the published OHIF build ({PACKAGE}, with npm pack) into viewer.folder, "
        "set up for this appliance; replaces an earlier install",
    )
    _add_config_option(install)
    install.add_argument(
        "--version",
        metavar="X",
        help=f"the {PACKAGE} version (default: {DEFAULT_VERSION}, the one tested)",
    )
    install.add_argument(
        "--folder",
        metavar="F",
        help="install here instead of viewer.folder (default ./data/viewer)",
    )
    install.add_argument(
        "--from-tarball",
        metavar="PATH",
        help=f"use this tarball of 'npm pack {PACKAGE}@VERSION' instead of fetching one "
        "(offline sites)",
    )
    _add_summary_options(install)
    install.set_defaults(func=cmd_viewer_install)


def _add_token_commands(commands: Any) -> None:
    token = commands.add_parser(
        "token", help="API tokens for the DICOMweb API ([auth] mode token or oidc)"
    )
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_commands.add_parser(
        "create", help="create a token and print it (once: only its hash is kept)"
    )
    _add_config_option(create)
    create.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help="read, write, delete or admin (repeat it, or separate with commas, for several)",
    )
    create.add_argument("--name", default="", help="a label, e.g. the viewer or script using it")
    create.add_argument(
        "--expires-days", type=_positive_days, metavar="DAYS", help="expire after DAYS days"
    )
    create.add_argument("--json", action="store_true", help="print JSON instead of text")
    create.set_defaults(func=cmd_token_create)
    listing = token_commands.add_parser("list", help="list the tokens (never their secrets)")
    _add_config_option(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=cmd_token_list)
    revoke = token_commands.add_parser(
        "revoke", help="revoke a token (refused everywhere within auth.token_cache_seconds)"
    )
    _add_config_option(revoke)
    revoke.add_argument("id", help="the token's id (token list shows it)")
    revoke.set_defaults(func=cmd_token_revoke)


def _positive_days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 36500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days (1 or more)")
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return value


def _add_grace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=3600,
        metavar="SECONDS",
        help="a blob without a row younger than this may be an ingest in flight and is "
        "left alone (default: 3600)",
    )


def _add_summary_options(parser: argparse.ArgumentParser, *, examples: bool = False) -> None:
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (it is off anyway when stderr is not a terminal)",
    )
    if examples:
        parser.add_argument(
            "--examples",
            type=_count,
            default=10,
            metavar="N",
            help="examples (UIDs, blob keys) kept per kind of finding (default: 10)",
        )


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of threads (1 or more)")
    return value


def _add_admin_commands(commands: Any) -> None:
    """``import``, ``stats``, ``backup``, ``restore``."""
    bulk = commands.add_parser(
        "import",
        help="load DICOM files, folders (recursively) and DICOMDIRs through the ingest "
        "pipeline; run it again to finish an interrupted import",
    )
    _add_config_option(bulk)
    bulk.add_argument("paths", nargs="+", metavar="PATH", help="a file, a folder or a DICOMDIR")
    bulk.add_argument(
        "--workers",
        type=_workers,
        default=os.cpu_count() or 2,
        metavar="N",
        help="files stored at once (default: the number of cores)",
    )
    bulk.add_argument(
        "--journal",
        metavar="FILE",
        help="the record of the files done, read to skip them when run again "
        "(default: .dicom-appliance-import.journal in the working folder)",
    )
    bulk.add_argument(
        "--partition",
        metavar="NAME",
        help="with partitions.enabled: the data partition to store into, created if "
        "missing (default: Microsoft.Default)",
    )
    _add_summary_options(bulk)
    bulk.set_defaults(func=cmd_import)

    stats = commands.add_parser(
        "stats", help="studies, series, instances and bytes stored: in total, per modality, per day"
    )
    _add_config_option(stats)
    stats.add_argument(
        "--by",
        choices=("modality", "ae", "day"),
        help="only this breakdown (default: all)",
    )
    _add_summary_options(stats)
    stats.set_defaults(func=cmd_stats)

    backup = commands.add_parser(
        "backup",
        help="copy the index database into FILE while the appliance runs (SQLite: the "
        "online backup API; PostgreSQL: pg_dump); the blobs are backed up apart",
    )
    _add_config_option(backup)
    backup.add_argument("file", metavar="FILE")
    backup.add_argument("--force", action="store_true", help="replace FILE if it exists")
    _add_summary_options(backup)
    backup.set_defaults(func=cmd_backup)

    restore = commands.add_parser(
        "restore",
        help="replace the index database by a backup (stop the appliance first); "
        "refused over an index that holds data unless --force",
    )
    _add_config_option(restore)
    restore.add_argument("file", metavar="FILE")
    restore.add_argument(
        "--force", action="store_true", help="replace an index that holds instances or changes"
    )
    _add_summary_options(restore)
    restore.set_defaults(func=cmd_restore)


def _add_audit_command(commands: Any) -> None:
    from appliance.audit import Action

    audit = commands.add_parser(
        "audit",
        help="show the audit trail: who stored, queried, retrieved, deleted or exported "
        "which studies, when, and how it went",
    )
    _add_config_option(audit)
    window = audit.add_mutually_exclusive_group()
    window.add_argument(
        "--since", type=_timestamp, metavar="TIME", help="events from TIME on (ISO 8601; UTC)"
    )
    window.add_argument(
        "--days", type=_count, metavar="N", help="events of the last N days (24 h each)"
    )
    audit.add_argument(
        "--until", type=_timestamp, metavar="TIME", help="events before TIME (ISO 8601; UTC)"
    )
    audit.add_argument("--study", metavar="UID", help="events that touched this study")
    audit.add_argument(
        "--who", metavar="NAME", help="events of this user or Calling AE Title (exact)"
    )
    audit.add_argument(
        "--action",
        action="append",
        choices=[action.value for action in Action],
        help="events of this action (repeat for several)",
    )
    audit.add_argument("--outcome", choices=("success", "failure"), help="how it went")
    audit.add_argument(
        "--json", action="store_true", help="print the events as JSON lines, as stored"
    )
    audit.set_defaults(func=cmd_audit)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dicom-appliance`` with *argv* (default: the process arguments).

    Returns
    -------
    int
        The exit code.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (printed)
        return exc.code if isinstance(exc.code, int) else 2
    command: Command = args.func
    try:
        return command(args)
    except (ConfigError, SchemaNotCurrent) as exc:
        return _fail(exc.reason, 2)
    except ApplianceError as exc:
        return _fail(exc.reason, 1)
    except SQLAlchemyError as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        return _fail(f"the index database failed: {exc.__class__.__name__}: {first_line}", 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - users get one line, not a traceback
        return _fail(f"unexpected error: {exc.__class__.__name__}: {exc}", 1)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _timestamp(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@contextlib.contextmanager
def _outbox(config: Config) -> Iterator[Outbox]:
    """The forwarding outbox of *config*'s index (migrated), closed after."""
    engine = engine_for(config.index)
    try:
        migrate.require_current(engine)
        yield Outbox(engine)
    finally:
        engine.dispose()


def _destination(config: Config, name: str) -> ForwardConfig:
    for destination in config.forward:
        if destination.name == name:
            return destination
    known = ", ".join(d.name for d in config.forward) or "none is configured"
    raise ConfigError("forward", f"no [[forward]] destination is named {name!r} ({known})")


def cmd_forward_status(args: argparse.Namespace) -> int:
    """``forward status``: each destination's outbox."""
    config = load_config(args.config)
    with _outbox(config) as outbox:
        found = outbox.status([d.name for d in config.forward])
    if args.json:
        print(json.dumps({"destinations": [s.as_json() for s in found]}, indent=2))
        return 0
    if not found:
        print("no [[forward]] destination is configured")
        return 0
    header = ("destination", "queued", "in flight", "delivered", "parked", "oldest queued")
    rows = [
        (
            s.name,
            str(s.queued),
            str(s.in_flight),
            str(s.delivered),
            str(s.parked),
            "-" if s.oldest_queued_age is None else f"{s.oldest_queued_age:.0f} s",
        )
        for s in found
    ]
    _print_table(header, rows)
    for s in found:
        if s.last_error:
            print(f"{s.name}: last error: {s.last_error}")
    return 0


def cmd_forward_retry(args: argparse.Namespace) -> int:
    """``forward retry NAME``: parked entries queued again."""
    config = load_config(args.config)
    destination = _destination(config, args.destination)
    with _outbox(config) as outbox:
        count = outbox.requeue_parked(destination.name)
    print(f"{count} parked entr{'y' if count == 1 else 'ies'} queued again for {destination.name}")
    return 0


def cmd_forward_replay(args: argparse.Namespace) -> int:
    """``forward replay NAME --since TIME``: stored instances queued again."""
    config = load_config(args.config)
    destination = _destination(config, args.destination)
    with _outbox(config) as outbox:
        count = outbox.replay(destination, args.since)
    print(
        f"{count} instance(s) stored since {args.since.isoformat()} queued for {destination.name}"
    )
    return 0


@contextlib.contextmanager
def _study_queue(config: Config) -> Iterator[StudyQueue]:
    """DICOMcast's queue in *config*'s index (migrated), closed after."""
    engine = engine_for(config.index)
    try:
        migrate.require_current(engine)
        yield StudyQueue(engine)
    finally:
        engine.dispose()


def cmd_fhir_status(args: argparse.Namespace) -> int:
    """``fhir status``: DICOMcast's position and queue."""
    config = load_config(args.config)
    with _study_queue(config) as queue:
        status = queue.status(config.fhir.url)
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
        return 0
    if not config.fhir.url:
        print("DICOMcast is off (fhir.url is empty)")
    else:
        print(f"FHIR server: {status.url}")
    print(f"change feed: at {status.cursor} of {status.latest} ({status.behind} behind)")
    age = "-" if status.oldest_queued_age is None else f"{status.oldest_queued_age:.0f} s"
    print(
        f"studies: {status.queued} queued ({status.in_flight} in flight, oldest {age}), "
        f"{status.synced} synced, {status.parked} parked"
    )
    if status.last_error:
        print(f"last error: {status.last_error}")
    return 0


def cmd_fhir_retry(args: argparse.Namespace) -> int:
    """``fhir retry``: parked studies queued again."""
    config = load_config(args.config)
    with _study_queue(config) as queue:
        count = queue.requeue_parked()
    print(f"{count} parked stud{'y' if count == 1 else 'ies'} queued again")
    return 0


def cmd_fhir_replay(args: argparse.Namespace) -> int:
    """``fhir replay [--since TIME]``: the change feed read again."""
    config = load_config(args.config)
    with _study_queue(config) as queue:
        count = queue.replay(args.since)
    since = "its start" if args.since is None else args.since.isoformat()
    print(f"the change feed is read again from {since}: {count} change(s)")
    return 0


def cmd_retention_run(args: argparse.Namespace) -> int:
    """``retention run``: one run of the retention policy."""
    from appliance.retention import Retention
    from appliance.services import build_services

    config = load_config(args.config)
    setup_logging(config.log)
    services = build_services(config)
    try:
        retention = Retention(
            config.retention, services.engine, services.index, services.storage, services.audit
        )
        if not retention.enabled:
            print("retention is off ([retention] max_age_days and free_target_mb are 0)")
            return 0
        report = retention.run(dry_run=args.dry_run)
    finally:
        services.close()
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(
            f"{verb} {report.studies} stud{'y' if report.studies == 1 else 'ies'}, "
            f"{report.instances} instance(s), {report.bytes // 2**20} MB; "
            f"{report.kept_busy} in use kept"
        )
        if report.short_of_target:
            print(report.short_of_target)
    return 1 if report.short_of_target else 0


@contextlib.contextmanager
def _api_tokens(config: Config) -> Iterator[ApiTokens]:
    """The API tokens in *config*'s index (migrated), closed after."""
    engine = engine_for(config.index)
    try:
        migrate.require_current(engine)
        yield ApiTokens(engine)
    finally:
        engine.dispose()


def cmd_token_create(args: argparse.Namespace) -> int:
    """``token create``: a new API token, printed once."""
    config = load_config(args.config)
    try:
        roles = parse_roles(args.role)
    except ValueError as exc:
        return _fail(f"--role: {exc}", 2)
    if len(args.name) > 128:
        return _fail("--name: at most 128 characters", 2)
    expires = None if args.expires_days is None else dt.timedelta(days=args.expires_days)
    with _api_tokens(config) as tokens:
        token, info = tokens.create(roles, args.name, expires)
    LOGGER.info("API token %s created with roles %s", info.id, ",".join(info.roles))
    if args.json:
        print(json.dumps({"token": token, **info.as_json()}, indent=2))
        return 0
    print(token)
    expiry = "never expires" if info.expires_at is None else f"expires {info.expires_at:%Y-%m-%d}"
    print(
        f"id {info.id}, roles {','.join(info.roles)}, {expiry}; "
        "shown only now: only its hash is kept",
        file=sys.stderr,
    )
    if config.auth.mode == "anonymous":
        print(
            'note: auth.mode is "anonymous": no token is asked for until it is "token" or "oidc"',
            file=sys.stderr,
        )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    """``token list``: every token, without its secret."""
    config = load_config(args.config)
    with _api_tokens(config) as tokens:
        found = tokens.list()
    if args.json:
        print(json.dumps({"tokens": [info.as_json() for info in found]}, indent=2))
        return 0
    if not found:
        print("no API token")
        return 0

    def day(value: dt.datetime | None) -> str:
        return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"

    header = ("id", "name", "roles", "state", "created", "expires", "last used")
    rows = [
        (
            info.id,
            info.name or "-",
            ",".join(info.roles),
            info.state(),
            day(info.created_at),
            day(info.expires_at),
            day(info.last_used_at),
        )
        for info in found
    ]
    _print_table(header, rows)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """``token revoke ID``: the token refused from now on (within the
    processes' cache time)."""
    config = load_config(args.config)
    with _api_tokens(config) as tokens:
        revoked = tokens.revoke(args.id)
    if not revoked:
        return _fail(f"no active API token has the id {args.id!r}", 1)
    LOGGER.info("API token %s revoked", args.id)
    print(
        f"API token {args.id} revoked; running servers refuse it within "
        f"{config.auth.token_cache_seconds} s"
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """``audit [filters]``: the matching events, oldest first."""
    from appliance.audit import EventFilter, ReadReport, read_events

    config = load_config(args.config, index_url=False)
    since = args.since
    if args.days is not None:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(days=args.days)
    selected = EventFilter(
        since=since,
        until=args.until,
        study=args.study,
        who=args.who,
        actions=frozenset(args.action or ()),
        success=None if args.outcome is None else args.outcome == "success",
    )
    report = ReadReport()
    events = read_events(config.audit.path, selected, report)
    if args.json:
        for event in events:
            print(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
    else:
        rows = [_audit_row(event) for event in events]
        header = ("time", "action", "outcome", "who", "address", "via", "studies", "n", "status")
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        print(f"{len(rows)} event(s)")
    if report.unreadable:
        print(f"{PROG}: {report.unreadable} line(s) could not be read", file=sys.stderr)
    return 0


#: EventOutcomeIndicator (PS3.15 A.5.1) as the table shows it.
_OUTCOMES = {0: "success", 4: "minor-failure", 8: "serious-failure", 12: "major-failure"}


def _audit_row(event: dict[str, Any]) -> tuple[str, ...]:
    studies = [str(uid) for uid in event.get("studies") or ()]
    shown = studies[0] if studies else "-"
    if len(studies) > 1:
        shown += f" +{len(studies) - 1}"
    destination = event.get("destination")
    via = str(event.get("transaction") or event.get("protocol") or "")
    if destination:
        via += f" -> {destination}"
    status = event.get("status")
    return (
        str(event.get("time", "")),
        str(event.get("action", "")),
        _OUTCOMES.get(event.get("outcome", -1), str(event.get("outcome"))),
        str(event.get("who", "")),
        str(event.get("address", "")),
        via,
        shown,
        str(event.get("instances", 0)),
        "-" if status is None else str(status),
    )


def cmd_viewer_install(args: argparse.Namespace) -> int:
    """``viewer install``: the OHIF build fetched (or taken from
    ``--from-tarball``) and installed (see :mod:`appliance.viewer`)."""
    import tempfile

    from appliance import viewer

    config = load_config(args.config, index_url=False)
    level = config.log.level if config.log.level in ("debug", "error") else "warning"
    setup_logging(dataclasses.replace(config.log, level=level), stream="ext://sys.stderr")
    folder = args.folder or config.viewer.folder
    if not folder:
        return _fail("viewer.folder is empty (the viewer is off): set it, or give --folder", 2)
    version = viewer.check_version(args.version) if args.version else None
    with (
        _bar(args.quiet, desc="viewer", total=2, unit=" step", leave=False) as bar,
        tempfile.TemporaryDirectory(prefix="dicom-appliance-viewer-") as scratch,
    ):
        if args.from_tarball:
            tarball = Path(args.from_tarball)
        else:
            tarball = viewer.fetch_tarball(version or viewer.DEFAULT_VERSION, Path(scratch))
        bar.update(1)
        report = viewer.install(tarball, Path(folder).resolve(), version=version)
        bar.update(1)
    _print_report(args, report)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """``config show``: the effective configuration, secrets masked."""
    config = load_config(args.config)
    sys.stdout.write(render_config(config))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """``migrate``: upgrade the index to the newest revision."""
    config = load_config(args.config)
    engine = engine_for(config.index)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        print(f"index already at revision {after}")
    else:
        print(f"index migrated from {_revision(before)} to revision {after}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    """``copy``: every instance of this appliance into the one ``--to``
    configures (see :mod:`appliance.copy`); 0 if all were copied or were
    there already, 1 if some failed (named in the log; run it again)."""
    from appliance.copy import copy_instances
    from appliance.services import build_services

    source_config = load_config(args.config)
    target_config = load_config(args.to, environ={})
    setup_logging(source_config.log)
    if source_config.index.url == target_config.index.url:
        raise ConfigError("--to", "the target's index is this appliance's own")
    source = build_services(source_config)
    try:
        target = build_services(target_config)
        try:
            open_blob_store(target_config.storage).check()

            def progress(report: Any) -> None:
                rate = report.seen / report.seconds if report.seconds else 0.0
                print(
                    f"copied {report.copied}, already there {report.already_there}, "
                    f"failed {len(report.failed)} ({rate:.0f} instances/s)",
                    file=sys.stderr,
                    flush=True,
                )

            report = copy_instances(source, target, progress)
        finally:
            target.close()
    finally:
        source.close()
    print(
        f"{report.copied} instance(s) copied, {report.already_there} already there, "
        f"{len(report.failed)} failed, in {report.seconds:.1f} s"
    )
    return 1 if report.failed else 0


ProgressUpdate = Callable[[int, int | None], None]


@contextlib.contextmanager
def _progress(args: argparse.Namespace, description: str, unit: str) -> Iterator[ProgressUpdate]:
    """A progress bar (:func:`_bar`); yields ``update(done, total)``."""
    with _bar(bool(args.quiet), desc=description, unit=unit) as bar:

        def update(done: int, total: int | None) -> None:
            # blobs without a row come on top of the rows counted first
            _advance(bar, done, None if total is None else max(total, done))

        yield update


def _admin_services(config: Config) -> Services:
    """The services of an admin command: logs on stderr (its summary is on
    stdout), at WARNING unless ``log.level`` asks for debug or less."""
    from appliance.services import build_services

    level = config.log.level if config.log.level in ("debug", "error") else "warning"
    setup_logging(dataclasses.replace(config.log, level=level), stream="ext://sys.stderr")
    return build_services(config)


def _print_report(args: argparse.Namespace, report: Any) -> None:
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(report.summary()))


def cmd_verify(args: argparse.Namespace) -> int:
    """``verify``: the index against the store; 0 if clean (or fully
    repaired), 1 if problems remain."""
    from appliance.integrity import verify

    if args.drop_missing and not args.repair:
        return _fail("--drop-missing needs --repair", 2)
    config = load_config(args.config)
    services = _admin_services(config)
    try:
        with _progress(args, "verify", "key") as progress:
            report = verify(
                services,
                deep=args.deep,
                repair=args.repair,
                drop_missing=args.drop_missing,
                grace=dt.timedelta(seconds=args.grace),
                examples=args.examples,
                progress=progress,
            )
    finally:
        services.close()
    _print_report(args, report)
    return 0 if report.clean else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    """``sweep``: the orphan sweep, now, under its claim; 0 if done, 1 if a
    blob could not be removed or the sweep refused or was claimed."""
    from appliance.ingest.sweep import claimed_sweep, sweep_holder, sweep_orphans

    config = load_config(args.config)
    services = _admin_services(config)
    try:
        with claimed_sweep(services.index) as lease:
            if lease is None:
                return _fail(
                    f"{sweep_holder(services.index)} is sweeping already; nothing was done", 1
                )
            with _progress(args, "sweep", "blob") as progress:
                report = sweep_orphans(
                    services.storage,
                    services.index,
                    dt.timedelta(seconds=args.grace),
                    lease=lease,
                    progress=lambda done: progress(done, None),
                )
    finally:
        services.close()
    _print_report(args, report)
    return 0 if report.ok else 1


def cmd_reindex(args: argparse.Namespace) -> int:
    """``reindex``: the index rebuilt from the store; 0 if every blob was
    indexed (or was there already), 1 if some could not be."""
    from appliance.integrity import reindex

    config = load_config(args.config)
    services = _admin_services(config)
    try:
        with _progress(args, "reindex", "blob") as progress:
            report = reindex(services, force=args.force, examples=args.examples, progress=progress)
    finally:
        services.close()
    _print_report(args, report)
    return 0 if report.ok else 1


@contextlib.contextmanager
def _bar(quiet: bool, **options: Any) -> Iterator[Any]:
    """A tqdm bar on stderr, disabled with *quiet* or when stderr is not a
    terminal; log lines are written above it while it shows."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    disable = quiet or not sys.stderr.isatty()
    with tqdm(file=sys.stderr, disable=disable, dynamic_ncols=True, **options) as bar:
        if disable:
            yield bar
        else:
            with logging_redirect_tqdm():
                yield bar


@contextlib.contextmanager
def _first_interrupt_stops() -> Iterator[threading.Event]:
    """An event the first Ctrl-C (SIGINT) sets, so that a long job stops
    cleanly; a second one interrupts at once (KeyboardInterrupt)."""
    stop = threading.Event()

    def interrupt(_signum: int, _frame: Any) -> None:
        stop.set()
        print(
            f"{PROG}: stopping after the files in progress (Ctrl-C again to stop at once)",
            file=sys.stderr,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread: Ctrl-C is not ours to take
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _advance(bar: Any, done: int, total: int | None) -> None:
    if total is not None and bar.total != total:
        bar.total = total
    if done > bar.n:
        bar.update(done - bar.n)


def _size(count: int) -> str:
    """*count* bytes in decimal units (kB, MB, GB, TB)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


#: Failures listed by the text summary of ``import`` (``--json`` lists all).
SHOWN_FAILURES = 20


def cmd_import(args: argparse.Namespace) -> int:
    """``import PATH...``: files, folders and DICOMDIRs through the ingest
    (see :mod:`appliance.bulk_import`); 0 if nothing failed, 1 if some
    file failed or the run stopped, 130 if interrupted (Ctrl-C)."""
    from appliance.bulk_import import DEFAULT_JOURNAL, Journal, import_paths
    from appliance.services import build_services

    config = load_config(args.config)
    setup_logging(config.log, stream="ext://sys.stderr")
    # pydicom's warnings about odd encodings, one per file, would bury the
    # progress and the summary; what matters is in the ingest's own outcome
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    paths = [Path(path) for path in args.paths]
    for path in paths:
        if not path.exists():
            return _fail(f"{path}: no such file or folder", 2)
    journal_path = Path(args.journal or DEFAULT_JOURNAL)
    if args.partition is not None:
        if not config.partitions.enabled:
            return _fail("--partition needs partitions.enabled = true", 2)
        if not valid_name(args.partition):
            return _fail(
                f"{args.partition!r} is not a partition name (1 to 64 of A-Z a-z 0-9 . _ -)", 2
            )
    services = build_services(config)
    try:
        if args.partition is not None:
            services = services.in_partition(services.partitions.ensure(args.partition))
        services.storage.check()
        journal = Journal(journal_path, config.index.url, args.partition)
        try:
            with (
                _bar(args.quiet, desc="scanning", unit=" files") as bar,
                _first_interrupt_stops() as stop,
            ):
                scanning = [True]

                def scanned(count: int) -> None:
                    _advance(bar, count, None)

                def progress(report: Any) -> None:
                    if scanning[0]:  # the files are counted: the same bar goes on to import
                        scanning[0] = False
                        bar.reset(total=report.total)
                        bar.set_description("import", refresh=False)
                    _advance(bar, report.done, report.total)
                    bar.set_postfix_str(
                        f"{report.stored} stored, {report.duplicate} duplicate, "
                        f"{len(report.failed)} failed, {report.skipped} skipped",
                        refresh=False,
                    )

                report = import_paths(
                    services,
                    paths,
                    journal,
                    workers=args.workers,
                    progress=progress,
                    scanned=scanned,
                    stop=stop,
                )
        finally:
            journal.close()
    finally:
        services.close()
    if args.json:
        print(json.dumps({**report.as_json(), "journal": str(journal_path)}, indent=2))
    else:
        duplicates = ", ".join(f"{n} {label}" for label, n in report.duplicates.items() if n)
        print(
            f"{report.stored} stored, {report.duplicate} duplicate"
            + (f" ({duplicates})" if duplicates else "")
            + f", {len(report.failed)} failed, {report.skipped} skipped "
            f"({report.skipped_not_dicom} not DICOM, {report.skipped_done_before} done before)"
            + (f", {report.dicomdirs} DICOMDIR(s) read" if report.dicomdirs else "")
        )
        print(
            f"{_size(report.bytes)} in {report.seconds:.1f} s "
            f"({report.instances_per_second:.1f} instances/s)"
        )
        for failure in report.failed[:SHOWN_FAILURES]:
            print(f"failed: {failure.path}: {failure.reason}")
        if len(report.failed) > SHOWN_FAILURES:
            print(f"... and {len(report.failed) - SHOWN_FAILURES} more failures (--json lists all)")
        if report.stopped:
            print(f"stopped: {report.stopped}; run the same command again to go on")
    if report.stopped == "interrupted":
        return 130
    return 1 if report.failed or report.stopped else 0


def cmd_stats(args: argparse.Namespace) -> int:
    """``stats [--by modality|ae|day]``: counts and sizes of the index."""
    from appliance.stats import BREAKDOWNS, collect

    config = load_config(args.config)
    engine = engine_for(config.index)
    try:
        migrate.require_current(engine)
        with _bar(args.quiet, desc="stats", unit=" queries", leave=False) as bar:
            stats = collect(
                engine,
                [args.by] if args.by else BREAKDOWNS,
                lambda done, total: _advance(bar, done, total),
            )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(stats.as_json(), indent=2))
        return 0
    totals = stats.totals
    print(
        f"total: {totals.studies} studies, {totals.series} series, "
        f"{totals.instances} instances, {_size(totals.bytes)}"
    )
    header = ("studies", "series", "instances", "bytes", "size")
    for title, first, rows in (
        ("per modality", "modality", stats.by_modality),
        ("per sending AE (C-STORE's Calling AE Title; none: STOW-RS, import)", "ae", stats.by_ae),
        ("per day of storage (UTC)", "day", stats.by_day),
    ):
        if rows is None:
            continue
        print(f"\n{title}:")
        _print_table(
            (first, *header),
            [
                (
                    key or "(none)",
                    str(c.studies),
                    str(c.series),
                    str(c.instances),
                    str(c.bytes),
                    _size(c.bytes),
                )
                for key, c in rows.items()
            ],
        )
    return 0


def _backup_progress(bar: Any) -> Callable[[str, int, int | None], None]:
    def progress(unit: str, done: int, total: int | None) -> None:
        bar.unit = f" {unit}s" if unit != "B" else "B"
        bar.unit_scale = unit == "B"
        _advance(bar, done, total)

    return progress


def cmd_backup(args: argparse.Namespace) -> int:
    """``backup FILE``: the index database into FILE (see :mod:`appliance.backup`)."""
    from appliance.backup import backup

    config = load_config(args.config)
    setup_logging(config.log, stream="ext://sys.stderr")
    with _bar(args.quiet, desc="backup", leave=False) as bar:
        report = _tools_or_commands(
            lambda: backup(
                config.index.url, Path(args.file), force=args.force, progress=_backup_progress(bar)
            )
        )
    if report is None:
        return 1
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return 0
    counts = (
        f": {report.studies} studies, {report.instances} instances"
        if report.instances is not None
        else ""
    )
    print(
        f"index backed up into {report.file} ({report.kind}, schema revision "
        f"{report.revision or 'none'}{counts}), {_size(report.bytes)} in {report.seconds:.1f} s"
    )
    print("back up the blobs now (see the README, Backups): they are not in this file")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """``restore FILE [--force]``: the index database from a backup."""
    from appliance.backup import restore

    config = load_config(args.config)
    setup_logging(config.log, stream="ext://sys.stderr")
    with _bar(args.quiet, desc="restore", leave=False) as bar:
        report = _tools_or_commands(
            lambda: restore(
                config.index.url, Path(args.file), force=args.force, progress=_backup_progress(bar)
            )
        )
    if report is None:
        return 1
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return 0
    print(
        f"index restored from {report.file} ({report.kind}, schema revision {report.revision}: "
        f"{report.studies} studies, {report.instances} instances) in {report.seconds:.1f} s"
        + (", replacing what it held" if report.replaced else "")
    )
    if report.needs_migrate:
        print(
            f"the backup's schema revision {report.revision} is older than this version's "
            f"{migrate.SCHEMA_REVISION}: run 'dicom-appliance migrate' before 'serve'"
        )
    print("the blobs are not in the backup: put them back (see the README, Backups) before 'serve'")
    return 0


def _tools_or_commands(run: Callable[[], Any]) -> Any:
    """*run*'s result; if the PostgreSQL tools are missing, the commands to
    run elsewhere on stdout, the reason on stderr, and None."""
    from appliance.backup import ToolsMissing

    try:
        return run()
    except ToolsMissing as exc:
        for command in exc.commands:
            print(command)
        _fail(exc.reason.rstrip(":") + " (printed above)", 1)
        return None


def _revision(revision: str | None) -> str:
    return "an empty database" if revision is None else f"revision {revision}"


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: check, then run the supervisor until SIGTERM/SIGINT."""
    # SIGHUP (reload) during the checks: ignored, not fatal (the default);
    # the files are read after them anyway.  The supervisor handles it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = load_config(args.config)
    set_process_name("supervisor")
    setup_logging(config.log)
    prepare(config)
    # The supervisor only starts and watches the children: it runs in a new
    # image of this process (same pid, environment and working folder) that
    # never imports the index, pydicom or the web stack, so that it holds a
    # few tens of MB rather than what the checks above loaded.
    command = [sys.executable, "-m", "appliance.server", "supervise"]
    if config.source is not None:
        command += ["--config", str(config.source)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)  # noqa: S606 - our own interpreter, fixed arguments


def prepare(config: Config) -> None:
    """What ``serve`` does before starting any child: the index schema is
    current (or migrated, with ``index.auto_migrate``), the storage is
    reachable and writable (its folder created).

    Raises
    ------
    SchemaNotCurrent
        if the index is not at this version's revision and
        ``index.auto_migrate`` is false.
    ConfigError
        if partitions are off but the index holds partitions other than
        the default one.
    StorageError, ConfigError
        if the storage cannot be opened or written, or an HTTPS file is
        missing, unreadable or does not fit (:func:`appliance.https.check_files`),
        or a DICOM TLS file does not load (:func:`appliance.dicom_tls.check_files`).
    """
    for warning in https.check_files(config.http):
        LOGGER.warning("%s", warning)
    dicom_tls.check_files(config.dimse)
    engine = engine_for(config.index)
    try:
        if config.index.auto_migrate:
            before = migrate.current_revision(engine)
            migrate.upgrade(engine)
            after = migrate.current_revision(engine)
            if before != after:
                LOGGER.info("index migrated from %s to revision %s", _revision(before), after)
        else:
            migrate.require_current(engine)
        if not config.partitions.enabled and Partitions(engine).others_exist():
            # as the seed service: turning partitions off would hide those
            # partitions' data (and mix their UIDs into the default one's)
            raise ConfigError(
                "partitions.enabled",
                "data partitions other than Microsoft.Default exist in the index: "
                "partitions cannot be turned off (set partitions.enabled = true)",
            )
    finally:
        engine.dispose()
    open_blob_store(config.storage).check()


if __name__ == "__main__":
    sys.exit(main())
