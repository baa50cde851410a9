"""What several pages share: cached model loading, the sidebar's model choice, samples, safe text.

Not a page itself (``app.py`` registers pages explicitly). UI glue only: every computation is a
``boneai`` call; this module adds Streamlit caching around them.
"""

from __future__ import annotations

import hashlib
import os
import re
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from boneai import inference
from boneai.auth import ADMIN, LOCAL_USER, AuthSettings, allowed, resolve_role, serving_mode, settings_from, user_name
from boneai.errors import BoneAIError
from boneai.io import Radiograph, read_radiograph
from boneai.store import ReviewStore, model_version

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "samples"
TASKS = ("fracture", "boneage", "anomaly")
TASK_LABELS = {"fracture": "Fracture", "boneage": "Bone age (hand)", "anomaly": "Anomaly (autoencoder)"}


def _limit_torch_threads() -> None:
    """Few intra-op threads per app process.

    Sessions run in threads of one process and training jobs may share the machine; with every core
    taken, PyTorch's spinning worker threads make one 224 px forward pass ~50x slower (2.3 s instead
    of 0.04 s measured on 2 busy cores). ``BONEAI_TORCH_THREADS`` overrides the default.
    """
    import torch

    default = max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(int(os.environ.get("BONEAI_TORCH_THREADS", default)))


_limit_torch_threads()

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def plain(text: Any) -> str:
    """Escape Markdown so a file name or a DICOM string shows as typed, never as formatting or a link.

    For ``st.error``/``st.warning``/``st.info``, which render Markdown. Prefer ``st.text`` where the
    message stands alone.
    """
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def route_through_app() -> None:
    """Run this page through ``app.py`` when Streamlit started it directly.

    Until the first ``st.navigation`` call in a server process, Streamlit treats a ``pages/`` folder
    the old way: a first request for a sub-URL (a bookmark, a reload after a restart) runs that page
    file alone, without the router's page setup, navigation and sidebar. Then this runs the router,
    which renders the requested page, and stops the direct run.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - a Streamlit without it has no such mode
        return
    if PagesManager.uses_pages_directory:
        runpy.run_path(str(REPO_ROOT / "app.py"), run_name="__main__")
        st.stop()


# -- models ------------------------------------------------------------------------------------------
def model_cards(task: str | None = None) -> list[dict[str, Any]]:
    """Cards of the models in the weights folder (read fresh: a registered model shows at once)."""
    return inference.available_models(task)


def card_by_name(name: str) -> dict[str, Any] | None:
    return next((c for c in model_cards() if c["name"] == name), None)


def selected_card(task: str) -> dict[str, Any] | None:
    """The card of the model chosen in the sidebar for ``task`` (the default one if none chosen)."""
    cards = model_cards(task)
    if not cards:
        return None
    chosen = st.session_state.get(f"chosen_model_{task}", st.session_state.get(f"model_{task}"))
    for card in cards:
        if card["name"] == chosen:
            return card
    try:
        default = inference.default_model_name(task)
    except BoneAIError:
        return cards[0]
    return next((c for c in cards if c["name"] == default), cards[0])


def remember_model(task: str) -> None:
    """Keep the sidebar's choice in plain session state: widget state is dropped on a run that skips the widget."""
    st.session_state[f"chosen_model_{task}"] = st.session_state[f"model_{task}"]


@st.cache_resource(show_spinner="Loading model...")
def get_predictor(model_dir: str, _mtime: float = 0.0) -> inference.Predictor:
    """One :class:`~boneai.inference.Predictor` per model folder per process, shared by all sessions."""
    return inference.load_model(model_dir)


def predictor_for(card: dict[str, Any]) -> inference.Predictor:
    weights = Path(card["dir"]) / card.get("weights_file", "model.safetensors")
    # The weights' mtime in the key: a model folder replaced on disk is loaded afresh.
    return get_predictor(card["dir"], weights.stat().st_mtime if weights.is_file() else 0.0)


@st.cache_data(show_spinner=False)
def cached_model_version(model_dir: str, _mtime: float = 0.0) -> str:
    card = next((c for c in model_cards() if c["dir"] == model_dir), {"dir": model_dir})
    return model_version(card)


def version_of(card: dict[str, Any]) -> str:
    weights = Path(card["dir"]) / card.get("weights_file", "model.safetensors")
    return cached_model_version(card["dir"], weights.stat().st_mtime if weights.is_file() else 0.0)


def card_link(card: dict[str, Any]) -> str:
    """Where the model card is, relative to the repository when it lives inside it."""
    path = Path(card["dir"]) / "card.json"
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# -- reading files -----------------------------------------------------------------------------------
@dataclass
class View:
    """One file of a study: its name, content digest and decoded radiograph."""

    name: str
    digest: str
    radiograph: Radiograph


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@st.cache_data(show_spinner=False, max_entries=64)
def _read(data: bytes, name: str) -> Radiograph:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Radiograph's own warnings list is shown instead
        return read_radiograph(data, name)


def read_views(files: list[tuple[str, bytes]]) -> list[View]:
    """Decode every file; a bad one gets ``st.error`` with boneai's message and the others go on."""
    views = []
    for name, data in files:
        try:
            views.append(View(name, digest(data), _read(data, name)))
        except BoneAIError as exc:
            st.error(plain(exc), icon=":material/error:")
        except Exception as exc:  # a decoder bug must not take the page down with a traceback
            st.error(plain(f"Could not read {name}: unexpected {type(exc).__name__}."), icon=":material/error:")
    return views


# -- samples -----------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def sample_table() -> pd.DataFrame:
    """``samples/samples.csv`` (file relative to samples/, dataset, label, region, boneage, male)."""
    path = SAMPLES_DIR / "samples.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["file", "dataset", "label", "region", "boneage_months", "male"])
    df = pd.read_csv(path)
    return df[[(SAMPLES_DIR / f).is_file() for f in df["file"]]].reset_index(drop=True)


def sample_studies(task: str) -> dict[str, list[Path]]:
    """Bundled studies a user can open at once: label -> files.

    Multi-view studies from ``samples/studies/*``, then single views from ``samples.csv`` that fit
    the task (hand radiographs for bone age, the fracture samples otherwise).
    """
    studies: dict[str, list[Path]] = {}
    table = sample_table()
    if task != "boneage":
        root = SAMPLES_DIR / "studies"
        for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
            if files:
                studies[f"Study {folder.name} ({len(files)} views)"] = files
        rows = table[table["dataset"].astype(str).str.contains("frac", case=False)]
    else:
        rows = table[table["dataset"].astype(str).str.contains("bone", case=False)]
    for _, row in rows.iterrows():
        if str(row["file"]).startswith("studies/"):  # already listed as part of its study
            continue
        region = row.get("region")
        extra = f", {region}" if isinstance(region, str) and region else ""
        studies[f"Single view {Path(row['file']).name}{extra}"] = [SAMPLES_DIR / row["file"]]
    return studies


def sample_info(path: Path) -> dict[str, Any]:
    """The samples.csv row of a bundled file (label, region, bone age, sex), or {}."""
    table = sample_table()
    try:
        rel = str(path.resolve().relative_to(SAMPLES_DIR.resolve()))
    except ValueError:
        return {}
    rows = table[table["file"] == rel]
    return {} if rows.empty else {k: v for k, v in rows.iloc[0].to_dict().items() if not _isnan(v)}


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and np.isnan(v)


# -- review log --------------------------------------------------------------------------------------
def review_store() -> ReviewStore:
    """The review log (``BONEAI_REVIEW_DB`` or reviews.sqlite); cheap to create, one connection per call."""
    return ReviewStore()


def intended_use_note() -> None:
    st.caption("Research and education, not a medical device. A qualified clinician reads every image.")


# -- who may see and do what -------------------------------------------------------------------------
@dataclass(frozen=True)
class User:
    """The person using this session: the name recorded with their reviews and their role."""

    name: str
    role: str
    signed_in: bool  # False in the single-user mode, where nobody signs in

    @property
    def is_admin(self) -> bool:
        return allowed(self.role, ADMIN)


def _secrets_section(name: str) -> dict[str, Any]:
    """A section of ``.streamlit/secrets.toml`` as a dict; {} when there is no file or no section."""
    try:
        if not st.secrets.load_if_toml_exists():
            return {}
        section = st.secrets.get(name)
    except Exception:  # an unreadable secrets file counts as none: then the bind policy decides
        return {}
    return dict(section) if section else {}


def sign_in_configured() -> bool:
    """Whether the secrets have an ``[auth]`` section: then everyone signs in with ``st.login``."""
    return bool(_secrets_section("auth"))


def auth_settings() -> AuthSettings:
    """Role claim, admin role and admin list from the secrets' ``[boneai]`` section and the environment."""
    return settings_from(_secrets_section("boneai"), os.environ)


def _mode() -> str:
    return serving_mode(st.get_option("server.address"), sign_in_configured())


def current_user() -> User | None:
    """The signed-in user with their role; ``local`` (admin) in the single-user mode.

    None while nobody may use the app: not signed in yet, or bound to an address other machines
    reach without sign-in configured.
    """
    mode = _mode()
    if mode == "local":
        return User(LOCAL_USER, ADMIN, signed_in=False)
    if mode == "refuse":
        return None
    info = st.user.to_dict()
    if info.get("is_logged_in") is not True:
        return None
    return User(user_name(info), resolve_role(info, auth_settings()), signed_in=True)


def audit(user: User, action: str, detail: str = "") -> None:
    """Append to the review store's audit log; a failure is shown, never a traceback."""
    try:
        review_store().audit(user.name, action, detail)
    except Exception as exc:  # the action itself has happened; say the record of it is missing
        st.warning(plain(f"Could not write the audit log ({type(exc).__name__}): {action} by {user.name}."))


def gate() -> User | None:
    """The session's user, recording one ``sign-in`` audit entry per session; None if nobody may use the app."""
    user = current_user()
    if user is not None and user.signed_in and st.session_state.get("_audited_sign_in") != user.name:
        st.session_state["_audited_sign_in"] = user.name  # first: a failed write is not retried on every rerun
        audit(user, "sign-in", f"role {user.role}")
    return user


def access_page() -> None:
    """The only page while nobody may use the app: why it serves nothing, or the sign-in button."""
    st.title("BoneAI Review")
    if _mode() == "refuse":
        address = st.get_option("server.address") or "all network interfaces"
        st.error(f"BoneAI Review is listening on {plain(address)}, which other machines can reach, and "
                 "sign-in is not configured, so it shows nothing.\n\n"
                 "Either run it for this machine only (`make run`, which binds to 127.0.0.1), or configure "
                 "sign-in in `.streamlit/secrets.toml` (`[auth]`, see `docs/deployment.md`).",
                 icon=":material/lock:")
        st.stop()
    st.info("Sign in with your hospital account to review studies.", icon=":material/login:")
    st.button("Sign in", type="primary", key="sign_in", on_click=st.login)
    st.stop()


def require_role(role: str) -> User:
    """Stop the page unless this session's user has ``role``; returns the user.

    Each admin-only page and action calls this itself, so a page reached without the navigation
    (a stale link, a crafted request) still refuses.
    """
    user = current_user()
    if user is None:
        access_page()  # stops
    assert user is not None
    if not allowed(user.role, role):
        st.error(f"This needs the {role} role; you are signed in as a {user.role}.", icon=":material/lock:")
        st.stop()
    return user


# -- the hospital archive (Worklist) -------------------------------------------------------------------------
def archive_settings() -> Any:
    """The archive the Worklist reads: ``[pacs]`` in ``.streamlit/secrets.toml`` and ``BONEAI_PACS_*``
    environment variables (these win); None when no URL is configured (see :func:`boneai.pacs.settings_from`)."""
    from boneai.pacs import settings_from as pacs_settings_from

    return pacs_settings_from(_secrets_section("pacs"))


def archive_client() -> Any:
    """A :class:`boneai.pacs.ArchiveClient` on :func:`archive_settings`, or None without an archive."""
    from boneai.pacs import ArchiveClient

    settings = archive_settings()
    return None if settings is None else ArchiveClient(settings)


@st.cache_data(show_spinner="Fetching the study from the archive...", max_entries=16, ttl=600)
def archive_study_files(url: str, study_uid: str) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(name, DICOM bytes) of a study's radiographs as the archive sends them, and one message per
    instance that could not be read. The page decodes the bytes through ``read_views`` like an upload."""
    client = archive_client()
    if client is None or client.settings.url != url:
        return [], ["The archive is no longer configured."]
    views, errors = client.fetch_views(study_uid)
    return [(f"view {n}", v.data) for n, v in enumerate(views, 1)], errors


def register_job_form(job: Any, task: str, *, prefix: str, registered_in: str, name_stem: str, kind: str,
                      button: str, registered_note: str) -> None:
    """The form that registers a finished job's run folder as ``weights/<name>/`` (optionally the default
    ``task`` model), audited; used by the Training and Site validation pages. ``prefix`` keeps each page's
    widget keys apart, ``registered_in`` names its session record, ``kind`` names the job in the audit log."""
    registered = st.session_state.setdefault(registered_in, {})
    if job.id in registered:
        st.success(f"Registered as {registered[job.id]}; {registered_note}")
        return
    with st.form(f"{prefix}register_{job.id}"):
        name = st.text_input("Model name", value=f"{name_stem}-{job.id[:15]}", key=f"{prefix}register_name",
                             help="Letters, digits, - and _. It becomes weights/<name>/.")
        make_default = st.checkbox(f"Make it the default {task} model", key=f"{prefix}register_default")
        if st.form_submit_button(button, type="primary"):
            user = require_role("admin")
            try:
                dest = inference.register_run(job.run_dir, name.strip(), make_default=make_default)
            except BoneAIError as exc:
                st.error(plain(exc))
            else:
                registered[job.id] = dest.name
                audit(user, "register-model", f"{dest.name} from {kind} {job.id}")
                if make_default:
                    audit(user, "set-default", f"{task}: {dest.name}")
                st.rerun(scope="app")  # the sidebar's model list picks the new model up
