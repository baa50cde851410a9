"""Fracture localisation: box geometry, the localisation metrics, the grouped split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from boneai import evaluate as ev
from boneai.data import near_duplicate_groups, protocol_split
from boneai.localisation import boxes_from_map
from boneai.preprocess import map_boxes, run_pipeline

PIPELINE = [{"step": "standardise", "params": {}}, {"step": "otsu_crop", "params": {}},
            {"step": "resize_pad", "params": {"size": 256}}]


def _film_with_bar(bar: tuple[int, int, int, int]) -> np.ndarray:
    """A textured carrier on a plain black border (so the crop cuts) with a bright bar at ``bar``."""
    rng = np.random.default_rng(0)
    img = np.zeros((600, 450), np.uint8)
    img[80:560, 40:420] = rng.integers(60, 120, size=(480, 380))
    x0, y0, x1, y1 = bar
    img[y0:y1, x0:x1] = 250
    return img


@pytest.mark.parametrize("bar", [(100, 150, 160, 170), (300, 400, 330, 520), (41, 81, 70, 95)])
def test_a_box_found_on_the_model_input_maps_back_onto_the_bar_in_the_original(bar):
    original = _film_with_bar(bar)
    stages = run_pipeline(original, PIPELINE)
    assert stages[1].result.extras.get("crop") is not None, "the test image must be cropped"
    square = stages[-1].result.image
    found = boxes_from_map((square >= 200).astype(np.float32), threshold=0.5)
    assert len(found) == 1
    back = map_boxes(np.array(found[0][:4]), stages, original.shape, inverse=True)[0]
    # One input pixel is about 1.9 original pixels here; resampling blurs the bar's edge by one pixel.
    assert np.allclose(back, bar, atol=2.5), (back, bar)
    assert ev.box_iou(back[None], np.array([bar]))[0, 0] > 0.85


def test_forward_then_inverse_mapping_is_the_identity():
    original = _film_with_bar((100, 150, 160, 170))
    stages = run_pipeline(original, PIPELINE)
    pts = np.array([[50.0, 90.0], [200.0, 300.0], [410.0, 550.0]])
    there = map_boxes(np.c_[pts, pts + 1], stages, original.shape)
    back = map_boxes(there, stages, original.shape, inverse=True)
    assert np.allclose(back[:, :2], pts, atol=1e-6)


def test_a_step_that_resizes_without_a_declared_mapping_is_refused(monkeypatch):
    from boneai import preprocess as P

    original = _film_with_bar((100, 150, 160, 170))
    stages = run_pipeline(original, PIPELINE)
    monkeypatch.setitem(P.STEPS, "otsu_crop", P.Step(P.otsu_crop))
    with pytest.raises(ValueError, match="declares no mapping"):
        map_boxes(np.array([[0, 0, 10, 10]]), stages, original.shape, inverse=True)


def test_boxes_from_map_scores_each_region_by_its_peak_and_scales_by_the_stride():
    m = np.zeros((20, 20), np.float32)
    m[2:4, 3:6] = 0.6
    m[3, 4] = 0.9
    m[10:15, 10:12] = 0.7
    boxes = boxes_from_map(m, threshold=0.5, scale=4)
    assert boxes == [[12.0, 8.0, 24.0, 16.0, pytest.approx(0.9)], [40.0, 40.0, 48.0, 60.0, pytest.approx(0.7)]]
    assert boxes_from_map(m, threshold=0.95) == []


# --- metrics, on small cases computed by hand -------------------------------------------------------

TRUTHS = [np.array([[0, 0, 10, 10]]), np.array([[20, 20, 30, 30]]), np.zeros((0, 4))]
PREDS = [np.array([[2, 2, 8, 8, 0.9]]),
         np.array([[50, 50, 60, 60, 0.8], [20, 20, 30, 30, 0.1]]),
         np.array([[0, 0, 5, 5, 0.7]])]


def test_iou_by_hand():
    assert ev.box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10]]))[0, 0] == pytest.approx(1 / 3)
    assert ev.box_iou(np.array([[0, 0, 1, 1]]), np.array([[2, 2, 3, 3]]))[0, 0] == 0


def test_hit_rate_counts_only_the_top_box_of_fractured_images():
    # A: the top box lies inside the fracture (IoU 0.36, centre inside); B: the top box misses; C is normal.
    assert ev.hit_rate(PREDS, TRUTHS) == pytest.approx(0.5)
    # Centre inside counts even when the IoU is small.
    assert ev.hit_rate([np.array([[4, 4, 6, 6, 1.0]])], [np.array([[0, 0, 10, 10]])]) == 1.0
    assert ev.hit_rate([np.zeros((0, 5))], [np.array([[0, 0, 10, 10]])]) == 0.0
    assert ev.hit_rate(PREDS[2:], TRUTHS[2:]) is None


def test_froc_and_map_by_hand():
    # Sorted: 0.9 TP, 0.8 FP, 0.7 FP, 0.1 TP over 3 images and 2 fracture boxes.
    assert ev.froc(PREDS, TRUTHS) == {"0.5": 0.5, "1": 1.0, "2": 1.0}
    # At IoU 0.2: precision 1, 1/2, 1/3, 2/4 at recall .5, .5, .5, 1 -> AP = .5 * 1 + .5 * .5.
    assert ev.average_precision_at(PREDS, TRUTHS, 0.2) == pytest.approx(0.75)
    # At IoU 0.5 the 0.9 box (IoU 0.36) is a false positive: only the 0.1 box finds one, precision 1/4.
    assert ev.average_precision_at(PREDS, TRUTHS, 0.5) == pytest.approx(0.125)
    # A second box on an already found fracture is a false positive.
    dup = [np.array([[0, 0, 10, 10, 0.9], [1, 1, 10, 10, 0.8]])]
    assert ev.froc(dup, [np.array([[0, 0, 10, 10]])], rates=(0.5, 1)) == {"0.5": 1.0, "1": 1.0}
    assert ev.average_precision_at(dup, [np.array([[0, 0, 10, 10]])]) == pytest.approx(1.0)
    figures = ev.localisation_figures(PREDS, TRUTHS, labels=[1, 1, 0])
    assert figures["n_images"] == 3 and figures["n_fractured_images"] == 2 and figures["n_boxes"] == 2
    assert figures["map50"] == pytest.approx(0.125)


def test_point_hit_rate_for_heatmap_peaks():
    assert ev.point_hit_rate([(5, 5), (0, 0), None], TRUTHS) == pytest.approx(0.5)


# --- the grouped split -------------------------------------------------------------------------------

def test_near_duplicates_group_transitively_and_others_stay_apart():
    rng = np.random.default_rng(1)
    a = rng.random(256) > 0.5
    b, c = a.copy(), a.copy()
    b[:10] = ~b[:10]         # 10 bits from a
    c[5:25] = ~c[5:25]       # 20 bits from a, 20 from b (shared flips 5..9), so a-b-c is one group
    far = ~a
    groups = near_duplicate_groups(np.stack([a, b, c, far]), max_bits=12)
    assert groups[0] == groups[1] and groups[0] != groups[3]
    assert groups[2] != groups[0]  # 20 bits from a and 20 from b: above 12
    assert len(set(near_duplicate_groups(np.stack([a, b, c, far]), max_bits=20)[:3])) == 1


def test_test_split_comes_only_from_whole_groups_inside_the_earlier_validation_split():
    n = 200
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "label": [k % 5 == 0 for k in range(n)]})
    df["label"] = df["label"].astype(int)
    groups = np.arange(n) // 2          # pairs of near-duplicates
    legacy = {f"i{k}" for k in range(0, 81)}   # i80 is legacy validation, its twin i81 is not
    split = protocol_split(df, groups, legacy, test_share=0.5, seed=0)
    assert set(split) == {"train", "val", "test"}
    test_ids = set(df["image_id"][split == "test"])
    assert test_ids <= legacy and "i80" not in test_ids
    for g in np.unique(groups):
        assert split[groups == g].nunique() == 1 or "test" not in set(split[groups == g])
    assert (split[~df["image_id"].isin(legacy)] == "train").all()
    assert 30 <= len(test_ids) <= 50
