"""The benchmark's deterministic corpus of synthetic CT instances.

Every instance follows from a seed string: the same seed gives the same
bytes, on every machine and for both servers.  pydicom encodes one template
per image size (Explicit VR Little Endian, a CT header of about 40
attributes); each instance is that template with its UIDs, patient and study
attributes, instance number and pixels written into fixed-width slots.  All
the varying values have a fixed encoded length (UIDs of 56 characters, a
10-character patient ID and name, an 8-character date), so patching them in
keeps every element length and the file stays valid; :meth:`InstanceSet.check`
reads instances back with pydicom to prove it.  Rendering is then a few
microseconds plus a copy, which keeps 10,000-study index fills and 2 GB of
CT-like instances cheap to build.

Patient and study attributes follow from the Study Instance UID alone (every
instance of a study names the same patient, as real studies do), so the
queries' expected matches can be computed from the corpus:
:func:`study_attributes`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import random
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

#: pydicom's UID root; every benchmark UID is this plus 30 digits (56 chars).
UID_ROOT = "1.2.826.0.1.3680043.8.498."
UID_DIGITS = 30
SURNAMES = ("SMITH", "JONES", "MILLER", "GARCIA")
#: Placeholders of the template, each as long as the values patched in.
_STUDY_SLOT = UID_ROOT + "1" * UID_DIGITS
_SERIES_SLOT = UID_ROOT + "2" * UID_DIGITS
_SOP_SLOT = UID_ROOT + "3" * UID_DIGITS
_PATIENT_ID_SLOT = "PIDQQQQQQ"
_PATIENT_NAME_SLOT = "QQQQQQ^QQQ"
_DATE_SLOT = "19991231"
_NUMBER_SLOT = "987654"
#: Random bytes the pixel data of every instance is a window of.
_POOL_SEED = b"dicom-appliance bench pixel pool"


def uid(seed: str) -> str:
    """A 56-character UID that follows from *seed*."""
    digest = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big")
    return f"{UID_ROOT}{10 ** (UID_DIGITS - 1) + digest % (9 * 10 ** (UID_DIGITS - 1))}"


@dataclasses.dataclass(frozen=True)
class StudyAttributes:
    """Patient and study attributes of one study, as the corpus encodes them."""

    patient_id: str
    patient_name: str
    study_date: str


def study_attributes(study_uid: str) -> StudyAttributes:
    """The patient and study attributes every instance of *study_uid* carries.

    Names are one of :data:`SURNAMES` and a three-digit number (so a prefix
    like ``SMI*`` matches about a quarter of the studies); dates fall in
    2010-2024 (so one year matches about a fifteenth)."""
    rng = random.Random(study_uid)
    return StudyAttributes(
        patient_id=f"PID{rng.randrange(10**6):06d}",
        patient_name=f"{rng.choice(SURNAMES)}^{rng.randrange(1000):03d}",
        study_date=f"20{rng.randrange(10, 25)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}",
    )


def _padded(value: str) -> bytes:
    """*value* as pydicom encodes a text value: padded to an even length."""
    data = value.encode("ascii")
    return data + b" " if len(data) % 2 else data


class Template:
    """One pydicom-encoded instance of ``size`` x ``size`` 16-bit pixels,
    with the slots each instance fills in."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pixel_bytes = size * size * 2
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _SOP_SLOT
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = _DATE_SLOT
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "BENCH"
        ds.InstitutionName = "Bench Hospital"
        ds.ReferringPhysicianName = "REFERRER^A"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "AXIAL 1.0"
        ds.ManufacturerModelName = "SYNTHETIC"
        ds.ProcedureCodeSequence = Sequence([Dataset()])
        code = ds.ProcedureCodeSequence[0]
        code.CodeValue, code.CodingSchemeDesignator = "CTCHEST", "99BENCH"
        code.CodeMeaning = "CT chest"
        ds.PatientName = _PATIENT_NAME_SLOT
        ds.PatientID = _PATIENT_ID_SLOT
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = _STUDY_SLOT
        ds.SeriesInstanceUID = _SERIES_SLOT
        ds.StudyID = "1"
        ds.SeriesNumber = "1"
        ds.InstanceNumber = _NUMBER_SLOT
        ds.ImagePositionPatient = ["-250.0", "-250.0", "0.0"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = "0.0"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = bytes(self.pixel_bytes)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        encoded = buf.getvalue()
        # the pixel data is the last element: everything before it is header
        self.header = encoded[: -self.pixel_bytes]
        self.slots: dict[str, list[int]] = {}
        for name, value, count in (
            ("study", _STUDY_SLOT, 1),
            ("series", _SERIES_SLOT, 1),
            ("sop", _SOP_SLOT, 2),  # the File Meta's and the data set's
            ("patient_id", _PATIENT_ID_SLOT, 1),
            ("patient_name", _PATIENT_NAME_SLOT, 1),
            ("date", _DATE_SLOT, 3),
            ("number", _NUMBER_SLOT, 1),
        ):
            slot = _padded(value)
            found = [i for i in range(len(self.header)) if self.header.startswith(slot, i)]
            if len(found) != count:
                raise AssertionError(f"template slot {name} found {len(found)} times")
            self.slots[name] = found

    def render(self, study_uid: str, series_uid: str, sop_uid: str, number: int) -> bytes:
        """The Part 10 bytes of one instance."""
        header = bytearray(self.header)
        attributes = study_attributes(study_uid)
        for name, value in (
            ("study", study_uid),
            ("series", series_uid),
            ("sop", sop_uid),
            ("patient_id", attributes.patient_id),
            ("patient_name", attributes.patient_name),
            ("date", attributes.study_date),
            ("number", f"{number:06d}"),
        ):
            data = _padded(value)
            for offset in self.slots[name]:
                header[offset : offset + len(data)] = data
        return bytes(header) + _pixels(sop_uid, self.pixel_bytes)


@functools.cache
def _pool(size: int) -> bytes:
    return hashlib.shake_256(_POOL_SEED).digest(2 * size)


def _pixels(seed: str, size: int) -> bytes:
    """*size* random-looking bytes chosen by *seed*: a window of a pool of
    random bytes (rendering a CT instance costs a copy, not a generator)."""
    pool = _pool(size)
    start = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") % (size // 2) * 2
    return pool[start : start + size]


@functools.cache
def template(size: int) -> Template:
    """The template for ``size`` x ``size`` instances (built once)."""
    return Template(size)


@dataclasses.dataclass(frozen=True)
class Instance:
    """One instance of a set: its UIDs and where its bytes come from."""

    study: str
    series: str
    sop: str
    number: int
    size: int

    def render(self) -> bytes:
        """The instance's Part 10 bytes (the same on every call)."""
        return template(self.size).render(self.study, self.series, self.sop, self.number)


@dataclasses.dataclass(frozen=True)
class InstanceSet:
    """``count`` instances of ``size`` x ``size`` pixels, ``per_study`` per
    study (one series each), all following from ``seed`` and ``name``."""

    name: str
    size: int
    count: int
    per_study: int
    seed: str

    @functools.cached_property
    def instances(self) -> tuple[Instance, ...]:
        found = []
        for i in range(self.count):
            study = uid(f"{self.seed}/{self.name}/study/{i // self.per_study}")
            found.append(
                Instance(
                    study=study,
                    series=uid(f"{study}/series"),
                    sop=uid(f"{self.seed}/{self.name}/instance/{i}"),
                    number=i % self.per_study + 1,
                    size=self.size,
                )
            )
        return tuple(found)

    @property
    def studies(self) -> dict[str, list[Instance]]:
        """The set's instances by Study Instance UID."""
        found: dict[str, list[Instance]] = {}
        for instance in self.instances:
            found.setdefault(instance.study, []).append(instance)
        return found

    def render(self) -> Iterator[bytes]:
        return (instance.render() for instance in self.instances)

    def write(self, folder: Path) -> list[Path]:
        """Write the set as files ``folder/<name>/NNNNNN.dcm`` (once)."""
        target = folder / self.name
        paths = [target / f"{i:06d}.dcm" for i in range(self.count)]
        if not (target / ".complete").exists():
            target.mkdir(parents=True, exist_ok=True)
            for path, data in zip(paths, self.render(), strict=True):
                path.write_bytes(data)
            (target / ".complete").touch()
        return paths

    def check(self) -> None:
        """Read the first and last instances back with pydicom and check
        every patched value (a broken template fails the run here)."""
        for instance in (self.instances[0], self.instances[-1]):
            ds = dcmread(io.BytesIO(instance.render()))
            attributes = study_attributes(instance.study)
            found = (
                ds.file_meta.MediaStorageSOPInstanceUID,
                ds.SOPInstanceUID,
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.PatientID,
                str(ds.PatientName),
                ds.StudyDate,
                int(ds.InstanceNumber),
                len(ds.PixelData),
            )
            wanted = (
                instance.sop,
                instance.sop,
                instance.study,
                instance.series,
                attributes.patient_id,
                attributes.patient_name,
                attributes.study_date,
                instance.number,
                self.size * self.size * 2,
            )
            if found != wanted:
                raise AssertionError(f"corpus set {self.name}: {found} != {wanted}")


def dataset_part(data: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the preamble, the
    ``DICM`` prefix and the File Meta group (PS3.10 7.1).

    A C-STORE carries only the data set, and each receiver writes its own
    File Meta (Implementation Class UID, Source AE Title...), so instances
    that arrived by C-STORE can only be compared on this part."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file starting with its File Meta group length")
    # (0002,0000) UL, explicit VR: tag 4 + VR 2 + length 2, then the 4-byte value
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]
