"""Metrics against scikit-learn and hand-checked values."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from boneai import evaluate as ev


@pytest.fixture()
def scores():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    return y, p


def test_threshold_metrics_agree_with_sklearn(scores):
    y, p = scores
    m = ev.threshold_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["npv"] == pytest.approx(tn / (tn + fn))


def test_binary_metrics_auc_ap_and_interval(scores):
    y, p = scores
    m = ev.binary_metrics(y, p, threshold=0.5, n_boot=300)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["ap"] == pytest.approx(skm.average_precision_score(y, p))
    lo, hi = m["auc_ci95"]
    assert lo < m["auc"] < hi and hi - lo < 0.15
    assert m["n"] == 400


def test_operating_points(scores):
    y, p = scores
    t_sens = ev.sensitive_threshold(y, p, 0.9)
    assert ev.threshold_metrics(y, p, t_sens)["sensitivity"] >= 0.9
    # The highest such threshold: a slightly higher one drops below 0.9.
    assert ev.threshold_metrics(y, p, t_sens + 1e-9)["sensitivity"] < 0.9
    t_j = ev.youden_threshold(y, p)
    fpr, tpr, thr = skm.roc_curve(y, p)
    best_j = (tpr - fpr).max()
    m = ev.threshold_metrics(y, p, t_j)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(best_j)


def test_expected_calibration_error_hand_example():
    y = np.array([0, 1, 1, 1])
    p = np.array([0.05, 0.95, 0.95, 0.55])
    # bins: 0 -> {0.05} |0-0.05|; 9 -> {0.95,0.95} |1-0.95|; 5 -> {0.55} |1-0.55|
    expected = 0.25 * 0.05 + 0.5 * 0.05 + 0.25 * 0.45
    assert ev.expected_calibration_error(y, p) == pytest.approx(expected)


def test_temperature_scaling_reduces_nll_of_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    true_logit = (y * 2 - 1) * 1.0 + rng.normal(0, 1.5, 2000)
    overconfident = true_logit * 4
    t = ev.fit_temperature(y, overconfident)
    assert 2.5 < t < 6

    def nll(prob):
        return -np.mean(y * np.log(prob) + (1 - y) * np.log(1 - prob))

    assert nll(ev.apply_temperature(overconfident, t)) < nll(ev.apply_temperature(overconfident, 1.0))


def test_study_aggregation():
    assert ev.aggregate_study([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    assert ev.aggregate_study([0.2, 0.4, 0.9], "max") == pytest.approx(0.9)
    with pytest.raises(ValueError):
        ev.aggregate_study([])


def test_per_group_and_regression_metrics():
    df = pd.DataFrame({"region": ["hand"] * 4 + ["leg"] * 4, "label": [0, 1, 0, 1, 0, 0, 1, 1],
                       "probability": [0.1, 0.9, 0.2, 0.8, 0.6, 0.4, 0.3, 0.7]})
    table = ev.per_group_metrics(df, "region", 0.5).set_index("region")
    assert table.loc["hand", "auc"] == pytest.approx(1.0)
    assert table.loc["leg", "auc"] == pytest.approx(0.5)
    r = ev.regression_metrics([100, 120, 140], [110, 110, 150])
    assert r["mae"] == pytest.approx(10.0) and r["bias"] == pytest.approx(10 / 3)


def test_temperature_with_offset_undoes_a_positive_weight_shift():
    rng = np.random.default_rng(3)
    y = (rng.random(4000) < 0.2).astype(int)
    logit = (y * 2 - 1) * 1.2 + rng.normal(0, 1.0, 4000)
    shifted = logit + np.log(4.0)  # what a pos_weight of 4 does to a model's logits
    t_only = ev.apply_temperature(shifted, ev.fit_temperature(y, shifted))
    t, b = ev.fit_temperature_offset(y, shifted)
    both = ev.apply_temperature(shifted, t, b)
    assert b < 0 and both.mean() == pytest.approx(y.mean(), abs=0.01)  # predicted rate = observed rate
    assert ev.expected_calibration_error(y, both) < 0.03 < ev.expected_calibration_error(y, t_only)
    assert skm.roc_auc_score(y, both) == pytest.approx(skm.roc_auc_score(y, shifted))
