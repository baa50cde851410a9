"""boneai.io: every format we accept decodes to the right pixels; every bad input fails clearly."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from boneai import errors
from boneai.io import MAX_PIXELS, MIN_SIDE, Radiograph, read_radiograph
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
