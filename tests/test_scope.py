"""Scope and familiarity (issue 12): header rules, the shipped scope model on package files and samples,
the ``predict --json`` fields and the Study review page. Needs no shared data: samples/ and files that
pydicom and scikit-image ship."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boneai.errors import BoneAIError
from boneai.io import read_radiograph
from boneai.scope import (
    LOW_FAMILIARITY,
    SCOPE_CARD,
    UNFAMILIAR_NOTE,
    ScopeModel,
    check_views,
    colour_reason,
    colour_stats,
    header_reason,
    scope_dir,
    set_familiarity,
)
from tests.conftest import make_dicom, load_sample_gray

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FRACATLAS = sorted((SAMPLES / "fracatlas").glob("*.jpg"))


def _read(source, name: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(source, name)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scope_model() -> ScopeModel:
    if not (scope_dir() / SCOPE_CARD).is_file():
        pytest.skip("no scope model in weights/scope (train one with `python -m boneai train-scope`)")
    return ScopeModel.load()


def _pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom does not ship {name}")
    return path


def _colour_photo() -> bytes:
    skdata = pytest.importorskip("skimage.data")
    return _png(skdata.astronaut())


# -- rules -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, expected", [
    ({"modality": "CT"}, "DICOM modality CT (computed tomography)"),
    ({"modality": "MR", "body_part": "KNEE"}, "DICOM modality MR (magnetic resonance)"),
    ({"modality": "US"}, "DICOM modality US (ultrasound)"),
    ({"modality": "MG"}, "mammography"),
    ({"modality": "DX", "body_part": "CHEST"}, "chest radiograph"),
    ({"modality": "CR", "body_part": "SKULL"}, "unsupported region (DICOM body part SKULL)"),
    ({"modality": "DX", "body_part": "L SPINE"}, "unsupported region"),
])
def test_the_header_puts_other_modalities_chest_and_other_regions_out_of_scope(meta, expected) -> None:
    reason = header_reason(meta)
    assert reason is not None and expected in reason


@pytest.mark.parametrize("meta", [
    {"modality": "DX", "body_part": "HAND"}, {"modality": "CR", "body_part": "ANKLE"},
    {"modality": "DX", "body_part": "HIP"}, {"modality": "RG", "body_part": "SHOULDER"},
    {"modality": "OT"}, {"modality": None}, {},
])
def test_the_header_is_silent_or_agrees_for_radiographs_of_trained_regions(meta) -> None:
    assert header_reason(meta) is None


@pytest.mark.parametrize("description, expected", [
    ("XR CHEST PA AND LAT", "chest radiograph (DICOM description names CHEST)"),
    ("CXR portable", "chest radiograph (DICOM description names CXR)"),
    ("Ribs left", "chest radiograph"),
    ("C-Spine 3 views", "unsupported region (DICOM description names SPINE)"),
    ("OPG", "unsupported region"),
    ("HAND 3 VIEWS RT", None),
    ("Radial head view", None),  # "head" alone names no region
    ("Femoral neck", None),
    ("SHOULDER AND CHEST", None),  # a trained region named: the image model decides
    ("Trauma series", None),
])
def test_the_description_speaks_where_body_part_is_empty_and_keeps_no_other_words(description, expected) -> None:
    """Many archives leave BodyPartExamined empty and name the examination in free text only."""
    pixels = load_sample_gray("fracatlas/IMG0000351.jpg")
    rg = _read(make_dicom(pixels, extra={"BodyPartExamined": "", "StudyDescription": f"{description} Dr Smith",
                                         "SeriesDescription": "Series 1"}), "x.dcm")
    assert "Smith" not in json.dumps(rg.metadata) and "SMITH" not in json.dumps(rg.metadata)
    reason = header_reason(rg.metadata)
    assert (reason is None) if expected is None else (reason is not None and expected in reason), reason
    # BodyPartExamined, where it is given, decides.
    labelled = _read(make_dicom(pixels, extra={"BodyPartExamined": "HAND", "StudyDescription": description}), "y.dcm")
    assert header_reason(labelled.metadata) is None


def test_colour_rule_flags_a_colour_photo_and_not_grey_or_grey_stored_as_rgb() -> None:
    skdata = pytest.importorskip("skimage.data")
    assert colour_reason(colour_stats(skdata.astronaut())).startswith("colour image")
    grey = load_sample_gray("fracatlas/IMG0000351.jpg")
    assert colour_reason(colour_stats(grey)) is None
    assert colour_reason(colour_stats(np.repeat(grey[:, :, None], 3, axis=2))) is None


# -- the shipped scope model -------------------------------------------------------------------------------
def test_pydicom_ct_and_mr_test_files_are_out_of_scope_by_their_header(scope_model) -> None:
    ct, mr = _read(_pydicom_file("CT_small.dcm")), _read(_pydicom_file("MR_small.dcm"))
    res = scope_model.check([ct, mr])
    assert [r.in_scope for r in res] == [False, False]
    assert "DICOM modality CT" in res[0].reason and "DICOM modality MR" in res[1].reason
    assert {r.source for r in res} == {"header"}


def test_ct_and_mr_pixels_without_a_header_are_out_of_scope_by_the_image_model(scope_model) -> None:
    # The same slices exported as PNG: nothing in the file says CT or MR any more.
    for name in ("CT_small.dcm", "MR_small.dcm"):
        rg = _read(_png(_read(_pydicom_file(name)).pixels), name + ".png")
        res = scope_model.check([rg])[0]
        assert not res.in_scope and res.source == "image model", (name, res)
        assert "not a musculoskeletal radiograph" in res.reason


def test_a_colour_photograph_is_out_of_scope(scope_model) -> None:
    res = scope_model.check([_read(_colour_photo(), "photo.png")])[0]
    assert not res.in_scope and "photograph" in res.reason


def test_a_grey_photograph_is_out_of_scope(scope_model) -> None:
    skdata = pytest.importorskip("skimage.data")
    res = scope_model.check([_read(_png(skdata.camera()), "camera.png")])[0]
    assert not res.in_scope and res.source == "image model", res


def test_chest_and_ct_headers_win_over_radiograph_pixels(scope_model) -> None:
    pixels = load_sample_gray("fracatlas/IMG0000351.jpg")
    chest = _read(make_dicom(pixels, extra={"BodyPartExamined": "CHEST"}), "chest.dcm")
    ct = _read(make_dicom(pixels, extra={"Modality": "CT"}), "ct.dcm")
    hand = _read(make_dicom(pixels), "hand.dcm")
    res = scope_model.check([chest, ct, hand])
    assert not res[0].in_scope and res[0].reason.startswith("chest radiograph")
    assert not res[1].in_scope and "CT" in res[1].reason
    assert res[2].in_scope and res[2].reason is None


CHEST_FILM = REPO / "tests" / "data" / "chest_pydicom_rg1.png"  # pydicom-data's RG1_UNCR.dcm pixels; never fitted on


def test_a_chest_film_without_a_header_is_out_of_scope_as_a_chest_radiograph(scope_model) -> None:
    # A PA chest film from another source than the fitted chest films (tests/data/README.md), as a PNG.
    res = scope_model.check([_read(CHEST_FILM)])[0]
    assert not res.in_scope and res.source == "image model", res
    assert res.reason.startswith("looks like a chest radiograph, not a region the model was trained on"), res.reason
    assert max(res.extras["class_probabilities"], key=res.extras["class_probabilities"].get) == "chest"


def test_a_header_naming_a_trained_region_outweighs_the_chest_class(scope_model) -> None:
    # A clavicle or shoulder film shows part of the chest: where the header names the region, it decides.
    pixels = _read(CHEST_FILM).pixels.astype(np.uint8)
    views = [_read(make_dicom(pixels, extra={"BodyPartExamined": "SHOULDER"}), "shoulder.dcm"),
             _read(make_dicom(pixels, extra={"BodyPartExamined": "", "SeriesDescription": "Clavicle left"}),
                   "clavicle.dcm"),
             _read(make_dicom(pixels, extra={"BodyPartExamined": ""}), "silent.dcm")]
    res = scope_model.check(views)
    assert [r.in_scope for r in res] == [True, True, False], [r.reason for r in res]
    assert "chest radiograph" in res[2].reason
    assert res[0].radiograph_probability > 0.5 > res[2].radiograph_probability


def test_the_header_names_a_trained_region_by_body_part_or_description() -> None:
    from boneai.scope import header_names_trained_region

    assert header_names_trained_region({"body_part": "Shoulder"})
    assert header_names_trained_region({"body_part": "EXTREMITY"})
    assert header_names_trained_region({"body_part": "", "described_terms": ["CLAVICLE"]})
    assert not header_names_trained_region({"body_part": "CHEST"})
    assert not header_names_trained_region({"body_part": "", "described_terms": ["CHEST"]})
    assert not header_names_trained_region({})


def test_chest_items_carry_their_content_and_recipe_and_fitted_films_form_groups(tmp_path) -> None:
    from boneai.scope_train import chest_items

    for k in range(5):
        Image.fromarray(np.full((80, 70), 40 * k, np.uint8)).save(tmp_path / f"c{k}.png")
    (tmp_path / ".hidden.png").write_bytes(b"not read")
    fitted = chest_items(tmp_path, n_variants=2, seed=0, held_out=False, groups=2)
    held = chest_items(tmp_path, n_variants=2, seed=0, held_out=True, chain_share=1.0)
    assert len(fitted) == len(held) == 5 * 3
    assert {it.cls for it in fitted} == {"chest"} and not any(it.held_out for it in fitted)
    assert {it.source for it in fitted} == {f"chest:{tmp_path.name}-0", f"chest:{tmp_path.name}-1"}
    assert {it.source for it in held} == {f"chest_held_out:c{k}.png" for k in range(5)}
    assert all(it.held_out for it in held)
    # The same file's original has one id; its exports name the recipe, so caches never mix two recipes.
    assert fitted[0].id == held[0].id and fitted[1].id != held[1].id and ":chain1#" in held[1].id
    variant = fitted[1].make().pixels
    assert variant.ndim == 2 and variant.dtype == np.uint8 and min(variant.shape) >= 64


def test_fracatlas_and_bone_age_samples_are_in_scope_with_a_familiarity(scope_model) -> None:
    files = FRACATLAS + sorted((SAMPLES / "boneage").glob("*.png"))
    res = scope_model.check([_read(f) for f in files])
    assert [r.in_scope for r in res] == [True] * len(files), [(f.name, r.reason) for f, r in zip(files, res)]
    for r in res:
        assert 0.0 < r.familiarity <= 1.0 and isinstance(r.unfamiliar, bool)
        assert r.unfamiliar == (r.familiarity < scope_model.familiarity_threshold)


def test_the_fracture_models_own_predictions_feed_the_scope_check_without_a_second_pass(scope_model,
                                                                                       monkeypatch) -> None:
    from boneai.inference import default_model_name, load_model

    # Familiarity reads the default fracture model's own features (the localiser's classifier branch).
    assert scope_model.card["feature_model"]["name"] == default_model_name("fracture")
    predictor = load_model(scope_model.card["feature_model"]["name"])
    images = [_read(f) for f in FRACATLAS[:3]] + [_read(_colour_photo(), "photo.png")]
    separate = scope_model.check(images)
    predictions = predictor.predict_many(images)
    assert scope_model.reads_features_of(predictor) and all("pooled" in p.extras for p in predictions)
    # The predictions carry the very pooled features the feature model gives on its own.
    np.testing.assert_allclose(np.stack([p.extras["pooled"] for p in predictions]),
                               scope_model.extractor.pooled(images), atol=1e-4)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the scope check ran the encoder again")

    monkeypatch.setattr(scope_model.extractor, "pooled", no_second_pass)  # the feature model's encoder only
    monkeypatch.setattr("boneai.scope.load_scope_model", lambda weights_dir=None: scope_model)
    shared = check_views(images, predictor=predictor, predictions=predictions)
    assert [r.in_scope for r in shared] == [r.in_scope for r in separate] == [True, True, True, False]
    np.testing.assert_allclose([r.familiarity for r in shared], [r.familiarity for r in separate], atol=1e-6)
    # Another model's predictions (other weights or no pooled features) are not taken for the scope model's.
    for name in ("fracture_fast", "fracture"):
        other = load_model(name)
        assert not scope_model.reads_features_of(other)
        with pytest.raises(AssertionError, match="ran the encoder again"):
            check_views(images, predictor=other, predictions=other.predict_many(images))


def test_the_classifier_reads_imagenet_features_and_familiarity_the_fracture_model_s(scope_model) -> None:
    """``train-scope --imagenet-features``: the scope classifier reads an ImageNet network's pooled features on
    the preprocessing its card records; familiarity still reads the fracture model's own."""
    from boneai.scope import SCOPE_NETWORK_INPUT, SCOPE_NETWORKS, ImageNetFeatureExtractor, classifier_input

    if not scope_model.scope_network:
        pytest.skip("the shipped scope model reads the fracture model's features")
    clf = scope_model.card["classifier"]
    assert scope_model.scope_network in SCOPE_NETWORKS and len(clf["features_weights_sha256"]) == 64
    images = [_read(f) for f in FRACATLAS[:2]] + [_read(_colour_photo(), "photo.png")]
    extractor = scope_model.scope_extractor
    assert isinstance(extractor, ImageNetFeatureExtractor)
    assert clf["features_input"] == SCOPE_NETWORK_INPUT and extractor.pipeline == SCOPE_NETWORK_INPUT["pipeline"]
    assert extractor.input_image(images[0]).shape[:2] == (320, 320)  # not the feature model's input size
    imagenet, own = extractor.pooled(images), scope_model.extractor.pooled(images)
    assert imagenet.shape == own.shape and not np.allclose(imagenet, own)
    colour = np.stack([colour_stats(im.pixels) for im in images])
    results = scope_model.check(images)
    expected = scope_model.class_probabilities(imagenet, colour)[:, 0]
    np.testing.assert_allclose([r.radiograph_probability for r in results], expected, atol=1e-5)
    np.testing.assert_allclose([r.familiarity for r in results],
                               scope_model.familiarity(scope_model.distances(own)), atol=1e-6)
    assert classifier_input(imagenet, colour).shape[1] == scope_model.a["coef"].shape[1]
    with pytest.raises(BoneAIError, match="reads efficientnet_lite0_imagenet features"):
        scope_model.decide(own, colour, [{}] * len(images))


def test_familiarity_is_the_share_of_validation_images_at_least_as_far(scope_model) -> None:
    ref = np.sort(scope_model.a["fam_val_distances"])
    n = len(ref)
    fam = scope_model.familiarity(np.array([0.0, ref[n // 2], ref[-1] * 10]))
    assert fam[0] == 1.0
    assert fam[1] == pytest.approx((1 + n - n // 2) / (n + 1), abs=2 / n)
    assert fam[2] == pytest.approx(1 / (n + 1))
    # The threshold sits at the validation split's 99th percentile: about 1 % of it is unfamiliar.
    share = np.mean(scope_model.familiarity(ref) < scope_model.familiarity_threshold)
    assert share <= 0.011


def test_the_card_records_the_command_data_and_feature_model(scope_model) -> None:
    card = scope_model.card
    assert card["training"]["command"].startswith("python -m boneai train-scope")
    assert card["feature_model"]["sha256"] and card["feature_model"]["name"]
    assert card["data"]["held_out_sources"] and "chest" in card["data"]
    assert card["classifier"]["classes"][0] == "radiograph" and "chest" in card["classifier"]["classes"]
    assert card["data"]["chest"] and card["data"]["chest_chain_share"] == 0.0
    assert 0.0 < card["familiarity"]["threshold"] < 0.5


def test_a_set_of_views_is_unfamiliar_when_its_share_under_0_1_is_surely_above_twice_the_expected() -> None:
    """Hand-computed one-sided 95 % Clopper-Pearson lower bounds: k of k views under 0.10 gives
    0.05 ** (1 / k); 3 of 4 gives 0.2486 (the beta(3, 2) 5 % quantile)."""
    assert LOW_FAMILIARITY == 0.10
    one = set_familiarity([0.05])
    assert one.n_low == 1 and one.share_lower_bound == pytest.approx(0.05) and not one.unfamiliar  # one view never
    two = set_familiarity([0.05, 0.099])
    assert two.share_lower_bound == pytest.approx(0.05 ** 0.5) and two.unfamiliar  # 0.2236 > 0.20
    three_of_four = set_familiarity([0.01, 0.02, 0.03, 0.9])
    assert three_of_four.share_lower_bound == pytest.approx(0.24860, abs=1e-4) and three_of_four.unfamiliar
    assert not set_familiarity([0.01, 0.5, 0.6, 0.9]).unfamiliar
    # 0.10 itself is not under 0.10; None (out of scope, no score) is skipped; nothing scored: None.
    assert set_familiarity([0.10, 0.10]).n_low == 0
    assert set_familiarity([None, 0.05, None, 0.05]).n == 2
    assert set_familiarity([None]) is None and set_familiarity([]) is None
    # The expected share of images like the training source's does not flag even a large set.
    assert not set_familiarity([0.05] * 12 + [0.5] * 88).unfamiliar
    assert "unlike the model's training images: 2 of 2 views" in two.message("views")
    assert "not shown to be unlike" in set_familiarity([0.5, 0.6]).message("views")


def test_only_a_fracture_study_s_views_in_scope_carry_familiarity_into_the_log_the_sr_and_the_study_rule() -> None:
    """Familiarity reads the fracture model's features: a bone-age study records none (its SR and log would
    otherwise show another model's familiarity), and a view out of scope does not count."""
    from boneai.scope import ScopeResult, study_familiarity, view_familiarities

    scopes = [ScopeResult(in_scope=True, familiarity=0.02), ScopeResult(in_scope=False, familiarity=0.03),
              ScopeResult(in_scope=True, familiarity=0.05)]
    assert view_familiarities(scopes, "fracture") == [0.02, None, 0.05]
    assert view_familiarities(scopes, "boneage") is None and study_familiarity(scopes, "boneage") is None
    together = study_familiarity(scopes, "fracture")
    assert together.n == 2 and together.n_low == 2 and together.unfamiliar


def test_predict_warns_when_the_files_together_are_unfamiliar(monkeypatch, capsys) -> None:
    from boneai.cli import main as cli_main

    def rows(familiarities):
        return [{"file": f"{i}.png", "ok": True, "in_scope": True, "familiarity": f, "unfamiliar": f < 0.01,
                 "probability": 0.1, "decision": "no fracture", "threshold": 0.2, "operating_point": "balanced",
                 "error": None, "scope_reason": None} for i, f in enumerate(familiarities)]

    monkeypatch.setattr("boneai.batch.predict_files", lambda *a, **k: rows([0.02, 0.05, 0.08, 0.3]))
    assert cli_main(["predict", "a.png", "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 4  # the JSON rows are unchanged
    assert out.err.startswith("warning: Taken together, these files are unlike") and "3 of 4 files" in out.err
    monkeypatch.setattr("boneai.batch.predict_files", lambda *a, **k: rows([0.02, 0.3, 0.5, 0.7]))
    assert cli_main(["predict", "a.png"]) == 0
    assert capsys.readouterr().err == ""


def test_without_a_scope_model_the_rules_still_apply(tmp_path) -> None:
    ct = _read(_pydicom_file("CT_small.dcm"))
    hand = _read(FRACATLAS[0])
    res = check_views([ct, hand], weights_dir=tmp_path)
    assert not res[0].in_scope and "CT" in res[0].reason
    assert res[1].in_scope and res[1].familiarity is None and res[1].unfamiliar is None


def test_other_chain_items_are_radiographs_re_imaged_each_with_its_own_look(tmp_path) -> None:
    """``train-scope --other-chain``: training radiographs as other sites export them, still in scope."""
    import pandas as pd

    from boneai.scope_train import other_chain_items
    from boneai.site_sim import HARSH

    root = tmp_path / "fa"
    (root / "images" / "Fractured").mkdir(parents=True)
    rows = []
    for k, path in enumerate(FRACATLAS[:4]):
        (root / "images" / "Fractured" / path.name).write_bytes(path.read_bytes())
        rows.append({"image_id": path.name, "hand": 1, "fractured": 1})
    pd.DataFrame(rows).to_csv(root / "dataset.csv", index=False)
    split = tmp_path / "split.csv"
    pd.DataFrame({"image_id": [r["image_id"] for r in rows], "group": range(4),
                  "split": ["train", "train", "train", "test"]}).to_csv(split, index=False)

    items = other_chain_items(root, split, "train", 2, 7, "fracatlas:train_other_chain", held_out=False)
    assert len(items) == 2 and len({it.id for it in items}) == 2
    assert all(it.cls == "radiograph" and it.source == "fracatlas:train_other_chain" and not it.held_out
               for it in items)
    again = other_chain_items(root, split, "train", 2, 7, "fracatlas:train_other_chain", held_out=False)
    assert [it.id for it in again] == [it.id for it in items]
    first = items[0].make()
    np.testing.assert_array_equal(first.pixels, again[0].make().pixels)  # the same look and noise again
    original = _read(root / "images" / "Fractured" / items[0].id.rsplit(":", 1)[1])
    assert first.pixels.ndim == 2 and max(first.pixels.shape) < max(original.pixels.shape)  # a smaller export
    assert items[0].id.split(":")[2] != items[1].id.split(":")[2]  # each image its own drawn look
    fixed = other_chain_items(root, split, "test", None, 0, "x", held_out=True, look=HARSH)
    assert len(fixed) == 1 and fixed[0].held_out and max(fixed[0].make().pixels.shape) <= 136 * 1.1 + 1


# -- command line -----------------------------------------------------------------------------------------
def test_predict_json_has_scope_fields_and_out_of_scope_rows_have_no_finding(tmp_path, scope_model) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(_colour_photo())
    files = [str(FRACATLAS[0]), _pydicom_file("CT_small.dcm"), str(photo)]
    proc = subprocess.run([sys.executable, "-m", "boneai", "predict", *files, "--json"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    hand, ct, colour = rows
    for r in rows:
        assert {"in_scope", "scope_reason", "familiarity", "unfamiliar"} <= set(r) and r["ok"] and r["error"] is None
        assert isinstance(r["familiarity"], float) and 0.0 <= r["familiarity"] <= 1.0
        assert isinstance(r["unfamiliar"], bool)
    assert hand["in_scope"] is True and hand["scope_reason"] is None
    assert 0.0 <= hand["probability"] <= 1.0 and hand["decision"] in ("fracture", "no fracture")
    for r, word in ((ct, "CT"), (colour, "colour")):
        assert r["in_scope"] is False and word in r["scope_reason"]
        assert r["probability"] is None and r["decision"] is None

    lines = subprocess.run([sys.executable, "-m", "boneai", "predict", files[1]], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert lines.returncode == 0 and "out of scope: DICOM modality CT" in lines.stdout


# -- Study review ----------------------------------------------------------------------------------------
@pytest.fixture()
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BONEAI_REVIEW_DB", str(tmp_path / "reviews.sqlite"))
    monkeypatch.setenv("BONEAI_JOBS_DIR", str(tmp_path / "jobs"))
    return tmp_path


def test_study_review_greys_an_out_of_scope_upload_with_its_reason_and_show_anyway_is_audited(
        isolated_state, scope_model) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from streamlit.testing.v1 import AppTest

    from boneai.inference import default_model_name, load_model
    from boneai.store import ReviewStore

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300).run()
    at.radio(key="review_source").set_value("Upload files").run()
    hand = FRACATLAS[0]
    at.file_uploader(key="review_upload").set_value([
        ("Doe_John.png", _colour_photo(), "image/png"),  # an upload name is never logged
        (hand.name, hand.read_bytes(), "image/jpeg"),
    ]).run()
    assert not at.exception, [e.value for e in at.exception]
    from ui.common import plain

    errors = [e.value for e in at.error]  # markdown-escaped, as every shown text
    assert len(errors) == 1 and plain("Out of scope: colour image") in errors[0] and "No finding" in errors[0]
    p_hand = load_model(default_model_name("fracture")).predict(_read(hand)).probability  # the page's model
    probabilities = [m.value for m in at.main.metric if m.label == "Probability"]
    assert probabilities == [f"{p_hand:.3f}"]  # the photo has no probability
    assert [m.value for m in at.main.metric if m.label == "Study probability"] == [f"{p_hand:.3f}"]

    at.toggle(key=next(t.key for t in at.toggle if t.label == "Show anyway")).set_value(True).run()
    assert not at.exception
    assert len([m for m in at.main.metric if m.label == "Probability"]) == 2
    audit = ReviewStore(isolated_state / "reviews.sqlite").audit_log()
    shown = audit[audit["action"] == "show-anyway"]
    detail = shown["detail"].iloc[0]
    assert len(shown) == 1 and detail.startswith("view 1 ") and "colour image" in detail and "Doe" not in detail


def test_study_review_notes_an_unfamiliar_view_next_to_its_finding(isolated_state, scope_model,
                                                                  monkeypatch) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from streamlit.testing.v1 import AppTest

    from boneai.scope import load_scope_model

    # Every view unfamiliar: the familiarity threshold of the app's (cached) scope model above 1.
    monkeypatch.setattr(load_scope_model(), "familiarity_threshold", 1.01)
    mirrored = load_sample_gray("fracatlas/IMG0000597.jpg")[:, ::-1].copy()  # bytes no other test uploads
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300).run()
    at.radio(key="review_source").set_value("Upload files").run()
    at.file_uploader(key="review_upload").set_value([("mirrored.png", _png(mirrored), "image/png")]).run()
    assert not at.exception
    assert [m.label for m in at.main.metric if m.label == "Probability"] == ["Probability"]
    notes = [w.value for w in at.warning if UNFAMILIAR_NOTE in w.value]
    assert len(notes) == 1 and notes[0].startswith("Unfamiliar image (familiarity ")


def test_study_review_notes_a_study_whose_views_together_are_unfamiliar(isolated_state, scope_model,
                                                                       monkeypatch) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from streamlit.testing.v1 import AppTest

    from ui.common import plain

    hand = FRACATLAS[0]
    other = FRACATLAS[1]
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300).run()
    at.radio(key="review_source").set_value("Upload files").run()
    at.file_uploader(key="review_upload").set_value([(hand.name, hand.read_bytes(), "image/jpeg"),
                                                     (other.name, other.read_bytes(), "image/jpeg")]).run()
    assert not at.exception
    study_note = plain("Taken together, these views are unlike")
    assert not [w for w in at.warning if study_note in w.value]
    # Every view counted as of low familiarity: the two views together are unlike the training images.
    monkeypatch.setattr("boneai.scope.LOW_FAMILIARITY", 1.01)
    at.run()
    assert not at.exception
    notes = [w.value for w in at.warning if study_note in w.value]
    assert len(notes) == 1 and "2 of 2 views" in notes[0] and plain("Site validation") in notes[0]
