"""Model-input tensors and training augmentation.

``to_tensor`` is the single place where a preprocessed uint8 image becomes the normalised tensor a
model sees, for training, evaluation, prediction and explanation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from boneai.preprocess import clahe, resize_pad

__all__ = ["to_tensor", "Augment"]


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 grey (H, W) or (H, W, 3) -> float tensor (3, H, W), duplicated to 3 channels, normalised."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t - m) / s


@dataclass
class Augment:
    """Training augmentation on a grey uint8 image, ending in a ``size`` x ``size`` letterbox.

    Geometry: random resized crop (``crop_scale`` of the area), rotation +-``rotate`` degrees,
    horizontal flip, zoom-out with random placement inside the square (so the padding position
    carries no information). Intensity: gamma, contrast/brightness, CLAHE at random, light noise.
    ``level="basic"`` keeps flips and small rotations only.
    """

    size: int
    level: str = "strong"
    rotate: float = 10.0
    crop_scale: tuple[float, float] = (0.6, 1.0)
    zoom_out: tuple[float, float] = (0.75, 1.0)
    gamma: tuple[float, float] = (0.7, 1.5)
    clahe_p: float = 0.3

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = image
        if self.level == "none":
            return resize_pad(img, self.size).image
        if self.level == "strong":
            img = self._random_crop(img, rng)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        angle = rng.uniform(-self.rotate, self.rotate)
        img = self._rotate(np.ascontiguousarray(img), angle)
        if self.level != "strong":
            return resize_pad(img, self.size).image
        return self._intensity(self._place(img, rng), rng)

    def _random_crop(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape
        area = h * w * rng.uniform(*self.crop_scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        return img[y0:y0 + ch, x0:x0 + cw]

    @staticmethod
    def _rotate(img: np.ndarray, angle: float) -> np.ndarray:
        h, w = img.shape
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)

    def _place(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape
        target = max(8, int(round(self.size * rng.uniform(*self.zoom_out))))
        scale = target / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        out = np.zeros((self.size, self.size), np.uint8)
        y0 = int(rng.integers(0, self.size - nh + 1))
        x0 = int(rng.integers(0, self.size - nw + 1))
        out[y0:y0 + nh, x0:x0 + nw] = small
        return out

    def _intensity(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.clahe_p:
            img = clahe(img, clip_limit=rng.uniform(1.0, 3.0)).image
        x = img.astype(np.float32) / 255.0
        x = np.power(x, rng.uniform(*self.gamma))
        x = (x - 0.5) * rng.uniform(0.75, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
        if rng.random() < 0.3:
            x = x + rng.normal(0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
        return (np.clip(x, 0, 1) * 255).astype(np.uint8)
