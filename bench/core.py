"""The core alone, in this process: no HTTP, no DIMSE, no other server.

What the pipeline and the index cost without the protocol edges, on a fresh
SQLite index and filesystem store each repetition:

- ingest (header parse, durable blob, one index transaction per instance)
  of small and CT instances, one after the other: instances/s and MB/s;
- query latency p50/p95 over an index of many one-instance studies.

These figures have no Orthanc counterpart; they show how much of the
servers' figures the core itself accounts for.
"""

from __future__ import annotations

import io
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from appliance.config import IngestConfig
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Level, Origin
from appliance.query import Query, QueryService
from appliance.storage.filesystem import FilesystemBlobStore
from bench.compare import DATE_RANGE, NAME_PREFIX, Plan, percentiles
from bench.corpus import InstanceSet, study_attributes

ORIGIN = Origin("import")


def fresh_service(root: Path) -> IngestService:
    engine = create_index_engine(f"sqlite:///{root / 'index.db'}")
    migrate.upgrade(engine)
    return IngestService(FilesystemBlobStore(root / "blobs"), SqlIndex(engine), IngestConfig())


def ingest(label: str, sets: list[InstanceSet]) -> dict[str, float]:
    rates = []
    size = 0.0
    for instances in sets:
        corpus = list(instances.render())
        size = sum(map(len, corpus)) / len(corpus) / 1e6
        with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
            service = fresh_service(Path(tmp))
            start = time.perf_counter()
            for data in corpus:
                service.store_part10(io.BytesIO(data), ORIGIN)
            rates.append(len(corpus) / (time.perf_counter() - start))
            service.index.engine.dispose()
    per_s = statistics.median(rates)
    return {f"{label}_per_s": round(per_s, 1), f"{label}_mb_per_s": round(per_s * size, 1)}


def query(plan: Plan) -> dict[str, float]:
    fill = InstanceSet("core-fill", 64, plan.fill_studies, 1, plan.seed)
    rng = random.Random(f"{plan.seed}/core-queries")
    studies = [rng.choice(fill.instances).study for _ in range(plan.queries)]
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        service = fresh_service(Path(tmp))
        for data in fill.render():
            service.store_part10(io.BytesIO(data), ORIGIN)
        search = QueryService(service.index.engine, max_results=plan.limit)
        cases: dict[str, Callable[[int], object]] = {
            "by_patient_id": lambda i: search.search(
                Query(
                    Level.STUDY,
                    {"PatientID": study_attributes(studies[i]).patient_id},
                    limit=plan.limit,
                )
            ),
            "by_name_prefix": lambda i: search.search(
                Query(Level.STUDY, {"PatientName": f"{NAME_PREFIX}*"}, limit=plan.limit)
            ),
            "by_date_range": lambda i: search.search(
                Query(Level.STUDY, {"StudyDate": "-".join(DATE_RANGE)}, limit=plan.limit)
            ),
            "series_of_study": lambda i: search.search(
                Query(Level.SERIES, {"StudyInstanceUID": studies[i]}, limit=plan.limit)
            ),
        }
        for name, run in cases.items():
            p50s, p95s = [], []
            for _ in range(plan.reps):
                times = []
                for i in range(plan.queries):
                    start = time.perf_counter()
                    run(i)
                    times.append((time.perf_counter() - start) * 1000)
                p50, p95 = percentiles(times)
                p50s.append(p50)
                p95s.append(p95)
            results[f"query_{name}_p50_ms"] = round(statistics.median(p50s), 2)
            results[f"query_{name}_p95_ms"] = round(statistics.median(p95s), 2)
        service.index.engine.dispose()
    return results


def run(plan: Plan) -> dict[str, float]:
    """The core's figures for *plan* (its repetitions, counts and seed)."""
    results: dict[str, float] = {}
    for label, size, count in (("ingest_small", 64, plan.small), ("ingest_ct", 512, plan.ct)):
        sets = [
            InstanceSet(f"core-{label}-{rep}", size, count, 100, plan.seed)
            for rep in range(plan.reps)
        ]
        results |= ingest(label, sets)
    return results | query(plan)
