"""The benchmark's results: the machine, the JSON file and the table."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.compare import ServerReport

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a figure, its unit, and the issue's target."""

    key: str
    label: str
    unit: str
    #: "ratio>=" / "ratio<=": on appliance/Orthanc; "appliance<": on the
    #: appliance's own figure; "" for none
    target: str = ""
    value: float = 0.0

    def describe_target(self) -> str:
        if self.target == "ratio>=":
            return f">= {self.value:g}x"
        if self.target == "ratio<=":
            return f"<= {self.value:g}x"
        if self.target == "appliance<":
            return f"< {self.value:g} {self.unit}"
        return ""

    def met(self, appliance: float | None, ratio: float | None) -> bool | None:
        if self.target == "appliance<":
            return None if appliance is None else appliance < self.value
        if ratio is None or not self.target:
            return None
        return ratio >= self.value if self.target == "ratio>=" else ratio <= self.value


def _rows() -> list[Row]:
    rows = []
    for kind, label in (("ct", "CT"), ("small", "small")):
        for assoc in (1, 4):
            rows.append(
                Row(
                    f"cstore_{kind}_{assoc}assoc_per_s",
                    f"C-STORE {label}, {assoc} assoc",
                    "inst/s",
                    *(("ratio>=", 1.5) if assoc == 4 else ()),
                )
            )
    for kind, label in (("ct", "CT"), ("small", "small")):
        for per in (1, 50):
            for clients in (1, 4):
                rows.append(
                    Row(
                        f"stow_{kind}_{per}per_request_{clients}clients_per_s",
                        f"STOW-RS {label}, {per}/req, {clients} client{'s' if clients > 1 else ''}",
                        "inst/s",
                        *(("ratio>=", 1.5) if clients == 4 else ()),
                    )
                )
    for name, label in (
        ("by_patient_id", "by PatientID"),
        ("by_name_prefix", "by PatientName SMI*"),
        ("by_date_range", "by StudyDate range"),
        ("series_of_study", "series of a study"),
        ("instances_of_series", "instances of a series"),
    ):
        rows.append(Row(f"qido_{name}_p50_ms", f"QIDO-RS {label} p50", "ms"))
        rows.append(Row(f"qido_{name}_p95_ms", f"QIDO-RS {label} p95", "ms", "ratio<=", 0.5))
    for name, label in (
        ("by_patient_id", "by PatientID"),
        ("by_name_prefix", "by PatientName SMI*"),
        ("by_date_range", "by StudyDate range"),
    ):
        rows.append(Row(f"cfind_{name}_p50_ms", f"C-FIND {label} p50", "ms"))
        rows.append(Row(f"cfind_{name}_p95_ms", f"C-FIND {label} p95", "ms", "ratio<=", 0.5))
    rows += [
        Row("findscu_by_patient_id_ms", "findscu by PatientID, end to end", "ms"),
        Row("wado_study_mb_per_s", "WADO-RS study retrieve", "MB/s", "ratio>=", 1.5),
        Row("wado_instance_ms", "WADO-RS instance retrieve", "ms"),
        # "at least 1.5x" as a speed is at most 1/1.5 of the time
        Row("wado_metadata_ms", "WADO-RS study metadata", "ms", "ratio<=", round(1 / 1.5, 2)),
        Row("wado_metadata_first_ms", "WADO-RS study metadata, first call", "ms"),
        Row("cmove_ct_per_s", "C-MOVE CT study to storescp", "inst/s"),
        Row("forward_ct_to_orthanc_per_s", "forwarding CT to Orthanc (STOW 20/req)", "inst/s"),
        Row(
            "forward_small_to_orthanc_per_s",
            "forwarding small to Orthanc (STOW 20/req)",
            "inst/s",
        ),
        Row("fill_small_stow_per_s", "index fill, small, STOW 50/req, 2 clients", "inst/s"),
        Row("peak_rss_ingest_mb", "peak RSS during ingest, all processes", "MB", "appliance<", 400),
        Row("peak_pss_ingest_mb", "peak PSS during ingest, all processes", "MB"),
        Row("peak_rss_whole_run_mb", "peak RSS over the whole run", "MB"),
    ]
    return rows


ROWS = _rows()


def machine(orthanc_version: str | None) -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    dcmtk = ""
    try:
        version = subprocess.run(
            ["/usr/bin/storescu", "--version"], capture_output=True, text=True, check=False
        )
        dcmtk = version.stdout.splitlines()[0].strip("$ ") if version.stdout else ""
    except OSError:
        dcmtk = "missing"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "orthanc": orthanc_version or "not run",
        "dcmtk": dcmtk,
    }


def comparison(reports: dict[str, ServerReport]) -> list[dict[str, Any]]:
    """One entry per table row: both figures, the ratio, the target and
    whether it is met (None where there is no target or no figure)."""
    appliance = reports.get("appliance")
    orthanc = reports.get("orthanc")
    scaled = reports.get("appliance-scaled")
    entries = []
    for row in ROWS:
        a = appliance.figures.get(row.key) if appliance else None
        o = orthanc.figures.get(row.key) if orthanc else None
        s = scaled.figures.get(row.key) if scaled else None
        if a is None and o is None and s is None:
            continue
        ratio = round(a / o, 2) if a is not None and o else None
        entries.append(
            {
                "metric": row.key,
                "label": row.label,
                "unit": row.unit,
                "appliance": a,
                "orthanc": o,
                "ratio": ratio,
                "target": row.describe_target(),
                "met": row.met(a, ratio),
                **({"scaled_out": s} if scaled else {}),
            }
        )
    return entries


def table(entries: list[dict[str, Any]], scaled_label: str = "scaled out") -> str:
    """The comparison as a text table; *scaled_label* heads the scaled-out
    column, if there is one."""

    def number(value: float | None) -> str:
        if value is None:
            return "-"
        return (
            f"{value:,.0f}"
            if abs(value) >= 100
            else f"{value:.3g}"
            if value < 1
            else f"{value:.1f}"
        )

    scaled = any("scaled_out" in e for e in entries)
    header: tuple[str, ...] = ("metric", "appliance", "orthanc", "ratio")
    if scaled:
        header += (scaled_label or "scaled out",)
    header += ("target",)
    lines = [header]
    for e in entries:
        target = e["target"]
        if e["met"] is not None:
            target += " met" if e["met"] else " NOT MET"
        line: tuple[str, ...] = (
            f"{e['label']} ({e['unit']})",
            number(e["appliance"]),
            number(e["orthanc"]),
            "-" if e["ratio"] is None else f"{e['ratio']:.2f}x",
        )
        if scaled:
            line += (number(e.get("scaled_out")),)
        lines.append((*line, target))
    numbers = len(header) - 2
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:-1], widths[1:-1], strict=True)
        ]
        out.append(" | ".join(cells) + " | " + line[-1])
        if n == 0:
            out.append(
                "-+-".join("-" * w for w in widths[: numbers + 1]) + "-+-" + "-" * widths[-1]
            )
    return "\n".join(out)


def write(document: dict[str, Any], started: datetime.datetime, prefix: str = "bench") -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{prefix}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
