"""Deterministic synthetic instances for the benchmarks."""

from __future__ import annotations

import io
import random

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def make_instance(size: int, study_uid: str, series_uid: str, seed: object = 0) -> bytes:
    """A CT-like Part 10 instance of ``size`` x ``size`` 16-bit pixels.

    Patient and study attributes follow from *study_uid* (every instance of
    a study names the same patient, as real studies do); the instance UID and
    pixels from *seed*."""
    rng = random.Random(str(seed))
    study_rng = random.Random(study_uid)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = f"PID{study_rng.randrange(10**6):06d}"
    ds.PatientName = (
        f"{study_rng.choice(['SMITH', 'JONES', 'MILLER', 'GARCIA'])}^{study_rng.randrange(999)}"
    )
    ds.StudyDate = (
        f"20{study_rng.randrange(10, 25)}"
        f"{study_rng.randrange(1, 13):02d}{study_rng.randrange(1, 29):02d}"
    )
    ds.StudyTime = "101500"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = rng.randbytes(size * size * 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
