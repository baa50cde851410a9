"""Every page of the app through Streamlit's AppTest, driving real widgets and checking shown numbers.

The app runs against the models in the weights folder (``BONEAI_WEIGHTS_DIR`` or weights/); the
review log and the jobs folder are redirected to temporary paths for each test.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneai import evaluate as ev
from boneai import inference
from boneai.io import read_radiograph
from boneai.store import ReviewStore, view_label

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `streamlit run` puts the app's folder on the path; do the same here
    sys.path.insert(0, str(REPO))

from ui.common import plain  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

TIMEOUT = 300  # the first run imports torch and loads the model on a busy 2-core machine


def _card(task: str) -> dict[str, Any] | None:
    cards = inference.available_models(task)
    if not cards:
        return None
    try:
        name = inference.default_model_name(task)
    except Exception:
        return cards[0]
    return next((c for c in cards if c["name"] == name), cards[0])


@pytest.fixture(scope="module")
def fracture_card() -> dict[str, Any]:
    card = _card("fracture")
    if card is None:
        pytest.skip(f"no fracture model in {inference.WEIGHTS_DIR}: the shipped weights are missing "
                    "(or set BONEAI_WEIGHTS_DIR to a folder with one)")
    return card


@pytest.fixture(scope="module")
def fracture_predictor(fracture_card):
    return inference.load_model(fracture_card["dir"])


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BONEAI_REVIEW_DB", str(tmp_path / "reviews.sqlite"))
    monkeypatch.setenv("BONEAI_JOBS_DIR", str(tmp_path / "jobs"))
    return tmp_path


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT).run()
    if page:
        at.switch_page(page).run()
    _no_exception(at)
    return at


def _no_exception(at: AppTest) -> None:
    assert not at.exception, "\n".join(f"{e.value}\n{''.join(e.stack_trace)}" for e in at.exception)


def _metrics(at: AppTest, label: str) -> list[str]:
    return [m.value for m in at.main.metric if m.label == label]


def _radio(at: AppTest, label_start: str):
    return next(r for r in at.radio if r.label.startswith(label_start))


def _button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def _all_text(at: AppTest) -> str:
    parts: list[str] = []
    for kind in ("markdown", "text", "caption", "error", "warning", "info", "success", "json", "code", "title",
                 "subheader", "header"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    parts += [e.value.to_csv() for e in at.dataframe if isinstance(e.value, pd.DataFrame)]
    return "\n".join(parts)


def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(path)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# -- study review ------------------------------------------------------------------------------------
STUDY = REPO / "samples" / "studies" / "study1_positive"


def test_first_page_shows_the_bundled_study_with_the_predictors_numbers(fracture_card, fracture_predictor) -> None:
    at = _app()
    assert at.title[0].value == "Study review"
    assert any("not a medical device" in w.value for w in at.sidebar.warning)
    files = sorted(STUDY.iterdir())
    preds = fracture_predictor.predict_many([_read(f) for f in files])
    assert _metrics(at, "Probability") == [f"{p.probability:.3f}" for p in preds]
    assert [t.value for t in at.text if t.value.startswith("View ")] == [f"View {i + 1}: {f.name}" for i, f in enumerate(files)]
    mean = ev.aggregate_study([p.probability for p in preds], "mean")
    assert _metrics(at, "Study probability") == [f"{mean:.3f}"]
    balanced = fracture_predictor.threshold("balanced")
    assert _metrics(at, "Threshold") == [f"{balanced:.3f}"]
    assert _metrics(at, "Study decision") == ["fracture" if mean >= balanced else "no fracture"]

    at.radio(key="review_aggregation").set_value("max").run()
    assert _metrics(at, "Study probability") == [f"{max(p.probability for p in preds):.3f}"]


def test_operating_points_and_custom_threshold_change_the_decisions(fracture_predictor) -> None:
    at = _app()
    op = at.radio(key="review_op_fracture")
    points = fracture_predictor.operating_points
    assert op.options == [f"{k} ({v:.3f})" for k, v in points.items()] + ["custom"]
    op.set_value("sensitive").run()
    assert _metrics(at, "Threshold") == [f"{fracture_predictor.threshold('sensitive'):.3f}"]
    at.radio(key="review_op_fracture").set_value("custom").run()
    at.slider(key="review_threshold_fracture").set_value(0.0).run()
    assert set(_metrics(at, "Decision")) == {"fracture"}
    assert _metrics(at, "Threshold") == ["0.000"]
    at.slider(key="review_threshold_fracture").set_value(1.0).run()
    assert set(_metrics(at, "Decision")) == {"no fracture"}
    _no_exception(at)


def test_heatmaps_toggle_method_and_hot_spot() -> None:
    """A classifier chosen in the sidebar (here ``fracture``): Grad-CAM-family heatmaps, their method and hot spot."""
    explain = pytest.importorskip("boneai.explain")
    fracture_predictor = inference.load_model("fracture")  # the weights/fracture folder, not the task's default
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.session_state["chosen_model_fracture"] = "fracture"
    at.run()
    at.selectbox(key="review_sample_fracture").set_value("Single view IMG0000019.jpg, hand").run()
    assert at.toggle(key="review_heatmaps").value is True
    default = explain.DEFAULT_CAM_METHOD
    assert at.selectbox(key="review_cam_method").value == default
    heat = explain.explain(fracture_predictor, _read(REPO / "samples/fracatlas/IMG0000019.jpg"), method=default)
    captions = [c.value for c in at.caption if c.value.startswith("Heatmap")]
    assert captions == [f"Heatmap ({default}), hottest point at x={heat.peak[0]}, y={heat.peak[1]}"]
    assert len(at.main.image) == 1

    other = "eigencam" if default != "eigencam" else "gradcam"
    at.selectbox(key="review_cam_method").set_value(other).run()
    assert [c.value for c in at.caption if c.value.startswith("Heatmap")][0].startswith(f"Heatmap ({other})")
    at.slider(key="review_opacity").set_value(0.7).run()
    at.toggle(key="review_heatmaps").set_value(False).run()
    assert not [c.value for c in at.caption if c.value.startswith("Heatmap")]
    assert len(at.main.image) == 1  # the plain radiograph stays
    _no_exception(at)


def test_uploads_bad_and_oversized_files_get_an_error_and_the_rest_is_processed(fracture_predictor) -> None:
    at = _app()
    at.radio(key="review_source").set_value("Upload files").run()
    good = (REPO / "samples/fracatlas/IMG0000597.jpg").read_bytes()
    huge = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(huge, format="PNG")  # 90 MP declared, a few kB on disk
    at.file_uploader(key="review_upload").set_value([
        ("<b>notes</b>.png", b"this is not an image", "image/png"),
        ("hand.jpg", good, "image/jpeg"),
        ("bomb.png", huge.getvalue(), "image/png"),
    ]).run()
    _no_exception(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 2
    assert errors[0] == plain("File is not an image or DICOM we can read (PNG, JPEG or DICOM expected): <b>notes</b>.png.")
    assert "\\<b\\>notes\\</b\\>" in errors[0]  # shown as typed, never as markup
    assert "over the 80 MP limit" in errors[1] and "bomb" in errors[1]
    expected = fracture_predictor.predict(_read(REPO / "samples/fracatlas/IMG0000597.jpg")).probability
    assert _metrics(at, "Probability") == [f"{expected:.3f}"]


def test_dicom_safe_metadata_is_shown_and_identifiers_never(dicom_bytes, patient_identifiers) -> None:
    at = _app()
    at.radio(key="review_source").set_value("Upload files").run()
    pixels = (np.add.outer(np.arange(256), np.arange(256)) * 64).astype(np.uint16)
    data = dicom_bytes(pixels, window=(16000, 32000), extra={"Manufacturer": "Acme <i>X</i>"})
    at.file_uploader(key="review_upload").set_value([("wrist.dcm", data, "application/dicom")]).run()
    _no_exception(at)
    shown = [e.value for e in at.json]
    meta = json.loads(shown[0]) if isinstance(shown[0], str) else shown[0]
    assert meta["format"] == "DICOM" and meta["modality"] == "DX" and meta["body_part"] == "HAND"
    assert meta["manufacturer"] == "Acme <i>X</i>"  # as text inside st.json
    text = _all_text(at)
    for value in list(patient_identifiers.values()) + ["St Elsewhere", "House^Gregory", "Doe"]:
        assert value not in text


def test_an_extensionless_dicom_from_an_archive_export_is_accepted(dicom_bytes) -> None:
    at = _app()
    at.radio(key="review_source").set_value("Upload files").run()
    uploader = at.file_uploader(key="review_upload")
    assert not list(uploader.proto.type)  # no extension filter in the browser's file chooser
    pixels = (np.add.outer(np.arange(256), np.arange(256)) * 64).astype(np.uint16)
    uploader.set_value([("IM000001", dicom_bytes(pixels, window=(16000, 32000)), "application/octet-stream")]).run()
    _no_exception(at)
    # Read as DICOM: the only message is the scope check's on this synthetic gradient, not a read error.
    [message] = [e.value for e in at.error]
    assert message.startswith("Out of scope") and "not an image" not in message


def test_recording_a_review_puts_it_in_the_log(isolated_state, fracture_card, fracture_predictor) -> None:
    at = _app()
    _button(at, "Save to review log").click().run()
    assert at.error[0].value.startswith("Choose agree")  # no decision chosen yet
    # Widgets inside a form take effect with the submit, not before.
    _radio(at, "Do you agree").set_value("disagree")
    next(t for t in at.text_area if t.label.startswith("Note")).input("Lateral view shows a cortical break")
    label = next(t for t in at.text_input if t.label == "Study label").value
    _button(at, "Save to review log").click().run()
    _no_exception(at)
    assert at.success[0].value.startswith("Saved to the review log as review #1")

    df = ReviewStore(isolated_state / "reviews.sqlite").query()
    assert len(df) == 1
    row = df.iloc[0]
    files = sorted(STUDY.iterdir())
    probs = [p.probability for p in fracture_predictor.predict_many([_read(f) for f in files])]
    assert row["study_id"] == label and row["reviewer_decision"] == "disagree"
    assert row["views"] == [view_label(i, f.read_bytes()) for i, f in enumerate(files, 1)]  # never file names
    assert row["view_probabilities"] == pytest.approx(probs, abs=1e-6)
    assert row["model_name"] == fracture_card["name"] and row["operating_point"] == "balanced"
    assert row["note"] == "Lateral view shows a cortical break"
    assert row["reviewer"] == "local"  # single-user mode: nobody signs in
    from boneai.scope import check_views

    expected = [r.familiarity for r in check_views([_read(f) for f in files])]  # every sample view is in scope
    assert row["view_familiarities"] == pytest.approx(expected, abs=1e-4)

    at.switch_page("pages/review_log.py").run()
    _no_exception(at)
    shown = at.dataframe[0].value
    assert shown["study_id"].tolist() == [label]
    assert shown["reviewer_decision"].tolist() == ["disagree"]


def test_bone_age_mode_needs_sex_and_shows_the_predictors_months() -> None:
    card = _card("boneage")
    if card is None:
        pytest.skip("no bone-age model in the weights folder")
    predictor = inference.load_model(card["dir"])
    at = _app()
    at.radio(key="review_task").set_value("boneage").run()
    _no_exception(at)
    sample = "Single view 1685.png"
    options = at.selectbox(key="review_sample_boneage").options
    at.selectbox(key="review_sample_boneage").set_value(next(o for o in options if o.startswith(sample))).run()
    table = pd.read_csv(REPO / "samples/samples.csv").set_index("file")
    male = str(table.loc["boneage/1685.png", "male"]).lower() in ("true", "1")
    assert at.radio(key="review_sex").value == ("male" if male else "female")  # from samples.csv
    months = predictor.predict(_read(REPO / "samples/boneage/1685.png"), male=male).boneage_months
    assert _metrics(at, "Bone age (months)") == [f"{months:.1f}"]
    at.radio(key="review_sex").set_value("female" if male else "male").run()
    other = predictor.predict(_read(REPO / "samples/boneage/1685.png"), male=not male).boneage_months
    assert _metrics(at, "Bone age (months)") == [f"{other:.1f}"]


def test_anomaly_mode_shows_scores_and_error_maps() -> None:
    card = _card("anomaly")
    if card is None:
        pytest.skip("no anomaly model in the weights folder")
    predictor = inference.load_model(card["dir"])
    at = _app()
    at.radio(key="review_task").set_value("anomaly").run()
    _no_exception(at)
    files = sorted(STUDY.iterdir())
    preds = predictor.predict_many([_read(f) for f in files])
    assert _metrics(at, "Anomaly score") == [f"{p.anomaly_score:.4g}" for p in preds]
    assert _metrics(at, "Decision") == ["abnormal" if p.decision else "normal" for p in preds]
    mean = ev.aggregate_study([p.anomaly_score for p in preds], "mean")
    assert _metrics(at, "Study anomaly score") == [f"{mean:.4g}"]
    if at.toggle(key="review_heatmaps").value:
        assert len([c for c in at.caption if c.value.startswith("Heatmap (reconstruction error)")]) == len(files)


# -- preprocessing inspector -------------------------------------------------------------------------
def _step_names(at: AppTest) -> list[str]:
    return [m.value.strip("*") for m in at.main.markdown if m.value.startswith("**")]


def test_preprocessing_inspector_follows_the_card_and_reacts_to_every_control(fracture_card) -> None:
    at = _app("pages/preprocessing.py")
    card_steps = [s["step"].replace("_", " ") for s in fracture_card["pipeline"]]
    assert _step_names(at) == card_steps
    assert "exactly the model's input" in at.success[0].value
    size = fracture_card["input_size"]
    assert any(f"tensor shape (1, 3, {size}, {size})" in t.value for t in at.text)

    k = fracture_card["name"]
    at.toggle(key=f"pre_clahe_{k}").set_value(True).run()
    at.slider(key=f"pre_clip_{k}").set_value(4.0).run()
    assert "clahe" in _step_names(at)
    assert any("clip_limit=4.0" in c.value for c in at.caption)
    assert any("differ from the model card" in w.value for w in at.warning)

    at.toggle(key=f"pre_segment_{k}").set_value(True).run()
    assert "segment foreground" in _step_names(at)
    assert any("mask covers" in c.value for c in at.caption)
    at.toggle(key=f"pre_sharpen_{k}").set_value(True).run()
    assert "laplacian sharpen" in _step_names(at)
    at.toggle(key=f"pre_crop_{k}").set_value(False).run()
    assert "otsu crop" not in _step_names(at)
    assert _step_names(at)[-1] == card_steps[-1]  # the final resize stays last
    _no_exception(at)


# -- model performance -------------------------------------------------------------------------------
def test_performance_threshold_slider_updates_every_metric(fracture_card) -> None:
    at = _app("pages/performance.py")
    df = pd.read_csv(Path(fracture_card["dir"]) / "val_predictions.csv")
    name = fracture_card["name"]
    at.selectbox(key="perf_model").set_value(name).run()
    # The test split comes first when the card has one; the validation split is labelled as such.
    if (Path(fracture_card["dir"]) / "test_predictions.csv").is_file():
        assert at.radio(key=f"perf_split_{name}").value == "test"
        test = pd.read_csv(Path(fracture_card["dir"]) / "test_predictions.csv")
        assert _metrics(at, "ROC AUC") == [f"{ev.roc_auc(test['label'], test['probability']):.3f}"]
        at.radio(key=f"perf_split_{name}").set_value("validation").run()
        assert any("Validation figures" in w.value for w in at.warning)
    at.slider(key=f"perf_threshold_{name}").set_value(0.3).run()
    _no_exception(at)
    m = ev.threshold_metrics(df["label"].to_numpy(), df["probability"].to_numpy(), 0.3)
    for label, key in (("Sensitivity", "sensitivity"), ("Specificity", "specificity"), ("PPV", "ppv"),
                       ("NPV", "npv"), ("F1", "f1"), ("Cohen's kappa", "kappa")):
        expected = "n/a" if np.isnan(m[key]) else f"{m[key]:.3f}"
        assert _metrics(at, label) == [expected], label
    assert at.radio(key=f"perf_preset_{name}").value == "custom"
    confusion = at.dataframe[0].value
    assert confusion.loc["truth: positive", "model: positive"] == m["tp"]
    assert confusion.loc["truth: negative", "model: negative"] == m["tn"]
    regions = at.dataframe[1].value
    expected_regions = ev.per_group_metrics(df, "region", 0.3)
    assert regions["region"].tolist() == expected_regions["region"].tolist()
    assert regions["sensitivity"].tolist() == pytest.approx(expected_regions["sensitivity"].tolist(), nan_ok=True)

    at.radio(key=f"perf_preset_{name}").set_value("sensitive").run()
    sensitive = fracture_card["operating_points"]["sensitive"]["threshold"]
    assert at.slider(key=f"perf_threshold_{name}").value == pytest.approx(sensitive)
    m = ev.threshold_metrics(df["label"].to_numpy(), df["probability"].to_numpy(), sensitive)
    assert _metrics(at, "Sensitivity") == [f"{m['sensitivity']:.3f}"]
    charts = [c for c in at.main.get("plotly_chart") if c.key != "perf_froc"]  # FROC: the localisation section
    assert len(charts) == 4  # confusion, ROC, PR, calibration
    roc = json.loads(charts[1].proto.spec)
    marker = roc["data"][-1]
    assert marker["x"][0] == pytest.approx(1 - m["specificity"]) and marker["y"][0] == pytest.approx(m["sensitivity"])


def test_performance_bone_age_scatter_and_mae() -> None:
    card = _card("boneage")
    if card is None or not (Path(card["dir"]) / "val_predictions.csv").is_file():
        pytest.skip("no bone-age model with validation predictions")
    at = _app("pages/performance.py")
    at.selectbox(key="perf_model").set_value(card["name"]).run()
    _no_exception(at)
    df = pd.read_csv(Path(card["dir"]) / "val_predictions.csv")
    r = ev.regression_metrics(df["boneage_months"], df["predicted_months"])
    assert _metrics(at, "MAE (months)") == [f"{r['mae']:.2f}"]
    assert len(at.main.get("plotly_chart")) == 1


# -- training ----------------------------------------------------------------------------------------
def _fake_train(epochs_printed: int, total: int, copy_from: Path | None = None, sleep: float = 60) -> list[str]:
    """Arguments for a stand-in of the train command: epoch lines like it, optionally a finished run."""
    lines = [json.dumps({"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_auc": 0.6 + e / 100})
             for e in range(1, epochs_printed + 1)]
    code = ("import json, shutil, sys, time\n"
            f"for l in {lines!r}: print(l, flush=True)\n"
            "if len(sys.argv) > 2: shutil.copytree(sys.argv[2], sys.argv[1])\n"
            f"time.sleep({sleep if copy_from is None else 0})\n")
    return ["-c", code, "{run_dir}"] + ([str(copy_from)] if copy_from else [])


def test_training_form_refuses_a_missing_data_folder() -> None:
    at = _app("pages/training.py")
    at.radio(key="train_task").set_value("fracture").run()
    assert at.selectbox(key="train_model_fracture").options  # architectures from the registry
    at.text_input(key="train_data_fracture").input("/no/such/folder")
    _button(at, "Start training").click().run()
    _no_exception(at)
    assert at.error[0].value == plain("Data folder not found: /no/such/folder.")


def test_training_form_offers_the_shipped_model_for_fine_tuning_and_refuses_a_mismatch() -> None:
    at = _app("pages/training.py")
    at.radio(key="train_task").set_value("fracture").run()
    parent = at.selectbox(key="train_parent_fracture")
    assert parent.options[0].startswith("its initial weights")
    assert "fine-tune fracture_fast (efficientnet_lite0, 224 px)" in parent.options
    # An ensemble is fine-tuned one member at a time, never as a whole; it can teach a whole student.
    assert "fine-tune member 1 of fracture_ensemble (efficientnet_lite0, 384 px)" in parent.options
    assert not any(o.startswith("fine-tune fracture_ensemble") for o in parent.options)
    teacher = at.selectbox(key="train_teacher_fracture")
    assert teacher.options[0].startswith("no teacher") and any(o.startswith("fracture_ensemble (Average of 2")
                                                                 for o in teacher.options)
    from boneai.inference import available_models

    shipped = next(c["dir"] for c in available_models("fracture") if c["name"] == "fracture_fast")
    at.text_input(key="train_data_fracture").input(str(REPO / "samples"))
    at.selectbox(key="train_model_fracture").set_value("resnet18")
    parent.set_value(shipped)
    _button(at, "Start training").click().run()
    _no_exception(at)
    assert "choose that architecture" in at.error[0].value


def test_training_page_follows_a_running_job_and_cancels_it(isolated_state) -> None:
    from boneai.jobs import JobRunner

    runner = JobRunner(isolated_state / "jobs")
    job = runner.start_command(_fake_train(2, 5), epochs_total=5)
    try:
        import time

        deadline = time.monotonic() + 30
        while runner.status(job.id).epochs_done < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        at = _app("pages/training.py")
        assert _metrics(at, "Epoch") == ["2 / 5"]
        assert _metrics(at, "Validation AUC") == ["0.620"]
        assert _metrics(at, "State") == ["running"]
        # A second job is refused while this one runs.
        at.text_input(key="train_data_fracture").input(str(REPO / "samples"))
        _button(at, "Start training").click().run()
        assert "already running" in at.error[0].value
        _button(at, "Cancel job").click().run()
        assert runner.wait(job.id, timeout=30).state == "cancelled"
        at.run()
        assert _metrics(at, "State") == ["cancelled"]
        assert any("cancelled" in w.value for w in at.warning)
    finally:
        runner.cancel(job.id)


def test_a_finished_job_shows_results_and_registers_its_weights(isolated_state, fracture_card,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from boneai.jobs import JobRunner

    weights = isolated_state / "weights"
    weights.mkdir()
    (weights / fracture_card["name"]).symlink_to(Path(fracture_card["dir"]).resolve())
    monkeypatch.setattr(inference, "WEIGHTS_DIR", weights)
    run = isolated_state / "finished-run"
    run.mkdir()
    for f in ("card.json", "model.safetensors", "val_predictions.csv"):
        shutil.copy(Path(fracture_card["dir"]) / f, run / f)
    runner = JobRunner(isolated_state / "jobs")
    job = runner.start_command(_fake_train(3, 3, copy_from=run), epochs_total=3)
    assert runner.wait(job.id, timeout=60).state == "succeeded"

    at = _app("pages/training.py")
    _no_exception(at)
    assert _metrics(at, "State") == ["succeeded"]
    assert _metrics(at, "Epoch") == ["3 / 3"]
    assert len(at.main.get("plotly_chart")) == 3  # loss curves, ROC, confusion matrix
    at.text_input(key="register_name").input("my-new-model")
    _button(at, "Register weights").click().run()
    _no_exception(at)
    assert (weights / "my-new-model" / "card.json").is_file()
    assert at.success[0].value.startswith("Registered as my-new-model")
    # The review page can select it: a new session's sidebar offers it.
    assert "my-new-model" in _app().sidebar.selectbox(key="model_fracture").options


# -- review log --------------------------------------------------------------------------------------
def test_review_log_filters_and_export(isolated_state) -> None:
    store = ReviewStore(isolated_state / "reviews.sqlite")
    for study, model, decision in (("S-a", "fracture", "agree"), ("S-b", "fracture", "disagree"),
                                   ("S-c", "other", "uncertain")):
        store.add(study_id=study, views=[f"{study}.png"], model_name=model, model_version="v", task="fracture",
                  view_probabilities=[0.5], reviewer_decision=decision, note="<script>alert(1)</script>")
    at = _app("pages/review_log.py")
    assert _metrics(at, "Reviews shown") == ["3"]
    assert _metrics(at, "Agreement") == ["33%"]
    at.multiselect(key="log_decisions").set_value(["agree", "uncertain"]).run()
    assert sorted(at.dataframe[0].value["study_id"]) == ["S-a", "S-c"]
    at.multiselect(key="log_models").set_value(["other"]).run()
    assert at.dataframe[0].value["study_id"].tolist() == ["S-c"]
    at.multiselect(key="log_models").set_value([]).run()
    at.text_input(key="log_study").input("S-a").run()
    assert _metrics(at, "Reviews shown") == ["1"]
    assert at.dataframe[0].value["note"].tolist() == ["<script>alert(1)</script>"]  # a cell, as text
    assert at.get("download_button")[0].proto.label == "Export CSV"
    _no_exception(at)


def test_review_log_warns_when_the_reviewed_views_together_are_unfamiliar(isolated_state) -> None:
    """Single-view studies from another source: no one view is unfamiliar, the log's views together are."""
    store = ReviewStore(isolated_state / "reviews.sqlite")
    for k, fam in enumerate((0.03, 0.06, 0.5, 0.08)):
        store.add(study_id=f"S-{k}", views=["view 1"], model_name="fracture", model_version="v", task="fracture",
                  view_probabilities=[0.2], reviewer_decision="agree", view_familiarities=[fam])
    at = _app("pages/review_log.py")
    warned = [w.value for w in at.warning if "reviewed views are unlike" in w.value]
    assert len(warned) == 1 and "3 of 4 reviewed views have familiarity under 0.10" in warned[0]
    # Narrowed to the one familiar study: no warning, the counts as a caption.
    at.text_input(key="log_study").input("S-2").run()
    assert not [w for w in at.warning if "reviewed views are unlike" in w.value]
    assert any("0 of 1 reviewed views" in c.value for c in at.caption)
    _no_exception(at)


def test_review_log_counts_only_fracture_reviews_in_the_familiarity_check(isolated_state) -> None:
    store = ReviewStore(isolated_state / "reviews.sqlite")  # children's hands: unlike FracAtlas, as expected
    for k in range(3):
        store.add(study_id=f"B-{k}", views=["view 1"], model_name="boneage", model_version="v", task="boneage",
                  view_probabilities=[120.0], reviewer_decision="agree", view_familiarities=[0.02])
    at = _app("pages/review_log.py")
    assert not [w for w in at.warning if "reviewed views are unlike" in w.value]
    _no_exception(at)


# -- who may see and do what -------------------------------------------------------------------------
# Sign-in is configured the way the app reads it (the secrets' [auth] and [boneai] sections) and the
# identity-token claims arrive as st.user, as Streamlit hands them over after an OpenID Connect login.
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "t" * 32, "client_id": "boneai",
        "client_secret": "secret", "server_metadata_url": "http://localhost:9/.well-known/openid-configuration"}
REVIEWER = {"sub": "r-1", "email": "rita@hospital.example", "name": "Rita Reviewer", "roles": ["boneai-reviewer"]}
ADMIN = {"sub": "a-1", "email": "adam@hospital.example", "name": "Adam Admin", "roles": ["boneai-admin"]}


def _as(claims: dict[str, Any] | None, page: str | None = None, boneai: dict[str, Any] | None = None,
        script: str = "app.py") -> AppTest:
    """The app with sign-in configured, run as a user with these claims (None: not signed in)."""
    at = AppTest.from_file(str(REPO / script), default_timeout=TIMEOUT)
    at.secrets["auth"] = AUTH
    at.secrets["boneai"] = boneai or {}
    at.user = {"is_logged_in": False} if claims is None else {**claims, "is_logged_in": True}
    at.run()
    if page:
        at.switch_page(page).run()
    _no_exception(at)
    return at


@pytest.fixture
def bound_to():
    """Set ``server.address`` for one test, as ``--server.address`` would; restored afterwards."""
    from streamlit import config

    original = config.get_option("server.address")
    yield lambda address: config.set_option("server.address", address)
    config.set_option("server.address", original)


def _seed_two_reviewers(path: Path) -> None:
    store = ReviewStore(path)
    for study, who in (("S-rita", REVIEWER["email"]), ("S-other", "otto@hospital.example")):
        store.add(study_id=study, views=["a.png"], model_name="fracture", model_version="v", task="fracture",
                  view_probabilities=[0.5], reviewer_decision="agree", reviewer=who)


def test_single_local_user_on_loopback_is_admin_with_nothing_to_sign_in() -> None:
    at = _app("pages/training.py")
    assert at.title[0].value == "Training"
    assert any("Single local user" in c.value for c in at.sidebar.caption)
    assert not [b for b in at.button if b.label == "Sign in"]


def test_a_reachable_address_without_sign_in_serves_nothing_on_any_page(bound_to) -> None:
    bound_to("0.0.0.0")
    for script in ("app.py", "pages/review_log.py", "pages/training.py"):
        at = AppTest.from_file(str(REPO / script), default_timeout=TIMEOUT).run()
        _no_exception(at)
        assert any("sign-in is not configured" in e.value for e in at.error), script
        assert not at.sidebar.selectbox and not at.dataframe and not at.button, script
        assert "Study review" not in [t.value for t in at.title]
    bound_to("")  # Streamlit's default: every interface
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT).run()
    assert any("all network interfaces" in e.value for e in at.error)


def test_sign_in_configured_on_a_reachable_address_asks_to_sign_in(bound_to) -> None:
    bound_to("0.0.0.0")
    at = _as(None)
    assert [b.label for b in at.button] == ["Sign in"]
    assert not at.sidebar.selectbox and not at.error
    with pytest.raises(ValueError):  # nothing else is in the navigation
        at.switch_page("pages/review_log.py")


def test_reviewer_has_no_training_and_sees_only_their_own_reviews_without_export(isolated_state) -> None:
    _seed_two_reviewers(isolated_state / "reviews.sqlite")
    at = _as(REVIEWER)
    assert any(f"{plain(REVIEWER['email'])} (reviewer)" in c.value for c in at.sidebar.caption)
    assert [b.label for b in at.sidebar.button] == ["Sign out"]
    with pytest.raises(ValueError):  # not in the reviewer's navigation
        at.switch_page("pages/training.py")
    at.switch_page("pages/review_log.py").run()
    _no_exception(at)
    assert at.dataframe[0].value["study_id"].tolist() == ["S-rita"]
    assert _metrics(at, "Reviews shown") == ["1"]
    assert not at.get("download_button")  # no export at all
    assert not at.expander  # nor the audit log
    assert "reviews.sqlite" not in _all_text(at)  # nor where the server keeps its files
    audit = ReviewStore(isolated_state / "reviews.sqlite").audit_log()
    assert audit[["actor", "action"]].values.tolist() == [[REVIEWER["email"], "sign-in"]]  # once per session


def test_admin_pages_refuse_a_reviewer_on_the_server_side_too() -> None:
    # Run the Training page's script itself, as a request that bypassed the navigation would.
    at = _as(REVIEWER, script="pages/training.py")
    assert [e.value for e in at.error] == ["This needs the admin role; you are signed in as a reviewer."]
    assert not [b for b in at.button if b.label == "Start training"]
    assert not [t for t in at.title if t.value == "Training"]


def test_admin_by_role_claim_has_training_and_the_whole_log_with_export(isolated_state) -> None:
    _seed_two_reviewers(isolated_state / "reviews.sqlite")
    at = _as(ADMIN, "pages/training.py")
    assert at.title[0].value == "Training" and _button(at, "Start training")
    at.switch_page("pages/review_log.py").run()
    _no_exception(at)
    assert sorted(at.dataframe[0].value["study_id"]) == ["S-other", "S-rita"]
    assert at.get("download_button")[0].proto.label == "Export CSV"
    assert at.expander and at.dataframe[1].value["action"].tolist() == ["sign-in"]


def test_admin_by_admin_list_and_by_a_configured_claim(isolated_state) -> None:
    listed = {**REVIEWER, "email": "Chief@Hospital.example"}
    at = _as(listed, "pages/training.py", boneai={"admins": ["chief@hospital.example"]})
    assert at.title[0].value == "Training"
    keycloak = {"sub": "k-1", "email": "kim@hospital.example", "realm_access": {"roles": ["xray-admin"]}}
    at = _as(keycloak, "pages/training.py", boneai={"role_claim": "realm_access.roles", "admin_role": "xray-admin"})
    assert at.title[0].value == "Training"
    # The same claims without that configuration: a reviewer.
    at = _as(keycloak)
    with pytest.raises(ValueError):
        at.switch_page("pages/training.py")


def test_a_signed_in_reviewers_review_carries_their_name_and_is_audited(isolated_state, fracture_predictor) -> None:
    at = _as(REVIEWER)
    assert at.title[0].value == "Study review"
    _radio(at, "Do you agree").set_value("agree")
    _button(at, "Save to review log").click().run()
    _no_exception(at)
    store = ReviewStore(isolated_state / "reviews.sqlite")
    assert store.query()["reviewer"].tolist() == [REVIEWER["email"]]
    audit = store.audit_log()  # newest first
    assert audit[["actor", "action"]].values.tolist() == [[REVIEWER["email"], "save-review"],
                                                         [REVIEWER["email"], "sign-in"]]


def test_the_localiser_draws_boxes_lists_them_and_zooms_into_one() -> None:
    from boneai.inference import load_model

    at = _app()
    at.sidebar.selectbox(key="model_fracture").set_value("fracture_localiser").run()
    at.selectbox(key="review_sample_fracture").set_value("Single view IMG0000019.jpg, hand").run()
    _no_exception(at)
    assert at.radio(key="review_evidence").value == "boxes"
    pred = load_model("fracture_localiser").predict(_read(REPO / "samples/fracatlas/IMG0000019.jpg"))
    boxes = pred.extras["boxes"]
    captions = [c.value for c in at.caption if "box(es)" in c.value or c.value.startswith("No box")]
    if boxes:
        assert captions == [f"{len(boxes)} box(es): " + ", ".join(
            f"#{k} {b['score']:.2f} ({'solid' if b['operating_point'] == 'balanced' else 'dashed'})"
            for k, b in enumerate(boxes, 1))]
        n_images = len(at.main.image)
        at.selectbox(key=next(s.key for s in at.selectbox if s.key and s.key.startswith("zoom_"))).set_value(1).run()
        assert len(at.main.image) == n_images + 1
    else:
        assert captions == ["No box passes the sensitive box operating point."]
    assert _metrics(at, "Probability") == [f"{pred.probability:.3f}"]
    at.radio(key="review_evidence").set_value("heatmap").run()
    _no_exception(at)
