"""Prediction number format: float32 by default, bfloat16 on request, a clear error otherwise."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from boneai.errors import BoneAIError
from boneai.inference import inference_dtype, load_model
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
