"""Helpers shared by the protocol tests."""

from __future__ import annotations

import io
from typing import Any

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.encoding import data_set_of  # noqa: F401 - the tests take it from here
from appliance.model import Origin
from appliance.status import Status
from tests.conftest import LiveServer


def multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response: (headers, content)."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = next(
        p.split("=", 1)[1].strip('"')
        for p in content_type.split(";")
        if p.strip().startswith("boundary")
    ).encode()
    body = response.content
    delimiter = b"--" + boundary
    assert body.startswith(delimiter + b"\r\n")
    chunks = body[len(delimiter) + 2 :].split(b"\r\n" + delimiter)
    assert chunks.pop() == b"--\r\n", "the close delimiter ends the message"
    parts = []
    for number, chunk in enumerate(chunks):
        if number:
            assert chunk.startswith(b"\r\n")
            chunk = chunk[2:]
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def stow(base_url: str, *parts: bytes, timeout: float = 120) -> httpx.Response:
    """STOW-RS of *parts* (Part 10 files) to ``{base_url}/v1/studies``."""
    return stow_to(f"{base_url}/v1", *parts, timeout=timeout)


def stow_to(root: str, *parts: bytes, timeout: float = 120) -> httpx.Response:
    """STOW-RS of *parts* (Part 10 files) to ``{root}/studies``: *root* is a
    service root (``.../v1``, or a data partition's ``.../v1/partitions/A``)."""
    boundary = "test-stow-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return httpx.post(
        f"{root}/studies",
        content=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=timeout,
    )


def small_study(count: int, patient_id: str = "NODES-1", size: int = 8) -> list[Dataset]:
    """*count* CT instances (*size* x *size* 16-bit pixels) of one new study
    and series, with their File Meta (explicit VR little endian)."""
    study, series = generate_uid(), generate_uid()
    instances = []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = patient_id, "Nodes^Test"
        ds.Modality, ds.InstanceNumber = "CT", number
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(2 * size * size)
        instances.append(ds)
    return instances


def part10_of(ds: Dataset) -> bytes:
    """*ds* as a Part 10 file."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def store(server: LiveServer, study: str, series: str, **values: Any) -> str:
    """Store a minimal Secondary Capture instance through the core's ingest
    (attributes from *values*); its SOP Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    assert server.services.ingest.store_part10(buf, Origin("import")).status is Status.SUCCESS
    return str(ds.SOPInstanceUID)
