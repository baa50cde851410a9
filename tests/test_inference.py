"""Prediction number format: float32 by default, bfloat16 on request, a clear error otherwise."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from boneai.errors import BoneAIError
from boneai import inference
from boneai.inference import (
    available_models,
    default_model_name,
    inference_dtype,
    load_model,
    register_run,
    set_default_model,
)
from boneai.io import read_radiograph

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, expected", [(None, torch.float32), ("float32", torch.float32),
                                             ("bf16", torch.bfloat16), (" BFloat16 ", torch.bfloat16)])
def test_inference_dtype_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("BONEAI_INFERENCE_DTYPE", raising=False)
    else:
        monkeypatch.setenv("BONEAI_INFERENCE_DTYPE", value)
    assert inference_dtype() == expected


def test_auto_picks_a_format_and_a_typo_is_refused(monkeypatch):
    monkeypatch.setenv("BONEAI_INFERENCE_DTYPE", "auto")
    assert inference_dtype() in (torch.float32, torch.bfloat16)
    monkeypatch.setenv("BONEAI_INFERENCE_DTYPE", "half")
    with pytest.raises(BoneAIError, match="use float32, bfloat16 or auto"):
        inference_dtype()


def test_bfloat16_predictions_stay_close_to_float32_and_keep_float32_weights(monkeypatch, fracture):
    files = sorted((REPO / "samples" / "fracatlas").glob("*.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        views = [read_radiograph(f) for f in files]
    monkeypatch.setenv("BONEAI_INFERENCE_DTYPE", "bfloat16")
    fast = load_model(fracture.directory)
    assert fast.dtype == torch.bfloat16 and fracture.dtype == torch.float32
    assert next(fast.model.parameters()).dtype == torch.float32  # Grad-CAM and training use these
    p32 = np.array([p.probability for p in fracture.predict_many(views)])
    p16 = np.array([p.probability for p in fast.predict_many(views)])
    assert p16.dtype == np.float64 and np.all((p16 >= 0) & (p16 <= 1))
    assert np.abs(p32 - p16).max() < 0.1
    assert not np.array_equal(p32, p16)  # it really ran another number format


# -- registering models and the defaults file ---------------------------------------------------------
def _run(folder: Path, task: str = "fracture") -> Path:
    """A finished training run as register_run sees it (the weights are not loaded here)."""
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(json.dumps({"name": "run", "task": task, "architecture": "resnet18"}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_registering_writes_the_card_and_defaults_atomically(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "defaults.json").write_text(json.dumps({"boneage": "old-boneage"}))
    before = (weights / "defaults.json").stat().st_ino
    dest = register_run(_run(tmp_path / "run"), "new-fracture", weights_dir=weights, make_default=True)
    assert json.loads((dest / "card.json").read_text())["name"] == "new-fracture"
    defaults = json.loads((weights / "defaults.json").read_text())
    assert defaults == {"boneage": "old-boneage", "fracture": "new-fracture"}
    # A new file put in place (os.replace), not the old one rewritten where a reader could see half of it.
    assert (weights / "defaults.json").stat().st_ino != before
    assert not [p.name for p in weights.rglob("*.tmp")]
    assert default_model_name("fracture", weights) == "new-fracture"
    with pytest.raises(BoneAIError, match="already exists"):
        register_run(tmp_path / "run", "new-fracture", weights_dir=weights)


def test_a_failed_write_leaves_the_previous_defaults_intact(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "weights"
    register_run(_run(tmp_path / "a"), "first", weights_dir=weights, make_default=True)
    register_run(_run(tmp_path / "b"), "second", weights_dir=weights)
    original = (weights / "defaults.json").read_text()

    def crash(fd: int) -> None:  # the machine stops mid-write (disk full, power cut)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inference.os, "fsync", crash)
    with pytest.raises(OSError):
        set_default_model("fracture", "second", weights)
    assert (weights / "defaults.json").read_text() == original
    assert not [p.name for p in weights.glob(".*.tmp")]
    with pytest.raises(OSError):  # a registration that fails half-way leaves no half model behind
        register_run(_run(tmp_path / "c"), "third", weights_dir=weights)
    assert not (weights / "third").exists()
    assert [c["name"] for c in available_models("fracture", weights)] == ["first", "second"]


def test_concurrent_default_changes_are_not_lost(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    tasks = ("fracture", "boneage", "anomaly")
    for task in tasks:
        for i in range(2):
            register_run(_run(tmp_path / f"{task}{i}", task), f"{task}-{i}", weights_dir=weights)
    gate = threading.Barrier(len(tasks))
    errors: list[BaseException] = []

    def flip(task: str) -> None:
        gate.wait()
        try:
            for i in range(30):
                set_default_model(task, f"{task}-{i % 2}", weights)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=flip, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Each writer read the others' latest entries under the lock: no task's default was dropped.
    assert json.loads((weights / "defaults.json").read_text()) == {t: f"{t}-1" for t in tasks}


@pytest.mark.parametrize("content", ["{not json", "[\"fracture\"]", "{\"fracture\": 3}"])
def test_a_corrupt_defaults_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    weights = tmp_path / "weights"
    register_run(_run(tmp_path / "run"), "only", weights_dir=weights)
    (weights / "defaults.json").write_text(content)
    with pytest.raises(BoneAIError, match=r"defaults\.json .*(Fix it, or delete it)"):
        default_model_name("fracture", weights)
    with pytest.raises(BoneAIError, match=r"defaults\.json"):  # not silently replaced either
        set_default_model("fracture", "only", weights)
    assert (weights / "defaults.json").read_text() == content


def test_a_default_must_be_a_model_of_that_task(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    register_run(_run(tmp_path / "run", "boneage"), "ages", weights_dir=weights)
    with pytest.raises(BoneAIError, match="is a boneage model"):
        set_default_model("fracture", "ages", weights)
    with pytest.raises(BoneAIError, match="not found"):
        set_default_model("boneage", "missing", weights)
    with pytest.raises(BoneAIError, match="Unknown task"):
        set_default_model("skull", "ages", weights)
