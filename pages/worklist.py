"""Worklist: the archive's radiograph studies, newest first, with our status; opening one takes it to
Study review with its views.

The archive is configured in ``.streamlit/secrets.toml`` (``[pacs]``: url, username/password or token,
modalities, body_parts) or with ``BONEAI_PACS_*`` environment variables (see README, "Hospital archive").
Only technical fields are shown: date, modality, body part, number of views; never a patient's name or
number."""

from __future__ import annotations

import streamlit as st

from boneai.errors import BoneAIError
from ui.common import (
    archive_client,
    intended_use_note,
    plain,
    require_role,
    route_through_app,
    selected_card,
    version_of,
)

route_through_app()
user = require_role("reviewer")

STATE_LABELS = {"new": "new", "analysed": "analysed", "reviewed": "reviewed"}


@st.cache_data(show_spinner="Reading the worklist from the archive...", ttl=30, max_entries=8)
def worklist(url: str, model_name: str, model_version: str, since: str | None) -> list[dict]:
    """One row per study: its UID, technical fields and our status for this model version."""
    client = archive_client()
    rows = []
    for study in client.search_studies(since=since, limit=200):
        status = client.status(study, model_name, model_version)
        if status.state == "new":
            result = "-"
        elif status.boneage_months is not None:
            result = f"bone age {status.boneage_months:.0f} months"
        else:
            result = f"{status.finding} ({status.probability:.3f})" if status.probability is not None else "no finding"
            if status.unfamiliar:  # as Study review says it beside the finding
                result += "; views unlike the training images"
        rows.append({"study_uid": study.study_uid, "date": _date(study.date), "modality": ", ".join(
            m for m in study.modalities if m in client.settings.modalities), "body part": ", ".join(study.body_parts)
            or "-", "views": study.n_views, "status": STATE_LABELS[status.state], "AI finding": result,
            "review": status.decision or "-"})
    return rows


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else (value or "-")


st.title("Worklist")
intended_use_note()
client = archive_client()
if client is None:
    st.info("No archive is configured. Set `BONEAI_PACS_URL` (e.g. `http://127.0.0.1:8042/dicom-web` after "
            "`make pacs`) or a `[pacs]` section in `.streamlit/secrets.toml`; see the README.",
            icon=":material/dns:")
    st.stop()
card = selected_card("fracture")
if card is None:
    st.warning("No fracture model is installed in weights/.")
    st.stop()

st.caption(f"Archive: {plain(client.settings.url)}; studies with {', '.join(client.settings.modalities)} images; "
           f"status for model {plain(card['name'])} (version {version_of(card)}).")
top = st.columns([2, 1, 5])
since_date = top[0].date_input("Studies since", value=None, key="worklist_since", format="YYYY-MM-DD")
if top[1].button("Refresh", icon=":material/refresh:", key="worklist_refresh"):
    worklist.clear()
since = since_date.strftime("%Y%m%d") if since_date else None
try:
    rows = worklist(client.settings.url, card["name"], version_of(card), since)
except BoneAIError as exc:
    st.error(plain(exc), icon=":material/error:")
    st.stop()
if not rows:
    st.info("The archive has no radiograph study that matches the filter.")
    st.stop()

header = st.columns([2, 2, 2, 1, 2, 3, 2, 2])
COLUMNS = ["Date", "Modality", "Body part", "Views", "Status", "AI finding", "Review", ""]
for col, name in zip(header, COLUMNS, strict=True):
    col.markdown(f"**{name}**")
for row in rows:
    cols = st.columns([2, 2, 2, 1, 2, 3, 2, 2])
    for col, key in zip(cols[:7], ["date", "modality", "body part", "views", "status", "AI finding", "review"],
                        strict=True):
        col.text(str(row[key]))
    if cols[7].button("Open", key=f"open_{row['study_uid']}", icon=":material/open_in_new:"):
        st.session_state["archive_study"] = {"study_uid": row["study_uid"], "url": client.settings.url,
                                             "label": f"{row['date']} {row['modality']} {row['body part']}"}
        st.session_state["review_source"] = "Archive study"
        st.session_state["review_task"] = "fracture"
        st.switch_page("pages/study_review.py")
