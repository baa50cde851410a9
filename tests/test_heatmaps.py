"""The Study review page's heatmap workers (ui/heatmaps.py): same maps as boneai.explain, computed
concurrently without touching the predictor that all sessions share, joined when asked twice, and
kept within a byte budget."""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ui.heatmaps import _Service  # noqa: E402

VIEWS = ["fracatlas/IMG0000351.jpg", "fracatlas/IMG0000479.jpg", "fracatlas/IMG0002180.jpg",
         "fracatlas/IMG0000597.jpg"]


@pytest.fixture(scope="module")
def radiographs():
    from boneai.io import read_radiograph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [read_radiograph(REPO / "samples" / v) for v in VIEWS]


def _state(model) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    return hooks, model.training, tuple(p.requires_grad for p in model.parameters())


def test_concurrent_heatmaps_match_explain_and_leave_the_shared_model_alone(fracture_fast, radiographs) -> None:
    from boneai import explain

    before = _state(fracture_fast.model)
    service = _Service(n_workers=2, max_bytes=2**30)
    try:
        futures = [service.future(fracture_fast, f"d{i}", r, "gradcam", None) for i, r in enumerate(radiographs)]
        # Meanwhile the shared predictor keeps predicting (as other sessions do).
        probs = [fracture_fast.predict(r).probability for r in radiographs]
        heats = [f.result(timeout=600) for f in futures]
    finally:
        service.pool.shutdown(wait=True)
    assert _state(fracture_fast.model) == before  # no hooks left, same mode and requires_grad
    assert probs == [fracture_fast.predict(r).probability for r in radiographs]
    for r, heat in zip(radiographs, heats):
        ref = explain.explain(fracture_fast, r, method="gradcam")
        assert heat.method == ref.method and heat.map.shape == ref.map.shape
        np.testing.assert_allclose(heat.map, ref.map, atol=1e-4)
        assert heat.peak == ref.peak


def test_the_same_view_asked_twice_is_one_computation_and_the_cache_is_bounded(fracture_fast, radiographs) -> None:
    service = _Service(n_workers=1, max_bytes=1)  # room for nothing but what is being computed
    calls: list[str] = []
    compute = service._compute
    gate = threading.Event()

    def counted(predictor, radiograph, method, male):
        calls.append(method)
        gate.wait(60)
        return compute(predictor, radiograph, method, male)

    service._compute = counted
    try:
        first = service.future(fracture_fast, "same", radiographs[0], "gradcam", None)
        again = service.future(fracture_fast, "same", radiographs[0], "gradcam", None)  # a rerun, another session
        assert again is first
        gate.set()
        first.result(timeout=600)
        second = service.future(fracture_fast, "other", radiographs[1], "gradcam", None)
        second.result(timeout=600)
    finally:
        service.pool.shutdown(wait=True)
    assert len(calls) == 2
    assert len(service.cache) == 1 and ("other" in next(iter(service.cache)))  # the older map was dropped


def test_a_failed_heatmap_is_not_kept(fracture_fast, radiographs) -> None:
    from boneai.errors import BoneAIError

    service = _Service(n_workers=1, max_bytes=2**30)
    try:
        fut = service.future(fracture_fast, "bad", radiographs[0], "no-such-method", None)
        with pytest.raises(BoneAIError):
            fut.result(timeout=600)
    finally:
        service.pool.shutdown(wait=True)
    assert not service.cache


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_heatmap_workers_run_below_the_page_priority(monkeypatch) -> None:
    """Heatmaps take the CPU that page runs and probabilities leave: their workers are niced, the
    calling (page) thread is not."""
    import os

    monkeypatch.setenv("BONEAI_HEATMAP_NICE", "7")
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    service = _Service(n_workers=1, max_bytes=1 << 20)
    try:
        worker = service.pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        service.pool.shutdown()
    assert worker == min(19, max(base, 7))
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
