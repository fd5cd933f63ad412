"""Load, soak and crash driver (issue 9, "Crashes and load").

``python -m bench load [--duration S]`` starts ``dicom-appliance serve`` in a
temporary folder (loopback ports, SQLite or ``--index-url``) and runs, all at
once and for a fixed time: dcmtk ``storescu`` associations, pynetdicom C-STORE
associations, STOW-RS clients (httpx) and QIDO-RS / WADO-RS readers.  Then it
checks every instance whose store was acknowledged (C-STORE status 0x0000,
STOW-RS success in the response): found by QIDO-RS (per study) and C-FIND
(per series), and retrieved by WADO-RS byte for byte as it was sent (the
Part 10 file for STOW-RS, the data set for C-STORE: each receiver writes its
own File Meta); and runs ``dicom-appliance verify --deep``.  Figures:
instances/s stored, requests/s read, p50/p99 latency per kind, errors.

``python -m bench soak [--minutes M]`` runs the same load for longer while
sampling every serve process's resident memory (``VmRSS``) and open file
descriptors every ``--interval`` seconds, and says whether both stayed flat
(:func:`flatness`).

The results go to ``bench/results/load-<UTC>.json`` (``soak-<UTC>.json``) and
a table is printed.  The exit code is 1 when an acknowledged instance is
missing or altered, a request failed, ``verify`` found a problem, or (soak)
memory or descriptors grew.  No figure is compared with a target: on a
shared 2-core machine the speed says little, the correctness everything.

The pieces (:class:`Site`, :class:`Ledger`, :func:`run_load`,
:func:`check_all`) are also what the crash-consistency test drives
(tests/integration/test_crash_consistency.py), killing the server between
rounds of the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

from appliance.encoding import read_layout
from bench import report
from bench.corpus import dataset_part, template, uid
from bench.dicomweb import (
    FAILED_SOP_SEQUENCE,
    JSON,
    REFERENCED_SOP_SEQUENCE,
    STOW_TYPE,
    multipart,
    split_multipart,
)
from bench.dimse import DCMTK_ENV, FindClient, tool
from bench.servers import Server, free_port, process_tree, wait_for_echo

AE_TITLE = "DICOM_EDGE"
CALLING_AE = "LOADSCU"
#: pydicom's bundled files sent with new UIDs (by STOW-RS and pynetdicom);
#: storescu gets only generated ones (it leaves out a file's trailing
#: padding, e.g. CT_small's, so its data set would not be the file's)
TEST_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "MR_small_implicit.dcm")
#: compressed: by STOW-RS only (no C-STORE context is proposed for it)
STOW_ONLY_FILES = ("JPEG2000.dcm",)
#: rows = columns of the generated CT instances (8 KB to 512 KB of pixels),
#: the small ones more often
SIZES = (16, 64, 64, 128, 256, 512)
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: (0008,0018) SOP Instance UID, (0008,1155) Referenced SOP Instance UID
SOP_INSTANCE_UID = "00080018"
REFERENCED_SOP_INSTANCE_UID = "00081155"
#: C-STORE Success (PS3.4 B.2.3)
SUCCESS = 0x0000


# --------------------------------------------------------------------------
# the appliance as a process of its own


@dataclasses.dataclass
class Site:
    """A working folder, ports and environment of one appliance; it can be
    started, killed and started again on the same data."""

    workdir: Path
    http_port: int
    dimse_port: int
    env: dict[str, str]

    @classmethod
    def create(cls, workdir: Path, index_url: str = "", **extra: str) -> Site:
        workdir.mkdir(parents=True, exist_ok=True)
        http_port, dimse_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env |= {
            "APPLIANCE_HTTP_PORT": str(http_port),
            "APPLIANCE_HTTP_WORKERS": "2",
            "APPLIANCE_DIMSE_PORT": str(dimse_port),
            "APPLIANCE_DIMSE_WORKERS": "2",
            "APPLIANCE_DIMSE_AE_TITLE": AE_TITLE,
            "APPLIANCE_STORAGE_PATH": str(workdir / "blobs"),
            "APPLIANCE_INDEX_URL": index_url or f"sqlite:///{workdir / 'index.db'}",
            "APPLIANCE_INDEX_AUTO_MIGRATE": "true",
            "APPLIANCE_LOG_LEVEL": "warning",
            **extra,
        }
        return cls(workdir, http_port, dimse_port, env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def server(self, pid: int = 0) -> Server:
        """The :class:`bench.servers.Server` the bench's clients take."""
        return Server("appliance", f"{self.base_url}/v1", self.dimse_port, AE_TITLE, pid, "", {})

    def command(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run an admin command (``verify``...) on this site to completion."""
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> Running:
        """Start ``serve`` leading a process group of its own (so that it can
        be killed with all it started, and never the caller)."""
        log_path = self.workdir / f"serve-{time.time_ns()}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "serve"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        return Running(self, process, log_path)


@dataclasses.dataclass
class Running:
    """A started ``serve``."""

    site: Site
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        """Until ``/health/ready`` answers 200 and a C-ECHO succeeds."""
        deadline = time.monotonic() + timeout
        url = f"{self.site.base_url}/health/ready"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve not ready within {timeout} s:\n{self.log[-3000:]}")
            time.sleep(0.2)
        wait_for_echo(AE_TITLE, self.site.dimse_port, timeout=max(5.0, deadline - time.monotonic()))

    def pids(self) -> list[int]:
        """The supervisor and every process under it."""
        return process_tree(self.process.pid) if self.process.poll() is None else []

    def kill_hard(self) -> int:
        """SIGKILL every process of the appliance (its supervisor's group
        first, then each child's group and any straggler): none gets to
        finish what it was doing.  The number of processes killed."""
        pids = self.pids()
        own = os.getpgrp()
        groups = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                group = os.getpgid(pid)
                if group != own and group not in groups:
                    groups.append(group)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(30)
        return len(pids)

    def stop(self) -> None:
        """SIGTERM (the clean stop), SIGKILL after 30 s."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill_hard()


@contextlib.contextmanager
def serving(site: Site) -> Iterator[Running]:
    running = site.start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


# --------------------------------------------------------------------------
# instances and what was acknowledged


@dataclasses.dataclass(frozen=True)
class Item:
    """One instance to send: its UIDs and its Part 10 bytes."""

    study: str
    series: str
    sop: str
    part10: bytes


@dataclasses.dataclass(frozen=True)
class Record:
    """What was sent of one instance, enough to check it later without
    keeping its bytes: the SHA-256 of what a retrieve must give back (the
    Part 10 file for STOW-RS, the data set for C-STORE)."""

    sop: str
    study: str
    series: str
    via: str
    whole_file: bool
    digest: bytes
    size: int


def digest_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@functools.cache
def _test_dataset(name: str) -> Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise RuntimeError(f"pydicom's test file {name} is missing")
    return dcmread(path)


class Maker:
    """New instances with unique UIDs following from *seed* and a counter."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self._count = 0
        self._lock = threading.Lock()

    def _next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def study(self, count: int, rng: random.Random) -> list[Item]:
        """*count* generated CT instances of one new study and series, each
        of a size drawn from :data:`SIZES`."""
        n = self._next()
        study = uid(f"{self.seed}/{n}/study")
        series = uid(f"{self.seed}/{n}/series")
        items = []
        for i in range(count):
            sop = uid(f"{self.seed}/{n}/instance/{i}")
            size = rng.choice(SIZES)
            items.append(Item(study, series, sop, template(size).render(study, series, sop, i + 1)))
        return items

    def test_file(self, rng: random.Random, *, stow: bool = False) -> Item:
        """One of pydicom's bundled files with new Study, Series and SOP
        Instance UIDs (*stow*: compressed ones too)."""
        names = TEST_FILES + STOW_ONLY_FILES if stow else TEST_FILES
        ds = copy.deepcopy(_test_dataset(rng.choice(names)))
        n = self._next()
        ds.StudyInstanceUID = uid(f"{self.seed}/{n}/file-study")
        ds.SeriesInstanceUID = uid(f"{self.seed}/{n}/file-series")
        ds.SOPInstanceUID = uid(f"{self.seed}/{n}/file-instance")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return Item(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, out.getvalue())


class Ledger:
    """What each client sent and had acknowledged, the latencies per kind
    of request, and the errors.  Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: dict[str, Record] = {}
        self.acked: dict[str, Record] = {}
        self._acked_list: list[str] = []
        self._by_study: dict[str, list[str]] = {}
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.error_examples: list[str] = []
        #: readers' findings during the run: an acknowledged instance not
        #: found or not as sent (always a failure)
        self.problems: list[str] = []

    def will_send(self, record: Record) -> None:
        with self._lock:
            self.sent[record.sop] = record

    def never_sent(self, sops: Iterable[str]) -> None:
        """Forget instances that did not leave the client (the connection
        was refused)."""
        with self._lock:
            for sop in sops:
                self.sent.pop(sop, None)

    def acknowledged(self, sop: str) -> None:
        with self._lock:
            record = self.sent[sop]
            if sop not in self.acked:
                self.acked[sop] = record
                self._acked_list.append(sop)
                self._by_study.setdefault(record.study, []).append(sop)

    def timed(self, kind: str, ms: float) -> None:
        with self._lock:
            self.latencies.setdefault(kind, []).append(ms)

    def error(self, kind: str, message: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if len(self.error_examples) < 20:
                self.error_examples.append(f"{kind}: {message[:300]}")

    def error_count(self) -> int:
        with self._lock:
            return sum(self.errors.values())

    def problem(self, message: str) -> None:
        with self._lock:
            self.problems.append(message)

    def random_acked(self, rng: random.Random) -> Record | None:
        with self._lock:
            if not self._acked_list:
                return None
            return self.acked[rng.choice(self._acked_list)]

    def study_snapshot(self, study: str) -> list[str]:
        with self._lock:
            return list(self._by_study.get(study, ()))


# --------------------------------------------------------------------------
# the clients: each op is one request (or association), its errors counted


def _record(
    item: Item, via: str, sent: bytes, *, whole_file: bool, implicit: Dataset | None = None
) -> Record:
    """The record of *item* sent as *sent*: its Part 10 file (*whole_file*,
    STOW-RS) or its data set (C-STORE).

    DICOMweb never sends Implicit VR Little Endian (PS3.18 8.7.3): the
    appliance re-encodes such an instance as Explicit VR Little Endian on
    retrieve.  For an instance sent so (*implicit*: its decoded data set),
    the bytes expected back are pydicom's Explicit VR encoding of it (the
    values sent, not their bytes)."""
    if implicit is not None:
        explicit = encode(implicit, False, True)
        if explicit is None:
            raise RuntimeError(f"pydicom cannot re-encode {item.sop}")
        sent, whole_file = explicit, False
    return Record(item.sop, item.study, item.series, via, whole_file, digest_of(sent), len(sent))


def stow_op(
    http: httpx.Client, site: Site, maker: Maker, ledger: Ledger, rng: random.Random
) -> int:
    """One STOW-RS request of 1-4 instances; instances acknowledged."""
    items = maker.study(rng.randint(1, 3), rng)
    if rng.random() < 0.3:
        items.append(maker.test_file(rng, stow=True))
    for item in items:
        syntax = read_layout(io.BytesIO(item.part10)).transfer_syntax
        implicit = dcmread(io.BytesIO(item.part10)) if syntax == ImplicitVRLittleEndian else None
        ledger.will_send(_record(item, "stow", item.part10, whole_file=True, implicit=implicit))
    start = time.perf_counter()
    try:
        response = http.post(
            f"{site.base_url}/v1/studies",
            content=multipart([item.part10 for item in items]),
            headers={"Content-Type": STOW_TYPE, "Accept": JSON},
        )
    except httpx.ConnectError as exc:
        ledger.error("stow", repr(exc))
        ledger.never_sent(item.sop for item in items)  # nothing reached the server
        return 0
    except httpx.HTTPError as exc:
        ledger.error("stow", repr(exc))
        return 0
    ledger.timed("stow", (time.perf_counter() - start) * 1000)
    if response.status_code not in (200, 202):
        ledger.error("stow", f"{response.status_code} {response.text[:200]}")
        return 0
    answer = response.json()
    acked = 0
    # PS3.18 10.5.3: each instance stored is referenced, each refused failed
    for entry in answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []):
        sop = entry[REFERENCED_SOP_INSTANCE_UID]["Value"][0]
        ledger.acknowledged(sop)
        acked += 1
    if response.status_code != 200 or answer.get(FAILED_SOP_SEQUENCE, {}).get("Value"):
        ledger.error("stow", f"{response.status_code}: some instances failed")
    return acked


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")


def storescu_op(site: Site, folder: Path, maker: Maker, ledger: Ledger, rng: random.Random) -> int:
    """One dcmtk ``storescu`` association sending 2-8 generated instances of
    one study; each instance whose response is Success is acknowledged
    (from ``storescu -v``'s log of its requests and responses)."""
    items = maker.study(rng.randint(2, 8), rng)
    paths: dict[str, str] = {}
    for number, item in enumerate(items):
        path = folder / f"{number:02d}.dcm"
        path.write_bytes(item.part10)
        paths[str(path)] = item.sop
        # generated: Explicit VR Little Endian
        ledger.will_send(_record(item, "storescu", dataset_part(item.part10), whole_file=False))
    command = [tool("storescu"), "-v", "-aet", CALLING_AE, "-aec", AE_TITLE, "127.0.0.1"]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, str(site.dimse_port), *paths],
            capture_output=True,
            text=True,
            timeout=300,
            env=DCMTK_ENV,
            check=False,
        )
    except subprocess.TimeoutExpired:
        ledger.error("storescu", "timed out")
        return 0
    ms = (time.perf_counter() - start) * 1000
    acked = 0
    current = None
    begun: set[str | None] = set()
    for line in (done.stdout + done.stderr).splitlines():
        if found := _SENDING.search(line):
            current = paths.get(found.group(1).strip())
            begun.add(current)
        elif (found := _RESPONSE.search(line)) and current is not None:
            if found.group(1) == "Success":
                ledger.acknowledged(current)
                acked += 1
            current = None
    ledger.never_sent(sop for sop in paths.values() if sop not in begun)
    if done.returncode != 0 or acked != len(items):
        ledger.error("storescu", f"exit {done.returncode}, {acked}/{len(items)} acknowledged")
    else:
        ledger.timed("storescu", ms)
    return acked


#: SOP classes the pynetdicom client proposes, each in both uncompressed
#: little-endian syntaxes (one presentation context per pair)
_STORE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan Storage
)


def pynetdicom_op(site: Site, maker: Maker, ledger: Ledger, rng: random.Random) -> int:
    """One pynetdicom association sending 1-6 instances (generated and
    bundled files), C-STORE by C-STORE; the data set bytes recorded are the
    ones pynetdicom encodes for the accepted transfer syntax."""
    items = maker.study(rng.randint(1, 4), rng)
    items += [maker.test_file(rng) for _ in range(rng.randint(0, 2))]
    ae = AE(ae_title=CALLING_AE)
    for sop_class in _STORE_CLASSES:
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    try:
        assoc = ae.associate("127.0.0.1", site.dimse_port, ae_title=AE_TITLE)
    except Exception as exc:  # noqa: BLE001 - a refused socket and the like
        ledger.error("c-store", repr(exc))
        return 0
    if not assoc.is_established:
        ledger.error("c-store", "association not established")
        return 0
    acked = 0
    try:
        for item in items:
            ds = dcmread(io.BytesIO(item.part10))
            # the SCP accepts one of the two syntaxes per class, or both;
            # pynetdicom sends in the accepted one (converting an
            # uncompressed data set), so ask for that one explicitly
            offered = {
                cx.transfer_syntax[0]
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == ds.SOPClassUID and cx.transfer_syntax
            }
            if not offered:
                ledger.error("c-store", f"no context accepted for {ds.SOPClassUID}")
                continue
            if ds.file_meta.TransferSyntaxUID not in offered:
                ds.file_meta.TransferSyntaxUID = sorted(offered)[0]
            syntax = ds.file_meta.TransferSyntaxUID
            sent = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
            if sent is None:
                raise RuntimeError(f"pynetdicom cannot encode {item.sop}")
            implicit = ds if syntax == ImplicitVRLittleEndian else None
            ledger.will_send(_record(item, "c-store", sent, whole_file=False, implicit=implicit))
            start = time.perf_counter()
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                ledger.error("c-store", "no response (association lost)")
                break
            if int(status.Status) != SUCCESS:
                ledger.error("c-store", f"status 0x{int(status.Status):04X}")
                continue
            ledger.timed("c-store", (time.perf_counter() - start) * 1000)
            ledger.acknowledged(item.sop)
            acked += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return acked


def qido_op(http: httpx.Client, site: Site, ledger: Ledger, rng: random.Random) -> None:
    """Search the instances of a study with acknowledged instances: every
    instance acknowledged before the request must be among the matches."""
    record = ledger.random_acked(rng)
    if record is None:
        time.sleep(0.05)
        return
    expected = ledger.study_snapshot(record.study)
    start = time.perf_counter()
    try:
        response = http.get(
            f"{site.base_url}/v1/studies/{record.study}/instances", headers={"Accept": JSON}
        )
    except httpx.HTTPError as exc:
        ledger.error("qido", repr(exc))
        return
    ledger.timed("qido", (time.perf_counter() - start) * 1000)
    if response.status_code != 200:
        ledger.error("qido", f"{response.status_code} {response.text[:200]}")
        return
    found = {match[SOP_INSTANCE_UID]["Value"][0] for match in response.json()}
    missing = set(expected) - found
    if missing:
        ledger.problem(f"QIDO-RS during the load: {len(missing)} acknowledged not found")


def retrieve(http: httpx.Client, site: Site, record: Record) -> bytes | None:
    """The stored bytes of *record*'s instance (WADO-RS, as stored), or
    None for 404; raises on any other answer."""
    url = f"{site.base_url}/v1/studies/{record.study}/series/{record.series}/instances/{record.sop}"
    response = http.get(url, headers={"Accept": RETRIEVE_ACCEPT})
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise RuntimeError(f"WADO-RS answered {response.status_code}: {response.text[:200]}")
    parts = split_multipart(response.content, response.headers["content-type"])
    if len(parts) != 1:
        raise RuntimeError(f"WADO-RS gave {len(parts)} parts for one instance")
    return parts[0]


def as_sent(record: Record, stored: bytes) -> bool:
    """*stored* (a retrieved Part 10 file) is what *record* says was sent."""
    data = stored if record.whole_file else dataset_part(stored)
    return len(data) == record.size and digest_of(data) == record.digest


def wado_op(http: httpx.Client, site: Site, ledger: Ledger, rng: random.Random) -> None:
    """Retrieve an acknowledged instance and compare it with what was sent."""
    record = ledger.random_acked(rng)
    if record is None:
        time.sleep(0.05)
        return
    start = time.perf_counter()
    try:
        stored = retrieve(http, site, record)
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        ledger.error("wado", repr(exc))
        return
    ledger.timed("wado", (time.perf_counter() - start) * 1000)
    if stored is None:
        ledger.problem(f"WADO-RS during the load: acknowledged {record.sop} not found")
    elif not as_sent(record, stored):
        ledger.problem(f"WADO-RS during the load: {record.sop} differs from what was sent")


@dataclasses.dataclass(frozen=True)
class Mix:
    """How many clients of each kind run at once."""

    storescu: int = 2
    cstore: int = 1
    stow: int = 2
    qido: int = 1
    wado: int = 1


def run_load(
    site: Site,
    ledger: Ledger,
    mix: Mix,
    seed: str,
    *,
    duration: float | None = None,
    stop: threading.Event | None = None,
    pause_on_error: float = 0.2,
) -> float:
    """Run *mix*'s clients at once until *duration* seconds have passed or
    *stop* is set; the seconds it ran.  A client whose request failed waits
    *pause_on_error* before its next one (the server may be down)."""
    stop = stop or threading.Event()
    maker = Maker(seed)
    deadline = time.monotonic() + duration if duration is not None else float("inf")
    with tempfile.TemporaryDirectory(prefix="load-files-") as tmp:

        def loop(name: str, number: int, op: Callable[[random.Random], object]) -> None:
            rng = random.Random(f"{seed}/{name}/{number}")
            while not stop.is_set() and time.monotonic() < deadline:
                errors = ledger.error_count()
                try:
                    op(rng)
                except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                    ledger.error(name, repr(exc))
                if ledger.error_count() != errors:
                    stop.wait(pause_on_error)

        def http_loop(name: str, number: int, op: Callable[..., object]) -> None:
            with httpx.Client(timeout=120) as http:
                loop(name, number, lambda rng: op(http, site, ledger, rng))

        def storescu_loop(number: int) -> None:
            folder = Path(tmp) / f"storescu-{number}"
            folder.mkdir()
            loop("storescu", number, lambda rng: storescu_op(site, folder, maker, ledger, rng))

        threads = []
        for number in range(mix.storescu):
            threads.append(threading.Thread(target=storescu_loop, args=(number,)))
        for number in range(mix.cstore):
            threads.append(
                threading.Thread(
                    target=loop,
                    args=("c-store", number, lambda rng: pynetdicom_op(site, maker, ledger, rng)),
                )
            )
        for number in range(mix.stow):
            threads.append(
                threading.Thread(
                    target=http_loop,
                    args=("stow", number, lambda h, s, le, r: stow_op(h, s, maker, le, r)),
                )
            )
        for number in range(mix.qido):
            threads.append(threading.Thread(target=http_loop, args=("qido", number, qido_op)))
        for number in range(mix.wado):
            threads.append(threading.Thread(target=http_loop, args=("wado", number, wado_op)))
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.monotonic() - start


# --------------------------------------------------------------------------
# the check afterwards


@dataclasses.dataclass
class Check:
    """What :func:`check_all` found."""

    acknowledged: int = 0
    retrieved_identical: int = 0
    missing_qido: list[str] = dataclasses.field(default_factory=list)
    missing_find: list[str] = dataclasses.field(default_factory=list)
    missing_wado: list[str] = dataclasses.field(default_factory=list)
    altered: list[str] = dataclasses.field(default_factory=list)
    #: C-FINDs asked again after an answer lost in the client
    cfind_retries: int = 0
    unacknowledged: int = 0
    unacknowledged_present: int = 0
    unacknowledged_broken: list[str] = dataclasses.field(default_factory=list)
    verify: dict[str, Any] = dataclasses.field(default_factory=dict)
    verify_exit: int = -1

    @property
    def ok(self) -> bool:
        return (
            not (self.missing_qido or self.missing_find or self.missing_wado or self.altered)
            and not self.unacknowledged_broken
            and self.verify_exit == 0
        )

    def summary(self) -> dict[str, Any]:
        return {
            "acknowledged": self.acknowledged,
            "retrieved_identical": self.retrieved_identical,
            "missing_qido": len(self.missing_qido),
            "missing_cfind": len(self.missing_find),
            "cfind_retries": self.cfind_retries,
            "missing_wado": len(self.missing_wado),
            "altered": len(self.altered),
            "unacknowledged": self.unacknowledged,
            "unacknowledged_present_and_whole": self.unacknowledged_present,
            "unacknowledged_present_but_broken": len(self.unacknowledged_broken),
            "verify_exit": self.verify_exit,
            "verify": self.verify,
            "examples": (self.missing_qido + self.missing_find + self.missing_wado + self.altered)[
                :10
            ]
            + self.unacknowledged_broken[:10],
        }


def _find_series(finder: FindClient, study: str, series: str) -> set[str]:
    """The SOP Instance UIDs C-FIND finds in one series (IMAGE level)."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    query.SOPInstanceUID = ""
    try:
        matches, final = finder.find(query)
    except RuntimeError:  # no answer, or cut short: asked again by the caller
        return set()
    if final != SUCCESS:
        raise RuntimeError(f"C-FIND of series {series} ended with 0x{final:04X}")
    return {str(m.SOPInstanceUID) for m in matches}


def check_all(site: Site, ledger: Ledger, *, threads: int = 4) -> Check:
    """Every acknowledged instance: found by QIDO-RS (its study's
    instances) and C-FIND (its series' instances), retrieved by WADO-RS as it
    was sent.  Every instance sent but not acknowledged: absent, or present
    and whole.  Then ``dicom-appliance verify --deep``."""
    check = Check(acknowledged=len(ledger.acked), unacknowledged=0)
    acked = list(ledger.acked.values())
    unacked = [r for sop, r in ledger.sent.items() if sop not in ledger.acked]
    check.unacknowledged = len(unacked)
    studies: dict[str, set[str]] = {}
    series: dict[tuple[str, str], set[str]] = {}
    for record in acked:
        studies.setdefault(record.study, set()).add(record.sop)
        series.setdefault((record.study, record.series), set()).add(record.sop)

    with httpx.Client(timeout=120) as http:
        for study, sops in studies.items():
            response = http.get(f"{site.base_url}/v1/studies/{study}/instances")
            found = (
                {m[SOP_INSTANCE_UID]["Value"][0] for m in response.json()}
                if response.status_code == 200
                else set()
            )
            check.missing_qido += sorted(sops - found)
    finder = FindClient(site.server())
    try:
        for (study, series_uid), sops in series.items():
            missing = sops - _find_series(finder, study, series_uid)
            # pynetdicom's SCU now and then drops a response it reads before
            # its generator waits for it ("Received unexpected C-FIND service
            # message", pydicom/pynetdicom#875; the appliance's log shows the
            # matches sent): the same query is asked again, counted
            for _ in range(3):
                if not missing:
                    break
                check.cfind_retries += 1
                with contextlib.suppress(Exception):
                    finder.close()
                finder = FindClient(site.server())
                missing = sops - _find_series(finder, study, series_uid)
            check.missing_find += sorted(missing)
    finally:
        finder.close()

    local = threading.local()
    lock = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120)
        http: httpx.Client = local.http
        return http

    def one(record: Record, acknowledged: bool) -> None:
        stored = retrieve(client(), site, record)
        with lock:
            if stored is None:
                if acknowledged:
                    check.missing_wado.append(record.sop)
            elif as_sent(record, stored):
                if acknowledged:
                    check.retrieved_identical += 1
                else:
                    check.unacknowledged_present += 1
            elif acknowledged:
                check.altered.append(record.sop)
            else:
                check.unacknowledged_broken.append(record.sop)

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(one, r, True) for r in acked]
        futures += [pool.submit(one, r, False) for r in unacked]
        for future in futures:
            future.result()

    done = site.command("verify", "--deep", "--json", "--quiet")
    check.verify_exit = done.returncode
    try:
        check.verify = json.loads(done.stdout)
    except json.JSONDecodeError:
        check.verify = {"output": (done.stdout + done.stderr)[-2000:]}
    return check


# --------------------------------------------------------------------------
# the figures


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of *values*."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * int(fraction * 100) // 100) - 1)]


def figures(ledger: Ledger, seconds: float) -> dict[str, Any]:
    """Throughput, latency per kind and error counts of a run."""
    kinds: dict[str, Any] = {}
    for kind, values in sorted(ledger.latencies.items()):
        kinds[kind] = {
            "requests": len(values),
            "per_s": round(len(values) / seconds, 1),
            "p50_ms": round(statistics.median(values), 1),
            "p99_ms": round(percentile(values, 0.99), 1),
            "errors": ledger.errors.get(kind, 0),
        }
    for kind, count in ledger.errors.items():
        kinds.setdefault(kind, {"requests": 0, "errors": count})
    requests = sum(len(v) for v in ledger.latencies.values()) + sum(ledger.errors.values())
    reads = sum(len(ledger.latencies.get(k, ())) for k in ("qido", "wado"))
    by_way: dict[str, int] = {}
    for record in ledger.acked.values():
        by_way[record.via] = by_way.get(record.via, 0) + 1
    stored_bytes = sum(r.size for r in ledger.acked.values())
    return {
        "seconds": round(seconds, 1),
        "instances_acknowledged": len(ledger.acked),
        "instances_acknowledged_by": by_way,
        "instances_per_s": round(len(ledger.acked) / seconds, 1),
        "mb_per_s": round(stored_bytes / seconds / 1e6, 2),
        "reads_per_s": round(reads / seconds, 1),
        "error_rate": round(sum(ledger.errors.values()) / requests, 4) if requests else 0.0,
        "kinds": kinds,
    }


def table(found: dict[str, Any]) -> str:
    lines = [
        f"{'kind':<10} {'requests':>8} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}",
    ]
    for kind, entry in found["kinds"].items():
        lines.append(
            f"{kind:<10} {entry['requests']:>8} {entry.get('per_s', 0):>7} "
            f"{entry.get('p50_ms', '-'):>8} {entry.get('p99_ms', '-'):>8} {entry['errors']:>6}"
        )
    lines.append(
        f"stored: {found['instances_acknowledged']} instances acknowledged "
        f"({found['instances_per_s']}/s, {found['mb_per_s']} MB/s) "
        f"{found['instances_acknowledged_by']}; reads {found['reads_per_s']}/s; "
        f"error rate {found['error_rate']:.2%}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# soak: memory and file descriptors of every serve process


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(field.encode() + b":"):
                return int(line.split()[1])
    return 0


def _label(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    return " ".join(Path(w).name if w.startswith("/") else w for w in words)[:80]


class Sampler:
    """Every *interval* seconds, each serve process's VmRSS (KiB) and
    number of open file descriptors (``/proc/PID/fd``)."""

    def __init__(self, running: Running, interval: float) -> None:
        self.running = running
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.labels: dict[int, str] = {}
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def sample(self) -> None:
        processes = {}
        for pid in self.running.pids():
            with contextlib.suppress(OSError):
                rss = _status_kb(pid, "VmRSS")
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                if pid not in self.labels:
                    self.labels[pid] = _label(pid)
                processes[str(pid)] = {"rss_kb": rss, "fds": fds}
        self.samples.append(
            {
                "t": round(time.monotonic() - self._start, 1),
                "rss_kb": sum(p["rss_kb"] for p in processes.values()),
                "fds": sum(p["fds"] for p in processes.values()),
                "processes": processes,
            }
        )

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


#: The soak fails when the median resident memory of the last quarter
#: exceeds the second quarter's by more than this fraction and 16 MiB ...
RSS_GROWTH = 0.10
RSS_SLACK_KB = 16 * 1024
#: ... or the open descriptors' median by more than this many, rising from
#: quarter to quarter.  (The first quarter is the warm-up: caches fill,
#: gunicorn and pynetdicom open what they keep.)
FD_GROWTH = 8


def flatness(series: list[float], *, ratio: float, slack: float) -> dict[str, Any]:
    """Medians of the four quarters of *series* and whether the last one
    stays within ``Q2 * (1 + ratio)`` or ``Q2 + slack``, whichever is
    larger."""
    if len(series) < 8:
        return {"flat": None, "why": "fewer than 8 samples"}
    n = len(series)
    quarters = [statistics.median(series[i * n // 4 : (i + 1) * n // 4]) for i in range(4)]
    bound = max(quarters[1] * (1 + ratio), quarters[1] + slack)
    rising = quarters[1] < quarters[2] < quarters[3]
    return {
        "quarter_medians": [round(q, 1) for q in quarters],
        "bound": round(bound, 1),
        "flat": quarters[3] <= bound or not rising,
    }


def soak_verdict(sampler: Sampler) -> dict[str, Any]:
    """Whether the totals over all serve processes stayed flat, with the
    per-process first and last values."""
    rss = [float(s["rss_kb"]) for s in sampler.samples]
    fds = [float(s["fds"]) for s in sampler.samples]
    first, last = sampler.samples[0]["processes"], sampler.samples[-1]["processes"]
    return {
        "rss_kb": flatness(rss, ratio=RSS_GROWTH, slack=RSS_SLACK_KB),
        "fds": flatness(fds, ratio=0.0, slack=FD_GROWTH),
        "processes": {
            pid: {
                "label": sampler.labels.get(int(pid), "?"),
                "first": first.get(pid),
                "last": last.get(pid),
            }
            for pid in sorted(set(first) | set(last), key=int)
        },
    }


def soak_table(sampler: Sampler) -> str:
    lines = [f"{'t s':>7} {'RSS MiB':>8} {'fds':>5}"]
    for sample in sampler.samples:
        lines.append(f"{sample['t']:>7} {sample['rss_kb'] / 1024:>8.1f} {sample['fds']:>5}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the command


def run(
    workdir: Path,
    seconds: float,
    mix: Mix,
    seed: str,
    *,
    index_url: str = "",
    interval: float | None = None,
) -> dict[str, Any]:
    """One load (or soak, with a sampling *interval*) on a fresh appliance
    in *workdir*; the document of its results (``ok``: nothing lost,
    nothing altered, no error, and for a soak flat memory and descriptors)."""
    site = Site.create(workdir, index_url)
    ledger = Ledger()
    document: dict[str, Any] = {"mix": dataclasses.asdict(mix), "seed": seed}
    # what pynetdicom's SCUs warn of (a dropped response, an abort): with the
    # server's own warnings, the first place to look when a request failed
    client = _Warnings()
    pynetdicom_logger = logging.getLogger("pynetdicom")
    pynetdicom_logger.addHandler(client)
    try:
        with serving(site) as running:
            sampler = Sampler(running, interval) if interval else None
            with sampler or contextlib.nullcontext():
                ran = run_load(site, ledger, mix, seed, duration=seconds)
            check = check_all(site, ledger)
            server_warnings = _warning_lines(running.log)
    finally:
        pynetdicom_logger.removeHandler(client)
    document["client_warnings"] = {"count": client.count, "examples": client.examples}
    document["server_warnings"] = {
        "count": len(server_warnings),
        "examples": server_warnings[-50:],
    }
    document["figures"] = figures(ledger, ran)
    document["check"] = check.summary()
    document["problems_during_load"] = ledger.problems[:20]
    document["error_examples"] = ledger.error_examples
    ok = check.ok and not ledger.problems and not ledger.errors
    if sampler is not None:
        document["soak"] = soak_verdict(sampler) | {"interval_s": interval}
        document["soak"]["samples"] = sampler.samples
        print(soak_table(sampler))
        ok = ok and all(document["soak"][k]["flat"] is not False for k in ("rss_kb", "fds"))
    document["ok"] = ok
    return document


class _Warnings(logging.Handler):
    """Counts the warnings (and worse) of a logger and keeps the first 50."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.examples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.examples) < 50:
            stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            self.examples.append(f"{stamp:%H:%M:%S.%f} {record.levelname} {record.getMessage()}")


def _warning_lines(log: str) -> list[str]:
    """The lines of a ``serve`` log at warning level or worse (JSON lines,
    or text lines naming the level)."""
    levels = re.compile(r'"level":\s*"(?:warning|error|critical)"|\b(?:WARNING|ERROR|CRITICAL)\b')
    return [line for line in log.splitlines() if levels.search(line)]


def main(part: str, argv: list[str]) -> int:
    """``python -m bench load|soak ...``"""
    parser = argparse.ArgumentParser(prog=f"python -m bench {part}", description=__doc__)
    if part == "soak":
        parser.add_argument("--minutes", type=float, default=20.0, help="default 20")
        parser.add_argument(
            "--interval", type=float, default=10.0, help="seconds between samples (default 10)"
        )
    else:
        parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    for name, default in dataclasses.asdict(Mix()).items():
        parser.add_argument(
            f"--{name}", type=int, default=default, help=f"{name} clients (default {default})"
        )
    parser.add_argument("--index-url", default="", help="PostgreSQL URL (default: SQLite)")
    parser.add_argument("--seed", default="", help="UID seed (default: the start time)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    seed = args.seed or f"load-{started.timestamp()}"
    mix = Mix(**{name: getattr(args, name) for name in dataclasses.asdict(Mix())})
    seconds = args.minutes * 60 if part == "soak" else args.duration
    interval = args.interval if part == "soak" else None
    with tempfile.TemporaryDirectory(prefix=f"bench-{part}-") as tmp:
        document = run(Path(tmp), seconds, mix, seed, index_url=args.index_url, interval=interval)
    document |= {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": ["python", "-m", "bench", part, *argv],
        "machine": report.machine(None),
    }
    path = report.write(document, started, prefix=part)
    if part == "soak":
        for key in ("rss_kb", "fds"):
            print(f"{key}: {json.dumps(document['soak'][key])}")
    print(table(document["figures"]))
    print(f"check: {json.dumps({k: v for k, v in document['check'].items() if k != 'verify'})}")
    print(f"verify --deep: exit {document['check']['verify_exit']}")
    for line in document["problems_during_load"] + document["error_examples"]:
        print(f"  {line}")
    for side in ("client", "server"):
        found = document[f"{side}_warnings"]
        if found["count"]:
            print(f"{side} warnings: {found['count']} (examples in the results file)")
    print(f"{'OK' if document['ok'] else 'FAILED'}; results: {path}")
    return 0 if document["ok"] else 1
