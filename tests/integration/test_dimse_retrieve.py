"""C-MOVE and C-GET SCPs against real peers on loopback.

dcmtk is the real peer: ``storescp`` as the Move Destination, ``movescu``
and ``getscu`` as requestors; pynetdicom requestors and a pynetdicom Storage
SCP are used where a test needs exact statuses, a C-CANCEL at a chosen
moment, or a destination that fails on purpose.

Data sets are compared byte for byte after their File Meta (storescp and
getscu run with ``+B`` and write what arrived; their File Meta is their
own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import socket
import subprocess
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from appliance.model import Origin
from appliance.status import Status
from dimse_bridge import sending
from tests.conftest import LiveAppliance, appliance_config, dcmtk, started_appliance
from tests.integration.test_ingest import expected_refusal
from tests.peers import free_port

pytestmark = pytest.mark.integration

DATA = Path(pydicom.__file__).parent / "data"
ORIGIN = Origin("import")
STUDY_MOVE = StudyRootQueryRetrieveInformationModelMove
PATIENT_MOVE = PatientRootQueryRetrieveInformationModelMove
STUDY_GET = StudyRootQueryRetrieveInformationModelGet
PATIENT_GET = PatientRootQueryRetrieveInformationModelGet

#: getscu's option proposing each stored syntax first (dcmtk 3.6.7); getscu
#: always adds the uncompressed syntaxes after it.
GETSCU_SYNTAX_OPTION = {
    "1.2.840.10008.1.2": "+xi",
    "1.2.840.10008.1.2.1": "+xe",
    "1.2.840.10008.1.2.1.99": "+xd",
    "1.2.840.10008.1.2.2": "+xb",
    "1.2.840.10008.1.2.4.50": "+xy",
    "1.2.840.10008.1.2.4.51": "+xx",
    "1.2.840.10008.1.2.4.70": "+xs",
    "1.2.840.10008.1.2.4.80": "+xt",
    "1.2.840.10008.1.2.4.81": "+xu",
    "1.2.840.10008.1.2.4.90": "+xv",
    "1.2.840.10008.1.2.4.91": "+xw",
    "1.2.840.10008.1.2.5": "+xr",
}

#: pydicom files whose stored bytes cannot go out as they are: they are
#: read with pydicom and written again (what pydicom writes is sent).
REWRITTEN_BY_PYDICOM = {
    "image_dfl.dcm": "a deflated stream of odd length (not padded): peers refuse odd fragments",
}
#: pydicom files the appliance does not send (the sub-operation fails).
#: None now: the cut-short files that were (MR_truncated.dcm,
#: rtplan_truncated.dcm) are refused at ingest with 0xC000 (an element runs
#: past the end of the data set), so they are never stored.
UNSENDABLE: dict[str, str] = {}
#: pydicom files whose data set is not encoded as their transfer syntax says:
#: sent re-encoded in that syntax, every value (pixel data included) kept.
MISLABELLED = {
    "SC_rgb_jpeg.dcm": "Implicit VR elements under JPEG Baseline (an explicit VR syntax)",
}


# ------------------------------------------------------------------ helpers


@dataclasses.dataclass
class Env:
    """A live appliance whose ``dimse.peers`` name the destinations below."""

    app: LiveAppliance
    tmp: Path
    ports: dict[str, int]

    def store(self, data: bytes | Path) -> None:
        raw = data.read_bytes() if isinstance(data, Path) else data
        result = self.app.services.ingest.store_part10(io.BytesIO(raw), ORIGIN)
        assert result.status is Status.SUCCESS, result.reason


@pytest.fixture(scope="module")
def appliance(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveAppliance, dict[str, int]]]:
    """One live appliance for the module (its start and stop take a second);
    every test stores instances of its own.  Duplicate policy "replace": the
    corpus test stores variants of one image under one SOP Instance UID."""
    ports = {name: free_port() for name in ("DEST", "IMPLICIT", "PYDEST", "DOWN")}
    peers = ", ".join(
        f'{{ae_title="{name}", host="127.0.0.1", port={port}}}' for name, port in ports.items()
    )
    config = appliance_config(
        tmp_path_factory.mktemp("appliance"),
        APPLIANCE_DIMSE_PEERS=f"[{peers}]",
        APPLIANCE_INGEST_DUPLICATE_POLICY="replace",
    )
    for app in started_appliance(config):
        yield app, ports


@pytest.fixture
def env(appliance: tuple[LiveAppliance, dict[str, int]], tmp_path: Path) -> Env:
    """The module's appliance, with this test's folder for what arrives."""
    app, ports = appliance
    return Env(app, tmp_path, ports)


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


@contextlib.contextmanager
def storescp(port: int, out: Path, *options: str, aet: str = "DEST") -> Iterator[Path]:
    """dcmtk's storescp on *port*, writing what arrives, bit for bit, to *out*."""
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("storescp"), "-aet", aet, "+B", "-pm", *options, "-od", str(out), str(port)]
    log = (out.parent / f"storescp-{aet}.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port)
        yield out
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def movescu(env: Env, destination: str, level: str, model: str = "-S", **keys: str) -> str:
    args = [dcmtk("movescu"), "-v", model, "-aec", env.app.ae_title, "-aem", destination]
    args += ["-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}"]
    out = subprocess.run(
        [*args, "127.0.0.1", str(env.app.dimse_port)], capture_output=True, text=True, timeout=60
    )
    return out.stdout + out.stderr


def getscu(env: Env, out: Path, syntax_option: str, level: str, **keys: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("getscu"), "-v", "-S", syntax_option, "+B", "-od", str(out)]
    args += ["-aec", env.app.ae_title, "-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}"]
    result = subprocess.run(
        [*args, "127.0.0.1", str(env.app.dimse_port)], capture_output=True, text=True, timeout=60
    )
    return result.stdout + result.stderr


def received(out: Path) -> dict[str, Path]:
    """SOP Instance UID -> the file storescp/getscu wrote for it."""
    found: dict[str, Path] = {}
    for path in out.iterdir():
        ds = dcmread(path, stop_before_pixels=True)
        found[str(ds.SOPInstanceUID)] = path
    return found


def data_set(path: Path) -> tuple[UID, bytes]:
    """The transfer syntax and the data set's bytes (inflated if deflated)."""
    raw = path.read_bytes()
    syntax = UID(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    body = raw[sending.dataset_offset(raw) :]
    if syntax.is_deflated:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    return syntax, body


def pydicom_rewrite(path: Path) -> bytes:
    """The data set as pydicom writes it back (inflated if deflated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        written = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
    assert written is not None
    return written


def assert_same_data_set(got: Path, original: Path) -> str:
    """The received data set is the original's, byte for byte; except for
    the files whose bytes cannot go out as stored: a mislabelled one comes
    re-encoded with the same values, a damaged one as pydicom writes it.
    Returns how it compared."""
    got_syntax, got_body = data_set(got)
    syntax, body = data_set(original)
    assert got_syntax == syntax, original.name
    if original.name in MISLABELLED:
        assert_same_values(got, original)
        return "re-encoded"
    if original.name in REWRITTEN_BY_PYDICOM:
        assert got_body == pydicom_rewrite(original), original.name
        return "rewritten"
    assert got_body == body, original.name
    return "identical"


def assert_same_values(got: Path, original: Path) -> None:
    """Every element of the original, with the same value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = dcmread(got), dcmread(original)
    for elem in b:
        if elem.tag.element != 0:
            assert a[elem.tag].value == elem.value, (original.name, elem.tag)


def assert_same_pixels(got: Path, original: Path) -> None:
    """A transcoded copy: same instance, decodable, equal pixel values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = dcmread(got), dcmread(original)
    assert UID(a.file_meta.TransferSyntaxUID) in sending.FALLBACK_SYNTAXES
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert a.get(keyword) == b.get(keyword), (original.name, keyword)
    if "PixelData" in b:
        assert np.array_equal(a.pixel_array, b.pixel_array), original.name


def ct_image(
    study: str,
    series: str,
    number: int = 1,
    patient_id: str = "PID-1",
    sop: str | None = None,
    syntax: str = ExplicitVRLittleEndian,
) -> bytes:
    """A small CT image as Part 10 bytes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient_id
    ds.PatientName = "Test^Retrieve"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(64, dtype="<u2") * number).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def fresh(name: str, folder: Path) -> Path:
    """A copy of pydicom's test file *name* under new Study, Series and SOP
    Instance UIDs (pydicom's files share studies), written to *folder*."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(DATA / "test_files" / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@dataclasses.dataclass
class Response:
    status: int
    counts: dict[str, int | None]
    failed: list[str] | None
    comment: str | None


def _response(status: Dataset, ident: Dataset | None) -> Response:
    failed = None
    if ident is not None and "FailedSOPInstanceUIDList" in ident:
        value = ident.FailedSOPInstanceUIDList
        failed = ([value] if value else []) if isinstance(value, str) else [str(v) for v in value]
    counts = {
        name: status.get(f"NumberOf{name}Suboperations")
        for name in ("Remaining", "Completed", "Failed", "Warning")
    }
    return Response(int(status.Status), counts, failed, status.get("ErrorComment"))


class Receiver:
    """A pynetdicom Storage SCP as a Move Destination: records what it
    receives, can fail chosen instances and slow down."""

    def __init__(self, port: int, syntaxes: Sequence[str] | None = None) -> None:
        self.received: list[str] = []
        self.fail: set[str] = set()
        self.fail_all = False
        self.delay = 0.0
        ae = AE(ae_title="PYDEST")
        ae.add_supported_context(Verification)
        for sop_class in (CTImageStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class, list(syntaxes) if syntaxes else None)
        self._server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received.append(uid)
        time.sleep(self.delay)
        return 0xA700 if self.fail_all or uid in self.fail else 0x0000

    def close(self) -> None:
        assert self._server is not None
        self._server.shutdown()


@contextlib.contextmanager
def receiver(port: int, syntaxes: Sequence[str] | None = None) -> Iterator[Receiver]:
    scp = Receiver(port, syntaxes)
    try:
        yield scp
    finally:
        scp.close()


def scu_move(
    env: Env,
    ident: Dataset,
    destination: str,
    model: str = STUDY_MOVE,
    cancel_after: int | None = None,
) -> tuple[Response, list[Response]]:
    """A pynetdicom C-MOVE: the final response and the pending ones; with
    *cancel_after*, a C-CANCEL after that many pending responses."""
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", env.app.dimse_port, ae_title=env.app.ae_title)
    assert assoc.is_established
    pending: list[Response] = []
    try:
        for status, ident_rsp in assoc.send_c_move(ident, destination, model):
            assert status, "no response"
            response = _response(status, ident_rsp)
            if response.status == 0xFF00:
                pending.append(response)
                if cancel_after is not None and len(pending) == cancel_after:
                    assoc.send_c_cancel(1, query_model=model)
                continue
            return response, pending
        raise AssertionError("no final response")
    finally:
        assoc.release()


def scu_get(
    env: Env,
    ident: Dataset,
    model: str = STUDY_GET,
    sop_classes: Sequence[str] = (CTImageStorage,),
    syntaxes: Sequence[str] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
    fail: Sequence[str] = (),
    cancel_after: int | None = None,
) -> tuple[Response, list[str]]:
    """A pynetdicom C-GET: the final response and the SOP Instance UIDs
    received; the instances in *fail* are answered 0xA700."""
    got: list[str] = []

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        got.append(uid)
        if cancel_after is not None:
            time.sleep(0.01)  # time for the C-CANCEL to arrive mid-way
        return 0xA700 if uid in fail else 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(model)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, list(syntaxes))
    roles = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
    assoc = ae.associate(
        "127.0.0.1",
        env.app.dimse_port,
        ae_title=env.app.ae_title,
        ext_neg=roles,  # type: ignore[arg-type]
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    pending = 0
    try:
        for status, ident_rsp in assoc.send_c_get(ident, model):
            assert status, "no response"
            response = _response(status, ident_rsp)
            if response.status == 0xFF00:
                pending += 1
                if cancel_after is not None and pending == cancel_after:
                    assoc.send_c_cancel(1, query_model=model)
                continue
            return response, got
        raise AssertionError("no final response")
    finally:
        assoc.release()


# ------------------------------------------------------------------ corpus


def corpus_rounds() -> list[list[Path]]:
    """Every valid Part 10 file of pydicom's bundled data (the ingest's rule),
    in rounds of distinct SOP Instance UIDs: pydicom reuses the UIDs of one
    image across its variants, and each variant must come back."""
    groups: dict[str, list[Path]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(DATA.rglob("*.dcm")):
            if expected_refusal(path) is not None:
                continue
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            groups.setdefault(uid, []).append(path)
    depth = max(len(paths) for paths in groups.values())
    return [[paths[k] for paths in groups.values() if len(paths) > k] for k in range(depth)]


def decodable(path: Path) -> bool:
    """True if pydicom (with the plugins installed here) decodes the pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path)
            if "PixelData" in ds:
                ds.pixel_array  # noqa: B018 - decoding is the test
        except Exception:  # noqa: BLE001 - any decoder failure
            return False
    return True


def syntax_of(path: Path) -> UID:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return UID(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


@pytest.mark.interop
@pytest.mark.slow
def test_pydicoms_corpus_comes_back_by_move_and_get(env: Env) -> None:
    """Each valid file of pydicom's corpus, stored, comes back:

    - by C-MOVE to dcmtk's storescp (+xa: every syntax dcmtk knows), in its
      stored syntax and byte for byte, but for a damaged or mislabelled
      file (see REWRITTEN_BY_PYDICOM, MISLABELLED, UNSENDABLE);
    - by C-GET to dcmtk's getscu, proposing the stored syntax first and the
      uncompressed ones after it: as stored when the appliance accepts the
      stored syntax, else decoded into the uncompressed syntax it accepted
      (equal pixels), else (pixels pydicom cannot decode here) refused.
    """
    rounds = corpus_rounds()
    assert sum(len(r) for r in rounds) > 70
    current: dict[str, Path] = {}
    study_of: dict[str, str] = {}
    moved = dict.fromkeys(("identical", "rewritten", "re-encoded", "refused"), 0)
    got_back = dict.fromkeys(("identical", "rewritten", "re-encoded", "transcoded", "refused"), 0)
    move_out = env.tmp / "move"
    with storescp(env.ports["DEST"], move_out, "+xa"):
        for number, paths in enumerate(rounds):
            studies: dict[str, list[Dataset]] = {}
            for path in paths:
                env.store(path)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    header = dcmread(path, stop_before_pixels=True)
                current[str(header.SOPInstanceUID)] = path
                study_of[str(header.SOPInstanceUID)] = str(header.StudyInstanceUID)
                studies.setdefault(str(header.StudyInstanceUID), []).append(header)
            headers = [h for hs in studies.values() for h in hs]
            # C-MOVE, Study Root, STUDY level with a list of UIDs
            for stale in move_out.iterdir():
                stale.unlink()
            log = movescu(env, "DEST", "STUDY", StudyInstanceUID="\\".join(studies))
            in_studies = [p for uid, p in current.items() if study_of[uid] in studies]
            if any(p.name in UNSENDABLE for p in in_studies):
                assert "Received Final Move Response (Warning" in log, log[-2000:]
            else:
                assert "Received Final Move Response (Success)" in log, log[-2000:]
            got = received(move_out)
            for item in headers:
                uid = str(item.SOPInstanceUID)
                if current[uid].name in UNSENDABLE:
                    assert uid not in got
                    moved["refused"] += 1
                else:
                    moved[assert_same_data_set(got[uid], current[uid])] += 1
            # C-GET, Study Root, STUDY level: per stored syntax, the studies
            # holding it (their other instances come too and are not checked)
            by_syntax: dict[str, dict[str, list[str]]] = {}
            for item in headers:
                studies_of = by_syntax.setdefault(str(item.file_meta.TransferSyntaxUID), {})
                studies_of.setdefault(str(item.StudyInstanceUID), []).append(
                    str(item.SOPInstanceUID)
                )
            for syntax, studies_of in by_syntax.items():
                out = env.tmp / f"get-{number}-{GETSCU_SYNTAX_OPTION[syntax]}"
                log = getscu(
                    env,
                    out,
                    GETSCU_SYNTAX_OPTION[syntax],
                    "STUDY",
                    StudyInstanceUID="\\".join(studies_of),
                )
                assert "Received C-GET Response" in log, log[-2000:]
                got = received(out)
                for uid in (uid for uids in studies_of.values() for uid in uids):
                    if uid not in got:
                        assert current[uid].name in UNSENDABLE or not decodable(current[uid]), (
                            current[uid].name,
                            log[-2000:],
                        )
                        got_back["refused"] += 1
                    elif syntax_of(got[uid]) == syntax:
                        got_back[assert_same_data_set(got[uid], current[uid])] += 1
                    else:
                        assert_same_pixels(got[uid], current[uid])
                        got_back["transcoded"] += 1
                shutil.rmtree(out)
    total = sum(len(r) for r in rounds)
    assert sum(moved.values()) == sum(got_back.values()) == total
    # identical but for the damaged and mislabelled files
    assert moved == {
        "identical": total - len(UNSENDABLE) - len(MISLABELLED) - len(REWRITTEN_BY_PYDICOM),
        "rewritten": len(REWRITTEN_BY_PYDICOM),
        "re-encoded": len(MISLABELLED),
        "refused": len(UNSENDABLE),
    }, moved
    assert got_back["refused"] <= 3 + len(UNSENDABLE), got_back


# --------------------------------------------------------------- C-MOVE


@pytest.mark.interop
def test_stow_rs_then_c_move_delivers_it(env: Env) -> None:
    """Cross-protocol: stored by STOW-RS, sent out by C-MOVE, unchanged."""
    files = [fresh(name, env.tmp / "sent") for name in ("CT_small.dcm", "JPEG2000.dcm")]
    boundary = "retrieve-test-7f3a"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + p.read_bytes()
            + b"\r\n"
            for p in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    response = httpx.post(
        f"{env.app.root}/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    headers = [dcmread(p, stop_before_pixels=True) for p in files]
    with storescp(env.ports["DEST"], env.tmp / "out", "+xa") as out:
        log = movescu(
            env, "DEST", "STUDY", StudyInstanceUID="\\".join(h.StudyInstanceUID for h in headers)
        )
        assert "Received Final Move Response (Success)" in log, log[-2000:]
        got = received(out)
    for path, header in zip(files, headers, strict=True):
        assert assert_same_data_set(got[str(header.SOPInstanceUID)], path) == "identical"


def test_unknown_move_destination_is_a801(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    study, series = generate_uid(), generate_uid()
    env.store(ct_image(study, series))
    with caplog.at_level(logging.INFO, logger="dimse_bridge"):
        final, pending = scu_move(env, identifier("STUDY", StudyInstanceUID=study), "NOWHERE")
    assert final.status == Status.MOVE_DESTINATION_UNKNOWN
    assert not pending
    assert "not a configured peer" in caplog.text


def test_destination_down_is_a801_and_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom 3 answers 0xA801 when the association to a configured
    destination is not accepted (nothing listens on DOWN's port)."""
    study, series = generate_uid(), generate_uid()
    env.store(ct_image(study, series))
    with caplog.at_level(logging.INFO, logger="dimse_bridge"):
        final, _ = scu_move(env, identifier("STUDY", StudyInstanceUID=study), "DOWN")
    assert final.status == Status.MOVE_DESTINATION_UNKNOWN
    assert f"the association to 127.0.0.1:{env.ports['DOWN']} was not accepted" in caplog.text


@pytest.mark.interop
def test_refused_syntax_falls_back_to_an_uncompressed_one(env: Env) -> None:
    """storescp accepting Implicit VR Little Endian only: compressed, Big
    Endian and Explicit VR instances arrive decoded and re-encoded, with the
    same pixel values and the same SOP Instance UID."""
    names = ["JPEG2000.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm", "ExplVR_BigEnd.dcm"]
    names += ["CT_small.dcm", "693_J2KI.dcm"]
    files = [fresh(name, env.tmp / "sent") for name in names]
    for path in files:
        env.store(path)
    headers = [dcmread(p, stop_before_pixels=True) for p in files]
    with storescp(env.ports["IMPLICIT"], env.tmp / "out", "+xi", aet="IMPLICIT") as out:
        log = movescu(
            env,
            "IMPLICIT",
            "STUDY",
            StudyInstanceUID="\\".join(dict.fromkeys(h.StudyInstanceUID for h in headers)),
        )
        assert "Received Final Move Response (Success)" in log, log[-2000:]
        got = received(out)
    for path, header in zip(files, headers, strict=True):
        arrived = got[str(header.SOPInstanceUID)]
        assert dcmread(arrived, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
            ImplicitVRLittleEndian
        )
        assert_same_pixels(arrived, path)


def test_a_sub_operation_that_cannot_be_transcoded_fails(env: Env) -> None:
    """An instance stored as JPEG whose pixel data cannot be decoded, to a
    destination taking Explicit VR Little Endian only: that sub-operation
    fails, the others complete (0xB000)."""
    study, series = generate_uid(), generate_uid()
    good = generate_uid()
    env.store(ct_image(study, series, 1, sop=good))
    ds = dcmread(io.BytesIO(ct_image(study, series, 2)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    env.store(buffer.getvalue())
    with receiver(env.ports["PYDEST"], [ExplicitVRLittleEndian]) as scp:
        final, _ = scu_move(env, identifier("STUDY", StudyInstanceUID=study), "PYDEST")
    assert final.status == Status.SUBOPERATIONS_COMPLETE_WITH_FAILURES
    assert final.failed == [ds.SOPInstanceUID]
    assert scp.received == [good]


def test_explicit_only_destination_gets_jpeg_decompressed(env: Env) -> None:
    path = fresh("SC_rgb_jpeg_dcmtk.dcm", env.tmp)
    env.store(path)
    header = dcmread(path, stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    with receiver(env.ports["PYDEST"], [ExplicitVRLittleEndian]) as scp:
        final, pending = scu_move(
            env, identifier("STUDY", StudyInstanceUID=header.StudyInstanceUID), "PYDEST"
        )
    assert final.status == Status.SUCCESS
    assert final.counts["Completed"] == 1
    assert len(pending) == 1
    assert scp.received == [header.SOPInstanceUID]


def test_partial_failure_is_b000_with_the_failed_list(env: Env) -> None:
    """One instance refused by the destination, one whose blob is gone:
    0xB000, both in the Failed SOP Instance UID List, the rest completed."""
    study, series = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(5)]
    for number, uid in enumerate(uids, 1):
        env.store(ct_image(study, series, number, sop=uid))
    services = env.app.services
    (gone,) = services.retrieve.instances(study, series, uids[3])
    services.storage.delete(gone.blob_key)
    with receiver(env.ports["PYDEST"]) as scp:
        scp.fail = {uids[1]}
        final, pending = scu_move(env, identifier("STUDY", StudyInstanceUID=study), "PYDEST")
    assert final.status == Status.SUBOPERATIONS_COMPLETE_WITH_FAILURES
    assert sorted(final.failed or []) == sorted([uids[1], uids[3]])
    assert (final.counts["Completed"], final.counts["Failed"]) == (3, 2)
    assert [p.counts["Remaining"] for p in pending] == [4, 3, 2, 1, 0]
    assert uids[3] not in scp.received


def test_every_sub_operation_failing_is_a702(env: Env) -> None:
    study, series = generate_uid(), generate_uid()
    for number in (1, 2):
        env.store(ct_image(study, series, number))
    with receiver(env.ports["PYDEST"]) as scp:
        scp.fail_all = True
        final, _ = scu_move(env, identifier("STUDY", StudyInstanceUID=study), "PYDEST")
    assert final.status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    assert final.counts["Failed"] == 2
    assert len(final.failed or []) == 2


def test_c_cancel_during_a_long_move_is_fe00_with_counts(env: Env) -> None:
    study, series = generate_uid(), generate_uid()
    total = 60
    for number in range(1, total + 1):
        env.store(ct_image(study, series, number))
    with receiver(env.ports["PYDEST"]) as scp:
        scp.delay = 0.02
        final, _pending = scu_move(
            env, identifier("STUDY", StudyInstanceUID=study), "PYDEST", cancel_after=1
        )
    assert final.status == Status.CANCEL
    completed, remaining = final.counts["Completed"], final.counts["Remaining"]
    assert completed is not None
    assert remaining is not None
    assert completed >= 1
    assert remaining >= 1
    assert completed + (final.counts["Failed"] or 0) + remaining == total
    assert final.failed == []
    assert len(scp.received) == completed


# ---------------------------------------------------------- levels, models


@dataclasses.dataclass
class Tree:
    """Two patients: P1 (``<token>-1``) with studies A (series A1, A2: two
    images each) and B (B1: one image); P2 (``<token>*``, a literal
    asterisk: as a wild card it would match P1) with study C (C1: two
    images)."""

    uids: dict[str, str]
    images: dict[str, list[str]]
    p1: str
    p2: str


@pytest.fixture
def tree(env: Env) -> Tree:
    uids = {name: str(generate_uid()) for name in ("A", "A1", "A2", "B", "B1", "C", "C1")}
    token = f"PID{uuid.uuid4().hex[:8]}"
    p1, p2 = f"{token}-1", f"{token}*"
    images: dict[str, list[str]] = {}
    for study, series_list, patient in (
        ("A", ("A1", "A2"), p1),
        ("B", ("B1",), p1),
        ("C", ("C1",), p2),
    ):
        for name in series_list:
            count = 1 if name == "B1" else 2
            images[name] = [generate_uid() for _ in range(count)]
            for number, sop in enumerate(images[name], 1):
                env.store(ct_image(uids[study], uids[name], number, patient, sop))
    return Tree(uids, images, p1, p2)


def _cases(tree: Tree) -> list[tuple[str, str, dict[str, Any], list[str]]]:
    u, im, p1 = tree.uids, tree.images, tree.p1
    a = im["A1"] + im["A2"]
    return [
        ("PATIENT", "PATIENT", {"PatientID": p1}, a + im["B1"]),
        ("PATIENT", "PATIENT", {"PatientID": tree.p2}, im["C1"]),  # literal, no wild card
        ("PATIENT", "PATIENT", {"PatientID": "NOBODY"}, []),
        ("PATIENT", "STUDY", {"PatientID": p1, "StudyInstanceUID": [u["A"], u["C"]]}, a),
        (
            "PATIENT",
            "SERIES",
            {"PatientID": p1, "StudyInstanceUID": u["A"], "SeriesInstanceUID": [u["A2"]]},
            im["A2"],
        ),
        (
            "PATIENT",
            "IMAGE",
            {
                "PatientID": p1,
                "StudyInstanceUID": u["A"],
                "SeriesInstanceUID": u["A1"],
                "SOPInstanceUID": im["A1"],
            },
            im["A1"],
        ),
        ("STUDY", "STUDY", {"StudyInstanceUID": [u["A"], u["C"]]}, a + im["C1"]),
        ("STUDY", "STUDY", {"StudyInstanceUID": [u["B"], u["B"]]}, im["B1"]),
        (
            "STUDY",
            "SERIES",
            {"StudyInstanceUID": u["A"], "SeriesInstanceUID": [u["A1"], u["A2"]]},
            a,
        ),
        (
            "STUDY",
            "IMAGE",
            {
                "StudyInstanceUID": u["C"],
                "SeriesInstanceUID": u["C1"],
                "SOPInstanceUID": [im["C1"][1], generate_uid()],
            },
            [im["C1"][1]],
        ),
        ("STUDY", "STUDY", {"StudyInstanceUID": generate_uid()}, []),
    ]


def test_move_levels_and_models(env: Env, tree: Tree) -> None:
    with receiver(env.ports["PYDEST"]) as scp:
        for root, level, keys, expected in _cases(tree):
            scp.received.clear()
            model = PATIENT_MOVE if root == "PATIENT" else STUDY_MOVE
            final, pending = scu_move(env, identifier(level, **keys), "PYDEST", model)
            what = (root, level, keys)
            assert final.status == Status.SUCCESS, what
            assert final.counts["Completed"] == len(expected), what
            assert len(pending) == len(expected), what
            assert sorted(scp.received) == sorted(expected), what


def test_get_levels_and_models(env: Env, tree: Tree) -> None:
    for root, level, keys, expected in _cases(tree):
        model = PATIENT_GET if root == "PATIENT" else STUDY_GET
        final, got = scu_get(env, identifier(level, **keys), model)
        what = (root, level, keys)
        assert final.status == Status.SUCCESS, what
        assert final.counts["Completed"] == len(expected), what
        assert sorted(got) == sorted(expected), what


def _bad_identifiers(tree: Tree) -> list[tuple[str, Dataset, str]]:
    u = tree.uids
    missing_level = Dataset()
    missing_level.StudyInstanceUID = u["A"]
    return [
        ("STUDY", missing_level, "QueryRetrieveLevel"),
        ("STUDY", identifier("WORKLIST", StudyInstanceUID=u["A"]), "QueryRetrieveLevel"),
        ("STUDY", identifier("PATIENT", PatientID=tree.p1), "Study Root"),
        ("STUDY", identifier("SERIES", SeriesInstanceUID=u["A1"]), "StudyInstanceUID"),
        ("STUDY", identifier("STUDY", StudyInstanceUID=""), "StudyInstanceUID"),
        (
            "STUDY",
            identifier("STUDY", StudyInstanceUID=u["A"], SeriesInstanceUID=u["A1"]),
            "SeriesInstanceUID",
        ),
        (
            "STUDY",
            identifier("SERIES", StudyInstanceUID=[u["A"], u["B"]], SeriesInstanceUID=u["A1"]),
            "StudyInstanceUID",
        ),
        ("STUDY", identifier("STUDY", StudyInstanceUID="1.2.abc"), "StudyInstanceUID"),
        ("PATIENT", identifier("STUDY", StudyInstanceUID=u["A"]), "PatientID"),
        ("PATIENT", identifier("PATIENT", PatientID=["A", "B"]), "PatientID"),
    ]


def test_bad_identifiers_are_a900_with_an_error_comment(env: Env, tree: Tree) -> None:
    with receiver(env.ports["PYDEST"]) as scp:
        for root, ident, key in _bad_identifiers(tree):
            model = PATIENT_MOVE if root == "PATIENT" else STUDY_MOVE
            final, pending = scu_move(env, ident, "PYDEST", model)
            assert final.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, (root, ident)
            assert key in (final.comment or ""), final.comment
            assert not pending
            get_model = PATIENT_GET if root == "PATIENT" else STUDY_GET
            final, got = scu_get(env, ident, get_model)
            assert final.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, (root, ident)
            assert key in (final.comment or ""), final.comment
            assert not got
        assert not scp.received


def test_log_lines_name_uids_and_counts_never_the_patient(
    env: Env, tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="dimse_bridge"), receiver(env.ports["PYDEST"]):
        scu_move(env, identifier("PATIENT", PatientID=tree.p1), "PYDEST", PATIENT_MOVE)
        scu_get(env, identifier("STUDY", StudyInstanceUID=tree.uids["A"]))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dimse_bridge")]
    move = [line for line in lines if line.startswith("C-MOVE to 'PYDEST'")]
    get = [line for line in lines if line.startswith("C-GET (Study Root)")]
    assert len(move) == 1
    assert "0x0000 success" in move[0]
    assert "5 completed" in move[0]
    assert len(get) == 1
    assert tree.uids["A"] in get[0]
    assert "4 completed" in get[0]
    assert not [line for line in lines if tree.p1 in line or "Test^Retrieve" in line]


# ------------------------------------------------------------------ C-GET


def test_get_partial_failure_and_cancel(env: Env) -> None:
    study, series = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(40)]
    for number, uid in enumerate(uids, 1):
        env.store(ct_image(study, series, number, sop=uid))
    final, got = scu_get(env, identifier("STUDY", StudyInstanceUID=study), fail=[uids[2]])
    assert final.status == Status.SUBOPERATIONS_COMPLETE_WITH_FAILURES
    assert final.failed == [uids[2]]
    assert (final.counts["Completed"], final.counts["Failed"]) == (39, 1)
    assert sorted(got) == sorted(uids)
    final, got = scu_get(env, identifier("STUDY", StudyInstanceUID=study), cancel_after=1)
    assert final.status == Status.CANCEL
    remaining = final.counts["Remaining"]
    assert remaining is not None
    assert remaining >= 1
    assert final.counts["Completed"] == len(got) == len(uids) - remaining


def test_get_without_a_storage_context_for_the_class_fails(env: Env) -> None:
    """The requestor proposed no context (with the SCP role) for Secondary
    Capture: every sub-operation fails, 0xA702."""
    path = fresh("SC_rgb_jpeg_dcmtk.dcm", env.tmp)
    env.store(path)
    header = dcmread(path, stop_before_pixels=True)
    final, got = scu_get(env, identifier("STUDY", StudyInstanceUID=header.StudyInstanceUID))
    assert final.status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    assert final.failed == [header.SOPInstanceUID]
    assert not got


@pytest.mark.interop
def test_getscu_receives_an_instance_as_stored(env: Env) -> None:
    path = fresh("CT_small.dcm", env.tmp)
    env.store(path)
    header = dcmread(path, stop_before_pixels=True)
    out = env.tmp / "get"
    log = getscu(env, out, "+xe", "STUDY", StudyInstanceUID=header.StudyInstanceUID)
    assert "Received C-GET Response (Success)" in log, log[-2000:]
    assert assert_same_data_set(received(out)[header.SOPInstanceUID], path) == "identical"


# ----------------------------------------------------------- the sender


def test_contexts_are_grouped_by_sop_class_over_128() -> None:
    """One context per (SOP Class, stored syntax) plus a fallback per class;
    past 128 contexts one per class with all its syntaxes; past 128 classes
    the rarest are left out."""
    from appliance.index.sql import StoredInstance

    def stored(sop_class: str, syntax: str) -> StoredInstance:
        uid = generate_uid()
        return StoredInstance(uid, sop_class, uid, uid, syntax, "key", 1)

    few = [stored(CTImageStorage, JPEGBaseline8Bit), stored(CTImageStorage, ExplicitVRLittleEndian)]
    contexts, left_out = sending.propose_contexts(few)
    assert [c.transfer_syntax for c in contexts] == [
        [JPEGBaseline8Bit],
        [ExplicitVRLittleEndian],
        list(sending.FALLBACK_SYNTAXES),
    ]
    assert not left_out
    classes = [f"1.2.3.{n}" for n in range(60)]
    many = [stored(c, s) for c in classes for s in (JPEGBaseline8Bit, ExplicitVRLittleEndian)]
    contexts, left_out = sending.propose_contexts(many)
    assert len(contexts) == 60
    assert not left_out
    assert contexts[0].transfer_syntax == [JPEGBaseline8Bit, *sending.FALLBACK_SYNTAXES]
    too_many = [stored(f"1.2.4.{n}", JPEGBaseline8Bit) for n in range(130)]
    too_many += [stored("1.2.4.0", JPEGBaseline8Bit)]
    contexts, left_out = sending.propose_contexts(too_many)
    assert len(contexts) == 128
    assert len(left_out) == 2
    assert "1.2.4.0" not in left_out
    assert sending.choose_syntax(JPEGBaseline8Bit, [ImplicitVRLittleEndian]) == (
        ImplicitVRLittleEndian
    )
    assert sending.choose_syntax(JPEGBaseline8Bit, ["1.2.840.10008.1.2.4.70"]) is None
