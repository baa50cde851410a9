"""Ensembles: several trained models of one task averaged into one shipped model.

``python -m boneai ensemble --task boneage --out runs/NAME RUN_DIR RUN_DIR ...`` takes finished
training runs (each a folder with ``card.json``, ``model.safetensors`` and ``val_predictions.csv``)
that were validated on the same split, averages their validation outputs (months for bone age,
logits for a classifier, each member with its own input size, pipeline and mirror averaging),
scores the average on that split, fits the calibration and operating points of a classifier anew,
and writes one model folder: ``model.safetensors`` holds every member's weights under the prefix
``m<i>.``, and ``card.json`` lists the members with their pipelines, commands and own figures.
:func:`boneai.inference.load_model` turns such a folder into an :class:`EnsemblePredictor`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from boneai import evaluate as ev
from boneai.card import WEIGHTS_FILE, ModelCard, card_split_key
from boneai.errors import BoneAIError
from boneai.predictor import CalibratedPredictions, Image, ModelResolver, Predictor, build_network, read_weights, \
    register_loader

__all__ = ["build_ensemble", "EnsemblePredictor", "load_ensemble"]

_MEMBER_KEYS = ("architecture", "input_size", "mean", "std", "pipeline", "tta_hflip", "description",
                "initial_weights", "weights_dtype")


def build_ensemble(run_dirs: Sequence[str | Path], out: str | Path, task: str, command: str = "") -> dict[str, Any]:
    """Write an ensemble model folder from finished runs validated on one split; returns its card."""
    from safetensors.torch import load_file, save_file  # only where weights are read and written

    if len(run_dirs) < 2:
        raise BoneAIError("An ensemble needs at least two trained models.")
    cards: list[ModelCard] = []
    preds = []
    for d in map(Path, run_dirs):
        for fname in ("card.json", WEIGHTS_FILE, "val_predictions.csv"):
            if not (d / fname).is_file():
                raise BoneAIError(f"{d} is not a finished training run (no {fname}).")
        card = ModelCard.from_dir(d)
        if card.task != task:
            raise BoneAIError(f"{d} is a {card.task} model, not {task}.")
        if card.members:
            raise BoneAIError(f"{d} is already an ensemble; list its runs instead.")
        cards.append(card)
        preds.append(pd.read_csv(d / "val_predictions.csv"))
    if len({card_split_key(c) for c in cards}) != 1:
        raise BoneAIError("The models were validated on different splits (data, --val-fraction, --seed or --limit "
                          "differ); an average scored on either split would be optimistic.")
    if any(not p["image"].equals(preds[0]["image"]) for p in preds[1:]):
        raise BoneAIError("The models' validation predictions list different images.")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    members = []
    for i, (d, card) in enumerate(zip(map(Path, run_dirs), cards)):
        for k, v in load_file(str(d / card.weights_file)).items():
            state[f"m{i}.{k}"] = v.contiguous()
        json_card = card.to_dict()  # the member keeps its keys as the run's card wrote them
        training = card.training
        members.append({**{k: json_card[k] for k in _MEMBER_KEYS if k in json_card}, "prefix": f"m{i}.",
                        "source": str(d),
                        "commands": training.all_commands if training else [None],
                        "epochs_run": training.epochs_run if training else None,
                        "train_seconds": training.train_seconds if training else None,
                        "validation": json_card.get("validation"),
                        **({"revalidation": {k: card.revalidation[k] for k in ("data", "command")}}
                           if card.revalidation else {})})
    save_file(state, str(out / WEIGHTS_FILE))

    first = preds[0]
    ensemble_card: dict[str, Any] = {
        "name": out.name, "task": task, "architecture": "ensemble",
        "description": f"Average of {len(cards)} models: " + ", ".join(
            f"{m['architecture']} at {m['input_size']} px" for m in members),
        "members": members, "weights_file": WEIGHTS_FILE,
        "input_size": members[0]["input_size"], "mean": members[0]["mean"], "std": members[0]["std"],
        "pipeline": members[0]["pipeline"], "tta_hflip": members[0].get("tta_hflip", False),
        "training": {"command": command, "commands": [command] if command else [],
                     "member_commands": [m["commands"] for m in members],
                     "n_train": cards[0].training.n_train if cards[0].training else None,
                     "n_val": int(len(first))},
        "data": cards[0].to_dict().get("data", {}),
    }
    if task == "boneage":
        avg = np.mean([p["predicted_months"].to_numpy(dtype=float) for p in preds], axis=0)
        table = first[["image", "boneage_months", "male"]].assign(predicted_months=avg)
        ensemble_card["validation"] = ev.regression_metrics(table["boneage_months"].to_numpy(), avg)
    else:
        avg = np.mean([p["logit"].to_numpy(dtype=float) for p in preds], axis=0)
        keep = [c for c in ("image", "label", "region", "hardware") if c in first]
        table = first[keep].assign(logit=avg)
        fields, prob = ev.classifier_validation(table, has_region="region" in first)
        table.insert(table.columns.get_loc("logit") + 1, "probability", prob)
        ensemble_card.update(fields)
    table.to_csv(out / "val_predictions.csv", index=False)
    (out / "card.json").write_text(json.dumps(ensemble_card, indent=2, default=str))
    return ensemble_card


@register_loader("ensemble")
def load_ensemble(card: ModelCard | Mapping[str, Any], directory: str | Path,
                  resolve: ModelResolver | None = None) -> "EnsemblePredictor":
    """An :class:`EnsemblePredictor` from an ensemble folder (see :func:`build_ensemble`)."""
    directory = Path(directory)
    card = ModelCard.coerce(card, directory)
    weights = directory / card.weights_file
    members = [Predictor(m.card(card), build_network(m.architecture, read_weights(weights, m.prefix)), directory)
               for m in card.members]
    return EnsemblePredictor(card, members, directory)


class EnsemblePredictor(CalibratedPredictions):
    """Averages its members' outputs (months, or logits before the ensemble's own calibration).

    It holds its members (each a :class:`~boneai.predictor.Predictor` with its own input size,
    pipeline and mirror averaging). Heatmaps, the preprocessing shown and ``input_image`` come from
    the first member; every member sees the upload through its own pipeline.
    """

    def __init__(self, card: ModelCard | Mapping[str, Any], members: Sequence[Predictor], directory: Path) -> None:
        if not members:
            raise BoneAIError("An ensemble needs at least one member.")
        self.directory = Path(directory)
        self.card = ModelCard.coerce(card, self.directory)
        self.members = list(members)
        self.name = self.card.name or self.directory.name
        self.task = str(self.card.task)
        first = self.members[0]
        self.model: nn.Module = first.model  # Grad-CAM explains the first member
        self.cam_architecture = first.card.architecture
        self.pipeline, self.mean, self.std = first.pipeline, first.mean, first.std
        self.dtype = first.dtype

    @property
    def batchnorm_folded(self) -> bool:
        """Whether every member runs its forward pass on its batch-norm-folded copy."""
        return all(m.batchnorm_folded for m in self.members)

    def input_image(self, image: Image) -> np.ndarray:
        """The first member's input square (the one heatmaps are drawn on)."""
        return self.members[0].input_image(image)

    def input_tensor(self, image: Image) -> torch.Tensor:
        return self.members[0].input_tensor(image)

    def _outputs(self, images: Sequence[Image], sex: torch.Tensor | None
                 ) -> tuple[np.ndarray, list[np.ndarray], list[dict[str, Any]]]:
        """The members' mean, each member on its own preprocessing of the views; the inputs shown are
        the first member's, and each view's extras keep every member's own output."""
        outs = [m._outputs(images, sex) for m in self.members]
        per_member = np.stack([raw for raw, _, _ in outs])
        extras = [{"member_outputs": [float(v) for v in per_member[:, j]]} for j in range(len(images))]
        return per_member.mean(axis=0), outs[0][1], extras
