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

from boneai.card import DEFAULT_OPERATING_POINT


__all__ = [
    "box_iou",
    "hit_rate",
    "froc",
    "sensitivity_at_specificity",
    "box_counts",
    "average_precision_at",
    "localisation_figures",
    "point_hit_rate",
    "froc_curve",
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
    "classifier_validation",
]


def _metrics() -> Any:
    """scikit-learn's metrics, imported on first use: about 1 s of the app's cold start that its first
    page (Study review) does not need."""
    from sklearn import metrics

    return metrics


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
    return float(_metrics().roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


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
        aucs.append(_metrics().roc_auc_score(y[idx], p[idx]))
    if not aucs:
        return float("nan"), float("nan")
    return float(np.quantile(aucs, alpha / 2)), float(np.quantile(aucs, 1 - alpha / 2))


def sensitive_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.90) -> float:
    """The highest threshold whose sensitivity is at least ``min_sensitivity`` (best specificity there)."""
    fpr, tpr, thr = _metrics().roc_curve(y, p)
    ok = np.where(tpr >= min_sensitivity)[0]
    t = float(thr[ok[0]]) if len(ok) else float(thr[-1])
    return float(min(t, 1.0))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1."""
    fpr, tpr, thr = _metrics().roc_curve(y, p)
    j = tpr - fpr
    return float(min(thr[int(np.argmax(j))], 1.0))


def operating_points(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.90) -> dict[str, dict[str, float]]:
    """The card's named operating points with their metrics on (validation) data."""
    points = {"sensitive": sensitive_threshold(y, p, min_sensitivity), "balanced": youden_threshold(y, p)}
    return {name: threshold_metrics(y, p, t) for name, t in points.items()}


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float = 0.90) -> float:
    """The best sensitivity among thresholds whose specificity is at least ``specificity``."""
    fpr, tpr, _ = _metrics().roc_curve(np.asarray(y).astype(int), np.asarray(p, dtype=float))
    ok = fpr <= 1 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def binary_metrics(y: Sequence[int], p: Sequence[float], threshold: float = 0.5, n_boot: int = 1000) -> dict[str, Any]:
    """ROC-AUC with bootstrap CI, AP, and the threshold metrics: the evaluate JSON's core."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    out: dict[str, Any] = {"n": int(len(y)), "n_positive": int(y.sum()), "n_negative": int((1 - y).sum())}
    both = 0 < y.sum() < len(y)
    out["auc"] = float(_metrics().roc_auc_score(y, p)) if both else float("nan")
    out["auc_ci95"] = list(bootstrap_auc_ci(y, p, n_boot=n_boot)) if both else [float("nan"), float("nan")]
    out["ap"] = float(_metrics().average_precision_score(y, p)) if both else float("nan")
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
                     "auc": float(_metrics().roc_auc_score(y, p)) if both else float("nan"),
                     "sensitivity": m["sensitivity"], "specificity": m["specificity"], "accuracy": m["accuracy"]})
    return pd.DataFrame(rows)


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """MAE, RMSE, bias (mean of prediction - truth) and Pearson r, in the target's units."""
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    err = p - t
    r = float(np.corrcoef(t, p)[0, 1]) if len(t) > 1 and t.std() > 0 and p.std() > 0 else float("nan")
    return {"n": int(len(t)), "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "bias": float(err.mean()), "pearson_r": r}


def classifier_validation(preds: pd.DataFrame, has_region: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Calibration, operating points and validation metrics of a classifier from its validation
    logits (``preds`` with ``label``, ``logit`` and optionally ``region``); card fields and the
    calibrated probabilities."""
    y, raw = preds["label"].to_numpy().astype(int), preds["logit"].to_numpy(dtype=float)
    temperature, offset = fit_temperature_offset(y, raw)
    prob = apply_temperature(raw, temperature, offset)
    ece_before = {"uncalibrated": expected_calibration_error(y, apply_temperature(raw, 1.0)),
                  "temperature_only": expected_calibration_error(
                      y, apply_temperature(raw, fit_temperature(y, raw)))}
    points = operating_points(y, prob)
    metrics = binary_metrics(y, prob, threshold=points[DEFAULT_OPERATING_POINT]["threshold"])
    fields: dict[str, Any] = {
        "temperature": temperature,
        "logit_offset": offset,
        "calibration": "p = sigmoid(logit / temperature + logit_offset), fitted on the validation split",
        "operating_points": {k: {"threshold": v["threshold"], "sensitivity": v["sensitivity"],
                                 "specificity": v["specificity"], "ppv": v["ppv"], "npv": v["npv"]}
                             for k, v in points.items()},
        "default_operating_point": DEFAULT_OPERATING_POINT,
        "validation": {**{k: metrics[k] for k in ("n", "n_positive", "auc", "auc_ci95", "ap", "ece")},
                       "ece_uncalibrated": ece_before["uncalibrated"],
                       "ece_temperature_only": ece_before["temperature_only"]},
    }
    if has_region and "region" in preds:
        with_prob = preds.assign(probability=prob)
        fields["validation"]["per_region"] = per_group_metrics(
            with_prob, "region", points[DEFAULT_OPERATING_POINT]["threshold"]).to_dict(orient="records")
    return fields, prob


# --- Localisation: boxes (x0, y0, x1, y1[, score]) per image ------------------------------------

#: IoU at which a predicted box counts as finding an annotated fracture box (hit rate and FROC).
HIT_IOU = 0.2
FROC_RATES = (0.5, 1.0, 2.0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (n, 4+) with every box in ``b`` (m, 4+)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1] if np.size(a) else 4)[:, :4]
    b = np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1] if np.size(b) else 4)[:, :4]
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _top_box(pred: np.ndarray) -> np.ndarray | None:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 5)
    return pred[int(np.argmax(pred[:, 4]))] if len(pred) else None


def _hit_share(truths: Sequence[np.ndarray], found: Any) -> float | None:
    """Share of images with annotated boxes for which ``found(k, truth)`` is true; None without any."""
    hits, n = 0, 0
    for k, truth in enumerate(truths):
        truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
        if len(truth):
            n += 1
            hits += bool(found(k, truth))
    return hits / n if n else None


def _inside(x: float, y: float, truth: np.ndarray) -> bool:
    return bool(((truth[:, 0] <= x) & (x <= truth[:, 2]) & (truth[:, 1] <= y) & (y <= truth[:, 3])).any())


def hit_rate(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou: float = HIT_IOU) -> float | None:
    """Share of images with annotated boxes whose top-scoring predicted box finds one.

    Found means IoU >= ``iou`` with an annotated box, or the predicted box's centre inside one.
    An image without predicted boxes is a miss. ``None`` when no image has an annotated box.
    """
    def found(k: int, truth: np.ndarray) -> bool:
        top = _top_box(preds[k])
        return top is not None and (_inside((top[0] + top[2]) / 2, (top[1] + top[3]) / 2, truth)
                                    or bool((box_iou(top[None], truth) >= iou).any()))

    return _hit_share(truths, found)


def point_hit_rate(points: Sequence[tuple[float, float] | None], truths: Sequence[np.ndarray]) -> float | None:
    """Share of images with annotated boxes whose point (a heatmap peak) lies inside one of them."""
    return _hit_share(truths, lambda k, truth: points[k] is not None and _inside(*points[k], truth))


def _matched(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Every predicted box's score and whether it is a true positive (greedy by score per image,
    each annotated box found at most once; a second box on it is a false positive), and the
    number of annotated boxes."""
    scores, tps, n_truth = [], [], 0
    for pred, truth in zip(preds, truths):
        pred = np.asarray(pred, dtype=np.float64).reshape(-1, 5)
        truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
        n_truth += len(truth)
        order = np.argsort(-pred[:, 4], kind="stable")
        overlaps = box_iou(pred[order], truth)
        used = np.zeros(len(truth), bool)
        for k, i in enumerate(order):
            tp = False
            if len(truth):
                cand = np.where(~used & (overlaps[k] >= iou))[0]
                if len(cand):
                    used[cand[np.argmax(overlaps[k][cand])]] = True
                    tp = True
            scores.append(pred[i, 4])
            tps.append(tp)
    return np.asarray(scores), np.asarray(tps, bool), n_truth


def box_counts(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou: float = HIT_IOU) -> tuple[int, int, int]:
    """(annotated boxes found, false-positive boxes, annotated boxes) over all images."""
    _, tps, n_truth = _matched(preds, truths, iou)
    return int(tps.sum()), int((~tps).sum()), n_truth


def froc(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], rates: Sequence[float] = FROC_RATES,
         iou: float = HIT_IOU) -> dict[str, float | None]:
    """Share of annotated boxes found at a score threshold allowing at most ``rate`` false-positive
    boxes per image (over all images, normal ones included), for each rate."""
    scores, tps, n_truth = _matched(preds, truths, iou)
    n_images = len(preds)
    if not n_truth or not n_images:
        return {_rate_key(r): None for r in rates}
    order = np.argsort(-scores, kind="stable")
    tp_cum, fp_cum = np.cumsum(tps[order]), np.cumsum(~tps[order])
    # Only cut between distinct scores: boxes with equal scores are kept or dropped together.
    last_of_score = np.r_[scores[order][1:] != scores[order][:-1], True] if len(order) else np.array([], bool)
    out = {}
    for r in rates:
        ok = (fp_cum / n_images <= r) & last_of_score
        out[_rate_key(r)] = float(tp_cum[ok].max() / n_truth) if ok.any() else 0.0
    return out


def froc_curve(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou: float = HIT_IOU) -> pd.DataFrame:
    """The whole FROC curve: false positives per image and sensitivity at every score threshold."""
    scores, tps, n_truth = _matched(preds, truths, iou)
    order = np.argsort(-scores, kind="stable")
    n_images = max(1, len(preds))
    return pd.DataFrame({"score": scores[order], "fp_per_image": np.cumsum(~tps[order]) / n_images,
                         "sensitivity": np.cumsum(tps[order]) / max(1, n_truth)})


def _rate_key(rate: float) -> str:
    return str(int(rate)) if float(rate).is_integer() else str(rate)


def average_precision_at(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou: float = 0.5) -> float | None:
    """Average precision of the boxes at an IoU (all-point interpolation, as PASCAL VOC 2010+)."""
    scores, tps, n_truth = _matched(preds, truths, iou)
    if not n_truth:
        return None
    if not len(scores):
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp_cum = np.cumsum(tps[order])
    precision = tp_cum / np.arange(1, len(order) + 1)
    recall = tp_cum / n_truth
    precision = np.maximum.accumulate(np.r_[precision, 0.0][::-1])[::-1]
    recall = np.r_[0.0, recall]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[:-1]))


def localisation_figures(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                         labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Hit rate, FROC at 0.5/1/2 false positives per image and mAP@0.5 of predicted boxes."""
    n_fractured = sum(1 for t in truths if np.size(t)) if labels is None else int(np.sum(np.asarray(labels) == 1))
    rate = hit_rate(preds, truths)
    ap = average_precision_at(preds, truths, 0.5)
    return {"n_images": len(preds), "n_fractured_images": n_fractured,
            "n_boxes": int(sum(np.asarray(t).reshape(-1, 4).shape[0] for t in truths)),
            "hit_rate": None if rate is None else round(rate, 4),
            "froc": {k: (None if v is None else round(v, 4)) for k, v in froc(preds, truths).items()},
            "map50": None if ap is None else round(ap, 4)}
