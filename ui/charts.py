"""Plotly figures and cached metric computations shared by the performance and training pages.

Computations are :func:`st.cache_data` keyed by the predictions file and its modification time, so
moving a threshold slider recomputes one confusion matrix, never the curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from sklearn import metrics as skm

from boneai import evaluate as ev

FIG_HEIGHT = 380


def file_key(path: str | Path) -> tuple[str, float]:
    """(path, mtime): a cache key that changes when the file is rewritten."""
    p = Path(path)
    return str(p), p.stat().st_mtime if p.is_file() else 0.0


@st.cache_data(show_spinner=False, max_entries=32)
def load_predictions(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_csv(path)


def prediction_kind(df: pd.DataFrame) -> str | None:
    """'binary' (label + probability or anomaly score), 'regression' (bone age) or None."""
    if "label" in df and ("probability" in df or "anomaly_score" in df):
        return "binary"
    if "boneage_months" in df and "predicted_months" in df:
        return "regression"
    return None


def score_column(df: pd.DataFrame) -> str:
    return "probability" if "probability" in df else "anomaly_score"


@st.cache_data(show_spinner=False, max_entries=32)
def curves(path: str, mtime: float) -> dict[str, Any]:
    """ROC and PR curves, AUC and AP of a binary predictions file (computed once per file)."""
    df = load_predictions(path, mtime)
    df = df.dropna(subset=[score_column(df)])
    y, p = df["label"].to_numpy().astype(int), df[score_column(df)].to_numpy(dtype=float)
    both = 0 < y.sum() < len(y)
    fpr, tpr, _ = skm.roc_curve(y, p) if both else (np.array([0, 1]), np.array([0, 1]), None)
    precision, recall, _ = skm.precision_recall_curve(y, p) if both else (np.array([1, 0]), np.array([0, 1]), None)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall,
            "auc": float(skm.roc_auc_score(y, p)) if both else float("nan"),
            "ap": float(skm.average_precision_score(y, p)) if both else float("nan"),
            "n": int(len(y)), "n_positive": int(y.sum())}


@st.cache_data(show_spinner=False, max_entries=256)
def metrics_at(path: str, mtime: float, threshold: float) -> dict[str, float]:
    df = load_predictions(path, mtime)
    df = df.dropna(subset=[score_column(df)])
    return ev.threshold_metrics(df["label"].to_numpy(), df[score_column(df)].to_numpy(dtype=float), threshold)


@st.cache_data(show_spinner=False, max_entries=256)
def per_region_at(path: str, mtime: float, threshold: float) -> pd.DataFrame:
    df = load_predictions(path, mtime)
    if "region" not in df:
        return pd.DataFrame()
    return ev.per_group_metrics(df.dropna(subset=[score_column(df)]), "region", threshold, prob=score_column(df))


@st.cache_data(show_spinner=False, max_entries=32)
def calibration(path: str, mtime: float, n_bins: int = 10) -> tuple[pd.DataFrame, float]:
    df = load_predictions(path, mtime).dropna(subset=["probability"])
    y, p = df["label"].to_numpy(), df["probability"].to_numpy(dtype=float)
    return ev.calibration_curve(y, p, n_bins), ev.expected_calibration_error(y, p, n_bins)


def confusion_frame(m: dict[str, float]) -> pd.DataFrame:
    """2x2 table: rows = truth, columns = model."""
    return pd.DataFrame({"model: positive": [int(m["tp"]), int(m["fp"])], "model: negative": [int(m["fn"]), int(m["tn"])]},
                        index=["truth: positive", "truth: negative"])


def confusion_figure(m: dict[str, float]) -> go.Figure:
    z = [[m["tp"], m["fn"]], [m["fp"], m["tn"]]]
    fig = go.Figure(go.Heatmap(z=z, x=["model positive", "model negative"], y=["truth positive", "truth negative"],
                               text=[[str(int(v)) for v in row] for row in z], texttemplate="%{text}",
                               colorscale="Blues", showscale=False))
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), title="Confusion matrix",
                      yaxis=dict(autorange="reversed"))
    return fig


def roc_figure(c: dict[str, Any], point: dict[str, float] | None = None) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=f"ROC (AUC {c['auc']:.3f})"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), name="chance"))
    if point is not None:
        fig.add_trace(go.Scatter(x=[1 - point["specificity"]], y=[point["sensitivity"]], mode="markers",
                                 marker=dict(size=13, color="crimson", symbol="x"),
                                 name=f"threshold {point['threshold']:.3f}"))
    fig.update_layout(height=FIG_HEIGHT, margin=dict(l=10, r=10, t=40, b=10), title="ROC curve",
                      xaxis_title="1 - specificity", yaxis_title="sensitivity", legend=dict(x=0.45, y=0.05))
    return fig


def pr_figure(c: dict[str, Any], point: dict[str, float] | None = None) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=c["recall"], y=c["precision"], mode="lines", name=f"PR (AP {c['ap']:.3f})"))
    prevalence = c["n_positive"] / c["n"] if c["n"] else 0
    fig.add_trace(go.Scatter(x=[0, 1], y=[prevalence, prevalence], mode="lines", line=dict(dash="dot", color="grey"),
                             name="prevalence"))
    if point is not None and not np.isnan(point["ppv"]):
        fig.add_trace(go.Scatter(x=[point["sensitivity"]], y=[point["ppv"]], mode="markers",
                                 marker=dict(size=13, color="crimson", symbol="x"),
                                 name=f"threshold {point['threshold']:.3f}"))
    fig.update_layout(height=FIG_HEIGHT, margin=dict(l=10, r=10, t=40, b=10), title="Precision-recall curve",
                      xaxis_title="recall (sensitivity)", yaxis_title="precision (PPV)", legend=dict(x=0.02, y=0.05))
    return fig


def calibration_figure(table: pd.DataFrame, ece: float) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), name="perfect"))
    fig.add_trace(go.Scatter(x=table["mean_predicted"], y=table["observed_rate"], mode="lines+markers",
                             marker=dict(size=6 + 14 * table["count"] / max(1, table["count"].max())),
                             text=[f"n={n}" for n in table["count"]], name="model"))
    fig.update_layout(height=FIG_HEIGHT, margin=dict(l=10, r=10, t=40, b=10), title=f"Calibration (ECE {ece:.3f})",
                      xaxis_title="mean predicted probability", yaxis_title="observed fracture rate",
                      xaxis=dict(range=[0, 1]), yaxis=dict(range=[0, 1]))
    return fig


def boneage_figure(df: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for male, name in ((True, "male"), (False, "female")):
        part = df[df["male"].astype(str).str.lower().isin(["true", "1"]) == male] if "male" in df else df
        fig.add_trace(go.Scatter(x=part["boneage_months"], y=part["predicted_months"], mode="markers",
                                 marker=dict(size=5, opacity=0.6), name=name))
        if "male" not in df:
            break
    lo = float(min(df["boneage_months"].min(), df["predicted_months"].min()))
    hi = float(max(df["boneage_months"].max(), df["predicted_months"].max()))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), name="identity"))
    fig.update_layout(height=FIG_HEIGHT + 60, margin=dict(l=10, r=10, t=40, b=10), title="Predicted vs reference bone age",
                      xaxis_title="reference (months)", yaxis_title="predicted (months)")
    return fig


def history_figure(history: list[dict[str, Any]]) -> go.Figure:
    """Training and validation loss per epoch, with the validation AUC or MAE on a second axis."""
    df = pd.DataFrame(history)
    fig = go.Figure()
    if df.empty:
        return fig
    fig.add_trace(go.Scatter(x=df["epoch"], y=df["train_loss"], mode="lines+markers", name="train loss"))
    fig.add_trace(go.Scatter(x=df["epoch"], y=df["val_loss"], mode="lines+markers", name="validation loss"))
    for col, label in (("val_auc", "validation AUC"), ("val_mae", "validation MAE")):
        if col in df:
            fig.add_trace(go.Scatter(x=df["epoch"], y=df[col], mode="lines+markers", name=label, yaxis="y2",
                                     line=dict(dash="dash")))
    fig.update_layout(height=FIG_HEIGHT, margin=dict(l=10, r=10, t=40, b=10), title="Loss curves",
                      xaxis_title="epoch", yaxis_title="loss",
                      yaxis2=dict(overlaying="y", side="right", title="validation metric"))
    return fig


def froc_figure(curves: dict[str, pd.DataFrame]) -> go.Figure:
    """FROC curves: share of annotated fracture boxes found against false-positive boxes per image."""
    fig = go.Figure()
    for label, df in curves.items():
        fig.add_trace(go.Scatter(x=df["fp_per_image"], y=df["sensitivity"], mode="lines", name=label))
    fig.update_layout(title="FROC (test split)", xaxis_title="False-positive boxes per image",
                      yaxis_title="Fracture boxes found (IoU >= 0.2)", xaxis_range=[0, 4], yaxis_range=[0, 1],
                      height=360, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def localisation_section(card: dict[str, Any], fracture_cards: list[dict[str, Any]]) -> None:
    """How far each kind of visual evidence can be trusted: the localiser's boxes against the Grad-CAM
    baseline, on the test split (from the cards and bench/results)."""
    localisers = [c for c in fracture_cards if c.get("kind") == "localiser" and c.get("test")]
    if card.get("task") != "fracture" or not localisers:
        return
    st.subheader("Where is the fracture? Boxes and heatmaps")
    rows = []
    for c in localisers:
        t = c["test"]
        rows.append({"evidence": f"boxes ({c['name']})", "hit rate": t.get("hit_rate"),
                     "FROC @ 0.5 FP": t.get("froc", {}).get("0.5"), "FROC @ 1 FP": t.get("froc", {}).get("1"),
                     "FROC @ 2 FP": t.get("froc", {}).get("2"), "mAP@50": t.get("map50"),
                     "images (fractured)": f"{t.get('n_images')} ({t.get('n_fractured_images')})"})
    baseline = Path(__file__).resolve().parents[1] / "bench" / "results" / "test_localisation_gradcam.json"
    if baseline.is_file():
        import json

        b = json.loads(baseline.read_text())
        rows.append({"evidence": f"Grad-CAM peak ({b.get('model')})", "hit rate": b.get("hit_rate"),
                     "FROC @ 0.5 FP": None, "FROC @ 1 FP": None, "FROC @ 2 FP": None, "mAP@50": None,
                     "images (fractured)": f"{b.get('n_images')} ({b.get('n_fractured_images')})"})
    st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
        k: st.column_config.NumberColumn(format="%.3f")
        for k in ("hit rate", "FROC @ 0.5 FP", "FROC @ 1 FP", "FROC @ 2 FP", "mAP@50")})
    st.caption("Hit rate: share of fractured test images whose top box overlaps an annotated fracture box "
               "(IoU >= 0.2) or has its centre inside one; for Grad-CAM, whether the heatmap's peak lies inside one. "
               "Heatmaps show where a classifier looked, not where the fracture is.")
    curves = {}
    for c in localisers:
        path = Path(c["dir"]) / "test_froc.csv"
        if path.is_file():
            curves[c["name"]] = pd.read_csv(path)
    if curves:
        st.plotly_chart(froc_figure(curves), key="perf_froc")
