"""BoneAI Review: the router. Page setup, navigation over pages/, and the shared sidebar.

Run with ``streamlit run app.py`` (or ``make run``). Each screen lives in its own file in pages/.
"""

from __future__ import annotations

import streamlit as st

from boneai import __version__
from boneai.errors import BoneAIError
from ui.common import (TASK_LABELS, TASKS, access_page, gate, model_cards, plain, remember_model,
                       selected_card)

st.set_page_config(page_title="BoneAI Review", page_icon=":material/radiology:", layout="wide")

user = gate()
if user is None:
    # Nobody may use the app yet (not signed in, or reachable without sign-in configured): the
    # navigation holds only the access page, so no other page can be reached, by link either.
    st.navigation([st.Page(access_page, title="Sign in", icon=":material/login:")], position="hidden").run()
    st.stop()

pages = [
    st.Page("pages/study_review.py", title="Study review", icon=":material/radiology:", default=True),
    # Every reviewer; the page says how to configure an archive when none is.
    st.Page("pages/worklist.py", title="Worklist", icon=":material/view_list:"),
    st.Page("pages/preprocessing.py", title="Preprocessing inspector", icon=":material/tune:"),
    st.Page("pages/performance.py", title="Model performance", icon=":material/monitoring:"),
]
if user.is_admin:  # reviewers never see Training; the page checks the role itself as well
    pages.append(st.Page("pages/training.py", title="Training", icon=":material/model_training:"))
    pages.append(st.Page("pages/site_validation.py", title="Site validation", icon=":material/verified:"))
pages.append(st.Page("pages/review_log.py", title="Review log", icon=":material/fact_check:"))
navigation = st.navigation(pages)

with st.sidebar:
    st.markdown(f"**BoneAI Review** {__version__}")
    if user.signed_in:
        st.caption(f"Signed in as {plain(user.name)} ({user.role})")
        st.button("Sign out", key="sign_out", on_click=st.logout, icon=":material/logout:")
    else:
        st.caption("Single local user: this machine only, nothing to sign in.")
    st.warning("Research and education, not a medical device.", icon=":material/info:")
    st.subheader("Models")
    any_model = False
    for task in TASKS:
        cards = model_cards(task)
        if not cards:
            continue
        any_model = True
        names = [c["name"] for c in cards]
        try:
            default = selected_card(task)["name"]
        except (BoneAIError, TypeError):
            default = names[0]
        st.selectbox(TASK_LABELS[task], names, index=names.index(default), key=f"model_{task}",
                     on_change=remember_model, args=(task,),
                     help="From weights/: shipped models and those registered on the Training page.")
    if not any_model:
        st.info("No models in weights/ yet. Train one on the Training page.")
    st.caption("Models: the card of each model lists its data, validation figures and operating points.")

navigation.run()
