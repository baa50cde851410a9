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
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from boneai.errors import (
    DicomReadError,
    EmptyFileError,
    ImageTooLargeError,
    ImageTooSmallError,
    NoPixelDataError,
    StudyTooLargeError,
    UnsupportedFileError,
)

__all__ = [
    "Radiograph",
    "read_radiograph",
    "check_study_upload",
    "MAX_PIXELS",
    "MIN_SIDE",
    "MAX_INFLATED_BYTES",
    "MAX_STUDY_FILES",
    "MAX_STUDY_BYTES",
    "SAFE_DICOM_FIELDS",
]

#: Largest image we decode (width x height). A 43x43 cm detector at 0.1 mm is about 18.5 MP,
#: so 80 MP leaves room for stitched long-leg films while refusing decompression bombs.
MAX_PIXELS = 80_000_000
#: Smallest side we accept. The RSNA bone-age copy is 100x100, so the limit sits below that.
MIN_SIDE = 64
#: Largest data set a deflate-compressed DICOM may inflate to: a 16-bit image at the pixel limit
#: plus room for the header. Deflate reaches ratios over 1000:1, so a small file can hide gigabytes.
MAX_INFLATED_BYTES = 2 * MAX_PIXELS + 16 * 2**20
#: Most files in one study upload. A radiographic study has a handful of views; the limit leaves
#: room for long series while keeping one upload from filling the server's memory.
MAX_STUDY_FILES = 40
#: Most bytes in one study upload (all files together): each file is held in memory while decoded.
MAX_STUDY_BYTES = 400 * 2**20

#: The Pillow formats we claim. Any other plugin (EPS calls Ghostscript, TIFF/BMP/GIF...) is never
#: tried: each one is extra attack surface, and a format we don't claim is one we don't test.
_PILLOW_FORMATS = ["PNG", "JPEG"]
#: File signatures of common formats we refuse, so the message can say what the file is.
_OTHER_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",  # only with the zero reserved fields that follow it (see _other_format)
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"%!PS": "PostScript (EPS)",
    b"\xc5\xd0\xd3\xc6": "PostScript (EPS)",
    b"%PDF": "PDF",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"\xffO\xffQ": "JPEG 2000",
    b"PK\x03\x04": "ZIP archive",
}
#: JPEG frame header (SOF) markers that carry the image size: ISO 10918 SOF0-SOF15 less DHT (C4),
#: JPG (C8) and DAC (CC), plus JPEG-LS SOF55 (F7).
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
#: How far into a JP2-wrapped frame we look for its codestream header (the boxes before it are small).
_CODESTREAM_HEADER_SCAN = 64 * 1024

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


def check_study_upload(sizes: list[int]) -> None:
    """Refuse a study upload with too many files or too many bytes, before any file is decoded.

    Args:
        sizes: the size in bytes of each uploaded file.

    Raises:
        StudyTooLargeError: over :data:`MAX_STUDY_FILES` files or :data:`MAX_STUDY_BYTES` in all.
    """
    if len(sizes) > MAX_STUDY_FILES:
        raise StudyTooLargeError(
            f"Too many files for one study ({len(sizes)}; at most {MAX_STUDY_FILES}): "
            "upload the views of one study only, or split the upload."
        )
    total = sum(int(size) for size in sizes)
    if total > MAX_STUDY_BYTES:
        raise StudyTooLargeError(
            f"Study upload is too large ({total / 2**20:.0f} MB; at most {MAX_STUDY_BYTES / 2**20:.0f} MB "
            "in all): upload fewer files, or the views of one study only."
        )


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
        # Only the formats we claim: no other Pillow plugin ever sees the bytes (EPS would run Ghostscript).
        img = Image.open(_io.BytesIO(data), formats=_PILLOW_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own guard fires on the header
        raise ImageTooLargeError(f"Image is too large to decode safely: {name}.") from exc
    except Exception as exc:
        other = _other_format(data)
        if other is not None:
            raise UnsupportedFileError(
                f"{other} files are not accepted (PNG, JPEG or DICOM expected); "
                f"save the image as PNG or JPEG, or send the DICOM: {name}."
            ) from exc
        raise UnsupportedFileError(
            f"File is not an image or DICOM we can read (PNG, JPEG or DICOM expected): {name}."
        ) from exc
    # The header is read; check the declared size before any pixel is allocated.
    _check_pixel_count(img.width, img.height, name)
    notes: list[str] = []
    fmt = img.format or "image"
    try:
        # No warnings.catch_warnings() here: it swaps process-wide filters, racing other sessions' reads.
        # Pillow's bomb warning fires in open(), never in load(), and our own limit is below it anyway.
        img.load()
    except Exception as exc:  # OSError mostly; a PNG cut inside a chunk header raises SyntaxError
        cut_png = fmt == "PNG" and b"IEND" not in data[-12:]
        if "truncated" not in str(exc).lower() and not cut_png:
            raise UnsupportedFileError(f"Image file is damaged and cannot be decoded: {name}.") from exc
        img = _load_truncated(data, fmt, name)
        notes.append("file is truncated; the missing end was filled in (check the bottom rows)")
    if getattr(img, "n_frames", 1) > 1:
        notes.append(f"file holds {img.n_frames} frames; only the first is shown")
    # Phone photos of films carry their rotation in EXIF; show them the way the camera held them.
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    pixels = _pillow_to_array(img)
    return Radiograph(pixels=pixels, source_format=fmt, metadata={"modality": None}, warnings=notes, name=name)


def _other_format(data: bytes) -> str | None:
    """The name of a common image or document format we refuse, from its signature; None if unknown."""
    for magic, kind in _OTHER_SIGNATURES.items():
        if data.startswith(magic) and (magic != b"BM" or data[6:10] == bytes(4)):
            return kind
    return None


def _load_truncated(data: bytes, fmt: str, name: str) -> Image.Image:
    """Decode a cut-off PNG or JPEG as Pillow's LOAD_TRUNCATED_IMAGES would, without touching it.

    That switch is a process-wide global: set by one Streamlit session, it would let another
    session's truncated file load silently, without its warning. So the bytes are completed
    instead, for this one decode: a JPEG gets the end-of-image marker Pillow itself appends when
    the switch is on (libjpeg then fills the missing blocks exactly as with the switch); a PNG is
    rebuilt from the image data it holds, the missing rows black as with the switch.
    """
    completed = _complete_truncated_png(data) if fmt == "PNG" else data + b"\xff\xd9"
    try:
        if completed is None:
            raise ValueError("the PNG is cut before its image data")
        img = Image.open(_io.BytesIO(completed), formats=_PILLOW_FORMATS)
        img.load()
        return img
    except Exception as exc:
        raise UnsupportedFileError(f"Image file is truncated beyond repair: {name}.") from exc


#: Adam7 interlace passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _complete_truncated_png(data: bytes) -> bytes | None:
    """A complete PNG with the header chunks and image data a cut-off PNG holds; None if it has none.

    The compressed image data are inflated as far as they go and padded with zero bytes (filter
    "none", value 0) up to the size the header declares, then stored again as one IDAT chunk.
    """
    pos, head, idat, ihdr = 8, [], bytearray(), b""
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        elif idat:
            break  # the first chunk after the image data: nothing further is needed
        elif pos + 12 + length > len(data):
            return None  # cut inside a header chunk, before any image data
        elif kind not in (b"acTL", b"fcTL"):  # animation chunks: keep the default image only
            if kind == b"IHDR":
                ihdr = data[pos + 8:pos + 8 + length]
            head.append(data[pos:pos + 12 + length])
        pos += 12 + length
    if len(ihdr) != 13 or not idat:
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    if interlace:
        passes = [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7]
    else:
        passes = [(width, height)]
    expected = sum(h * (1 + (w * bits + 7) // 8) for w, h in passes if w > 0 and h > 0)
    try:
        raw = zlib.decompressobj().decompress(bytes(idat), expected)  # bounded by the declared size
    except zlib.error:
        return None
    raw += bytes(expected - len(raw))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return data[:8] + b"".join(head) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


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
    # pydicom inflates a deflate-compressed data set whole inside dcmread, before any size check;
    # inflate it here instead, with a cap, and parse the inflated data set.
    inflated = _inflate_deflated_dicom(data, name)
    payload = data if inflated is None else inflated[0]
    try:
        # Any exception while parsing untrusted bytes means "unreadable" (pydicom raises struct.error,
        # BytesLengthException, ... on a header cut mid-element), never a traceback for the user.
        ds = pydicom.dcmread(_io.BytesIO(payload), force=True)
    except Exception as exc:
        raise truncated from exc
    if inflated is not None:
        ds.file_meta = inflated[1]
    has_magic = data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"
    try:
        if _dicom_truncated(ds, len(payload)) or (has_magic and len(ds.keys()) == 0):
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
    syntax = ds.file_meta.TransferSyntaxUID
    _check_decodable(syntax, name)
    _check_codestream_sizes(ds, frames, name)
    notes: list[str] = []
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DicomReadError(
            f"DICOM pixel data cannot be decoded (truncated file, or damaged {_syntax_label(syntax)} "
            f"data): {name}."
        ) from exc
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[0]
        notes.append(f"multi-frame DICOM with {frames} frames; only the first is shown")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        # NaN and inf have no grey level: windowing would turn them into black or white pixels silently.
        raise DicomReadError(
            f"DICOM float pixel data hold NaN or infinite values; the image cannot be shown faithfully. "
            f"Ask for the image exported again from the modality: {name}."
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        # The stored values are indices into the palette, not grey levels.
        pixels = _palette_to_uint8(ds, arr, name)
    elif arr.ndim == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
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
    terms = _described_terms(ds)
    if terms:
        metadata["described_terms"] = terms
    metadata.setdefault("modality", None)
    return Radiograph(pixels=pixels, source_format="DICOM", metadata=metadata, warnings=notes, name=name)


#: Free-text attributes that name the examination ("XR CHEST PA AND LAT", "HAND 3 VIEWS RT").
DESCRIPTION_FIELDS = ("StudyDescription", "SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription")


def _described_terms(ds: Any) -> list[str]:
    """The body-part words of the examination's descriptions, and nothing else of that free text.

    Many archives leave BodyPartExamined empty and name the examination in its descriptions only.
    Free text may hold anything (a name, a comment), so only words of the scope check's anatomy
    vocabulary (:data:`boneai.scope.DESCRIPTION_TERMS`) are kept.
    """
    from boneai.scope import DESCRIPTION_TERMS

    words: set[str] = set()
    for keyword in DESCRIPTION_FIELDS:
        try:
            words.update(re.findall(r"[A-Z]+", str(ds.get(keyword, "") or "").upper()))
        except Exception:  # noqa: BLE001 - a malformed description says nothing
            continue
    return sorted(words & DESCRIPTION_TERMS)


def _inflate_deflated_dicom(data: bytes, name: str) -> tuple[bytes, Any] | None:
    """The inflated data set and the file meta of a deflate-compressed DICOM; None for any other file.

    Raises:
        ImageTooLargeError: the data set inflates past :data:`MAX_INFLATED_BYTES` (a decompression
            bomb); inflation stops at the cap, so no more than that is ever allocated.
        DicomReadError: the compressed stream is damaged or cut short.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] != b"DICM":
        return None  # deflate needs the file meta that names it: a raw data set is never deflated
    fp = _io.BytesIO(data)
    fp.seek(_DICOM_MAGIC_OFFSET + 4)
    try:
        # The file meta (group 0002) is always explicit VR little endian and never compressed.
        meta = FileMetaDataset(
            read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                         stop_when=lambda tag, vr, length: tag >> 16 != 0x0002)
        )
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None
    except Exception:
        return None  # an unreadable file meta: the normal reading path reports it
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[fp.tell():], MAX_INFLATED_BYTES + 1)
    except zlib.error as exc:
        raise DicomReadError(f"DICOM file is truncated or unreadable (damaged compressed data): {name}.") from exc
    if len(inflated) > MAX_INFLATED_BYTES:
        raise ImageTooLargeError(
            f"Compressed DICOM inflates to more than {MAX_INFLATED_BYTES / 2**20:.0f} MB, over the limit "
            f"for one image; refusing to decode it: {name}."
        )
    if not inflater.eof:
        raise DicomReadError(f"DICOM file is truncated or unreadable (compressed data cut short): {name}.")
    return inflated, meta


def _syntax_label(syntax: Any) -> str:
    """'<name> (<UID>)' for a transfer syntax, for messages."""
    known = syntax.is_valid and syntax.is_transfer_syntax
    return f"{syntax.name} ({syntax})" if known else f"unknown transfer syntax ({syntax})"


def _check_decodable(syntax: Any, name: str) -> None:
    """Refuse, naming the compression, pixel data that no installed decoder can read."""
    from pydicom.pixels import get_decoder

    try:
        available = bool(get_decoder(syntax).is_available)
    except Exception:  # NotImplementedError: pydicom knows no decoder for this transfer syntax at all
        available = False
    if not available:
        raise DicomReadError(
            f"DICOM pixel data use a compression this installation cannot decode: {_syntax_label(syntax)}. "
            f"Ask for the image exported uncompressed, as JPEG Lossless, JPEG-LS or JPEG 2000: {name}."
        )


def _check_codestream_sizes(ds: Any, frames: int, name: str) -> None:
    """Check the size each compressed frame declares in its own header, before any is decoded.

    The decoder allocates what the codestream declares, whatever Rows and Columns say, so a lying
    frame header could still be a decompression bomb. Frames whose header we cannot read (RLE,
    unusual layouts) rely on the Rows/Columns check and on the decoder's own length checks.
    """
    from pydicom.encaps import generate_fragmented_frames

    if not ds.file_meta.TransferSyntaxUID.is_encapsulated or "PixelData" not in ds:
        return
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    total = 0
    try:
        frame_list = generate_fragmented_frames(ds.PixelData, number_of_frames=frames, extended_offsets=offsets)
        for fragments in frame_list:
            size = _codestream_size(fragments[0]) if fragments else None
            if size is not None:
                _check_pixel_count(*size, name)
                total += size[0] * size[1]
    except ImageTooLargeError:
        raise
    except Exception:
        return  # malformed encapsulation: decoding will fail on it with its own message
    if total > MAX_PIXELS:
        raise ImageTooLargeError(
            f"DICOM frames declare {total / 1e6:.0f} MP in all, over the {MAX_PIXELS / 1e6:.0f} MP limit; "
            f"refusing to decode them: {name}."
        )


def _codestream_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG, JPEG-LS or JPEG 2000 codestream header; None when not found.

    The JPEG walk jumps from segment to segment, so padding before the frame header cannot hide it.
    """
    if head[:2] == b"\xff\xd8":  # JPEG / JPEG-LS: marker segments up to the frame header (SOF)
        pos = 2
        while pos + 4 <= len(head):
            if head[pos] != 0xFF:
                return None
            marker = head[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
                pos += 2
                continue
            if marker in _JPEG_SOF_MARKERS:
                if pos + 9 > len(head):
                    return None
                height, width = struct.unpack(">HH", head[pos + 5:pos + 9])
                return (width, height) if width and height else None  # height 0: set later by DNL
            if marker == 0xDA:  # scan data before any frame header
                return None
            pos += 2 + struct.unpack(">H", head[pos + 2:pos + 4])[0]
        return None
    if head[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000 codestream: SOC, then SIZ always first
        at = 0
    elif head[4:8] == b"jP  ":  # JP2 file format (not DICOM's, but some writers use it): find the codestream
        at = head.find(b"\xff\x4f\xff\x51", 0, _CODESTREAM_HEADER_SCAN)
    else:
        return None
    if at < 0 or at + 24 > len(head):
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", head[at + 8:at + 24])
    return (xsiz - x0, ysiz - y0) if xsiz > x0 and ysiz > y0 else None


def _palette_to_uint8(ds: Any, arr: np.ndarray, name: str) -> np.ndarray:
    """PALETTE COLOR indices through the file's palette, as an RGB uint8 image."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = np.asarray(apply_color_lut(arr, ds))
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:
        raise DicomReadError(
            f"DICOM palette colour image has a missing or damaged palette; it cannot be shown: {name}."
        ) from exc
    if bits <= 8:
        return np.clip(rgb, 0, 255).astype(np.uint8)
    # 16-bit palette entries span 0..65535 whatever the data use; scale by that, not the data range.
    return (rgb.astype(np.float64) / 65535.0 * 255.0).round().clip(0, 255).astype(np.uint8)


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
