"""The layout walk that decides whether stored bytes can be sent as they are."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from appliance.encoding import LayoutError, Soundness, check_structure, read_layout

DATA = Path(pydicom.__file__).parent / "data"


def walk(data: bytes) -> Soundness:
    fp = io.BytesIO(data)
    return check_structure(fp, read_layout(fp))


def encoded(syntax: str, **elements: object) -> bytes:
    """A small instance with a nested sequence, in *syntax*."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    item = Dataset()
    item.CodeValue = "121"
    item.CodeMeaning = "a code"
    ds.ProcedureCodeSequence = [item, Dataset()]
    # undefined lengths and delimitation items, as many modalities write them
    ds["ProcedureCodeSequence"].is_undefined_length = True
    for each in ds.ProcedureCodeSequence:
        each.is_undefined_length_sequence_item = True
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_layout_names_the_file_meta() -> None:
    data = encoded(ExplicitVRLittleEndian)
    layout = read_layout(io.BytesIO(data))
    ds = dcmread(io.BytesIO(data))
    assert layout.transfer_syntax == ExplicitVRLittleEndian
    assert layout.sop_instance_uid == ds.SOPInstanceUID
    assert layout.sop_class_uid == ds.SOPClassUID
    assert layout.offset + layout.size == len(data)
    assert data[layout.offset : layout.offset + 2] == b"\x08\x00"


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian],
)
def test_well_formed_data_sets_are_sound(syntax: str) -> None:
    assert walk(encoded(syntax)) is Soundness.SOUND


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_undefined_length_sequences_are_walked(syntax: str) -> None:
    data = encoded(syntax)
    assert b"\xfe\xff\xdd\xe0" in data  # a Sequence Delimitation Item
    assert walk(data) is Soundness.SOUND
    cut = data[: data.rindex(b"\xfe\xff\xdd\xe0")]
    assert walk(cut + b"\0" * (len(cut) % 2)) is Soundness.MALFORMED


def test_a_value_running_past_the_end_is_malformed() -> None:
    data = encoded(ExplicitVRLittleEndian, EncapsulatedDocument=b"\0" * 64)
    assert walk(data[:-16]) is Soundness.MALFORMED


def test_an_odd_length_is_odd() -> None:
    data = encoded(ExplicitVRLittleEndian, EncapsulatedDocument=b"\0" * 64)
    assert walk(data[:-1]) is Soundness.ODD_LENGTH


def test_implicit_elements_under_an_explicit_label_are_malformed() -> None:
    data = encoded(ImplicitVRLittleEndian)
    layout = read_layout(io.BytesIO(data))
    meta = encoded(ExplicitVRLittleEndian)
    relabelled = meta[: read_layout(io.BytesIO(meta)).offset] + data[layout.offset :]
    assert walk(relabelled) is Soundness.MALFORMED


def test_a_deflated_data_set_is_sound_when_even() -> None:
    data = encoded(DeflatedExplicitVRLittleEndian)
    layout = read_layout(io.BytesIO(data))
    assert layout.size % 2 == 0  # pydicom pads the deflated stream
    assert walk(data) is Soundness.SOUND
    assert walk(data[:-1]) is Soundness.MALFORMED


def test_not_part10_is_a_layout_error() -> None:
    with pytest.raises(LayoutError):
        read_layout(io.BytesIO(b"\0" * 200))
    data = encoded(ExplicitVRLittleEndian)
    with pytest.raises(LayoutError):
        read_layout(io.BytesIO(data[:140]))


def test_pydicoms_corpus() -> None:
    """Every Part 10 file of pydicom's test data: sound but for the three
    known damaged ones (and one deflated stream left unpadded)."""
    found: dict[str, Soundness] = {}
    for path in sorted(DATA.rglob("*.dcm")):
        with path.open("rb") as fp:
            try:
                layout = read_layout(fp)
            except LayoutError:
                continue
            found[path.name] = check_structure(fp, layout)
    assert len(found) > 70
    damaged = {name: s for name, s in found.items() if s is not Soundness.SOUND}
    assert damaged == {
        "MR_truncated.dcm": Soundness.MALFORMED,  # ends inside Pixel Data
        "SC_rgb_jpeg.dcm": Soundness.MALFORMED,  # Implicit VR under JPEG Baseline
        "image_dfl.dcm": Soundness.MALFORMED,  # an odd deflated stream
        "meta_missing_tsyntax.dcm": Soundness.MALFORMED,  # no Transfer Syntax UID
        "nested_priv_SQ.dcm": Soundness.ODD_LENGTH,
        "rtplan_truncated.dcm": Soundness.ODD_LENGTH,
    }


def test_undefined_length_un_is_walked_as_implicit() -> None:
    path = get_testdata_file("UN_sequence.dcm")
    assert path is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert walk(Path(path).read_bytes()) is Soundness.SOUND
