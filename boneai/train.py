"""Training loop for the fracture classifiers and the bone-age regressor.

One entry point, :func:`train`, driven by a :class:`TrainConfig`. Features: Adam/AdamW/SGD with
momentum; one-cycle, cosine or ReduceLROnPlateau; early stopping; best checkpoint by validation AUC
(MAE for regression); mixed precision on CUDA; augmentation; optional inverse-frequency sampling;
seeded; resumable after a kill from ``checkpoint_last.pt``; one JSON line of metrics per epoch in
``metrics.jsonl`` (and on stdout); a progress bar on stderr; DistributedDataParallel under
``torchrun`` (NCCL on GPUs, gloo on CPU).

Outputs in ``out``: ``model.safetensors`` (fp16 unless ``--fp32``), ``card.json`` (model card),
``val_predictions.csv``, ``metrics.jsonl``, ``checkpoint_last.pt`` (resume state, not shipped).
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from boneai import evaluate as ev
from boneai._json import json_default
from boneai.card import WEIGHTS_FILE, Figures, ModelCard, Training, card_split_key, validation_split_key
from boneai.data import read_boneage, read_classification_dir, split_train_val
from boneai.evaluate import classifier_validation
from boneai.inference import load_model
from boneai.io import read_radiograph
from boneai.losses import build_loss
from boneai.models import build_model, get_spec
from boneai.predictor import read_weights
from boneai.preprocess import apply_pipeline
from boneai.transforms import Augment, to_tensor

__all__ = ["TrainConfig", "train", "pipeline_for", "RadiographDataset"]
# card_split_key and validation_split_key (now in boneai.card) and classifier_validation (now in
# boneai.evaluate) stay importable from here.


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded verbatim in the model card."""

    task: str = "fracture"
    data: str = ""
    model: str = "efficientnet_lite0"
    out: str = "runs/model"
    epochs: int = 30
    image_size: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adam | adamw | sgd
    scheduler: str = "onecycle"  # onecycle | cosine | plateau | none
    loss: str | None = None  # default: bce (fracture), l1 (boneage)
    augment: str = "strong"  # none | basic | strong
    crop: bool = True  # Otsu crop to the image content before resizing
    clahe: bool = False  # CLAHE in the deterministic pipeline
    weighted_sampler: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 10
    max_minutes: float | None = None  # wall-clock budget: no new epoch starts once it would be exceeded
    limit: int | None = None  # use only this many images (quick runs, tests)
    workers: int = 0
    device: str = "auto"
    resume: bool = True
    tta: bool = True  # average the logits of the image and its mirror at validation
    fp16_weights: bool = True
    pretrained: bool = True
    freeze_blocks: int = 0  # EfficientNet: keep the stem and the first N blocks fixed (about 2x faster on CPU)
    init_from: str | None = None  # fine-tune: start from a trained model folder (card + weights) of this architecture
    init_member: int | None = None  # with an ensemble as init_from: which member's weights (0-based)
    distill_from: str | None = None  # knowledge distillation: a trained model folder (single or ensemble) as teacher
    distill_weight: float = 0.5  # share of the teacher's output in the training target (0: labels only, 1: teacher only)
    command: str = field(default="")


def pipeline_for(task: str, size: int, crop: bool = True, use_clahe: bool = False) -> list[dict[str, Any]]:
    """The deterministic preprocessing a model of ``task`` sees; recorded in its card."""
    if task == "boneage":
        # The RSNA copy was squashed to 100x100; uploads are squashed the same way, then enlarged.
        steps: list[dict[str, Any]] = [{"step": "standardise", "params": {}},
                                       {"step": "squash_resize", "params": {"size": 100}}]
        if use_clahe:
            steps.append({"step": "clahe", "params": {"clip_limit": 2.0, "tile_grid": 8}})
        steps.append({"step": "resize_pad", "params": {"size": size}})
        return steps
    steps = [{"step": "standardise", "params": {}}]
    if crop:
        steps.append({"step": "otsu_crop", "params": {}})
    if use_clahe:
        steps.append({"step": "clahe", "params": {"clip_limit": 2.0, "tile_grid": 8}})
    steps.append({"step": "resize_pad", "params": {"size": size}})
    return steps


def _read_model_card(directory: Path, option: str, task: str) -> ModelCard:
    """The card of a trained model folder named by a command-line option, checked to be of ``task``."""
    card_path = directory / "card.json"
    if not card_path.is_file():
        raise ValueError(f"{option} {directory}: no card.json there (expected a trained model folder)")
    card = ModelCard.from_dir(directory)
    if card.task != task:
        raise ValueError(f"{option} {directory} is a {card.task} model; this run trains {task}")
    return card


def _headline(validation: Figures | None) -> dict[str, Any]:
    """The figures of a card's validation block that a derived model's card repeats."""
    written = validation.to_dict() if validation is not None else {}
    return {k: written[k] for k in ("auc", "ap", "mae") if k in written}


def check_same_validation_split(directory: Path, card: ModelCard, cfg: TrainConfig,
                                 val_images: list[str] | None, role: str) -> None:
    """Refuse a parent or teacher model whose training images could sit in this run's validation split.

    The other model must have been validated on exactly this run's validation images (its
    ``val_predictions.csv`` lists them, in order; the check that works for revalidated runs and
    ensembles too). Without that file, its recorded split (data, validation fraction, seed, limit)
    must be this run's.
    """
    preds = directory / "val_predictions.csv"
    if preds.is_file() and val_images is not None:
        theirs = pd.read_csv(preds, usecols=["image"])["image"].astype(str).tolist()
        if theirs != list(val_images):
            raise ValueError(f"{role} {directory} was validated on another data split (other images than this "
                             f"run's validation split: data, --val-fraction, --seed or --limit differ); its "
                             f"training images could leak into this validation split")
        return
    if card_split_key(card) != validation_split_key(asdict(cfg)):
        raise ValueError(f"{role} {directory} was trained with another data split (data, --val-fraction, "
                         f"--seed or --limit differ); its training images could leak into this validation split")


def load_init_weights(model: nn.Module, cfg: TrainConfig, val_images: list[str] | None = None) -> dict[str, Any]:
    """Load a trained model folder's weights into ``model`` for fine-tuning; returns its provenance.

    The parent must have the same task and architecture, and must have been validated on the same
    split (see :func:`check_same_validation_split`): otherwise its training images would sit in
    this run's validation split and every figure of the new model would be optimistic. An ensemble
    parent needs ``cfg.init_member``: the member whose weights start this run.
    """
    directory = Path(cfg.init_from)
    parent = _read_model_card(directory, "--init-from", cfg.task)
    source: Any = parent
    prefix = ""
    if parent.members:
        members = parent.members
        if cfg.init_member is None or not 0 <= cfg.init_member < len(members):
            raise ValueError(f"--init-from {directory} is an ensemble of {len(members)} models; choose one with "
                             f"--init-member 0..{len(members) - 1}")
        source = members[cfg.init_member]
        prefix = source.prefix
    elif cfg.init_member is not None:
        raise ValueError(f"--init-member applies to an ensemble; {directory} is a single model")
    if source.architecture != cfg.model:
        raise ValueError(f"--init-from {directory} is a {parent.task} {source.architecture} model; "
                         f"this run trains a {cfg.task} {cfg.model}")
    check_same_validation_split(directory, parent, cfg, val_images, "--init-from")
    model.load_state_dict(read_weights(directory / parent.weights_file, prefix))
    # An ensemble member keeps its commands and figures at its top level (Member.training is that view).
    training: Training = source.training or Training()
    info = {"path": str(directory), "architecture": source.architecture,
            "input_size": source.input_size, "commands": training.all_commands,
            "epochs_run": training.epochs_run, "train_seconds": training.train_seconds,
            "validation": _headline(source.validation)}
    if prefix:
        info["member"] = cfg.init_member
    return info


def teacher_targets(cfg: TrainConfig, train_df: pd.DataFrame, target: str, val_images: list[str],
                    out: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Knowledge distillation: the training targets mixed with a teacher model's outputs.

    The teacher (a fracture or bone-age model folder, an ensemble included) predicts every training
    image through its own card pipeline: calibrated probabilities for a classifier, months for bone
    age. The target becomes ``(1 - w) * label + w * teacher`` with ``w = cfg.distill_weight``. The
    teacher must have been validated on this run's validation images, so it never saw them. Its
    outputs are cached in ``out/teacher_outputs.csv`` (a resumed run reuses them).
    """
    import warnings

    directory = Path(cfg.distill_from)
    card = _read_model_card(directory, "--distill-from", cfg.task)
    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise ValueError("--distill-weight must lie between 0 and 1")
    check_same_validation_split(directory, card, cfg, val_images, "--distill-from")
    rel = [os.path.relpath(p, Path(cfg.data)) for p in train_df["path"]]
    cache = out / "teacher_outputs.csv"
    column = "teacher_probability" if cfg.task == "fracture" else "teacher_months"
    cached = pd.read_csv(cache) if cache.is_file() else None
    t0 = time.time()
    if cached is not None and cached["image"].astype(str).tolist() == rel and column in cached:
        teacher = cached[column].to_numpy(dtype=np.float64)
    else:
        predictor = load_model(directory)
        teacher_list: list[float] = []
        from tqdm import tqdm

        paths, batch = train_df["path"].tolist(), 8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated FracAtlas JPEGs are read with a warning
            for i in tqdm(range(0, len(paths), batch), desc="teacher", file=sys.stderr, mininterval=10):
                images = [read_radiograph(p) for p in paths[i:i + batch]]
                male = train_df["male"].iloc[i:i + batch].tolist() if cfg.task == "boneage" else None
                for pred in predictor.predict_many(images, male=male):
                    teacher_list.append(pred.probability if cfg.task == "fracture" else pred.boneage_months)
        teacher = np.asarray(teacher_list, dtype=np.float64)
        pd.DataFrame({"image": rel, column: teacher}).to_csv(cache, index=False)
    labels = train_df[target].to_numpy(dtype=np.float64)
    mixed = (1 - cfg.distill_weight) * labels + cfg.distill_weight * teacher
    info = {"teacher": str(directory), "teacher_name": card.name or directory.name,
            "teacher_description": card.description, "weight": cfg.distill_weight,
            "teacher_output": column.replace("teacher_", ""), "teacher_seconds": round(time.time() - t0, 1),
            "teacher_validation": _headline(card.validation)}
    if cfg.task == "fracture":
        info["teacher_train_auc"] = round(float(ev.roc_auc(labels.astype(int), teacher)), 4)
    return mixed.astype(np.float32), info


def _load_pre_resize(path: str, pipeline: list[dict[str, Any]], max_side: int) -> np.ndarray:
    """Apply the pipeline up to (not including) the final resize, then cap the size to save memory."""
    import cv2

    img = read_radiograph(path).pixels
    img = apply_pipeline(img, pipeline[:-1])
    h, w = img.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


class RadiographDataset(Dataset):
    """Images decoded once and cached in memory as uint8 (FracAtlas at 224 px: about 200 MB).

    In training mode an :class:`Augment` produces the square input; in evaluation mode the exact
    card pipeline runs on the original file, as at prediction time.
    """

    def __init__(self, paths: list[str], targets: np.ndarray, pipeline: list[dict[str, Any]], spec_mean, spec_std,
                 augment: Augment | None, aux: np.ndarray | None = None, seed: int = 0, threads: int = 2) -> None:
        self.paths, self.targets = list(paths), np.asarray(targets, dtype=np.float32)
        self.aux = None if aux is None else np.asarray(aux, dtype=np.float32)
        self.pipeline, self.mean, self.std, self.augment = pipeline, spec_mean, spec_std, augment
        self.seed, self.epoch = seed, 0
        size = pipeline[-1]["params"]["size"]
        if augment is None:
            load = lambda p: apply_pipeline(read_radiograph(p).pixels, pipeline)  # noqa: E731
        else:
            load = lambda p: _load_pre_resize(p, pipeline, int(size * 1.3))  # noqa: E731
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated FracAtlas JPEGs: read with a warning, counted below
            with ThreadPoolExecutor(max(1, threads)) as pool:
                self.images = list(pool.map(load, self.paths))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            img = self.augment(img, rng)
        x = to_tensor(img, self.mean, self.std)
        aux = torch.tensor(self.aux[i]) if self.aux is not None else torch.tensor(0.0)
        return x, torch.tensor(self.targets[i]), aux


def _freeze_early_blocks(model: nn.Module, n: int) -> None:
    """Freeze the stem and the first ``n`` blocks of a timm EfficientNet (or a wrapper exposing ``.backbone``)."""
    net = getattr(model, "backbone", model)
    if not hasattr(net, "blocks") or not hasattr(net, "conv_stem"):
        raise ValueError("--freeze-blocks applies to EfficientNet models only")
    for module in [net.conv_stem, net.bn1, *list(net.blocks)[:n]]:
        for p in module.parameters():
            p.requires_grad = False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _forward(model: nn.Module, task: str, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    return (model(x, aux) if task == "boneage" else model(x)).reshape(-1)


def _predict_loader(model: nn.Module, task: str, loader: DataLoader, device: torch.device, tta: bool) -> np.ndarray:
    was_training = model.training
    model.eval()
    outs = []
    with torch.no_grad():
        for x, _, aux in loader:
            x, aux = x.to(device, memory_format=torch.channels_last), aux.to(device)
            out = _forward(model, task, x, aux)
            if tta:
                out = (out + _forward(model, task, torch.flip(x, dims=[3]), aux)) / 2
            outs.append(out.float().cpu())
    model.train(was_training)
    return torch.cat(outs).numpy() if outs else np.zeros(0, np.float32)


def _validate(model: nn.Module, task: str, loader: DataLoader, targets: np.ndarray, criterion: nn.Module,
              device: torch.device) -> tuple[dict[str, float], float]:
    """Validation loss plus AUC (fracture) or MAE (bone age); returns the record and the selection score."""
    out = _predict_loader(model, task, loader, device, tta=False)
    with torch.no_grad():
        loss = float(criterion(torch.as_tensor(out, device=device), torch.as_tensor(targets, device=device)))
    if task == "fracture":
        score = ev.roc_auc(targets, out)
        return {"val_loss": round(loss, 5), "val_auc": round(score, 5)}, score
    score = float(np.abs(out - targets).mean())
    return {"val_loss": round(loss, 5), "val_mae": round(score, 3)}, score


def _read_task_data(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame, str, str | None]:
    if cfg.task == "fracture":
        df = read_classification_dir(cfg.data)
        target, stratify = "label", "label"
    elif cfg.task == "boneage":
        df = read_boneage(cfg.data)
        df["age_bin"] = pd.cut(df["boneage_months"], bins=[-1, 60, 120, 150, 180, 1000], labels=False)
        target, stratify = "boneage_months", "age_bin"
    else:
        raise ValueError(f"train supports tasks 'fracture' and 'boneage', not {cfg.task!r} (see train_autoencoder)")
    if cfg.limit:
        # Keep the class balance of the full data in small runs.
        df, _ = split_train_val(df, val_fraction=max(1e-6, 1 - cfg.limit / len(df)), seed=cfg.seed, stratify=stratify) \
            if cfg.limit < len(df) else (df, None)
    train_df, val_df = split_train_val(df, cfg.val_fraction, seed=cfg.seed, stratify=stratify)
    return train_df, val_df, target, stratify


def restore_scheduler(optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], epochs: int,
                      start_epoch: int, steps_per_epoch: int) -> Any:
    """The learning-rate schedule of a resumed run.

    Resumed with the same ``--epochs``: the saved schedule continues exactly (including a re-anneal
    an earlier resume installed). Resumed with a different ``--epochs`` and a per-step schedule
    (one-cycle, cosine): cosine annealing from the current learning rate to zero over the epochs
    that are left, so a shortened or extended run still ends cooled down.
    """
    planned = state.get("config", {}).get("epochs", epochs)
    saved = state.get("scheduler")
    per_step = isinstance(scheduler, (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CosineAnnealingLR))
    if scheduler is None or not saved:
        return scheduler
    if planned == epochs or not per_step:
        if state.get("scheduler_kind") == "CosineAnnealingLR" and not isinstance(
                scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=saved["T_max"])
        scheduler.load_state_dict(saved)
        return scheduler
    if start_epoch >= epochs:
        return scheduler
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=(epochs - start_epoch) * steps_per_epoch)


#: Settings a resumed run must share with the run that wrote ``checkpoint_last.pt``: data, split,
#: model and optimisation. Epochs (see :func:`restore_scheduler`), patience, time budget, workers,
#: device, TTA and the weight format may change between the two.
_RESUME_KEYS = ("task", "data", "model", "image_size", "batch_size", "lr", "weight_decay", "optimizer", "scheduler",
                "loss", "augment", "crop", "clahe", "weighted_sampler", "val_fraction", "seed", "limit", "pretrained",
                "freeze_blocks", "init_from", "init_member", "distill_from", "distill_weight")
_RESUME_PATHS = ("data", "init_from", "distill_from")


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists, recursively.

    ``torch.load(weights_only=True)`` accepts only tensors, numbers, strings, None and containers of
    them, and metrics (AUC, the plateau scheduler's best) come back from numpy as numpy scalars.
    """
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``: a kill during the
    write leaves the previous file intact instead of half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the resume state so that :func:`_load_checkpoint` can read it with ``weights_only=True``."""
    plain = {k: (v if k in ("model", "optimizer") else _plain(v)) for k, v in state.items()}
    if plain.get("optimizer") is not None:
        plain["optimizer"] = _plain(plain["optimizer"])  # plain containers; the model's keep their metadata
    _save_atomic(plain, path)


def _load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The resume state in ``path``, loaded as plain data (no code runs while reading it).

    Raises:
        ValueError: the file cannot be read that way (another program, an older version, truncated)
            or it was written by a run whose settings in :data:`_RESUME_KEYS` differ from ``cfg``;
            the message says how to go on.
    """
    fresh = "start over with --no-resume (the checkpoint is then overwritten) or choose another --out"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code in the file, RuntimeError for a truncated one
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path} cannot be loaded as plain tensors and numbers ({reason}); it may come from an "
                         f"older version or another program. To go on, {fresh}.") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "config"} <= state.keys():
        raise ValueError(f"{path} is not a training checkpoint of this program. To go on, {fresh}.")
    saved, now = dict(state["config"]), asdict(cfg)
    for key in _RESUME_PATHS:
        for conf in (saved, now):
            if conf.get(key):
                conf[key] = str(Path(str(conf[key])).resolve())
    differ = [f"{key} {saved.get(key)!r} then, {now.get(key)!r} now" for key in _RESUME_KEYS
              if saved.get(key) != now.get(key)]
    if differ:
        raise ValueError(f"{path} was written by a run with other settings ({'; '.join(differ)}). Resume with the "
                         f"same settings, or {fresh}.")
    return state


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the model card written to ``cfg.out/card.json``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(cfg.device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if cfg.weighted_sampler:
            raise ValueError("--weighted-sampler cannot be combined with distributed training")
    else:
        rank, world = 0, 1
    is_main = rank == 0
    _seed_everything(cfg.seed)
    spec = get_spec(cfg.model)
    if spec.task != cfg.task:
        raise ValueError(f"model {cfg.model!r} is a {spec.task} model, not {cfg.task}")
    size = cfg.image_size or spec.input_size
    loss_name = cfg.loss or ("l1" if cfg.task == "boneage" else "bce")
    out = Path(cfg.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    t_data = time.time()
    train_df, val_df, target, _ = _read_task_data(cfg)
    pipeline = pipeline_for(cfg.task, size, cfg.crop, cfg.clahe)
    aux_col = "male" if cfg.task == "boneage" else None
    val_images = [os.path.relpath(p, Path(cfg.data)) for p in val_df["path"]]
    train_targets, distill_info = train_df[target].to_numpy(), None
    if cfg.distill_from:
        # One process computes the teacher's outputs; the others read its cache.
        if distributed and not is_main:
            dist.barrier()
        train_targets, distill_info = teacher_targets(cfg, train_df, target, val_images, out)
        if distributed and is_main:
            dist.barrier()
        if is_main:
            print(json.dumps({"event": "teacher", **{k: v for k, v in distill_info.items()
                                                     if k not in ("teacher_description",)}}), flush=True)
    aug = Augment(size=size, level=cfg.augment) if cfg.augment != "none" else Augment(size=size, level="none")
    if cfg.task == "boneage":
        aug.crop_scale, aug.zoom_out = (0.8, 1.0), (0.9, 1.0)
    train_ds = RadiographDataset(train_df["path"].tolist(), train_targets, pipeline, spec.mean, spec.std,
                                 aug, None if aux_col is None else train_df[aux_col].to_numpy(), seed=cfg.seed)
    val_ds = RadiographDataset(val_df["path"].tolist(), val_df[target].to_numpy(), pipeline, spec.mean, spec.std,
                               None, None if aux_col is None else val_df[aux_col].to_numpy(), seed=cfg.seed)
    data_seconds = time.time() - t_data

    if distributed:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    elif cfg.weighted_sampler and cfg.task == "fracture":
        y = train_df[target].to_numpy().astype(int)
        counts = np.bincount(y, minlength=2)
        weights = 1.0 / counts[y]
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(y),
                                        generator=torch.Generator().manual_seed(cfg.seed))
    else:
        sampler = None
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=cfg.workers, drop_last=len(train_ds) > cfg.batch_size, generator=g)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.workers)

    model = build_model(cfg.model, pretrained=cfg.pretrained and not cfg.init_from)
    init_info = load_init_weights(model, cfg, val_images) if cfg.init_from else None
    model = model.to(device)
    if cfg.freeze_blocks:
        _freeze_early_blocks(model, cfg.freeze_blocks)
    # channels_last doubles CPU throughput of the depthwise convolutions in EfficientNet.
    model = model.to(memory_format=torch.channels_last)
    if cfg.task == "boneage":
        mean_age = float(train_df[target].mean())
        model.set_output_offset(mean_age)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if distributed else model

    n_pos = int(train_df[target].sum()) if cfg.task == "fracture" else 0
    criterion = build_loss(loss_name, n_positive=n_pos, n_negative=len(train_df) - n_pos).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adam, adamw or sgd")
    steps_per_epoch = max(1, len(train_loader))
    if cfg.scheduler == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, epochs=cfg.epochs,
                                                        steps_per_epoch=steps_per_epoch, pct_start=0.15)
    elif cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    elif cfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max" if cfg.task == "fracture" else "min",
                                                               factor=0.3, patience=2)
    elif cfg.scheduler == "none":
        scheduler = None
    else:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}")
    per_step = cfg.scheduler in ("onecycle", "cosine")
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    higher_better = cfg.task == "fracture"
    best = -math.inf if higher_better else math.inf
    start_epoch, history, bad_epochs, train_seconds = 0, [], 0, 0.0
    commands = [cfg.command]  # every command that contributed epochs, in order (resumes append)
    ckpt_path = out / "checkpoint_last.pt"
    if cfg.resume and ckpt_path.is_file():
        # weights_only: unpickling a full object could run code planted in the file. A checkpoint of
        # other settings is refused: resuming it would mix two runs under one card.
        state = _load_checkpoint(ckpt_path, cfg)
        core.load_state_dict(state["model"])  # to the model's device
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        scheduler = restore_scheduler(optimizer, scheduler, state, cfg.epochs, start_epoch, steps_per_epoch)
        bad_epochs, train_seconds = state["bad_epochs"], state.get("train_seconds", 0.0)
        commands = state.get("commands", [state.get("config", {}).get("command", "")]) + [cfg.command]
        torch.set_rng_state(state["torch_rng"])
        if is_main:
            print(json.dumps({"event": "resumed", "from_epoch": state["epoch"] + 1}), flush=True)

    from tqdm import tqdm

    metrics_file = out / "metrics.jsonl"
    if start_epoch == 0 and not history:
        # Epoch 0: the untrained model on the validation split, the baseline every later epoch is compared to.
        record0, score0 = _validate(core, cfg.task, val_loader, val_ds.targets, criterion, device)
        record0 = {"epoch": 0, **record0}
        history.append(record0)
        if cfg.init_from:
            # Fine-tuning: the parent itself is the first candidate, so a run that only makes it worse
            # ends with the parent's weights rather than its best worse epoch.
            if not math.isnan(score0):
                best = score0
                if is_main:
                    _save_atomic(core.state_dict(), out / "best_model.pt")
        if is_main:
            print(json.dumps(record0), flush=True)
            metrics_file.write_text(json.dumps(record0) + "\n")
    t_loop, epoch_seconds = time.time(), 0.0
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        if cfg.max_minutes and (time.time() - t_loop + epoch_seconds) > 60 * cfg.max_minutes:
            # Another epoch would overrun the budget: stop here and finish with the best epoch so far.
            if is_main:
                print(json.dumps({"event": "time_budget", "max_minutes": cfg.max_minutes, "stopped_before_epoch": epoch + 1}),
                      flush=True)
            break
        t0 = time.time()
        train_ds.set_epoch(epoch)
        if distributed:
            sampler.set_epoch(epoch)
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main, file=sys.stderr,
                   leave=False, mininterval=5)
        for x, y, aux in bar:
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            y, aux = y.to(device), aux.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = criterion(_forward(model, cfg.task, x, aux), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if per_step and scheduler is not None:
                scheduler.step()
            running += float(loss.detach()) * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{running / max(seen, 1):.4f}")
        train_loss = running / max(seen, 1)
        val_record, score = _validate(core, cfg.task, val_loader, val_ds.targets, criterion, device)
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), **val_record,
                                  "lr": optimizer.param_groups[0]["lr"]}
        if scheduler is not None and not per_step:
            scheduler.step(score) if cfg.scheduler == "plateau" else scheduler.step()
        improved = (score > best) if higher_better else (score < best)
        if improved or (math.isnan(score) and epoch == start_epoch):
            best, bad_epochs = score if not math.isnan(score) else best, 0
            if is_main:
                _save_atomic(core.state_dict(), out / "best_model.pt")
        else:
            bad_epochs += 1
        epoch_seconds = time.time() - t0
        train_seconds += epoch_seconds
        record.update({"best": round(best, 5), "seconds": round(epoch_seconds, 1), "device": device.type})
        history.append(record)
        if is_main:
            print(json.dumps(record), flush=True)
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            # Replaced atomically: a kill during the write must leave the previous checkpoint intact.
            _save_checkpoint(ckpt_path, {
                "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scheduler_kind": type(scheduler).__name__ if scheduler is not None else None,
                "epoch": epoch, "best": best, "history": history, "bad_epochs": bad_epochs,
                "train_seconds": train_seconds, "torch_rng": torch.get_rng_state(), "commands": commands,
                "config": asdict(cfg)})
    if distributed:
        dist.barrier()
    card: dict[str, Any] = {}
    if is_main:
        card = _finish(cfg, core, spec, pipeline, size, loss_name, val_df, val_ds, val_loader, device, history,
                       train_seconds, data_seconds, len(train_df), commands, init_info, distill_info)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return card


def _finish(cfg, model, spec, pipeline, size, loss_name, val_df, val_ds, val_loader, device, history,
            train_seconds, data_seconds, n_train, commands, init_info=None, distill_info=None) -> dict[str, Any]:
    """Reload the best weights, calibrate, choose operating points, write weights, predictions and card."""
    from safetensors.torch import save_file

    out = Path(cfg.out)
    best_path = out / "best_model.pt"
    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    raw = _predict_loader(model, cfg.task, val_loader, device, tta=cfg.tta)
    state = {k: (v.half() if cfg.fp16_weights and v.is_floating_point() else v).contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    data_root = Path(cfg.data)
    rel = [os.path.relpath(p, data_root) for p in val_df["path"]]
    card: dict[str, Any] = {
        "name": out.name, "task": cfg.task, "architecture": cfg.model, "description": spec.description,
        "initial_weights": (f"fine-tuned from {init_info['path']}" if init_info else
                            spec.pretrained if cfg.pretrained else "none (trained from scratch)"),
        "input_size": size, "mean": list(spec.mean), "std": list(spec.std), "pipeline": pipeline,
        "tta_hflip": cfg.tta, "weights_file": WEIGHTS_FILE,
        "weights_dtype": "float16" if cfg.fp16_weights else "float32",
        "training": {
            "command": cfg.command, "commands": [c for c in commands if c], "config": asdict(cfg), "loss": loss_name, "device": str(device),
            "torch": torch.__version__, "epochs_run": sum(1 for h in history if h.get("epoch", 0) > 0), "train_seconds": round(train_seconds, 1),
            "data_load_seconds": round(data_seconds, 1), "n_train": n_train, "n_val": len(val_df),
            "history": history,
        },
        "data": {"root": str(cfg.data), "validation_split": f"{cfg.val_fraction:.0%} stratified, seed {cfg.seed}"},
    }
    if init_info:
        # The full provenance: the parent's own commands and figures, then this run's.
        card["training"]["init_from"] = init_info
    if distill_info:
        card["training"]["distillation"] = distill_info
    if cfg.task == "fracture":
        preds = pd.DataFrame({"image": rel, "label": val_ds.targets.astype(int),
                              "region": val_df.get("region", "unknown"), "logit": raw})
        if "hardware" in val_df:
            preds["hardware"] = val_df["hardware"].to_numpy()
        fields, prob = classifier_validation(preds, has_region="region" in val_df)
        preds.insert(4, "probability", prob)
        card.update(fields)
    else:
        y = val_ds.targets
        preds = pd.DataFrame({"image": rel, "boneage_months": y, "male": val_df["male"].to_numpy(),
                              "predicted_months": raw})
        card["validation"] = ev.regression_metrics(y, raw)
    preds.to_csv(out / "val_predictions.csv", index=False)
    (out / "card.json").write_text(json.dumps(card, indent=2, default=json_default))
    return card



def revalidate(run_dir: str | Path, data: str | Path, command: str = "", batch_size: int = 32) -> dict[str, Any]:
    """Validate a finished run again on another copy of its data (e.g. the original files after
    training on a compressed copy on a remote GPU) and refit what depends on validation outputs.

    The run's own split is rebuilt from ``data`` (same validation fraction, seed and limit) and must
    list the very images of ``val_predictions.csv``; the validation predictions, calibration,
    operating points and metrics in the card are replaced, and the previous figures are kept under
    ``revalidation``. The weights are not touched.
    """
    run = Path(run_dir)
    card_path, preds_path = run / "card.json", run / "val_predictions.csv"
    for path in (card_path, preds_path, run / WEIGHTS_FILE):
        if not path.is_file():
            raise ValueError(f"{run} is not a finished training run (no {path.name})")
    card = ModelCard.from_json(card_path.read_text(), run)
    if card.members or card.task not in ("fracture", "boneage"):
        raise ValueError("revalidate applies to single fracture or bone-age runs; rebuild ensembles from revalidated runs")
    if card.training is None or card.training.config is None:
        raise ValueError(f"{run} records no training configuration; its validation split cannot be rebuilt")
    config = card.training.config
    cfg = TrainConfig(**{**{k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__},
                         "data": str(data)})
    _, val_df, target, _ = _read_task_data(cfg)
    old = pd.read_csv(preds_path)
    rel = [os.path.relpath(p, Path(data)) for p in val_df["path"]]
    if rel != old["image"].astype(str).tolist():
        raise ValueError(f"{data} does not give this run's validation split (other images or order); "
                         f"revalidating there would mix training and validation images")
    val_ds = RadiographDataset(val_df["path"].tolist(), val_df[target].to_numpy(), card.pipeline_spec(),
                               list(card.mean or ()), list(card.std or ()), None,
                               val_df["male"].to_numpy() if card.task == "boneage" else None)
    loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False)
    model = load_model(run).model  # the float32 weights, as the card's own loader reads them
    raw = _predict_loader(model, card.task, loader, torch.device("cpu"), tta=card.tta_hflip)
    # The card as it will be written: the JSON read, the refitted blocks replaced, the previous ones kept.
    written = card.to_dict()
    previous = {"data": (card.data or {}).get("root", config.get("data")), "validation": written.get("validation"),
                "temperature": written.get("temperature"), "operating_points": written.get("operating_points")}
    if card.task == "fracture":
        preds = old.drop(columns=[c for c in ("logit", "probability") if c in old]).assign(logit=raw)
        fields, prob = classifier_validation(preds, has_region="region" in preds)
        preds.insert(preds.columns.get_loc("logit") + 1, "probability", prob)
        written.update(fields)
    else:
        preds = old.assign(predicted_months=raw)
        written["validation"] = ev.regression_metrics(val_ds.targets, raw)
    written["revalidation"] = {"data": str(data), "command": command, "previous": previous}
    written.setdefault("data", {})["root"] = str(data)
    preds.to_csv(preds_path, index=False)
    card_path.write_text(json.dumps(written, indent=2, default=json_default))
    return written


def command_line() -> str:
    """The command that started this process, for the model card."""
    return "python -m boneai " + " ".join(shlex.quote(a) for a in sys.argv[1:])
