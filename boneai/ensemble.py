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
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from boneai import evaluate as ev
from boneai.errors import BoneAIError
from boneai.inference import Predictor
from boneai.io import Radiograph

__all__ = ["build_ensemble", "EnsemblePredictor", "load_ensemble"]

_MEMBER_KEYS = ("architecture", "input_size", "mean", "std", "pipeline", "tta_hflip", "description",
                "initial_weights", "weights_dtype")


def build_ensemble(run_dirs: Sequence[str | Path], out: str | Path, task: str, command: str = "") -> dict[str, Any]:
    """Write an ensemble model folder from finished runs validated on one split; returns its card."""
    from safetensors.torch import load_file, save_file

    from boneai.train import card_split_key, classifier_validation

    if len(run_dirs) < 2:
        raise BoneAIError("An ensemble needs at least two trained models.")
    cards, preds = [], []
    for d in map(Path, run_dirs):
        for fname in ("card.json", "model.safetensors", "val_predictions.csv"):
            if not (d / fname).is_file():
                raise BoneAIError(f"{d} is not a finished training run (no {fname}).")
        card = json.loads((d / "card.json").read_text())
        if card.get("task") != task:
            raise BoneAIError(f"{d} is a {card.get('task')} model, not {task}.")
        if card.get("members"):
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
        for k, v in load_file(str(d / "model.safetensors")).items():
            state[f"m{i}.{k}"] = v.contiguous()
        training = card.get("training", {})
        members.append({**{k: card[k] for k in _MEMBER_KEYS if k in card}, "prefix": f"m{i}.", "source": str(d),
                        "commands": training.get("commands", [training.get("command")]),
                        "epochs_run": training.get("epochs_run"), "train_seconds": training.get("train_seconds"),
                        "validation": card.get("validation"),
                        **({"revalidation": {k: card["revalidation"][k] for k in ("data", "command")}}
                           if card.get("revalidation") else {})})
    save_file(state, str(out / "model.safetensors"))

    first = preds[0]
    ensemble_card: dict[str, Any] = {
        "name": out.name, "task": task, "architecture": "ensemble",
        "description": f"Average of {len(cards)} models: " + ", ".join(
            f"{m['architecture']} at {m['input_size']} px" for m in members),
        "members": members, "weights_file": "model.safetensors",
        "input_size": members[0]["input_size"], "mean": members[0]["mean"], "std": members[0]["std"],
        "pipeline": members[0]["pipeline"], "tta_hflip": members[0].get("tta_hflip", False),
        "training": {"command": command, "commands": [command] if command else [],
                     "member_commands": [m["commands"] for m in members],
                     "n_train": cards[0].get("training", {}).get("n_train"),
                     "n_val": int(len(first))},
        "data": cards[0].get("data", {}),
    }
    if task == "boneage":
        avg = np.mean([p["predicted_months"].to_numpy(dtype=float) for p in preds], axis=0)
        table = first[["image", "boneage_months", "male"]].assign(predicted_months=avg)
        ensemble_card["validation"] = ev.regression_metrics(table["boneage_months"].to_numpy(), avg)
    else:
        avg = np.mean([p["logit"].to_numpy(dtype=float) for p in preds], axis=0)
        keep = [c for c in ("image", "label", "region", "hardware") if c in first]
        table = first[keep].assign(logit=avg)
        fields, prob = classifier_validation(table, has_region="region" in first)
        table.insert(table.columns.get_loc("logit") + 1, "probability", prob)
        ensemble_card.update(fields)
    table.to_csv(out / "val_predictions.csv", index=False)
    (out / "card.json").write_text(json.dumps(ensemble_card, indent=2, default=str))
    return ensemble_card


def load_ensemble(card: dict[str, Any], directory: Path):
    """An :class:`EnsemblePredictor` from an ensemble folder (see :func:`build_ensemble`)."""
    from boneai.inference import read_weights
    from boneai.models import build_model, get_spec

    weights = directory / card.get("weights_file", "model.safetensors")
    members = []
    for m in card["members"]:
        get_spec(m["architecture"])
        model = build_model(m["architecture"], pretrained=False)
        prefix = m["prefix"]
        model.load_state_dict(read_weights(weights, prefix))
        model = model.to(memory_format=torch.channels_last).eval()
        member_card = {**{k: m[k] for k in _MEMBER_KEYS if k in m}, "task": card["task"],
                       "name": f"{card.get('name', directory.name)}[{prefix.rstrip('.')}]"}
        members.append(Predictor(member_card, model, directory))
    return EnsemblePredictor(card, members, directory)


class EnsemblePredictor(Predictor):
    """Averages its members' outputs (months, or logits before the ensemble's own calibration).

    Heatmaps, the preprocessing shown and ``input_image`` come from the first member; every member
    sees the upload through its own pipeline.
    """

    def __init__(self, card: dict[str, Any], members: list, directory: Path) -> None:
        self.members = members
        super().__init__(card, members[0].model, directory)
        self.dtype = members[0].dtype  # the members run the forward passes
        self.cam_architecture = card["members"][0]["architecture"]

    def _inference_copy(self):
        """None of its own: each member runs its forward pass on its own (folded) copy."""
        self._bn_folded = all(m.batchnorm_folded for m in self.members)
        return self.model

    def raw_outputs(self, batch: torch.Tensor, male: torch.Tensor | None = None) -> np.ndarray:
        """Not defined for an ensemble: its members need inputs of their own sizes."""
        raise BoneAIError("An ensemble's members need their own inputs; call predict or predict_many.")

    def _outputs(self, images: Sequence[Radiograph | np.ndarray], sex: torch.Tensor | None
                 ) -> tuple[np.ndarray, list[np.ndarray], list[dict[str, Any]]]:
        """The members' mean, each member on its own preprocessing of the views; the inputs shown are
        the first member's, and each view's extras keep every member's own output."""
        outs = [m._outputs(images, sex) for m in self.members]
        per_member = np.stack([raw for raw, _, _ in outs])
        extras = [{"member_outputs": [float(v) for v in per_member[:, j]]} for j in range(len(images))]
        return per_member.mean(axis=0), outs[0][1], extras
