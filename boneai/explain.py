"""Heatmaps: the Grad-CAM family for the classifiers and regressor, error maps for anomaly models.

Every map is returned on the radiograph's own pixel grid: the model-input square is mapped back
through the pipeline's geometric steps (``resize_pad`` letterbox, ``squash_resize``, ``otsu_crop``
crop and deskew), using the extras that :func:`boneai.preprocess.run_pipeline` records.

Our classifiers have ONE output, the fracture logit. Grad-CAM explains whatever scalar the target
returns, so "fracture" is the logit itself and "no fracture" is the negated logit. (The library's
``BinaryClassifierOutputTarget`` multiplies by -1 for category 0, which silently explains the
opposite class when a caller passes the predicted class of a sigmoid output; we do not use it.)

Example:
    >>> from boneai.explain import explain, overlay                     # doctest: +SKIP
    >>> heat = explain(load_model("fracture"), radiograph, "gradcam")  # doctest: +SKIP
    >>> rgb = overlay(standardise(radiograph.pixels).image, heat.map)  # doctest: +SKIP
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from boneai.errors import BoneAIError
from boneai.io import Radiograph
from boneai.models import cam_target_layer
from boneai.predictor import ModelPredictor
from boneai.preprocess import Stage, map_to_original, run_pipeline, standardise

__all__ = ["CAM_METHODS", "DEFAULT_CAM_METHOD", "COLORMAPS", "Heatmap", "LogitTarget", "explain", "cam_on_input",
           "to_original", "overlay", "heatmap_png"]

#: Grad-CAM family by name: the pytorch-grad-cam class of each (ScoreCAM needs one forward pass per
#: channel: slow on a CPU). The package is imported on the first heatmap (:func:`_cam_class`): it imports
#: scikit-learn, about 1.5 s of the app's cold start that a first page showing boxes does not need.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
}

#: Chosen by the pointing game on the 121 fractured FracAtlas validation images with boxes, shipped
#: fracture model (bench/cam_localisation.py, bench/results/cam_localisation.json): GradCAM 0.058,
#: EigenCAM 0.050, LayerCAM 0.050, GradCAM++ 0.041 - no method beats the image centre (0.058; random
#: point 0.009) and the differences are within the bootstrap intervals. GradCAM is also the cheapest.
#: Rerun the bench when the shipped fracture model changes.
DEFAULT_CAM_METHOD = "gradcam"

COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA, "viridis": cv2.COLORMAP_VIRIDIS, "hot": cv2.COLORMAP_HOT,
    "plasma": cv2.COLORMAP_PLASMA,
}


@dataclass
class Heatmap:
    """A heatmap on the radiograph's pixel grid.

    Attributes:
        map: float32 in [0, 1], same height and width as the radiograph's standardised pixels.
        method: "gradcam", ..., or "reconstruction_error" for anomaly models.
        peak: (x, y) of the hottest pixel, in original pixels.
    """

    map: np.ndarray
    method: str
    peak: tuple[int, int]


class LogitTarget:
    """Grad-CAM target for a single-output model: ``sign * output``.

    ``LogitTarget(+1)`` explains the positive class (fracture, or an older bone age), ``LogitTarget(-1)``
    the negative one. Works for outputs of shape () or (1,) per sample.
    """

    def __init__(self, sign: float = 1.0) -> None:
        self.sign = float(sign)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return self.sign * model_output.reshape(-1)[0]


class _SexBound(nn.Module):
    """Bone-age regressor with the sex input fixed, so the CAM library can call ``model(x)``."""

    def __init__(self, model: nn.Module, male: bool) -> None:
        super().__init__()
        self.model = model
        self.male = float(male)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        male = torch.full((x.shape[0],), self.male, dtype=x.dtype, device=x.device)
        return self.model(x, male).reshape(-1, 1)


def _target_sign(target: str) -> float:
    if target in ("positive", "fracture", "abnormal", "older"):
        return 1.0
    if target in ("negative", "no fracture", "normal", "younger"):
        return -1.0
    raise BoneAIError(f"Unknown explanation target {target!r}; use 'positive' or 'negative'.")


def _cam_class(method: str) -> type:
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, CAM_METHODS[method])


def cam_on_input(predictor: ModelPredictor, image: Radiograph | np.ndarray, method: str | None = None, male: bool | None = None,
                 target: str = "positive") -> np.ndarray:
    """The CAM on the model-input square (S x S, float32 in [0, 1]).

    The CAM object is used as a context manager, so its hooks are removed even on errors, and
    the model's training flag and gradients are restored afterwards.
    """
    method = method or DEFAULT_CAM_METHOD
    if method not in CAM_METHODS:
        raise BoneAIError(f"Unknown heatmap method {method!r}; available: {', '.join(CAM_METHODS)}.")
    model: nn.Module = predictor.model
    # An ensemble explains its first member (the model whose input the heatmap is drawn on).
    layer = cam_target_layer(model, getattr(predictor, "cam_architecture", predictor.card.architecture))
    if predictor.task == "boneage":
        if male is None:
            raise BoneAIError("A bone-age heatmap needs the patient's sex (M or F).")
        wrapped: nn.Module = _SexBound(model, bool(male))
    else:
        wrapped = model
    x = predictor.input_tensor(image).contiguous()
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            with _cam_class(method)(model=wrapped, target_layers=[layer]) as cam:
                if method == "scorecam":
                    cam.batch_size = 32
                grey = cam(input_tensor=x, targets=[LogitTarget(_target_sign(target))])[0]
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    grey = np.nan_to_num(np.asarray(grey, dtype=np.float32))
    return _unit(grey)


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def to_original(square_map: np.ndarray, stages: list[Stage], original_shape: tuple[int, int]) -> np.ndarray:
    """Map a model-input-square map back onto the original pixel grid (each step's own inverse)."""
    return map_to_original(square_map, stages, original_shape)


def _peak(m: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(x), int(y)


def explain(predictor: ModelPredictor, image: Radiograph | np.ndarray, method: str | None = None, male: bool | None = None,
            target: str = "positive") -> Heatmap:
    """Heatmap of one radiograph on its own pixel grid.

    Args:
        predictor: a loaded model (:func:`boneai.inference.load_model`): fracture classifier, bone-age
            regressor (``male`` required) or anomaly model (reconstruction-error map; ``method`` ignored).
        image: a :class:`Radiograph` or its pixels.
        method: one of :data:`CAM_METHODS` (default :data:`DEFAULT_CAM_METHOD`).
        target: "positive" explains the fracture logit (or an older bone age), "negative" its negation.
    """
    pixels = image.pixels if isinstance(image, Radiograph) else np.asarray(image)
    original_shape = standardise(pixels).image.shape[:2]
    if predictor.task == "anomaly":
        ae = predictor.heatmap_model()
        err = ae.error_map(image)
        # A single badly reconstructed pixel should not be the hottest spot: smooth at ~2% of the side.
        err = cv2.GaussianBlur(err, (0, 0), max(1.0, err.shape[0] / 50))
        hi = float(np.percentile(err, 99.5))
        square = np.clip(err / hi, 0, 1) if hi > 0 else np.zeros_like(err)
        stages = run_pipeline(pixels, ae.pipeline)
        name = "reconstruction_error"
    elif getattr(predictor, "fracture_map", None) is not None:
        # A localiser was trained to mark fractures: its own map is the heatmap (no CAM needed).
        square, stages = predictor.fracture_map(image)
        name = "fracture_map"
    else:
        square = cam_on_input(predictor, image, method, male, target)
        stages = run_pipeline(pixels, predictor.pipeline)
        name = method or DEFAULT_CAM_METHOD
    full = np.clip(to_original(square, stages, original_shape), 0, 1)
    full = full / full.max() if full.max() > 0 else full
    return Heatmap(map=full.astype(np.float32), method=name, peak=_peak(full))


def overlay(gray_uint8: np.ndarray, heatmap_map: np.ndarray, opacity: float = 0.4, colormap: str = "jet",
            outline: bool = True, outline_fraction: float = 0.05) -> np.ndarray:
    """RGB uint8 overlay of a [0, 1] heatmap on a grey image, with the outline of its hottest region.

    The outline is the contour of the top ``outline_fraction`` of pixels (5% by default).
    """
    if colormap not in COLORMAPS:
        raise BoneAIError(f"Unknown colormap {colormap!r}; available: {', '.join(COLORMAPS)}.")
    gray = np.asarray(gray_uint8)
    if gray.ndim == 3:
        gray = standardise(gray).image
    h, w = gray.shape
    heat = np.asarray(heatmap_map, dtype=np.float32)
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    heat = np.clip(np.nan_to_num(heat), 0, 1)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    a = float(np.clip(opacity, 0.0, 1.0))
    out = cv2.addWeighted(base, 1.0 - a, colour, a, 0)
    if outline and heat.max() > heat.min():
        level = float(np.quantile(heat, 1.0 - outline_fraction))
        # With fewer hot pixels than the fraction the quantile is the minimum: keep strictly warmer ones.
        hot = ((heat >= level) & (heat > heat.min())).astype(np.uint8)
        contours, _ = cv2.findContours(hot, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(h, w) / 250)))
    return out


def heatmap_png(predictor: ModelPredictor, radiograph: Radiograph | np.ndarray, method: str | None = None,
                male: bool | None = None) -> bytes:
    """PNG bytes of the heatmap overlay (what ``predict --heatmap-dir`` writes)."""
    from PIL import Image

    heat = explain(predictor, radiograph, method=method, male=male)
    pixels = radiograph.pixels if isinstance(radiograph, Radiograph) else radiograph
    buffer = io.BytesIO()
    Image.fromarray(overlay(standardise(pixels).image, heat.map)).save(buffer, format="PNG")
    return buffer.getvalue()


#: Box colours (RGB): solid boxes pass the ``balanced`` box operating point, dashed ones only ``sensitive``.
BOX_COLOURS = {"balanced": (255, 64, 64), "sensitive": (255, 200, 0)}


def _dashed_line(img: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], colour: tuple[int, int, int],
                 thickness: int, dash: int) -> None:
    length = float(np.hypot(p1[0] - p0[0], p1[1] - p0[1]))
    n = max(1, int(length // dash))
    for k in range(0, n, 2):
        a, b = k / n, min(1.0, (k + 1) / n)
        q0 = (int(round(p0[0] + (p1[0] - p0[0]) * a)), int(round(p0[1] + (p1[1] - p0[1]) * a)))
        q1 = (int(round(p0[0] + (p1[0] - p0[0]) * b)), int(round(p0[1] + (p1[1] - p0[1]) * b)))
        cv2.line(img, q0, q1, colour, thickness, cv2.LINE_AA)


def draw_boxes(image: np.ndarray, boxes: list[dict[str, Any]], numbered: bool = True) -> np.ndarray:
    """RGB copy of a grey (or RGB) uint8 image with fracture boxes: solid at ``balanced``, dashed at
    ``sensitive`` (as commercial fracture readers draw them), each numbered by rank."""
    img = np.asarray(image)
    rgb = np.repeat(img[:, :, None], 3, axis=2).copy() if img.ndim == 2 else img[:, :, :3].copy()
    thickness = max(2, int(round(max(rgb.shape[:2]) / 300)))
    for rank, box in enumerate(boxes, 1):
        colour = BOX_COLOURS.get(box.get("operating_point", "balanced"), BOX_COLOURS["balanced"])
        x0, y0, x1, y1 = (int(round(box[k])) for k in ("x0", "y0", "x1", "y1"))
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        for a, b in zip(corners, corners[1:] + corners[:1]):
            if box.get("operating_point") == "sensitive":
                _dashed_line(rgb, a, b, colour, thickness, dash=max(6, 4 * thickness))
            else:
                cv2.line(rgb, a, b, colour, thickness, cv2.LINE_AA)
        if numbered:
            cv2.putText(rgb, str(rank), (x0 + thickness, max(y0 - 2 * thickness, 12 * thickness // 2 + 8)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, colour, max(1, thickness // 2), cv2.LINE_AA)
    return rgb


def box_crop(image: np.ndarray, box: dict[str, Any], margin: float = 0.5, min_side: int = 64) -> np.ndarray:
    """The region around a box (``margin`` of its size on each side, at least ``min_side`` pixels), to zoom in."""
    h, w = image.shape[:2]
    bw, bh = box["x1"] - box["x0"], box["y1"] - box["y0"]
    half_w, half_h = max(bw * (0.5 + margin), min_side / 2), max(bh * (0.5 + margin), min_side / 2)
    cx, cy = (box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2
    x0, x1 = int(max(0, cx - half_w)), int(min(w, cx + half_w))
    y0, y1 = int(max(0, cy - half_h)), int(min(h, cy + half_h))
    return image[y0:y1, x0:x1]
