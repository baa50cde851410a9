"""Model performance: each model's saved validation predictions, explored at any threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from boneai import evaluate as ev
from ui import charts
from ui.common import TASK_LABELS, intended_use_note, model_cards, require_role, route_through_app, selected_card

route_through_app()
require_role("reviewer")  # any signed-in user; refuses when nobody may use the app


def fmt(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


st.title("Model performance")
intended_use_note()

cards = [c for c in model_cards() if (Path(c["dir"]) / "val_predictions.csv").is_file()]
if not cards:
    st.warning("No model in weights/ has saved validation predictions (val_predictions.csv).")
    st.stop()

names = [c["name"] for c in cards]
preferred = selected_card("fracture")
name = st.selectbox("Model", names, key="perf_model",
                    index=names.index(preferred["name"]) if preferred and preferred["name"] in names else 0,
                    format_func=lambda n: f"{n} ({TASK_LABELS.get(next(c for c in cards if c['name'] == n)['task'], '')})")
card = next(c for c in cards if c["name"] == name)
has_test = (Path(card["dir"]) / "test_predictions.csv").is_file()
split_name = st.radio(
    "Images", ["test", "validation"] if has_test else ["validation"], horizontal=True, key=f"perf_split_{name}",
    format_func={"test": "Test split (no choice made on it)", "validation": "Validation split (choices made on it)"}.get,
    help="Thresholds, calibration, epochs and models were chosen on the validation split, so its figures are "
         "optimistic. The test split was touched once, for the figures to trust.")
path, mtime = charts.file_key(Path(card["dir"]) / ("test_predictions.csv" if split_name == "test" else "val_predictions.csv"))
df = charts.load_predictions(path, mtime)
kind = charts.prediction_kind(df)
validation = card.get("test" if split_name == "test" else "validation", {})
if split_name == "validation":
    st.warning("Validation figures: the operating points and calibration were chosen on these images.",
               icon=":material/info:")
st.caption(f"{split_name.capitalize()} split: {len(df)} images. Architecture: {card.get('architecture', card.get('kind', 'n/a'))}. "
           + (f"Split file: {card['protocol']['split_file']}." if card.get("protocol") else ""))

if kind == "binary":
    curves = charts.curves(path, mtime)
    points = {k: float(v["threshold"]) for k, v in card.get("operating_points", {}).items()}
    default_point = card.get("default_operating_point", "balanced")
    score = charts.score_column(df)
    high = 1.0 if score == "probability" else float(np.nanmax(df[score])) * 1.05
    start = points.get(default_point, 0.5 if high == 1.0 else high / 2)

    t_key, p_key = f"perf_threshold_{name}", f"perf_preset_{name}"
    st.session_state.setdefault(t_key, float(start))

    def snap_to_point() -> None:
        if st.session_state[p_key] in points:
            st.session_state[t_key] = points[st.session_state[p_key]]

    def mark_custom() -> None:
        st.session_state[p_key] = "custom"

    left, right = st.columns([2, 3])
    with left:
        options = list(points) + ["custom"]
        st.radio("Operating point", options, horizontal=True, key=p_key, on_change=snap_to_point,
                 index=options.index(default_point) if default_point in options else len(options) - 1,
                 format_func=lambda p: p if p == "custom" else f"{p} ({points[p]:.4g})",
                 help="The model card's operating points; moving the slider makes it custom.")
        threshold = st.slider("Threshold", 0.0, high, step=0.001 if high == 1.0 else high / 1000,
                              format="%.3f" if high == 1.0 else "%.5f",
                              key=t_key, on_change=mark_custom,
                              help="A view is called positive when its probability is at or above this.")
    m = charts.metrics_at(path, mtime, float(threshold))
    with right:
        cols = st.columns(3)
        for col, (label, key) in zip(cols * 2, [("Sensitivity", "sensitivity"), ("Specificity", "specificity"),
                                                 ("PPV", "ppv"), ("NPV", "npv"), ("F1", "f1"), ("Cohen's kappa", "kappa")]):
            col.metric(label, fmt(m[key]))
    a1, a2, a3 = st.columns(3)
    a1.metric("ROC AUC", fmt(curves["auc"]),
              help="95% CI " + " - ".join(fmt(v) for v in validation.get("auc_ci95", [])) if validation.get("auc_ci95") else None)
    a2.metric("Average precision", fmt(curves["ap"]))
    a3.metric("Images (positive)", f"{curves['n']} ({curves['n_positive']})")

    c1, c2 = st.columns([1, 2])
    with c1:
        st.plotly_chart(charts.confusion_figure(m), key="perf_confusion")
        with st.expander("As a table"):
            st.dataframe(charts.confusion_frame(m))
    with c2:
        st.plotly_chart(charts.roc_figure(curves, m), key="perf_roc")
    c3, c4 = st.columns(2)
    with c3:
        st.plotly_chart(charts.pr_figure(curves, m), key="perf_pr")
    with c4:
        if score == "probability":
            table, ece = charts.calibration(path, mtime)
            st.plotly_chart(charts.calibration_figure(table, ece), key="perf_calibration")
    regions = charts.per_region_at(path, mtime, float(threshold))
    if not regions.empty:
        st.subheader("Per body region")
        st.dataframe(regions, hide_index=True, column_config={
            c: st.column_config.NumberColumn(format="%.3f") for c in ("auc", "sensitivity", "specificity", "accuracy")})
elif kind == "regression":
    reg = ev.regression_metrics(df["boneage_months"], df["predicted_months"])
    c = st.columns(4)
    c[0].metric("MAE (months)", f"{reg['mae']:.2f}")
    c[1].metric("RMSE (months)", f"{reg['rmse']:.2f}")
    c[2].metric("Bias (months)", f"{reg['bias']:+.2f}")
    c[3].metric("Pearson r", fmt(reg["pearson_r"]))
    st.plotly_chart(charts.boneage_figure(df), key="perf_boneage")
    if "male" in df:
        rows = []
        for sex, part in df.groupby(df["male"].astype(str).str.lower().isin(["true", "1"])):
            r = ev.regression_metrics(part["boneage_months"], part["predicted_months"])
            rows.append({"sex": "male" if sex else "female", "n": r["n"], "MAE": r["mae"], "bias": r["bias"]})
        st.dataframe(rows, hide_index=True)
else:
    st.warning("This model's validation predictions have columns this page does not know.")

charts.localisation_section(card, model_cards("fracture"))

with st.expander("Model card"):
    st.json({k: v for k, v in card.items() if k != "training"})
