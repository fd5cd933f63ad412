"""``make bench``: the core's ingest and query speed on the embedded default.

Builds a deterministic corpus with pydicom, then measures, as medians of
several repetitions on a fresh SQLite index and filesystem store each time:

- ingest through the one pipeline (header parse, durable blob, one index
  transaction) for small (64x64, ~10 KB) and CT-like (512x512 16-bit,
  ~0.5 MB) instances: instances/s and MB/s;
- query latency (p50/p95) over an index of many studies: by PatientID, by
  PatientName prefix wildcard, by StudyDate range, series of a study;

and, in :mod:`bench.dicomweb` and :mod:`bench.dimse`, STOW-RS/WADO-RS over
HTTP and C-STORE/C-FIND/C-MOVE over DIMSE next to Orthanc with its DICOMweb
plugin, started side by side in the same run.  ``python -m bench core``,
``dicomweb`` or ``dimse`` runs one part; ``make bench`` runs them all.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import generate_uid

from appliance.config import IngestConfig
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.index.sql import SqlIndex
from appliance.ingest import IngestService
from appliance.model import Level, Origin
from appliance.query import Query, QueryService
from appliance.storage.filesystem import FilesystemBlobStore
from bench import dicomweb, dimse
from bench.corpus import make_instance

ORIGIN = Origin("import")


def fresh_service(root: Path) -> IngestService:
    engine = create_index_engine(f"sqlite:///{root / 'index.db'}")
    migrate.upgrade(engine)
    return IngestService(FilesystemBlobStore(root / "blobs"), SqlIndex(engine), IngestConfig())


def bench_ingest(label: str, corpus: list[bytes], reps: int) -> dict[str, float]:
    rates = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            service = fresh_service(Path(tmp))
            start = time.perf_counter()
            for data in corpus:
                service.store_part10(io.BytesIO(data), ORIGIN)
            rates.append(len(corpus) / (time.perf_counter() - start))
            service.index.engine.dispose()
    per_s = statistics.median(rates)
    mb = sum(map(len, corpus)) / len(corpus) / 1e6
    return {f"{label}_instances_per_s": round(per_s, 1), f"{label}_mb_per_s": round(per_s * mb, 1)}


def latency(run: Callable[[], object], n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return round(times[len(times) // 2], 2), round(times[int(len(times) * 0.95) - 1], 2)


def bench_query(studies: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        service = fresh_service(Path(tmp))
        study_uids = []
        for _ in range(studies):
            study_uid = generate_uid(entropy_srcs=[str(rng.random())])
            study_uids.append(study_uid)
            data = make_instance(
                8, study_uid, generate_uid(entropy_srcs=[str(rng.random())]), rng.random()
            )
            service.store_part10(io.BytesIO(data), ORIGIN)
        query = QueryService(service.index.engine, max_results=200)
        cases: dict[str, Callable[[], object]] = {
            "by_patient_id": lambda: query.search(
                Query(Level.STUDY, {"PatientID": f"PID{rng.randrange(10**6):06d}"})
            ),
            "by_name_prefix": lambda: query.search(
                Query(Level.STUDY, {"PatientName": "SMI*"}, limit=100)
            ),
            "by_date_range": lambda: query.search(
                Query(Level.STUDY, {"StudyDate": "20150101-20151231"}, limit=100)
            ),
            "series_of_study": lambda: query.search(
                Query(Level.SERIES, {"StudyInstanceUID": rng.choice(study_uids)})
            ),
        }
        results: dict[str, float] = {}
        for name, run in cases.items():
            p50, p95 = latency(run, 200)
            results[f"query_{name}_p50_ms"] = p50
            results[f"query_{name}_p95_ms"] = p95
        service.index.engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--small", type=int, default=500, help="64x64 instances per run")
    parser.add_argument("--ct", type=int, default=100, help="512x512 instances per run")
    parser.add_argument("--studies", type=int, default=10_000, help="studies in the query index")
    parser.add_argument(
        "part",
        nargs="?",
        choices=("all", "core", "dicomweb", "dimse"),
        default="all",
        help="core: the pipeline in-process; dicomweb: STOW/WADO, dimse: C-STORE/C-FIND/"
        "C-MOVE, each next to Orthanc",
    )
    args = parser.parse_args()
    if args.part in ("all", "dicomweb"):
        print(json.dumps({"dicomweb": dicomweb.run(args.reps)}, indent=2))
    if args.part in ("all", "dimse"):
        print(json.dumps({"dimse": dimse.run(args.reps)}, indent=2))
    if args.part not in ("all", "core"):
        return
    rng = random.Random(20261123)
    study, series = generate_uid(), generate_uid()
    results: dict[str, float] = {}
    small = [make_instance(64, study, series, rng.random()) for _ in range(args.small)]
    results |= bench_ingest("ingest_small", small, args.reps)
    ct = [make_instance(512, study, series, rng.random()) for _ in range(args.ct)]
    results |= bench_ingest("ingest_ct", ct, args.reps)
    results |= bench_query(args.studies, seed=7)
    print(json.dumps({"core": results}, indent=2))


if __name__ == "__main__":
    main()
