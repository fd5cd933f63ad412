"""STOW-RS over a real HTTP listener: dicomweb-client (a peer nobody here
wrote) storing pydicom's corpus, the response module and its HTTP statuses,
malformed requests, the body limit, and a large upload streamed through."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.dicomio import is_valid_uid
from appliance.errors import StorageError
from appliance.status import Status
from appliance.storage.base import BlobInfo
from dicomweb.multipart import LimitedReader, MultipartError, MultipartReader
from tests.conftest import LiveServer, make_config, started_server

pytestmark = pytest.mark.integration

DATA = Path(pydicom.__file__).parent / "data"
CORPUS = sorted(
    p for folder in ("test_files", "charset_files") for p in (DATA / folder).rglob("*.dcm")
)
BOUNDARY = "stow-test-5c1d2e"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


# ------------------------------------------------------------------ helpers


def ct_dataset(study_uid: str | None = None, sop_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PID-1"
    ds.Modality = "CT"
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(*parts: bytes, part_type: str | None = "application/dicom") -> bytes:
    out = bytearray()
    for data in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        if part_type is not None:
            out += f"Content-Type: {part_type}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def post(
    url: str, body: bytes | Iterator[bytes], content_type: str | None = MULTIPART, **headers: str
) -> httpx.Response:
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(url, content=body, headers=headers, timeout=120)


def response_dataset(response: httpx.Response) -> Dataset:
    assert response.headers["Content-Type"] == "application/dicom+json"
    return Dataset.from_json(response.json())


def stored_bytes(server: LiveServer, sop_uid: str) -> bytes | None:
    found = server.services.index.find_instance(sop_uid)
    if found is None:
        return None
    with server.services.storage.open(found.blob_key) as fh:
        data: bytes = fh.read()
    return data


def assert_still_serving(server: LiveServer) -> None:
    assert httpx.get(f"{server.base_url}/health/live", timeout=10).status_code == 200


def readable(path: Path) -> Dataset | None:
    """The data set of a valid Part 10 file with the four UIDs, else None
    (the files pydicom itself cannot read with a Part 10 header)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path)  # not forced: no DICM prefix is no Part 10 file
        except pydicom.errors.InvalidDicomError:
            return None
    if "TransferSyntaxUID" not in ds.file_meta:
        return None
    for keyword in KEYWORDS:
        value = ds.get(keyword)
        if not isinstance(value, str) or not is_valid_uid(value):
            return None
    return ds


def corpus() -> list[tuple[Path, Dataset]]:
    """The valid files of pydicom's corpus, one per SOP Instance UID (pydicom
    reuses UIDs across variants of one image) and per Series Instance UID
    within a study (no file's series is claimed by two studies)."""
    chosen: list[tuple[Path, Dataset]] = []
    sops: set[str] = set()
    series_study: dict[str, str] = {}
    for path in CORPUS:
        ds = readable(path)
        if ds is None or ds.SOPInstanceUID in sops:
            continue
        if series_study.setdefault(ds.SeriesInstanceUID, ds.StudyInstanceUID) != (
            ds.StudyInstanceUID
        ):
            continue
        sops.add(ds.SOPInstanceUID)
        chosen.append((path, ds))
    return chosen


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------- the corpus, two ways


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd corpus files
def test_dicomweb_client_stores_pydicoms_corpus(live_server: LiveServer) -> None:
    """dicomweb-client's store_instances, eight instances per request: every
    instance is stored as the bytes the client sent, which for most files
    are the file's own bytes."""
    files = corpus()
    assert len(files) >= 45
    client = DICOMwebClient(url=live_server.root)
    sent: dict[str, tuple[Path, bytes]] = {}
    encodable = []
    for path, ds in files:
        buf = io.BytesIO()
        try:
            pydicom.dcmwrite(buf, ds)  # what store_instances sends
        except (TypeError, ValueError):
            continue  # a file pydicom reads but cannot write again: the client's limit
        sent[ds.SOPInstanceUID] = (path, buf.getvalue())
        encodable.append(ds)
    for batch in batches(encodable, 8):
        result = client.store_instances(batch)
        refs = result.ReferencedSOPSequence
        assert [item.ReferencedSOPInstanceUID for item in refs] == [
            ds.SOPInstanceUID for ds in batch
        ]
        assert "FailedSOPSequence" not in result
        for item, ds in zip(refs, batch, strict=True):
            assert item.ReferencedSOPClassUID == ds.SOPClassUID
            assert "WarningReason" not in item
            # dicomweb-client sends a Host header without the port
            assert item.RetrieveURL.endswith(
                f"/v1/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}"
            )
    identical = 0
    for uid, (path, data) in sent.items():
        assert stored_bytes(live_server, uid) == data, path.name
        identical += data == path.read_bytes()
    assert identical >= 35


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd corpus files
def test_raw_part10_files_are_stored_byte_for_byte(live_server: LiveServer) -> None:
    """The files' own bytes, several per request: each blob is the file."""
    files = corpus()
    for batch in batches(files, 10):
        response = post(
            f"{live_server.root}/studies", multipart(*(p.read_bytes() for p, _ in batch))
        )
        assert response.status_code == 200, response.text
        result = response_dataset(response)
        assert len(result.ReferencedSOPSequence) == len(batch)
    for path, ds in files:
        assert stored_bytes(live_server, ds.SOPInstanceUID) == path.read_bytes(), path.name


# ------------------------------------------------ the response and its status


def test_response_module_for_success_duplicate_and_failure(live_server: LiveServer) -> None:
    study = generate_uid()
    first, second = ct_dataset(study), ct_dataset(study)
    url = f"{live_server.root}/studies"

    response = post(url, multipart(part10(first)))
    assert response.status_code == 200
    result = response_dataset(response)
    assert result.RetrieveURL == f"{live_server.root}/studies/{study}"
    (item,) = result.ReferencedSOPSequence
    assert item.ReferencedSOPClassUID == CT_IMAGE
    assert item.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert item.RetrieveURL == (
        f"{live_server.root}/studies/{study}/series/{first.SeriesInstanceUID}"
        f"/instances/{first.SOPInstanceUID}"
    )
    assert "WarningReason" not in item
    assert "FailedSOPSequence" not in result

    # the same instance again (kept: a warning), a new one, and garbage
    response = post(url, multipart(part10(first), part10(second), b"not DICOM at all"))
    assert response.status_code == 202
    result = response_dataset(response)
    duplicate, new = result.ReferencedSOPSequence
    assert duplicate.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert duplicate.WarningReason == 0xB00E  # Status.DUPLICATE_INSTANCE_KEPT
    assert duplicate.RetrieveURL.endswith(f"/instances/{first.SOPInstanceUID}")
    assert new.ReferencedSOPInstanceUID == second.SOPInstanceUID
    assert "WarningReason" not in new
    (failed,) = result.FailedSOPSequence
    assert failed.FailureReason == 0xC000  # Status.CANNOT_UNDERSTAND
    assert "ReferencedSOPInstanceUID" not in failed
    assert failed.FailedAttributesSequence[0].ErrorComment
    assert stored_bytes(live_server, second.SOPInstanceUID) == part10(second)

    # only warnings: still 202 (PS3.18 Table 10.5.3-1)
    assert post(url, multipart(part10(second))).status_code == 202

    # nothing stored: 409, every failure listed
    response = post(url, multipart(b"junk", part10(first)[:200]))
    assert response.status_code == 409
    reasons = [i.FailureReason for i in response_dataset(response).FailedSOPSequence]
    # garbage cannot be understood; a header cut short lacks required attributes
    assert reasons == [Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS]


def test_a_data_set_sent_without_preamble_gets_one(live_server: LiveServer) -> None:
    """dicomweb-client sends an in-memory data set as pydicom writes it: File
    Meta first, no preamble and no DICM prefix.  It is stored as a Part 10
    file: the prefix, then the bytes sent, unchanged."""
    ds = ct_dataset()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    sent = buf.getvalue()
    assert not sent.startswith(b"\x00" * 128 + b"DICM")
    result = DICOMwebClient(url=live_server.root).store_instances([ds])
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert stored_bytes(live_server, ds.SOPInstanceUID) == b"\x00" * 128 + b"DICM" + sent


def test_dicomweb_client_sees_a_duplicate_as_a_warning(live_server: LiveServer) -> None:
    client = DICOMwebClient(url=live_server.root)
    ds = ct_dataset()
    client.store_instances([ds])
    result = client.store_instances([ds])  # 202: the client returns the data set
    (item,) = result.ReferencedSOPSequence
    assert item.WarningReason == 45070


def test_a_duplicate_points_at_the_copy_that_was_kept(live_server: LiveServer) -> None:
    kept = ct_dataset()
    elsewhere = ct_dataset(sop_uid=kept.SOPInstanceUID)  # same SOP, other study
    url = f"{live_server.root}/studies"
    assert post(url, multipart(part10(kept))).status_code == 200
    response = post(url, multipart(part10(elsewhere)))
    (item,) = response_dataset(response).ReferencedSOPSequence
    assert item.RetrieveURL == (
        f"{live_server.root}/studies/{kept.StudyInstanceUID}/series/"
        f"{kept.SeriesInstanceUID}/instances/{kept.SOPInstanceUID}"
    )


def test_study_uid_mismatch_refuses_only_that_instance(live_server: LiveServer) -> None:
    """PS3.18 10.5.1: to /studies/{study}, an instance of another study is
    refused (0xA901) and not stored; the others are."""
    study = generate_uid()
    ours, stranger = ct_dataset(study), ct_dataset()
    client = DICOMwebClient(url=live_server.root)
    result = client.store_instances([ours, stranger], study_instance_uid=study)
    assert result.RetrieveURL.endswith(f"/v1/studies/{study}")
    (stored,) = result.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == ours.SOPInstanceUID
    (failed,) = result.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == stranger.SOPInstanceUID
    assert failed.ReferencedSOPClassUID == CT_IMAGE
    assert failed.FailureReason == 0xA901  # Status.STUDY_INSTANCE_UID_MISMATCH
    assert live_server.services.index.find_instance(stranger.SOPInstanceUID) is None
    assert stored_bytes(live_server, ours.SOPInstanceUID) is not None

    # all of another study: 409
    response = post(f"{live_server.root}/studies/{study}", multipart(part10(ct_dataset())))
    assert response.status_code == 409
    (failed,) = response_dataset(response).FailedSOPSequence
    assert failed.FailureReason == 0xA901


def test_single_part_application_dicom(live_server: LiveServer) -> None:
    ds = ct_dataset()
    data = part10(ds)
    response = post(f"{live_server.root}/studies", data, "application/dicom")
    assert response.status_code == 200
    assert response_dataset(response).ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        ds.SOPInstanceUID
    )
    assert stored_bytes(live_server, ds.SOPInstanceUID) == data


@pytest.mark.parametrize(
    "content_type",
    [
        f"multipart/related; type=application/dicom; boundary={BOUNDARY}",  # bare, as many send
        f'Multipart/Related; boundary="{BOUNDARY}"',  # no type, quoted boundary
        f'multipart/related; boundary={BOUNDARY}; type="application/dicom"; start="<a>"',
    ],
)
def test_content_type_variants_and_untyped_parts(
    live_server: LiveServer, content_type: str
) -> None:
    body = b"a preamble, ignored (RFC 2046 5.1.1)\r\n" + multipart(
        part10(ct_dataset()), part_type=None
    )
    response = post(f"{live_server.root}/studies", body, content_type)
    assert response.status_code == 200, response.text


def test_storage_failure_of_every_instance_is_503(live_server: LiveServer) -> None:
    class BrokenStore:
        def put(self, source: object) -> BlobInfo:
            raise StorageError("the disk went away")

    ingest = live_server.services.ingest
    working = ingest.storage
    ingest.storage = BrokenStore()  # type: ignore[assignment]
    try:
        response = post(f"{live_server.root}/studies", multipart(part10(ct_dataset())))
    finally:
        ingest.storage = working
    assert response.status_code == 503
    (failed,) = response_dataset(response).FailedSOPSequence
    assert failed.FailureReason == Status.PROCESSING_FAILURE


# -------------------------------------------------------------- bad requests


def test_a_truncated_or_foreign_part_fails_alone(live_server: LiveServer) -> None:
    good, cut = ct_dataset(), ct_dataset()
    cut.PixelData = b"\x00" * 4096
    cut.Rows, cut.Columns, cut.BitsAllocated = 64, 32, 16
    body = multipart(part10(good), part10(cut)[:150], b"\x00" * 132 + b"DICM")
    response = post(f"{live_server.root}/studies", body)
    assert response.status_code == 202
    result = response_dataset(response)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [
        good.SOPInstanceUID
    ]
    reasons = [i.FailureReason for i in result.FailedSOPSequence]
    assert len(reasons) == 2
    assert set(reasons) <= {Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS}
    assert live_server.services.index.find_instance(cut.SOPInstanceUID) is None

    # a part whose own Content-Type is not application/dicom
    body = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nhello\r\n".encode() + multipart(
        part10(ct_dataset())
    )
    response = post(f"{live_server.root}/studies", body)
    assert response.status_code == 202
    (failed,) = response_dataset(response).FailedSOPSequence
    assert failed.FailureReason == Status.CANNOT_UNDERSTAND
    assert_still_serving(live_server)


def _bad_requests() -> list[tuple[str, bytes, str | None, int, str]]:
    ok = multipart(part10(ct_dataset()))
    return [
        ("missing boundary", ok, 'multipart/related; type="application/dicom"', 400, "boundary"),
        ("wrong boundary", ok, "multipart/related; boundary=another-one", 400, "boundary"),
        ("invalid boundary", ok, 'multipart/related; boundary="a\x01b"', 400, "boundary"),
        ("truncated multipart", ok[:-60], MULTIPART, 400, "close delimiter"),
        ("no close delimiter", ok[: ok.rindex(b"--" + BOUNDARY.encode())], MULTIPART, 400, ""),
        ("no parts", f"--{BOUNDARY}--\r\n".encode(), MULTIPART, 400, "no part"),
        ("empty body", b"", MULTIPART, 400, "no body"),
        ("empty application/dicom", b"", "application/dicom", 400, "no body"),
        ("garbage in the headers", f"--{BOUNDARY}\r\n\x00\r\n".encode(), MULTIPART, 400, ""),
        ("text/plain", b"hello", "text/plain", 415, "text/plain"),
        ("no Content-Type", ok, None, 415, "Content-Type"),
        ("multipart/form-data", ok, f"multipart/form-data; boundary={BOUNDARY}", 415, ""),
        (
            "metadata + bulk data (JSON)",
            ok,
            f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
            415,
            "metadata",
        ),
        ("metadata (XML)", b"<x/>", "application/dicom+xml", 415, "metadata"),
        ("unparseable Content-Type", ok, "multipart/related; boundary", 400, "Content-Type"),
    ]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [case[1:] for case in _bad_requests()],
    ids=[case[0] for case in _bad_requests()],
)
def test_malformed_requests(
    live_server: LiveServer, body: bytes, content_type: str | None, status: int, words: str
) -> None:
    response = post(f"{live_server.root}/studies", body, content_type)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["status"] == status
    assert words in error["error"]
    assert "Traceback" not in response.text
    assert_still_serving(live_server)


def test_a_defect_after_complete_parts_keeps_them_and_says_so(live_server: LiveServer) -> None:
    first, second = ct_dataset(), ct_dataset()
    body = multipart(part10(first), part10(second))
    response = post(f"{live_server.root}/studies", body[:-100])  # cut inside the second
    assert response.status_code == 400
    assert "1 instance(s)" in response.json()["error"]
    assert stored_bytes(live_server, first.SOPInstanceUID) == part10(first)
    assert live_server.services.index.find_instance(second.SOPInstanceUID) is None


@pytest.mark.parametrize(
    "path", ["..%2F..%2Fetc", "1.2.3%00", "1.2.3%2F4", "1" * 65, "1.02.3", "abc", "1.2.3%20"]
)
def test_a_bad_study_uid_in_the_url_is_400_before_the_body(
    live_server: LiveServer, path: str
) -> None:
    ds = ct_dataset()
    response = post(f"{live_server.root}/studies/{path}", multipart(part10(ds)))
    assert response.status_code == 400
    assert "UID" in response.json()["error"]
    assert live_server.services.index.find_instance(ds.SOPInstanceUID) is None
    assert_still_serving(live_server)


def test_store_below_a_study_is_not_a_route(live_server: LiveServer) -> None:
    """PS3.18 Table 10.3-2: Store targets only All Studies and Study."""
    ds = ct_dataset()
    url = f"{live_server.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    response = post(url, multipart(part10(ds)))
    assert response.status_code in (404, 405)
    assert live_server.services.index.find_instance(ds.SOPInstanceUID) is None


def test_a_response_only_in_xml_is_not_acceptable(live_server: LiveServer) -> None:
    response = post(
        f"{live_server.root}/studies",
        multipart(part10(ct_dataset())),
        Accept="application/dicom+xml",
    )
    assert response.status_code == 406
    ok = post(
        f"{live_server.root}/studies",
        multipart(part10(ct_dataset())),
        Accept="application/dicom+json, application/dicom+xml;q=0.5",
    )
    assert ok.status_code == 200
    assert ok.headers["Content-Type"] == "application/dicom+json"
    plain = post(
        f"{live_server.root}/studies", multipart(part10(ct_dataset())), Accept="application/json"
    )
    assert plain.status_code == 200
    assert plain.headers["Content-Type"] == "application/json"
    assert "00081199" in plain.json()


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A server whose body limit is 1 MiB."""
    yield from started_server(make_config(tmp_path, APPLIANCE_HTTP_MAX_REQUEST_MB="1"))


def test_a_body_over_the_limit_is_413(small_server: LiveServer) -> None:
    url = f"{small_server.root}/studies"
    big = ct_dataset()
    big.add_new(0x7FE00010, "OB", b"\x00" * (2 * 1024 * 1024))
    data = multipart(part10(big))

    # declared up front: refused before reading
    response = post(url, data)
    assert response.status_code == 413
    assert "max_request_mb" in response.json()["error"]

    # streamed without a length: refused once the bytes read pass the limit
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    response = post(url, chunks())
    assert response.status_code == 413
    assert small_server.services.index.find_instance(big.SOPInstanceUID) is None

    # under the limit still works
    assert post(url, multipart(part10(ct_dataset()))).status_code == 200
    assert_still_serving(small_server)


# ------------------------------------------- the reader on its own (chunking)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_reader_finds_boundaries_across_any_chunking(chunk_size: int) -> None:
    contents = [b"", b"\r\n--" + BOUNDARY[:-1].encode() + b"\r\n", b"x" * 10_000, b"\r\n"]
    body = multipart(*contents)
    reader = MultipartReader(
        LimitedReader(io.BytesIO(body), None), BOUNDARY, chunk_size=chunk_size, spool_max=100
    )
    with reader:
        got = [(part.number, part.header("CONTENT-TYPE"), part.body.read()) for part in reader]
    assert got == [(i + 1, "application/dicom", data) for i, data in enumerate(contents)]
    assert reader.bytes_read == len(body)


def test_reader_refuses_a_body_cut_in_a_part() -> None:
    body = multipart(b"one", b"two")[:-20]
    with (
        MultipartReader(LimitedReader(io.BytesIO(body), None), BOUNDARY) as reader,
        pytest.raises(MultipartError, match="close delimiter"),
    ):
        assert [part.body.read() for part in reader] == [b"one"]


# ------------------------------------------------------------ a big upload


def _peak_rss_reset() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.slow
def test_a_300_mb_upload_is_streamed(live_server: LiveServer) -> None:
    """300 MB generated on the fly, sent chunked: the server (in this very
    process) must not hold it in memory."""
    size = 300 * 1024 * 1024
    ds = ct_dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated = 1, 1, 8
    header = part10(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
    digest = hashlib.sha256()
    block = bytes(range(256)) * 4096  # 1 MiB

    def body() -> Iterator[bytes]:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        digest.update(header)
        yield header
        for i in range(size // len(block)):
            chunk = i.to_bytes(4, "big") + block[4:]
            digest.update(chunk)
            yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    if not _peak_rss_reset():
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    started = time.monotonic()
    response = post(f"{live_server.root}/studies", body())
    elapsed = time.monotonic() - started
    growth_mib = (_status_kib("VmHWM") - before) / 1024
    print(f"\n300 MB STOW-RS: {elapsed:.1f} s, peak RSS growth {growth_mib:.1f} MiB")
    assert response.status_code == 200, response.text
    assert growth_mib < 100

    found = live_server.services.index.find_instance(ds.SOPInstanceUID)
    assert found is not None
    assert found.size == len(header) + size
    stored = hashlib.sha256()
    with live_server.services.storage.open(found.blob_key) as fh:
        while chunk := fh.read(1024 * 1024):
            stored.update(chunk)
    assert stored.hexdigest() == digest.hexdigest()


def test_requests_session_of_dicomweb_client_reads_a_409(live_server: LiveServer) -> None:
    """dicomweb-client raises on 409 (nothing stored); the body is still the
    response module."""
    client = DICOMwebClient(url=live_server.root)
    with pytest.raises(requests.HTTPError) as caught:
        client.store_instances([ct_dataset()], study_instance_uid=generate_uid())
    assert caught.value.response is not None
    assert caught.value.response.status_code == 409
    failed = Dataset.from_json(caught.value.response.json()).FailedSOPSequence
    assert failed[0].FailureReason == 0xA901


def test_the_instances_of_a_request_are_indexed_in_one_transaction(
    live_server: LiveServer,
) -> None:
    """Group commit: the 60 instances of one request take two index
    transactions (batches of COMMIT_BATCH = 50), not 60; a series already in
    another study refuses its instance alone (the batch is then indexed one
    instance at a time); the same instance twice in one request is stored
    once and reported as a duplicate."""
    from sqlalchemy import event

    from dicomweb.views.stow import COMMIT_BATCH

    assert COMMIT_BATCH == 50
    study = generate_uid()
    instances = [ct_dataset(study) for _ in range(60)]
    engine = live_server.services.engine
    commits: list[int] = []

    def count(_conn: Any) -> None:
        commits.append(1)

    event.listen(engine, "commit", count)
    try:
        response = post(f"{live_server.root}/studies", multipart(*map(part10, instances)))
    finally:
        event.remove(engine, "commit", count)
    assert response.status_code == 200
    assert len(response_dataset(response).ReferencedSOPSequence) == 60
    assert len(commits) == 2
    for ds in instances[::7]:
        assert stored_bytes(live_server, ds.SOPInstanceUID) == part10(ds)

    # a series that belongs to another study, beside two good instances and
    # one sent twice
    other_study = ct_dataset()
    stolen = ct_dataset(other_study.StudyInstanceUID)
    stolen.SeriesInstanceUID = instances[0].SeriesInstanceUID
    good, twice = ct_dataset(study), ct_dataset(study)
    parts = [part10(good), part10(stolen), part10(twice), part10(twice)]
    response = post(f"{live_server.root}/studies", multipart(*parts))
    assert response.status_code == 202
    result = response_dataset(response)
    referenced = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
    assert referenced == [good.SOPInstanceUID, twice.SOPInstanceUID, twice.SOPInstanceUID]
    assert [getattr(i, "WarningReason", None) for i in result.ReferencedSOPSequence] == [
        None,
        None,
        0xB00E,  # the second copy: Status.DUPLICATE_INSTANCE_KEPT
    ]
    (failed,) = result.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == stolen.SOPInstanceUID
    assert failed.FailureReason == 0xA900  # Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    for ds in (good, twice):
        assert stored_bytes(live_server, ds.SOPInstanceUID) == part10(ds)
    # no blob is left without its row: one blob per instance stored
    blobs = [p for p in live_server.config.storage.path.rglob("*") if p.is_file()]
    assert len(blobs) == 62
