"""Named, pure preprocessing steps and pipelines built from them.

Every step has the signature ``step(image, **params) -> StepResult`` and never modifies its input.
A pipeline is data: a list of ``{"step": name, "params": {...}}`` dicts, so a model card can record
it and the app can render each stage.

Example:
    >>> import numpy as np
    >>> from boneai.preprocess import run_pipeline
    >>> img = (np.random.default_rng(0).random((300, 200)) * 255).astype("uint8")
    >>> stages = run_pipeline(img, [{"step": "clahe"}, {"step": "resize_pad", "params": {"size": 224}}])
    >>> stages[-1].result.image.shape
    (224, 224)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np

__all__ = [
    "StepResult",
    "Stage",
    "STEPS",
    "Step",
    "map_points",
    "map_boxes",
    "map_to_original",
    "standardise",
    "clahe",
    "equalize_hist",
    "otsu_crop",
    "segment_foreground",
    "remove_background",
    "laplacian_sharpen",
    "low_contrast",
    "resize_pad",
    "squash_resize",
    "to_three_channels",
    "run_pipeline",
    "apply_pipeline",
    "validate_pipeline",
    "DEFAULT_FRACTURE_PIPELINE",
    "step_defaults",
]


@dataclass
class StepResult:
    """The output of one step: the image and whatever the step wants to show (masks, boxes...)."""

    image: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """One executed pipeline stage, for display."""

    step: str
    params: dict[str, Any]
    result: StepResult


def standardise(image: np.ndarray, low_percentile: float = 0.0, high_percentile: float = 100.0) -> StepResult:
    """Grey-level uint8 image from any decoded array (grey/RGB/RGBA, 8/16-bit, float).

    Colour is converted with luminance weights; alpha is dropped. Non-uint8 data is stretched
    from the given percentiles to 0..255 (0 and 100 = full min-max range).
    """
    img = np.asarray(image)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[2] == 3:
            if img.dtype != np.uint8:
                img = img.astype(np.float32)
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        else:
            img = img[:, :, 0]
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {image.shape}")
    extras: dict[str, Any] = {"input_dtype": str(np.asarray(image).dtype)}
    if img.dtype == np.uint8 and low_percentile <= 0 and high_percentile >= 100:
        return StepResult(img.copy(), extras)
    values = img.astype(np.float32)
    lo, hi = np.percentile(values, [low_percentile, high_percentile])
    extras["window"] = (float(lo), float(hi))
    if hi <= lo:
        return StepResult(np.zeros(img.shape, np.uint8), extras)
    out = (np.clip(values, lo, hi) - lo) * (255.0 / (hi - lo))
    return StepResult(out.round().astype(np.uint8), extras)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> StepResult:
    """Contrast Limited Adaptive Histogram Equalisation (OpenCV), clip 2.0 and 8x8 tiles by default."""
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    return StepResult(op.apply(_gray_u8(image)))


def equalize_hist(image: np.ndarray) -> StepResult:
    """Global histogram equalisation."""
    return StepResult(cv2.equalizeHist(_gray_u8(image)))


#: Grey levels a "plain" border line may vary by (JPEG noise on a flat pad stays well inside it).
_PLAIN_TOLERANCE = 6


def otsu_crop(
    image: np.ndarray,
    margin: float = 0.02,
    min_area_fraction: float = 0.15,
    max_skew_degrees: float = 20.0,
) -> StepResult:
    """Crop to the image carrier (the exposed area), cutting away the plain border around it.

    The border is whatever surrounds the radiograph proper: scanner bed, padding, a flat
    collimator shadow. Rows and columns whose grey level is constant (within a few levels) are
    trimmed from each side, so anatomy is never cut. Inside that box, the carrier (everything not
    connected to the border grey) is outlined and, when it is a tilted rectangle, deskewed with
    its minimum-area rotated rectangle before cutting it out. (The name is historical: an earlier
    version outlined the largest Otsu-bright contour, which on borderless radiographs is a bone.)

    When there is nothing to crop (no contrast, no plain border, a carrier below
    ``min_area_fraction`` of the image, a tilt above ``max_skew_degrees``) the image comes back
    uncropped and ``extras["fallback"]`` says why. ``margin`` widens the crop on each side.
    """
    img = _gray_u8(image)
    h, w = img.shape
    lo, hi = _percentiles_u8(img, (0.5, 99.5))
    if hi - lo <= 2 * _PLAIN_TOLERANCE:
        return StepResult(img.copy(), {"fallback": "image has no contrast", "box": None})
    # The border is found on a copy at most 256 px on a side: a few pixels of precision for a
    # tenth of the time, and the averaging makes flat lines flatter.
    scale = min(1.0, 256.0 / max(h, w))
    small = img if scale == 1.0 else cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                interpolation=cv2.INTER_AREA)
    blur = cv2.GaussianBlur(small, (3, 3), 0)
    sh, sw = blur.shape
    (x0, y0, x1, y1), border_values = _trim_plain_border(blur)
    if (x1 - x0) * (y1 - y0) >= 0.98 * sh * sw:
        return StepResult(img.copy(), {"fallback": "no plain border around the image", "box": None})
    if (x1 - x0) * (y1 - y0) < min_area_fraction * sh * sw:
        return StepResult(img.copy(), {"fallback": "no carrier large enough", "box": None})
    (cx, cy), (rw, rh), angle = _carrier_rect(blur, border_values, (x0, y0, x1, y1))
    sx, sy = w / sw, h / sh
    if abs(angle) <= 0.5:
        cx, cy, rw, rh = cx * sx, cy * sy, rw * sx, rh * sy
    else:  # a tilted rectangle stays a rectangle only under a uniform scale
        cx, cy, rw, rh = cx * sx, cy * sy, rw * (sx + sy) / 2, rh * (sx + sy) / 2
    if abs(angle) > max_skew_degrees:
        return StepResult(img.copy(), {"fallback": f"carrier tilted {angle:.0f} degrees", "box": None})
    rw, rh = rw * (1 + 2 * margin), rh * (1 + 2 * margin)
    if abs(angle) > 0.5:
        rot = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
        rotated = cv2.warpAffine(img, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    else:
        angle, rotated = 0.0, img
    x0, y0 = int(max(0, round(cx - rw / 2))), int(max(0, round(cy - rh / 2)))
    x1, y1 = int(min(w, round(cx + rw / 2))), int(min(h, round(cy + rh / 2)))
    if x1 - x0 < 32 or y1 - y0 < 32:
        return StepResult(img.copy(), {"fallback": "crop would be too small", "box": None})
    box = cv2.boxPoints(((cx, cy), (rw, rh), angle)).round().astype(int).tolist()
    return StepResult(rotated[y0:y1, x0:x1].copy(), {"box": box, "angle": float(angle), "crop": (x0, y0, x1, y1)})


def _percentiles_u8(img: np.ndarray, qs: Sequence[float]) -> tuple[float, ...]:
    """``np.percentile(img, qs)`` (linear interpolation) of a uint8 image from its histogram: same values, no sort."""
    if img.size < 2**24:  # calcHist counts in float32: exact below 2**24 pixels
        counts = cv2.calcHist([np.ascontiguousarray(img)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        counts = np.bincount(img.ravel(), minlength=256)
    cum = np.cumsum(counts)
    n = int(cum[-1])
    out = []
    for q in qs:
        pos = q / 100.0 * (n - 1)
        k = int(np.floor(pos))
        frac = pos - k
        below = int(np.searchsorted(cum, k, side="right"))  # value of the k-th smallest pixel
        above = int(np.searchsorted(cum, min(k + 1, n - 1), side="right"))
        out.append(below + frac * (above - below))
    return tuple(out)


def _trim_plain_border(blur: np.ndarray, max_fraction: float = 0.45) -> tuple[tuple[int, int, int, int], list[float]]:
    """Box ``(x0, y0, x1, y1)`` left after trimming plain rows/columns from each side, and their greys."""
    h, w = blur.shape
    values: list[float] = []

    def trim(lines: np.ndarray, limit: int) -> int:
        # Lines are examined in blocks from the edge inwards, stopping at the first one with
        # content: usually only a few blocks, instead of a percentile of every line of the image.
        n, block = 0, 16
        while n < min(limit, len(lines)):
            chunk = lines[n:n + block]
            spread = np.percentile(chunk, 98, axis=1) - np.percentile(chunk, 2, axis=1)
            plain = spread <= _PLAIN_TOLERANCE
            if not plain.all():
                n += int(np.argmin(plain))
                break
            n += len(chunk)
        n = min(n, limit)
        if n:
            values.extend(np.median(lines[:n], axis=1).tolist())
        return n

    top = trim(blur, int(max_fraction * h))
    bottom = trim(blur[::-1], int(max_fraction * h))
    left = trim(blur.T, int(max_fraction * w))
    right = trim(blur.T[::-1], int(max_fraction * w))
    return (left, top, w - right, h - bottom), values


def _carrier_rect(
    blur: np.ndarray, border_values: list[float], box: tuple[int, int, int, int]
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Rotated rectangle ``((cx, cy), (w, h), angle)`` of the carrier, angle folded to [-45, 45].

    The carrier is what is not connected to the image edge through border-grey pixels. Its
    rotated rectangle is used only when its upright bounding box agrees with the trimmed ``box``
    (a tilted film fills its bounding box corner to corner); otherwise, for instance when the
    border grey leaks into a dark background, the trimmed box is used as it is.
    """
    x0, y0, x1, y1 = box
    upright = ((x0 + x1) / 2.0, (y0 + y1) / 2.0), (float(x1 - x0), float(y1 - y0)), 0.0
    like_border = np.zeros(blur.shape, np.uint8)
    for value in sorted({round(v) for v in border_values}):
        like_border |= (np.abs(blur.astype(np.int16) - value) <= _PLAIN_TOLERANCE).astype(np.uint8)
    _, labels = cv2.connectedComponents(like_border)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    surround = np.isin(labels, edge_labels[edge_labels > 0])
    carrier = (~surround).astype(np.uint8) * 255
    carrier = cv2.morphologyEx(carrier, cv2.MORPH_CLOSE, np.ones((15, 15), np.uint8))
    contours, _ = cv2.findContours(carrier, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return upright
    (cx, cy), (rw, rh), angle = cv2.minAreaRect(max(contours, key=cv2.contourArea))
    rw, rh = rw + 1, rh + 1  # contour points are pixel centres; the carrier covers whole pixels
    # OpenCV 4.5+ reports angles in [-90, 0) or (0, 90] depending on the version; a quarter turn
    # with width and height swapped is the same rectangle, so fold to the smallest rotation.
    while angle > 45:
        angle, rw, rh = angle - 90, rh, rw
    while angle < -45:
        angle, rw, rh = angle + 90, rh, rw
    bx, by, bw, bh = cv2.boundingRect(cv2.boxPoints(((cx, cy), (rw, rh), angle)).astype(np.float32))
    inter = max(0, min(bx + bw, x1) - max(bx, x0)) * max(0, min(by + bh, y1) - max(by, y0))
    union = bw * bh + (x1 - x0) * (y1 - y0) - inter
    if union <= 0 or inter / union < 0.9 or abs(angle) <= 0.5:
        return upright  # disagrees with the trimmed box, or upright anyway: the trimmed box is exact
    return (cx, cy), (rw, rh), float(angle)


def segment_foreground(
    image: np.ndarray,
    keep_largest: int = 1,
    open_kernel: int = 5,
    dilate_kernel: int = 15,
    dilate_iterations: int = 1,
) -> StepResult:
    """Bone/hand mask: Otsu threshold, morphological opening, the largest contours filled, dilation.

    ``extras`` holds ``mask`` (uint8 0/255), ``overlay`` (RGB, mask tinted green) and
    ``coverage`` (fraction of pixels inside the mask). The image itself is returned unchanged.
    """
    img = _gray_u8(image)
    blur = cv2.GaussianBlur(img, (5, 5), 0)
    _, binary = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if open_kernel > 1:
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, np.ones((open_kernel, open_kernel), np.uint8))
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros_like(img)
    if contours:
        keep = sorted(contours, key=cv2.contourArea, reverse=True)[: max(1, int(keep_largest))]
        # Filling the outer contours closes the dark holes inside bone (marrow, joint spaces).
        cv2.drawContours(mask, keep, -1, 255, thickness=cv2.FILLED)
    if dilate_kernel > 1 and dilate_iterations > 0:
        mask = cv2.dilate(mask, np.ones((dilate_kernel, dilate_kernel), np.uint8), iterations=int(dilate_iterations))
    overlay = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    tint = overlay.copy()
    tint[mask > 0] = (0, 200, 0)
    overlay = cv2.addWeighted(overlay, 0.65, tint, 0.35, 0)
    return StepResult(img.copy(), {"mask": mask, "overlay": overlay, "coverage": float((mask > 0).mean())})


def remove_background(image: np.ndarray, **segment_params: Any) -> StepResult:
    """Zero every pixel outside the foreground mask of :func:`segment_foreground`."""
    seg = segment_foreground(image, **segment_params)
    mask = seg.extras["mask"]
    out = seg.image.copy()
    out[mask == 0] = 0
    return StepResult(out, {"mask": mask, "coverage": seg.extras["coverage"]})


def laplacian_sharpen(image: np.ndarray, strength: float = 1.0, ksize: int = 3) -> StepResult:
    """Edge enhancement: ``image - strength * Laplacian(image)``, clipped to uint8."""
    img = _gray_u8(image).astype(np.float32)
    lap = cv2.Laplacian(img, cv2.CV_32F, ksize=int(ksize))
    return StepResult(np.clip(img - float(strength) * lap, 0, 255).astype(np.uint8))


def low_contrast(image: np.ndarray, threshold: float = 0.05, low: float = 1.0, high: float = 99.0) -> StepResult:
    """Flag a washed-out image: (p99 - p1) / 255 below ``threshold``. The image is unchanged."""
    img = _gray_u8(image)
    lo, hi = np.percentile(img, [low, high])
    contrast = float(hi - lo) / 255.0
    return StepResult(img.copy(), {"low_contrast": contrast < threshold, "contrast": contrast})


def resize_pad(image: np.ndarray, size: int = 224, pad_value: int = 0) -> StepResult:
    """Aspect-preserving resize (Lanczos when shrinking or enlarging) and centred pad to a square.

    ``extras`` records ``scale`` and the ``offset`` (x, y) of the image inside the square so a
    heatmap can be mapped back onto the original.
    """
    img = np.asarray(image)
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LANCZOS4 if scale > 0.5 else cv2.INTER_AREA)
    out = np.full((size, size) + img.shape[2:], pad_value, dtype=img.dtype)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = resized
    return StepResult(out, {"scale": scale, "offset": (x0, y0), "content_size": (nw, nh)})


def squash_resize(image: np.ndarray, size: int = 100) -> StepResult:
    """Resize to ``size`` x ``size`` ignoring the aspect ratio (how the RSNA bone-age copy was made)."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LANCZOS4
    return StepResult(cv2.resize(img, (size, size), interpolation=interp))


def to_three_channels(image: np.ndarray) -> StepResult:
    """Duplicate a grey image into three identical channels (H, W, 3) for ImageNet-style models."""
    img = _gray_u8(image)
    return StepResult(np.repeat(img[:, :, None], 3, axis=2))


# --- Geometry: each step that moves pixels carries its own forward and inverse mapping -----------
#
# A geometric step maps points (x, y) of its input onto its output. Heatmaps and boxes found on the
# model's input square are mapped back onto the original file by walking the executed stages in
# reverse (as MONAI's ``Compose.inverse`` does), so a new cropping step cannot silently misplace them:
# a step that changes the image size without declaring its mapping is refused.


def _otsu_rotation(extras: dict[str, Any]) -> np.ndarray | None:
    angle = float(extras.get("angle", 0.0))
    if abs(angle) <= 0.5 or not extras.get("box"):
        return None
    # otsu_crop rotated about the carrier's centre (the centre of its box) before cutting.
    cx, cy = np.asarray(extras["box"], dtype=np.float64).mean(axis=0)
    return cv2.getRotationMatrix2D((float(cx), float(cy)), angle, 1.0)


def _otsu_points(points: np.ndarray, extras: dict[str, Any], inverse: bool) -> np.ndarray:
    if extras.get("crop") is None:
        return points
    x0, y0 = extras["crop"][:2]
    rot = _otsu_rotation(extras)
    if not inverse:
        if rot is not None:
            points = points @ rot[:, :2].T + rot[:, 2]
        return points - np.array([x0, y0], dtype=np.float64)
    points = points + np.array([x0, y0], dtype=np.float64)
    if rot is not None:
        inv = cv2.invertAffineTransform(rot)
        points = points @ inv[:, :2].T + inv[:, 2]
    return points


def _otsu_map(m: np.ndarray, extras: dict[str, Any], in_shape: tuple[int, int]) -> np.ndarray:
    in_h, in_w = in_shape
    if extras.get("crop") is None:
        return m if m.shape == (in_h, in_w) else cv2.resize(m, (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    x0, y0, x1, y1 = extras["crop"]
    if m.shape != (y1 - y0, x1 - x0):
        m = cv2.resize(m, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    full = np.zeros((in_h, in_w), np.float32)
    full[y0:y1, x0:x1] = m
    rot = _otsu_rotation(extras)
    if rot is not None:
        full = cv2.warpAffine(full, rot, (in_w, in_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return full


def _letterbox_scale(extras: dict[str, Any], in_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    in_h, in_w = in_shape
    nw, nh = extras.get("content_size", (round(in_w * extras["scale"]), round(in_h * extras["scale"])))
    return np.array([nw / in_w, nh / in_h], dtype=np.float64), np.array(extras["offset"], dtype=np.float64)


def _resize_pad_points(points: np.ndarray, extras: dict[str, Any], in_shape: tuple[int, int], inverse: bool) -> np.ndarray:
    scale, offset = _letterbox_scale(extras, in_shape)
    return (points - offset) / scale if inverse else points * scale + offset


def _resize_pad_map(m: np.ndarray, extras: dict[str, Any], in_shape: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    in_h, in_w = in_shape
    if m.shape != tuple(out_shape):
        m = cv2.resize(m, (out_shape[1], out_shape[0]), interpolation=cv2.INTER_LINEAR)
    x0, y0 = extras["offset"]
    nw, nh = extras.get("content_size", (round(in_w * extras["scale"]), round(in_h * extras["scale"])))
    return cv2.resize(np.ascontiguousarray(m[y0:y0 + nh, x0:x0 + nw]), (in_w, in_h), interpolation=cv2.INTER_LINEAR)


def _stretch_points(points: np.ndarray, in_shape: tuple[int, int], out_shape: tuple[int, int], inverse: bool) -> np.ndarray:
    factor = np.array([out_shape[1] / in_shape[1], out_shape[0] / in_shape[0]], dtype=np.float64)
    return points / factor if inverse else points * factor


def _stretch_map(m: np.ndarray, in_shape: tuple[int, int]) -> np.ndarray:
    return m if m.shape == tuple(in_shape) else cv2.resize(m, (in_shape[1], in_shape[0]), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Step:
    """A named preprocessing step and, when it moves pixels, how to map points and maps through it.

    ``points(points, extras, in_shape, out_shape, inverse)`` maps an (n, 2) array of (x, y) pixel
    coordinates from the step's input to its output (or back with ``inverse=True``).
    ``invert_map(map, extras, in_shape, out_shape)`` brings a map on the step's output grid back onto
    its input grid. Intensity-only steps leave both as ``None``: the geometry is unchanged.
    """

    fn: Callable[..., StepResult]
    points: Callable[..., np.ndarray] | None = None
    invert_map: Callable[..., np.ndarray] | None = None

    def __call__(self, image: np.ndarray, **params: Any) -> StepResult:
        return self.fn(image, **params)


_STRETCH = dict(points=lambda p, ex, i, o, inverse: _stretch_points(p, i, o, inverse),
                invert_map=lambda m, ex, i, o: _stretch_map(m, i))

STEPS: dict[str, Step] = {
    "standardise": Step(standardise),
    "clahe": Step(clahe),
    "equalize_hist": Step(equalize_hist),
    "otsu_crop": Step(otsu_crop, points=lambda p, ex, i, o, inverse: _otsu_points(p, ex, inverse),
                      invert_map=lambda m, ex, i, o: _otsu_map(m, ex, i)),
    "segment_foreground": Step(segment_foreground),
    "remove_background": Step(remove_background),
    "laplacian_sharpen": Step(laplacian_sharpen),
    "low_contrast": Step(low_contrast),
    "resize_pad": Step(resize_pad, points=lambda p, ex, i, o, inverse: _resize_pad_points(p, ex, i, inverse),
                       invert_map=_resize_pad_map),
    "squash_resize": Step(squash_resize, **_STRETCH),
    "to_three_channels": Step(to_three_channels),
}


def _stage_shapes(stages: list[Stage], original_shape: tuple[int, int]) -> list[tuple[int, int]]:
    return [tuple(original_shape[:2])] + [tuple(s.result.image.shape[:2]) for s in stages]


def _geometry(stage: Stage, in_shape: tuple[int, int], out_shape: tuple[int, int]) -> Step | None:
    step = STEPS[stage.step]
    if step.points is None and in_shape != out_shape:
        raise ValueError(f"pipeline step {stage.step!r} changed the image size but declares no mapping")
    return step if step.points is not None else None


def map_points(points: np.ndarray, stages: list[Stage], original_shape: tuple[int, int],
               inverse: bool = False) -> np.ndarray:
    """Map (n, 2) pixel coordinates (x, y) through the executed stages, or back with ``inverse=True``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    shapes = _stage_shapes(stages, original_shape)
    order = reversed(range(len(stages))) if inverse else range(len(stages))
    for i in order:
        step = _geometry(stages[i], shapes[i], shapes[i + 1])
        if step is not None:
            pts = step.points(pts, stages[i].result.extras, shapes[i], shapes[i + 1], inverse)
    return pts


def map_boxes(boxes: np.ndarray, stages: list[Stage], original_shape: tuple[int, int],
              inverse: bool = False) -> np.ndarray:
    """Map (n, 4) boxes (x0, y0, x1, y1) through the stages: the bounding box of the mapped corners.

    With ``inverse=True`` the result is clipped to the original image.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(b):
        return b
    corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], axis=1).reshape(-1, 2)
    mapped = map_points(corners, stages, original_shape, inverse).reshape(-1, 4, 2)
    out = np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1)
    if inverse:
        h, w = original_shape[:2]
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def map_to_original(square_map: np.ndarray, stages: list[Stage], original_shape: tuple[int, int]) -> np.ndarray:
    """Map a map on the last stage's grid back onto the original pixel grid, stage by stage in reverse."""
    m = np.asarray(square_map, dtype=np.float32)
    shapes = _stage_shapes(stages, original_shape)
    for i in reversed(range(len(stages))):
        step = _geometry(stages[i], shapes[i], shapes[i + 1])
        if step is not None:
            m = step.invert_map(m, stages[i].result.extras, shapes[i], shapes[i + 1])
        elif m.shape != shapes[i]:  # a coarse map (a CAM) on an intensity step's grid
            m = cv2.resize(m, (shapes[i][1], shapes[i][0]), interpolation=cv2.INTER_LINEAR)
    return m


#: The fracture models' pipeline unless a model card says otherwise.
DEFAULT_FRACTURE_PIPELINE: list[dict[str, Any]] = [
    {"step": "standardise", "params": {}},
    {"step": "otsu_crop", "params": {}},
    {"step": "resize_pad", "params": {"size": 224}},
]


def step_defaults(name: str) -> dict[str, Any]:
    """Default parameters of a step, read from its signature (for forms in the app)."""
    import inspect

    fn = STEPS[name].fn
    return {
        p.name: p.default
        for p in list(inspect.signature(fn).parameters.values())[1:]
        if p.default is not inspect.Parameter.empty
    }


def validate_pipeline(pipeline: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first unknown step or parameter."""
    for i, spec in enumerate(pipeline):
        name = spec.get("step")
        if name not in STEPS:
            raise ValueError(f"pipeline step {i}: unknown step {name!r}; known: {sorted(STEPS)}")
        allowed = step_defaults(name)
        for key in spec.get("params", {}) or {}:
            if key not in allowed and name != "remove_background":
                raise ValueError(f"pipeline step {i} ({name}): unknown parameter {key!r}")


def run_pipeline(image: np.ndarray, pipeline: list[dict[str, Any]]) -> list[Stage]:
    """Run each step in turn and return every stage (for display)."""
    validate_pipeline(pipeline)
    stages: list[Stage] = []
    current = image
    for spec in pipeline:
        params = dict(spec.get("params", {}) or {})
        result = STEPS[spec["step"]](current, **params)
        stages.append(Stage(spec["step"], params, result))
        current = result.image
    return stages


def apply_pipeline(image: np.ndarray, pipeline: list[dict[str, Any]]) -> np.ndarray:
    """Run a pipeline and return only the final image."""
    current = image
    for spec in pipeline:
        current = STEPS[spec["step"]](current, **(spec.get("params", {}) or {})).image
    return current


def _gray_u8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype == np.uint8 and img.ndim == 2:
        return img
    return standardise(img).image
