"""Fracture localisation: a dense fracture map with boxes, and an image-level fracture logit.

The network is a Feature Pyramid Network decoder (``segmentation-models-pytorch``) on the
EfficientNet-Lite encoder of a trained fracture classifier, with a classification head on the
deepest features (a multi-task network). It is trained on the FracAtlas fracture boxes, filled as
masks on the model's input square. At prediction time the map is thresholded; each connected
region becomes a box scored by the map's peak inside it, and boxes are mapped back to the original
file's pixels through each preprocessing step's inverse.

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
import shlex
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from boneai.config import LocaliserConfig
from boneai.data import fracture_boxes, read_fracatlas, read_split_file
from boneai.errors import DatasetError
from boneai.io import read_radiograph
from boneai.preprocess import map_boxes, run_pipeline
from boneai.transforms import to_tensor

__all__ = [
    "FractureLocaliser",
    "boxes_from_map",
    "LocaliserConfig",
    "train_localiser",
    "MAP_STRIDE",
]

#: The decoder's map is at a quarter of the input square (FPN's finest level, no final upsampling).
MAP_STRIDE = 4


class FractureLocaliser(nn.Module):
    """FPN on an EfficientNet-Lite encoder: (fracture-map logits at 1/4 scale, image logit)."""

    def __init__(self, variant: int = 0, pyramid_channels: int = 64, segmentation_channels: int = 32) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        # encoder_weights=None: nothing is downloaded; the encoder is filled from our own weights.
        self.net = smp.FPN(encoder_name=f"tu-tf_efficientnet_lite{variant}", encoder_weights=None,
                           decoder_pyramid_channels=pyramid_channels,
                           decoder_segmentation_channels=segmentation_channels, classes=1, upsampling=1,
                           aux_params={"classes": 1, "dropout": 0.2})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, label = self.net(x)
        return mask, label[:, 0]

    def frozen_modules(self, n_blocks: int) -> list[nn.Module]:
        """The encoder's stem and first ``n_blocks`` blocks (for fine-tuning with them fixed)."""
        enc = self.net.encoder.model
        if n_blocks <= 0:
            return []
        return [enc.conv_stem, enc.bn1] + [enc.blocks[i] for i in range(min(n_blocks, len(enc.blocks)))]

    def load_encoder(self, state: dict[str, torch.Tensor]) -> int:
        """Copy a timm EfficientNet-Lite classifier's backbone into the encoder; returns tensors copied."""
        encoder = self.net.encoder.model
        own = encoder.state_dict()
        picked = {k: v.to(own[k].dtype) for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in picked and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"encoder weights missing for {missing[:3]}")
        encoder.load_state_dict(picked, strict=False)
        return len(picked)


def boxes_from_map(prob_map: np.ndarray, threshold: float, scale: float = 1.0, max_boxes: int = 10,
                   min_area: int = 1) -> list[list[float]]:
    """Connected regions of ``prob_map >= threshold`` as ``[x0, y0, x1, y1, score]``, best first.

    The score is the map's peak inside the region. Coordinates are multiplied by ``scale`` (the
    map's stride) and are pixel edges: a region covering columns 10..19 spans x 10 to 20.
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
        score = float(m[labels == k].max())
        boxes.append([x * scale, y * scale, (x + w) * scale, (y + h) * scale, score])
    boxes.sort(key=lambda b: -b[4])
    return boxes[:max_boxes]


# --- Training ------------------------------------------------------------------------------------


def _rendered_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        mask[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = 255
    return mask


@dataclass
class _Example:
    image: np.ndarray       # grey uint8 after the pipeline's steps before the resize, at most ~1.3x size
    mask: np.ndarray        # uint8 0/255 fracture boxes on the same grid
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
    """0/255 mask on the input square -> float target at the map's stride (area share per cell)."""
    h, w = mask.shape
    small = cv2.resize(mask.astype(np.float32) / 255.0, (w // MAP_STRIDE, h // MAP_STRIDE), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((small >= 0.25).astype(np.float32))


def _batch(examples: list[_Example], size: int, rng: np.random.Generator | None, mean, std):
    xs, ms, ys = [], [], []
    for ex in examples:
        if rng is None:
            from boneai.preprocess import resize_pad

            img = resize_pad(ex.image, size).image
            msk = resize_pad(ex.mask, size).image
        else:
            img, msk = _augment_pair(ex.image, ex.mask, size, rng)
        xs.append(to_tensor(img, mean, std))
        ms.append(_mask_target(msk))
        ys.append(float(ex.label))
    return torch.stack(xs), torch.stack(ms)[:, None], torch.tensor(ys)


def _loss(mask_logits: torch.Tensor, image_logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
          cls_weight: float) -> torch.Tensor:
    # Fracture cells are ~1 % of the map: a positive weight plus a soft Dice on fractured images.
    bce = nn.functional.binary_cross_entropy_with_logits(mask_logits, masks, pos_weight=torch.tensor(5.0))
    prob = torch.sigmoid(mask_logits)
    pos = labels > 0.5
    dice = torch.tensor(0.0)
    if pos.any():
        p, t = prob[pos].flatten(1), masks[pos].flatten(1)
        dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
    cls = nn.functional.binary_cross_entropy_with_logits(image_logits, labels)
    return bce + dice + cls_weight * cls


def _val_figures(maps: np.ndarray, logits: np.ndarray, examples: list[_Example], size: int,
                 threshold: float) -> dict[str, Any]:
    from boneai import evaluate as ev
    from boneai.preprocess import resize_pad

    preds, truths = [], []
    for m, ex in zip(maps, examples):
        preds.append(np.array([b for b in boxes_from_map(m, threshold, scale=MAP_STRIDE)]).reshape(-1, 5))
        gt_mask = resize_pad(ex.mask, size).image
        truths.append(np.array([b[:4] for b in boxes_from_map(gt_mask.astype(np.float32) / 255, 0.5)]).reshape(-1, 4))
    labels = np.array([ex.label for ex in examples])
    figures = ev.localisation_figures(preds, truths, labels)
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


def train_localiser(cfg: LocaliserConfig) -> dict[str, Any]:
    """Train the localiser on the split file's training images, choose the epoch on its validation images."""
    from boneai.inference import read_weights

    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(cfg.init_from)
    parent_card = json.loads((parent / "card.json").read_text())
    pipeline = [dict(s) for s in parent_card["pipeline"]]
    pipeline[-1] = {"step": "resize_pad", "params": {"size": cfg.image_size}}
    mean, std = parent_card.get("mean", [0.5] * 3), parent_card.get("std", [0.5] * 3)

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
    positives = [i for i, ex in enumerate(train_examples) if ex.label == 1 and ex.mask.any()]
    negatives = [i for i, ex in enumerate(train_examples) if ex.label == 0]

    model = FractureLocaliser(variant=0)
    copied = model.load_encoder(read_weights(parent / parent_card.get("weights_file", "model.safetensors")))
    frozen = model.frozen_modules(cfg.freeze_blocks)
    for module in frozen:
        module.requires_grad_(False)
    encoder_params = [p for p in model.net.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in model.net.encoder.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in encoder_ids and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": cfg.encoder_lr},
                                   {"params": head_params, "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    n_neg = int(round(len(positives) * cfg.negatives_per_positive))
    steps_per_epoch = math.ceil((len(positives) + n_neg) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[cfg.encoder_lr, cfg.lr],
                                                    total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    val_inputs = [_batch([ex], cfg.image_size, None, mean, std)[0][0] for ex in val_examples]
    history: list[dict[str, Any]] = []
    best, best_state = -1.0, None
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
            x, masks, labels = _batch(batch, cfg.image_size, rng, mean, std)
            mask_logits, image_logits = model(x)
            loss = _loss(mask_logits, image_logits, masks, labels, cfg.cls_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        model.eval()
        maps, logits = _predict_inputs(model, val_inputs)
        figures = _val_figures(maps, logits, val_examples, cfg.image_size, cfg.box_threshold)
        score = (figures["hit_rate"] + figures["froc"]["1"]) / 2
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
    card = {
        "name": out.name, "task": "localisation", "kind": "localiser", "architecture": "fpn_efficientnet_lite0",
        "description": "FPN (segmentation-models-pytorch) on EfficientNet-Lite0 with an image-level head, "
                       "trained on the FracAtlas fracture boxes.",
        "input_size": cfg.image_size, "mean": mean, "std": std, "pipeline": pipeline,
        "map_stride": MAP_STRIDE, "weights_file": "model.safetensors", "weights_dtype": "float16",
        "encoder_from": str(parent), "encoder_tensors_copied": copied,
        "training": {"command": " ".join(shlex.quote(a) for a in ["python", "-m", "boneai"] + sys.argv[1:]),
                     "config": asdict(cfg), "history": history, "n_train_fractured": len(positives),
                     "n_train_normal": len(negatives), "n_val": len(val_examples),
                     "train_seconds": round(time.time() - t_start, 1)},
        "data": {"root": str(cfg.data), "split_file": str(cfg.split)},
    }
    (out / "card.json").write_text(json.dumps(card, indent=2))
    return card


def _predict_inputs(model: FractureLocaliser, inputs: list[torch.Tensor], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    maps, logits = [], []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch_size):
            m, y = model(torch.stack(inputs[i:i + batch_size]))
            maps.append(torch.sigmoid(m[:, 0]).numpy())
            logits.append(y.numpy())
    return np.concatenate(maps), np.concatenate(logits)


def _save(model: FractureLocaliser | None, state: dict[str, torch.Tensor] | None, out: Path) -> None:
    from safetensors.torch import save_file

    state = state if state is not None else model.state_dict()
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(half, str(tmp))
    tmp.replace(out / "model.safetensors")
