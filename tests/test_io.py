"""boneai.io: every format we accept decodes to the right pixels; every bad input fails clearly."""

from __future__ import annotations

import io
import struct
import threading
import time
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from boneai import errors
from boneai import io as boneai_io
from boneai.io import (
    MAX_PIXELS,
    MAX_STUDY_BYTES,
    MAX_STUDY_FILES,
    MIN_SIDE,
    Radiograph,
    check_study_upload,
    read_radiograph,
)
from boneai.preprocess import standardise

HAND = "fracatlas/IMG0000351.jpg"  # 454x373, stored as RGB though grey
HAND_GREY_JPEG = "fracatlas/IMG0000019.jpg"  # 819x1024, stored as 8-bit grey

#: FracAtlas files cut short by a few bytes at the end (Pillow refuses them without LOAD_TRUNCATED).
TRUNCATED_FRACATLAS = ["IMG0004298.jpg", "IMG0004028.jpg", "IMG0004347.jpg"]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _read_quietly(source, **kw) -> Radiograph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(source, **kw)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with a few bytes of image data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hand_rgb(samples_dir: Path) -> np.ndarray:
    with Image.open(samples_dir / HAND) as img:
        return np.asarray(img.convert("RGB")).copy()


@pytest.fixture(scope="module")
def hand_grey(hand_rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(hand_rgb).convert("L")).copy()


# --------------------------------------------------------------------------- PNG / JPEG


def test_sample_jpeg_from_path_keeps_size_name_and_format(samples_dir: Path):
    rg = read_radiograph(samples_dir / HAND_GREY_JPEG)
    assert rg.source_format == "JPEG"
    assert rg.pixels.shape == (1024, 819) and rg.pixels.dtype == np.uint8
    assert (rg.height, rg.width) == (1024, 819)
    assert rg.name == "IMG0000019.jpg"
    assert rg.warnings == []


def test_rgb_stored_jpeg_keeps_three_equal_looking_channels(samples_dir: Path, hand_rgb: np.ndarray):
    rg = read_radiograph((samples_dir / HAND).read_bytes(), name="hand.jpg")
    assert rg.pixels.shape == (373, 454, 3)
    assert rg.name == "hand.jpg"
    np.testing.assert_array_equal(rg.pixels, hand_rgb)


def test_bytes_without_name_get_a_generic_display_name(hand_grey: np.ndarray):
    rg = read_radiograph(_encode(Image.fromarray(hand_grey), "PNG"))
    assert rg.name == "upload"


def test_png_8bit_grey_is_lossless(hand_grey: np.ndarray):
    rg = read_radiograph(_encode(Image.fromarray(hand_grey), "PNG"))
    assert rg.source_format == "PNG"
    assert rg.pixels.dtype == np.uint8
    np.testing.assert_array_equal(rg.pixels, hand_grey)


def test_png_16bit_keeps_full_depth(hand_grey: np.ndarray):
    # Spread the 8-bit values over 16 bits with low-bit detail an 8-bit path would lose.
    deep = hand_grey.astype(np.uint16) * 257 + np.arange(hand_grey.size, dtype=np.uint16).reshape(hand_grey.shape) % 7
    rg = read_radiograph(_encode(Image.fromarray(deep), "PNG"))
    assert rg.pixels.dtype == np.uint16
    np.testing.assert_array_equal(rg.pixels, deep)
    grey = standardise(rg.pixels).image
    assert grey.dtype == np.uint8 and grey.min() == 0 and grey.max() == 255


def test_png_rgb_and_rgba_decode_to_their_channels(hand_rgb: np.ndarray):
    rgb = read_radiograph(_encode(Image.fromarray(hand_rgb), "PNG"))
    np.testing.assert_array_equal(rgb.pixels, hand_rgb)
    alpha = np.full(hand_rgb.shape[:2] + (1,), 200, np.uint8)
    rgba_arr = np.concatenate([hand_rgb, alpha], axis=2)
    rgba = read_radiograph(_encode(Image.fromarray(rgba_arr, "RGBA"), "PNG"))
    assert rgba.pixels.shape == hand_rgb.shape[:2] + (4,)
    # Alpha is dropped by standardise; the grey content is the same as without alpha.
    np.testing.assert_array_equal(standardise(rgba.pixels).image, standardise(rgb.pixels).image)


def test_palette_png_decodes_through_its_palette(hand_grey: np.ndarray):
    pal = Image.fromarray(hand_grey).convert("P")  # grey palette, 256 entries
    rg = read_radiograph(_encode(pal, "PNG"))
    assert rg.pixels.shape == hand_grey.shape + (3,)
    # Palette indices would be meaningless; the palette colours are the grey levels.
    assert np.abs(standardise(rg.pixels).image.astype(int) - hand_grey.astype(int)).max() <= 1


def test_palette_png_with_transparency_keeps_alpha(hand_grey: np.ndarray):
    pal = Image.fromarray(hand_grey).convert("P")
    rg = read_radiograph(_encode(pal, "PNG", transparency=0))
    assert rg.pixels.shape == hand_grey.shape + (4,)


def test_cmyk_jpeg_is_converted_to_rgb(hand_rgb: np.ndarray):
    cmyk = Image.fromarray(hand_rgb).convert("CMYK")
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rg = read_radiograph(data)
    assert rg.pixels.shape == hand_rgb.shape
    # Not inverted (Adobe CMYK JPEGs store inverted ink) and close to the original.
    assert np.abs(rg.pixels.astype(int) - hand_rgb.astype(int)).mean() < 2.0


def test_one_bit_and_grey_alpha_png_become_grey():
    bw = np.zeros((80, 90), np.uint8)
    bw[20:60, 30:70] = 255
    rg = read_radiograph(_encode(Image.fromarray(bw).convert("1"), "PNG"))
    assert rg.pixels.ndim == 2
    np.testing.assert_array_equal(rg.pixels, bw)
    la = Image.merge("LA", [Image.fromarray(bw), Image.new("L", (90, 80), 255)])
    np.testing.assert_array_equal(read_radiograph(_encode(la, "PNG")).pixels, bw)


def test_exif_orientation_is_applied(hand_grey: np.ndarray):
    img = Image.fromarray(hand_grey)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": how a phone held sideways tags its photo
    rg = read_radiograph(_encode(img, "JPEG", quality=95, exif=exif))
    assert rg.pixels.shape == hand_grey.shape[::-1]
    upright = np.rot90(hand_grey, k=-1)
    assert np.abs(rg.pixels.astype(int) - upright.astype(int)).mean() < 2.0


# --------------------------------------------------------------------------- truncated JPEG


def test_truncated_jpeg_loads_with_a_warning(samples_dir: Path, hand_rgb: np.ndarray):
    full = (samples_dir / HAND).read_bytes()
    cut = full[: len(full) - 200]
    with pytest.raises(OSError):  # plain Pillow refuses it: the file really is truncated
        Image.open(io.BytesIO(cut)).load()
    with pytest.warns(UserWarning, match="truncated"):
        rg = read_radiograph(cut, name="cut.jpg")
    assert rg.pixels.shape == hand_rgb.shape
    assert any("truncated" in note for note in rg.warnings)
    # The top of the image decodes as in the complete file.
    top = rg.pixels[: rg.height // 2].astype(int) - hand_rgb[: rg.height // 2].astype(int)
    assert np.abs(top).max() == 0
    # The module-global Pillow switch is restored.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("image_id", TRUNCATED_FRACATLAS)
def test_fracatlas_truncated_files_load_with_a_warning(fracatlas_root: Path, image_id: str):
    path = next((fracatlas_root / "images").glob(f"*/{image_id}"), None)
    if path is None:
        pytest.skip(f"{image_id} not in this copy of FracAtlas")
    with pytest.raises(OSError, match="truncated"):
        Image.open(path).load()
    with pytest.warns(UserWarning, match=image_id):
        rg = read_radiograph(path)
    assert min(rg.height, rg.width) >= 300
    assert any("truncated" in note for note in rg.warnings)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- DICOM


def _ramp(rows: int = 64, cols: int = 80, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, cols).round().astype(np.uint16), (rows, 1))


def test_dicom_rescale_slope_and_intercept_are_applied(dicom_bytes):
    stored = _ramp(top=1000)
    # Rescaled values are 2*stored - 1000, i.e. -1000..1000; the window covers -500..500.
    data = dicom_bytes(stored, bits_stored=12, rescale=(2.0, -1000.0), window=(0.5, 1001))
    px = read_radiograph(data).pixels
    values = 2.0 * stored[0] - 1000.0
    expected = np.clip((values + 500) / 1000 * 255, 0, 255).round()
    assert np.abs(px[0].astype(int) - expected).max() <= 1
    assert (px[0][values <= -500] == 0).all() and (px[0][values >= 500] == 255).all()
    # Ignoring the rescale would put the window over stored values 0..500 instead.
    assert px[0][stored[0] <= 250].max() == 0


def test_dicom_window_is_applied(dicom_bytes):
    stored = _ramp()
    px = read_radiograph(dicom_bytes(stored, bits_stored=12, window=(1000, 500))).pixels
    row, s = px[0], stored[0]
    assert (row[s < 750] == 0).all()
    assert (row[s > 1250] == 255).all()
    mid = (s > 760) & (s < 1240)
    assert mid.sum() >= 5 and ((row[mid] > 0) & (row[mid] < 255)).all()
    assert (np.diff(row.astype(int)) >= 0).all()


def test_dicom_multi_valued_window_uses_the_first(dicom_bytes):
    stored = _ramp()
    one = read_radiograph(dicom_bytes(stored, bits_stored=12, window=(1000, 500))).pixels
    two = read_radiograph(dicom_bytes(stored, bits_stored=12, window=([1000, 3000], [500, 2000]))).pixels
    np.testing.assert_array_equal(one, two)


def test_dicom_voi_lut_is_applied_when_present(dicom_bytes):
    stored = _ramp()
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).round().astype(int)  # strongly non-linear
    data = dicom_bytes(stored, bits_stored=12, voi_lut=([4096, 0, 16], lut), window=(100, 50))
    row = read_radiograph(data).pixels[0].astype(int)
    expected = np.sqrt(stored[0] / 4095) * 255
    assert np.abs(row - expected).max() <= 1
    # Mid-grey input maps well above mid-grey: the LUT won over the (also present) window.
    assert row[len(row) // 4] > 110


def test_dicom_without_window_uses_the_stored_bit_range(dicom_bytes):
    stored = _ramp(top=4095)
    stored[:, :10] = 2048  # mid-range value must land on mid-grey
    px = read_radiograph(dicom_bytes(stored, bits_stored=12)).pixels
    assert px[0, 0] == 128
    assert px[0, -1] == 255


def test_dicom_narrow_data_falls_back_to_the_data_range(dicom_bytes):
    # 12-bit container holding values 1000..1400 only: the bit range would show almost flat grey.
    stored = _ramp(top=400) + 1000
    px = read_radiograph(dicom_bytes(stored, bits_stored=12)).pixels
    assert px.min() == 0 and px.max() == 255


def test_monochrome1_and_monochrome2_of_the_same_image_agree(dicom_bytes, hand_grey):
    bone_bright = hand_grey.astype(np.uint16) * 16  # 12-bit, bone bright (MONOCHROME2)
    inverted = 4095 - bone_bright  # how a MONOCHROME1 detector stores the same exposure
    m2 = read_radiograph(dicom_bytes(bone_bright, bits_stored=12, photometric="MONOCHROME2")).pixels
    m1 = read_radiograph(dicom_bytes(inverted, bits_stored=12, photometric="MONOCHROME1")).pixels
    assert np.abs(m1.astype(int) - m2.astype(int)).max() <= 1
    # And bone stays bright: the result follows the original grey levels.
    assert np.corrcoef(m2.ravel(), hand_grey.ravel())[0, 1] > 0.99


def test_monochrome1_with_window_agrees_too(dicom_bytes):
    stored = _ramp()
    m2 = read_radiograph(dicom_bytes(stored, bits_stored=12, window=(2000, 2000))).pixels
    m1 = read_radiograph(dicom_bytes(4095 - stored, bits_stored=12, window=(2095, 2000),
                                     photometric="MONOCHROME1")).pixels
    assert np.abs(m1.astype(int) - m2.astype(int)).max() <= 1


def test_signed_dicom_is_scaled_over_its_signed_range(dicom_bytes):
    stored = (_ramp().astype(np.int32) - 2048).astype(np.int16)
    px = read_radiograph(dicom_bytes(stored, bits_stored=12, signed=True)).pixels
    assert px[0, 0] == 0 and px[0, -1] == 255
    assert (np.diff(px[0].astype(int)) >= 0).all()


def test_multiframe_dicom_shows_the_first_frame_with_a_note(dicom_bytes):
    frames = np.stack([_ramp(), 4095 - _ramp(), np.full((64, 80), 2000, np.uint16)])
    with pytest.warns(UserWarning, match="3 frames"):
        rg = read_radiograph(dicom_bytes(frames, bits_stored=12), name="multi.dcm")
    assert rg.pixels.shape == (64, 80)
    first = _read_quietly(dicom_bytes(frames[0], bits_stored=12)).pixels
    np.testing.assert_array_equal(rg.pixels, first)
    assert any("multi-frame" in note and "first" in note for note in rg.warnings)


def test_dicom_keeps_safe_technical_metadata(dicom_bytes):
    data = dicom_bytes(_ramp(), bits_stored=12,
                       extra={"PixelSpacing": [0.143, 0.143], "Laterality": "L", "Manufacturer": "Acme"})
    rg = read_radiograph(data, name="hand.dcm")
    assert rg.source_format == "DICOM"
    assert rg.metadata["modality"] == "DX"
    assert rg.metadata["body_part"] == "HAND"
    assert rg.metadata["laterality"] == "L"
    assert rg.metadata["bits_stored"] == 12
    assert rg.metadata["pixel_spacing_mm"] == pytest.approx([0.143, 0.143])


def test_patient_identifiers_never_leave_io(dicom_bytes, patient_identifiers):
    data = dicom_bytes(_ramp(), bits_stored=12, extra={"PatientSex": "F", "StudyDate": "20240102"})
    assert patient_identifiers["PatientID"].encode() in data  # they are in the file...
    rg = read_radiograph(data, name="study.dcm")
    text = " ".join([repr(rg), str(rg.metadata), str(rg.warnings), rg.name]
                    + [repr(v) for v in rg.metadata.values()] + [repr(k) for k in rg.metadata])
    forbidden = list(patient_identifiers.values()) + ["Doe", "Jane", "4471", "19610417", "88812345",
                                                      "St Elsewhere", "House"]
    for value in forbidden:
        assert value not in text, f"{value!r} leaked into the Radiograph"
    for key in rg.metadata:
        assert "patient" not in key.lower() and "accession" not in key.lower()


def test_headerless_dicom_is_recognised(dicom_bytes):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(_ramp(), bits_stored=12)))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    buf = io.BytesIO()
    # Raw data set, implicit VR little endian, no preamble or file meta (old PACS exports).
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"
    rg = read_radiograph(raw)
    assert rg.source_format == "DICOM" and rg.pixels.shape == (64, 80)


# --------------------------------------------------------------------------- bad inputs


def _not_an_image_random() -> bytes:
    data = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert data[:2] != b"\x08\x00"
    return data


BAD_INPUTS = {
    "empty": (lambda mk, s: b"", errors.EmptyFileError, "empty"),
    "random_bytes": (lambda mk, s: _not_an_image_random(), errors.UnsupportedFileError, "not an image"),
    "text_file": (lambda mk, s: b"patient,age\nA,34\n" * 20, errors.UnsupportedFileError, "not an image"),
    "truncated_dicom": (lambda mk, s: mk(_ramp(), bits_stored=12)[:5000], errors.DicomReadError, "truncated"),
    "truncated_dicom_header": (lambda mk, s: mk(_ramp(), bits_stored=12)[:300], errors.DicomReadError, "truncated"),
    "dicom_without_pixels": (lambda mk, s: mk(None), errors.NoPixelDataError, "no pixel data"),
    "png_bomb": (lambda mk, s: _png_header_only(20_000, 20_000), errors.ImageTooLargeError, "too large"),
    "png_over_limit": (lambda mk, s: _png_header_only(10_000, 10_000), errors.ImageTooLargeError, "100 MP"),
    "tiny_png": (lambda mk, s: _encode(Image.new("L", (20, 20), 128), "PNG"), errors.ImageTooSmallError, "20x20"),
    "thin_jpeg": (lambda mk, s: _encode(Image.new("L", (400, MIN_SIDE - 1), 128), "JPEG"),
                  errors.ImageTooSmallError, "too small"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_its_own_error(case, dicom_bytes, samples_dir):
    make, expected, fragment = BAD_INPUTS[case]
    data = make(dicom_bytes, samples_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the truncated files
        with pytest.raises(expected, match=fragment) as info:
            read_radiograph(data, name=f"{case}.bin")
    assert type(info.value) is expected  # not just a subclass / the base class
    assert isinstance(info.value, errors.BoneAIError)
    assert f"{case}.bin" in str(info.value)  # says which file


def test_each_failure_kind_has_a_distinct_class_and_message(dicom_bytes, samples_dir):
    seen: dict[type, str] = {}
    for make, expected, _ in BAD_INPUTS.values():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_radiograph(make(dicom_bytes, samples_dir), name="x")
        except errors.BoneAIError as exc:
            seen.setdefault(type(exc), str(exc).split(":")[0])
    assert set(seen) == {errors.EmptyFileError, errors.UnsupportedFileError, errors.DicomReadError,
                         errors.NoPixelDataError, errors.ImageTooLargeError, errors.ImageTooSmallError}
    assert len(set(seen.values())) == len(seen), seen


def test_empty_file_on_disk(tmp_path: Path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"")
    with pytest.raises(errors.EmptyFileError, match="scan.png"):
        read_radiograph(path)


@pytest.mark.parametrize("side", [20_000, 10_000])
def test_oversized_png_is_refused_before_decoding(side, monkeypatch):
    data = _png_header_only(side, side)
    assert side * side > MAX_PIXELS

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded for an image over the size limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(errors.ImageTooLargeError):
            read_radiograph(data, name="bomb.png")
    # Decoding 100-400 MP would take seconds and hundreds of MB; the header check takes milliseconds.
    assert time.perf_counter() - start < 1.0


def test_oversized_dicom_is_refused_before_decoding(dicom_bytes):
    data = dicom_bytes(_ramp(), bits_stored=12, extra={"Rows": 20_000, "Columns": 20_000})
    start = time.perf_counter()
    with pytest.raises(errors.ImageTooLargeError, match="20000x20000"):
        read_radiograph(data, name="huge.dcm")
    assert time.perf_counter() - start < 1.0


def test_image_just_at_the_minimum_side_is_accepted():
    rg = read_radiograph(_encode(Image.new("L", (MIN_SIDE, 300), 90), "PNG"))
    assert rg.width == MIN_SIDE


def test_dicom_cut_at_any_byte_fails_with_dicom_read_error(dicom_bytes):
    """pydicom raises struct.error / BytesLengthException or silently keeps a short last element,
    depending on where a file is cut; every cut after the DICM magic must read as truncated."""
    data = dicom_bytes(_ramp(), bits_stored=12)
    header_end = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data tag
    cuts = list(range(132, header_end + 12)) + list(range(header_end + 12, len(data), 97))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cut in cuts:
            with pytest.raises(errors.DicomReadError):
                read_radiograph(data[:cut], name=f"cut{cut}.dcm")


def test_dicom_with_stray_bytes_after_the_pixels_still_reads(dicom_bytes):
    data = dicom_bytes(_ramp(), bits_stored=12)
    clean = read_radiograph(data).pixels
    for junk in (b"\x00", b"\x00\x00\x00"):
        np.testing.assert_array_equal(read_radiograph(data + junk).pixels, clean)


# --------------------------------------------------------------------------- hostile and unusual files


def _recoded(dicom: bytes, syntax: str, frame: bytes | None = None, **attrs) -> bytes:
    """The same DICOM under another transfer syntax: ``frame`` (one codestream) encapsulated as its
    pixel data, or, without it, the data set as it is (pydicom deflates it for the deflate syntax)."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(dicom))
    ds.file_meta.TransferSyntaxUID = syntax
    if frame is not None:
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _compressed(dicom: bytes, syntax: str, **kw) -> bytes:
    """The DICOM compressed by pydicom's own encoders (pyjpegls, pylibjpeg-openjpeg)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom))
    ds.compress(syntax, **kw)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _raw_pixels(dicom: bytes) -> np.ndarray:
    import pydicom

    return pydicom.dcmread(io.BytesIO(dicom)).pixel_array


def _jpeg_lossless_sv1(pixels: np.ndarray) -> bytes:
    """A 2-D uint16 image as a JPEG Lossless codestream: process 14, predictor 1 (left neighbour),
    16-bit precision, no point transform (ISO 10918-1 annex H). Written here so the test does not
    trust the decoder's own encoder; one Huffman table with all 17 difference categories 5 bits long."""
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]
    pred[1:, 0] = x[:-1, 0]  # the first column is predicted from above
    pred[0, 0] = 1 << 15
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)  # differences are taken modulo 2^16
    out, acc, nbits = bytearray(), 0, 0
    for d in diff.ravel().tolist():
        category = abs(d).bit_length()
        acc, nbits = (acc << 5) | category, nbits + 5  # canonical code of symbol k is k on 5 bits
        if 0 < category < 16:  # category 16 (difference 32768) has no extra bits
            acc, nbits = (acc << category) | (d if d > 0 else d + (1 << category) - 1), nbits + category
        while nbits >= 8:
            nbits -= 8
            out.append((acc >> nbits) & 0xFF)
            if out[-1] == 0xFF:
                out.append(0)  # byte stuffing
        acc &= (1 << nbits) - 1
    if nbits:
        out.append(((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF)  # pad with 1-bits
        if out[-1] == 0xFF:
            out.append(0)

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    rows, cols = pixels.shape
    sof3 = struct.pack(">BHHB", 16, rows, cols, 1) + bytes([1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, Ss = predictor 1, Se 0, Al 0
    return b"\xff\xd8" + segment(0xC3, sof3) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(out) + b"\xff\xd9"


def _set_codestream_size(frame: bytes, width: int, height: int) -> bytes:
    """The codestream with its frame header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) declaring another size."""
    data = bytearray(frame)
    if data[:2] == b"\xff\xd8":
        pos = 2
        while data[pos + 1] not in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    else:
        at = data.index(b"\xff\x4f\xff\x51")
        data[at + 8:at + 24] = struct.pack(">IIII", width, height, 0, 0)
    return bytes(data)


def _first_frame(dicom: bytes) -> bytes:
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(io.BytesIO(dicom))
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _detailed(bits: int) -> np.ndarray:
    """A 96x128 image using the whole range of ``bits``, with noise (every difference category)."""
    rng = np.random.default_rng(bits)
    top = 2**bits - 1
    img = np.tile(np.linspace(0, top, 128), (96, 1)) + rng.normal(0, top / 50, (96, 128))
    img[10:20, 10:20] = rng.integers(0, top + 1, (10, 10))  # jumps between the extremes
    img[0, :4] = [0, top, 0, top]
    return np.clip(img, 0, top).round().astype(np.uint16)


# Item: deflate-compressed DICOM is inflated with a cap (pydicom inflates it whole inside dcmread).


def test_deflated_dicom_reads_like_the_uncompressed_file(dicom_bytes):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = dicom_bytes(_ramp(), bits_stored=12, window=(1000, 500))
    deflated = _recoded(plain, DeflatedExplicitVRLittleEndian)
    assert len(deflated) < len(plain) / 2  # really compressed
    np.testing.assert_array_equal(read_radiograph(deflated).pixels, read_radiograph(plain).pixels)


def test_deflated_dicom_bomb_is_refused_without_inflating_it_whole(dicom_bytes, monkeypatch):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    # 4 MB of pixel data deflate to a few kB; with a 1 MB cap the file is a bomb.
    bomb = _recoded(dicom_bytes(np.zeros((1024, 2048), np.uint16)), DeflatedExplicitVRLittleEndian)
    assert len(bomb) < 20_000
    monkeypatch.setattr(boneai_io, "MAX_INFLATED_BYTES", 2**20)

    def no_whole_inflate(*a, **k):
        raise AssertionError("the data set was inflated in one go, without a size cap")

    monkeypatch.setattr(zlib, "decompress", no_whole_inflate)  # what pydicom's dcmread uses
    with pytest.raises(errors.ImageTooLargeError, match=r"inflates to more than 1 MB.*bomb\.dcm"):
        read_radiograph(bomb, name="bomb.dcm")


def test_deflated_dicom_cut_short_is_truncated(dicom_bytes):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = _recoded(dicom_bytes(_detailed(12), bits_stored=12), DeflatedExplicitVRLittleEndian)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(errors.DicomReadError, match="cut.dcm"):
            read_radiograph(data[: len(data) * 2 // 3], name="cut.dcm")


# Item: compressed frames declare their own size; it is checked before any decoder allocates it.


@pytest.mark.parametrize("syntax_name", ["JPEGBaseline8Bit", "JPEGLSLossless", "JPEG2000Lossless"])
def test_compressed_dicom_decodes(dicom_bytes, hand_grey, syntax_name):
    import pydicom.uid

    syntax = getattr(pydicom.uid, syntax_name)
    if syntax_name == "JPEGBaseline8Bit":
        plain = dicom_bytes(hand_grey)
        data = _recoded(plain, syntax, _encode(Image.fromarray(hand_grey), "JPEG", quality=95))
        assert np.abs(read_radiograph(data).pixels.astype(int) - hand_grey.astype(int)).mean() < 2.0
    else:
        plain = dicom_bytes(hand_grey.astype(np.uint16) * 16, bits_stored=12)
        data = _compressed(plain, syntax)
        np.testing.assert_array_equal(read_radiograph(data).pixels, read_radiograph(plain).pixels)


@pytest.mark.parametrize("syntax_name", ["JPEGBaseline8Bit", "JPEGLSLossless", "JPEG2000Lossless"])
def test_compressed_frame_declaring_a_bomb_is_refused_before_decoding(dicom_bytes, monkeypatch, syntax_name):
    import pydicom.dataset
    import pydicom.uid

    syntax = getattr(pydicom.uid, syntax_name)
    if syntax_name == "JPEGBaseline8Bit":
        frame = _encode(Image.fromarray(_ramp(top=255).astype(np.uint8)), "JPEG")
    else:
        frame = _first_frame(_compressed(dicom_bytes(_ramp(), bits_stored=12), syntax))
    pixels = _ramp(top=255).astype(np.uint8) if syntax_name == "JPEGBaseline8Bit" else _ramp()
    # Rows/Columns say 64x80, well within the limit; the codestream itself says 20000x20000.
    data = _recoded(dicom_bytes(pixels), syntax, _set_codestream_size(frame, 20_000, 20_000))

    def no_decode(self):
        raise AssertionError("pixels were decoded for a frame over the size limit")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decode))
    with pytest.raises(errors.ImageTooLargeError, match=r"20000x20000.*lying\.dcm"):
        read_radiograph(data, name="lying.dcm")


def test_frame_header_behind_large_padding_segments_is_still_checked(dicom_bytes, monkeypatch):
    import pydicom.dataset
    from pydicom.uid import JPEGBaseline8Bit

    pixels = _ramp(top=255).astype(np.uint8)
    frame = _set_codestream_size(_encode(Image.fromarray(pixels), "JPEG"), 20_000, 20_000)
    padding = (b"\xff\xef" + struct.pack(">H", 65535) + bytes(65533)) * 2  # two APP15 segments, 128 kB
    data = _recoded(dicom_bytes(pixels), JPEGBaseline8Bit, frame[:2] + padding + frame[2:])

    def no_decode(self):
        raise AssertionError("pixels were decoded for a frame over the size limit")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decode))
    with pytest.raises(errors.ImageTooLargeError, match="20000x20000"):
        read_radiograph(data, name="padded.dcm")


# Item: the lossless syntaxes CR/DX archives use decode, exactly.


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("syntax_name", ["JPEGLosslessSV1", "JPEGLossless"])
def test_jpeg_lossless_dicom_decodes_exactly(dicom_bytes, syntax_name, bits):
    import pydicom.uid

    stored = _detailed(bits)
    plain = dicom_bytes(stored, bits_stored=bits)
    data = _recoded(plain, getattr(pydicom.uid, syntax_name), _jpeg_lossless_sv1(stored))
    np.testing.assert_array_equal(_raw_pixels(data), stored)
    rg = read_radiograph(data)
    np.testing.assert_array_equal(rg.pixels, read_radiograph(plain).pixels)


@pytest.mark.parametrize("bits", [12, 16])
def test_jpeg_ls_dicom_decodes_exactly(dicom_bytes, bits):
    from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless

    stored = _detailed(bits)
    plain = dicom_bytes(stored, bits_stored=bits)
    lossless = _compressed(plain, JPEGLSLossless)
    np.testing.assert_array_equal(_raw_pixels(lossless), stored)
    np.testing.assert_array_equal(read_radiograph(lossless).pixels, read_radiograph(plain).pixels)
    # Near-lossless: every stored value within the declared error (2) of the original.
    near = _compressed(plain, JPEGLSNearLossless, jls_error=2)
    assert np.abs(_raw_pixels(near).astype(int) - stored.astype(int)).max() <= 2
    assert np.abs(read_radiograph(near).pixels.astype(int) - read_radiograph(plain).pixels.astype(int)).max() <= 1


@pytest.mark.parametrize(("uid", "label"), [
    ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
    ("1.2.840.10008.1.2.4.94", "JPIP Referenced"),
    ("1.2.3.4.5.6", "unknown transfer syntax"),
])
def test_undecodable_transfer_syntax_is_named_with_its_uid(dicom_bytes, uid, label):
    data = _recoded(dicom_bytes(_ramp(top=255).astype(np.uint8)), uid, b"\x00" * 64)
    with pytest.raises(errors.DicomReadError) as info:
        read_radiograph(data, name="video.dcm")
    message = str(info.value)
    assert label in message and uid in message and "video.dcm" in message


# Item: only PNG, JPEG and DICOM are opened; no other Pillow plugin sees the bytes.


def _eps_like() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\n"
            b"newpath 0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n")


OTHER_FORMATS = {
    "GIF": lambda: _encode(Image.new("L", (100, 100), 90), "GIF"),
    "BMP": lambda: _encode(Image.new("L", (100, 100), 90), "BMP"),
    "TIFF": lambda: _encode(Image.new("I;16", (100, 100), 900), "TIFF"),
    "PostScript (EPS)": _eps_like,
}


@pytest.mark.parametrize("kind", sorted(OTHER_FORMATS))
def test_formats_we_do_not_claim_are_refused(kind, monkeypatch):
    from PIL import EpsImagePlugin

    def no_ghostscript(*a, **k):
        raise AssertionError("Ghostscript was started for an uploaded file")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    with pytest.raises(errors.UnsupportedFileError) as info:
        read_radiograph(OTHER_FORMATS[kind](), name="scan.img")
    message = str(info.value)
    assert kind in message and "PNG, JPEG or DICOM" in message and "scan.img" in message


# Item: palette colour and float DICOM.


def test_palette_color_dicom_goes_through_its_palette(dicom_bytes):
    index = np.tile(np.arange(80, dtype=np.uint8) * 3, (64, 1))
    inverted = (65535 - np.arange(256) * 257).astype("<u2").tobytes()  # index i -> grey 255 - i
    palette = {}
    for colour in ("Red", "Green", "Blue"):
        palette[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        palette[f"{colour}PaletteColorLookupTableData"] = inverted
    rg = read_radiograph(dicom_bytes(index, photometric="PALETTE COLOR", extra=palette))
    assert rg.pixels.shape == (64, 80, 3) and rg.pixels.dtype == np.uint8
    np.testing.assert_array_equal(rg.pixels[..., 0], 255 - index)
    np.testing.assert_array_equal(standardise(rg.pixels).image, 255 - index)  # to grey as colour images are


def _float_dicom(dicom_bytes, values: np.ndarray) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros(values.shape, np.uint16))))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = values.dtype.itemsize * 8
    setattr(ds, "FloatPixelData" if values.dtype == np.float32 else "DoubleFloatPixelData", values.tobytes())
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_dicom_reads_and_nan_or_inf_is_refused(dicom_bytes, dtype):
    values = np.tile(np.linspace(-1, 1, 80, dtype=dtype), (64, 1))
    rg = read_radiograph(_float_dicom(dicom_bytes, values))
    assert rg.pixels[0, 0] == 0 and rg.pixels[0, -1] == 255
    for bad in (np.nan, np.inf, -np.inf):
        broken = values.copy()
        broken[30, 40] = bad
        with pytest.raises(errors.DicomReadError, match=r"NaN or infinite.*float\.dcm"):
            read_radiograph(_float_dicom(dicom_bytes, broken), name="float.dcm")


# Item: truncated images load per call, never through Pillow's process-wide switch.


class _SwitchSpy(types.ModuleType):
    """Module class for PIL.ImageFile that records every assignment to LOAD_TRUNCATED_IMAGES."""

    writes: list = []

    def __setattr__(self, key, value):
        if key == "LOAD_TRUNCATED_IMAGES":
            _SwitchSpy.writes.append(value)
        super().__setattr__(key, value)


def test_truncated_images_never_set_pillows_global_switch(samples_dir, hand_grey, monkeypatch):
    monkeypatch.setattr(_SwitchSpy, "writes", [])
    monkeypatch.setattr(ImageFile, "__class__", _SwitchSpy)
    cut_jpeg = (samples_dir / HAND).read_bytes()[:-200]
    cut_png = _encode(Image.fromarray(hand_grey), "PNG")[:-2000]
    for data in (cut_jpeg, cut_png):
        rg = _read_quietly(data)
        assert any("truncated" in note for note in rg.warnings)
    assert _SwitchSpy.writes == []


def test_truncated_jpeg_keeps_its_warning_while_another_thread_reads(samples_dir, hand_rgb):
    full = (samples_dir / HAND).read_bytes()
    cut = full[:-200]
    expected = read_radiograph(full).pixels
    seen: dict[str, list] = {"cut": [], "whole": [], "switch": []}

    def read_many(data: bytes, kind: str) -> None:
        for _ in range(25):
            rg = read_radiograph(data, name=f"{kind}.jpg")
            seen[kind].append((rg.warnings, rg.pixels.shape))
            seen["switch"].append(ImageFile.LOAD_TRUNCATED_IMAGES)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are checked on the Radiographs
        threads = [threading.Thread(target=read_many, args=(cut, "cut")),
                   threading.Thread(target=read_many, args=(full, "whole"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(seen["cut"]) == len(seen["whole"]) == 25
    assert all(any("truncated" in n for n in notes) and shape == hand_rgb.shape for notes, shape in seen["cut"])
    assert all(notes == [] and shape == expected.shape for notes, shape in seen["whole"])
    assert not any(seen["switch"]) and ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("interlace", [False, True])
def test_truncated_png_loads_with_a_warning(hand_grey, interlace):
    deep = np.tile(hand_grey, (2, 2)).astype(np.uint16) * 257
    data = _encode(Image.fromarray(deep), "PNG", interlace=interlace)
    # Cut mid-way through the image data, and cut inside a chunk header (Pillow: SyntaxError).
    starts = [i for i in range(len(data)) if data.startswith(b"IDAT", i)]
    for cut in (len(data) // 2, starts[1] + 1):
        rg = _read_quietly(data[:cut], name="cut.png")
        assert rg.pixels.shape == deep.shape and rg.pixels.dtype == np.uint16
        assert any("truncated" in note for note in rg.warnings)
        if not interlace:  # rows come in order: the top quarter is intact
            np.testing.assert_array_equal(rg.pixels[: deep.shape[0] // 8], deep[: deep.shape[0] // 8])
    with pytest.raises(errors.UnsupportedFileError, match="cut.png"):
        read_radiograph(data[:40], name="cut.png")  # nothing of the image left


# Item: bounded study uploads.


def test_study_upload_limits():
    check_study_upload([])
    check_study_upload([MAX_STUDY_BYTES // MAX_STUDY_FILES] * MAX_STUDY_FILES)
    with pytest.raises(errors.StudyTooLargeError, match=rf"Too many files.*{MAX_STUDY_FILES + 1}"):
        check_study_upload([1000] * (MAX_STUDY_FILES + 1))
    with pytest.raises(errors.StudyTooLargeError, match="too large"):
        check_study_upload([MAX_STUDY_BYTES // 2, MAX_STUDY_BYTES // 2 + 1])
    assert issubclass(errors.StudyTooLargeError, errors.BoneAIError)
