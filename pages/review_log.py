"""Review log: the decisions reviewers recorded, filterable and exportable as CSV.

A reviewer sees only their own reviews and has no export; an admin sees every review, exports them
and reads the audit log.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

import streamlit as st

from boneai.store import REVIEWER_DECISIONS, to_csv_bytes
from ui.common import intended_use_note, require_role, review_store, route_through_app
from ui.scope import log_familiarity

route_through_app()
user = require_role("reviewer")

st.title("Review log")
intended_use_note()

store = review_store()
if user.is_admin:
    st.caption(f"Stored in {store.path} (set BONEAI_REVIEW_DB to move it). No patient identifiers are kept.")
else:  # where the server keeps its files is the admins' business
    st.caption("Your own reviews. No patient identifiers are kept.")
if store.count() == 0:
    st.info("No reviews yet. Record one on the Study review page.")
    st.stop()

f1, f2, f3, f4 = st.columns([2, 2, 2, 3])
with f1:
    study = st.text_input("Study label contains", key="log_study")
with f2:
    models = st.multiselect("Model", store.model_names(), key="log_models", placeholder="all models")
with f3:
    decisions = st.multiselect("Reviewer decision", list(REVIEWER_DECISIONS), default=list(REVIEWER_DECISIONS),
                               key="log_decisions")
with f4:
    today = datetime.now(timezone.utc).date()
    period = st.date_input("Recorded between (UTC)", value=(today - timedelta(days=365), today), key="log_period")

since = until = None
if isinstance(period, (tuple, list)) and len(period) == 2:
    since = datetime.combine(period[0], time.min, tzinfo=timezone.utc)
    until = datetime.combine(period[1], time.max, tzinfo=timezone.utc)

df = store.query(study_contains=study or None, model_name=models or None, reviewer_decision=decisions,
                 since=since, until=until, reviewer=None if user.is_admin else user.name)
m1, m2, m3 = st.columns(3)
m1.metric("Reviews shown", len(df))
if len(df):
    m2.metric("Agreement", f"{(df['reviewer_decision'] == 'agree').mean():.0%}")
    m3.metric("Studies", df["study_id"].nunique())
    log_familiarity(df)  # the views shown, taken together: unlike the training images? (boneai.scope)

table = df.assign(views=df["views"].map(", ".join),
                  view_probabilities=df["view_probabilities"].map(
                      lambda v: ", ".join("-" if x is None else f"{x:.3f}" for x in v)),
                  view_familiarities=df["view_familiarities"].map(
                      lambda v: ", ".join("-" if x is None else f"{x:.3f}" for x in v)))
# st.dataframe renders every cell as text: names and notes never become markup.
first = ["created_at", "study_id", "reviewer", "reviewer_decision", "model_decision", "study_probability", "views",
         "note"]
st.dataframe(table, hide_index=True, key="log_table",
             column_order=first + [c for c in table.columns if c not in first and c != "id"], column_config={
    "created_at": st.column_config.TextColumn("recorded (UTC)"),
    "threshold": st.column_config.NumberColumn(format="%.3f"),
    "study_probability": st.column_config.NumberColumn(format="%.3f"),
    "boneage_months": st.column_config.NumberColumn(format="%.1f"),
})


def export_csv() -> bytes:
    """Called when the download starts, so only an export that happens is audited; no audit line, no export."""
    data = to_csv_bytes(df)
    store.audit(user.name, "export", f"{len(df)} reviews")
    return data


if user.is_admin:  # the whole log leaves the app only through an admin; the check is here, not in the menu
    st.download_button("Export CSV", data=export_csv, file_name="review_log.csv", mime="text/csv",
                       key="log_export", disabled=df.empty, on_click="ignore")
    with st.expander("Audit log"):
        st.dataframe(store.audit_log(), hide_index=True, key="audit_table")
