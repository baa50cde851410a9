"""BoneAI Review: the router. Page setup, navigation over pages/, and the shared sidebar.

Run with ``streamlit run app.py`` (or ``make run``). Each screen lives in its own file in pages/.
"""

from __future__ import annotations

import streamlit as st

from boneai import __version__
from boneai.errors import BoneAIError
from ui.common import TASK_LABELS, TASKS, model_cards, remember_model, selected_card

st.set_page_config(page_title="BoneAI Review", page_icon=":material/radiology:", layout="wide")

navigation = st.navigation([
    st.Page("pages/study_review.py", title="Study review", icon=":material/radiology:", default=True),
    st.Page("pages/preprocessing.py", title="Preprocessing inspector", icon=":material/tune:"),
    st.Page("pages/performance.py", title="Model performance", icon=":material/monitoring:"),
    st.Page("pages/training.py", title="Training", icon=":material/model_training:"),
    st.Page("pages/review_log.py", title="Review log", icon=":material/fact_check:"),
])

with st.sidebar:
    st.markdown(f"**BoneAI Review** {__version__}")
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
