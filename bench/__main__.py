"""``make bench``: the appliance next to Orthanc, and the core alone.

Usage::

    python -m bench [all|dicomweb|dimse|core] [--reps N] [--quick]
    python -m bench load [--duration S] | soak [--minutes M]   (see bench/load.py)
    python -m bench eqt [--studies N] [--queries N]   (see bench/eqt.py)
    python -m bench profile [--tree PATH] [--label L]   (see bench/profile.py)

``all`` (the default, what ``make bench`` runs) measures both protocol
families on the appliance and then on Orthanc (:mod:`bench.compare`);
``dicomweb`` (STOW-RS, QIDO-RS, WADO-RS) or ``dimse`` (C-STORE, C-FIND,
C-MOVE) measures one family on both servers (the index fill and the
verification always run); ``core`` measures the ingest pipeline and the
queries in this process, without a server or Orthanc (:mod:`bench.core`;
not part of ``all``, to keep ``make bench`` within 20 minutes).
``--reps`` sets the repetitions (at least 3 for figures worth quoting);
``--quick`` uses small counts, for a smoke run of every path.

The results go to ``bench/results/bench-<UTC timestamp>.json`` (the machine,
each server's version and settings, every repetition's value, the medians,
the ratios appliance/Orthanc and the issue's targets), and a table of them is
printed at the end.  A failed verification (an instance acknowledged but not
found, or not stored as sent) stops the run with an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import compare, core, forward, report
from bench.servers import (
    SCALED_LABELS,
    SCALED_STORES,
    appliance,
    orthanc,
    orthanc_available,
    scaled_appliance,
    scaled_out_available,
)


def main(argv: list[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else argv
    if args_given[:1] in (["load"], ["soak"]):
        from bench import load

        return load.main(args_given[0], args_given[1:])
    if args_given[:1] == ["eqt"]:
        from bench import eqt

        return eqt.main(args_given[1:])
    if args_given[:1] == ["profile"]:
        from bench import profile

        return profile.main(args_given[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "part",
        nargs="?",
        choices=("all", "dicomweb", "dimse", "core"),
        default="all",
        help="all (default): both protocol families on the appliance and on Orthanc; "
        "dicomweb: STOW/QIDO/WADO only; dimse: C-STORE/C-FIND/C-MOVE only; "
        "core: the ingest pipeline and queries in-process, no server",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument(
        "--scaled-out",
        nargs="?",
        const="s3",
        choices=SCALED_STORES,
        metavar="STORE",
        help="also run the appliance on PostgreSQL + an object store, its figures in a "
        "column of their own: s3 (default: SeaweedFS's S3 API) or azure (Azurite, whose "
        "in-memory store slows as it fills: see docs/performance.md)",
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    plan = compare.Plan.quick(args.reps) if args.quick else compare.Plan(reps=args.reps)
    started = datetime.datetime.now(datetime.UTC)
    begin = time.perf_counter()

    parts = {"dicomweb", "dimse"} if args.part == "all" else {args.part}
    servers: list[tuple[str, Callable[..., Any]]] = []
    if args.part != "core":
        servers.append(("appliance", appliance))
        if args.scaled_out:
            problem = scaled_out_available(args.scaled_out)
            if problem:
                parser.error(f"--scaled-out: {problem}")
            servers.append(
                ("appliance-scaled", functools.partial(scaled_appliance, store=args.scaled_out))
            )
        problem = orthanc_available()
        if problem:
            print(f"Orthanc left out, ratios will be missing: {problem}", file=sys.stderr)
        else:
            servers.append(("orthanc", orthanc))
    reports = {r.name: r for r in compare.run(plan, parts, servers)} if servers else {}
    if "dicomweb" in parts and "appliance" in reports and "orthanc" in reports:
        compare.log("forwarding: the appliance's senders to Orthanc")
        medians, values = forward.run(plan)
        reports["appliance"].figures.update(medians)
        reports["appliance"].repetitions.update(
            {key: [round(v, 2) for v in found] for key, found in values.items()}
        )
    core_figures: dict[str, float] = {}
    if args.part == "core":
        compare.log("core: in-process pipeline and queries")
        core_figures = core.run(plan)
    entries = report.comparison(reports)
    duration = time.perf_counter() - begin
    document = {
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "plan": dataclasses.asdict(plan),
        "machine": report.machine(reports["orthanc"].version if "orthanc" in reports else None),
        "servers": {name: dataclasses.asdict(r) for name, r in reports.items()},
        "comparison": entries,
        "core": core_figures,
    }
    path = report.write(document, started)
    if entries:
        print()
        print(report.table(entries, SCALED_LABELS.get(args.scaled_out or "", "")))
    if core_figures:
        print("\ncore, in-process (no server):")
        for key, value in core_figures.items():
            print(f"  {key}: {value}")
    print(f"\nresults: {path}")
    print(f"total duration: {duration / 60:.1f} min ({duration:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
