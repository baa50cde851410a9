"""Fracture localisation: a dense fracture map with boxes, and an image-level fracture logit.

The network is a Feature Pyramid Network decoder (``segmentation-models-pytorch``) on the
EfficientNet-Lite encoder of a trained fracture classifier, with a classification head on the
deepest features (a multi-task network). It is trained on the FracAtlas fracture boxes, filled as
masks on the model's input square. At prediction time the map is thresholded; each connected
region becomes a box scored by the map's peak inside it, and boxes are mapped back to the original
file's pixels through each preprocessing step's inverse.

With ``--centre-head`` the decoder also predicts, CenterNet-style (Zhou et al., "Objects as
Points", 2019), a heatmap of box centres and each box's log width and height: every local maximum
of that heatmap is a box with its own score, so fractures close together are separate boxes.
``fit-localiser`` chooses between the two ways of drawing boxes on the validation split.

Example:
    >>> from boneai.localisation import boxes_from_map
    >>> import numpy as np
    >>> m = np.zeros((32, 32), np.float32); m[4:8, 10:20] = 0.9
    >>> boxes_from_map(m, threshold=0.5)[0][:4]
    [10.0, 4.0, 20.0, 8.0]
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from boneai import evaluate as ev
from boneai.card import DEFAULT_OPERATING_POINT, DEFAULT_REGION_THRESHOLD, WEIGHTS_FILE, ImageScore, ModelCard
from boneai.config import LocaliserConfig
from boneai.data import fracture_boxes, read_fracatlas, read_split_file
from boneai.errors import DatasetError
from boneai.io import Radiograph, read_radiograph
from boneai.models.fuse import inference_copy
from boneai.predictor import CardOperatingPoints, ModelResolver, Prediction, read_weights, register_loader
from boneai.preprocess import apply_pipeline, map_boxes, resize_pad, run_pipeline
from boneai.transforms import to_tensor

__all__ = [
    "FractureLocaliser",
    "boxes_from_map",
    "boxes_from_centres",
    "LocaliserConfig",
    "train_localiser",
    "MAP_STRIDE",
]

#: The decoder's map is at a quarter of the input square (FPN's finest level, no final upsampling).
MAP_STRIDE = 4


#: Map channels of a network with a centre head: fracture map, centre heatmap, log width, log height.
CENTRE_CHANNELS = 4


class FractureLocaliser(nn.Module):
    """FPN on an EfficientNet-Lite encoder: (map logits at 1/4 scale, image logit).

    The map has one channel (the fracture map), or with ``centre_head`` four: the fracture map, the
    logits of a box-centre heatmap, and each box's log width and height in map cells.
    """

    def __init__(self, variant: int = 0, pyramid_channels: int = 64, segmentation_channels: int = 32,
                 centre_head: bool = False, classifier_head: bool = False, shared_blocks: int | None = None,
                 classifier_input_size: int | None = None) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.centre_head = centre_head
        self.classifier_head = classifier_head
        # encoder_weights=None: nothing is downloaded; the encoder is filled from our own weights.
        self.net = smp.FPN(encoder_name=f"tu-tf_efficientnet_lite{variant}", encoder_weights=None,
                           decoder_pyramid_channels=pyramid_channels,
                           decoder_segmentation_channels=segmentation_channels,
                           classes=CENTRE_CHANNELS if centre_head else 1, upsampling=1,
                           aux_params=None if classifier_head else {"classes": 1, "dropout": 0.2})
        self.shared_blocks = None
        # The classifier's input square: where the network's own is larger, the shared features are resized
        # (bilinear) to the size they have at the classifier's input before its branch (scale as trained).
        self.classifier_input_size = classifier_input_size if classifier_head else None
        if classifier_head:
            # The classifier's own later blocks and head (1x1 conv to 1280 channels, batch norm + ReLU6,
            # pooling, linear) after the first ``shared_blocks`` encoder blocks, which the two branches
            # share: with the classifier's weights there, the image logit is the classifier's.
            import timm

            full = timm.create_model(f"tf_efficientnet_lite{variant}", num_classes=1)
            n = len(full.blocks)
            self.shared_blocks = n if shared_blocks is None else int(shared_blocks)
            if not 0 <= self.shared_blocks <= n:
                raise ValueError(f"shared_blocks must be 0 to {n}, not {shared_blocks}")
            self.classifier_blocks = nn.Sequential(*list(full.blocks)[self.shared_blocks:])
            self.image_head = nn.Sequential(full.conv_head, full.bn2, full.global_pool, full.classifier)
        if centre_head:
            conv = self.net.segmentation_head[0]
            with torch.no_grad():  # CenterNet's prior: centre heatmap starts at 0.1 everywhere, sizes at ~4 cells
                conv.bias[1] = -2.19
                conv.bias[2:] = math.log(4.0)
                conv.weight[1:] *= 0.1

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a saved network; a one-channel network's weights start a centre-head one (channel 0).

        A network with the classifier's head takes only the decoder of a network with its own image
        head: the encoder and the head come from the classifier (``load_encoder``, ``load_classifier_head``).
        """
        key = "net.segmentation_head.0"
        own = self.state_dict()
        if self.classifier_head and any(k.startswith("net.classification_head.") for k in state):
            shared = self._shared_prefixes()
            state = {k: v for k, v in state.items() if k in own and not k.startswith(shared)}
            state.update({k: v for k, v in own.items() if k not in state})
        if self.centre_head and state.get(f"{key}.weight") is not None and state[f"{key}.weight"].shape[0] == 1:
            state = dict(state)
            for part in ("weight", "bias"):
                merged = own[f"{key}.{part}"].clone()
                merged[:1] = state[f"{key}.{part}"].to(merged.dtype)
                state[f"{key}.{part}"] = merged
        self.load_state_dict(state)

    def _shared_prefixes(self) -> tuple[str, ...]:
        """State keys of the encoder part shared with the classifier (stem and first blocks)."""
        enc = "net.encoder.model."
        return (f"{enc}conv_stem.", f"{enc}bn1.", *(f"{enc}blocks.{i}." for i in range(self.shared_blocks or 0)))

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The decoder's features (as ``self.net.encoder(x)`` gives them) and the shared trunk's output."""
        enc = self.net.encoder.model
        h = enc.bn1(enc.conv_stem(x))
        stages = enc._stage_out_idx  # timm's own record of which stages are features (tested against its forward)
        features = [x, h] if 0 in stages else [x]
        shared = h
        for i, block in enumerate(enc.blocks):
            h = block(h)
            if i + 1 in stages:
                features.append(h)
            if i + 1 == self.shared_blocks:
                shared = h
        return features, shared

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.classifier_head:
            mask, label = self.net(x)
            return mask, label[:, 0]
        mask, logit, _ = self.forward_with_pooled(x)
        return mask, logit

    def forward_with_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward``'s map and logit, and the classifier branch's pooled features (the linear head's
        input; the scope check's familiarity reads them)."""
        if not self.classifier_head:
            raise ValueError("pooled features need a network with the classifier's head")
        features, shared = self._encode(x)
        mask = self.net.segmentation_head(self.net.decoder(features))
        pooled = self._pooled(shared, x.shape[-1])
        return mask, self.image_head[-1](pooled)[:, 0], pooled

    def branch_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier branch's pooled features alone (no localiser blocks, no decoder)."""
        if not self.classifier_head:
            raise ValueError("pooled features need a network with the classifier's head")
        return self._pooled(self.shared_features(x), x.shape[-1])

    def shared_features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared trunk's output alone (stem and the ``shared_blocks`` first blocks)."""
        enc = self.net.encoder.model
        shared = enc.bn1(enc.conv_stem(x))
        for block in list(enc.blocks)[:self.shared_blocks]:
            shared = block(shared)
        return shared

    def image_logit(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier branch's logit alone (stem, shared blocks, resize, its own blocks and head): what
        ``forward`` gives as its second output, without the localiser's blocks and decoder."""
        if not self.classifier_head:
            raise ValueError("image_logit needs a network with the classifier's head")
        return self._classify(self.shared_features(x), x.shape[-1])

    def _classify(self, shared: torch.Tensor, input_side: int) -> torch.Tensor:
        return self.image_head[-1](self._pooled(shared, input_side))[:, 0]

    def _pooled(self, shared: torch.Tensor, input_side: int) -> torch.Tensor:
        """The classifier branch up to its pooling: (N, 1280) features before the linear head."""
        if self.classifier_input_size and self.classifier_input_size != input_side:
            side = max(1, round(shared.shape[-1] * self.classifier_input_size / input_side))
            shared = nn.functional.interpolate(shared, size=(side, side), mode="bilinear", align_corners=False)
        return self.image_head[:-1](self.classifier_blocks(shared))

    def classifier_branch(self) -> list[nn.Module]:
        """The classifier's own later blocks and head (what ``--tune-classifier-branch`` trains)."""
        return [self.classifier_blocks, self.image_head] if self.classifier_head else []

    def frozen_modules(self, n_blocks: int) -> list[nn.Module]:
        """The encoder's stem and first ``n_blocks`` blocks (for fine-tuning with them fixed). With the
        classifier's head: the shared stem and blocks and the classifier's branch, whatever
        ``n_blocks`` (the image logit stays the classifier's)."""
        enc = self.net.encoder.model
        if self.classifier_head:
            n_blocks = self.shared_blocks
        stem = [enc.conv_stem, enc.bn1] if n_blocks > 0 or self.classifier_head else []
        frozen = stem + [enc.blocks[i] for i in range(min(n_blocks, len(enc.blocks)))]
        return frozen + ([self.classifier_blocks, self.image_head] if self.classifier_head else [])

    def load_classifier_head(self, state: dict[str, torch.Tensor]) -> int:
        """Copy a timm EfficientNet-Lite classifier's later blocks (after the shared ones) and head
        (``conv_head``, ``bn2``, ``classifier``); returns tensors copied."""
        names = {"conv_head": "image_head.0", "bn2": "image_head.1", "classifier": "image_head.3"}

        def target(key: str) -> str:
            prefix, _, rest = key.partition(".")
            if prefix == "blocks":
                index, _, rest = rest.partition(".")
                return f"classifier_blocks.{int(index) - self.shared_blocks}.{rest}"
            return f"{names.get(prefix)}.{rest}"

        return _copy_tensors(self, state, target, ("image_head.", "classifier_blocks."), "classifier head")

    def load_encoder(self, state: dict[str, torch.Tensor]) -> int:
        """Copy a timm EfficientNet-Lite classifier's backbone into the encoder; returns tensors copied."""
        return _copy_tensors(self.net.encoder.model, state, lambda k: k, ("",), "encoder")


def _copy_tensors(module: nn.Module, state: Mapping[str, torch.Tensor], rename, prefixes: tuple[str, ...],
                  what: str) -> int:
    """Load into ``module`` every tensor of ``state`` whose renamed key (``rename``) it has with the same
    shape; refuse when one of its tensors under ``prefixes`` would stay unfilled. Returns tensors copied."""
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefixes)}
    picked = {}
    for key, value in state.items():
        target = rename(key)
        if target in own and own[target].shape == value.shape:
            picked[target] = value.to(own[target].dtype)
    missing = [k for k in own if k not in picked and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{what} weights missing for {missing[:3]}")
    module.load_state_dict(picked, strict=False)
    return len(picked)


def boxes_from_map(prob_map: np.ndarray, threshold: float, scale: float = 1.0, max_boxes: int = 10,
                   min_area: int = 1, relative: float | None = None, shrink: float = 1.0) -> list[list[float]]:
    """Connected regions of ``prob_map >= threshold`` as ``[x0, y0, x1, y1, score]``, best first.

    The score is the map's peak inside the region. With ``relative``, a region's box is drawn round
    only its cells at or above ``relative`` times its peak (a tighter box on a broad, low region).
    ``shrink`` scales each box about its centre (a fitted correction for maps broader than the
    annotated boxes). Coordinates are multiplied by ``scale`` (the map's stride) and are pixel
    edges: a region covering columns 10..19 spans x 10 to 20.
    """
    m = np.asarray(prob_map, dtype=np.float32)
    if not np.isfinite(threshold) or float(m.max(initial=0.0)) < threshold:
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats((m >= threshold).astype(np.uint8), connectivity=8)
    boxes = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area:
            continue
        inside = labels == k
        score = float(m[inside].max())
        if relative:
            ys, xs = np.nonzero(inside & (m >= relative * score))
            x, y, w, h = int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        cx, cy, half_w, half_h = x + w / 2, y + h / 2, w * shrink / 2, h * shrink / 2
        boxes.append([(cx - half_w) * scale, (cy - half_h) * scale, (cx + half_w) * scale, (cy + half_h) * scale, score])
    boxes.sort(key=lambda b: -b[4])
    return boxes[:max_boxes]


def boxes_from_centres(heat: np.ndarray, log_sizes: np.ndarray, threshold: float, scale: float = 1.0,
                       max_boxes: int = 10, shrink: float = 1.0) -> list[list[float]]:
    """Local maxima (3 x 3) of a centre heatmap at or above ``threshold`` as ``[x0, y0, x1, y1, score]``.

    Each box is centred on its cell's centre, with the width and height ``exp(log_sizes)`` (map cells)
    predicted there, times ``shrink``; coordinates are multiplied by ``scale`` (the map's stride).

    Example:
        >>> h = np.zeros((16, 16), np.float32); h[5, 8] = 0.9; h[5, 9] = 0.5
        >>> [[round(v, 3) for v in box] for box in boxes_from_centres(h, np.full((2, 16, 16), np.log(4.0)), 0.3)]
        [[6.5, 3.5, 10.5, 7.5, 0.9]]
    """
    h = np.asarray(heat, dtype=np.float32)
    if not np.isfinite(threshold) or float(h.max(initial=0.0)) < threshold:
        return []
    peaks = (h >= cv2.dilate(h, np.ones((3, 3), np.uint8))) & (h >= threshold)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-h[ys, xs], kind="stable")[:max_boxes]
    boxes = []
    for y, x in zip(ys[order], xs[order]):
        w, hh = (float(np.exp(np.clip(log_sizes[k, y, x], -3.0, 6.0))) * shrink for k in (0, 1))
        cx, cy = float(x) + 0.5, float(y) + 0.5
        boxes.append([(cx - w / 2) * scale, (cy - hh / 2) * scale, (cx + w / 2) * scale, (cy + hh / 2) * scale,
                      float(h[y, x])])
    return boxes


# --- Training ------------------------------------------------------------------------------------


def _rendered_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boxes filled on a uint8 grid, box ``k`` with the value ``k + 1`` (at most 255 boxes), so that
    each box can still be found after the augmentations (nearest-neighbour resampling keeps values)."""
    mask = np.zeros(shape, np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).reshape(-1, 4)[:255]):
        mask[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = k + 1
    return mask


@dataclass
class _Example:
    image: np.ndarray       # grey uint8 after the pipeline's steps before the resize, at most ~1.3x size
    mask: np.ndarray        # uint8 fracture boxes on the same grid, box k filled with k + 1
    label: int


def _load_example(path: str, boxes_xywh: list[list[float]], label: int, pipeline: list[dict[str, Any]],
                  max_side: int) -> _Example:
    pixels = read_radiograph(path).pixels
    stages = run_pipeline(pixels, pipeline[:-1])
    image = stages[-1].result.image
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes_xywh], dtype=np.float64).reshape(-1, 4)
    mapped = map_boxes(xyxy, stages, pixels.shape[:2])
    mask = _rendered_mask(mapped, image.shape[:2])
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return _Example(image, mask, label)


def _augment_pair(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip, rotate, random crop keeping most of the view, letterbox at a random place; intensity jitter."""
    h, w = image.shape
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    angle = rng.uniform(-10, 10)
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    image = cv2.warpAffine(np.ascontiguousarray(image), rot, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    mask = cv2.warpAffine(np.ascontiguousarray(mask), rot, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    area = rng.uniform(0.7, 1.0)
    ch, cw = max(16, int(h * math.sqrt(area))), max(16, int(w * math.sqrt(area)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image, mask = image[y0:y0 + ch, x0:x0 + cw], mask[y0:y0 + ch, x0:x0 + cw]
    target = int(round(size * rng.uniform(0.8, 1.0)))
    scale = target / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    small_mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    out, out_mask = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    py, px = int(rng.integers(0, size - nh + 1)), int(rng.integers(0, size - nw + 1))
    out[py:py + nh, px:px + nw], out_mask[py:py + nh, px:px + nw] = small, small_mask
    x = out.astype(np.float32) / 255.0
    x = np.power(x, rng.uniform(0.7, 1.4))
    x = (x - 0.5) * rng.uniform(0.8, 1.25) + 0.5 + rng.uniform(-0.08, 0.08)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), out_mask


def _mask_target(mask: np.ndarray) -> torch.Tensor:
    """Box mask on the input square -> float target at the map's stride (area share per cell)."""
    h, w = mask.shape
    small = cv2.resize((mask > 0).astype(np.float32), (w // MAP_STRIDE, h // MAP_STRIDE), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((small >= 0.25).astype(np.float32))


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """The boxes of an instance mask (``_rendered_mask``) as (n, 4) x0, y0, x1, y1 pixel edges."""
    out = []
    for k in np.unique(mask[mask > 0]):
        ys, xs = np.nonzero(mask == k)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def _centre_targets(mask: np.ndarray) -> torch.Tensor:
    """CenterNet targets at the map's stride, stacked (4, H, W): a Gaussian at each box centre (sigma
    a sixth of the box side, at least one cell), log width, log height (map cells) and a weight that
    is 1 on each box's centre cell and its eight neighbours (where the sizes are learned)."""
    h, w = mask.shape[0] // MAP_STRIDE, mask.shape[1] // MAP_STRIDE
    out = np.zeros((4, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    for x0, y0, x1, y1 in mask_boxes(mask) / MAP_STRIDE:
        cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, 0.5), max(y1 - y0, 0.5)
        sx, sy = max(bw / 6, 1.0), max(bh / 6, 1.0)
        out[0] = np.maximum(out[0], np.exp(-((xx - cx) ** 2 / (2 * sx ** 2) + (yy - cy) ** 2 / (2 * sy ** 2))))
        i, j = min(int(cy), h - 1), min(int(cx), w - 1)
        out[0, i, j] = 1.0
        sl = (slice(max(i - 1, 0), i + 2), slice(max(j - 1, 0), j + 2))
        out[1][sl], out[2][sl], out[3][sl] = np.log(bw), np.log(bh), 1.0
    return torch.from_numpy(out)


def _square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """An instance mask placed as ``resize_pad`` places its image, resampled nearest-neighbour."""
    h, w = mask.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((size, size), np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return out


def _batch(examples: list[_Example], size: int, rng: np.random.Generator | None, mean, std):
    """Inputs, fracture-map targets, labels and centre targets (``_centre_targets``) of a batch."""
    xs, ms, ys, cs = [], [], [], []
    for ex in examples:
        if rng is None:
            img = resize_pad(ex.image, size).image
            msk = _square_mask(ex.mask, size)
        else:
            img, msk = _augment_pair(ex.image, ex.mask, size, rng)
        xs.append(to_tensor(img, mean, std))
        ms.append(_mask_target(msk))
        cs.append(_centre_targets(msk))
        ys.append(float(ex.label))
    return torch.stack(xs), torch.stack(ms)[:, None], torch.tensor(ys), torch.stack(cs)


def _centre_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the centre heatmap (alpha 2, beta 4) plus an L1 loss
    on the log sizes round each centre, both per annotated box."""
    logits, heat = outputs[:, 1].float(), targets[:, 0]
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    centre = heat >= 1.0
    pos = (-(1 - p) ** 2 * torch.log(p))[centre].sum()
    neg = (-(1 - heat) ** 4 * p ** 2 * torch.log(1 - p))[~centre].sum()
    n = max(int(centre.sum()), 1)
    weight = targets[:, 3]
    size = (nn.functional.l1_loss(outputs[:, 2:4].float(), targets[:, 1:3], reduction="none").sum(1) * weight).sum()
    return (pos + neg) / n + 0.5 * size / max(float(weight.sum()), 1.0)


def _loss(mask_logits: torch.Tensor, image_logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
          cls_weight: float, centres: torch.Tensor | None = None) -> torch.Tensor:
    # Fracture cells are ~1 % of the map: a positive weight plus a soft Dice on fractured images.
    centre = _centre_loss(mask_logits, centres) if centres is not None and mask_logits.shape[1] > 1 else 0.0
    mask_logits = mask_logits[:, :1]
    bce = nn.functional.binary_cross_entropy_with_logits(mask_logits, masks, pos_weight=torch.tensor(5.0))
    prob = torch.sigmoid(mask_logits)
    pos = labels > 0.5
    dice = torch.tensor(0.0)
    if pos.any():
        p, t = prob[pos].flatten(1), masks[pos].flatten(1)
        dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
    cls = nn.functional.binary_cross_entropy_with_logits(image_logits, labels)
    return bce + dice + cls_weight * cls + centre


#: Centre-heatmap threshold for the validation figures printed each epoch (fit-localiser chooses the real one).
EPOCH_CENTRE_THRESHOLD = 0.1


def _val_figures(maps: np.ndarray, logits: np.ndarray, examples: list[_Example], size: int,
                 threshold: float, centres: np.ndarray | None = None) -> dict[str, Any]:
    """Validation figures of one epoch (boxes in the input square); with ``centres`` (heatmap and log
    sizes, (n, 3, h, w)) also those of the centre boxes, under ``"centres"``."""
    preds, centre_preds, truths = [], [], []
    for i, (m, ex) in enumerate(zip(maps, examples)):
        preds.append(np.array([b for b in boxes_from_map(m, threshold, scale=MAP_STRIDE)]).reshape(-1, 5))
        if centres is not None:
            centre_preds.append(np.array(boxes_from_centres(centres[i, 0], centres[i, 1:], EPOCH_CENTRE_THRESHOLD,
                                                            scale=MAP_STRIDE)).reshape(-1, 5))
        truths.append(mask_boxes(_square_mask(ex.mask, size)))
    labels = np.array([ex.label for ex in examples])
    figures = ev.localisation_figures(preds, truths, labels)
    if centres is not None:
        figures["centres"] = ev.localisation_figures(centre_preds, truths, labels)
    figures["auc_head"] = round(float(ev.roc_auc(labels, logits)), 4) if len(set(labels)) == 2 else None
    peak = maps.reshape(len(maps), -1).max(axis=1)
    figures["auc_map_peak"] = round(float(ev.roc_auc(labels, peak)), 4) if len(set(labels)) == 2 else None
    return figures


def _split_frames(cfg: LocaliserConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[list[float]]]]:
    df = read_fracatlas(cfg.data)
    split = read_split_file(cfg.split)
    df = df.merge(split[["image_id", "split"]], on="image_id", how="left")
    if df["split"].isna().any():
        raise DatasetError(f"{int(df['split'].isna().sum())} images of {cfg.data} are not in the split file {cfg.split}.")
    boxes = fracture_boxes(cfg.data)
    if not boxes:
        raise DatasetError(f"No fracture boxes (fracture_masks_coco.json) in {cfg.data}.")
    train = df[df["split"] == "train"].reset_index(drop=True)
    val = df[df["split"] == "val"].reset_index(drop=True)
    if cfg.limit:
        train = train.sample(n=min(cfg.limit, len(train)), random_state=cfg.seed).reset_index(drop=True)
    return train, val, boxes


def train_localiser(cfg: LocaliserConfig, command: str | None = None) -> dict[str, Any]:
    """Train the localiser on the split file's training images, choose the epoch on its validation images."""
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(cfg.init_from)
    parent_card = ModelCard.from_dir(parent)
    pipeline = parent_card.pipeline_spec()
    pipeline[-1] = {"step": "resize_pad", "params": {"size": cfg.image_size}}
    mean = list(parent_card.mean) if parent_card.mean is not None else [0.5] * 3
    std = list(parent_card.std) if parent_card.std is not None else [0.5] * 3

    train_df, val_df, boxes = _split_frames(cfg)
    max_side = int(cfg.image_size * 1.3)

    def load(frame: pd.DataFrame) -> list[_Example]:
        rows = list(frame.itertuples())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated FracAtlas JPEGs
            with ThreadPoolExecutor(2) as pool:
                return list(pool.map(lambda r: _load_example(r.path, boxes.get(r.image_id, []) if r.label else [],
                                                             int(r.label), pipeline, max_side), rows))

    train_examples, val_examples = load(train_df), load(val_df)
    print(f"loaded {len(train_examples)} training and {len(val_examples)} validation images "
          f"in {time.time() - t_start:.0f} s", flush=True)
    tune_branch = cfg.tune_classifier_branch
    if tune_branch and not cfg.classifier_head:
        raise ValueError("--tune-classifier-branch needs --classifier-head")
    # The map losses need a fracture's boxes; the image label alone does not.
    positives = [i for i, ex in enumerate(train_examples) if ex.label == 1 and (tune_branch or ex.mask.any())]
    negatives = [i for i, ex in enumerate(train_examples) if ex.label == 0]

    model = FractureLocaliser(variant=0, centre_head=cfg.centre_head, classifier_head=cfg.classifier_head,
                              shared_blocks=cfg.shared_blocks,
                              classifier_input_size=cfg.classifier_input_size or parent_card.input_size)
    parent_state = read_weights(parent / parent_card.weights_file)
    copied = model.load_encoder(parent_state)
    if cfg.classifier_head:
        copied += model.load_classifier_head(parent_state)
    if cfg.continue_from:
        model.load_state(read_weights(Path(cfg.continue_from) / "model.safetensors"))
    model = model.to(memory_format=torch.channels_last)  # about a third faster on CPU (bench: 4.9 -> 3.3 s/step)
    frozen = model.frozen_modules(cfg.freeze_blocks)
    if tune_branch:  # only the classifier's branch learns; everything else (so the boxes) stays as it is
        branch = {id(m) for m in model.classifier_branch()}
        frozen = [m for m in model.children() if id(m) not in branch] + [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in frozen:
        module.requires_grad_(False)
    encoder_params = [p for p in model.net.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in model.net.encoder.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in encoder_ids and p.requires_grad]
    groups = [(params, lr) for params, lr in ((encoder_params, cfg.encoder_lr), (head_params, cfg.lr)) if params]
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups], weight_decay=cfg.weight_decay)
    n_neg = int(round(len(positives) * cfg.negatives_per_positive))
    steps_per_epoch = math.ceil((len(positives) + n_neg) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr for _, lr in groups],
                                                    total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.15)
    val_inputs = [_batch([ex], cfg.image_size, None, mean, std)[0][0] for ex in val_examples]
    history: list[dict[str, Any]] = []
    best, best_state = -1.0, None
    if cfg.continue_from:  # the starting network is the first candidate
        maps, logits, centres = _predict_inputs(model.eval(), val_inputs)
        figures = _val_figures(maps, logits, val_examples, cfg.image_size, cfg.box_threshold, centres)
        best = _epoch_score(figures, tune_branch)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": 0, **figures, "seconds": 0.0, "best": True})
        print(json.dumps(history[-1]), flush=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        if cfg.max_minutes and history and (time.time() - t_start) / 60 + history[-1]["seconds"] / 60 > cfg.max_minutes:
            print("time budget reached", flush=True)
            break
        chosen = positives + list(rng.choice(negatives, size=min(n_neg, len(negatives)), replace=False))
        order = rng.permutation(chosen)
        model.train()
        for module in frozen:
            module.eval()  # their batch-norm statistics stay the classifier's
        losses = []
        for b in range(0, len(order), cfg.batch_size):
            batch = [train_examples[i] for i in order[b:b + cfg.batch_size]]
            x, masks, labels, centre_targets = _batch(batch, cfg.image_size, rng, mean, std)
            x = x.contiguous(memory_format=torch.channels_last)
            if tune_branch:
                loss = nn.functional.binary_cross_entropy_with_logits(model.image_logit(x), labels)
            else:
                mask_logits, image_logits = model(x)
                loss = _loss(mask_logits, image_logits, masks, labels, cfg.cls_weight, centre_targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if (b // cfg.batch_size) % 10 == 9:
                print(f"epoch {epoch} step {b // cfg.batch_size + 1}/{steps_per_epoch} loss {np.mean(losses):.4f} "
                      f"{time.time() - t0:.0f} s", flush=True)
        model.eval()
        maps, logits, centres = _predict_inputs(model, val_inputs)
        figures = _val_figures(maps, logits, val_examples, cfg.image_size, cfg.box_threshold, centres)
        score = _epoch_score(figures, tune_branch)
        record = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 4), **figures,
                  "seconds": round(time.time() - t0, 1)}
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
            record["best"] = True
        history.append(record)
        print(json.dumps(record), flush=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        _save(model if best_state is None else None, best_state, out)
    _save(model if best_state is None else None, best_state, out)  # the kept network, also when no epoch ran
    card = {
        "name": out.name, "task": "fracture", "kind": "localiser", "architecture": "fpn_efficientnet_lite0",
        "description": ("FPN (segmentation-models-pytorch) on an EfficientNet-Lite0 encoder whose stem and first "
                        f"{model.shared_blocks} blocks are those of the {parent.name} classifier, beside that "
                        "classifier's own later blocks and head (one forward pass: the classifier's logit and the "
                        "boxes); trained on the FracAtlas fracture boxes"
                        + ("; the classifier's branch then fine-tuned on the image labels at this input size."
                           if tune_branch else ".") if cfg.classifier_head else
                        "FPN (segmentation-models-pytorch) on EfficientNet-Lite0 with an image-level head, "
                        "trained on the FracAtlas fracture boxes."),
        "input_size": cfg.image_size, "mean": mean, "std": std, "pipeline": pipeline,
        "map_stride": MAP_STRIDE, "centre_head": cfg.centre_head, "classifier_head": cfg.classifier_head,
        "shared_blocks": model.shared_blocks, "classifier_input_size": model.classifier_input_size,
        "weights_file": WEIGHTS_FILE, "weights_dtype": "float16",
        "encoder_from": str(parent), "encoder_tensors_copied": copied,
        "training": {"command": command,
                     "config": asdict(cfg), "history": history, "n_train_fractured": len(positives),
                     "n_train_normal": len(negatives), "n_val": len(val_examples),
                     "train_seconds": round(time.time() - t_start, 1),
                     "previous_stages": previous_stages(cfg.continue_from)},
        "data": {"root": str(cfg.data), "split_file": str(cfg.split)},
    }
    (out / "card.json").write_text(json.dumps(card, indent=2))
    return card


def previous_stages(run_dir: str | Path | None, _depth: int = 0) -> list[dict[str, Any]]:
    """The training stages that made a run's starting network, oldest first, from the cards of the
    runs it continued (``--continue-from``): each stage's command, kept epoch and time."""
    if not run_dir or _depth > 50:
        return []
    path = Path(run_dir) / "card.json"
    training = json.loads(path.read_text()).get("training", {}) if path.is_file() else {}
    kept = [h["epoch"] for h in training.get("history", []) if h.get("best")]
    stage = {"run": str(run_dir), "command": training.get("command"), "kept_epoch": kept[-1] if kept else None,
             "train_seconds": training.get("train_seconds")}
    earlier = training.get("previous_stages")
    if earlier is None:  # a card written before stages were recorded: follow its own starting run
        earlier = previous_stages((training.get("config") or {}).get("continue_from"), _depth + 1)
    return [*earlier, stage]


def _epoch_score(figures: Mapping[str, Any], image_level: bool = False) -> float:
    """An epoch's validation score: hit rate and FROC at 1 FP averaged, of the better way of drawing boxes;
    with ``image_level`` (only the classifier's branch trains, the boxes cannot change) the image head's AUC."""
    if image_level:
        return float(figures["auc_head"])
    return max((f["hit_rate"] + f["froc"]["1"]) / 2 for f in (figures, figures.get("centres") or figures))


def _centre_maps(m: torch.Tensor) -> np.ndarray | None:
    """(n, 3, h, w): centre heatmap probability, log width, log height; None without a centre head."""
    if m.shape[1] < CENTRE_CHANNELS:
        return None
    return torch.cat([torch.sigmoid(m[:, 1:2]), m[:, 2:4]], dim=1).float().numpy()


def _predict_inputs(model: FractureLocaliser, inputs: list[torch.Tensor],
                    batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    maps, logits, centres = [], [], []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch_size):
            m, y = model(torch.stack(inputs[i:i + batch_size]).contiguous(memory_format=torch.channels_last))
            maps.append(torch.sigmoid(m[:, 0]).numpy())
            logits.append(y.numpy())
            centres.append(_centre_maps(m))
    return np.concatenate(maps), np.concatenate(logits), (None if centres[0] is None else np.concatenate(centres))


def _save(model: FractureLocaliser | None, state: dict[str, torch.Tensor] | None, out: Path) -> None:
    from safetensors.torch import save_file

    state = state if state is not None else model.state_dict()
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = out / f"{WEIGHTS_FILE}.tmp"
    save_file(half, str(tmp))
    tmp.replace(out / WEIGHTS_FILE)


# --- Prediction ----------------------------------------------------------------------------------

#: Box operating points, in the order they are drawn: dashed at ``sensitive``, solid at ``balanced``.
BOX_OPERATING_POINTS = ("sensitive", "balanced")


class _Flat(nn.Module):
    """(map, logit) as one tensor, so the inference copy can be checked against the original."""

    def __init__(self, inner: FractureLocaliser) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask, logit = self.inner(x)
        return torch.cat([mask.flatten(1), logit[:, None]], dim=1)


@dataclass
class LocalisedView:
    """What the network says about one view, before any operating point."""

    prob_map: np.ndarray          # (S/4, S/4) fracture probability on the input square
    head_logit: float             # image-level head
    map_peak: float               # the map's maximum
    input_image: np.ndarray       # the uint8 square the network saw
    stages: list                  # executed preprocessing stages (for mapping boxes back)
    original_shape: tuple[int, int]
    centres: np.ndarray | None = None  # (3, S/4, S/4) centre heatmap, log width, log height (centre head)
    pooled: np.ndarray | None = None   # the classifier branch's pooled features (a network with its head)


def image_features(head_logit: np.ndarray, map_peak: np.ndarray) -> np.ndarray:
    """Inputs of the image-level combination: the head's logit and the logit of the map's peak."""
    peak = np.clip(np.asarray(map_peak, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.stack([np.asarray(head_logit, dtype=np.float64), np.log(peak / (1 - peak))], axis=1)


class LocaliserPredictor(CardOperatingPoints):
    """A fracture model that also returns boxes: probability from the image head and the map's peak
    (a logistic combination fitted on the validation split), boxes from the map's regions."""

    def __init__(self, card: ModelCard | Mapping[str, Any], model: FractureLocaliser, directory: Path) -> None:
        self.directory = Path(directory)
        self.card = card = ModelCard.coerce(card, self.directory)
        self.model = model.eval()
        self.name = card.name or self.directory.name
        self.task = "fracture"
        self.pipeline = card.pipeline_spec()
        self.mean, self.std = list(card.mean or ()), list(card.std or ())
        size = int(self.pipeline[-1]["params"]["size"])
        if os.environ.get("BONEAI_FOLD_BN", "1").strip() != "0":  # as the classifiers (boneai.predictor)
            fast, self.batchnorm_folded = inference_copy(_Flat(self.model), torch.zeros(1, 3, size, size))
            self._forward = fast.inner
        else:
            self._forward, self.batchnorm_folded = self.model, False

    @property
    def box_thresholds(self) -> dict[str, float]:
        return self.card.box_thresholds

    def input_image(self, image) -> np.ndarray:
        return apply_pipeline(image.pixels if isinstance(image, Radiograph) else image, self.pipeline)

    def input_tensor(self, image) -> torch.Tensor:
        """(1, 3, S, S) normalised tensor of ``input_image``."""
        return to_tensor(self.input_image(image), self.mean, self.std).unsqueeze(0)

    def views(self, images: list) -> list[LocalisedView]:
        staged = []
        for im in images:
            pixels = im.pixels if isinstance(im, Radiograph) else np.asarray(im)
            stages = run_pipeline(pixels, self.pipeline)
            staged.append((stages, pixels.shape[:2]))
        batch = torch.stack([to_tensor(s[-1].result.image, self.mean, self.std) for s, _ in staged])
        x = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.keeps_pooled:
                mask, logit, pooled = self._forward.forward_with_pooled(x)
                pooled = pooled.float().numpy()
            else:
                (mask, logit), pooled = self._forward(x), None
        maps = torch.sigmoid(mask[:, 0]).float().numpy()
        centres = _centre_maps(mask)
        return [LocalisedView(m, float(lg), float(m.max()), s[-1].result.image, s, shape,
                              None if centres is None else centres[i], None if pooled is None else pooled[i])
                for i, (m, lg, (s, shape)) in enumerate(zip(maps, logit.float().numpy(), staged))]

    @property
    def keeps_pooled(self) -> bool:
        """Whether predictions carry ``extras["pooled"]``: the classifier branch's pooled features (a
        network with the classifier's head), which the scope check's familiarity reads."""
        return bool(self.card.classifier_head)

    def pooled(self, images: list, batch_size: int = 16) -> np.ndarray:
        """(N, C) pooled features of the classifier branch, without the localiser's own blocks."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.cat([self.input_tensor(im) for im in images[start:start + batch_size]])
            with torch.inference_mode():
                out.append(self._forward.branch_pooled(batch.contiguous(memory_format=torch.channels_last))
                           .float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def fracture_map(self, image) -> tuple[np.ndarray, list]:
        """The fracture map on the input square (upsampled from 1/4 scale) and the stages to map it back."""
        view = self.views([image])[0]
        size = view.input_image.shape[0]
        return cv2.resize(view.prob_map, (size, size), interpolation=cv2.INTER_LINEAR), view.stages

    def probability(self, head_logit: np.ndarray, map_peak: np.ndarray) -> np.ndarray:
        if self.card.image_score is None:
            raise DatasetError(f"Localiser {self.name!r} has no image score yet; run fit-localiser on it.")
        return combined_probability(self.card.image_score, head_logit, map_peak)

    @property
    def region_threshold(self) -> float:
        """The map threshold that outlines box regions."""
        t = self.card.region_threshold
        return float(t if t is not None else DEFAULT_REGION_THRESHOLD)

    def boxes(self, view: LocalisedView, operating_point: str | None = None) -> list[dict[str, Any]]:
        """Boxes in the original file's pixels, each tagged with the strictest box operating point it passes.

        With ``operating_point`` only boxes at or above that point's threshold are returned.
        """
        thresholds = self.box_thresholds
        if not thresholds:
            return []
        floor = thresholds[operating_point] if operating_point else min(thresholds.values())
        kept = [b for b in self.candidate_boxes(view) if b[4] >= floor]
        out = []
        for x0, y0, x1, y1, score in kept:
            passed = [name for name in BOX_OPERATING_POINTS if name in thresholds and score >= thresholds[name]]
            out.append({"x0": round(float(x0), 1), "y0": round(float(y0), 1), "x1": round(float(x1), 1),
                        "y1": round(float(y1), 1), "score": round(float(score), 4), "operating_point": passed[-1]})
        return out

    @property
    def box_source(self) -> str:
        """How boxes are drawn: ``"regions"`` of the fracture map, or ``"centres"`` of the centre heatmap."""
        return self.card.box_source or "regions"

    def candidate_boxes(self, view: LocalisedView) -> np.ndarray:
        """Every box the card's box drawing gives, (n, 5) x0, y0, x1, y1, score in the original file's
        pixels, best first, before any box operating point."""
        return view_boxes(view, self.box_source, self.region_threshold, self.card.region_relative,
                          self.card.region_shrink)

    def predict_many(self, images: list, operating_point: str | float | None = None, male=None) -> list[Prediction]:
        if not len(images):
            return []
        views = self.views(list(images))
        probs = self.probability(np.array([v.head_logit for v in views]), np.array([v.map_peak for v in views]))
        thr = self.threshold(operating_point)
        name = self.operating_point_name(operating_point)
        out = []
        for v, p in zip(views, probs):
            out.append(Prediction(task="fracture", model=self.name, probability=float(p),
                                  logit=float(np.log(max(p, 1e-9) / max(1 - p, 1e-9))), threshold=thr,
                                  operating_point=name, decision=bool(p >= thr), input_image=v.input_image,
                                  extras={"boxes": self.boxes(v), "fracture_map": v.prob_map,
                                          **({} if v.pooled is None else {"pooled": v.pooled})}))
        return out

    def predict(self, image, operating_point: str | float | None = None, male=None) -> Prediction:
        return self.predict_many([image], operating_point)[0]

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities from the combined logits ``predict`` reports (they are already calibrated)."""
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def combined_probability(image_score: ImageScore, head_logit: np.ndarray, map_peak: np.ndarray) -> np.ndarray:
    """The image probability: the card's logistic combination of the head's logit and the map's peak."""
    z = (image_features(head_logit, map_peak) @ np.asarray(image_score.weights, dtype=np.float64)
         + float(image_score.bias))
    return 1.0 / (1.0 + np.exp(-z))


@register_loader("localiser")
def load_localiser(card: ModelCard | Mapping[str, Any], directory: str | Path,
                   resolve: ModelResolver | None = None) -> LocaliserPredictor:
    """Build the network from its card and weights (float16 on disk); the loader of localiser cards."""
    directory = Path(directory)
    card = ModelCard.coerce(card, directory)
    return LocaliserPredictor(card, _load_network(directory, card), directory)


# --- Fitting on validation, evaluating on a folder ------------------------------------------------


def truth_boxes(boxes_xywh: dict[str, list[list[float]]], image_id: str) -> np.ndarray:
    """Annotated boxes of one file as (n, 4) x0, y0, x1, y1."""
    return np.array([[x, y, x + w, y + h] for x, y, w, h in boxes_xywh.get(image_id, [])],
                    dtype=np.float64).reshape(-1, 4)


def localised_views(predictor: LocaliserPredictor, paths: list[str], batch_size: int = 16) -> list[LocalisedView]:
    """Network outputs for files (read with the app's reader; truncated JPEGs with their warning)."""
    views: list[LocalisedView] = []
    for i in range(0, len(paths), batch_size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = [read_radiograph(p) for p in paths[i:i + batch_size]]
        views.extend(predictor.views(images))
    return views


def view_boxes(view: LocalisedView, source: str, threshold: float, relative: float | None = None,
               shrink: float = 1.0) -> np.ndarray:
    """A view's boxes, (n, 5) x0, y0, x1, y1, score in the original file's pixels: regions of the
    fracture map (``source="regions"``), or peaks of the centre heatmap (``"centres"``; ``relative``
    unused)."""
    if source == "centres":
        if view.centres is None:
            raise DatasetError("This localiser has no centre head; its boxes come from map regions.")
        found = boxes_from_centres(view.centres[0], view.centres[1:], threshold, scale=MAP_STRIDE, shrink=shrink)
    elif source == "regions":
        found = boxes_from_map(view.prob_map, threshold, scale=MAP_STRIDE, relative=relative, shrink=shrink)
    else:
        raise DatasetError(f"Unknown box source {source!r}: regions or centres.")
    if not found:
        return np.zeros((0, 5))
    mapped = map_boxes(np.array([b[:4] for b in found]), view.stages, view.original_shape, inverse=True)
    return np.c_[mapped, [b[4] for b in found]]


def fit_on_validation(run_dir: str | Path, data: str | Path, split: str | Path,
                      region_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
                      region_relatives: tuple[float | None, ...] = (None, 0.7, 0.9, 0.97),
                      region_shrinks: tuple[float, ...] = (1.0, 0.8, 0.6),
                      centre_thresholds: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
                      centre_shrinks: tuple[float, ...] = (1.5, 1.25, 1.0, 0.8), command: str | None = None) -> dict[str, Any]:
    """Every choice of the localiser, made on the split file's validation images (original files):

    how boxes are drawn (regions of the map: threshold, share of the peak, scale; or, for a network
    with a centre head, peaks of the centre heatmap: threshold, scale), the two box operating points (sensitive: at most one
    false-positive box per image; balanced: at most 0.25), the image-level combination of the head
    and the map's peak (logistic regression), and the image-level operating points. Writes them, with
    the validation figures, into the run's card and ``val_predictions.csv``. ``command``, the command
    that ran it, goes into the card's ``fitting`` record.
    """
    from sklearn.linear_model import LogisticRegression  # sklearn's models load only where fitted

    run_dir = Path(run_dir)
    typed = ModelCard.from_dir(run_dir)  # named after its folder when the card names none
    predictor = LocaliserPredictor(typed, _load_network(run_dir, typed), run_dir)
    card = typed.to_dict()  # the JSON: the choices below are written into it
    df = read_fracatlas(data).merge(read_split_file(split)[["image_id", "split"]], on="image_id")
    val = df[df["split"] == "val"].reset_index(drop=True)
    boxes = fracture_boxes(data)
    truths = [truth_boxes(boxes, r.image_id) if r.label else np.zeros((0, 4)) for r in val.itertuples()]
    views = localised_views(predictor, val["path"].tolist())
    y = val["label"].to_numpy().astype(int)

    grid = [("regions", t, rel, shrink) for t in region_thresholds for rel in region_relatives for shrink in region_shrinks]
    if views and views[0].centres is not None:
        grid += [("centres", t, None, shrink) for t in centre_thresholds for shrink in centre_shrinks]
    trials = {}
    for key in grid:
        preds = [view_boxes(v, *key) for v in views]
        trials[key] = (ev.localisation_figures(preds, truths, y), preds)
    best = max(trials, key=lambda k: (trials[k][0]["hit_rate"] or 0) + (trials[k][0]["froc"]["1"] or 0))
    box_source, region_t, region_rel, region_shrink = best
    figures, preds = trials[best]
    curve = ev.froc_curve(preds, truths)

    def score_at(max_fp: float) -> float:
        ok = curve[curve["fp_per_image"] <= max_fp]
        return float(ok["score"].min()) if len(ok) else 1.0

    box_points = {}
    for name, max_fp in (("sensitive", 1.0), ("balanced", 0.25)):
        t = score_at(max_fp)
        box_points[name] = {"threshold": t, "max_fp_per_image": max_fp, **_box_point_figures(preds, truths, t)}

    head = np.array([v.head_logit for v in views])
    peak = np.array([v.map_peak for v in views])
    features = image_features(head, peak)
    lr = LogisticRegression(C=1.0).fit(features, y)
    card["image_score"] = {"weights": lr.coef_[0].tolist(), "bias": float(lr.intercept_[0]),
                           "inputs": ["image head logit", "logit of the map's peak"],
                           "fitted_on": "validation split (logistic regression)"}
    prob = combined_probability(ImageScore.from_dict(card["image_score"]), head, peak)
    card["operating_points"] = ev.operating_points(y, prob)
    card["default_operating_point"] = DEFAULT_OPERATING_POINT
    card["box_source"] = box_source
    card["region_threshold"] = region_t
    card["region_relative"] = region_rel
    card["region_shrink"] = region_shrink
    card["box_operating_points"] = box_points
    card["fitting"] = {"command": command,
                       "region_grid": {"thresholds": list(region_thresholds), "relatives": list(region_relatives),
                                       "shrinks": list(region_shrinks)},
                       "centre_grid": {"thresholds": list(centre_thresholds), "shrinks": list(centre_shrinks)}}
    card["validation"] = {
        **ev.binary_metrics(y, prob, threshold=card["operating_points"]["balanced"]["threshold"]),
        "ece": ev.expected_calibration_error(y, prob),
        "auc_head_only": round(float(ev.roc_auc(y, head)), 4),
        "auc_map_peak_only": round(float(ev.roc_auc(y, peak)), 4),
        "localisation": figures,
        "region_trials": [{"source": src, "threshold": t, "relative": rel, "shrink": sh,
                           **{k: f[k] for k in ("hit_rate", "froc", "map50")}}
                          for (src, t, rel, sh), (f, _) in trials.items()],
        "note": "validation figures: every choice above was made on these images",
    }
    (run_dir / "card.json").write_text(json.dumps(card, indent=2, default=float))
    pd.DataFrame({"image": [str(Path(p).relative_to(Path(data))) for p in val["path"]], "label": y,
                  "region": val["region"], "head_logit": head, "map_peak": peak, "probability": prob}
                 ).to_csv(run_dir / "val_predictions.csv", index=False)
    return card


def _load_network(directory: Path, card: ModelCard) -> FractureLocaliser:
    model = FractureLocaliser(variant=0, centre_head=card.centre_head, classifier_head=card.classifier_head,
                              shared_blocks=card.shared_blocks, classifier_input_size=card.classifier_input_size)
    model.load_state_dict(read_weights(directory / card.weights_file))
    return model


def _box_point_figures(preds: list[np.ndarray], truths: list[np.ndarray], threshold: float) -> dict[str, float | None]:
    """Share of annotated boxes found and false-positive boxes per image, keeping boxes >= ``threshold``."""
    kept = [p[p[:, 4] >= threshold] if len(p) else p for p in preds]
    found, false_positives, n_truth = ev.box_counts(kept, truths)
    return {"sensitivity": round(found / n_truth, 4) if n_truth else None,
            "fp_per_image": round(false_positives / max(1, len(kept)), 4)}
