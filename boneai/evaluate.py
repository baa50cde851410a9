"""Metrics, bootstrap intervals, operating points, calibration and study-level aggregation.

All functions take plain numpy arrays (labels 0/1, probabilities in [0, 1]) so the dashboard and the
CLI compute numbers the same way.

Example:
    >>> import numpy as np
    >>> from boneai.evaluate import binary_metrics
    >>> m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]), threshold=0.5)
    >>> round(m["auc"], 2), m["tp"], m["fp"]
    (0.75, 1, 1)
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

__all__ = [
    "confusion_at",
    "roc_auc",
    "threshold_metrics",
    "binary_metrics",
    "bootstrap_auc_ci",
    "sensitive_threshold",
    "youden_threshold",
    "operating_points",
    "expected_calibration_error",
    "calibration_curve",
    "fit_temperature",
    "fit_temperature_offset",
    "apply_temperature",
    "aggregate_study",
    "per_group_metrics",
    "regression_metrics",
]


def confusion_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    """TP/FP/TN/FN when ``p >= threshold`` is called positive."""
    y = np.asarray(y).astype(int)
    pred = np.asarray(p) >= threshold
    return {
        "tp": int(np.sum(pred & (y == 1))), "fp": int(np.sum(pred & (y == 0))),
        "tn": int(np.sum(~pred & (y == 0))), "fn": int(np.sum(~pred & (y == 1))),
    }


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, accuracy, precision, recall, F1 and Cohen's kappa at one threshold."""
    c = confusion_at(y, p, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    ppv, npv = _ratio(tp, tp + fp), _ratio(tn, tn + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    acc = _ratio(tp + tn, n)
    # Cohen's kappa from the 2x2 table (agreement of model and label beyond chance).
    pe = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n) if n else float("nan")
    kappa = _ratio(acc - pe, 1 - pe) if n else float("nan")
    return {"threshold": float(threshold), **c, "sensitivity": sens, "specificity": spec, "ppv": ppv,
            "npv": npv, "precision": ppv, "recall": sens, "f1": f1, "accuracy": acc, "kappa": kappa}


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC, or NaN when only one class is present (a tiny or one-sided split)."""
    y = np.asarray(y).astype(int)
    return float(skm.roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of ROC-AUC (resampling images with replacement)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    rng = np.random.default_rng(seed)
    aucs = []
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if y[idx].min() == y[idx].max():
            continue
        aucs.append(skm.roc_auc_score(y[idx], p[idx]))
    if not aucs:
        return float("nan"), float("nan")
    return float(np.quantile(aucs, alpha / 2)), float(np.quantile(aucs, 1 - alpha / 2))


def sensitive_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.90) -> float:
    """The highest threshold whose sensitivity is at least ``min_sensitivity`` (best specificity there)."""
    fpr, tpr, thr = skm.roc_curve(y, p)
    ok = np.where(tpr >= min_sensitivity)[0]
    t = float(thr[ok[0]]) if len(ok) else float(thr[-1])
    return float(min(t, 1.0))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1."""
    fpr, tpr, thr = skm.roc_curve(y, p)
    j = tpr - fpr
    return float(min(thr[int(np.argmax(j))], 1.0))


def operating_points(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.90) -> dict[str, dict[str, float]]:
    """The card's named operating points with their metrics on (validation) data."""
    points = {"sensitive": sensitive_threshold(y, p, min_sensitivity), "balanced": youden_threshold(y, p)}
    return {name: threshold_metrics(y, p, t) for name, t in points.items()}


def binary_metrics(y: Sequence[int], p: Sequence[float], threshold: float = 0.5, n_boot: int = 1000) -> dict[str, Any]:
    """ROC-AUC with bootstrap CI, AP, and the threshold metrics: the evaluate JSON's core."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    out: dict[str, Any] = {"n": int(len(y)), "n_positive": int(y.sum()), "n_negative": int((1 - y).sum())}
    both = 0 < y.sum() < len(y)
    out["auc"] = float(skm.roc_auc_score(y, p)) if both else float("nan")
    out["auc_ci95"] = list(bootstrap_auc_ci(y, p, n_boot=n_boot)) if both else [float("nan"), float("nan")]
    out["ap"] = float(skm.average_precision_score(y, p)) if both else float("nan")
    out["ece"] = expected_calibration_error(y, p)
    out.update(threshold_metrics(y, p, threshold))
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of |accuracy - confidence| weighted by bin size.

    For a binary probability the 'confidence' is the predicted positive rate and the 'accuracy' the
    observed positive rate in each bin (reliability-diagram form).
    """
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def calibration_curve(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data: per bin mean predicted probability, observed rate and count."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    rows = [{"bin": b, "mean_predicted": float(p[bins == b].mean()), "observed_rate": float(y[bins == b].mean()),
             "count": int((bins == b).sum())} for b in range(n_bins) if (bins == b).any()]
    return pd.DataFrame(rows)


def fit_temperature(y: np.ndarray, logits: np.ndarray) -> float:
    """Temperature T minimising the validation negative log-likelihood of ``sigmoid(logit / T)``."""
    y, z = np.asarray(y, dtype=float), np.asarray(logits, dtype=float)

    def nll(t: float) -> float:
        q = z / t
        return float(np.mean(np.logaddexp(0, q) - y * q))

    # NLL is unimodal in log T for binary logistic outputs; golden-section search on log T.
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(80):
        if nll(np.exp(a)) < nll(np.exp(b)):
            hi, b = b, a
            a = hi - g * (hi - lo)
        else:
            lo, a = a, b
            b = lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def fit_temperature_offset(y: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Temperature T and offset b minimising the validation NLL of ``sigmoid(logit / T + b)``.

    Temperature alone rescales logits; it cannot undo a shift. A positive-class weight in the loss
    (``bce`` with ``pos_weight``) shifts every logit by about ``log(pos_weight)``, so the offset is
    what brings predicted rates back to observed rates. Ranking (ROC-AUC) is unchanged.
    """
    from scipy.optimize import minimize

    y, z = np.asarray(y, dtype=float), np.asarray(logits, dtype=float)

    def nll(params: np.ndarray) -> float:
        q = z * np.exp(-params[0]) + params[1]  # T = exp(params[0]) keeps T positive
        return float(np.mean(np.logaddexp(0, q) - y * q))

    t0 = np.log(fit_temperature(y, z))
    res = minimize(nll, x0=np.array([t0, 0.0]), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
    return float(np.exp(res.x[0])), float(res.x[1])


def apply_temperature(logits: np.ndarray, temperature: float, offset: float = 0.0) -> np.ndarray:
    """Calibrated probability ``sigmoid(logit / T + offset)``."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=float) / float(temperature) + float(offset))))


def aggregate_study(view_probabilities: Iterable[float], method: str = "mean") -> float:
    """Study probability from its views: arithmetic mean as in MURA, or max (any view abnormal)."""
    values = np.asarray(list(view_probabilities), dtype=float)
    if values.size == 0:
        raise ValueError("a study needs at least one view")
    if method == "mean":
        return float(values.mean())
    if method == "max":
        return float(values.max())
    raise ValueError(f"unknown aggregation {method!r}; use 'mean' or 'max'")


def per_group_metrics(df: pd.DataFrame, group: str, threshold: float, label: str = "label", prob: str = "probability") -> pd.DataFrame:
    """One row of metrics per value of ``group`` (e.g. body region)."""
    rows = []
    for value, part in df.groupby(group):
        y, p = part[label].to_numpy(), part[prob].to_numpy()
        both = 0 < y.sum() < len(y)
        m = threshold_metrics(y, p, threshold)
        rows.append({group: value, "n": len(part), "n_positive": int(y.sum()),
                     "auc": float(skm.roc_auc_score(y, p)) if both else float("nan"),
                     "sensitivity": m["sensitivity"], "specificity": m["specificity"], "accuracy": m["accuracy"]})
    return pd.DataFrame(rows)


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """MAE, RMSE, bias (mean of prediction - truth) and Pearson r, in the target's units."""
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    err = p - t
    r = float(np.corrcoef(t, p)[0, 1]) if len(t) > 1 and t.std() > 0 and p.std() > 0 else float("nan")
    return {"n": int(len(t)), "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "bias": float(err.mean()), "pearson_r": r}
