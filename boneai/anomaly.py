"""Unsupervised anomaly detection: training, model cards and prediction.

Two kinds of anomaly model share one card format (``task: "anomaly"``):

* autoencoders (``cae``, ``vae``; Davletshina et al. 2020): trained on normal radiographs only, with a
  reconstruction loss restricted to the hand mask of :func:`boneai.preprocess.segment_foreground`.
  The per-pixel reconstruction error is the anomaly map; the image score is its mean under the mask
  (or the mean of the top ``top_fraction`` of masked pixels).
* ``lite0_gaussian``: ImageNet EfficientNet-Lite0 features with a Gaussian of the normal images; the
  score is the Mahalanobis distance. Its card's ``heatmap_model`` names the autoencoder whose error
  map is shown for it.

Example:
    >>> from boneai.inference import load_model                  # doctest: +SKIP
    >>> model = load_model("anomaly")                             # doctest: +SKIP
    >>> p = model.predict(read_radiograph("hand.png"))            # doctest: +SKIP
    >>> p.anomaly_score, p.decision                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from boneai import evaluate as ev
from boneai._json import json_default
from boneai.card import CARD_FILE, DEFAULT_OPERATING_POINT, WEIGHTS_FILE, AnomalyScore, ModelCard
from boneai.config import TrainConfig
from boneai.data import read_classification_dir, split_train_val
from boneai.errors import BoneAIError, ModelNotFoundError
from boneai.io import Radiograph, read_radiograph
from boneai.models import build_model, get_spec
from boneai.predictor import CardOperatingPoints, ModelResolver, Prediction, read_weights, register_loader
from boneai.preprocess import apply_pipeline, segment_foreground

__all__ = ["AnomalyPredictor", "anomaly_pipeline", "foreground_mask", "image_score", "load_anomaly_model",
           "train_autoencoder"]

_AUTOENCODERS = ("cae", "vae")


def anomaly_pipeline(size: int) -> list[dict[str, Any]]:
    """The deterministic preprocessing of the anomaly models (as the fracture models: crop, letterbox)."""
    return [{"step": "standardise", "params": {}}, {"step": "otsu_crop", "params": {}},
            {"step": "resize_pad", "params": {"size": int(size)}}]


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Float32 0/1 hand mask of a model-input square (the masked-loss region)."""
    mask = segment_foreground(image).extras["mask"] > 0
    if mask.mean() < 0.02:  # segmentation failed: score the whole image rather than nothing
        mask[:] = True
    return mask.astype(np.float32)


def image_score(error: np.ndarray, mask: np.ndarray, kind: str = "mean", top_fraction: float = 0.05) -> float:
    """Image anomaly score from a per-pixel error map: mean under the mask, or mean of its top fraction."""
    values = np.asarray(error, dtype=np.float64)[np.asarray(mask) > 0]
    if values.size == 0:
        values = np.asarray(error, dtype=np.float64).ravel()
    if kind == "mean":
        return float(values.mean())
    if kind == "topk":
        k = max(1, int(round(top_fraction * values.size)))
        return float(np.partition(values, values.size - k)[-k:].mean())
    raise ValueError(f"unknown score kind {kind!r}; use 'mean' or 'topk'")


def _unit_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 squares -> (B, 1, S, S) float in [0, 1]."""
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).unsqueeze(1)


def _reconstruction_error(model: nn.Module, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Squared reconstruction error maps (B, S, S) of an autoencoder, in evaluation mode."""
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = _unit_tensor(images[i:i + batch_size])
            out.append(((model(x) - x) ** 2)[:, 0].numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def _mask_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([foreground_mask(im) for im in images])).unsqueeze(1)


def _gaussian_features(model: nn.Module, images: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            out.append(model.features(_unit_tensor(chunk), _mask_tensor(chunk)))
    return torch.cat(out)


def _gaussian_scores(model: nn.Module, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    if not len(images):
        return np.zeros(0, np.float32)
    with torch.inference_mode():
        return model.score_features(_gaussian_features(model, images, batch_size)).numpy()


def _operating_points(y: np.ndarray, score: np.ndarray, min_sensitivity: float = 0.90) -> dict[str, dict[str, float]]:
    """Named thresholds on an unbounded score (``evaluate.operating_points`` assumes probabilities <= 1)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, score)
    finite = np.isfinite(thr)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    ok = np.where(tpr >= min_sensitivity)[0]
    points = {"sensitive": float(thr[ok[0]] if len(ok) else thr[-1]), "balanced": float(thr[int(np.argmax(tpr - fpr))])}
    return {name: {k: v for k, v in ev.threshold_metrics(y, score, t).items()
                   if k in ("threshold", "sensitivity", "specificity", "ppv", "npv")} for name, t in points.items()}


class AnomalyPredictor(CardOperatingPoints):
    """A loaded anomaly model with the :class:`boneai.inference.Predictor` interface the app and CLI use."""

    def __init__(self, card: ModelCard | Mapping[str, Any], model: nn.Module, directory: Path,
                 resolve: ModelResolver | None = None) -> None:
        self.directory = Path(directory)
        self.card = card = ModelCard.coerce(card, self.directory)
        self.model = model.eval()
        self.name = card.name or self.directory.name
        self.task = "anomaly"
        self.architecture = str(card.architecture)
        self.pipeline = card.pipeline_spec()
        self.mean = list(card.mean) if card.mean is not None else [0.0] * 3
        self.std = list(card.std) if card.std is not None else [1.0] * 3
        self.score_spec = card.score if card.score is not None else AnomalyScore()
        self._resolve = resolve  # finds the heatmap model when it is not in this model's folder's parent
        self._heatmap_model: AnomalyPredictor | None = None

    # -- preprocessing ---------------------------------------------------------------------------
    def input_image(self, image: Radiograph | np.ndarray) -> np.ndarray:
        """The exact uint8 square the model sees."""
        pixels = image.pixels if isinstance(image, Radiograph) else image
        return apply_pipeline(pixels, self.pipeline)

    def input_tensor(self, image: Radiograph | np.ndarray) -> torch.Tensor:
        """(1, 1, S, S) grey tensor in [0, 1]."""
        return _unit_tensor([self.input_image(image)])

    # -- maps and scores -------------------------------------------------------------------------
    @property
    def has_own_map(self) -> bool:
        return self.architecture in _AUTOENCODERS

    def heatmap_model(self) -> "AnomalyPredictor":
        """The autoencoder that draws this model's error maps (itself for an autoencoder)."""
        if self.has_own_map:
            return self
        if self._heatmap_model is None:
            name = self.card.heatmap_model
            if not name:
                raise ModelNotFoundError(f"Anomaly model {self.name!r} has no error map and names no heatmap model.")
            folder = self.directory.parent / name
            if not (folder / CARD_FILE).is_file():
                if self._resolve is None:
                    raise ModelNotFoundError(f"Heatmap model {name!r} of {self.name!r} not found next to it.")
                folder = self._resolve(name)
            self._heatmap_model = load_anomaly_model(ModelCard.from_dir(folder), folder, self._resolve)
        return self._heatmap_model

    def error_map(self, image: Radiograph | np.ndarray) -> np.ndarray:
        """Per-pixel squared reconstruction error on the model-input square, zero outside the hand mask."""
        ae = self.heatmap_model()
        inp = ae.input_image(image)
        err = _reconstruction_error(ae.model, [inp])[0]
        return (err * foreground_mask(inp)).astype(np.float32)

    def scores(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Anomaly scores of model-input squares (higher = more unusual)."""
        if not self.has_own_map:
            return _gaussian_scores(self.model, inputs)
        errors = _reconstruction_error(self.model, inputs)
        spec = self.score_spec
        return np.array([image_score(e, foreground_mask(im), spec.kind, spec.top_fraction)
                         for e, im in zip(errors, inputs)])

    def predict_many(self, images: Sequence[Radiograph | np.ndarray], operating_point: str | float | None = None,
                     male: bool | Sequence[bool] | None = None) -> list:
        """One :class:`boneai.predictor.Prediction` per image, with ``anomaly_score`` and a decision."""
        inputs = [self.input_image(im) for im in images]
        if not inputs:
            return []
        scores = self.scores(inputs)
        thr = self.threshold(operating_point)
        name = self.operating_point_name(operating_point)
        return [Prediction(task="anomaly", model=self.name, anomaly_score=float(s), threshold=thr,
                           operating_point=name, decision=bool(s >= thr), input_image=inp)
                for s, inp in zip(scores, inputs)]

    def predict(self, image: Radiograph | np.ndarray, operating_point: str | float | None = None,
                male: bool | None = None) -> Prediction:
        return self.predict_many([image], operating_point, male)[0]


@register_loader("anomaly")
def load_anomaly_model(card: ModelCard | Mapping[str, Any], directory: str | Path,
                       resolve: ModelResolver | None = None) -> AnomalyPredictor:
    """Build the card's architecture and load its safetensors weights (the loader of anomaly cards).

    ``resolve`` finds the heatmap model a feature-Gaussian card names when it is not a sibling folder.
    """
    directory = Path(directory)
    card = ModelCard.coerce(card, directory)
    weights = directory / card.weights_file
    if not weights.is_file():
        raise ModelNotFoundError(f"Model {card.name or directory.name!r} has a card but no weights file.")
    architecture = str(card.architecture)
    spec = get_spec(architecture)
    if spec.task != "anomaly":
        raise ModelNotFoundError(f"Architecture {spec.name!r} is not an anomaly model.")
    model = build_model(architecture, pretrained=False, **dict(card.architecture_params))
    state = read_weights(weights)
    # The feature Gaussian ships only its fitted statistics; the backbone comes from the ImageNet package.
    strict = architecture in _AUTOENCODERS
    result = model.load_state_dict(state, strict=strict)
    if not strict and result.unexpected_keys:
        raise ModelNotFoundError(f"Weights of {card.name!r} do not fit {architecture!r}.")
    return AnomalyPredictor(card, model.eval(), directory, resolve)


# -- training -------------------------------------------------------------------------------------

def _load_inputs(paths: Sequence[str], pipeline: list[dict[str, Any]]) -> list[np.ndarray]:
    def load(p: str) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated FracAtlas JPEGs decode with a warning
            return apply_pipeline(read_radiograph(p).pixels, pipeline)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(load, paths))


def _anomaly_split(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fracture trainer's split of the whole folder, then the region: validation stays unseen by both."""
    df = read_classification_dir(cfg.data)
    train_df, val_df = split_train_val(df, cfg.val_fraction or 0.2, seed=cfg.seed)
    region = cfg.region
    if region:
        if "region" not in df or not (df["region"] == region).any():
            raise BoneAIError(f"No images of region {region!r} in {cfg.data}.")
        train_df = train_df[train_df["region"] == region].reset_index(drop=True)
        val_df = val_df[val_df["region"] == region].reset_index(drop=True)
    train_df = train_df[train_df["label"] == 0].reset_index(drop=True)  # normals only
    if cfg.limit:
        train_df = train_df.iloc[: int(cfg.limit)].reset_index(drop=True)
    return train_df, val_df


def _augment_batch(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flips and small shifts (the same for image and mask)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x, m = x.clone(), m.clone()
    x[flip], m[flip] = x[flip].flip(-1), m[flip].flip(-1)
    dx, dy = (int(v) for v in torch.randint(-6, 7, (2,), generator=gen))
    return torch.roll(x, (dy, dx), dims=(2, 3)), torch.roll(m, (dy, dx), dims=(2, 3))


def _fit_autoencoder(model: nn.Module, x: torch.Tensor, m: torch.Tensor, cfg: TrainConfig,
                     loss_kind: str, kl_weight: float, log: Any) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = max(1, int(np.ceil(len(x) / cfg.batch_size))) * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.time()
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            xb, mb = _augment_batch(x[idx], m[idx], gen)
            recon, reg = model.loss_terms(xb)
            diff = (recon - xb).abs() if loss_kind == "l1" else (recon - xb) ** 2
            # Masked reconstruction loss: only pixels of the hand count (Davletshina et al.).
            loss = (diff * mb).sum() / mb.sum().clamp_min(1.0) + kl_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
            seen += len(idx)
        record = {"epoch": epoch + 1, "train_loss": round(total / max(seen, 1), 6), "seconds": round(time.time() - t0, 1)}
        history.append(record)
        log(record)
    return history


def train_autoencoder(cfg: TrainConfig) -> dict[str, Any]:
    """Train an anomaly model on the normal training images and write card, weights and predictions.

    ``cfg`` is the ``train --task anomaly`` configuration; of it this trainer reads data, out, model,
    epochs, image_size, batch_size, lr, loss (``l1``, else squared error), region, seed, limit and
    val_fraction. The score definition and the "balanced" and "sensitive" thresholds are chosen on the
    validation split; the card records ``cfg.command``.
    """
    from safetensors.torch import save_file

    if cfg.init_from or cfg.distill_from:
        raise ValueError("--init-from and --distill-from apply to the fracture and bone-age tasks")
    name = cfg.model or "cae"
    spec = get_spec(name)
    if spec.task != "anomaly":
        raise ValueError(f"model {name!r} is a {spec.task} model; anomaly models: cae, vae, lite0_gaussian")
    torch.manual_seed(cfg.seed)
    size = cfg.image_size or spec.input_size
    pipeline = anomaly_pipeline(size)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)

    t_data = time.time()
    train_df, val_df = _anomaly_split(cfg)
    if train_df.empty or val_df.empty or val_df["label"].nunique() < 2:
        raise BoneAIError("Anomaly training needs normal training images and both classes in validation.")
    train_imgs, val_imgs = _load_inputs(train_df["path"].tolist(), pipeline), _load_inputs(val_df["path"].tolist(), pipeline)
    data_seconds = time.time() - t_data
    y_val = val_df["label"].to_numpy().astype(int)
    model = build_model(name, pretrained=True)
    t0 = time.time()
    loss_kind = "l1" if cfg.loss == "l1" else "mse"
    kl_weight = 0.0
    history: list[dict[str, Any]] = []
    score_rows: dict[str, np.ndarray] = {}
    if name in _AUTOENCODERS:
        kl_weight = 1e-3 if name == "vae" else 0.0
        x = _unit_tensor(train_imgs)
        m = torch.from_numpy(np.stack([foreground_mask(im) for im in train_imgs])).unsqueeze(1)
        history = _fit_autoencoder(model, x, m, cfg, loss_kind, kl_weight, log)
        errors = _reconstruction_error(model, val_imgs)
        masks = [foreground_mask(im) for im in val_imgs]
        candidates = {"mean": {"kind": "mean"}, "topk": {"kind": "topk", "top_fraction": 0.05}}
        for key, c in candidates.items():
            score_rows[key] = np.array([image_score(e, mk, c["kind"], c.get("top_fraction", 0.05))
                                        for e, mk in zip(errors, masks)])
        aucs = {k: ev.roc_auc(y_val, s) for k, s in score_rows.items()}
        chosen = max(aucs, key=aucs.get)
        score_spec = {**candidates[chosen], "error": "squared reconstruction error",
                      "definition": ("mean squared reconstruction error under the hand mask" if chosen == "mean" else
                                     "mean of the top 5% squared reconstruction errors under the hand mask"),
                      "validation_auc_by_kind": aucs, "chosen_on": "validation split"}
    else:
        shrinkage = model.fit(_gaussian_features(model, train_imgs))
        score_rows["mahalanobis"] = _gaussian_scores(model, val_imgs)
        chosen = "mahalanobis"
        score_spec = {"kind": "mahalanobis", "definition": "squared Mahalanobis distance, divided by the feature "
                      "count, of ImageNet EfficientNet-Lite0 features (block outputs " + str(list(model.taps)) +
                      (" and head" if model.head else "") + f", {model.pool} pooling under the hand mask, "
                      "standardised) from the Ledoit-Wolf Gaussian of the normal training images",
                      "shrinkage": shrinkage,
                      "feature_choice": "block 5, masked mean: best of single blocks 2-6 and head (mean, max, masked "
                                        "mean) by 3-fold cross-validation on the training split"}
        log({"event": "gaussian fitted", "n_train": len(train_imgs), "shrinkage": round(shrinkage, 4)})
    train_seconds = time.time() - t0
    score = score_rows[chosen]
    points = _operating_points(y_val, score)
    metrics = ev.binary_metrics(y_val, score, threshold=points[DEFAULT_OPERATING_POINT]["threshold"])

    state = model.state_dict()
    if name not in _AUTOENCODERS:
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    save_file({k: v.half().contiguous() if v.is_floating_point() and name in _AUTOENCODERS else v.contiguous()
               for k, v in state.items()}, str(out / WEIGHTS_FILE))
    data_root = Path(cfg.data)
    pd.DataFrame({"image": [str(Path(p).relative_to(data_root)) if Path(p).is_relative_to(data_root) else p
                            for p in val_df["path"]],
                  "label": y_val, "region": val_df.get("region", "unknown"), "anomaly_score": score}
                 ).to_csv(out / "val_predictions.csv", index=False)
    region = cfg.region
    card: dict[str, Any] = {
        "name": out.name, "task": "anomaly", "architecture": name, "description": spec.description,
        "initial_weights": spec.pretrained, "input_size": size,
        "architecture_params": {} if name in _AUTOENCODERS else {"taps": list(model.taps), "pool": model.pool,
                                                                 "head": model.head}, "mean": list(spec.mean), "std": list(spec.std),
        "pipeline": pipeline, "weights_file": WEIGHTS_FILE,
        "weights_dtype": "float16" if name in _AUTOENCODERS else "float32 (Gaussian statistics only)",
        "score": score_spec,
        "mask": "preprocess.segment_foreground on the model-input square",
        "operating_points": points, "default_operating_point": DEFAULT_OPERATING_POINT,
        "validation": {k: metrics[k] for k in ("n", "n_positive", "auc", "auc_ci95", "ap")},
        "training": {
            "command": cfg.command, "model": name, "loss": f"masked {loss_kind}" + (f" + {kl_weight} x KL" if kl_weight else "")
            if name in _AUTOENCODERS else "none (Gaussian fit)", "epochs": cfg.epochs if name in _AUTOENCODERS else 0,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "region": region,
            "n_train_normal": len(train_df), "n_val": len(val_df), "torch": torch.__version__,
            "train_seconds": round(train_seconds, 1), "data_load_seconds": round(data_seconds, 1), "history": history,
        },
        "data": {"root": str(cfg.data), "region": region or "all",
                 "validation_split": f"{cfg.val_fraction or 0.2:.0%} stratified, seed {cfg.seed} "
                                     "(the fracture trainer's split), then the region"},
    }
    if name not in _AUTOENCODERS:
        card["heatmap_model"] = "anomaly_cae"  # the shipped autoencoder draws the Gaussian model's heatmaps
    (out / "card.json").write_text(json.dumps(card, indent=2, default=json_default))
    return card


