"""Study review: the views of one study, the model's finding per view and for the study, heatmaps,
the reviewer's decision (saved to the review log) and a downloadable report.

File names are shown on screen during the session only: the log and the reports name each view by
its number and a hash of its bytes (:func:`boneai.store.view_label`), because upload names often
carry the patient's name or record number."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import streamlit as st

from boneai.errors import BoneAIError
from boneai.inference import Prediction, Predictor
from boneai.io import check_study_upload
from boneai.preprocess import standardise
from boneai.report import StudyReport, ViewReport, to_html, to_pdf
from boneai.scope import study_familiarity, view_familiarities
from boneai.store import REVIEWER_DECISIONS, new_study_id, view_label
from boneai.study import AGGREGATIONS, finding_text, review_record, study_result
from ui.common import (
    TASKS,
    TASK_LABELS,
    View,
    archive_client,
    archive_study_files,
    audit,
    card_link,
    intended_use_note,
    model_cards,
    plain,
    predictor_for,
    read_views,
    require_role,
    review_store,
    route_through_app,
    sample_info,
    sample_studies,
    selected_card,
    version_of,
)
from ui import heatmaps as heatmap_service
from ui import scope as view_scope

try:  # written alongside this page; without it the page still predicts, only heatmaps are off
    from boneai import explain as _explain
except ImportError:  # pragma: no cover - depends on the checkout
    _explain = None

route_through_app()
user = require_role("reviewer")  # every signed-in user; the name goes with each saved review

DECISION_LABELS = {"agree": "Agree", "disagree": "Disagree", "uncertain": "Uncertain"}


# -- cached computations -----------------------------------------------------------------------------
@st.cache_data(show_spinner="Running the model...", max_entries=64)
def predict_views(model_dir: str, digests: tuple[str, ...], operating_point: str | float | None,
                  male: bool | None, _predictor: Predictor, _views: list[View]) -> list[Prediction]:
    """The predictor's output for the views; keyed by model, file contents, operating point and sex."""
    return _predictor.predict_many([v.radiograph for v in _views], operating_point=operating_point, male=male)


def heatmap_for(digest: str, method: str | None, male: bool | None, _predictor: Predictor, _view: View) -> Any:
    """The :class:`boneai.explain.Heatmap` (map on the radiograph's grid, method, peak), from the shared
    heatmap workers (:mod:`ui.heatmaps`: no lock on the shared model, results cached by bytes)."""
    return heatmap_service.heatmap(_predictor, digest, _view.radiograph, method=method, male=male)


@st.cache_data(show_spinner=False, max_entries=128)
def display_gray(digest: str, _view: View) -> np.ndarray:
    """The radiograph as the grey uint8 image shown on screen."""
    return standardise(_view.radiograph.pixels).image


def fmt_score(task: str, value: float) -> str:
    """Probabilities with three decimals; anomaly scores (small reconstruction errors) with four digits."""
    return f"{value:.4g}" if task == "anomaly" else f"{value:.3f}"


# -- inputs ------------------------------------------------------------------------------------------
def choose_task() -> str | None:
    tasks = [t for t in TASKS if model_cards(t)]
    if not tasks:
        st.warning("No model is installed in weights/. Train one on the Training page, then register it.")
        return None
    return st.radio("Analysis", tasks, format_func=TASK_LABELS.get, horizontal=True, key="review_task")


def choose_files(task: str) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """(name, bytes) of the study's files and what samples.csv knows about a bundled study."""
    archived = st.session_state.get("archive_study")  # set by the Worklist's "Open"
    sources = (["Archive study"] if archived else []) + ["Sample study", "Upload files"]
    source = st.radio("Study source", sources, horizontal=True, key="review_source")
    if source == "Archive study":
        st.caption(f"From the archive (Worklist): {plain(archived['label'])}")
        try:
            files, errors = archive_study_files(archived["url"], archived["study_uid"])
        except BoneAIError as exc:
            st.error(plain(exc), icon=":material/error:")
            return [], {}
        for message in errors:
            st.error(plain(message), icon=":material/error:")
        return files, {"archive_study_uid": archived["study_uid"]}
    if source == "Upload files":
        uploads = st.file_uploader(
            "Radiographs of one study (PNG, JPEG or DICOM; several views allowed)",
            # No type= filter: DICOM files from an archive export often have no extension. What a file
            # is comes from its bytes (boneai.io), which refuses anything but PNG, JPEG and DICOM.
            accept_multiple_files=True, key="review_upload",
            help="DICOM files may have no extension. Files are read in memory and not kept. Patient identifiers in DICOM headers are dropped; "
                 "file names are shown here only, the log and reports use view numbers and content hashes.")
        try:  # bounded before any file is decoded: one study, not a whole archive
            check_study_upload([u.size for u in uploads or []])
        except BoneAIError as exc:
            st.error(plain(exc), icon=":material/error:")
            return [], {}
        return [(u.name, u.getvalue()) for u in uploads or []], {}
    studies = sample_studies(task)
    if not studies:
        st.info("No bundled sample fits this analysis; upload files instead.")
        return [], {}
    label = st.selectbox("Sample study", list(studies), key=f"review_sample_{task}")
    paths = studies[label]
    return [(p.name, p.read_bytes()) for p in paths], sample_info(paths[0]) if len(paths) == 1 else {}


def choose_operating_point(predictor: Predictor) -> str | float:
    points = predictor.operating_points
    options = list(points) + ["custom"]
    default = predictor.card.get("default_operating_point", "balanced")
    op = st.radio("Operating point", options, index=options.index(default) if default in options else 0,
                  horizontal=True, key=f"review_op_{predictor.task}",
                  format_func=lambda o: o if o == "custom" else f"{o} ({fmt_score(predictor.task, points[o])})",
                  help="From the model card: 'sensitive' misses fewer findings, 'balanced' maximises "
                       "sensitivity + specificity. 'custom' sets your own threshold.")
    if op != "custom":
        return op
    start = float(points.get(default, next(iter(points.values()), 0.5)))
    if predictor.task == "anomaly":  # a reconstruction error, not a probability: scale to the card's points
        high = 3 * max(points.values(), default=1.0)
        return float(st.slider("Custom threshold (anomaly score)", 0.0, high, value=min(start, high), step=high / 1000,
                               key=f"review_threshold_anomaly_{predictor.name}", format="%.5f"))
    return float(st.slider("Custom threshold", 0.0, 1.0, value=start, step=0.001,
                           key=f"review_threshold_{predictor.task}", format="%.3f"))


def store_review_in_archive(study_uid: str, decision: str) -> None:
    """The AI report (made now if the archive has none for this model version) and the reviewer's SR on it."""
    from boneai.pacs import process_study, record_review

    client = archive_client()
    if client is None:
        st.warning("The archive is no longer configured; the review is in the log only.")
        return
    with st.spinner("Storing the results in the archive..."):
        # The views this reviewer chose to show anyway count in the report too, as on this page.
        shown = [views[i].digest for i in counted if not scopes[i].in_scope]
        ai = process_study(client, predictor, study_uid, model_version=version_of(card),
                           operating_point=operating_point, aggregation=aggregation, show_anyway=shown)
        try:
            if not ai.ok:
                raise BoneAIError(ai.error or "the AI report could not be made")
            sr_uid = record_review(client, study_uid, ai.sr_sop_uid, reviewer=user.name, decision=decision)
        except BoneAIError as exc:
            st.error(plain(f"The review is in the log, but not in the archive: {exc}"), icon=":material/error:")
            return
    audit(user, "archive-review", f"reviewer SR {sr_uid}")
    st.success(f"Stored in the archive: AI report {ai.sr_sop_uid} and your decision (SR {sr_uid}).",
               icon=":material/cloud_done:")


# -- page --------------------------------------------------------------------------------------------
st.title("Study review")
intended_use_note()

task = choose_task()
if task is None:
    st.stop()
card = selected_card(task)
try:
    predictor = predictor_for(card)
except BoneAIError as exc:
    st.error(plain(exc))
    st.stop()

files, known = choose_files(task)
if not files:
    st.info("Choose a sample study or upload the views of one study to start.")
    st.stop()

views = read_views(files)
for view in views:
    for note in view.radiograph.warnings:
        st.warning(plain(f"{view.name}: {note}"), icon=":material/warning:")
if not views:
    st.stop()

controls = st.columns([3, 2, 2])
male: bool | None = None
operating_point: str | float | None = None
with controls[0]:
    if task == "boneage":
        known_sex = known.get("male")
        index = None if known_sex is None else (0 if str(known_sex).lower() in ("true", "1") else 1)
        sex = st.radio("Patient's sex", ["male", "female"], index=index, horizontal=True, key="review_sex",
                       help="The bone-age model needs it: skeletal maturation differs by sex.")
        if sex is None:
            st.info("Choose the patient's sex to estimate bone age.")
            st.stop()
        male = sex == "male"
    else:
        operating_point = choose_operating_point(predictor)
with controls[1]:
    aggregation = "mean"
    if task != "boneage" and len(views) > 1:
        aggregation = st.radio("Study probability", list(AGGREGATIONS), horizontal=True, key="review_aggregation",
                               help="Mean of the views (as in MURA) or the most suspicious view.")
with controls[2]:
    gives_boxes = predictor.card.get("kind") == "localiser"
    evidence = "heatmap"
    if gives_boxes:
        evidence = st.radio("Evidence", ["boxes", "heatmap"], horizontal=True, key="review_evidence",
                            format_func={"boxes": "Fracture boxes", "heatmap": "Fracture map"}.get,
                            help="Boxes: solid at the 'balanced' box operating point, dashed at 'sensitive' "
                                 "(more findings, more false alarms). The map is the same model's output, unthresholded.")
        show_heatmaps = evidence == "heatmap"
    else:
        show_heatmaps = st.toggle("Heatmaps", value=True, key="review_heatmaps", disabled=_explain is None,
                                  help="Where the model looked. Not a localisation of the finding.")
    method = None
    if _explain is not None and show_heatmaps:
        if task == "anomaly":
            st.caption("Reconstruction error map")
        elif gives_boxes:
            st.caption("Fracture map of the localiser")
        else:
            methods = list(_explain.CAM_METHODS)
            method = st.selectbox("Heatmap method", methods, index=methods.index(_explain.DEFAULT_CAM_METHOD),
                                  key="review_cam_method")
        opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key="review_opacity")

digests = tuple(v.digest for v in views)
try:
    predictions = predict_views(card["dir"], digests, operating_point, male, predictor, views)
except BoneAIError as exc:
    st.error(plain(exc))
    st.stop()
scopes = view_scope.scope_for(digests, views, predictor, predictions)  # out-of-scope views: greyed, no finding (boneai.scope)
counted = view_scope.counted_views(scopes, views)  # the views the study finding uses

# -- per view ----------------------------------------------------------------------------------------
st.subheader("Views")
heatmaps: dict[int, np.ndarray] = {}
# Heatmaps are drawn after every number on the page (end of the script): probabilities, the study
# finding and the review form never wait for a heatmap, this session's or another's.
pending_heatmaps: list[heatmap_service.Pending] = []
per_row = 2 if len(views) <= 4 else 3
for start in range(0, len(views), per_row):
    cols = st.columns(per_row)
    for i, (view, pred) in enumerate(zip(views[start:start + per_row], predictions[start:start + per_row]), start):
        with cols[i - start].container(border=True):
            st.text(f"View {i + 1}: {view.name}")
            gray = display_gray(view.digest, view)
            if not view_scope.out_of_scope_notice(scopes[i], view, i + 1, user):
                st.image(view_scope.greyed(gray), width="stretch")
                view_scope.image_details(view)
                continue
            shown = gray
            boxes = pred.extras.get("boxes", []) if evidence == "boxes" else []
            if evidence == "boxes" and gives_boxes:
                shown = _explain.draw_boxes(gray, boxes)
                heatmaps[i] = shown
            image_slot = st.empty()
            image_slot.image(shown, width="stretch")
            if show_heatmaps and _explain is not None:  # filled in at the end of the page
                pending_heatmaps.append(heatmap_service.Pending(i, view.digest, view.radiograph, gray, image_slot,
                                                                st.empty()))
            if evidence == "boxes" and gives_boxes:
                if not boxes:
                    st.caption("No box passes the sensitive box operating point.")
                else:
                    st.caption(f"{len(boxes)} box(es): " + ", ".join(
                        f"#{k} {b['score']:.2f} ({'solid' if b['operating_point'] == 'balanced' else 'dashed'})"
                        for k, b in enumerate(boxes, 1)))
                    zoom = st.selectbox("Zoom into box", [None] + list(range(1, len(boxes) + 1)), key=f"zoom_{view.digest}",
                                        format_func=lambda k: "-" if k is None else f"#{k}")
                    if zoom is not None:
                        st.image(_explain.box_crop(shown, boxes[zoom - 1]), width="stretch",
                                 caption=f"Box #{zoom}, score {boxes[zoom - 1]['score']:.2f}")
            m1, m2 = st.columns(2)
            if pred.boneage_months is not None:
                m1.metric("Bone age (months)", f"{pred.boneage_months:.1f}")
                m2.metric("Bone age (years)", f"{pred.boneage_months / 12:.1f}")
            else:
                if pred.probability is not None:
                    m1.metric("Probability", f"{pred.probability:.3f}")
                elif pred.anomaly_score is not None:
                    m1.metric("Anomaly score", fmt_score(task, pred.anomaly_score))
                finding = finding_text(task, pred.decision)
                m2.metric("Decision", finding or "-",
                          help=None if pred.threshold is None else f"At threshold {fmt_score(task, pred.threshold)}")
                if task == "fracture":
                    view_scope.unfamiliar_note(scopes[i])
            members = pred.extras.get("member_outputs")
            if members:  # an ensemble: show how far its members agree
                unit = " months" if pred.boneage_months is not None else " (logit)"
                st.caption(f"Ensemble of {len(members)} models; members: "
                           + ", ".join(f"{v:.1f}" for v in members) + unit)
            meta = {"format": view.radiograph.source_format,
                    "size (px)": f"{view.radiograph.width} x {view.radiograph.height}",
                    **{k: v for k, v in view.radiograph.metadata.items() if v not in (None, "")}}
            with st.expander("Image details"):
                st.json(meta)

# -- study level -------------------------------------------------------------------------------------
st.subheader("Study")
result = study_result(predictions, counted, aggregation)  # boneai.study: the same rule as the CLI and PACS batch
together = study_familiarity(scopes, task)  # the views together unlike the training images? (boneai.scope)
study_note = together.warning("views") if together is not None else None
study_probability, study_decision, threshold = result.score, result.decision, result.threshold
if not counted:
    st.info("No view of this study is in scope, so there is no study finding. Choose \"Show anyway\" on a view "
            "to count it.")
elif task == "boneage":
    st.metric("Bone age, mean of views (months)", f"{result.boneage_months:.1f}",
              help=f"{result.boneage_months / 12:.1f} years; {len(counted)} view(s).")
    if "boneage_months" in known:
        st.caption(f"Reference bone age of this sample: {float(known['boneage_months']):.0f} months.")
else:
    s1, s2, s3 = st.columns(3)
    s1.metric("Study probability" if predictions[0].probability is not None else "Study anomaly score",
              fmt_score(task, study_probability), help=f"{aggregation} of {len(counted)} view(s) in scope")
    s2.metric("Study decision", finding_text(task, study_decision))
    s3.metric("Threshold", fmt_score(task, threshold), help=f"Operating point: {predictions[0].operating_point}")
    if study_note:
        st.warning(plain(study_note), icon=":material/help:")
    if "label" in known:
        st.caption("Reference label of this sample: " + ("fractured" if int(known["label"]) else "not fractured"))

# -- reviewer decision -------------------------------------------------------------------------------
study_key = hashlib.sha256("|".join((task, card["name"]) + digests).encode()).hexdigest()[:12]
ids = st.session_state.setdefault("study_ids", {})
study_id = ids.setdefault(study_key, new_study_id())
saved = st.session_state.setdefault("saved_reviews", {})

st.subheader("Your review")
with st.form("review_form", clear_on_submit=False):
    label = st.text_input("Study label", value=study_id, max_chars=120, key=f"review_label_{study_key}",
                          help="Made up for the log. Do not enter names, record numbers or dates of birth.")
    decision = st.radio("Do you agree with the model's finding?", list(REVIEWER_DECISIONS), index=None,
                        format_func=DECISION_LABELS.get, horizontal=True, key=f"review_decision_{study_key}")
    note = st.text_area("Note (optional)", max_chars=2000, key=f"review_note_{study_key}",
                        placeholder="What you saw. No patient identifiers.")
    submitted = st.form_submit_button("Save to review log", type="primary")
if submitted:
    if decision is None:
        st.error("Choose agree, disagree or uncertain before saving.")
    else:
        # Saving twice (a double click, a rerun) stores one review: same study, decision, note and model.
        review_key = "|".join((study_key, label.strip(), decision, (note or "").strip(), card["name"],
                               version_of(card)))
        try:
            review_id = review_store().add(**review_record(
                study_label=label, view_labels=[view_label(n, v.digest) for n, v in enumerate(views, 1)],
                predictions=predictions, result=result, model_name=card["name"], model_version=version_of(card),
                reviewer_decision=decision, note=note, reviewer=user.name, review_key=review_key,
                familiarities=view_familiarities(scopes, task)))  # the log's drift check
        except BoneAIError as exc:
            st.error(plain(exc))
        else:
            saved[study_key] = {"id": review_id, "decision": decision, "note": note, "label": label}
            audit(user, "save-review", f"review #{review_id}")
            st.success(f"Saved to the review log as review #{review_id}.", icon=":material/check_circle:")
            if "archive_study_uid" in known:  # from the Worklist: the decision goes back to the archive too
                store_review_in_archive(known["archive_study_uid"], decision)

# -- report ------------------------------------------------------------------------------------------
record = saved.get(study_key, {})


def build_report() -> StudyReport:
    """Called when a download starts: heatmaps missing on screen are computed with the default method."""
    view_reports = []
    for i, (view, pred) in enumerate(zip(views, predictions)):
        gray = standardise(view.radiograph.pixels).image
        out = i not in counted  # out of scope and not shown anyway: no finding, no heatmap
        hm = heatmaps.get(i)
        hm_method = (method or ("error map" if task == "anomaly" else _explain.DEFAULT_CAM_METHOD)) if i in heatmaps else None
        if gives_boxes and not out:  # the report always shows the boxes, whatever the screen shows
            hm = _explain.draw_boxes(gray, pred.extras.get("boxes", []))
            hm_method = "fracture boxes (solid: balanced, dashed: sensitive)"
        if hm is None and _explain is not None and not out:
            try:
                hm = _explain.overlay(gray, heatmap_for(view.digest, None, male, predictor, view).map)
                hm_method = "error map" if task == "anomaly" else _explain.DEFAULT_CAM_METHOD
            except Exception:  # the report still has the images and numbers
                hm = None
        view_reports.append(ViewReport(
            name=view_label(i + 1, view.digest),  # never view.name: upload names may carry identifiers
            image=gray, heatmap=hm, heatmap_method=hm_method, probability=None if out else pred.probability,
            boneage_months=None if out else pred.boneage_months, anomaly_score=None if out else pred.anomaly_score,
            finding=None if out else finding_text(task, pred.decision), metadata=dict(view.radiograph.metadata),
            warnings=list(view.radiograph.warnings) + view_scope.report_notes(scopes[i], out, task)))
    return StudyReport(
        study_id=record.get("label", study_id), task=task, model_name=card["name"], model_version=version_of(card),
        model_card=card_link(card), views=view_reports,
        operating_point=None if task == "boneage" else str(predictions[0].operating_point),
        threshold=None if task == "boneage" else threshold, aggregation=None if task == "boneage" else aggregation,
        study_probability=study_probability, study_finding=finding_text(task, study_decision),
        sex=None if male is None else ("male" if male else "female"),
        reviewer_decision=record.get("decision"), note=record.get("note", ""), familiarity_note=study_note)


st.subheader("Report")
if not record:
    st.caption("Save your review first to include your decision in the report.")
r1, r2 = st.columns(2)
r1.download_button("Download report (HTML)", data=lambda: to_html(build_report()).encode("utf-8"),
                   file_name=f"{study_id}.html", mime="text/html", key="report_html", on_click="ignore")
r2.download_button("Download report (PDF)", data=lambda: to_pdf(build_report()), file_name=f"{study_id}.pdf",
                   mime="application/pdf", key="report_pdf", on_click="ignore")

# -- heatmaps, last: every number above is on the screen already --------------------------------------
if pending_heatmaps:
    heatmap_service.draw_heatmaps(predictor, pending_heatmaps, method, male,
                                  lambda gray, heat: _explain.overlay(gray, heat, opacity=opacity), heatmaps, plain)
