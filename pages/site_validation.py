"""Site validation: validate a fracture model on this hospital's own labelled radiographs, adapt it
to them, register the adapted model.

Admins only, like Training: the page is not in a reviewer's navigation, refuses at its top, and
checks the role again before each action. Validation and adaptation run as background jobs through
the Training page's job runner (``python -m boneai validate-site`` / ``adapt``), one job at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from boneai.data import read_classification_dir
from boneai.errors import BoneAIError
from boneai.jobs import JobRunner, JobStatus
from boneai.site_validate import extract_site_zip, find_site_root
from ui.common import (
    audit,
    intended_use_note,
    model_cards,
    plain,
    register_job_form,
    require_role,
    route_through_app,
    selected_card,
)

route_through_app()
require_role("admin")

POLL_SECONDS = 2
ZIP_UPLOAD_MB = 2048
KINDS = {"validate-site": "Site validation", "adapt": "Site adaptation"}


def runner() -> JobRunner:
    return JobRunner()


def job_kind(job_id: str) -> str | None:
    """``validate-site`` or ``adapt`` for this page's jobs, None for others (training)."""
    try:
        meta = json.loads((runner().job_dir(job_id) / "job.json").read_text())
    except (BoneAIError, OSError, json.JSONDecodeError):
        return None
    kind = (meta.get("request") or {}).get("kind")
    return kind if kind in KINDS else None


def unpack_upload(data: bytes) -> Path:
    """An uploaded zip unpacked (once per content) under the jobs folder, where the job can read it."""
    dest = runner().root / "site_data" / hashlib.sha256(data).hexdigest()[:16]
    if not dest.is_dir():
        extract_site_zip(io.BytesIO(data), dest)
    return find_site_root(dest)


def data_folder() -> str | None:
    source = st.radio("Labelled radiographs", ["A folder on this machine", "Upload a zip"], horizontal=True,
                      key="site_source")
    if source == "A folder on this machine":
        folder = st.text_input("Folder", key="site_folder", placeholder="/data/site/fractures",
                               help="Class folders fractured/ and not_fractured/ (a subfolder per patient is "
                                    "kept together in cross-validation), or the FracAtlas layout.")
        return str(Path(folder.strip()).expanduser()) if folder.strip() else None
    upload = st.file_uploader("Zip of fractured/ and not_fractured/ folders", type=["zip"], key="site_zip",
                              help=f"At most {ZIP_UPLOAD_MB} MB unpacked; only image and DICOM files are kept.")
    if upload is None:
        return None
    try:
        root = unpack_upload(upload.getvalue())
    except BoneAIError as exc:
        st.error(plain(exc))
        return None
    st.caption(f"Unpacked to {plain(root)}.")
    return str(root)


def start_form() -> None:
    folder = data_folder()
    cards = model_cards("fracture")
    if not cards:
        st.info("No fracture model in weights/.")
        return
    names = [c["name"] for c in cards]
    in_use = (selected_card("fracture") or {}).get("name")  # the one Study review uses, not the first by name
    model = st.selectbox("Model", names, key="site_model", index=names.index(in_use) if in_use in names else 0,
                         help="The model to validate (the one chosen in the sidebar first), and the parent of an "
                              "adapted model (a classifier or an ensemble).")
    model_dir = next(c["dir"] for c in cards if c["name"] == model)
    c1, c2 = st.columns(2)
    validate = c1.button("Validate on these images", key="site_validate", type="primary")
    adapt = c2.button("Adapt to these images", key="site_adapt",
                      help="Recalibration, fine-tuning the head or the last block, or feature probes, each also "
                           "with batch-norm statistics re-estimated on these images, chosen by "
                           "cross-validation inside this folder (several minutes). Validate the adapted model "
                           "on other cases afterwards.")
    if not (validate or adapt):
        return
    user = require_role("admin")
    if not folder or not Path(folder).is_dir():
        st.error(plain(f"Data folder not found: {folder or '(empty)'}."))
        return
    try:  # the layout, before a job starts: a folder without class folders is said here, not in a job log
        read_classification_dir(folder)
    except BoneAIError as exc:
        st.error(plain(exc))
        return
    try:
        if validate:
            job = runner().start_command(
                ["-m", "boneai", "validate-site", "--task", "fracture", "--data", folder, "--model", model_dir,
                 "--out", "{run_dir}/site_validation.json"],
                task="fracture", request={"kind": "validate-site", "data": folder, "model": model})
        else:
            job = runner().start_adapt(folder, parent=model_dir)
    except BoneAIError as exc:  # another job runs, a missing folder
        st.error(plain(exc))
        return
    audit(user, "site-" + ("validate" if validate else "adapt"), f"{model} on {folder}")
    st.session_state["site_job"] = job.id
    st.rerun()


def live_job(job_id: str) -> None:
    job = runner().status(job_id)
    st.metric("State", job.state)
    with st.expander("Log", expanded=True):
        st.code(runner().log_tail(job_id, 15) or "(no output yet)", language=None)
    if job.state == "running":
        if st.button("Cancel job", key="site_cancel"):
            require_role("admin")
            runner().cancel(job_id)
            st.toast("Cancelling.")
    elif st.session_state.get("site_seen_running") == job_id:
        st.session_state.pop("site_seen_running")
        st.rerun(scope="app")


def _ci(v: dict[str, Any]) -> str:
    lo, hi = v["ci95"]
    return f"{v['value']:.3f} ({lo:.3f}-{hi:.3f})"


def left_out(skipped: list[dict[str, str]], n: int | None = None) -> None:
    """Name the files of the folder that could not be read (they were left out, the rest went on)."""
    n = len(skipped) if n is None else n
    if not n:
        return
    st.warning(plain(f"{n} file(s) of the folder could not be read and were left out of these figures."))
    with st.expander("Files left out"):
        st.dataframe(pd.DataFrame(skipped, columns=["file", "error"]), hide_index=True)


def show_validation(job: JobStatus) -> None:
    path = job.run_dir / "site_validation.json"
    if not path.is_file():
        st.warning("The validation ended without a report.")
        return
    report = json.loads(path.read_text())
    show = {"usable": st.success, "do_not_use": st.error, "not_enough_cases": st.warning}[report["verdict"]]
    show(plain(report["verdict_text"]))
    c = st.columns(4)
    c[0].metric("Fractured / images", f"{report['n_positive']} / {report['n']}")
    c[1].metric("ROC-AUC", f"{report['auc']['value']:.3f}", help=f"95 % CI {_ci(report['auc'])}")
    c[2].metric("ECE", f"{report['ece']['value']:.3f}", help=f"95 % CI {_ci(report['ece'])}")
    fam = report.get("familiarity")
    c[3].metric("Unfamiliar views", f"{fam['unfamiliar_share']['value']:.0%}" if fam else "-")
    if fam and fam.get("set"):  # the views taken together (boneai.scope.set_familiarity)
        st.caption(plain(fam["set"]["message"]))
    st.dataframe(pd.DataFrame([{"operating point": k, "threshold": round(p["threshold"], 4),
                                "sensitivity (95 % CI)": _ci(p["sensitivity"]),
                                "specificity (95 % CI)": _ci(p["specificity"]),
                                "card sensitivity": p["card_sensitivity"], "card specificity": p["card_specificity"]}
                               for k, p in report["operating_points"].items()]), hide_index=True)
    left_out(report.get("skipped") or [])
    html_path = path.with_suffix(".html")
    if html_path.is_file():
        st.download_button("Download the HTML report", html_path.read_bytes(), file_name="site_validation.html",
                           mime="text/html", key=f"site_html_{job.id}")


def show_adaptation(job: JobStatus) -> None:
    card_path = job.run_dir / "card.json"
    if not card_path.is_file():
        st.warning("The adaptation ended without a model card; nothing to register.")
        return
    card = json.loads(card_path.read_text())
    site = card["site"]
    v = card["validation"]
    st.success(plain(f"Chosen: {site['method'].replace('_', ' ')}. Cross-validated ROC-AUC {v['auc']:.3f} "
                     f"(95 % CI {v['auc_ci95'][0]:.3f}-{v['auc_ci95'][1]:.3f}) on {site['data']['n']} images; "
                     f"the parent {site['parent']} scores {site['parent_cv_auc']:.3f} on them."))
    st.dataframe(pd.DataFrame([{"candidate": k.replace("_", " "), "cross-validated AUC": round(c["cv_auc"], 4)}
                               for k, c in site["candidates"].items()]), hide_index=True)
    left_out(site["data"].get("skipped") or [], site["data"].get("n_skipped"))
    st.caption("Every figure here is cross-validated inside this folder (nested: each choice made on training "
               "folds only). Validate the registered model on other labelled cases before use.")
    register_job_form(job, "fracture", prefix="site_", registered_in="site_registered", name_stem="site",
                      kind="site job", button="Register the site model", registered_note="choose it in the sidebar.")


st.title("Site validation")
intended_use_note()
st.write("Check a fracture model on this hospital's own labelled radiographs before using it here, and adapt it "
         "to them. Both run in the background (`python -m boneai validate-site` and `adapt`), one job at a time.")

start_form()

jobs = runner()
job_id = st.session_state.get("site_job")
if job_id is None:
    running = jobs.running_job_id()
    ids = ([running] if running else []) + jobs.list_jobs()
    job_id = next((j for j in ids if job_kind(j)), None)
if job_id is not None and job_kind(job_id):
    status = jobs.status(job_id)
    kind = job_kind(job_id)
    st.divider()
    st.subheader(f"{KINDS[kind]}: job {status.id}")
    st.text(jobs.command_text(status.id))
    if status.state == "running":
        st.session_state["site_seen_running"] = status.id
        st.fragment(run_every=POLL_SECONDS)(live_job)(status.id)
    elif status.state == "failed":
        st.error(plain(f"The job failed: {status.error or 'see the log'}"))
        with st.expander("Log"):
            st.code(jobs.log_tail(status.id, 30) or "(no output)", language=None)
    elif status.state == "cancelled":
        st.warning("The job was cancelled.")
    elif kind == "validate-site":
        show_validation(status)
    else:
        show_adaptation(status)
