"""Shared fixtures: the shipped samples, the shared real data (optional), and DICOM builders.

The shared data folder lives outside the repository. Tests that need it skip when it is absent,
so a clean clone in CI still runs everything else. Point ``BONEAI_DATA`` at another copy to use it.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"
SHARED_DATA = Path(os.environ.get("BONEAI_DATA", REPO_ROOT.parent / "shared" / "data"))

#: Identifiers written into every test DICOM. None of them may come out of boneai.io.
PATIENT_IDENTIFIERS = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "MRN-4471-0093",
    "PatientBirthDate": "19610417",
    "AccessionNumber": "ACC-88812345",
}


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The repository's ``samples/`` folder (always present)."""
    assert SAMPLES.is_dir(), f"samples folder missing: {SAMPLES}"
    return SAMPLES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips the test where it is not available."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not available at {SHARED_DATA} (set BONEAI_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fracatlas_root(shared_data: Path) -> Path:
    root = shared_data / "fracatlas"
    if not (root / "dataset.csv").is_file():
        pytest.skip(f"FracAtlas not available at {root}")
    return root


@pytest.fixture(scope="session")
def boneage_full_root(shared_data: Path) -> Path:
    root = shared_data / "boneage" / "full_resolution"
    if not (root / "boneage.csv").is_file():
        pytest.skip(f"bone-age full-resolution subset not available at {root}")
    return root


def load_sample_gray(relative: str) -> np.ndarray:
    """A sample image as a 2-D uint8 array (colour-stored greys are converted)."""
    from PIL import Image

    with Image.open(SAMPLES / relative) as img:
        return np.asarray(img.convert("L")).copy()


@pytest.fixture(scope="session")
def sample_gray() -> Callable[[str], np.ndarray]:
    """``sample_gray("fracatlas/IMG0000351.jpg")`` -> 2-D uint8 array."""
    return load_sample_gray


def make_dicom(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: tuple[list[int], np.ndarray] | None = None,
    identifiers: bool = True,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """Encode a little-endian DICOM file (Part 10, with preamble) in memory.

    Args:
        pixels: (rows, cols) or (frames, rows, cols) integer array, or None for no pixel data.
        photometric: MONOCHROME1 or MONOCHROME2.
        bits_stored: defaults to the container size (8 or 16).
        signed: PixelRepresentation 1 (int16 data).
        rescale: (slope, intercept) for the modality LUT.
        window: (center, width) for the VOI window.
        voi_lut: (LUTDescriptor, LUTData) for a VOI LUT sequence.
        identifiers: write :data:`PATIENT_IDENTIFIERS` (and an institution) into the header.
        extra: more attributes by keyword, e.g. ``{"BodyPartExamined": "HAND"}``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    # An image object without pixels is a broken file; a real "no image" DICOM is e.g. a report.
    sop_class = (
        "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
        if pixels is not None
        else "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX" if pixels is not None else "SR"
    ds.BodyPartExamined = "HAND"
    ds.ViewPosition = "PA"
    if identifiers:
        for keyword, value in PATIENT_IDENTIFIERS.items():
            setattr(ds, keyword, value)
        ds.InstitutionName = "St Elsewhere General Hospital"
        ds.ReferringPhysicianName = "House^Gregory"
    if pixels is not None:
        arr = np.asarray(pixels)
        frames = arr.shape[0] if arr.ndim == 3 else 1
        rows, cols = arr.shape[-2:]
        container = 8 if arr.dtype.itemsize == 1 else 16
        dtype = {8: np.int8 if signed else np.uint8, 16: np.int16 if signed else np.uint16}[container]
        ds.Rows, ds.Columns = int(rows), int(cols)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = container
        ds.BitsStored = bits_stored or container
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = arr.astype(dtype).tobytes()
    else:
        ds.PhotometricInterpretation = photometric
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = list(voi_lut[0])
        # LUTData is US or OW; written as raw little-endian words it is unambiguous.
        item.LUTData = np.asarray(voi_lut[1], dtype="<u2").ravel().tobytes()
        item.LUTExplanation = "test LUT"
        ds.VOILUTSequence = Sequence([item])
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def dicom_bytes() -> Callable[..., bytes]:
    """The :func:`make_dicom` builder, as a fixture."""
    return make_dicom


@pytest.fixture(scope="session")
def patient_identifiers() -> dict[str, str]:
    return dict(PATIENT_IDENTIFIERS)


def shipped_model(task: str):
    """The shipped default model of ``task`` from weights/, or a skip naming what is missing."""
    from boneai.errors import ModelNotFoundError
    from boneai.inference import load_model

    try:
        return load_model(task)
    except ModelNotFoundError as exc:
        pytest.skip(f"shipped {task} model not available: {exc}")


@pytest.fixture(scope="module")
def fracture():
    return shipped_model("fracture")


@pytest.fixture(scope="module")
def fracture_ensemble():
    """The shipped two-model fracture ensemble (448 + 384 px), the most accurate and slowest model."""
    return shipped_model("fracture_ensemble")


@pytest.fixture(scope="module")
def fracture_fast():
    """The shipped single-model fracture classifier (224 px); the default ``fracture`` is an ensemble."""
    return shipped_model("fracture_fast")


@pytest.fixture(scope="module")
def boneage():
    return shipped_model("boneage")


def pdf_text(pdf: bytes) -> str:
    """The text drawn in a PDF made by fpdf2 (its content streams, decompressed)."""
    chunks = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            chunks.append(zlib.decompress(m.group(1)).decode("latin-1"))
        except zlib.error:
            pass
    # PDF string literals escape parentheses and backslashes.
    return "".join(chunks).replace("\\(", "(").replace("\\)", ")")
