"""WADO-RS frames, rendered and thumbnail resources against a live server:
pydicom's own test files (native little and big endian, deflated, 1-bit,
palette, RGB, YBR, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
RLE) plus a few generated ones, read back with dicomweb-client and raw
HTTP and compared with what pydicom makes of the stored bytes."""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from appliance.model import Origin
from appliance.status import Status
from tests.conftest import LiveServer, make_config, started_server
from tests.helpers import multipart

pytestmark = pytest.mark.integration

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ELE = "1.2.840.10008.1.2.1"
OCTET = 'multipart/related; type="application/octet-stream"'
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81"}

#: The bundled files served here; the comment says what each one covers.
NAMES = [
    "CT_small.dcm",  # 16-bit signed, explicit LE
    "MR_small.dcm",  # window in the data set
    "rtdose.dcm",  # 15 frames, 32-bit, implicit LE
    "rtdose_expb.dcm",  # 15 frames, 32-bit, big endian
    "MR_small_bigendian.dcm",  # 16-bit big endian
    "ExplVR_BigEnd.dcm",  # RGB 8-bit OB big endian, planar
    "SC_rgb_small_odd_big_endian.dcm",  # 8-bit in OW, odd length, big endian
    "examples_rgb_color.dcm",  # RGB
    "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
    "examples_palette.dcm",  # PALETTE COLOR
    "liver_1frame.dcm",  # 1 bit allocated
    "image_dfl.dcm",  # deflated
    "SC_rgb_jpeg.dcm",  # implicit VR under an explicit transfer syntax
    "examples_ybr_color.dcm",  # JPEG baseline, 30 frames, YBR_FULL_422
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline YBR_FULL
    "JPGExtended.dcm",  # JPEG extended 12-bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEG2000.dcm",  # JPEG 2000, 1024 x 256
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 YBR_RCT
    "SC_rgb_rle_2frame.dcm",  # RLE, 2 frames RGB
    "rtdose_rle.dcm",  # RLE, 15 frames 32-bit
    "MR_small_RLE.dcm",  # RLE 16-bit
    "MR_truncated.dcm",  # pixel data cut short
    "rtplan.dcm",  # no pixel data
]


@dataclasses.dataclass(frozen=True)
class Stored:
    name: str
    data: bytes  # exactly what was stored
    study: str
    series: str
    sop: str

    @property
    def ds(self) -> Dataset:
        return read(self.data)

    @property
    def syntax(self) -> str:
        return str(self.ds.file_meta.TransferSyntaxUID)

    def url(self, root: str) -> str:
        return f"{root}/studies/{self.study}/series/{self.series}/instances/{self.sop}"


@dataclasses.dataclass
class Corpus:
    server: LiveServer
    stored: dict[str, Stored]

    def __getitem__(self, name: str) -> Stored:
        return self.stored[name]

    def url(self, name: str) -> str:
        return self.stored[name].url(self.server.root)

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.server.root)

    def store(self, name: str, data: bytes) -> Stored:
        """Store *data*; under fresh UIDs if its SOP Instance UID is taken
        (pydicom ships one image in several transfer syntaxes) or a UID is
        missing."""
        ingest = self.server.services.ingest
        result = ingest.store_part10(io.BytesIO(data), Origin("import"))
        if result.status is not Status.SUCCESS:
            data = to_bytes(read(data))
            result = ingest.store_part10(io.BytesIO(data), Origin("import"))
        assert result.status is Status.SUCCESS, (name, result.status)
        item = Stored(
            name,
            data,
            result.study_instance_uid,
            result.series_instance_uid,
            result.sop_instance_uid,
        )
        self.stored[name] = item
        return item


def read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data))


def pixel_frames(ds: Dataset) -> Any:
    """pydicom's decode, always with a leading frame axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    return arr if frames > 1 else arr[np.newaxis]


def to_bytes(ds: Dataset, study: str | None = None, series: str | None = None) -> bytes:
    """*ds* as a Part 10 file under fresh UIDs (pydicom's files share some)."""
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def generated(
    photometric: str,
    pixels: Any,
    *,
    bits: int = 16,
    syntax: UID = ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    frames: int = 1,
    rows: int | None = None,
    columns: int | None = None,
) -> Dataset:
    """A small Secondary Capture image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.PatientName = "Frames^Test"
    ds.PatientID = "FR1"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (rows, columns) if rows else pixels.shape[-2:]
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    return ds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """One server for the module with the files of :data:`NAMES` and a few
    generated images."""
    tmp = tmp_path_factory.mktemp("frames")
    config = make_config(tmp)
    for server in started_server(config):
        corpus = Corpus(server, {})
        for name in NAMES:
            corpus.store(name, (FILES / name).read_bytes())
        _store_generated(corpus)
        yield corpus


def _store_generated(corpus: Corpus) -> None:
    ramp = np.arange(8 * 16, dtype=np.uint16).reshape(8, 16) * 100
    corpus.store("mono1", to_bytes(generated("MONOCHROME1", ramp)))
    corpus.store("mono2", to_bytes(generated("MONOCHROME2", ramp)))
    # a VOI LUT Sequence (PS3.3 C.11.2) instead of a window: 8-bit output
    # for inputs 0..4095, shifted by 4 bits
    voi = generated("MONOCHROME2", ramp)
    table = Dataset()
    table.LUTDescriptor = [4096, 0, 8]
    table.LUTData = [value >> 4 for value in range(4096)]
    table["LUTData"].VR = "US"
    voi.VOILUTSequence = [table]
    corpus.store("voi_lut", to_bytes(voi))
    # enhanced-style per-frame windows (PS3.3 C.7.6.16.2.10): two frames
    # with the same pixels, windowed differently
    enhanced = generated("MONOCHROME2", ramp, pixel_data=ramp.tobytes() * 2, frames=2)
    enhanced.PerFrameFunctionalGroupsSequence = [
        _frame_voi(100, 50),
        _frame_voi(6000, 8000),
    ]
    corpus.store("per_frame_window", to_bytes(enhanced))
    # 1 bit allocated, 3 frames of 5 x 3 = 15 bits: frames 2 and 3 start
    # inside a byte (PS3.5 8.1.1)
    bits = np.random.default_rng(7).integers(0, 2, size=(3, 5, 3), dtype=np.uint8)
    packed = np.packbits(bits.ravel(), bitorder="little").tobytes()
    packed += b"\0" * (len(packed) % 2)
    corpus.store(
        "bits1", to_bytes(generated("MONOCHROME2", bits, bits=1, pixel_data=packed, frames=3))
    )
    # the first 4 JPEG frames of examples_ybr_color: two fragments per frame
    # and no offset table, and the Extended Offset Table (PS3.3 C.7.6.3.1.8)
    source = read((FILES / "examples_ybr_color.dcm").read_bytes())
    jpeg = list(generate_frames(source.PixelData, number_of_frames=30))[:4]
    for name, pixel_data, extended in (
        ("jpeg_no_bot", encapsulate(jpeg, fragments_per_frame=2, has_bot=False), None),
        ("jpeg_eot", *_extended(jpeg)),
    ):
        ds = read((FILES / "examples_ybr_color.dcm").read_bytes())
        ds.NumberOfFrames = 4
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB"
        if extended is not None:
            ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = extended
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        corpus.store(name, to_bytes(ds))
    # a study whose first instance has no pixel data
    plan = read((FILES / "rtplan.dcm").read_bytes())
    plan.SeriesNumber = 1
    study = generate_uid()
    corpus.store("mixed_plan", to_bytes(plan, study=study))
    image = read((FILES / "CT_small.dcm").read_bytes())
    image.SeriesNumber = 2
    corpus.store("mixed_ct", to_bytes(image, study=study))


def _frame_voi(center: float, width: float) -> Dataset:
    window = Dataset()
    window.WindowCenter, window.WindowWidth = center, width
    group = Dataset()
    group.FrameVOILUTSequence = [window]
    return group


def _extended(frames: list[bytes]) -> tuple[bytes, tuple[bytes, bytes]]:
    pixel_data, offsets, lengths = encapsulate_extended(frames)
    return pixel_data, (offsets, lengths)


def expected_native(ds: Dataset, index: int) -> bytes:
    """Frame *index* of native *ds* as PS3.18 8.7.3.3.1 has it: the stored
    slice when little endian, else pydicom's decode in little endian."""
    syntax = ds.file_meta.TransferSyntaxUID
    bits = ds.BitsAllocated
    if bits == 1:
        return np.packbits(pixel_frames(ds)[index].ravel(), bitorder="little").tobytes()
    frame_bits = ds.Rows * ds.Columns * ds.SamplesPerPixel * bits
    if ds.PhotometricInterpretation == "YBR_FULL_422":
        frame_bits = frame_bits // 3 * 2
    length = frame_bits // 8
    if syntax.is_little_endian or (bits == 8 and ds["PixelData"].VR == "OB"):
        return ds.PixelData[index * length : (index + 1) * length]
    arr = pixel_frames(ds)[index]
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def assert_still_serving(corpus: Corpus) -> None:
    response = httpx.get(f"{corpus.url('CT_small.dcm')}/frames/1")
    assert response.status_code == 200


# --------------------------------------------------------------------- frames


IMAGES = [n for n in NAMES if n not in ("MR_truncated.dcm", "rtplan.dcm")]


@pytest.mark.parametrize("name", [*IMAGES, "bits1", "jpeg_no_bot", "jpeg_eot"])
def test_stored_frames_are_byte_identical(corpus: Corpus, name: str) -> None:
    """Uncompressed frames are the stored bytes (little endian); compressed
    frames, asked in their own media type, are what pydicom's
    generate_frames makes of the stored pixel data."""
    item = corpus[name]
    ds = item.ds
    syntax = item.syntax
    count = int(ds.get("NumberOfFrames") or 1)
    numbers = list(range(1, min(count, 4) + 1))
    if count > 4:
        numbers.append(count)
    compressed = syntax in MEDIA
    accept = f'multipart/related; type="{MEDIA[syntax]}"' if compressed else OCTET
    url = f"{item.url(corpus.server.root)}/frames/{','.join(map(str, numbers))}"
    response = httpx.get(url, headers={"Accept": accept}, timeout=30)
    assert response.status_code == 200, response.text
    parts = multipart(response)
    assert len(parts) == len(numbers)
    if compressed:
        extended = None
        if "ExtendedOffsetTable" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        frames = list(
            generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=extended)
        )
    for number, (headers, content) in zip(numbers, parts, strict=True):
        assert headers["content-location"].endswith(f"/frames/{number}")
        if compressed:
            assert headers["content-type"] == f"{MEDIA[syntax]}; transfer-syntax={syntax}"
            assert content == frames[number - 1], (name, number)
        else:
            assert headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
            assert content == expected_native(ds, number - 1), (name, number)


@pytest.mark.parametrize(
    "name",
    [
        "examples_ybr_color.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "JPGExtended.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "MR_small_jp2klossless.dcm",
        "GDCMJ2K_TextGBR.dcm",
        "SC_rgb_rle_2frame.dcm",
        "rtdose_rle.dcm",
        "jpeg_no_bot",
    ],
)
def test_uncompressed_on_request_equals_pydicom_decode(corpus: Corpus, name: str) -> None:
    """``application/octet-stream`` of compressed data: decoded here to the
    pixels pydicom decodes from the stored file, little endian, interleaved."""
    item = corpus[name]
    expected = pixel_frames(item.ds)
    numbers = [1, 2] if len(expected) > 1 else [1]
    frames = corpus.client().retrieve_instance_frames(
        item.study, item.series, item.sop, numbers, media_types=(("application/octet-stream", ELE),)
    )
    assert len(frames) == len(numbers)
    for number, content in zip(numbers, frames, strict=True):
        want = expected[number - 1]
        got = np.frombuffer(content, dtype=want.dtype.newbyteorder("<")).reshape(want.shape)
        assert np.array_equal(got, want), (name, number)


def test_dicomweb_client_frames_in_the_order_asked(corpus: Corpus) -> None:
    client = corpus.client()
    item = corpus["rtdose.dcm"]
    ds = item.ds
    frames = client.retrieve_instance_frames(item.study, item.series, item.sop, [3, 1])
    assert frames == [expected_native(ds, 2), expected_native(ds, 0)]
    item = corpus["SC_rgb_rle_2frame.dcm"]
    frames = client.retrieve_instance_frames(
        item.study, item.series, item.sop, [2, 1], media_types=("image/dicom-rle",)
    )
    stored = list(generate_frames(item.ds.PixelData, number_of_frames=2))
    assert frames == [stored[1], stored[0]]


def test_default_form_follows_ps3_18_8_7_3_3(corpus: Corpus) -> None:
    """No Accept (or ``*/*``): uncompressed for native and lossless data,
    the stored form for lossy data; ``transfer-syntax=*`` gives the stored
    bytes labelled with their syntax."""
    cases = {
        "rtdose.dcm": f"application/octet-stream; transfer-syntax={ELE}",
        "SC_rgb_rle_2frame.dcm": f"application/octet-stream; transfer-syntax={ELE}",
        "MR_small_jp2klossless.dcm": f"application/octet-stream; transfer-syntax={ELE}",
        "examples_ybr_color.dcm": "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50",
    }
    with httpx.Client(timeout=30) as http:
        for name, content_type in cases.items():
            for headers in ({}, {"Accept": "*/*"}, {"Accept": 'multipart/related; type="*/*"'}):
                response = http.get(f"{corpus.url(name)}/frames/1", headers=headers)
                assert response.status_code == 200, (name, response.text)
                [(part, _)] = multipart(response)
                assert part["content-type"] == content_type, (name, headers)
        item = corpus["MR_small_RLE.dcm"]
        response = http.get(
            f"{item.url(corpus.server.root)}/frames/1",
            headers={"Accept": f"{OCTET}; transfer-syntax=*"},
        )
        [(part, content)] = multipart(response)
        assert part["content-type"] == f"application/octet-stream; transfer-syntax={item.syntax}"
        assert content == next(generate_frames(item.ds.PixelData, number_of_frames=1))


def test_accept_negotiation(corpus: Corpus) -> None:
    url = corpus.url("examples_ybr_color.dcm")
    with httpx.Client(timeout=30) as http:
        # another compressed syntax than the stored one: no transcoding
        response = http.get(
            f"{url}/frames/1", headers={"Accept": 'multipart/related; type="image/jls"'}
        )
        assert response.status_code == 406
        assert "Traceback" not in response.text
        lossless = f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_LOSSLESS}'
        response = http.get(f"{url}/frames/1", headers={"Accept": lossless})
        assert response.status_code == 406
        # q-values order the ranges
        response = http.get(
            f"{url}/frames/1",
            headers={"Accept": f'{OCTET}; q=0.5, multipart/related; type="image/jpeg"; q=0.9'},
        )
        assert multipart(response)[0][0]["content-type"].startswith("image/jpeg")
        response = http.get(
            f"{url}/frames/1",
            headers={"Accept": f'{OCTET}; q=0.9, multipart/related; type="image/jpeg"; q=0.5'},
        )
        assert multipart(response)[0][0]["content-type"].startswith("application/octet-stream")
        # the accept query parameter wins over the header (PS3.18 8.3.3.1)
        response = http.get(
            f"{url}/frames/1",
            params={"accept": 'multipart/related; type="image/jpeg"'},
            headers={"Accept": OCTET},
        )
        assert multipart(response)[0][0]["content-type"].startswith("image/jpeg")
        # a single-part media type is for one frame only (PS3.18 10.4.4)
        response = http.get(f"{url}/frames/2", headers={"Accept": "image/jpeg"})
        assert response.status_code == 200
        assert (
            response.headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
        )
        stored = list(
            generate_frames(corpus["examples_ybr_color.dcm"].ds.PixelData, number_of_frames=30)
        )
        assert response.content == stored[1]
        response = http.get(f"{url}/frames/1,2", headers={"Accept": "image/jpeg"})
        assert response.status_code == 406
        # native data has no compressed form
        response = http.get(
            f"{corpus.url('CT_small.dcm')}/frames/1",
            headers={"Accept": 'multipart/related; type="image/jpeg"'},
        )
        assert response.status_code == 406
    assert_still_serving(corpus)


@pytest.mark.parametrize(
    ("frames", "status"),
    [
        ("0", 400),  # frame numbers start at 1
        ("16", 400),  # beyond Number of Frames (PS3.18 9.5.2)
        ("1,99", 400),
        ("a,b", 400),
        ("1,,2", 400),
        ("-1", 400),
        ("1,1", 400),  # duplicates (PS3.18 10.4.1.1: "non duplicate")
        ("1.5", 400),
    ],
)
def test_bad_frame_lists(corpus: Corpus, frames: str, status: int) -> None:
    response = httpx.get(f"{corpus.url('rtdose.dcm')}/frames/{frames}")
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status
    assert body["error"]
    assert "Traceback" not in response.text
    assert_still_serving(corpus)


def test_frames_errors(corpus: Corpus) -> None:
    root = corpus.server.root
    item = corpus["CT_small.dcm"]
    with httpx.Client(timeout=30) as http:
        # unknown instance: 404; malformed UIDs: 400
        response = http.get(
            f"{root}/studies/{item.study}/series/{item.series}/instances/1.2.3/frames/1"
        )
        assert response.status_code == 404
        for bad in ("1.2.03", "1." + "2" * 70, "abc"):
            response = http.get(
                f"{root}/studies/{bad}/series/{item.series}/instances/{item.sop}/frames/1"
            )
            assert response.status_code == 400, bad
        response = http.get(
            f"{root}/studies/{item.study}/series/{item.series}/instances/%2e%2e/frames/1"
        )
        assert response.status_code in (400, 404)
        # no pixel data
        response = http.get(f"{corpus.url('rtplan.dcm')}/frames/1")
        assert response.status_code == 400
        assert "pixel data" in response.json()["error"]
        # truncated pixel data: a clear 500, no stack trace, server alive
        response = http.get(f"{corpus.url('MR_truncated.dcm')}/frames/1")
        assert response.status_code == 500
        assert "beyond the end" in response.json()["error"]
        assert "Traceback" not in response.text
    assert_still_serving(corpus)


def test_one_log_line_per_request_with_uids_only(
    corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    item = corpus["mono2"]
    with caplog.at_level(logging.INFO, logger="dicomweb"):
        assert httpx.get(f"{item.url(corpus.server.root)}/frames/1").status_code == 200
        assert httpx.get(f"{item.url(corpus.server.root)}/rendered").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dicomweb.views")]
    assert len(lines) == 2, lines
    assert all(item.sop in line and item.study in line for line in lines)
    assert not any("Frames^Test" in line or "FR1" in line for line in lines)


# ------------------------------------------------------------------ rendered


def rendered(corpus: Corpus, name: str, path: str = "/rendered", **kwargs: Any) -> httpx.Response:
    response = httpx.get(f"{corpus.url(name)}{path}", timeout=30, **kwargs)
    assert response.status_code == 200, (name, response.text)
    return response


@pytest.mark.parametrize("name", [*IMAGES, "bits1", "jpeg_eot", "mono1"])
def test_rendered_jpeg_has_the_image_size(corpus: Corpus, name: str) -> None:
    ds = corpus[name].ds
    response = rendered(corpus, name)
    assert response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    assert image.size == (ds.Columns, ds.Rows)
    colour = ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"
    assert image.mode == ("RGB" if colour else "L")


def test_png_by_accept_and_by_query_parameter(corpus: Corpus) -> None:
    for kwargs in ({"headers": {"Accept": "image/png"}}, {"params": {"accept": "image/png"}}):
        response = rendered(corpus, "CT_small.dcm", **kwargs)
        assert response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).format == "PNG"
    response = httpx.get(f"{corpus.url('CT_small.dcm')}/rendered", headers={"Accept": "image/gif"})
    assert response.status_code == 406


def test_rendered_colour_is_pydicoms_rgb(corpus: Corpus) -> None:
    """RGB and YBR (decoded to RGB) come out as pydicom's pixels, exactly
    when lossless PNG is asked; frame 2 of a multi-frame is frame 2."""
    for name, number in (("SC_rgb_rle_2frame.dcm", 2), ("examples_ybr_color.dcm", 3)):
        response = rendered(
            corpus, name, f"/frames/{number}/rendered", headers={"Accept": "image/png"}
        )
        got = np.asarray(Image.open(io.BytesIO(response.content)))
        assert np.array_equal(got, pixel_frames(corpus[name].ds)[number - 1]), name


def test_palette_colour_goes_through_the_lookup_tables(corpus: Corpus) -> None:
    from pydicom.pixels import apply_color_lut

    ds = corpus["examples_palette.dcm"].ds
    want = apply_color_lut(pixel_frames(ds)[0], ds).astype(np.float64)
    want = want * 255 / (65535 if want.max() > 255 else 255)
    response = rendered(corpus, "examples_palette.dcm", headers={"Accept": "image/png"})
    got = np.asarray(Image.open(io.BytesIO(response.content))).astype(np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1


def test_viewport_scales_to_fit_keeping_the_aspect_ratio(corpus: Corpus) -> None:
    # JPEG2000.dcm is 256 columns x 1024 rows
    for viewport, size in (("100,100", (25, 100)), ("512,2048", (512, 2048)), ("64,1", (1, 1))):
        response = rendered(corpus, "JPEG2000.dcm", params={"viewport": viewport})
        assert Image.open(io.BytesIO(response.content)).size == size, viewport
    # a source region: 64 x 32 pixels from (0, 0) of CT_small, fit in 50 x 50
    response = rendered(corpus, "CT_small.dcm", params={"viewport": "50,50,0,0,64,32"})
    assert Image.open(io.BytesIO(response.content)).size == (50, 25)
    # flipped: a negative source width mirrors the region
    plain = rendered(
        corpus, "mono2", params={"viewport": "16,8,0,0,16,8"}, headers={"Accept": "image/png"}
    )
    flipped = rendered(
        corpus, "mono2", params={"viewport": "16,8,16,0,-16,8"}, headers={"Accept": "image/png"}
    )
    a = np.asarray(Image.open(io.BytesIO(plain.content)))
    b = np.asarray(Image.open(io.BytesIO(flipped.content)))
    assert np.array_equal(a[:, ::-1], b)


def test_window_changes_the_output(corpus: Corpus) -> None:
    png = {"Accept": "image/png"}

    def picture(**params: str) -> Any:
        response = rendered(corpus, "MR_small.dcm", headers=png, params=params)
        return np.asarray(Image.open(io.BytesIO(response.content)))

    default = picture()
    assert np.array_equal(default, picture(window="600,1600,linear"))  # the data set's own
    narrow = picture(window="600,100,linear")
    assert not np.array_equal(default, narrow)
    assert (narrow == 0).sum() > (default == 0).sum()
    assert not np.array_equal(picture(window="600,1600,sigmoid"), default)
    assert not np.array_equal(picture(window="600,1600,linear-exact"), narrow)
    assert np.array_equal(picture(window="600,1600"), default)  # function defaults to linear


def test_voi_lut_sequence_and_per_frame_windows(corpus: Corpus) -> None:
    png = {"Accept": "image/png"}

    def picture(name: str, path: str = "/rendered", **params: str) -> Any:
        response = rendered(corpus, name, path, headers=png, params=params)
        return np.asarray(Image.open(io.BytesIO(response.content)))

    ramp = np.arange(8 * 16).reshape(8, 16) * 100
    assert np.array_equal(picture("voi_lut"), np.clip(ramp >> 4, 0, 255))
    # the window parameter replaces the data set's VOI LUT
    assert np.array_equal(picture("voi_lut", window="100,50"), picture("mono2", window="100,50"))
    first = picture("per_frame_window", "/frames/1/rendered")
    second = picture("per_frame_window", "/frames/2/rendered")
    assert np.array_equal(first, picture("mono2", window="100,50"))
    assert np.array_equal(second, picture("mono2", window="6000,8000"))


def test_quality_changes_the_jpeg_size(corpus: Corpus) -> None:
    low = rendered(corpus, "examples_rgb_color.dcm", params={"quality": "10"})
    high = rendered(corpus, "examples_rgb_color.dcm", params={"quality": "95"})
    assert len(low.content) < len(high.content)


def test_monochrome1_is_inverted(corpus: Corpus) -> None:
    png = {"Accept": "image/png"}
    mono1 = np.asarray(Image.open(io.BytesIO(rendered(corpus, "mono1", headers=png).content)))
    mono2 = np.asarray(Image.open(io.BytesIO(rendered(corpus, "mono2", headers=png).content)))
    assert mono2[0, 0] == 0  # min..max without a window
    assert mono2[-1, -1] == 255
    assert np.array_equal(mono1.astype(int), 255 - mono2.astype(int))


@pytest.mark.parametrize(
    "params",
    [
        {"window": "abc"},
        {"window": "40,0,linear"},
        {"window": "40,400,cubic"},
        {"window": "1,2,3,4"},
        {"viewport": "0,10"},
        {"viewport": "10"},
        {"viewport": "10,10,0,0,0,5"},
        {"viewport": "10,10,500,500,10,10"},  # region outside the image
        {"viewport": "99999,10"},
        {"quality": "0"},
        {"quality": "101"},
        {"quality": "high"},
    ],
)
def test_bad_parameter_values_are_400(corpus: Corpus, params: dict[str, str]) -> None:
    response = httpx.get(f"{corpus.url('CT_small.dcm')}/rendered", params=params)
    assert response.status_code == 400, (params, response.text)
    assert "Traceback" not in response.text
    assert_still_serving(corpus)


def test_unknown_parameters_are_ignored(corpus: Corpus) -> None:
    """PS3.18 8.3: "The origin server shall ignore any unsupported Query
    Parameters" (annotation, iccprofile, charset and unknown names)."""
    plain = rendered(corpus, "CT_small.dcm")
    other = rendered(
        corpus,
        "CT_small.dcm",
        params={"annotation": "patient", "iccprofile": "srgb", "charset": "utf-8", "foo": "bar"},
    )
    assert other.content == plain.content


def test_rendered_frames_multipart_and_first_frame(corpus: Corpus) -> None:
    url = corpus.url("rtdose.dcm")
    png = 'multipart/related; type="image/png"'
    response = httpx.get(f"{url}/frames/2,1/rendered", headers={"Accept": png})
    assert response.status_code == 200
    parts = multipart(response)
    assert [h["content-type"] for h, _ in parts] == ["image/png", "image/png"]
    second = httpx.get(f"{url}/frames/2/rendered", headers={"Accept": "image/png"}).content
    first = httpx.get(f"{url}/frames/1/rendered", headers={"Accept": "image/png"}).content
    assert [content for _, content in parts] == [second, first]
    assert (
        httpx.get(f"{url}/frames/1,2/rendered", headers={"Accept": "image/png"}).status_code == 406
    )
    assert httpx.get(f"{url}/frames/1,16/rendered").status_code == 400
    # the rendered instance is its first frame; all frames if only multipart is accepted
    assert httpx.get(f"{url}/rendered", headers={"Accept": "image/png"}).content == first
    response = httpx.get(f"{url}/rendered", headers={"Accept": png})
    assert len(multipart(response)) == 15


def test_dicomweb_client_rendered(corpus: Corpus) -> None:
    client = corpus.client()
    item = corpus["MR_small.dcm"]
    data = client.retrieve_instance_rendered(
        item.study, item.series, item.sop, media_types=("image/png",), params={"viewport": "32,32"}
    )
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("PNG", (32, 32))
    data = client.retrieve_instance_frames_rendered(
        item.study, item.series, item.sop, [1], media_types=("image/jpeg",), params={"quality": 50}
    )
    assert Image.open(io.BytesIO(data)).format == "JPEG"


def test_rendered_errors(corpus: Corpus) -> None:
    with httpx.Client(timeout=30) as http:
        assert http.get(f"{corpus.url('rtplan.dcm')}/rendered").status_code == 400
        assert http.get(f"{corpus.url('MR_truncated.dcm')}/rendered").status_code == 500
        root = corpus.server.root
        assert (
            http.get(f"{root}/studies/1.2.3/series/1.2.4/instances/1.2.5/rendered").status_code
            == 404
        )
        assert http.get(f"{root}/studies/1.2.3/thumbnail").status_code == 404
        assert http.get(f"{root}/studies/1.2.x/thumbnail").status_code == 400
    assert_still_serving(corpus)


# ----------------------------------------------------------------- thumbnail


def test_thumbnails_fit_200_pixels(corpus: Corpus) -> None:
    item = corpus["JPEG2000.dcm"]  # 256 x 1024
    root = corpus.server.root
    series_url = f"{root}/studies/{item.study}/series/{item.series}"
    for url in (
        f"{root}/studies/{item.study}/thumbnail",
        f"{series_url}/thumbnail",
        f"{item.url(root)}/thumbnail",
        f"{item.url(root)}/frames/1/thumbnail",
    ):
        response = httpx.get(url)
        assert response.status_code == 200, (url, response.text)
        assert response.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(response.content)).size == (50, 200)
    response = httpx.get(f"{item.url(root)}/thumbnail", params={"viewport": "64,64"})
    assert Image.open(io.BytesIO(response.content)).size == (16, 64)
    response = httpx.get(f"{item.url(root)}/thumbnail", headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(response.content)).format == "PNG"


def test_study_thumbnail_skips_instances_without_pixels(corpus: Corpus) -> None:
    root = corpus.server.root
    plan, ct = corpus["mixed_plan"], corpus["mixed_ct"]
    assert plan.study == ct.study
    response = httpx.get(f"{root}/studies/{ct.study}/thumbnail", headers={"Accept": "image/png"})
    assert response.status_code == 200
    instance = httpx.get(f"{ct.url(root)}/thumbnail", headers={"Accept": "image/png"})
    assert response.content == instance.content
    response = httpx.get(f"{root}/studies/{plan.study}/series/{plan.series}/thumbnail")
    assert response.status_code == 400
    assert_still_serving(corpus)


# ---------------------------------------------------------------- caching


@pytest.mark.parametrize(
    "path",
    ["/frames/1,2", "/rendered", "/frames/2/rendered", "/thumbnail", "/frames/1/thumbnail"],
)
def test_if_none_match_gives_304(corpus: Corpus, path: str) -> None:
    url = f"{corpus.url('SC_rgb_rle_2frame.dcm')}{path}"
    with httpx.Client(timeout=30) as http:
        first = http.get(url)
        assert first.status_code == 200
        etag = first.headers["etag"]
        assert first.headers["last-modified"]
        assert "private" in first.headers["cache-control"]
        again = http.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == etag
        assert http.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
        since = http.get(url, headers={"If-Modified-Since": first.headers["last-modified"]})
        assert since.status_code == 304
        # another representation has another tag
        kind = "image/dicom-rle" if path == "/frames/1,2" else "image/png"
        other = http.get(url, params={"accept": f'multipart/related; type="{kind}"'})
        assert other.status_code == 200
        assert other.headers["etag"] != etag
