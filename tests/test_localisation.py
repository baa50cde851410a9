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


# --- the localiser model, evaluate and predict ---------------------------------------------------------

import json  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from boneai.cli import main as cli_main  # noqa: E402
from boneai.localisation import FractureLocaliser, load_localiser  # noqa: E402


def _mini_fracatlas(root, samples_dir, fractured_only: bool = False):
    """A FracAtlas-layout folder from the shipped samples, with their annotated fracture boxes."""
    table = pd.read_csv(samples_dir / "samples.csv")
    table = table[table["dataset"] == "fracatlas"]
    if fractured_only:
        table = table[table["label"] == 1]
    coco = {"images": [], "annotations": []}
    rows = []
    for k, r in enumerate(table.itertuples()):
        src = samples_dir / r.file
        folder = "Fractured" if r.label else "Non_fractured"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "images" / folder / src.name)
        with Image.open(src) as im:
            w, h = im.size
        coco["images"].append({"id": k, "file_name": src.name, "width": w, "height": h})
        for box in json.loads(r.fracture_boxes) if isinstance(r.fracture_boxes, str) else []:
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": k, "bbox": box})
        rows.append({"image_id": src.name, r.region: 1, "fractured": int(r.label)})
    pd.DataFrame(rows).fillna(0).to_csv(root / "dataset.csv", index=False)
    (root / "fracture_masks_coco.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def tiny_localiser(tmp_path_factory):
    """A randomly initialised localiser at 128 px with a complete card (choices set by hand)."""
    out = tmp_path_factory.mktemp("weights") / "tiny_localiser"
    out.mkdir()
    torch.manual_seed(0)
    model = FractureLocaliser()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    card = {"name": "tiny_localiser", "task": "fracture", "kind": "localiser", "mean": [0.5] * 3, "std": [0.5] * 3,
            "pipeline": [{"step": "standardise", "params": {}}, {"step": "otsu_crop", "params": {}},
                         {"step": "resize_pad", "params": {"size": 128}}],
            "weights_file": "model.safetensors", "image_score": {"weights": [1.0, 1.0], "bias": 0.0},
            "operating_points": {"sensitive": {"threshold": 0.2}, "balanced": {"threshold": 0.5}},
            "default_operating_point": "balanced", "region_threshold": 0.0,
            "box_operating_points": {"sensitive": {"threshold": 0.0}, "balanced": {"threshold": 0.5}}}
    (out / "card.json").write_text(json.dumps(card))
    return out


def test_the_localiser_returns_boxes_inside_the_file_tagged_with_box_operating_points(tiny_localiser, samples_dir):
    from boneai.io import read_radiograph

    predictor = load_localiser(json.loads((tiny_localiser / "card.json").read_text()), tiny_localiser)
    rg = read_radiograph(samples_dir / "fracatlas" / "IMG0000019.jpg")
    pred = predictor.predict(rg)
    assert 0 <= pred.probability <= 1 and pred.decision == (pred.probability >= 0.5)
    boxes = pred.extras["boxes"]
    assert boxes, "region threshold 0 outlines the whole map: one box at least"
    for b in boxes:
        assert 0 <= b["x0"] < b["x1"] <= rg.width and 0 <= b["y0"] < b["y1"] <= rg.height
        assert b["operating_point"] in ("sensitive", "balanced")
        assert (b["operating_point"] == "balanced") == (b["score"] >= 0.5)


@pytest.mark.parametrize("fractured_only", [False, True])
def test_evaluate_localisation_json_for_mixed_and_fractured_only_folders(tmp_path, samples_dir, tiny_localiser,
                                                                          fractured_only):
    data = _mini_fracatlas(tmp_path / "fa", samples_dir, fractured_only)
    out = tmp_path / "loc.json"
    rc = cli_main(["evaluate", "--task", "localisation", "--data", str(data), "--model", str(tiny_localiser),
                   "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    n = len(list((data / "images").rglob("*.jpg")))
    assert report["n_images"] == n
    assert report["n_fractured_images"] == len(list((data / "images" / "Fractured").glob("*.jpg")))
    assert report["n_boxes"] == len(json.loads((data / "fracture_masks_coco.json").read_text())["annotations"])
    assert 0 <= report["hit_rate"] <= 1 and 0 <= report["map50"] <= 1
    assert set(report["froc"]) == {"0.5", "1", "2"}
    assert all(0 <= v <= 1 for v in report["froc"].values())
    if fractured_only:
        assert report["auc"] is None
    else:
        assert 0 <= report["auc"] <= 1


def test_evaluate_localisation_leaves_out_a_damaged_file_and_reads_coco_names_with_folders(
        tmp_path, samples_dir, tiny_localiser):
    """A held-back folder may hold a file that cannot be read, and COCO file names with their folder."""
    plain = _mini_fracatlas(tmp_path / "plain", samples_dir)
    other = _mini_fracatlas(tmp_path / "other", samples_dir)
    coco_path = other / "fracture_masks_coco.json"
    coco = json.loads(coco_path.read_text())
    for k, img in enumerate(coco["images"]):
        img["file_name"] = ("images/Fractured/" if k % 2 else "Fractured\\") + img["file_name"]
    coco_path.write_text(json.dumps(coco))
    (other / "images" / "Fractured" / "IMG9999999.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    reports = []
    for data in (plain, other):
        out = tmp_path / f"{data.name}.json"
        assert cli_main(["evaluate", "--task", "localisation", "--data", str(data), "--model", str(tiny_localiser),
                         "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    a, b = reports
    assert a["skipped"] == [] and [s["file"] for s in b["skipped"]] == ["images/Fractured/IMG9999999.jpg"]
    for key in ("n_images", "n_fractured_images", "n_boxes", "hit_rate", "froc", "map50", "auc"):
        assert a[key] == b[key], key


def test_gradcam_baseline_gives_a_hit_rate_and_no_box_figures(tmp_path, samples_dir):
    data = _mini_fracatlas(tmp_path / "fa", samples_dir, fractured_only=True)
    out = tmp_path / "cam.json"
    assert cli_main(["evaluate", "--task", "localisation", "--method", "gradcam", "--model", "fracture_fast",
                     "--data", str(data), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0 <= report["hit_rate"] <= 1
    assert report["froc"] == {"0.5": None, "1": None, "2": None} and report["map50"] is None and report["auc"] is None


def test_predict_json_rows_carry_boxes_in_the_files_pixels(tiny_localiser, samples_dir, capsys):
    f = samples_dir / "fracatlas" / "IMG0000351.jpg"
    assert cli_main(["predict", str(f), "--model", str(tiny_localiser), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    with Image.open(f) as im:
        w, h = im.size
    assert rows[0]["boxes"] and all(b["x1"] <= w and b["y1"] <= h for b in rows[0]["boxes"])
    assert set(rows[0]["boxes"][0]) == {"x0", "y0", "x1", "y1", "score", "operating_point"}
    # A classifier gives no boxes: the list is there and empty.
    assert cli_main(["predict", str(f), "--model", "fracture_fast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["boxes"] == []


def test_boxes_are_drawn_solid_and_dashed():
    from boneai.explain import BOX_COLOURS, draw_boxes

    img = np.zeros((200, 200), np.uint8)
    out = draw_boxes(img, [{"x0": 20, "y0": 20, "x1": 100, "y1": 100, "operating_point": "balanced"},
                           {"x0": 120, "y0": 120, "x1": 190, "y1": 190, "operating_point": "sensitive"}],
                     numbered=False)
    solid = (out[60, 18:23] == BOX_COLOURS["balanced"]).all(axis=1).any()
    edge = out[125:185, 120]  # left edge of the dashed box: coloured and gaps
    coloured = (edge == BOX_COLOURS["sensitive"]).all(axis=1)
    assert solid and 0.2 < coloured.mean() < 0.8


def test_a_continued_run_records_every_earlier_stage_oldest_first(tmp_path):
    from boneai.localisation import previous_stages

    def run(name, command, continue_from=None, history=((1, True), (2, False)), stages=None):
        training = {"command": command, "train_seconds": 10.0,
                    "config": {"continue_from": str(continue_from) if continue_from else None},
                    "history": [{"epoch": e, **({"best": True} if b else {})} for e, b in history]}
        if stages is not None:
            training["previous_stages"] = stages
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps({"training": training}))
        return tmp_path / name

    first = run("first", "train first", history=((1, True), (2, True), (3, False)))
    second = run("second", "train second", first)  # an older card: no previous_stages, followed by config
    third = run("third", "train third", second, stages=[{"run": "elsewhere", "command": "recorded"}])
    assert previous_stages(None) == []
    chain = previous_stages(second)
    assert [(s["run"], s["command"], s["kept_epoch"]) for s in chain] == [
        (str(first), "train first", 2), (str(second), "train second", 1)]
    # A card that recorded its own stages is trusted as written.
    assert [s["command"] for s in previous_stages(third)] == ["recorded", "train third"]


def test_the_shipped_localiser_card_holds_every_stage_and_the_fitting_command():
    from boneai.inference import WEIGHTS_DIR

    card = json.loads((WEIGHTS_DIR / "fracture_localiser" / "card.json").read_text())
    commands = [s["command"] for s in card["training"]["previous_stages"]] + [card["training"]["command"]]
    assert all(c.startswith("python -m boneai train-localiser") for c in commands)
    assert all("--continue-from" in c for c in commands[1:]) and "--continue-from" not in commands[0]
    assert card["fitting"]["command"].startswith("python -m boneai fit-localiser")
    assert card["test"]["hit_rate"] is not None and "validation" in card


# --- the centre head (CenterNet-style boxes) ------------------------------------------------------


def test_boxes_from_centres_keeps_local_peaks_with_their_own_sizes_by_hand():
    from boneai.localisation import boxes_from_centres

    heat = np.zeros((20, 20), np.float32)
    heat[4, 5], heat[4, 6] = 0.8, 0.6     # a peak and its weaker neighbour: one box
    heat[12, 14] = 0.5                    # a second, separate peak
    heat[18, 2] = 0.05                    # under the threshold
    sizes = np.zeros((2, 20, 20), np.float32)
    sizes[:, 4, 5] = np.log([2.0, 4.0])   # 2 cells wide, 4 high
    sizes[:, 12, 14] = np.log(1.0)
    boxes = boxes_from_centres(heat, sizes, threshold=0.1, scale=4)
    # centre (5.5, 4.5) cells -> x 4.5..6.5, y 2.5..6.5 cells -> x4 pixels
    assert boxes == [[18.0, 10.0, 26.0, 26.0, pytest.approx(0.8)], [56.0, 48.0, 60.0, 52.0, pytest.approx(0.5)]]
    assert len(boxes_from_centres(heat, sizes, threshold=0.01, scale=4)) == 3
    assert boxes_from_centres(heat, sizes, threshold=0.1, scale=4, max_boxes=1) == boxes[:1]
    shrunk = boxes_from_centres(heat, sizes, threshold=0.1, scale=4, shrink=0.5)[0]
    assert shrunk[:4] == [20.0, 14.0, 24.0, 22.0]
    assert boxes_from_centres(heat, sizes, threshold=0.9) == []


def test_centre_targets_put_a_unit_peak_and_the_log_size_at_each_box_centre():
    from boneai.localisation import MAP_STRIDE, _centre_targets, _rendered_mask, mask_boxes

    boxes = np.array([[40, 20, 80, 60], [100, 100, 112, 140]], dtype=float)
    mask = _rendered_mask(boxes, (160, 160))
    assert set(np.unique(mask)) == {0, 1, 2}
    np.testing.assert_array_equal(mask_boxes(mask), boxes)
    t = _centre_targets(mask).numpy()
    assert t.shape == (4, 160 // MAP_STRIDE, 160 // MAP_STRIDE)
    # first box: centre (60, 40) px = (15, 10) cells, 10 x 10 cells
    assert t[0, 10, 15] == 1.0 and t[0].max() == 1.0 and (t[0] == 1.0).sum() == 2
    assert t[1, 10, 15] == pytest.approx(np.log(10)) and t[2, 10, 15] == pytest.approx(np.log(10))
    assert t[3, 9:12, 14:17].sum() == 9 and t[3].sum() == 18
    # second box: 3 x 10 cells, its Gaussian narrower across than along
    assert t[1, 30, 26] == pytest.approx(np.log(3)) and t[2, 30, 26] == pytest.approx(np.log(10))
    assert 0 < t[0, 30, 28] < t[0, 32, 26]
    # no boxes: no peak, no size weight
    assert _centre_targets(np.zeros((64, 64), np.uint8)).abs().sum() == 0


def test_augmentation_keeps_each_annotated_box_findable():
    from boneai.localisation import _augment_pair, _rendered_mask, mask_boxes

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (300, 260), dtype=np.uint8)
    mask = _rendered_mask(np.array([[30, 40, 90, 100], [150, 200, 200, 260]]), image.shape)
    for _ in range(10):
        _, out = _augment_pair(image, mask, 128, rng)
        assert set(np.unique(out)) <= {0, 1, 2}
        found = mask_boxes(out)
        assert len(found) >= 1 and ((found[:, 2] - found[:, 0]) > 5).all()


def test_a_one_channel_localiser_starts_a_centre_head_network_unchanged_on_its_map():
    from boneai.localisation import CENTRE_CHANNELS

    torch.manual_seed(0)
    plain = FractureLocaliser().eval()
    centred = FractureLocaliser(centre_head=True)
    centred.load_state(plain.state_dict())
    centred.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        (m1, y1), (m4, y4) = plain(x), centred(x)
    assert m4.shape[1] == CENTRE_CHANNELS
    torch.testing.assert_close(m4[:, :1], m1)
    torch.testing.assert_close(y4, y1)
    # the new heatmap starts near CenterNet's prior of 0.1
    assert 0.02 < float(torch.sigmoid(m4[:, 1]).mean()) < 0.3


@pytest.fixture(scope="module")
def tiny_centre_localiser(tmp_path_factory, tiny_localiser):
    """The tiny localiser with a centre head, drawing its boxes from centre peaks."""
    out = tmp_path_factory.mktemp("weights") / "tiny_centre_localiser"
    out.mkdir()
    torch.manual_seed(1)
    model = FractureLocaliser(centre_head=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    card = json.loads((tiny_localiser / "card.json").read_text())
    card.update({"name": "tiny_centre_localiser", "centre_head": True, "box_source": "centres",
                 "region_threshold": 0.0, "region_shrink": 1.0})
    (out / "card.json").write_text(json.dumps(card))
    return out


def test_a_centre_head_localiser_draws_its_boxes_from_the_heatmap_peaks(tiny_centre_localiser, samples_dir):
    from boneai.io import read_radiograph
    from boneai.localisation import boxes_from_centres, localised_views

    predictor = load_localiser(json.loads((tiny_centre_localiser / "card.json").read_text()), tiny_centre_localiser)
    rg = read_radiograph(samples_dir / "fracatlas" / "IMG0000019.jpg")
    view = predictor.views([rg])[0]
    assert view.centres is not None and view.centres.shape == (3,) + view.prob_map.shape
    expected = boxes_from_centres(view.centres[0], view.centres[1:], 0.0, scale=4)
    boxes = predictor.boxes(view)
    assert len(boxes) == len(expected) == 10
    assert [b["score"] for b in boxes] == [round(e[4], 4) for e in expected]
    for b in boxes:
        assert 0 <= b["x0"] < b["x1"] <= rg.width and 0 <= b["y0"] < b["y1"] <= rg.height
    # the same view through evaluate's path gives the same boxes
    cand = predictor.candidate_boxes(localised_views(predictor, [str(samples_dir / "fracatlas" / "IMG0000019.jpg")])[0])
    np.testing.assert_allclose(cand[:, 4], [e[4] for e in expected], rtol=1e-5)


def test_fit_localiser_chooses_the_box_drawing_on_validation_and_records_it(tmp_path, samples_dir, tiny_localiser,
                                                                            tiny_centre_localiser):
    import shutil as sh

    from boneai.localisation import fit_on_validation

    data = _mini_fracatlas(tmp_path / "fa", samples_dir)
    ids = pd.read_csv(data / "dataset.csv")["image_id"]
    pd.DataFrame({"image_id": ids, "group": range(len(ids)), "split": "val"}).to_csv(tmp_path / "split.csv", index=False)
    run = tmp_path / "run"
    sh.copytree(tiny_centre_localiser, run)
    card = fit_on_validation(run, data, tmp_path / "split.csv", region_thresholds=(0.3, 0.7), region_relatives=(None,),
                             region_shrinks=(1.0,), centre_thresholds=(0.05, 0.2), centre_shrinks=(1.0,),
                             command="python -m boneai fit-localiser run")
    trials = card["validation"]["region_trials"]
    assert {t["source"] for t in trials} == {"regions", "centres"} and len(trials) == 4
    best = max(trials, key=lambda t: t["hit_rate"] + t["froc"]["1"])
    assert card["box_source"] == best["source"] and card["region_threshold"] == best["threshold"]
    assert card["fitting"]["centre_grid"] == {"thresholds": [0.05, 0.2], "shrinks": [1.0]}
    assert set(card["box_operating_points"]) == {"sensitive", "balanced"}
    # a network without a centre head is offered only map regions
    plain = tmp_path / "plain"
    sh.copytree(tiny_localiser, plain)
    card = fit_on_validation(plain, data, tmp_path / "split.csv", region_thresholds=(0.3,), region_relatives=(None,),
                             region_shrinks=(1.0,), centre_thresholds=(0.05,), centre_shrinks=(1.0,))
    assert [t["source"] for t in card["validation"]["region_trials"]] == ["regions"]
    assert card["box_source"] == "regions"


# --- the classifier's own head: one forward pass for the classifier's logit and the boxes ---------


def _classifier_state():
    from boneai.models import build_model

    torch.manual_seed(3)
    clf = build_model("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():  # a head that is not near zero, so that a wrong copy would show
        clf.classifier.weight.normal_(std=0.1)
        clf.bn2.running_mean.uniform_(-0.5, 0.5)
    return clf, clf.state_dict()


@pytest.mark.parametrize("shared", [None, 3])
def test_a_classifier_head_localiser_gives_the_classifier_logit_and_learns_only_its_own_branch(shared):
    clf, state = _classifier_state()
    model = FractureLocaliser(centre_head=True, classifier_head=True, shared_blocks=shared)
    assert model.load_encoder(state) > 0
    later = [k for k in state if k.startswith("blocks.") and int(k.split(".")[1]) >= model.shared_blocks]
    assert model.load_classifier_head(state) == 8 + len(later)  # head: conv, 5 of batch norm, linear's 2
    model.eval()
    with torch.no_grad():  # the localiser's own later blocks move away from the classifier's in training
        for block in list(model.net.encoder.model.blocks)[model.shared_blocks:]:
            for p in block.parameters():
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        mask, logit = model(x)
        expected = clf(x)[:, 0]
        features, _ = model._encode(x)
        for ours, smp_s in zip(features, model.net.encoder(x), strict=True):  # the decoder sees smp's features
            torch.testing.assert_close(ours, smp_s)
    assert mask.shape == (2, 4, 24, 24)
    torch.testing.assert_close(logit, expected, rtol=1e-4, atol=1e-4)
    # whatever --freeze-blocks says, the shared trunk and the classifier's branch stay the classifier's
    for module in model.frozen_modules(0):
        module.requires_grad_(False)
    learning = {".".join(n.split(".")[1:5]) if ".blocks." in n else n.split(".")[1]
                for n, p in model.named_parameters() if p.requires_grad}
    own_blocks = {f"encoder.model.blocks.{i}" for i in range(model.shared_blocks, len(clf.blocks))}
    assert learning == {"decoder", "segmentation_head"} | own_blocks


def test_a_classifier_head_localiser_takes_only_the_decoder_of_a_localiser_with_its_own_head():
    _, state = _classifier_state()
    torch.manual_seed(0)
    plain = FractureLocaliser(centre_head=True)
    model = FractureLocaliser(centre_head=True, classifier_head=True)
    model.load_encoder(state)
    model.load_classifier_head(state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state(plain.state_dict())
    after = model.state_dict()
    for key, value in after.items():
        if key.startswith(("net.decoder.", "net.segmentation_head.")):
            torch.testing.assert_close(value, plain.state_dict()[key])
        else:  # encoder and image head: still the classifier's
            torch.testing.assert_close(value, before[key])
    # a missing head tensor is refused, not silently left at its random start
    with pytest.raises(ValueError, match="classifier head"):
        FractureLocaliser(classifier_head=True).load_classifier_head(
            {k: v for k, v in state.items() if not k.startswith("bn2.")})


def test_a_saved_classifier_head_localiser_loads_from_its_card_and_predicts_the_classifier_logit(
        tmp_path, tiny_localiser, samples_dir):
    from safetensors.torch import save_file

    from boneai.io import read_radiograph
    from boneai.preprocess import apply_pipeline
    from boneai.transforms import to_tensor

    clf, state = _classifier_state()
    model = FractureLocaliser(centre_head=True, classifier_head=True, shared_blocks=4)
    model.load_encoder(state)
    model.load_classifier_head(state)
    out = tmp_path / "shared"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    card = json.loads((tiny_localiser / "card.json").read_text())
    card.update({"name": "shared", "centre_head": True, "classifier_head": True, "shared_blocks": 4,
                 "box_source": "centres"})
    (out / "card.json").write_text(json.dumps(card))
    predictor = load_localiser(card, out)
    assert predictor.batchnorm_folded
    rg = read_radiograph(samples_dir / "fracatlas" / "IMG0000019.jpg")
    view = predictor.views([rg])[0]
    x = to_tensor(apply_pipeline(rg.pixels, card["pipeline"]), card["mean"], card["std"])[None]
    with torch.inference_mode():
        expected = float(clf(x)[0, 0])
    assert view.head_logit == pytest.approx(expected, abs=1e-3)
    assert view.centres is not None and len(predictor.boxes(view)) > 0
    # Its pooled features are the classifier's (the head's input), in the prediction and on their own.
    with torch.inference_mode():
        expected_pooled = clf.forward_head(clf.forward_features(x), pre_logits=True)[0].numpy()
    assert predictor.keeps_pooled
    np.testing.assert_allclose(view.pooled, expected_pooled, atol=2e-3)
    np.testing.assert_allclose(predictor.predict(rg).extras["pooled"], view.pooled, atol=1e-6)
    np.testing.assert_allclose(predictor.pooled([rg])[0], view.pooled, atol=1e-4)
    with torch.inference_mode():
        mask, logit = model.eval()(x)
        mask_p, logit_p, pooled = model.forward_with_pooled(x)
        head_logit, branch = model.image_head[-1](pooled)[:, 0], model.branch_pooled(x)
    torch.testing.assert_close(mask_p, mask)
    torch.testing.assert_close(logit_p, logit)
    torch.testing.assert_close(head_logit, logit)
    torch.testing.assert_close(branch, pooled)


def test_the_shipped_localiser_holds_the_shipped_classifier_s_shared_blocks_and_branch():
    """The shipped localiser's image logit is the `fracture` classifier's branch: if that classifier is
    retrained, the localiser must be rebuilt (``train-localiser --classifier-head``), or this fails."""
    from boneai.card import ModelCard
    from boneai.inference import WEIGHTS_DIR
    from boneai.predictor import read_weights

    card = ModelCard.from_dir(WEIGHTS_DIR / "fracture_localiser")
    if not card.classifier_head:
        pytest.skip("the shipped localiser has its own image head")
    ours = read_weights(WEIGHTS_DIR / "fracture_localiser" / card.weights_file)
    theirs = read_weights(WEIGHTS_DIR / "fracture" / "model.safetensors")
    shared = card.shared_blocks
    compared = 0
    for key, value in theirs.items():
        prefix, _, rest = key.partition(".")
        if prefix in ("conv_stem", "bn1") or (prefix == "blocks" and int(rest.split(".")[0]) < shared):
            mine = ours[f"net.encoder.model.{key}"]
        elif prefix == "blocks":
            index, _, tail = rest.partition(".")
            mine = ours[f"classifier_blocks.{int(index) - shared}.{tail}"]
        else:
            mine = ours[{"conv_head": "image_head.0", "bn2": "image_head.1", "classifier": "image_head.3"}[prefix]
                        + "." + rest]
        torch.testing.assert_close(mine.float(), value.float(), rtol=0, atol=0)
        compared += 1
    assert compared == len(theirs)


@pytest.mark.parametrize("input_size", [None, 96])
def test_image_logit_is_the_forward_pass_s_image_output(input_size):
    _, state = _classifier_state()
    model = FractureLocaliser(centre_head=True, classifier_head=True, shared_blocks=3,
                              classifier_input_size=input_size).eval()
    model.load_encoder(state)
    model.load_classifier_head(state)
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(model.image_logit(x), model(x)[1])
    with pytest.raises(ValueError, match="classifier's head"):
        FractureLocaliser().image_logit(x)


def test_tuning_the_classifier_branch_changes_only_that_branch_and_keeps_the_boxes(tmp_path, samples_dir, monkeypatch):
    """``--tune-classifier-branch``: the branch's weights learn on the image labels; the shared trunk, the
    localiser's blocks, decoder and heads and every batch-norm statistic stay as they were."""
    from boneai import localisation as loc
    from boneai.config import LocaliserConfig
    from boneai.predictor import read_weights

    data = _mini_fracatlas(tmp_path / "fa", samples_dir)
    frame = pd.read_csv(data / "dataset.csv")
    split = np.where(np.arange(len(frame)) % 2 == 0, "train", "val")
    pd.DataFrame({"image_id": frame["image_id"], "group": range(len(frame)), "split": split}).to_csv(
        tmp_path / "split.csv", index=False)
    common = dict(data=str(data), split=str(tmp_path / "split.csv"), init_from="weights/fracture", image_size=128,
                  centre_head=True, classifier_head=True, shared_blocks=3, classifier_input_size=96, batch_size=4,
                  threads=1)
    loc.train_localiser(LocaliserConfig(out=str(tmp_path / "start"), epochs=0, **common))
    scores = iter(range(100))  # every epoch beats the one before, so the tuned epoch is the one kept
    monkeypatch.setattr(loc, "_epoch_score", lambda figures, image_level=False: next(scores))
    with pytest.raises(ValueError, match="--classifier-head"):
        loc.train_localiser(LocaliserConfig(out=str(tmp_path / "bad"), epochs=1, tune_classifier_branch=True,
                                            **{**common, "classifier_head": False}))
    card = loc.train_localiser(LocaliserConfig(out=str(tmp_path / "tuned"), epochs=1, lr=1e-2,
                                               tune_classifier_branch=True, continue_from=str(tmp_path / "start"),
                                               negatives_per_positive=2.0, **common))
    before = read_weights(tmp_path / "start" / "model.safetensors")
    after = read_weights(tmp_path / "tuned" / "model.safetensors")
    branch = ("classifier_blocks.", "image_head.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(branch) for k in changed)
    shape = FractureLocaliser(centre_head=True, classifier_head=True, shared_blocks=3)
    norms = {f"{name}.{part}" for name, m in shape.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
             for part in ("weight", "bias", "running_mean", "running_var")}
    assert any(k.startswith(branch) for k in norms) and not changed & norms
    epochs = card["training"]["history"]
    assert [h["epoch"] for h in epochs] == [0, 1] and epochs[1].get("best")
    for key in ("hit_rate", "froc", "centres", "auc_map_peak"):  # the boxes are the starting network's
        assert epochs[1][key] == epochs[0][key]
    assert "fine-tuned on the image labels" in card["description"]
