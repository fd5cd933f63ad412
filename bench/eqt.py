"""``python -m bench eqt``: a query on an extended query tag next to the same
query on a standard key (issue 11).

On a fresh SQLite index and filesystem store: *studies* one-instance studies
(default 10,000) are stored through the ingest pipeline in this process (no
HTTP), each with a private LO attribute (0009,1001) of the creator
``BENCH EQT`` and an Accession Number carrying the same value (one value per
10 studies); the private attribute is then added as a Study-level extended
query tag and the re-index operation run to its end (its throughput is
reported).  The DICOMweb app is served on loopback and QIDO-RS
``/v1/studies?00091001=V`` and ``/v1/studies?AccessionNumber=V`` are timed
over HTTP, *queries* of each, for p50 and p95.

The results are printed and written to ``bench/results/eqt-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.config import load_config
from appliance.index import migrate
from appliance.index.engine import create_index_engine
from appliance.model import Origin
from appliance.reindex import Reindexer
from appliance.services import build_services

CREATOR = "BENCH EQT"
TAG = "00091001"
ORIGIN = Origin("import")
RESULTS = Path(__file__).parent / "results"


def _part10(number: int) -> bytes:
    value = f"V{number % 1000:05d}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = f"2.25.{number + 1}1"
    ds.StudyInstanceUID = f"2.25.{number + 1}2"
    ds.SeriesInstanceUID = f"2.25.{number + 1}3"
    ds.PatientID = f"P{number:06d}"
    ds.PatientName = f"Bench^{number}"
    ds.StudyDate = "20240101"
    ds.AccessionNumber = value
    ds.Modality = "OT"
    ds.private_block(0x0009, CREATOR, create=True).add_new(0x01, "LO", value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run(studies: int, queries: int) -> dict[str, Any]:
    """Fill, add the tag, re-index, and time both queries."""
    from werkzeug.serving import make_server

    from dicomweb.app import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    results: dict[str, Any] = {"studies": studies, "queries": queries}
    with tempfile.TemporaryDirectory(prefix="bench-eqt-") as tmp:
        root = Path(tmp)
        config = load_config(
            environ={
                "APPLIANCE_STORAGE_PATH": str(root / "blobs"),
                "APPLIANCE_INDEX_URL": f"sqlite:///{root / 'index.db'}",
            },
            cwd=root,
        )
        engine = create_index_engine(config.index.url)
        migrate.upgrade(engine)
        engine.dispose()
        services = build_services(config)
        try:
            start = time.perf_counter()
            for number in range(studies):
                services.ingest.store_part10(io.BytesIO(_part10(number)), ORIGIN)
            results["fill_s"] = round(time.perf_counter() - start, 1)

            services.extended.add(
                [{"path": TAG, "vr": "LO", "privateCreator": CREATOR, "level": "Study"}]
            )
            reindexer = Reindexer(
                services.engine,
                services.index,
                services.storage,
                services.extended,
                batch=500,
                settle_seconds=0,
            )
            start = time.perf_counter()
            assert reindexer.run_pending() == 1, "the re-index did not complete"
            elapsed = time.perf_counter() - start
            results["reindex_s"] = round(elapsed, 1)
            results["reindex_per_s"] = round(studies / elapsed, 1)

            app = create_app(config, services)
            server = make_server("127.0.0.1", 0, app, threaded=True)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            base = f"http://127.0.0.1:{server.server_port}/v1/studies"
            rng = random.Random(11)
            values = [f"V{rng.randrange(min(studies, 1000)):05d}" for _ in range(queries)]
            try:
                with httpx.Client(timeout=30) as client:
                    cases = (("extended", TAG), ("standard", "AccessionNumber"))
                    timings: dict[str, list[float]] = {label: [] for label, _ in cases}
                    for _label, key in cases:
                        client.get(base, params={key: values[0]})  # warm up
                    # the two queries interleaved, so that whatever else
                    # runs on the machine weighs on both alike
                    for value in values:
                        for label, key in cases:
                            began = time.perf_counter()
                            response = client.get(base, params={key: value})
                            timings[label].append((time.perf_counter() - began) * 1000)
                            assert response.status_code == 200, response.text
                            assert len(response.json()) == max(1, studies // 1000), value
                    for label, found in timings.items():
                        results[f"{label}_p50_ms"] = round(statistics.median(found), 2)
                        results[f"{label}_p95_ms"] = round(_percentile(found, 0.95), 2)
            finally:
                server.shutdown()
                thread.join(timeout=10)
        finally:
            services.close()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench eqt", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args(argv)
    results = run(args.studies, args.queries)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"eqt-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, value in results.items():
        print(f"{name:>20}: {value}")
    return 0
