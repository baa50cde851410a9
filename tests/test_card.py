"""Typed model cards (boneai.card), the loader registry and the layering of the model modules."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from boneai.card import (
    DEFAULT_OPERATING_POINT,
    WEIGHTS_FILE,
    ModelCard,
    OperatingPoint,
    card_split_key,
    validation_split_key,
)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
SHIPPED = sorted(p.parent.name for p in WEIGHTS.glob("*/card.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_card_loads_and_reserialises_to_the_same_json(name: str) -> None:
    text = (WEIGHTS / name / "card.json").read_text()
    data = json.loads(text)
    card = ModelCard.from_dir(WEIGHTS / name)
    assert card.to_dict() == data
    assert card.to_json() == json.dumps(data, indent=2)  # same keys, same order, same values
    assert ModelCard.from_json(card.to_json()) == card
    assert card.directory == WEIGHTS / name and card.weights_path.is_file()
    assert card.model_kind in ("classifier", "ensemble", "anomaly", "localiser")
    for key, value in data.items():  # the dict view the pages read
        assert card[key] == value and key in card


def test_unknown_keys_survive_at_every_level_and_keep_their_place() -> None:
    data = {
        "name": "m", "future_top": {"a": [1, 2]}, "task": "fracture", "architecture": "ensemble",
        "pipeline": [{"step": "resize_pad", "params": {"size": 64}, "note": "step extra"}],
        "operating_points": {"balanced": {"threshold": 0.3, "youden": 0.7}},
        "members": [{"architecture": "resnet18", "prefix": "m0.", "member_extra": True,
                     "validation": {"auc": 0.9, "brier": 0.1}}],
        "training": {"command": "x", "new_field": 3},
        "temperature": 2.0, "calibration": "p = ...", "logit_offset": 0.5,
    }
    card = ModelCard.from_dict(data)
    assert card.to_dict() == data and list(card.to_dict()) == list(data)
    assert card.extra["future_top"]["a"] == (1, 2)
    assert card.pipeline[0].extra["note"] == "step extra" and card.pipeline[0].params["size"] == 64
    assert card.operating_points["balanced"].extra["youden"] == 0.7
    assert card.members[0].extra["member_extra"] is True and card.members[0].validation.extra["brier"] == 0.1
    assert card.training.extra["new_field"] == 3
    assert (card.temperature, card.logit_offset, card.calibration.description) == (2.0, 0.5, "p = ...")
    assert card.model_kind == "ensemble"


def test_defaults_are_written_once_and_absent_keys_stay_absent() -> None:
    card = ModelCard.from_dict({"name": "m", "task": "boneage"})
    assert card.weights_file == WEIGHTS_FILE == "model.safetensors"
    assert card.default_operating_point == DEFAULT_OPERATING_POINT == "balanced"
    assert (card.temperature, card.logit_offset, card.tta_hflip, card.pipeline, card.members) == (1.0, 0.0, False, (), ())
    assert card.to_dict() == {"name": "m", "task": "boneage"}
    assert "weights_file" not in card and card.get("weights_file", "x") == "x"
    with pytest.raises(KeyError):
        card["temperature"]
    # A value changed from its default is written; one set back to it stays absent.
    changed = dataclasses.replace(card, weights_file="w.safetensors", tta_hflip=False)
    assert changed.to_dict() == {"name": "m", "task": "boneage", "weights_file": "w.safetensors"}


def test_the_card_is_frozen_and_its_dict_view_is_a_copy() -> None:
    card = ModelCard.from_dict({"name": "m", "operating_points": {"balanced": {"threshold": 0.2}}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        card.operating_points["sensitive"] = OperatingPoint(threshold=0.1)  # type: ignore[index]
    view = card["operating_points"]
    view["balanced"]["threshold"] = 0.9
    assert card.thresholds == {"balanced": 0.2}


def test_kinds_come_from_the_card() -> None:
    assert ModelCard.from_dict({"task": "fracture"}).model_kind == "classifier"
    assert ModelCard.from_dict({"task": "fracture", "members": [{"prefix": "m0."}]}).model_kind == "ensemble"
    assert ModelCard.from_dict({"task": "anomaly", "architecture": "cae"}).model_kind == "anomaly"
    assert ModelCard.from_dict({"task": "fracture", "kind": "localiser"}).model_kind == "localiser"


def test_a_listing_dict_with_dir_coerces_to_a_card_in_that_folder(tmp_path: Path) -> None:
    card = ModelCard.coerce({"name": "m", "dir": str(tmp_path), "version": "1.2"})
    assert card.directory == tmp_path and card.version == "1.2" and "dir" not in card.to_dict()


def test_split_keys_of_a_card_and_of_its_dict_agree(tmp_path: Path) -> None:
    data = {"training": {"config": {"data": str(tmp_path), "val_fraction": 0.2, "seed": 1, "limit": None}}}
    assert card_split_key(data) == card_split_key(ModelCard.from_dict(data)) == validation_split_key(
        data["training"]["config"])
    moved = {**data, "revalidation": {"data": str(tmp_path / "copy")}}
    assert card_split_key(moved)[0] == str((tmp_path / "copy").resolve())


# -- layering -----------------------------------------------------------------------------------------
def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, level, inside a function) of every import in a file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, 0, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append((child.module or "", child.level, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def test_the_card_module_imports_the_standard_library_only() -> None:
    imports = _imports(REPO / "boneai" / "card.py")
    assert imports
    for module, level, _ in imports:
        top = module.split(".")[0]
        assert level == 0 and top != "boneai", f"boneai/card.py imports {module!r}"
        assert top in sys.stdlib_module_names or top == "__future__", f"boneai/card.py imports {module!r}"


@pytest.mark.parametrize("module", ["card", "predictor", "anomaly", "ensemble", "localisation", "evaluate"])
def test_the_model_kinds_sit_below_inference(module: str) -> None:
    """No import of boneai.inference (or of train) from below it, at the top or inside a function."""
    for name, _, _ in _imports(REPO / "boneai" / f"{module}.py"):
        assert name not in ("boneai.inference", "boneai.train", "boneai.batch"), f"boneai/{module}.py imports {name}"


def test_inference_imports_the_model_kinds_at_the_top() -> None:
    top = {name for name, _, inside in _imports(REPO / "boneai" / "inference.py") if not inside}
    assert {"boneai", "boneai.predictor", "boneai.card"} <= top
    assert not [name for name, _, inside in _imports(REPO / "boneai" / "inference.py") if inside]


# -- the loader registry ---------------------------------------------------------------------------
def test_each_kind_has_its_loader() -> None:
    from boneai.anomaly import load_anomaly_model
    from boneai.ensemble import load_ensemble
    from boneai.inference import MODEL_LOADERS
    from boneai.localisation import load_localiser
    from boneai.predictor import load_classifier
    from boneai.site_model import load_site_probe

    assert MODEL_LOADERS == {"classifier": load_classifier, "ensemble": load_ensemble,
                             "anomaly": load_anomaly_model, "localiser": load_localiser,
                             "site_probe": load_site_probe}


def test_load_model_picks_the_loader_of_the_cards_kind(tmp_path: Path, monkeypatch) -> None:
    from boneai import predictor
    from boneai.errors import ModelNotFoundError
    from boneai.inference import load_model

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "card.json").write_text(json.dumps({"task": "fracture", "kind": "odd", "extra_key": 1}))
    with pytest.raises(ModelNotFoundError, match="kind 'odd'"):
        load_model(folder)
    seen = {}

    def load_odd(card, directory, resolve=None):
        seen.update(card=card, directory=directory, resolve=resolve)
        return "an odd predictor"

    monkeypatch.setitem(predictor.MODEL_LOADERS, "odd", load_odd)
    assert load_model(folder) == "an odd predictor"
    assert isinstance(seen["card"], ModelCard) and seen["card"].name == "odd" and seen["card"].extra["extra_key"] == 1
    assert seen["directory"] == folder and callable(seen["resolve"])


def test_shipped_predictors_satisfy_the_interface(fracture_fast, boneage) -> None:
    from boneai.ensemble import EnsemblePredictor
    from boneai.predictor import ModelPredictor, Predictor

    assert not issubclass(EnsemblePredictor, Predictor)  # it holds its members
    for p in (fracture_fast, boneage, *getattr(boneage, "members", [])):
        assert isinstance(p, ModelPredictor)
        assert isinstance(p.card, ModelCard) and p.name == p.card.name
