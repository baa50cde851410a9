"""Training loop for the fracture classifiers and the bone-age regressor.

One entry point, :func:`train`, driven by a :class:`~boneai.config.TrainConfig` (each option defined
once there, with its help text; the command line is generated from it). Its parts, each usable and
tested on its own: the optimiser and scheduler factories (:data:`OPTIMIZERS`, :data:`SCHEDULERS`),
:func:`train_one_epoch`, :func:`save_checkpoint` / :func:`restore_checkpoint`,
:func:`setup_distributed`, and :func:`check_related_models` (the checks on ``--init-from`` and
``--distill-from``, which the Training page calls too). Features: Adam/AdamW/SGD with
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
from collections.abc import Callable, Iterable
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
from tqdm import tqdm

from boneai import evaluate as ev
from boneai._json import json_default
from boneai.card import WEIGHTS_FILE, Figures, ModelCard, Training, card_split_key, validation_split_key
from boneai.config import TrainConfig
from boneai.data import read_boneage, read_classification_dir, split_train_val
from boneai.evaluate import classifier_validation
from boneai.inference import load_model
from boneai.io import read_radiograph
from boneai.losses import build_loss
from boneai.models import build_model, get_spec
from boneai.predictor import read_weights
from boneai.preprocess import apply_pipeline
from boneai.transforms import Augment, to_tensor

__all__ = ["TrainConfig", "train", "pipeline_for", "RadiographDataset", "check_related_models", "OPTIMIZERS",
           "SCHEDULERS", "create_optimizer", "create_scheduler", "train_one_epoch", "LoopState", "save_checkpoint",
           "restore_checkpoint", "restore_scheduler", "DistributedContext", "setup_distributed", "revalidate"]
# TrainConfig now lives in boneai.config (torch-free, so the parser needs no torch) and is re-exported
# here. card_split_key and validation_split_key (now in boneai.card) and classifier_validation (now in
# boneai.evaluate) stay importable from here.


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


@dataclass(frozen=True)
class _SplitImages:
    """This run's images as paths relative to its data folder: its validation split, and the whole folder."""

    validation: list[str]
    everything: frozenset[str]


def _relative(paths: Iterable[str], root: str | Path) -> list[str]:
    return [os.path.relpath(p, Path(root)) for p in paths]


def _split_images(cfg: TrainConfig, df: pd.DataFrame | None = None, val_df: pd.DataFrame | None = None) -> _SplitImages:
    """The images of ``cfg``'s split, read from its data folder unless the caller has them."""
    if df is None or val_df is None:
        df, _, stratify = _read_task_table(cfg)
        _, val_df = _split_task_table(cfg, df, stratify)
    return _SplitImages(_relative(val_df["path"], cfg.data), frozenset(_relative(df["path"], cfg.data)))


def _rebuilt_training_images(card: ModelCard, cfg: TrainConfig, theirs: list[str] | None) -> set[str] | None:
    """The images another model trained on, rebuilt on this run's data folder from its recorded split.

    Only when this folder is that model's data: its split rebuilt here lists exactly the validation
    images of its ``val_predictions.csv`` (or, without that file, its recorded data folder is this
    one). ``None`` when it cannot be known (an ensemble, no recorded split, other data).
    """
    config = card.training.config if card.training is not None else None
    if card.members or not config:
        return None
    known = {k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__ and k != "command"}
    theirs_cfg = TrainConfig(**{**known, "task": cfg.task, "data": cfg.data})
    if theirs is None and card_split_key(card)[0] != validation_split_key(asdict(cfg))[0]:
        return None
    try:
        train_df, val_df, _, _ = _read_task_data(theirs_cfg)
    except (ValueError, KeyError):  # its settings do not split this folder (e.g. a --limit beyond it)
        return None
    if theirs is not None and _relative(val_df["path"], cfg.data) != theirs:
        return None
    return set(_relative(train_df["path"], cfg.data))


def _check_no_leak(directory: Path, card: ModelCard, cfg: TrainConfig, split: _SplitImages, role: str) -> str:
    """Refuse a parent or teacher model that may have trained on this run's validation images.

    A model that trained on part of this run's validation split would make every figure of the new
    model optimistic. Images are compared by their path inside the data folder. In order:

    1. it was validated on exactly this run's validation images (its ``val_predictions.csv``): fine;
    2. its split, rebuilt on this folder from its recorded settings, reproduces its validation images:
       this folder is its data, and its training images are known exactly; refused if any of them is
       among this run's validation images (``--seed``, ``--val-fraction`` or ``--limit`` differ);
    3. none of its validation images is in this folder: it was trained on other data (another
       hospital's, another data set) and never saw these images: fine;
    4. otherwise it comes from overlapping data with unknown training images: fine only if each of
       this run's validation images was one of its validation images.

    Without ``val_predictions.csv`` the recorded split settings must be this run's (or step 2 must
    apply with its recorded data folder being this one). Returns how the model passed, for the card.

    Raises:
        ValueError: the model may have trained on this run's validation images; the message says why.
    """
    preds = directory / "val_predictions.csv"
    theirs = pd.read_csv(preds, usecols=["image"])["image"].astype(str).tolist() if preds.is_file() else None
    ours = split.validation
    if theirs is not None and theirs == ours:
        return "validated on this run's validation images"
    if theirs is None and card_split_key(card) == validation_split_key(asdict(cfg)):
        return "trained with this run's data split (recorded settings)"
    trained = _rebuilt_training_images(card, cfg, theirs)
    if trained is not None:
        leaked = [image for image in ours if image in trained]
        if leaked:
            raise ValueError(f"{role} {directory} was trained on another data split of this data (data, "
                             f"--val-fraction, --seed or --limit differ): {len(leaked)} of this run's {len(ours)} "
                             f"validation images (e.g. {leaked[0]}) were among its training images, so they would "
                             f"leak into this validation split")
        return (f"trained on another split of this data; none of its {len(trained)} training images is among this "
                f"run's validation images")
    if theirs is None:
        raise ValueError(f"{role} {directory} was trained with another data split (data, --val-fraction, --seed or "
                         f"--limit differ) and has no val_predictions.csv to tell which images it was validated "
                         f"on; its training images could leak into this validation split")
    if not split.everything.intersection(theirs):
        return "trained on other data: none of its validation images is in this data folder"
    validated = set(theirs)
    unseen = [image for image in ours if image not in validated]
    if unseen:
        raise ValueError(f"{role} {directory} was validated on another data split of overlapping data (data, "
                         f"--val-fraction, --seed or --limit differ): {len(unseen)} of this run's validation "
                         f"images (e.g. {unseen[0]}) were not among its validation images, so its training images "
                         f"could leak into this validation split")
    return "validated on all of this run's validation images (and more)"


def _parent_source(cfg: TrainConfig) -> tuple[ModelCard, Any, str]:
    """The ``--init-from`` model's card, the card part whose weights start this run (the model or
    one ensemble member) and that part's key prefix in the weights file; checked for task,
    ensemble member and architecture."""
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
        raise ValueError(f"--init-member applies to an ensemble; {directory} is a single model, not an ensemble")
    if source.architecture != cfg.model:
        raise ValueError(f"--init-from {directory} is a {parent.task} {source.architecture} model; this run trains "
                         f"a {cfg.task} {cfg.model}: choose that architecture to fine-tune it")
    return parent, source, prefix


def check_related_models(cfg: TrainConfig, split: _SplitImages | None = None) -> dict[str, str]:
    """Check the models ``--init-from`` and ``--distill-from`` name, before any training starts.

    The one place these checks live: :func:`train` runs them, and the Training page runs them when
    its form is sent, so a wrong parent or teacher is refused before a job starts. The parent must be
    a model folder of this task and architecture (an ensemble with ``--init-member``); the teacher a
    model folder of this task, with ``0 <= --distill-weight <= 1``; and neither may have trained on
    this run's validation images (:func:`_check_no_leak`). A model trained on other data passes.

    Args:
        cfg: the run's configuration.
        split: this run's images; read from ``cfg.data`` (a file listing, no decoding) when not given.

    Returns:
        For each of ``init_from`` and ``distill_from`` that is set, how its leak check was passed.

    Raises:
        ValueError: what is wrong, naming the option.
    """
    if not (cfg.init_from or cfg.distill_from):
        return {}
    if cfg.task not in ("fracture", "boneage"):
        raise ValueError("--init-from and --distill-from apply to the fracture and bone-age tasks")
    cleared: dict[str, str] = {}
    if cfg.init_from:
        parent, _, _ = _parent_source(cfg)
        split = split or _split_images(cfg)
        cleared["init_from"] = _check_no_leak(Path(cfg.init_from), parent, cfg, split, "--init-from")
    if cfg.distill_from:
        teacher = _read_model_card(Path(cfg.distill_from), "--distill-from", cfg.task)
        if not 0.0 <= cfg.distill_weight <= 1.0:
            raise ValueError("--distill-weight must lie between 0 and 1")
        split = split or _split_images(cfg)
        cleared["distill_from"] = _check_no_leak(Path(cfg.distill_from), teacher, cfg, split, "--distill-from")
    return cleared


def load_init_weights(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Load a trained model folder's weights into ``model`` for fine-tuning; returns its provenance.

    The parent (or, for an ensemble, member ``cfg.init_member``) must have the same task and
    architecture; whether it may have trained on this run's validation images is checked by
    :func:`check_related_models`, which :func:`train` runs first.
    """
    directory = Path(cfg.init_from)
    parent, source, prefix = _parent_source(cfg)
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


def teacher_targets(cfg: TrainConfig, train_df: pd.DataFrame, target: str,
                    out: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Knowledge distillation: the training targets mixed with a teacher model's outputs.

    The teacher (a fracture or bone-age model folder, an ensemble included) predicts every training
    image through its own card pipeline: calibrated probabilities for a classifier, months for bone
    age. The target becomes ``(1 - w) * label + w * teacher`` with ``w = cfg.distill_weight``. That the
    teacher never trained on this run's validation images is checked by :func:`check_related_models`,
    which :func:`train` runs first. Its outputs are cached in ``out/teacher_outputs.csv`` (a resumed
    run reuses them).
    """
    import warnings

    directory = Path(cfg.distill_from)
    card = _read_model_card(directory, "--distill-from", cfg.task)
    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise ValueError("--distill-weight must lie between 0 and 1")
    rel = _relative(train_df["path"], cfg.data)
    cache = out / "teacher_outputs.csv"
    column = "teacher_probability" if cfg.task == "fracture" else "teacher_months"
    cached = pd.read_csv(cache) if cache.is_file() else None
    t0 = time.time()
    if cached is not None and cached["image"].astype(str).tolist() == rel and column in cached:
        teacher = cached[column].to_numpy(dtype=np.float64)
    else:
        predictor = load_model(directory)
        teacher_list: list[float] = []
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


def _read_task_table(cfg: TrainConfig) -> tuple[pd.DataFrame, str, str]:
    """Every image of ``cfg.data`` with its target: (table, target column, stratification column)."""
    if cfg.task == "fracture":
        df = read_classification_dir(cfg.data)
        target, stratify = "label", "label"
    elif cfg.task == "boneage":
        df = read_boneage(cfg.data)
        df["age_bin"] = pd.cut(df["boneage_months"], bins=[-1, 60, 120, 150, 180, 1000], labels=False)
        target, stratify = "boneage_months", "age_bin"
    else:
        raise ValueError(f"train supports tasks 'fracture' and 'boneage', not {cfg.task!r} (see train_autoencoder)")
    return df, target, stratify


def _split_task_table(cfg: TrainConfig, df: pd.DataFrame, stratify: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's training and validation images (after ``--limit``)."""
    if cfg.limit:
        # Keep the class balance of the full data in small runs.
        df, _ = split_train_val(df, val_fraction=max(1e-6, 1 - cfg.limit / len(df)), seed=cfg.seed, stratify=stratify) \
            if cfg.limit < len(df) else (df, None)
    return split_train_val(df, cfg.val_fraction, seed=cfg.seed, stratify=stratify)


def _read_task_data(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame, str, str | None]:
    df, target, stratify = _read_task_table(cfg)
    train_df, val_df = _split_task_table(cfg, df, stratify)
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


# -- optimisers and schedules: name -> builder (the pattern of timm's optim and scheduler factories) ----
#: Optimiser builders: ``(trainable parameters, learning rate, weight decay) -> optimiser``.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float, float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True),
}


def create_optimizer(name: str, params: Iterable[nn.Parameter], lr: float,
                     weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser ``name`` (a key of :data:`OPTIMIZERS`) over ``params``.

    Example:
        >>> opt = create_optimizer("sgd", [nn.Parameter(torch.zeros(1))], lr=0.1, weight_decay=0.0)
        >>> type(opt).__name__, opt.param_groups[0]["nesterov"]
        ('SGD', True)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), lr, weight_decay)


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: how to build it, and whether it steps after each batch (else after
    each epoch's validation, given the validation score)."""

    build: Callable[..., Any]  # (optimizer, lr=, epochs=, steps_per_epoch=, higher_better=) -> scheduler | None
    per_step: bool


def _one_cycle(opt: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int, higher_better: bool) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                               pct_start=0.15)


def _cosine(opt: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int, higher_better: bool) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)


def _plateau(opt: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int, higher_better: bool) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max" if higher_better else "min", factor=0.3,
                                                      patience=2)


#: Scheduler builders by name: one-cycle (warm-up over 15 % of the steps) and cosine step after each
#: batch; the plateau schedule (x0.3 after 2 epochs without a better score) after each validation.
SCHEDULERS: dict[str, Schedule] = {
    "onecycle": Schedule(_one_cycle, per_step=True),
    "cosine": Schedule(_cosine, per_step=True),
    "plateau": Schedule(_plateau, per_step=False),
    "none": Schedule(lambda opt, lr, epochs, steps_per_epoch, higher_better: None, per_step=False),
}


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, *, lr: float, epochs: int, steps_per_epoch: int,
                     higher_better: bool) -> tuple[Any, bool]:
    """The schedule ``name`` (a key of :data:`SCHEDULERS`): ``(scheduler or None, steps after each batch)``.

    ``higher_better`` is the direction of the validation score (AUC up, MAE down) a plateau follows.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}")
    schedule = SCHEDULERS[name]
    return schedule.build(optimizer, lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                          higher_better=higher_better), schedule.per_step


def _step_after_epoch(scheduler: Any, score: float) -> None:
    """Step an epoch-wise schedule after validation (a plateau follows the validation score)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(score)
    else:
        scheduler.step()


# -- one epoch ---------------------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, task: str, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, device: torch.device, scaler: torch.amp.GradScaler,
                    step_scheduler: Any = None, progress: str | None = None) -> float:
    """One pass over ``loader`` in training mode; returns the mean training loss per image.

    Mixed precision (float16 autocast) runs when ``scaler`` is enabled. ``step_scheduler`` (a per-step
    schedule) steps after every batch. ``progress`` is the progress bar's label on stderr (none if None).
    """
    use_amp = scaler.is_enabled()
    model.train()
    running, seen = 0.0, 0
    bar = tqdm(loader, desc=progress, disable=progress is None, file=sys.stderr, leave=False, mininterval=5)
    for x, y, aux in bar:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y, aux = y.to(device), aux.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss = criterion(_forward(model, task, x, aux), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step_scheduler is not None:
            step_scheduler.step()
        running += float(loss.detach()) * len(x)
        seen += len(x)
        bar.set_postfix(loss=f"{running / max(seen, 1):.4f}")
    return running / max(seen, 1)


# -- checkpoint save and restore -------------------------------------------------------------------
@dataclass
class LoopState:
    """What the training loop carries from epoch to epoch; saved in ``checkpoint_last.pt``."""

    best: float  # the best validation score so far (AUC up, MAE down)
    start_epoch: int = 0  # the first epoch (0-based) this process trains
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch, epoch 0 first
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    train_seconds: float = 0.0
    commands: list[str] = field(default_factory=list)  # every command that contributed epochs, in order


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
                    loop: LoopState, cfg: TrainConfig) -> None:
    """Write the resume state after ``epoch`` (0-based), replaced atomically: a kill during the write
    leaves the previous checkpoint intact. ``model`` is the bare model (not the DDP wrapper)."""
    _save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scheduler_kind": type(scheduler).__name__ if scheduler is not None else None,
        "epoch": epoch, "best": loop.best, "history": loop.history, "bad_epochs": loop.bad_epochs,
        "train_seconds": loop.train_seconds, "torch_rng": torch.get_rng_state(), "commands": loop.commands,
        "config": asdict(cfg)})


def restore_checkpoint(path: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, steps_per_epoch: int) -> tuple[Any, LoopState]:
    """Load the resume state in ``path`` into ``model`` and ``optimizer``; returns the schedule to go on
    with (see :func:`restore_scheduler`) and the loop state, ``cfg.command`` appended to its commands.

    weights_only: unpickling a full object could run code planted in the file. A checkpoint of other
    settings is refused (:func:`_load_checkpoint`): resuming it would mix two runs under one card.
    """
    state = _load_checkpoint(path, cfg)
    model.load_state_dict(state["model"])  # to the model's device
    optimizer.load_state_dict(state["optimizer"])
    start_epoch = state["epoch"] + 1
    scheduler = restore_scheduler(optimizer, scheduler, state, cfg.epochs, start_epoch, steps_per_epoch)
    loop = LoopState(best=state["best"], start_epoch=start_epoch, history=state["history"],
                     bad_epochs=state["bad_epochs"], train_seconds=state.get("train_seconds", 0.0),
                     commands=state.get("commands", [state.get("config", {}).get("command", "")]) + [cfg.command])
    torch.set_rng_state(state["torch_rng"])
    return scheduler, loop


# -- distributed setup -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedContext:
    """Where this process trains: one process (rank 0 of 1), or one rank of a ``torchrun`` group."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints the records."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(cfg: TrainConfig) -> DistributedContext:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU), with
    this rank's GPU (``LOCAL_RANK``); else a single process on ``cfg.device``."""
    device = _device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistributedContext(device)
    if cfg.weighted_sampler:
        raise ValueError("--weighted-sampler cannot be combined with distributed training")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return DistributedContext(device, dist.get_rank(), dist.get_world_size())


def _train_loader(train_ds: RadiographDataset, labels: np.ndarray, cfg: TrainConfig,
                  ctx: DistributedContext) -> DataLoader:
    """The training batches: this rank's share under ``torchrun``, inverse-frequency class sampling
    with ``--weighted-sampler`` (fracture), else a seeded shuffle."""
    if ctx.enabled:
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    elif cfg.weighted_sampler and cfg.task == "fracture":
        y = labels.astype(int)
        counts = np.bincount(y, minlength=2)
        weights = 1.0 / counts[y]
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(y),
                                        generator=torch.Generator().manual_seed(cfg.seed))
    else:
        sampler = None
    g = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=cfg.workers, drop_last=len(train_ds) > cfg.batch_size, generator=g)


# -- the run ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the model card written to ``cfg.out/card.json``."""
    ctx = setup_distributed(cfg)
    device, is_main = ctx.device, ctx.is_main
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
    df, target, stratify = _read_task_table(cfg)
    train_df, val_df = _split_task_table(cfg, df, stratify)
    # Parent and teacher are checked before any image is decoded or any weight is loaded.
    cleared = check_related_models(cfg, _split_images(cfg, df, val_df))
    pipeline = pipeline_for(cfg.task, size, cfg.crop, cfg.clahe)
    aux_col = "male" if cfg.task == "boneage" else None
    train_targets, distill_info = train_df[target].to_numpy(), None
    if cfg.distill_from:
        # One process computes the teacher's outputs; the others read its cache.
        if ctx.enabled and not is_main:
            dist.barrier()
        train_targets, distill_info = teacher_targets(cfg, train_df, target, out)
        distill_info["leak_check"] = cleared["distill_from"]
        if ctx.enabled and is_main:
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

    train_loader = _train_loader(train_ds, train_df[target].to_numpy(), cfg, ctx)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.workers)

    model = build_model(cfg.model, pretrained=cfg.pretrained and not cfg.init_from)
    init_info = None
    if cfg.init_from:
        init_info = load_init_weights(model, cfg)
        init_info["leak_check"] = cleared["init_from"]
    model = model.to(device)
    if cfg.freeze_blocks:
        _freeze_early_blocks(model, cfg.freeze_blocks)
    # channels_last doubles CPU throughput of the depthwise convolutions in EfficientNet.
    model = model.to(memory_format=torch.channels_last)
    if cfg.task == "boneage":
        mean_age = float(train_df[target].mean())
        model.set_output_offset(mean_age)
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if ctx.enabled else model

    n_pos = int(train_df[target].sum()) if cfg.task == "fracture" else 0
    criterion = build_loss(loss_name, n_positive=n_pos, n_negative=len(train_df) - n_pos).to(device)
    optimizer = create_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad], cfg.lr,
                                 cfg.weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    higher_better = cfg.task == "fracture"
    scheduler, per_step = create_scheduler(cfg.scheduler, optimizer, lr=cfg.lr, epochs=cfg.epochs,
                                           steps_per_epoch=steps_per_epoch, higher_better=higher_better)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    loop = LoopState(best=-math.inf if higher_better else math.inf, commands=[cfg.command])
    ckpt_path = out / "checkpoint_last.pt"
    if cfg.resume and ckpt_path.is_file():
        scheduler, loop = restore_checkpoint(ckpt_path, cfg, core, optimizer, scheduler, steps_per_epoch)
        if is_main:
            print(json.dumps({"event": "resumed", "from_epoch": loop.start_epoch}), flush=True)

    metrics_file = out / "metrics.jsonl"
    if loop.start_epoch == 0 and not loop.history:
        # Epoch 0: the untrained model on the validation split, the baseline every later epoch is compared to.
        record0, score0 = _validate(core, cfg.task, val_loader, val_ds.targets, criterion, device)
        record0 = {"epoch": 0, **record0}
        loop.history.append(record0)
        if cfg.init_from:
            # Fine-tuning: the parent itself is the first candidate, so a run that only makes it worse
            # ends with the parent's weights rather than its best worse epoch.
            if not math.isnan(score0):
                loop.best = score0
                if is_main:
                    _save_atomic(core.state_dict(), out / "best_model.pt")
        if is_main:
            print(json.dumps(record0), flush=True)
            metrics_file.write_text(json.dumps(record0) + "\n")
    t_loop, epoch_seconds = time.time(), 0.0
    for epoch in range(loop.start_epoch, cfg.epochs):
        if loop.bad_epochs >= cfg.patience:
            break
        if cfg.max_minutes and (time.time() - t_loop + epoch_seconds) > 60 * cfg.max_minutes:
            # Another epoch would overrun the budget: stop here and finish with the best epoch so far.
            if is_main:
                print(json.dumps({"event": "time_budget", "max_minutes": cfg.max_minutes, "stopped_before_epoch": epoch + 1}),
                      flush=True)
            break
        t0 = time.time()
        train_ds.set_epoch(epoch)
        if ctx.enabled:
            train_loader.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(model, cfg.task, train_loader, optimizer, criterion, device, scaler,
                                     step_scheduler=scheduler if per_step else None,
                                     progress=f"epoch {epoch + 1}/{cfg.epochs}" if is_main else None)
        val_record, score = _validate(core, cfg.task, val_loader, val_ds.targets, criterion, device)
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), **val_record,
                                  "lr": optimizer.param_groups[0]["lr"]}
        if scheduler is not None and not per_step:
            _step_after_epoch(scheduler, score)
        improved = (score > loop.best) if higher_better else (score < loop.best)
        if improved or (math.isnan(score) and epoch == loop.start_epoch):
            loop.best, loop.bad_epochs = score if not math.isnan(score) else loop.best, 0
            if is_main:
                _save_atomic(core.state_dict(), out / "best_model.pt")
        else:
            loop.bad_epochs += 1
        epoch_seconds = time.time() - t0
        loop.train_seconds += epoch_seconds
        record.update({"best": round(loop.best, 5), "seconds": round(epoch_seconds, 1), "device": device.type})
        loop.history.append(record)
        if is_main:
            print(json.dumps(record), flush=True)
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_path, core, optimizer, scheduler, epoch, loop, cfg)
    ctx.barrier()
    card: dict[str, Any] = {}
    if is_main:
        card = _finish(cfg, core, spec, pipeline, size, loss_name, val_df, val_ds, val_loader, device, loop.history,
                       loop.train_seconds, data_seconds, len(train_df), loop.commands, init_info, distill_info)
    ctx.close()
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
