"""Scope and familiarity on the Study review page (see :mod:`boneai.scope`).

A view out of scope is shown greyed, with the reason and no finding, and it does not count in the
study probability, unless the reviewer chooses "Show anyway" for it; that choice is audited.
An unfamiliar view gets a note next to its finding, and a study whose views, taken together, are
unlike the training images (:func:`boneai.scope.set_familiarity`) gets one next to the study finding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from boneai.scope import UNFAMILIAR_NOTE, ScopeResult, check_views, set_familiarity
from boneai.store import view_label
from ui.common import View, audit, plain

__all__ = ["scope_for", "greyed", "out_of_scope_notice", "unfamiliar_note", "counted_views", "image_details",
           "report_notes", "log_familiarity"]


@st.cache_data(show_spinner="Checking the views...", max_entries=128)
def scope_for(digests: tuple[str, ...], _views: list[View], _predictor: Any = None,
              _predictions: list[Any] | None = None) -> list[ScopeResult]:
    """Scope and familiarity of the views; keyed by their contents. With the page's predictions of the
    scope model's own feature model (the default fracture model) its features are reused."""
    return check_views([v.radiograph for v in _views], predictor=_predictor, predictions=_predictions)


def greyed(gray: np.ndarray) -> np.ndarray:
    """The view washed out towards light grey: visible, but plainly not being read."""
    return (np.asarray(gray, np.float32) * 0.35 + 170.0).clip(0, 255).astype(np.uint8)


def _shown_key(number: int, digest: str) -> str:
    return f"show_anyway_{number}_{digest}"  # by position too: the same file uploaded twice is two views


def out_of_scope_notice(scope: ScopeResult, view: View, number: int, user: Any) -> bool:
    """For a view out of scope: the reason and a "Show anyway" toggle (audited once when switched on).

    Returns True when the finding is to be shown (in scope, or shown anyway).
    """
    if scope.in_scope:
        return True
    st.error(plain(f"Out of scope: {scope.reason}. No finding is shown for this view."), icon=":material/block:")
    shown = st.toggle("Show anyway", key=_shown_key(number, view.digest),
                      help="Show the model's output for this view and count it in the study. Your choice is "
                           "recorded in the audit log.")
    audited = st.session_state.setdefault("_show_anyway_audited", set())
    marker = (getattr(user, "name", ""), number, view.digest)
    if shown and marker not in audited:
        audited.add(marker)
        audit(user, "show-anyway", f"{view_label(number, view.digest)}: out of scope ({scope.reason})"[:1900])
    elif not shown:
        audited.discard(marker)
    return bool(shown)


def unfamiliar_note(scope: ScopeResult) -> None:
    """The unfamiliar-image note next to a finding, when the view is unfamiliar."""
    if scope.unfamiliar:
        st.warning(f"Unfamiliar image (familiarity {scope.familiarity:.3f}): {UNFAMILIAR_NOTE}.",
                   icon=":material/help:")


def counted_views(scopes: list[ScopeResult], views: list[View]) -> list[int]:
    """Indices of the views that count in the study: in scope, or shown anyway."""
    return [i for i, (s, v) in enumerate(zip(scopes, views))
            if s.in_scope or st.session_state.get(_shown_key(i + 1, v.digest), False)]


def image_details(view: View) -> None:
    """The view's format, size and safe metadata, as the page shows them for a view in scope."""
    rg = view.radiograph
    meta = {"format": rg.source_format, "size (px)": f"{rg.width} x {rg.height}",
            **{k: v for k, v in rg.metadata.items() if v not in (None, "")}}
    with st.expander("Image details"):
        st.json(meta)


def report_notes(scope: ScopeResult, excluded: bool, task: str) -> list[str]:
    """What the report says about a view's scope and (fracture task: the fracture model's) familiarity."""
    if not scope.in_scope:
        return [f"Out of scope: {scope.reason}. " + ("No finding." if excluded else "Shown anyway by the reviewer.")]
    if scope.unfamiliar and task == "fracture":
        return [f"Unfamiliar image: {UNFAMILIAR_NOTE}."]
    return []


def log_familiarity(reviews: Any) -> None:
    """Review log: the familiarity of the fracture reviews' views shown, taken together. A site whose
    images drift away from the training images shows here, even one single-view study at a time."""
    values = [f for task, fams in zip(reviews["task"], reviews["view_familiarities"]) if task == "fracture"
              for f in fams if f is not None]
    together = set_familiarity(values)
    if together is None:
        return
    if together.unfamiliar:
        st.warning(together.message("reviewed views"), icon=":material/help:")
    else:
        st.caption(together.message("reviewed views"))
