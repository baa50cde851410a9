"""Reading radiographs: bytes or a path in, a :class:`Radiograph` out.

PNG and JPEG go through Pillow, DICOM through pydicom. Patient identifiers never leave this
module: a :class:`Radiograph` only carries pixels and a whitelist of technical metadata.

Example:
    >>> from boneai.io import read_radiograph
    >>> rg = read_radiograph("samples/fracatlas/IMG0000019.jpg")  # doctest: +SKIP
    >>> rg.pixels.shape, rg.source_format                          # doctest: +SKIP
    ((1024, 819), 'JPEG')
"""

from __future__ import annotations

import io as _io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from boneai.errors import (
    DicomReadError,
    EmptyFileError,
    ImageTooLargeError,
    ImageTooSmallError,
    NoPixelDataError,
    UnsupportedFileError,
)

__all__ = ["Radiograph", "read_radiograph", "MAX_PIXELS", "MIN_SIDE", "SAFE_DICOM_FIELDS"]

#: Largest image we decode (width x height). A 43x43 cm detector at 0.1 mm is about 18.5 MP,
#: so 80 MP leaves room for stitched long-leg films while refusing decompression bombs.
MAX_PIXELS = 80_000_000
#: Smallest side we accept. The RSNA bone-age copy is 100x100, so the limit sits below that.
MIN_SIDE = 64

#: DICOM attributes copied into :attr:`Radiograph.metadata`. Anything not listed here
#: (patient name, id, birth date, accession number, institution, ...) is dropped at read time.
SAFE_DICOM_FIELDS = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "ViewPosition": "view",
    "Laterality": "laterality",
    "ImageLaterality": "laterality",
    "PhotometricInterpretation": "photometric",
    "BitsStored": "bits_stored",
    "Manufacturer": "manufacturer",
}

_DICOM_MAGIC_OFFSET = 128


@dataclass
class Radiograph:
    """A decoded radiograph.

    Attributes:
        pixels: 2-D (grey) or 3-D (H, W, C) array as decoded. DICOM is already rescaled,
            windowed and oriented so that bone is bright, as uint8.
        source_format: "PNG", "JPEG", "DICOM", ... (Pillow's format name or "DICOM").
        metadata: safe technical metadata only (see :data:`SAFE_DICOM_FIELDS`).
        warnings: human-readable notes about the read (truncated JPEG, first frame only...).
        name: the file name, for display (never a path from the user's machine).
    """

    pixels: np.ndarray
    source_format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def read_radiograph(source: str | Path | bytes, name: str | None = None) -> Radiograph:
    """Read a PNG, JPEG or DICOM file from a path or from bytes.

    Args:
        source: a filesystem path or the raw bytes of an upload.
        name: display name; defaults to the path's file name.

    Raises:
        EmptyFileError, UnsupportedFileError, DicomReadError, NoPixelDataError,
        ImageTooLargeError, ImageTooSmallError: each with one sentence saying what is wrong.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        data = path.read_bytes()
        name = name or path.name
    else:
        data = bytes(source)
        name = name or "upload"
    if len(data) == 0:
        raise EmptyFileError(f"File is empty (0 bytes): {name}.")
    if _looks_like_dicom(data):
        rg = _read_dicom(data, name)
    else:
        rg = _read_pillow(data, name)
    if min(rg.height, rg.width) < MIN_SIDE:
        raise ImageTooSmallError(
            f"Image is too small to be a radiograph ({rg.width}x{rg.height} px; "
            f"at least {MIN_SIDE} px per side needed): {name}."
        )
    for note in rg.warnings:
        warnings.warn(f"{name}: {note}", stacklevel=2)
    return rg


def _looks_like_dicom(data: bytes) -> bool:
    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    # Headerless ("raw") DICOM starts with a group 0x0008 element, little endian.
    return data[:2] == b"\x08\x00" and len(data) > 8


def _check_pixel_count(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"Image declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), over the "
            f"{MAX_PIXELS / 1e6:.0f} MP limit; refusing to decode it: {name}."
        )


def _read_pillow(data: bytes, name: str) -> Radiograph:
    try:
        img = Image.open(_io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own guard fires on the header
        raise ImageTooLargeError(f"Image is too large to decode safely: {name}.") from exc
    except Exception as exc:
        raise UnsupportedFileError(
            f"File is not an image or DICOM we can read (PNG, JPEG or DICOM expected): {name}."
        ) from exc
    # The header is read; check the declared size before any pixel is allocated.
    _check_pixel_count(img.width, img.height, name)
    notes: list[str] = []
    fmt = img.format or "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except OSError as exc:
        if "truncated" not in str(exc).lower():
            raise UnsupportedFileError(f"Image file is damaged and cannot be decoded: {name}.") from exc
        img = _load_truncated(data, name)
        notes.append("file is truncated; the missing end was filled in (check the bottom rows)")
    if getattr(img, "n_frames", 1) > 1:
        notes.append(f"file holds {img.n_frames} frames; only the first is shown")
    # Phone photos of films carry their rotation in EXIF; show them the way the camera held them.
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    pixels = _pillow_to_array(img)
    return Radiograph(pixels=pixels, source_format=fmt, metadata={"modality": None}, warnings=notes, name=name)


def _load_truncated(data: bytes, name: str) -> Image.Image:
    # LOAD_TRUNCATED_IMAGES is a module global in Pillow; flip it only around this one decode.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        img = Image.open(_io.BytesIO(data))
        img.load()
        return img
    except Exception as exc:
        raise UnsupportedFileError(f"Image file is truncated beyond repair: {name}.") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _pillow_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
    elif mode == "CMYK":
        img = img.convert("RGB")
    elif mode in ("1", "LA"):
        img = img.convert("L")
    elif mode.startswith("I;16"):
        return np.asarray(img, dtype=np.uint16).copy()
    elif mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        return np.clip(arr, 0, 65535).astype(np.uint16)
    elif mode == "F":
        return np.asarray(img, dtype=np.float32).copy()
    elif mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGB")
    return np.asarray(img).copy()


def _read_dicom(data: bytes, name: str) -> Radiograph:
    import pydicom

    truncated = DicomReadError(f"DICOM file is truncated or unreadable: {name}.")
    try:
        # Any exception while parsing untrusted bytes means "unreadable" (pydicom raises struct.error,
        # BytesLengthException, ... on a header cut mid-element), never a traceback for the user.
        ds = pydicom.dcmread(_io.BytesIO(data), force=True)
    except Exception as exc:
        raise truncated from exc
    has_magic = data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"
    try:
        if _dicom_truncated(ds, len(data)) or (has_magic and len(ds.keys()) == 0):
            raise truncated  # cut inside an element, or inside the file meta before the data set
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            sop_class = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
            if not sop_class and not ds.get("Modality"):
                if has_magic:  # a DICOM preamble, but the header was cut before anything useful
                    raise truncated
                raise UnsupportedFileError(
                    f"File is not an image or DICOM we can read (PNG, JPEG or DICOM expected): {name}."
                )
            if "Image Storage" in str(getattr(sop_class, "name", "")):
                # An image object must carry pixel data: this one ends before it.
                raise DicomReadError(f"DICOM image file ends before its pixel data (truncated): {name}.")
            raise NoPixelDataError(
                f"DICOM file has no image (no pixel data), e.g. a report or a structured document: {name}."
            )
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        _ensure_transfer_syntax(ds)
    except (DicomReadError, NoPixelDataError, UnsupportedFileError):
        raise
    except Exception as exc:  # a malformed value in the header (wrong length, bad number...)
        raise truncated from exc
    _check_pixel_count(cols, rows * max(frames, 1), name)
    notes: list[str] = []
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DicomReadError(
            f"DICOM pixel data cannot be decoded (truncated file or unsupported compression): {name}."
        ) from exc
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[0]
        notes.append(f"multi-frame DICOM with {frames} frames; only the first is shown")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        pixels = _rgb_dicom_to_uint8(arr)
    else:
        pixels = _window_to_uint8(ds, arr.astype(np.float64))
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels  # bone bright, as in MONOCHROME2
    metadata: dict[str, Any] = {}
    for keyword, key in SAFE_DICOM_FIELDS.items():
        value = ds.get(keyword)
        if value not in (None, "") and key not in metadata:
            metadata[key] = str(value) if not isinstance(value, (int, float)) else value
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is not None:
        try:
            metadata["pixel_spacing_mm"] = [float(spacing[0]), float(spacing[1])]
        except (TypeError, ValueError, IndexError):
            pass
    metadata.setdefault("modality", None)
    return Radiograph(pixels=pixels, source_format="DICOM", metadata=metadata, warnings=notes, name=name)


def _ensure_transfer_syntax(ds: Any) -> None:
    """Give a headerless (raw data set) file the transfer syntax pydicom parsed it with.

    Without file meta, pydicom can read the header but refuses to decode the pixels.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    )


def _dicom_truncated(ds: Any, size: int) -> bool:
    """True when the last top-level element of a parsed file runs past the end of the bytes.

    pydicom silently keeps a short last value (and silently drops a cut element header), so the
    declared length of the last element is compared with what the file holds. A few stray bytes
    after the end count as a cut header only in a file without pixel data: after the image they
    are harmless padding some writers leave.
    """
    from pydicom.dataelem import RawDataElement

    tags = list(ds.keys())
    if not tags:
        return False
    last = ds.get_item(max(tags))
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return False  # converted already, or undefined length (encapsulated): decoding will tell
    end = last.value_tell + last.length
    return end > size or ("PixelData" not in ds and 0 < size - end < 8)


def _rgb_dicom_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.copy()
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).round().astype(np.uint8)


def _window_to_uint8(ds: Any, arr: np.ndarray) -> np.ndarray:
    """Modality LUT (rescale), then VOI LUT or window when present, else the stored bit range."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = arr * slope + intercept
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        from pydicom.pixels import apply_voi

        stored = arr.astype(np.int64) if slope == 1 and intercept == 0 else values
        out = np.asarray(apply_voi(stored, ds), dtype=np.float64)
        lo, hi = float(out.min()), float(out.max())
        return _scale(out, lo, hi)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if _is_multi(center) else center)
        w = float(width[0] if _is_multi(width) else width)
        if w > 1:
            # DICOM PS3.3 C.11.2.1.2.1 linear window.
            lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
            return _scale(values, lo, hi)
    bits = int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits:
        lo_s = -(2 ** (bits - 1)) if signed else 0
        hi_s = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        lo, hi = lo_s * slope + intercept, hi_s * slope + intercept
        # Many detectors use a small part of the stored range; fall back to the data range then,
        # otherwise a 16-bit container holding 12-bit data shows as an almost black image.
        if float(values.max()) - float(values.min()) < 0.25 * (hi - lo):
            lo, hi = float(values.min()), float(values.max())
    else:
        lo, hi = float(values.min()), float(values.max())
    return _scale(values, lo, hi)


def _is_multi(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, (str, bytes))


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    out = (np.clip(values, lo, hi) - lo) / (hi - lo) * 255.0
    return out.round().astype(np.uint8)
