"""Training: start a background training job, follow it live, cancel it, register the result.

Admins only: the page is not in a reviewer's navigation, refuses at its top, and checks the role again
right before each action (start, cancel, register).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from boneai.config import TrainConfig, option_help
from boneai.errors import BoneAIError
from boneai.inference import available_models
from boneai.jobs import JobRunner, JobStatus, TrainRequest
from boneai.models import get_spec, list_models
from ui import charts
from ui.common import (
    REPO_ROOT,
    TASK_LABELS,
    intended_use_note,
    plain,
    register_job_form,
    require_role,
    route_through_app,
)

route_through_app()
require_role("admin")

LOSSES = {"fracture": ["bce", "weighted_bce", "focal"], "boneage": ["l1", "smooth_l1"], "anomaly": ["masked_mse"]}
POLL_SECONDS = 2


def default_data_folder(task: str) -> str:
    """Under ``BONEAI_DATA`` (the folder holding fracatlas/ and boneage/), else the first of
    data/ in the repository or the shared data folder beside it (the tests' convention)."""
    env = os.environ.get("BONEAI_DATA")
    candidates = [Path(env)] if env else [REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"]
    root = next((c for c in candidates if c.is_dir()), candidates[0])
    return str(root / ("boneage" if task == "boneage" else "fracatlas"))


def runner() -> JobRunner:
    return JobRunner()  # BONEAI_JOBS_DIR or jobs/; all state is on disk, so a reload finds the job


def job_form() -> None:
    st.subheader("New training job")
    task = st.radio("Task", ["fracture", "boneage", "anomaly"], format_func=TASK_LABELS.get, horizontal=True,
                    key="train_task")
    architectures = list_models(task)
    with st.form("train_form"):
        c1, c2 = st.columns(2)
        with c1:
            data = st.text_input("Data folder", value=default_data_folder(task), key=f"train_data_{task}",
                                 help="FracAtlas or image-folder layout (fracture, anomaly); boneage.csv + images/ (bone age).")
            model = st.selectbox("Architecture", architectures, key=f"train_model_{task}",
                                 format_func=lambda n: f"{n}: {get_spec(n).description[:70]}") if architectures else None
            default_size = get_spec(model).input_size if model else 224
            image_size = st.number_input("Image size (px)", 64, 1024, default_size, 32, key=f"train_size_{task}")
            loss = st.selectbox("Loss", ["(default)"] + LOSSES[task], key=f"train_loss_{task}")
        with c2:
            epochs = st.number_input("Epochs", 1, 500, 10, key="train_epochs", help=option_help(TrainConfig, "epochs"))
            batch_size = st.number_input("Batch size", 1, 512, TrainConfig.batch_size, key="train_batch",
                                         help=option_help(TrainConfig, "batch_size"))
            lr = st.number_input("Learning rate", 1e-6, 1.0, TrainConfig.lr, format="%.5f", step=1e-4, key="train_lr",
                                 help=option_help(TrainConfig, "lr"))
            limit = st.number_input("Use only the first N images (0 = all)", 0, 1_000_000, 0, key="train_limit",
                                    help="For a quick trial run.")
        models = available_models(task)
        # Fine-tuning parents: single models, and each member of an ensemble ("<dir>#<member>").
        parents: dict[str, str] = {}
        for c in models:
            if c.get("members"):
                for k, m in enumerate(c["members"]):
                    if m.get("architecture") in architectures:
                        parents[f"{c['dir']}#{k}"] = (f"member {k} of {c['name']} ({m.get('architecture')}, "
                                                      f"{m.get('input_size')} px)")
            elif c.get("architecture") in architectures:
                parents[c["dir"]] = f"{c['name']} ({c.get('architecture')}, {c.get('input_size')} px)"
        teachers = {c["dir"]: f"{c['name']} ({c.get('description') or c.get('architecture')})"[:90]
                    for c in models} if task != "anomaly" else {}
        with st.expander("Augmentation, preprocessing, fine-tuning, distillation"):
            a1, a2 = st.columns(2)
            with a1:
                augment = st.selectbox("Augmentation", ["strong", "basic", "none"], key=f"train_augment_{task}",
                                       help=option_help(TrainConfig, "augment"))
                clahe = st.checkbox("CLAHE (clip 2.0, 8x8) in the input pipeline", key=f"train_clahe_{task}")
                teacher = st.selectbox(
                    "Distil from (teacher)", [""] + list(teachers), key=f"train_teacher_{task}",
                    format_func=lambda d: "no teacher: labels only" if not d else teachers[d],
                    help="Knowledge distillation: the training targets mix the labels with this model's outputs, "
                         "e.g. to train a small, fast model from a slower ensemble. The teacher must not have "
                         "trained on this run's validation images (checked when you start).") if teachers else ""
                teacher_weight = st.slider("Teacher's share of the target", 0.0, 1.0, 0.5, 0.05,
                                           key=f"train_teacher_weight_{task}") if teachers else 0.5
            with a2:
                freeze = st.number_input("Frozen EfficientNet blocks (stem + first N)", 0, 6, 0, key=f"train_freeze_{task}",
                                         help=option_help(TrainConfig, "freeze_blocks"))
                parent = st.selectbox(
                    "Start from", [""] + list(parents), key=f"train_parent_{task}",
                    format_func=lambda d: "its initial weights (ImageNet where available)" if not d else
                    f"fine-tune {parents[d]}",
                    help="Choose the parent's architecture above. A parent trained on other data (e.g. the shipped "
                         "model, on this hospital's images) is fine; one that trained on this run's validation "
                         "images is refused when you start.")
        submitted = st.form_submit_button("Start training", type="primary")
    if submitted:
        require_role("admin")
        request = TrainRequest(task=task, data=data.strip(), model=model, epochs=int(epochs), image_size=int(image_size),
                               batch_size=int(batch_size), lr=float(lr),
                               loss=None if loss == "(default)" else loss, limit=int(limit) or None,
                               augment=augment, clahe=bool(clahe), freeze_blocks=int(freeze),
                               init_from=parent.split("#")[0] if parent else None,
                               init_member=int(parent.split("#")[1]) if "#" in parent else None,
                               distill_from=teacher or None, distill_weight=float(teacher_weight))
        try:
            # Checks the request as the train command will (options, data folder, and parent and teacher
            # through boneai.train.check_related_models), so a refusal shows here, before any job starts.
            job = runner().start(request)
        except BoneAIError as exc:  # busy machine, missing folder, bad numbers, a parent that saw these images
            st.error(plain(exc))
        else:
            st.session_state["train_job"] = job.id
            st.rerun()


def progress_panel(job: JobStatus) -> None:
    """Metrics, progress bar, loss curves and log of one job."""
    last = job.last
    cols = st.columns(4)
    cols[0].metric("State", job.state)
    cols[1].metric("Epoch", f"{job.epochs_done} / {job.epochs_total or '?'}")
    cols[2].metric("Train loss", f"{last['train_loss']:.4f}" if "train_loss" in last else "-")
    if "val_auc" in last:
        cols[3].metric("Validation AUC", f"{last['val_auc']:.3f}")
    elif "val_mae" in last:
        cols[3].metric("Validation MAE", f"{last['val_mae']:.2f}")
    else:
        cols[3].metric("Validation", "-")
    st.progress(job.progress, text=f"{job.progress:.0%} of epochs")
    if job.history:
        st.plotly_chart(charts.history_figure(job.history), key=f"history_{job.id}_{job.epochs_done}")
    with st.expander("Log", expanded=job.state == "failed"):
        st.code(runner().log_tail(job.id, 40) or "(no output yet)", language=None)


def live_job(job_id: str) -> None:
    """Run as a fragment every few seconds while the job runs."""
    job = runner().status(job_id)
    progress_panel(job)
    if job.state == "running":
        if st.button("Cancel job", key="train_cancel", type="secondary"):
            require_role("admin")
            runner().cancel(job_id)
            st.toast("Cancelling: the job stops after its current step.")
    elif st.session_state.get("train_seen_running") == job_id:
        st.session_state.pop("train_seen_running")
        st.rerun(scope="app")  # it just finished: show the results and the register form


def finished_job(job: JobStatus) -> None:
    if job.state == "failed":
        st.error(plain(f"The job failed: {job.error or 'see the log'}"))
        return
    if job.state == "cancelled":
        st.warning("The job was cancelled.")
        return
    preds = job.run_dir / "val_predictions.csv"
    if preds.is_file():
        path, mtime = charts.file_key(preds)
        df = charts.load_predictions(path, mtime)
        if charts.prediction_kind(df) == "binary":
            import json

            card = json.loads((job.run_dir / "card.json").read_text()) if (job.run_dir / "card.json").is_file() else {}
            threshold = float(card.get("operating_points", {}).get("balanced", {}).get("threshold", 0.5))
            c1, c2 = st.columns([3, 2])
            m = charts.metrics_at(path, mtime, threshold)
            c1.plotly_chart(charts.roc_figure(charts.curves(path, mtime), m), key=f"roc_{job.id}")
            c2.plotly_chart(charts.confusion_figure(m), key=f"cm_{job.id}")
            c2.caption(f"At the balanced operating point, threshold {threshold:.3f}.")
        elif charts.prediction_kind(df) == "regression":
            st.plotly_chart(charts.boneage_figure(df), key=f"ba_{job.id}")
    if not (job.run_dir / "card.json").is_file():
        st.warning("The job ended without a model card; nothing to register.")
        return
    st.subheader("Register the new model")
    register_job_form(job, job.task, prefix="", registered_in="train_registered", name_stem=job.task, kind="job",
                      button="Register weights",
                      registered_note="choose it in the sidebar to review studies with it.")


st.title("Training")
intended_use_note()
st.write("Train a model in the background with the same `python -m boneai train` command as the CLI. "
         "One job runs at a time on this machine; it keeps running if you close or reload the page.")

jobs = runner()
# A running job (from any session) first, then the one this session started, then the newest.
job_id = jobs.running_job_id() or st.session_state.get("train_job")
if job_id is None:
    current = jobs.current()
    job_id = current.id if current else None

if job_id is not None:
    try:
        status = jobs.status(job_id)
    except BoneAIError:
        status = None
    if status is not None:
        st.subheader(f"Job {status.id} ({TASK_LABELS.get(status.task, status.task)})")
        st.text(jobs.command_text(status.id))
        if status.state == "running":
            st.session_state["train_seen_running"] = status.id
            # Only a running job polls: the fragment reruns alone every POLL_SECONDS, not the page.
            st.fragment(run_every=POLL_SECONDS)(live_job)(status.id)
        else:
            progress_panel(status)
            finished_job(status)
        st.divider()

job_form()

history = [jobs.status(j) for j in jobs.list_jobs()[:10]]
if history:
    with st.expander("Recent jobs"):
        st.dataframe(pd.DataFrame([{"job": h.id, "task": h.task, "state": h.state, "epochs": h.epochs_done,
                                    "started (UTC)": h.started_at} for h in history]), hide_index=True)
