"""The C-STORE SCP with real peers on loopback: dcmtk's ``storescu`` sending
pydicom's corpus (what is stored is the bytes on the wire, checked against
dcmtk's own bit-preserving ``storescp``), pynetdicom sending files byte for
byte, C-STORE then QIDO-RS/WADO-RS, concurrent associations, aborted
transfers, bad data sets, every status with its Error Comment, a 600 MB
instance received without holding it in memory, and the association policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import os
import socket
import struct
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import httpx
import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pydicom.uid import generate_uid as pydicom_generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from sqlalchemy import func, select

from appliance.errors import StorageFull
from appliance.index.schema import instance
from appliance.status import Status
from dimse_bridge.services.storage import DEFAULT_TRANSFER_SYNTAXES, error_comment
from tests.conftest import LiveAppliance, appliance_config, dcmtk, started_appliance
from tests.integration.test_ingest import expected_refusal
from tests.integration.test_wado import multipart
from tests.peers import free_port

pytestmark = pytest.mark.integration

DATA = Path(pydicom.__file__).parent / "data"
CORPUS = sorted(
    p for folder in ("test_files", "charset_files") for p in (DATA / folder).rglob("*.dcm")
)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DICOM_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Valid Part 10 files (for pydicom) that dcmtk 3.6.7 cannot read, so its
#: storescu cannot send them; pynetdicom sends them below.
NOT_READABLE_BY_DCMTK = {
    "MR_truncated.dcm": "Pixel Data shorter than its length: premature end of stream",
    "SC_rgb_jpeg.dcm": "premature end of stream",
    "rtdose_rle.dcm": "odd-length OW Pixel Data; dcmtk finds no SOP Class/Instance UID",
    "rtdose_rle_1frame.dcm": "odd-length OW Pixel Data; dcmtk finds no SOP Class/Instance UID",
    "rtplan_truncated.dcm": "an element longer than the rest of the file",
}


def generate_uid() -> str:
    return str(pydicom_generate_uid())


# ------------------------------------------------------------------ helpers


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    #: MediaStorageSOPInstanceUID, which pynetdicom sends as the command's
    meta_instance: str

    @property
    def name(self) -> str:
        return self.path.name


@functools.cache
def valid_corpus() -> tuple[CorpusFile, ...]:
    """pydicom's bundled files that the ingest accepts (tests/integration/
    test_ingest.py's rule)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in CORPUS:
            if expected_refusal(path) is not None:
                continue
            ds = dcmread(path, stop_before_pixels=True)
            found.append(
                CorpusFile(
                    path,
                    str(ds.SOPClassUID),
                    str(ds.SOPInstanceUID),
                    str(ds.file_meta.TransferSyntaxUID),
                    str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")),
                )
            )
    assert len(found) > 70
    return tuple(found)


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the File Meta group
    (found as pynetdicom finds it when it sends a file)."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    return data[fp.tell() :]


def stored_bytes(app: LiveAppliance, sop_uid: str) -> bytes:
    found = app.services.index.find_instance(sop_uid)
    assert found is not None, f"{sop_uid} is not in the index"
    with app.services.storage.open(found.blob_key) as fh:
        data: bytes = fh.read()
    return data


def count_instances(app: LiveAppliance) -> int:
    with app.services.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(instance)).scalar_one())


def blob_files(app: LiveAppliance) -> list[Path]:
    return [p for p in Path(app.config.storage.path).rglob("*") if p.is_file()]


def storescu(
    app: LiveAppliance,
    *files: Path,
    aet: str = "STORESCU",
    aec: str | None = None,
    args: Iterable[str] = (),
    port: int | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu sending *files* to the appliance (or to *port*)."""
    command = [
        dcmtk("storescu"),
        "-aet",
        aet,
        "-aec",
        app.ae_title if aec is None else aec,
        *args,
        "127.0.0.1",
        str(app.dimse_port if port is None else port),
        *map(str, files),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def negotiation_profile(
    path: Path, pairs: Iterable[tuple[str, str]], *, acceptor: bool = False
) -> list[str]:
    """A dcmtk association negotiation profile ``CORPUS`` (``-xf``) for the
    (SOP class, transfer syntax) *pairs*: for storescu one presentation
    context per pair, so it proposes each file's own transfer syntax; for
    storescp (*acceptor*, which wants each SOP class once) one per class
    with all its syntaxes."""
    grouped: dict[str, list[str]] = {}
    for sop, ts in sorted(set(pairs)):
        grouped.setdefault(sop, []).append(ts)
    contexts = (
        [(sop, tuple(syntaxes)) for sop, syntaxes in grouped.items()]
        if acceptor
        else [(sop, (ts,)) for sop, syntaxes in grouped.items() for ts in syntaxes]
    )
    label = {syntaxes: f"TS{n}" for n, syntaxes in enumerate(sorted({s for _, s in contexts}), 1)}
    lines = ["[[TransferSyntaxes]]"]
    for syntaxes, name in label.items():
        lines.append(f"[{name}]")
        lines += [f"TransferSyntax{n} = {ts}" for n, ts in enumerate(syntaxes, 1)]
    lines += ["[[PresentationContexts]]", "[CONTEXTS]"]
    lines += [
        f"PresentationContext{n} = {sop}\\{label[syntaxes]}"
        for n, (sop, syntaxes) in enumerate(contexts, 1)
    ]
    lines += ["[[Profiles]]", "[CORPUS]", "PresentationContexts = CONTEXTS"]
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "CORPUS"]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    assert wait_until(listening, timeout), f"nothing listens on port {port}"


@contextlib.contextmanager
def pynetdicom_scu(
    app: LiveAppliance,
    contexts: Iterable[tuple[str, str]],
    ae_title: str = "PYNETDICOM",
    called: str | None = None,
) -> Iterator[Association]:
    """An established pynetdicom association proposing *contexts*
    (one presentation context per (SOP class, transfer syntax))."""
    ae = AE(ae_title=ae_title)
    for sop, ts in sorted(set(contexts)):
        ae.add_requested_context(sop, ts)
    assoc = ae.associate("127.0.0.1", app.dimse_port, ae_title=called or app.ae_title)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def ct_dataset(sop_uid: str | None = None, study_uid: str | None = None) -> Dataset:
    """A small explicit-VR CT image without sequences: dcmtk sends it as
    pydicom wrote it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PID-STORE"
    ds.PatientName = "Store^Test"
    ds.Modality = "CT"
    ds.StudyDate = "20240102"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(128))
    return ds


def write_part10(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def part10_file(path: Path, meta: FileMetaDataset, body: bytes) -> Path:
    """A Part 10 file of *meta* and the data set bytes *body*, unchanged."""
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    path.write_bytes(buf.getvalue() + body)
    return path


def big_instance(path: Path, size: int) -> tuple[str, str]:
    """A Secondary Capture of *size* bytes of pixel data, written to *path*
    without holding it in memory; its SOP Instance UID and the SHA-256 of its
    data set."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 1
    ds.BitsAllocated = 8
    ds.save_as(path, enforce_file_format=True)
    digest = hashlib.sha256(dataset_bytes(path.read_bytes()))
    block = os.urandom(1 << 20)
    with path.open("ab") as fh:
        head = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
        fh.write(head)
        digest.update(head)
        for _ in range(size >> 20):
            fh.write(block)
            digest.update(block)
    return str(ds.SOPInstanceUID), digest.hexdigest()


def sha256_after_meta(fh: IO[bytes]) -> str:
    head = fh.read(64 * 1024)
    offset = len(head) - len(dataset_bytes(head))
    digest = hashlib.sha256(head[offset:])
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


# ------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def received_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The folder pynetdicom receives data sets into (its temporary files go
    to :func:`tempfile.gettempdir`); empty again after every test."""
    folder = tmp_path / "pynetdicom-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert wait_until(lambda: not any(folder.iterdir()), 10), list(folder.iterdir())


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom as SCU sends a file's data set bytes as they are in the
    file (instead of decoding and re-encoding it)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def replacing_appliance(tmp_path: Path) -> Iterator[LiveAppliance]:
    """An appliance with duplicate policy "replace": pydicom reuses SOP
    Instance UIDs across variants of one image."""
    config = appliance_config(tmp_path, APPLIANCE_INGEST_DUPLICATE_POLICY="replace")
    yield from started_appliance(config)


# ------------------------------------------------------- pydicom's corpus


def test_pydicom_corpus_with_storescu_is_stored_as_sent(
    replacing_appliance: LiveAppliance, tmp_path: Path
) -> None:
    """Every valid file dcmtk can read, sent by storescu in its own transfer
    syntax: the stored data set is the bytes on the wire, i.e. what dcmtk's
    own storescp in bit-preserving mode (``+B``) receives from the same
    storescu command.  dcmtk re-encodes some files as it sends them
    (sequences with explicit lengths, group lengths recalculated), so for
    those the wire is not the file; for all others the stored data set is
    the file's byte for byte."""
    app = replacing_appliance
    files = [f for f in valid_corpus() if f.name not in NOT_READABLE_BY_DCMTK]
    pairs = [(f.sop_class, f.transfer_syntax) for f in files]
    profile = negotiation_profile(tmp_path / "scu.cfg", pairs)
    # rounds without a repeated SOP Instance UID (replace policy: compare
    # each round before the next replaces it)
    rounds: list[list[CorpusFile]] = []
    for item in files:
        target = next(
            (r for r in rounds if all(o.sop_instance != item.sop_instance for o in r)), None
        )
        if target is None:
            rounds.append(target := [])
        target.append(item)

    oracle_dir = tmp_path / "storescp"
    oracle_dir.mkdir()
    oracle_port = free_port()
    oracle = subprocess.Popen(
        [
            dcmtk("storescp"),
            *negotiation_profile(tmp_path / "scp.cfg", pairs, acceptor=True),
            *("+B", "+uf", "-od", str(oracle_dir), str(oracle_port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    unchanged = 0
    try:
        wait_for_port(oracle_port)
        for batch in rounds:
            storescu(app, *(f.path for f in batch), args=profile)
            for old in oracle_dir.iterdir():
                old.unlink()
            storescu(app, *(f.path for f in batch), args=profile, port=oracle_port, aec="ANY")
            on_wire = {}
            for received in oracle_dir.iterdir():
                data = received.read_bytes()
                on_wire[str(dcmread(received, stop_before_pixels=True).SOPInstanceUID)] = data
            for item in batch:
                stored = stored_bytes(app, item.sop_instance)
                assert dcmread(DicomBytesIO(stored)).file_meta.TransferSyntaxUID == (
                    item.transfer_syntax
                )
                assert dataset_bytes(stored) == dataset_bytes(on_wire[item.sop_instance]), item.name
                unchanged += dataset_bytes(stored) == dataset_bytes(item.path.read_bytes())
    finally:
        oracle.terminate()
        oracle.wait(10)
    print(f"\n{len(files)} files by storescu, {unchanged} sent (and stored) unchanged")
    assert unchanged >= len(files) // 2


def test_pydicom_corpus_with_pynetdicom_is_stored_byte_for_byte(
    replacing_appliance: LiveAppliance, tmp_path: Path, chunked_send: None
) -> None:
    """Every valid file, its data set bytes sent unchanged from the file by
    pynetdicom (which, unlike storescu, never re-encodes): stored byte for
    byte.  pynetdicom puts the File Meta's Media Storage SOP Instance UID in
    the command; files where that differs from the data set's are refused
    with 0xA900 and nothing stored, and stored once the command is right."""
    app = replacing_appliance
    files = valid_corpus()
    mismatched = [f for f in files if f.meta_instance != f.sop_instance]
    assert mismatched
    contexts = {(f.sop_class, f.transfer_syntax) for f in files}
    with pynetdicom_scu(app, contexts) as assoc:
        for item in mismatched:
            status = assoc.send_c_store(item.path)
            assert status.Status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, item.name
            assert "SOPInstanceUID" in status.ErrorComment
            assert len(status.ErrorComment) <= 64
        assert count_instances(app) == 0
        assert blob_files(app) == []
        for n, item in enumerate(files):
            path = item.path
            if item in mismatched:
                meta = dcmread(path, stop_before_pixels=True).file_meta
                meta.MediaStorageSOPInstanceUID = UID(item.sop_instance)
                path = part10_file(
                    tmp_path / f"{n}.dcm", meta, dataset_bytes(item.path.read_bytes())
                )
            status = assoc.send_c_store(path)
            assert status.Status == Status.SUCCESS, (item.name, status)
            stored = stored_bytes(app, item.sop_instance)
            assert dataset_bytes(stored) == dataset_bytes(item.path.read_bytes()), item.name
            meta = dcmread(DicomBytesIO(stored), stop_before_pixels=True).file_meta
            assert meta.TransferSyntaxUID == item.transfer_syntax
            assert meta.SourceApplicationEntityTitle == "PYNETDICOM"


def test_every_transfer_syntax_is_accepted_and_stored_as_sent(
    live_appliance: LiveAppliance, tmp_path: Path, chunked_send: None
) -> None:
    """Each syntax of the default list in its own presentation context is
    accepted, and an instance encoded in it (compressed ones with a made-up
    encapsulated frame: nothing is decoded) is stored byte for byte."""
    app = live_appliance
    with pynetdicom_scu(app, ((CT_IMAGE, ts) for ts in DEFAULT_TRANSFER_SYNTAXES)) as assoc:
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert accepted == set(DEFAULT_TRANSFER_SYNTAXES)
        for n, ts in enumerate(DEFAULT_TRANSFER_SYNTAXES):
            ds = ct_dataset()
            ds.file_meta.TransferSyntaxUID = UID(ts)
            if UID(ts).is_compressed:
                ds.PixelData = encapsulate([b"\xff\xd8frame data\xff\xd9"])
                ds["PixelData"].VR = "OB"
                ds["PixelData"].is_undefined_length = True
            path = write_part10(ds, tmp_path / f"{n}.dcm")
            status = assoc.send_c_store(path)
            assert status.Status == Status.SUCCESS, ts
            stored = stored_bytes(app, ds.SOPInstanceUID)
            assert dataset_bytes(stored) == dataset_bytes(path.read_bytes()), ts
            assert app.services.index.find_instance(ds.SOPInstanceUID).transfer_syntax_uid == ts  # type: ignore[union-attr]


def test_configured_transfer_syntaxes_replace_the_default(tmp_path: Path) -> None:
    config = appliance_config(
        tmp_path, APPLIANCE_DIMSE_STORAGE_TRANSFER_SYNTAXES=ExplicitVRLittleEndian
    )
    for app in started_appliance(config):
        proposed = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit]
        with pynetdicom_scu(app, ((CT_IMAGE, ts) for ts in proposed)) as assoc:
            assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [
                ExplicitVRLittleEndian
            ]


def test_storage_sop_classes_beyond_storescus_defaults(live_appliance: LiveAppliance) -> None:
    """Classes dcmtk's storescu does not propose by default (Segmentation,
    Enhanced CT, Video, Encapsulated PDF...): every storage SOP class of
    pynetdicom is supported."""
    from pynetdicom import AllStoragePresentationContexts

    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    assert len(classes) > 128  # more than one association request may carry
    for start in range(0, len(classes), 120):
        chunk = classes[start : start + 120]
        with pynetdicom_scu(live_appliance, ((c, ExplicitVRLittleEndian) for c in chunk)) as assoc:
            assert sorted(str(cx.abstract_syntax) for cx in assoc.accepted_contexts) == sorted(
                chunk
            )


# ------------------------------------------------------ cross-protocol


def test_c_store_then_qido_finds_it_and_wado_returns_the_bytes(
    live_appliance: LiveAppliance, tmp_path: Path
) -> None:
    app = live_appliance
    ds = ct_dataset()
    path = write_part10(ds, tmp_path / "ct.dcm")
    storescu(app, path)
    with httpx.Client(timeout=30) as http:
        found = http.get(f"{app.root}/studies", params={"StudyInstanceUID": ds.StudyInstanceUID})
        assert found.status_code == 200, found.text
        [study] = found.json()
        assert study["0020000D"]["Value"] == [ds.StudyInstanceUID]
        assert study["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances
        url = (
            f"{app.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
        got = http.get(
            url,
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
    assert got.status_code == 200, got.text
    [(headers, content)] = multipart(got)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    assert content == stored_bytes(app, ds.SOPInstanceUID)
    assert dataset_bytes(content) == dataset_bytes(path.read_bytes())
    meta = dcmread(DicomBytesIO(content), stop_before_pixels=True).file_meta
    assert meta.SourceApplicationEntityTitle == "STORESCU"


# ------------------------------------------------------------ robustness


def test_eight_concurrent_associations_lose_nothing(
    live_appliance: LiveAppliance, tmp_path: Path
) -> None:
    app = live_appliance
    batches: list[list[Path]] = []
    for a in range(8):
        folder = tmp_path / f"batch{a}"
        folder.mkdir()
        study = generate_uid()
        batches.append(
            [write_part10(ct_dataset(study_uid=study), folder / f"{i}.dcm") for i in range(20)]
        )
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda files: storescu(app, *files, check=False), batches))
    assert [d.returncode for d in done] == [0] * 8, [d.stderr for d in done if d.returncode]
    assert count_instances(app) == 160
    assert len(blob_files(app)) == 160
    for files in batches:
        for path in files[::7]:
            ds = dcmread(path)
            assert dataset_bytes(stored_bytes(app, ds.SOPInstanceUID)) == dataset_bytes(
                path.read_bytes()
            )


@pytest.fixture
def ingest_calls(live_appliance: LiveAppliance, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SOP Instance UIDs the ingest pipeline was called with."""
    calls: list[str] = []
    ingest = live_appliance.services.ingest
    original = ingest.store_dataset

    def spy(dataset: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["sop_instance_uid"])
        return original(dataset, **kwargs)

    monkeypatch.setattr(ingest, "store_dataset", spy)
    return calls


def _wait_for_partial(folder: Path, at_least: int = 1 << 20) -> None:
    assert wait_until(
        lambda: any(p.stat().st_size >= at_least for p in folder.glob("*.dcm")), 30
    ), "no data set arrived"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_association_aborted_mid_transfer_leaves_nothing(
    live_appliance: LiveAppliance,
    tmp_path: Path,
    received_files: Path,
    ingest_calls: list[str],
    chunked_send: None,
) -> None:
    """pynetdicom sends part of a 50 MB data set, then A-ABORT: no index row,
    no blob, no temporary file, the pipeline never called; the next
    association works.  (pynetdicom's own DUL thread on the SCU side
    complains about P-DATA still queued after its abort: that warning is
    the sender's, filtered here.)

    pynetdicom's own ``abort()`` queues its A-ABORT behind every P-DATA
    already queued, i.e. behind the whole data set, so the test writes the
    A-ABORT PDU itself (PS3.8 9.3.8: source service-user, reason 0) between
    two of the sender's PDUs, which are paced at one per 20 ms as on a slow
    network; what pynetdicom sends after that is dropped."""
    app = live_appliance
    path = tmp_path / "big.dcm"
    sop_uid, _ = big_instance(path, 50 << 20)
    ae = AE(ae_title="ABORTER")
    ae.dimse_timeout = 2  # send_c_store waits this long for the response it will never get
    ae.add_requested_context(SECONDARY_CAPTURE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", app.dimse_port, ae_title=app.ae_title)
    assert assoc.is_established
    transport = assoc.dul.socket
    assert transport is not None
    assert transport.socket is not None
    raw, send = transport.socket, transport.send
    wire = threading.Lock()
    aborted = threading.Event()

    def paced_send(data: bytes) -> None:
        if aborted.is_set():
            return
        time.sleep(0.02)
        with wire:
            if not aborted.is_set():
                send(data)

    transport.send = paced_send  # type: ignore[method-assign]
    sender = threading.Thread(target=lambda: assoc.send_c_store(path), daemon=True)
    sender.start()
    _wait_for_partial(received_files)
    with wire:  # between two PDUs
        raw.sendall(bytes.fromhex("07000000000400000000"))  # A-ABORT-RQ
        aborted.set()
    assoc.abort()
    sender.join(10)
    assert not sender.is_alive()
    ae.shutdown()
    assert wait_until(lambda: not any(received_files.iterdir()))
    assert ingest_calls == []
    assert app.services.index.find_instance(sop_uid) is None
    assert count_instances(app) == 0
    assert blob_files(app) == []
    storescu(app, write_part10(ct_dataset(), tmp_path / "next.dcm"))
    assert count_instances(app) == 1


def test_storescu_killed_mid_transfer_leaves_nothing(
    live_appliance: LiveAppliance, tmp_path: Path, received_files: Path, ingest_calls: list[str]
) -> None:
    """The connection simply drops (storescu killed) in the middle of a data
    set: nothing stored, no temporary file left."""
    app = live_appliance
    path = tmp_path / "big.dcm"
    sop_uid, _ = big_instance(path, 50 << 20)
    sender = subprocess.Popen(
        [
            dcmtk("storescu"),
            "--max-send-pdu",
            "4096",
            "-aec",
            app.ae_title,
            "127.0.0.1",
            str(app.dimse_port),
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_partial(received_files)
    finally:
        sender.kill()
        sender.wait(10)
    assert wait_until(lambda: not any(received_files.iterdir()))
    assert ingest_calls == []
    assert app.services.index.find_instance(sop_uid) is None
    assert blob_files(app) == []
    storescu(app, write_part10(ct_dataset(), tmp_path / "next.dcm"))
    assert count_instances(app) == 1


def test_malformed_data_set_fails_with_a_comment_and_the_next_works(
    live_appliance: LiveAppliance, tmp_path: Path, chunked_send: None
) -> None:
    app = live_appliance
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    meta.MediaStorageSOPInstanceUID = UID(generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    cases = {
        "text": b"this is not a DICOM data set " * 40,
        "cut short": b"\x08\x00\x18\x00UI\x40\x00" + b"1.2.3",
        "undefined sequence": b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0",
    }
    with pynetdicom_scu(app, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        for name, body in cases.items():
            path = part10_file(tmp_path / "bad.dcm", meta, body)
            status = assoc.send_c_store(path)
            assert status.Status in (
                Status.CANNOT_UNDERSTAND,
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            ), name
            assert 0 < len(status.ErrorComment) <= 64, name
        # the same association goes on
        assert assoc.send_c_store(ct_dataset()).Status == Status.SUCCESS
    assert count_instances(app) == 1
    assert len(blob_files(app)) == 1
    storescu(app, write_part10(ct_dataset(), tmp_path / "next.dcm"))
    assert count_instances(app) == 2


def test_sop_class_mismatch_is_refused(
    live_appliance: LiveAppliance, tmp_path: Path, chunked_send: None
) -> None:
    """The command says Secondary Capture, the data set says CT: 0xA900 with
    a comment naming the attribute, nothing stored."""
    ds = ct_dataset()
    path = write_part10(ds, tmp_path / "ct.dcm")
    meta = dcmread(path, stop_before_pixels=True).file_meta
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)  # pynetdicom's command takes it
    bad = part10_file(tmp_path / "bad.dcm", meta, dataset_bytes(path.read_bytes()))
    with pynetdicom_scu(live_appliance, [(SECONDARY_CAPTURE, ExplicitVRLittleEndian)]) as assoc:
        status = assoc.send_c_store(bad)
    assert status.Status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert status.ErrorComment.startswith("SOPClassUID")
    assert count_instances(live_appliance) == 0
    assert blob_files(live_appliance) == []


def test_duplicate_is_a_warning_with_a_comment(
    live_appliance: LiveAppliance, tmp_path: Path
) -> None:
    app = live_appliance
    ds = ct_dataset()
    path = write_part10(ds, tmp_path / "ct.dcm")
    storescu(app, path)
    key = app.services.index.find_instance(ds.SOPInstanceUID).blob_key  # type: ignore[union-attr]
    again = storescu(app, path, args=["-v"])  # a warning: storescu succeeds
    assert "0xb00e" in again.stderr.lower()  # dcmtk: "Unknown Status: 0xb00e", exit 0
    with pynetdicom_scu(app, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        status = assoc.send_c_store(ds)
    assert status.Status == Status.DUPLICATE_INSTANCE_KEPT
    assert hex(status.Status) == "0xb00e"
    assert "already stored" in status.ErrorComment
    assert len(status.ErrorComment) <= 64
    assert count_instances(app) == 1
    assert app.services.index.find_instance(ds.SOPInstanceUID).blob_key == key  # type: ignore[union-attr]


def test_duplicate_rejected_by_policy(tmp_path: Path) -> None:
    config = appliance_config(tmp_path, APPLIANCE_INGEST_DUPLICATE_POLICY="reject")
    for app in started_appliance(config):
        ds = ct_dataset()
        with pynetdicom_scu(app, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
            assert assoc.send_c_store(ds).Status == Status.SUCCESS
            status = assoc.send_c_store(ds)
        assert status.Status == Status.DUPLICATE_SOP_INSTANCE
        assert hex(status.Status) == "0x111"
        assert "already stored" in status.ErrorComment
        assert count_instances(app) == 1


def test_storage_full_is_out_of_resources(
    live_appliance: LiveAppliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(source: Any) -> Any:
        raise StorageFull("no space left on the blob storage")

    monkeypatch.setattr(live_appliance.services.storage, "put", full)
    with pynetdicom_scu(live_appliance, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        status = assoc.send_c_store(ct_dataset())
    assert status.Status == Status.OUT_OF_RESOURCES
    assert hex(status.Status) == "0xa700"
    assert status.ErrorComment == "no space left on the blob storage"
    assert count_instances(live_appliance) == 0


def test_an_unexpected_error_is_a_processing_failure_never_0xc211(
    live_appliance: LiveAppliance,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The handler catches everything: 0x0110 with a comment naming the kind
    of error (not its text, which might quote data), and the association
    goes on."""
    ingest = live_appliance.services.ingest
    original = ingest.store_dataset
    calls: list[str] = []

    def explode(dataset: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["sop_instance_uid"])
        if len(calls) == 1:
            raise RuntimeError("a message quoting DOE^JANE")
        return original(dataset, **kwargs)

    monkeypatch.setattr(ingest, "store_dataset", explode)
    ds = ct_dataset()
    with (
        caplog.at_level(logging.INFO),
        pynetdicom_scu(live_appliance, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc,
    ):
        status = assoc.send_c_store(ds)
        assert status.Status == Status.PROCESSING_FAILURE
        assert hex(status.Status) == "0x110"
        assert status.ErrorComment == "internal error (RuntimeError)"
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
    assert ds.SOPInstanceUID in caplog.text
    assert "DOE" not in caplog.text
    assert "Store^Test" not in caplog.text


def test_error_comment_is_a_short_plain_lo() -> None:
    assert error_comment("x" * 100) == "x" * 61 + "..."
    assert len(error_comment("word " * 30)) <= 64
    assert error_comment("a\\b\r\nc\x00d Müller") == "a b c d Muller"


@pytest.mark.slow
def test_a_600_mb_instance_is_received_without_holding_it_in_memory(
    live_appliance: LiveAppliance, tmp_path: Path
) -> None:
    """dcmtk's storescu (another process) sends 600 MB; the listener runs in
    this process, whose peak RSS (VmHWM, reset first) must grow by far less.
    pynetdicom cannot be the sender here: its SCU queues all P-DATA of a data
    set in memory faster than the socket drains them (about the whole
    instance), which would be measured too."""
    app = live_appliance
    size = 600 << 20
    path = tmp_path / "big.dcm"
    sop_uid, digest = big_instance(path, size)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    started = time.monotonic()
    storescu(app, path, timeout=300)
    elapsed = time.monotonic() - started
    growth_mib = (_status_kib("VmHWM") - before) / 1024
    print(f"\n600 MB C-STORE: {elapsed:.1f} s, peak RSS growth {growth_mib:.1f} MiB")
    path.unlink()
    assert growth_mib < 100
    found = app.services.index.find_instance(sop_uid)
    assert found is not None
    with app.services.storage.open(found.blob_key) as fh:
        assert sha256_after_meta(fh) == digest


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


# ---------------------------------------------------- association policy


def test_max_associations_rejects_the_third_as_transient(tmp_path: Path) -> None:
    config = appliance_config(tmp_path, APPLIANCE_DIMSE_MAX_ASSOCIATIONS="2")
    for app in started_appliance(config):
        contexts = [(CT_IMAGE, ExplicitVRLittleEndian)]
        with pynetdicom_scu(app, contexts) as first, pynetdicom_scu(app, contexts):
            ae = AE(ae_title="THIRD")
            ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
            third = ae.associate("127.0.0.1", app.dimse_port, ae_title=app.ae_title)
            assert third.is_rejected
            rejection = third.acceptor.primitive
            assert rejection is not None
            # PS3.8 9.3.4: rejected-transient, service-provider (presentation),
            # local-limit-exceeded
            assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
            ae.shutdown()
            assert first.send_c_store(ct_dataset()).Status == Status.SUCCESS
        # the limit counts open associations only: once they are released,
        # a new one is accepted
        storescu(app, _one(tmp_path))


def _one(tmp_path: Path) -> Path:
    return write_part10(ct_dataset(), tmp_path / f"{generate_uid()}.dcm")


def test_known_peer_from_another_address_is_rejected(tmp_path: Path) -> None:
    """With require_known_peers and check_peer_address: a known title calling
    from an address not its host's is rejected before negotiation
    (A-ASSOCIATE-RJ reason 3, dimse_bridge.access); the right host works;
    unknown titles are rejected."""
    config = appliance_config(
        tmp_path,
        APPLIANCE_DIMSE_REQUIRE_KNOWN_PEERS="true",
        APPLIANCE_DIMSE_CHECK_PEER_ADDRESS="true",
        APPLIANCE_DIMSE_PEERS=(
            '[{ae_title="FAR", host="192.0.2.1", port=104},'
            ' {ae_title="NEAR", host="127.0.0.1", port=104}]'
        ),
    )
    for app in started_appliance(config):
        far = storescu(app, _one(tmp_path), aet="FAR", check=False)
        assert far.returncode != 0
        assert "Calling AE Title Not Recognized" in far.stdout + far.stderr
        assert count_instances(app) == 0
        stranger = storescu(app, _one(tmp_path), aet="STRANGER", check=False)
        assert stranger.returncode != 0
        assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr
        storescu(app, _one(tmp_path), aet="NEAR")
        assert count_instances(app) == 1


def test_called_ae_title_is_checked_unless_configured_not_to(tmp_path: Path) -> None:
    for app in started_appliance(appliance_config(tmp_path / "strict")):
        wrong = storescu(app, _one(tmp_path), aec="SOMEONE_ELSE", check=False)
        assert wrong.returncode != 0
        assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
        assert count_instances(app) == 0
    config = appliance_config(tmp_path / "lax", APPLIANCE_DIMSE_REQUIRE_CALLED_AE_TITLE="false")
    for app in started_appliance(config):
        storescu(app, _one(tmp_path), aec="SOMEONE_ELSE")
        assert count_instances(app) == 1
