"""WADO-RS retrieve, metadata and bulk data against a live server: pydicom's
own test files in every transfer syntax they come in, read back with
dicomweb-client and raw HTTP."""

from __future__ import annotations

import base64
import dataclasses
import gc
import io
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.model import Origin
from appliance.status import Status
from dicomweb.views.wado import can_decode
from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import multipart

pytestmark = [
    pytest.mark.integration,
    # pydicom's words on the corpus' deliberately broken files
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:No bulk data URI handler:UserWarning"),
]

DATA = Path(pydicom.__file__).parent / "data"
CORPUS = sorted((DATA / "test_files").rglob("*.dcm")) + sorted(
    (DATA / "charset_files").glob("*.dcm")
)
ELE = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
NATIVE = {ELE, IMPLICIT, BIG_ENDIAN, DEFLATED}


@dataclasses.dataclass(frozen=True)
class Stored:
    name: str
    data: bytes  # exactly what was stored
    study: str
    series: str
    sop: str
    syntax: str

    def url(self, root: str) -> str:
        return f"{root}/studies/{self.study}/series/{self.series}/instances/{self.sop}"


@dataclasses.dataclass
class Corpus:
    server: LiveServer
    stored: list[Stored]

    def by_name(self, name: str) -> Stored:
        return next(s for s in self.stored if s.name == name)

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.server.root)


def read(source: Path | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)


def decoded(ds: Dataset) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def decoded_or_none(ds: Dataset) -> Any:
    try:
        return decoded(ds)
    except Exception:  # noqa: BLE001 - any decoder failure
        return None


def store_bytes(server: LiveServer, data: bytes) -> Status:
    return server.services.ingest.store_part10(io.BytesIO(data), Origin("import")).status


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """One server for the module, holding every corpus file the ingest takes;
    a file whose SOP Instance UID another file already has (pydicom ships
    one image in several transfer syntaxes) is stored under new UIDs."""
    tmp = tmp_path_factory.mktemp("wado")
    config = make_config(tmp)
    for server in started_server(config):
        stored: list[Stored] = []
        for path in CORPUS:
            data = path.read_bytes()
            ingest = server.services.ingest
            result = ingest.store_part10(io.BytesIO(data), Origin("import"))
            if result.status is Status.DUPLICATE_INSTANCE_KEPT:
                data = with_new_uids(data)
                result = ingest.store_part10(io.BytesIO(data), Origin("import"))
            if result.status is not Status.SUCCESS:
                continue  # not a file the ingest takes
            stored.append(
                Stored(
                    path.name,
                    data,
                    result.study_instance_uid,
                    result.series_instance_uid,
                    result.sop_instance_uid,
                    str(read(data).file_meta.TransferSyntaxUID),
                )
            )
        yield Corpus(server, stored)


def with_new_uids(data: bytes) -> bytes:
    ds = read(data)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


# ------------------------------------------------------------------- retrieve


def test_as_stored_is_the_stored_file_byte_for_byte(corpus: Corpus) -> None:
    root = corpus.server.root
    kinds = {s.syntax for s in corpus.stored}
    assert {ELE, IMPLICIT, BIG_ENDIAN, DEFLATED, RLE, JPEG_LS_LOSSLESS} <= kinds
    assert len(kinds) >= 10
    with httpx.Client(timeout=30) as http:
        for item in corpus.stored:
            r = http.get(item.url(root), headers={"Accept": DICOM_ANY})
            assert r.status_code == 200, (item.name, r.text)
            [(headers, content)] = multipart(r)
            assert headers["content-location"] == item.url(root)
            original = item.data
            if item.syntax in NATIVE - {ELE, DEFLATED}:
                # PS3.18 8.7.3: never sent Implicit VR or Big Endian
                assert headers["content-type"] == f"application/dicom; transfer-syntax={ELE}"
                ds = read(content)
                assert ds.file_meta.TransferSyntaxUID == ELE
                assert ds.SOPInstanceUID == item.sop
                if "PixelData" in ds:
                    assert np.array_equal(decoded(ds), decoded(read(original))), item.name
                continue
            assert headers["content-type"] == f"application/dicom; transfer-syntax={item.syntax}"
            assert int(headers["content-length"]) == len(original)
            assert content == original, item.name


def test_dicomweb_client_retrieve_instance_as_stored(corpus: Corpus) -> None:
    client = corpus.client()
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "chrH31.dcm"):
        item = corpus.by_name(name)
        ds = client.retrieve_instance(
            item.study, item.series, item.sop, media_types=(("application/dicom", "*"),)
        )
        original = read(item.data)
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == item.syntax
        assert ds.PixelData == original.PixelData


def test_default_syntax_is_explicit_vr_little_endian_decoded(corpus: Corpus) -> None:
    """PS3.18 8.7.3.4: no transfer-syntax means Explicit VR Little Endian;
    compressed instances are decoded to pixels equal to pydicom's own decode
    of the stored file (the same decoders, so lossy JPEG compares equal)."""
    client = corpus.client()
    seen: set[str] = set()
    for item in corpus.stored:
        if item.syntax in seen or item.syntax == ELE:
            continue
        original = read(item.data)
        if "PixelData" not in original:
            continue
        expected = decoded_or_none(original)
        if expected is None:
            continue  # pydicom cannot decode it either
        seen.add(item.syntax)
        ds = client.retrieve_instance(
            item.study, item.series, item.sop, media_types=("application/dicom",)
        )
        assert ds.file_meta.TransferSyntaxUID == ELE, item.name
        assert ds.SOPInstanceUID == item.sop
        assert np.array_equal(decoded(ds), expected), item.name
    assert len(seen) >= 9, seen


def test_default_falls_back_to_stored_form_when_it_cannot_be_decoded(corpus: Corpus) -> None:
    """PS3.18 8.7.3.4: a server with only a compressed form it cannot decode
    may send that form."""
    item = corpus.by_name("JPEG-lossy.dcm")  # pydicom's decoders refuse this one
    r = httpx.get(item.url(corpus.server.root), headers={"Accept": "*/*"})
    assert r.status_code == 200
    [(headers, content)] = multipart(r)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={item.syntax}"
    assert content == item.data
    # explicitly asking for Explicit VR Little Endian is refused
    r = httpx.get(
        item.url(corpus.server.root),
        headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ELE}'},
    )
    assert r.status_code == 406
    assert "Traceback" not in r.text


def test_transcode_to_rle_and_deflate(corpus: Corpus) -> None:
    root = corpus.server.root
    item = corpus.by_name("CT_small.dcm")
    original = decoded(read(item.data))
    for syntax in (RLE, DEFLATED):
        accept = f"multipart/related; type=application/dicom; transfer-syntax={syntax}"
        r = httpx.get(item.url(root), headers={"Accept": accept})
        assert r.status_code == 200, r.text
        [(headers, content)] = multipart(r)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"
        ds = read(content)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.SOPInstanceUID == item.sop
        assert np.array_equal(decoded(ds), original)


def test_accept_q_values_pick_the_first_acceptable(corpus: Corpus) -> None:
    root = corpus.server.root
    item = corpus.by_name("MR_small_RLE.dcm")
    # q order, not written order: "*" (q=1) beats Explicit VR LE (q=0.5)
    accept = (
        f'multipart/related; type="application/dicom"; transfer-syntax={ELE}; q=0.5, '
        'multipart/related; type="application/dicom"; transfer-syntax=*'
    )
    [(headers, content)] = multipart(httpx.get(item.url(root), headers={"Accept": accept}))
    assert headers["content-type"].endswith(f"transfer-syntax={RLE}")
    assert content == item.data
    # an unproducible first choice (JPEG-LS: no encoder) falls to the next
    plain = corpus.by_name("CT_small.dcm")
    accept = (
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_LS_LOSSLESS}, '
        f'multipart/related; type="application/dicom"; transfer-syntax={ELE}; q=0.8'
    )
    [(headers, content)] = multipart(httpx.get(plain.url(root), headers={"Accept": accept}))
    assert headers["content-type"].endswith(f"transfer-syntax={ELE}")
    assert content == plain.data


def test_not_acceptable(corpus: Corpus) -> None:
    root = corpus.server.root
    item = corpus.by_name("CT_small.dcm")
    for accept in (
        # no JPEG-LS encoder; lossy JPEG is never produced
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_LS_LOSSLESS}',
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
        # PS3.18 8.7.3: never sent
        f'multipart/related; type="application/dicom"; transfer-syntax={IMPLICIT}',
        "image/jpeg",
        'multipart/related; type="application/dicom+xml"',
    ):
        r = httpx.get(item.url(root), headers={"Accept": accept})
        assert r.status_code == 406, accept
        assert r.headers["content-type"].startswith("application/json")
        assert "supported" in r.json()["error"]
    # one instance of the study that cannot be made so refuses the study
    lossy = corpus.by_name("SC_rgb_jpeg.dcm")
    r = httpx.get(
        f"{root}/studies/{lossy.study}",
        headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={RLE}'},
    )
    assert r.status_code == 406


def test_single_part_application_dicom_for_one_instance(corpus: Corpus) -> None:
    root = corpus.server.root
    item = corpus.by_name("MR_small_RLE.dcm")
    r = httpx.get(item.url(root), headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert r.status_code == 200
    assert r.headers["content-type"] == f"application/dicom; transfer-syntax={RLE}"
    assert r.content == item.data
    # a study is several parts: only multipart will do
    r = httpx.get(f"{root}/studies/{item.study}", headers={"Accept": "application/dicom"})
    assert r.status_code == 406


def ct_instance(study: str, series: str, series_number: int, number: int) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = series_number
    ds.InstanceNumber = number
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.PixelData = bytes([number]) * 16
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_retrieve_study_and_series_count_and_order(live_server: LiveServer) -> None:
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    order = [(second, 2, 3), (first, 1, 2), (second, 2, 1), (first, 1, 1), (second, 2, 2)]
    for series, series_number, number in order:
        data = ct_instance(study, series, series_number, number)
        assert store_bytes(live_server, data) is Status.SUCCESS
    client = DICOMwebClient(url=live_server.root)
    instances = client.retrieve_study(study)
    assert [(d.SeriesNumber, d.InstanceNumber) for d in instances] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
        (2, 3),
    ]
    assert all(d.file_meta.TransferSyntaxUID == ELE for d in instances)
    in_series = client.retrieve_series(study, second)
    assert [d.InstanceNumber for d in in_series] == [1, 2, 3]
    assert [d.InstanceNumber for d in client.iter_series(study, first)] == [1, 2]


# ------------------------------------------------------------------- metadata


def instance_metadata(server: LiveServer, url: str) -> dict[str, Any]:
    """An instance's metadata over plain HTTP.  dicomweb-client 0.61 sends
    ``Host`` without the port, and BulkDataURIs are built from ``Host``."""
    r = httpx.get(f"{url}/metadata", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    [obj] = r.json()
    return obj  # type: ignore[no-any-return]


def check_json_model(obj: dict[str, Any]) -> None:
    """PS3.18 F.2: tags as 8 hex digits in order, each value object with a
    vr and at most one of Value, BulkDataURI, InlineBinary."""
    keys = list(obj)
    assert keys == sorted(keys)
    for key, value in obj.items():
        assert len(key) == 8
        assert key == key.upper()
        assert int(key, 16) >= 0
        assert isinstance(value["vr"], str)
        assert len(value["vr"]) == 2
        assert len({"Value", "BulkDataURI", "InlineBinary"} & set(value)) <= 1
        assert not key.endswith("0000"), "no group length"
        if value["vr"] == "SQ":
            for item in value.get("Value", []):
                check_json_model(item)


def test_metadata_person_names_and_charset(corpus: Corpus) -> None:
    client = corpus.client()
    item = corpus.by_name("chrH31.dcm")
    obj = client.retrieve_instance_metadata(item.study, item.series, item.sop)
    assert obj == instance_metadata(corpus.server, item.url(corpus.server.root)) | {
        "7FE00010": obj["7FE00010"]
    }
    obj = instance_metadata(corpus.server, item.url(corpus.server.root))
    check_json_model(obj)
    assert obj["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    original = read(item.data)
    [name] = obj["00100010"]["Value"]
    assert obj["00100010"]["vr"] == "PN"
    assert name["Alphabetic"] == original.PatientName.alphabetic == "Yamada^Tarou"
    assert name["Ideographic"] == original.PatientName.ideographic == "山田^太郎"
    assert name["Phonetic"] == "やまだ^たろう"
    # pixel data is never inline
    assert "InlineBinary" not in obj["7FE00010"]
    assert obj["7FE00010"]["BulkDataURI"] == f"{item.url(corpus.server.root)}/bulk/7FE00010"
    # the client reads the JSON back into a data set with the same values
    ds = Dataset.from_json(obj)
    assert ds.SOPInstanceUID == item.sop
    assert ds.PatientName == original.PatientName


def test_metadata_of_series_and_study(corpus: Corpus) -> None:
    client = corpus.client()
    item = corpus.by_name("CT_small.dcm")
    for objects in (
        client.retrieve_series_metadata(item.study, item.series),
        client.retrieve_study_metadata(item.study),
    ):
        assert [o["00080018"]["Value"][0] for o in objects] == [item.sop]
    r = httpx.get(f"{corpus.server.root}/studies/{item.study}/metadata")
    assert r.headers["content-type"] == "application/dicom+json"
    r = httpx.get(
        f"{corpus.server.root}/studies/{item.study}/metadata",
        headers={"Accept": 'multipart/related; type="application/dicom+xml"'},
    )
    assert r.status_code == 406


def test_every_metadata_and_bulk_data_uri_resolves(corpus: Corpus) -> None:
    """Each BulkDataURI of each instance's metadata fetches the value: the
    original's bytes for native values, the original's frames as stored
    with transfer-syntax=*, and decoded pixels by default."""
    client = corpus.client()
    root = corpus.server.root
    uris = 0
    for item in corpus.stored:
        obj = instance_metadata(corpus.server, item.url(root))
        check_json_model(obj)
        original = read(item.data)
        for key, value in obj.items():
            if "InlineBinary" in value and item.syntax != BIG_ENDIAN:
                expected = original[int(key, 16)].value
                if not isinstance(expected, bytes):
                    # a value pydicom cannot read as its VR goes as UN bytes
                    assert value["vr"] == "UN"
                    continue
                assert len(expected) <= 1024
                assert base64.b64decode(value["InlineBinary"]) == expected
            if "BulkDataURI" not in value:
                continue
            uris += 1
            uri = value["BulkDataURI"]
            assert uri.startswith(f"{item.url(root)}/bulk/")
            tag = int(key, 16)
            encapsulated = item.syntax not in NATIVE and tag == 0x7FE00010
            if not encapsulated:
                [data] = client.retrieve_bulkdata(uri)
                if item.syntax != BIG_ENDIAN:
                    assert data == original[tag].value, (item.name, key)
                continue
            frames = client.retrieve_bulkdata(uri, media_types=(("application/octet-stream", "*"),))
            count = int(original.get("NumberOfFrames") or 1)
            assert frames == list(generate_frames(original.PixelData, number_of_frames=count))
    assert uris >= len(corpus.stored) // 2


def test_bulk_pixel_data_decoded_and_big_endian(corpus: Corpus) -> None:
    client = corpus.client()
    root = corpus.server.root
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"):
        item = corpus.by_name(name)
        [data] = client.retrieve_bulkdata(f"{item.url(root)}/bulk/7FE00010")
        expected = decoded(read(item.data))
        native = expected.astype(expected.dtype.newbyteorder("<")).tobytes()
        assert data == native, name
        # single part on request
        r = httpx.get(
            f"{item.url(root)}/bulk/7FE00010", headers={"Accept": "application/octet-stream"}
        )
        assert r.headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
        assert r.content == native


def test_nested_bulk_data(live_server: LiveServer) -> None:
    """A large binary value inside a sequence gets a tag-path URI."""
    ds = read(ct_instance(generate_uid(), generate_uid(), 1, 1))
    item = Dataset()
    blob = bytes(range(256)) * 20
    item.add_new(0x00091010, "OB", blob)  # private, unknown to any dictionary
    item.add_new(0x00090010, "LO", "TEST CREATOR")
    small = Dataset()
    small.add_new(0x00091011, "OB", b"\x01\x02")
    small.add_new(0x00090010, "LO", "TEST CREATOR")
    ds.add_new(0x00089215, "SQ", [small, item])
    ds.add_new(0x00191010, "OB", blob)  # top level, deferred by the reader
    ds.add_new(0x00190010, "LO", "TEST CREATOR")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert store_bytes(live_server, buf.getvalue()) is Status.SUCCESS
    client = DICOMwebClient(url=live_server.root)
    root = live_server.root
    obj = instance_metadata(
        live_server,
        f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}",
    )
    items = obj["00089215"]["Value"]
    assert base64.b64decode(items[0]["00091011"]["InlineBinary"]) == b"\x01\x02"
    nested = items[1]["00091010"]["BulkDataURI"]
    assert nested.endswith("/bulk/00089215.1.00091010")
    assert client.retrieve_bulkdata(nested) == [blob]
    assert client.retrieve_bulkdata(obj["00191010"]["BulkDataURI"]) == [blob]
    base = nested.rsplit("/", 1)[0]
    assert httpx.get(f"{base}/00089215.5.00091010").status_code == 404
    assert httpx.get(f"{base}/00100010").status_code == 404  # not bulk data
    assert httpx.get(f"{base}/7FE0").status_code == 400
    assert httpx.get(f"{base}/00089215.x.00091010").status_code == 400


# -------------------------------------------------------------------- caching


def test_etag_and_last_modified(live_server: LiveServer) -> None:
    study, series = generate_uid(), generate_uid()
    assert store_bytes(live_server, ct_instance(study, series, 1, 1)) is Status.SUCCESS
    root = live_server.root
    with httpx.Client() as http:
        for url in (f"{root}/studies/{study}", f"{root}/studies/{study}/metadata"):
            r = http.get(url)
            assert r.status_code == 200
            etag, modified = r.headers["etag"], r.headers["last-modified"]
            assert etag.startswith('"')
            assert not etag.startswith("W/")
            assert "accept" in r.headers["vary"].lower()
            again = http.get(url, headers={"If-None-Match": etag})
            assert again.status_code == 304
            assert again.content == b""
            assert again.headers["etag"] == etag
            assert http.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
            assert http.get(url, headers={"If-Modified-Since": modified}).status_code == 304
        # another representation is another entity
        as_stored = http.get(f"{root}/studies/{study}", headers={"Accept": DICOM_ANY})
        first = http.get(f"{root}/studies/{study}")
        assert as_stored.headers["etag"] != first.headers["etag"]
        # a new instance changes the study
        assert store_bytes(live_server, ct_instance(study, series, 1, 2)) is Status.SUCCESS
        r = http.get(f"{root}/studies/{study}", headers={"If-None-Match": first.headers["etag"]})
        assert r.status_code == 200
        assert len(multipart(r)) == 2


# --------------------------------------------------------------------- errors


def test_unknown_and_malformed_uids(corpus: Corpus) -> None:
    root = corpus.server.root
    item = corpus.by_name("CT_small.dcm")
    unknown = generate_uid()
    for url in (
        f"{root}/studies/{unknown}",
        f"{root}/studies/{item.study}/series/{unknown}",
        f"{root}/studies/{item.study}/series/{item.series}/instances/{unknown}",
        f"{root}/studies/{unknown}/metadata",
        f"{root}/studies/{item.study}/series/{unknown}/metadata",
        f"{root}/studies/{item.study}/series/{item.series}/instances/{unknown}/metadata",
        f"{root}/studies/{item.study}/series/{item.series}/instances/{unknown}/bulk/7FE00010",
    ):
        r = httpx.get(url)
        assert r.status_code == 404, url
        assert "Traceback" not in r.text
    too_long = "1." + "2" * 63
    for bad in ("..%2F..", "1.2%00", too_long, "1.02.3", "abc"):
        for url in (
            f"{root}/studies/{bad}",
            f"{root}/studies/{bad}/metadata",
            f"{root}/studies/{item.study}/series/{bad}",
            f"{root}/studies/{item.study}/series/{item.series}/instances/{bad}",
            f"{root}/studies/{item.study}/series/{item.series}/instances/{bad}/bulk/7FE00010",
        ):
            r = httpx.get(url)
            assert r.status_code == 400, url
            assert "Traceback" not in r.text


# ----------------------------------------------------------- memory (slow)


def big_instance(path: Path, study: str, series: str, number: int, size: int) -> None:
    """A Part 10 file with *size* bytes of pixel data, written in chunks."""
    ds = read(ct_instance(study, series, 1, number))
    del ds.PixelData
    side = int((size // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    length = side * side * 2
    with path.open("wb") as fh:
        fh.write(buf.getvalue())
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        chunk = bytes(range(256)) * 4096
        left = length
        while left:
            fh.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples this process's resident memory every 10 ms while in use."""

    def __init__(self) -> None:
        self.baseline = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_streamed_retrieve_of_a_200_mb_study(tmp_path: Path) -> None:
    """Four 50 MB instances stream through without the server (in this
    process) holding them: resident memory grows by far less than 100 MB."""
    config = make_config(tmp_path)
    study, series = generate_uid(), generate_uid()
    size = 50 * 1024 * 1024
    for server in started_server(config):
        for number in range(1, 5):
            path = tmp_path / f"big{number}.dcm"
            big_instance(path, study, series, number, size)
            with path.open("rb") as fh:
                result = server.services.ingest.store_part10(fh, Origin("import"))
            assert result.status is Status.SUCCESS
            path.unlink()
        gc.collect()
        with PeakRss() as peak:
            received = 0
            with (
                httpx.Client(timeout=60) as http,
                http.stream("GET", f"{server.root}/studies/{study}") as r,
            ):
                assert r.status_code == 200
                for chunk in r.iter_bytes(1024 * 1024):
                    received += len(chunk)
        assert received > 4 * size
        growth = peak.growth
        print(f"RSS growth during a {received / 2**20:.0f} MiB retrieve: {growth / 2**20:.1f} MiB")
        assert growth < 100 * 1024 * 1024


def test_can_decode_reports_the_installed_decoders() -> None:
    assert can_decode(ELE)
    assert can_decode(BIG_ENDIAN)
    assert can_decode("1.2.840.10008.1.2.4.50")  # pylibjpeg-libjpeg
    assert not can_decode("1.2.840.10008.1.2.4.100")  # MPEG-2: no decoder
