"""Ensembles: built from runs on one validation split, loaded like any model, averaging members."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from boneai.ensemble import EnsemblePredictor, build_ensemble
from boneai.errors import BoneAIError
from boneai.explain import explain
from boneai.inference import load_model
from boneai.io import read_radiograph

REPO = Path(__file__).resolve().parents[1]


def _views(pattern: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [read_radiograph(f) for f in sorted(REPO.glob(pattern))]


def _copy(model, dest: Path) -> Path:
    shutil.copytree(model.directory, dest)
    return dest


def test_an_ensemble_of_one_model_twice_predicts_like_the_model(tmp_path, fracture):
    a, b = _copy(fracture, tmp_path / "a"), _copy(fracture, tmp_path / "b")
    card = build_ensemble([a, b], tmp_path / "ens", "fracture", command="python -m boneai ensemble ...")
    assert card["architecture"] == "ensemble" and len(card["members"]) == 2
    assert card["validation"]["auc"] == pytest.approx(fracture.card["validation"]["auc"], abs=1e-9)
    assert set(card["operating_points"]) == {"sensitive", "balanced"}
    ens = load_model(tmp_path / "ens")
    assert isinstance(ens, EnsemblePredictor)
    views = _views("samples/fracatlas/*.jpg")
    single = [p.probability for p in fracture.predict_many(views)]
    both = ens.predict_many(views)
    assert np.allclose([p.probability for p in both], single, atol=1e-5)
    assert all(len(p.extras["member_outputs"]) == 2 for p in both)
    heat = explain(ens, views[0])  # heatmaps come from the first member
    assert heat.map.shape == views[0].pixels.shape[:2] and heat.map.max() > heat.map.min()


def test_a_bone_age_ensemble_averages_its_members(tmp_path, boneage):
    a, b = _copy(boneage, tmp_path / "a"), _copy(boneage, tmp_path / "b")
    # Make member b a different model: shift its output offset by 12 months, and its saved
    # validation predictions with it.
    from safetensors.torch import load_file, save_file

    state = load_file(str(b / "model.safetensors"))
    state["offset"] = state["offset"] + 12
    save_file(state, str(b / "model.safetensors"))
    preds = (b / "val_predictions.csv")
    import pandas as pd

    df = pd.read_csv(preds)
    df["predicted_months"] += 12
    df.to_csv(preds, index=False)
    card = build_ensemble([a, b], tmp_path / "ens", "boneage")
    assert card["validation"]["bias"] == pytest.approx(boneage.card["validation"]["bias"] + 6, abs=0.01)
    ens = load_model(tmp_path / "ens")
    views = _views("samples/boneage/*.png")
    single = np.array([p.boneage_months for p in boneage.predict_many(views, male=True)])
    avg = np.array([p.boneage_months for p in ens.predict_many(views, male=True)])
    assert np.allclose(avg, single + 6, atol=0.2)
    with pytest.raises(BoneAIError, match="sex"):
        ens.predict_many(views)


def test_runs_from_different_splits_or_tasks_are_refused(tmp_path, fracture, boneage):
    a, b = _copy(fracture, tmp_path / "a"), _copy(fracture, tmp_path / "b")
    card = json.loads((b / "card.json").read_text())
    card["training"]["config"]["seed"] = 7
    (b / "card.json").write_text(json.dumps(card))
    with pytest.raises(BoneAIError, match="different splits"):
        build_ensemble([a, b], tmp_path / "x", "fracture")
    with pytest.raises(BoneAIError, match="not fracture"):
        build_ensemble([a, _copy(boneage, tmp_path / "c")], tmp_path / "y", "fracture")
    with pytest.raises(BoneAIError, match="at least two"):
        build_ensemble([a], tmp_path / "z", "fracture")
    with pytest.raises(BoneAIError, match="not a finished training run"):
        build_ensemble([a, tmp_path], tmp_path / "w", "fracture")
