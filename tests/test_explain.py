"""Heatmaps: geometry back to the original image, both logit signs, hook hygiene, overlays, real CAMs."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from boneai.errors import BoneAIError
from boneai.explain import CAM_METHODS, DEFAULT_CAM_METHOD, explain, overlay, to_original
from boneai.io import read_radiograph
from boneai.preprocess import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FAST_METHODS = ["gradcam", "gradcam++", "eigencam", "layercam"]
_PIPELINE = [{"step": "standardise", "params": {}}, {"step": "otsu_crop", "params": {}},
             {"step": "resize_pad", "params": {"size": 224}}]


# -- geometry (no model needed) ---------------------------------------------------------------------

def _tilted_carrier(angle: float) -> tuple[np.ndarray, tuple[int, int]]:
    """A bright film carrier tilted by ``angle`` on a dark background, with a white marker inside it."""
    img = np.full((420, 330), 10, np.uint8)
    box = cv2.boxPoints(((170, 200), (220, 300), angle)).astype(np.int32)
    cv2.fillPoly(img, [box], 120)
    marker = (215, 130)
    cv2.circle(img, marker, 4, 255, -1)
    return img, marker


@pytest.mark.parametrize("angle", [0.0, 9.0, -12.0])
def test_to_original_undoes_letterbox_crop_and_deskew(angle):
    img, (mx, my) = _tilted_carrier(angle)
    stages = run_pipeline(img, _PIPELINE)
    crop = stages[1].result.extras
    assert crop.get("crop") is not None
    square = stages[-1].result.image
    sy, sx = np.unravel_index(np.argmax(cv2.GaussianBlur(square.astype(np.float32), (0, 0), 2)), square.shape)
    # A heatmap peaked where the model saw the marker ...
    yy, xx = np.mgrid[: square.shape[0], : square.shape[1]]
    square_map = np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * 3.0 ** 2)).astype(np.float32)
    full = to_original(square_map, stages, img.shape)
    # ... peaks at the marker in the original pixels.
    assert full.shape == img.shape
    py, px = np.unravel_index(np.argmax(full), full.shape)
    assert abs(px - mx) <= 4 and abs(py - my) <= 4, ((px, py), (mx, my), angle)
    # Outside the crop there is no heat.
    assert full[0, 0] == 0 and full[-1, -1] == 0


def test_to_original_undoes_the_bone_age_squash():
    img = np.zeros((300, 150), np.uint8)
    img[30:270, 20:130] = 100
    img[60, 110] = 255
    steps = [{"step": "standardise", "params": {}}, {"step": "squash_resize", "params": {"size": 100}},
             {"step": "resize_pad", "params": {"size": 128}}]
    stages = run_pipeline(img, steps)
    square_map = np.zeros((128, 128), np.float32)
    square_map[round(60 / 300 * 128), round(110 / 150 * 128)] = 1.0
    full = to_original(cv2.GaussianBlur(square_map, (0, 0), 2), stages, img.shape)
    py, px = np.unravel_index(np.argmax(full), full.shape)
    assert full.shape == (300, 150) and abs(px - 110) <= 3 and abs(py - 60) <= 5


def test_overlay_is_rgb_blend_with_an_outline_of_the_hottest_region():
    gray = np.full((120, 90), 100, np.uint8)
    heat = np.zeros((60, 45), np.float32)  # another size: resized to the image
    heat[10:20, 10:20] = 1.0
    plain = overlay(gray, heat, opacity=0.0, outline=False)
    assert plain.shape == (120, 90, 3) and plain.dtype == np.uint8
    assert np.all(plain == 100)
    outlined = overlay(gray, heat, opacity=0.0, outline=True)
    white = np.all(outlined == 255, axis=2)
    assert white.any() and white[:60, :60].sum() == white.sum()  # the outline surrounds the hot square only
    tinted = overlay(gray, heat, opacity=0.5, colormap="jet", outline=False)
    assert tinted[30, 30, 0] > tinted[100, 80, 0]  # hot = red in jet, cold = blue
    with pytest.raises(BoneAIError):
        overlay(gray, heat, colormap="rainbow-unicorn")


# -- real fracture model ----------------------------------------------------------------------------



def _sample(file: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(SAMPLES / file)


def _boxes(file: str) -> list[list[float]]:
    table = pd.read_csv(SAMPLES / "samples.csv")
    return ast.literal_eval(table.loc[table["file"] == file, "fracture_boxes"].iloc[0])


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", FAST_METHODS)
def test_cam_maps_have_the_image_size_and_are_not_constant(fracture, method):
    rg = _sample("fracatlas/IMG0000351.jpg")
    heat = explain(fracture, rg, method)
    assert heat.map.shape == rg.pixels.shape[:2] and heat.map.dtype == np.float32
    assert 0.0 <= heat.map.min() and heat.map.max() == pytest.approx(1.0)
    assert heat.map.std() > 0.02
    x, y = heat.peak
    assert heat.map[y, x] == heat.map.max()
    assert _hooks(fracture.model) == 0


def test_both_logit_signs_give_different_sensible_maps(fracture):
    rg = _sample("fracatlas/IMG0000351.jpg")
    pos = explain(fracture, rg, "gradcam", target="positive").map
    neg = explain(fracture, rg, "gradcam", target="negative").map
    assert pos.std() > 0.02 and neg.std() > 0.02
    # Grad-CAM of -logit has the opposite channel weights: it highlights other regions.
    assert float(np.abs(pos - neg).mean()) > 0.05
    assert float(np.corrcoef(pos.ravel(), neg.ravel())[0, 1]) < 0.5


def test_explain_releases_hooks_and_restores_the_training_flag(fracture):
    model = fracture.model
    rg = _sample("fracatlas/IMG0000597.jpg")
    model.train()
    try:
        for method in FAST_METHODS:
            explain(fracture, rg, method)
            assert _hooks(model) == 0, method
            assert model.training, method
        with pytest.raises(BoneAIError):
            explain(fracture, rg, "no-such-cam")
        assert _hooks(model) == 0
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def _distance_to_boxes(point: tuple[int, int], boxes: list[list[float]]) -> float:
    x, y = point
    return min(float(np.hypot(max(bx - x, 0, x - bx - bw), max(by - y, 0, y - by - bh))) for bx, by, bw, bh in boxes)


def _gray(rg) -> np.ndarray:
    return rg.pixels if rg.pixels.ndim == 2 else cv2.cvtColor(rg.pixels[:, :, :3], cv2.COLOR_RGB2GRAY)


def _inpaint_boxes(gray: np.ndarray, boxes: list[list[float]], pad: float = 0.5) -> np.ndarray:
    """Paint the boxes over from their surroundings (no sharp edge for the CAM to latch onto).

    The boxes are enlarged by ``pad`` of their size on each side: FracAtlas boxes are tight, and one
    cell of a 7x7 CAM covers about 60 px of a 450 px radiograph.
    """
    hole = np.zeros_like(gray)
    for x, y, w, h in boxes:
        x0, y0 = int(max(0, x - pad * w)), int(max(0, y - pad * h))
        x1, y1 = int(min(gray.shape[1], x + (1 + pad) * w)), int(min(gray.shape[0], y + (1 + pad) * h))
        hole[y0:y1, x0:x1] = 255
    return cv2.inpaint(gray, hole, 5, cv2.INPAINT_TELEA)


def test_cam_peak_moves_when_the_fracture_is_masked_out(fracture):
    """On the fractured sample where the model points closest to the fracture, hiding it moves the peak away."""
    table = pd.read_csv(SAMPLES / "samples.csv")
    files = table[(table["label"] == 1) & table["file"].str.startswith("fracatlas/")]["file"].tolist()
    found = []
    for f in files:
        gray = _gray(_sample(f))
        heat = explain(fracture, gray, DEFAULT_CAM_METHOD)
        found.append((_distance_to_boxes(heat.peak, _boxes(f)), f, gray, heat))
    distance, file, gray, before = min(found, key=lambda t: t[0])
    assert distance < 40, f"no fractured sample has its heatmap peak near the fracture ({distance:.0f} px)"
    masked = _inpaint_boxes(gray, _boxes(file))
    after = explain(fracture, masked, DEFAULT_CAM_METHOD)
    moved = float(np.hypot(before.peak[0] - after.peak[0], before.peak[1] - after.peak[1]))
    assert moved > 20, (file, before.peak, after.peak)
    assert _distance_to_boxes(after.peak, _boxes(file)) > distance
    # The fracture logit drops when the fracture is hidden.
    assert fracture.predict(masked).logit < fracture.predict(gray).logit


def test_default_method_is_one_of_the_methods():
    assert DEFAULT_CAM_METHOD in CAM_METHODS
    assert set(FAST_METHODS + ["scorecam"]) == set(CAM_METHODS)


def test_predict_fracture_heatmap_dir_writes_pngs(fracture, tmp_path, capsys):
    from PIL import Image

    from boneai.cli import main

    files = [SAMPLES / "fracatlas/IMG0000351.jpg", SAMPLES / "fracatlas/IMG0000597.jpg"]
    heat_dir = tmp_path / "maps"
    assert main(["predict", *map(str, files), "--heatmap-dir", str(heat_dir), "--cam-method", "gradcam++"]) == 0
    for f in files:
        with Image.open(heat_dir / f"{f.stem}_heatmap.png") as im, Image.open(f) as src:
            assert im.size == src.size and im.mode == "RGB"


def test_the_first_page_s_modules_import_neither_grad_cam_nor_scikit_learn() -> None:
    """Both load on first use (a heatmap, a metric): together about 1.5 s of the app's cold start, which
    its first page (Study review with the localiser's boxes) does not need."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; import boneai.inference, boneai.explain, boneai.evaluate, boneai.scope, boneai.report, "
            "boneai.study, boneai.localisation; print(sorted(m for m in ('sklearn', 'pytorch_grad_cam') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
