"""boneai.preprocess: each step has the measurable effect it claims, on real radiographs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from boneai import preprocess as P

REPO_ROOT = Path(__file__).resolve().parents[1]

FRACATLAS_SAMPLES = [
    "fracatlas/IMG0000019.jpg", "fracatlas/IMG0000351.jpg", "fracatlas/IMG0000479.jpg",
    "fracatlas/IMG0002180.jpg", "fracatlas/IMG0002621.jpg", "fracatlas/IMG0000597.jpg",
    "fracatlas/IMG0000353.jpg", "fracatlas/IMG0000354.jpg", "fracatlas/IMG0000298.jpg",
    "fracatlas/IMG0000531.jpg",
]
BONEAGE_SAMPLES = ["boneage/1685.png", "boneage/2565.png"]
ALL_SAMPLES = FRACATLAS_SAMPLES + BONEAGE_SAMPLES


@pytest.fixture(scope="module")
def images(sample_gray) -> dict[str, np.ndarray]:
    return {name: sample_gray(name) for name in ALL_SAMPLES}


def _tile_std(img: np.ndarray, grid: int = 8) -> float:
    """Mean standard deviation over a grid x grid tiling: local contrast."""
    h, w = img.shape
    return float(np.mean([
        img[i * h // grid:(i + 1) * h // grid, j * w // grid:(j + 1) * w // grid].std()
        for i in range(grid) for j in range(grid)
    ]))


def _cdf_distance_to_uniform(img: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the grey-level CDF and a flat histogram's CDF."""
    cdf = np.cumsum(np.bincount(img.ravel(), minlength=256)) / img.size
    return float(np.abs(cdf - (np.arange(256) + 1) / 256).max())


def _edge_energy(img: np.ndarray) -> float:
    f = img.astype(np.float32)
    return float(np.hypot(cv2.Sobel(f, cv2.CV_32F, 1, 0), cv2.Sobel(f, cv2.CV_32F, 0, 1)).mean())


# --------------------------------------------------------------------------- standardise


def test_standardise_converts_colour_alpha_and_depth():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((70, 90, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(P.standardise(rgb).image, grey)
    np.testing.assert_array_equal(P.standardise(rgba).image, grey)
    deep = grey.astype(np.uint16) * 100 + 1000  # 1000..26500 in a 16-bit container
    out = P.standardise(deep)
    assert out.image.dtype == np.uint8 and out.image.min() == 0 and out.image.max() == 255
    assert np.corrcoef(out.image.ravel(), grey.ravel())[0, 1] > 0.999
    assert out.extras["window"] == (1000.0 + 100 * int(grey.min()), 1000.0 + 100 * int(grey.max()))


def test_standardise_percentiles_clip_outliers():
    img = np.full((100, 100), 100, np.uint8)
    img[:50] = 150
    img[0, 0], img[0, 1] = 0, 255  # two outlier pixels
    out = P.standardise(img, low_percentile=1, high_percentile=99).image
    assert out[10, 10] == 255 and out[90, 90] == 0  # the real range fills 0..255


# --------------------------------------------------------------------------- contrast


@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_clahe_raises_local_contrast(images, name):
    img = images[name]
    out = P.clahe(img).image
    assert out.shape == img.shape and out.dtype == np.uint8
    assert _tile_std(out) > 1.15 * _tile_std(img)


def test_clahe_clip_limit_controls_strength(images):
    img = images["fracatlas/IMG0000351.jpg"]
    gentle, strong = P.clahe(img, clip_limit=1.0).image, P.clahe(img, clip_limit=4.0).image
    assert _tile_std(strong) > _tile_std(gentle) > _tile_std(img) * 0.99


@pytest.mark.parametrize("name", FRACATLAS_SAMPLES)
def test_equalize_hist_flattens_the_histogram(images, name):
    img = images[name]
    out = P.equalize_hist(img).image
    before, after = _cdf_distance_to_uniform(img), _cdf_distance_to_uniform(out)
    # A grey level holding a fraction f of the pixels cannot be split: f is the best reachable.
    spike = np.bincount(img.ravel()).max() / img.size
    assert after <= spike + 0.01
    assert after < before - 0.005
    if spike < 0.2:
        assert after < 0.5 * before


@pytest.mark.parametrize("name", ["fracatlas/IMG0000351.jpg", "fracatlas/IMG0002180.jpg", "boneage/2565.png"])
def test_laplacian_sharpen_raises_edge_energy(images, name):
    img = images[name]
    out = P.laplacian_sharpen(img).image
    assert _edge_energy(out) > 1.5 * _edge_energy(img)
    np.testing.assert_array_equal(P.laplacian_sharpen(img, strength=0.0).image, img)
    # Stronger sharpening, more edge energy.
    assert _edge_energy(P.laplacian_sharpen(img, strength=2.0).image) > _edge_energy(out)


def test_low_contrast_flags_a_flat_image_but_not_the_samples(images):
    flat = (images["fracatlas/IMG0000351.jpg"] // 40 + 120).astype(np.uint8)  # 120..126
    flagged = P.low_contrast(flat)
    assert flagged.extras["low_contrast"] is True
    assert flagged.extras["contrast"] < 0.05
    for name, img in images.items():
        result = P.low_contrast(img)
        assert result.extras["low_contrast"] is False, name
        assert result.extras["contrast"] > 0.4, name
        np.testing.assert_array_equal(result.image, img)


# --------------------------------------------------------------------------- Otsu crop


@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_otsu_crop_removes_a_dark_padding(images, name):
    img = images[name]
    top, bottom, left, right = 80, 60, 100, 40
    padded = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    result = P.otsu_crop(padded)
    assert "fallback" not in result.extras, result.extras
    h, w = result.image.shape
    # Back to about the content size: the 2% margin on each side, plus a few pixels because the
    # border is found on a copy at most 256 px on a side.
    assert h <= img.shape[0] * 1.06 + 4 and w <= img.shape[1] * 1.06 + 4
    assert h >= 0.85 * img.shape[0] and w >= 0.6 * img.shape[1]  # bone-age: black beside the hand goes too
    x0, y0, x1, y1 = result.extras["crop"]
    assert x0 >= left - 0.025 * padded.shape[1] - 6 and y0 >= top - 0.025 * padded.shape[0] - 6
    tight = P.otsu_crop(padded, margin=0.0).image
    if name.startswith("fracatlas/"):  # no plain border of their own: exactly the padding goes
        assert abs(tight.shape[0] - img.shape[0]) <= 0.02 * img.shape[0] + 4
        assert abs(tight.shape[1] - img.shape[1]) <= 0.02 * img.shape[1] + 4
    else:
        assert tight.shape[0] <= img.shape[0] and tight.shape[1] <= img.shape[1]
    assert tight.shape[0] < h and tight.shape[1] < w


@pytest.mark.parametrize("name", FRACATLAS_SAMPLES)
def test_otsu_crop_leaves_a_borderless_radiograph_whole(images, name):
    img = images[name]
    result = P.otsu_crop(img)
    assert result.extras.get("fallback") == "no plain border around the image"
    np.testing.assert_array_equal(result.image, img)


def test_otsu_crop_never_cuts_anatomy_from_an_asymmetric_pad(images):
    img = images["fracatlas/IMG0000479.jpg"]
    padded = cv2.copyMakeBorder(img, 0, 150, 0, 0, cv2.BORDER_CONSTANT, value=255)  # white strip below
    result = P.otsu_crop(padded, margin=0.0)
    x0, y0, x1, y1 = result.extras["crop"]
    assert (x0, y0) == (0, 0) and x1 == img.shape[1]
    assert abs(y1 - img.shape[0]) <= 4


def test_otsu_crop_deskews_a_tilted_carrier(images):
    img = images["fracatlas/IMG0000351.jpg"]
    h, w = img.shape
    canvas = np.zeros((h + 300, w + 300), np.uint8)
    canvas[150:150 + h, 150:150 + w] = img
    turn = cv2.getRotationMatrix2D((canvas.shape[1] / 2, canvas.shape[0] / 2), 12, 1.0)
    tilted = cv2.warpAffine(canvas, turn, canvas.shape[::-1], flags=cv2.INTER_LINEAR, borderValue=0)
    result = P.otsu_crop(tilted, margin=0.0)
    assert result.extras["angle"] == pytest.approx(-12, abs=1.0)
    oh, ow = result.image.shape
    assert abs(oh - h) <= 0.03 * h + 3 and abs(ow - w) <= 0.03 * w + 3
    # Upright again: the centre of the crop matches the centre of the original.
    ch, cw = h // 4, w // 4
    crop_centre = cv2.resize(result.image, (w, h))[ch:-ch, cw:-cw].astype(float)
    assert np.corrcoef(crop_centre.ravel(), img[ch:-ch, cw:-cw].astype(float).ravel())[0, 1] > 0.9
    assert P.otsu_crop(tilted, max_skew_degrees=5).extras["fallback"].startswith("carrier tilted")


def test_otsu_crop_falls_back_on_a_uniform_image():
    uniform = np.full((300, 240), 128, np.uint8)
    result = P.otsu_crop(uniform)
    assert result.extras["fallback"] == "image has no contrast"
    assert result.extras["box"] is None
    np.testing.assert_array_equal(result.image, uniform)


def test_otsu_crop_falls_back_when_the_carrier_is_tiny(images):
    small = cv2.resize(images["fracatlas/IMG0000351.jpg"], (80, 60))
    canvas = np.zeros((600, 600), np.uint8)
    canvas[270:330, 260:340] = small
    assert P.otsu_crop(canvas).extras["fallback"] == "no carrier large enough"


# --------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("name", BONEAGE_SAMPLES)
def test_segmentation_covers_the_hand_and_little_background(images, name):
    img = images[name]
    seg = P.segment_foreground(img)
    mask = seg.extras["mask"] > 0
    hand, background = img > 80, img <= 10  # thresholds checked by eye on both samples
    assert hand.mean() > 0.2 and background.mean() > 0.4
    assert mask[hand].mean() > 0.97
    assert mask[background].mean() < 0.02
    assert seg.extras["coverage"] == pytest.approx(mask.mean())
    assert seg.extras["overlay"].shape == img.shape + (3,)
    np.testing.assert_array_equal(seg.image, img)


def test_segmentation_on_a_grey_noisy_background(images):
    img = images["boneage/2565.png"]
    rng = np.random.default_rng(1)
    noisy = np.clip(np.where(img <= 10, 25, img).astype(float) + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    mask = P.segment_foreground(noisy).extras["mask"] > 0
    assert mask[img > 80].mean() > 0.97
    assert mask[img <= 10].mean() < 0.02


def test_remove_background_zeroes_only_outside_the_mask(images):
    img = images["boneage/1685.png"]
    out = P.remove_background(img)
    mask = out.extras["mask"] > 0
    assert (out.image[~mask] == 0).all()
    np.testing.assert_array_equal(out.image[mask], img[mask])
    assert 0.2 < out.extras["coverage"] < 0.6


# --------------------------------------------------------------------------- sizes and channels


@pytest.mark.parametrize("name", ALL_SAMPLES)
@pytest.mark.parametrize("size", [224, 380])
def test_resize_pad_keeps_aspect_ratio_and_gives_a_square(images, name, size):
    img = images[name]
    result = P.resize_pad(img, size=size)
    out = result.image
    assert out.shape == (size, size) and out.dtype == img.dtype
    nw, nh = result.extras["content_size"]
    h, w = img.shape
    assert max(nw, nh) == size
    assert abs(nw - w * size / max(h, w)) <= 1 and abs(nh - h * size / max(h, w)) <= 1
    assert abs(nw / nh - w / h) <= 1.0 / min(nw, nh) * max(1.0, w / h) + 1e-9  # aspect within a pixel
    x0, y0 = result.extras["offset"]
    assert (x0, y0) == ((size - nw) // 2, (size - nh) // 2)
    pad = np.ones((size, size), bool)
    pad[y0:y0 + nh, x0:x0 + nw] = False
    assert (out[pad] == 0).all()
    # The content is the image, scaled: compare with a plain resize of the original.
    expected = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(out[y0:y0 + nh, x0:x0 + nw].astype(float) - expected).mean() < 3.0


def test_resize_pad_handles_colour_and_pad_value():
    rgb = np.full((60, 120, 3), 200, np.uint8)
    result = P.resize_pad(rgb, size=100, pad_value=17)
    assert result.image.shape == (100, 100, 3)
    assert result.extras["content_size"] == (100, 50)
    assert (result.image[:25] == 17).all() and (result.image[25:75] == 200).all()


@pytest.mark.parametrize("shape", [(1024, 788), (80, 70), (454, 373)])
def test_squash_resize_gives_exactly_the_size(shape):
    img = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    assert P.squash_resize(img, size=100).image.shape == (100, 100)
    assert P.squash_resize(img, size=37).image.shape == (37, 37)


def test_squash_resize_ignores_aspect_ratio(images):
    img = images["boneage/1685.png"]  # 1024x788, portrait
    out = P.squash_resize(img, size=100).image
    # Squashing stretches rows and columns by different factors: the content fills the square.
    expected = cv2.resize(img, (100, 100), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_to_three_channels_repeats_the_grey(images):
    img = images["fracatlas/IMG0000351.jpg"]
    out = P.to_three_channels(img).image
    assert out.shape == img.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], img)
    rgb_in = np.repeat(img[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(P.to_three_channels(rgb_in).image, out)


# --------------------------------------------------------------------------- purity and pipelines


@pytest.mark.parametrize("step", sorted(P.STEPS))
def test_steps_never_modify_their_input(images, step):
    img = images["fracatlas/IMG0000479.jpg"]
    before = img.copy()
    P.STEPS[step](img)
    np.testing.assert_array_equal(img, before)


def test_run_pipeline_returns_every_stage(images):
    img = images["fracatlas/IMG0000019.jpg"]
    pipeline = [{"step": "standardise"}, {"step": "clahe", "params": {"clip_limit": 3.0}},
                {"step": "resize_pad", "params": {"size": 128}}, {"step": "to_three_channels"}]
    stages = P.run_pipeline(img, pipeline)
    assert [s.step for s in stages] == ["standardise", "clahe", "resize_pad", "to_three_channels"]
    assert stages[1].params == {"clip_limit": 3.0}
    assert stages[2].result.image.shape == (128, 128)
    assert stages[-1].result.image.shape == (128, 128, 3)
    np.testing.assert_array_equal(P.apply_pipeline(img, pipeline), stages[-1].result.image)


@pytest.mark.parametrize("name", FRACATLAS_SAMPLES[:3])
def test_default_fracture_pipeline_gives_a_model_input(images, name):
    out = P.apply_pipeline(images[name], P.DEFAULT_FRACTURE_PIPELINE)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    assert out.std() > 10


@pytest.mark.parametrize(
    "pipeline, fragment",
    [
        ([{"step": "sharpen_more"}], "unknown step 'sharpen_more'"),
        ([{"step": "clahe"}, {"step": "resize_pad", "params": {"width": 224}}], "unknown parameter 'width'"),
        ([{"params": {}}], "unknown step None"),
        ([{"step": "clahe", "params": {"clip": 2}}], "step 0 \\(clahe\\)"),
    ],
)
def test_pipelines_reject_unknown_steps_and_params(images, pipeline, fragment):
    with pytest.raises(ValueError, match=fragment):
        P.validate_pipeline(pipeline)
    with pytest.raises(ValueError, match=fragment):
        P.run_pipeline(images["fracatlas/IMG0000351.jpg"], pipeline)


def test_step_defaults_read_the_signatures():
    assert P.step_defaults("clahe") == {"clip_limit": 2.0, "tile_grid": 8}
    assert P.step_defaults("resize_pad") == {"size": 224, "pad_value": 0}
    P.validate_pipeline(P.DEFAULT_FRACTURE_PIPELINE)  # the default passes its own check


def test_core_package_does_not_import_streamlit():
    code = ("import boneai, boneai.io, boneai.preprocess, boneai.data, sys; "
            "assert 'streamlit' not in sys.modules, 'streamlit imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (300, 200), (4100, 4100)])
def test_histogram_percentiles_equal_numpys(shape):
    from boneai.preprocess import _percentiles_u8

    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    if img.size > 100:
        img[: shape[0] // 2] = 0  # a heavy bin, as the black border of a radiograph
    qs = (0.0, 0.5, 2.0, 50.0, 98.0, 99.5, 100.0)
    assert np.allclose(_percentiles_u8(img, qs), np.percentile(img, qs))
