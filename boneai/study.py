"""One study: how the per-view outputs make the study finding, and what a saved review records.

Study review (the page), the command line and the PACS batch (:mod:`boneai.pacs`) all call these, so
the study probability and the review record are made one way wherever a study is read.

Example:
    >>> from boneai.predictor import Prediction
    >>> views = [Prediction("fracture", "m", probability=0.2, threshold=0.5, operating_point="balanced"),
    ...          Prediction("fracture", "m", probability=0.9, threshold=0.5, operating_point="balanced")]
    >>> result = study_result(views, counted=[0, 1], aggregation="mean")
    >>> round(result.score, 3), result.finding
    (0.55, 'fracture')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from boneai.evaluate import aggregate_study
from boneai.predictor import Prediction

__all__ = ["FINDINGS", "AGGREGATIONS", "StudyResult", "finding_text", "view_value", "study_result", "review_record"]

#: Finding names of a positive and a negative decision, per task (bone age has no finding).
FINDINGS = {"fracture": ("fracture", "no fracture"), "anomaly": ("abnormal", "normal")}
#: How view probabilities make the study probability (:func:`boneai.evaluate.aggregate_study`).
AGGREGATIONS = ("mean", "max")


def finding_text(task: str, decision: bool | None) -> str | None:
    """'fracture' / 'no fracture' (or 'abnormal' / 'normal'); None without a decision or for bone age."""
    if decision is None or task not in FINDINGS:
        return None
    return FINDINGS[task][0] if decision else FINDINGS[task][1]


def view_value(prediction: Prediction) -> float | None:
    """The number a view contributes: its probability, bone age (months) or anomaly score."""
    for value in (prediction.probability, prediction.boneage_months, prediction.anomaly_score):
        if value is not None:
            return float(value)
    return None


@dataclass(frozen=True)
class StudyResult:
    """The study-level result.

    Attributes:
        task: fracture | anomaly | boneage.
        counted: indices of the views the study result uses (in scope, or shown anyway).
        score: study probability (or anomaly score); None for bone age or without counted views.
        decision: ``score >= threshold``; None where there is no score.
        threshold, operating_point: the views' decision threshold and its name.
        aggregation: mean | max (None for bone age).
        boneage_months: mean bone age of the counted views (bone age only).
    """

    task: str
    counted: tuple[int, ...]
    score: float | None
    decision: bool | None
    threshold: float | None
    operating_point: str | None
    aggregation: str | None
    boneage_months: float | None = None

    @property
    def finding(self) -> str | None:
        """'fracture', 'no fracture', 'abnormal', 'normal', or None."""
        return finding_text(self.task, self.decision)


def study_result(predictions: Sequence[Prediction], counted: Iterable[int], aggregation: str = "mean") -> StudyResult:
    """Aggregate per-view predictions into the study result.

    Args:
        predictions: one per view, in view order, all from one model at one operating point.
        counted: indices of the views that count (out-of-scope views do not, unless shown anyway).
        aggregation: ``mean`` (as in MURA) or ``max`` (the most suspicious view).
    """
    counted = tuple(sorted(int(k) for k in counted))
    if not predictions:
        raise ValueError("a study needs at least one view")
    task = predictions[0].task
    if task == "boneage":
        months = [predictions[k].boneage_months for k in counted]
        return StudyResult(task, counted, None, None, None, None, None,
                           float(np.mean(months)) if months else None)
    threshold = predictions[0].threshold
    op = None if predictions[0].operating_point is None else str(predictions[0].operating_point)
    if not counted:
        return StudyResult(task, counted, None, None, threshold, op, aggregation)
    score = aggregate_study([view_value(predictions[k]) for k in counted], aggregation)
    decision = None if threshold is None else bool(score >= threshold)
    return StudyResult(task, counted, score, decision, threshold, op, aggregation)


def review_record(*, study_label: str, view_labels: Sequence[str], predictions: Sequence[Prediction],
                  result: StudyResult, model_name: str, model_version: str, reviewer_decision: str,
                  note: str = "", reviewer: str | None = None, review_key: str | None = None,
                  familiarities: Sequence[float | None] | None = None) -> dict[str, Any]:
    """The keyword arguments of :meth:`boneai.store.ReviewStore.add` for one reviewed study.

    Views outside ``result.counted`` are logged without a value: they made no finding.
    ``familiarities``: each view's familiarity (None for a view out of scope), when the scope check gave any.
    """
    boneage = result.task == "boneage"
    return dict(
        study_id=study_label, views=list(view_labels), review_key=review_key, model_name=model_name,
        model_version=model_version, task=result.task,
        operating_point=None if boneage else result.operating_point,
        threshold=result.threshold, aggregation=None if boneage else result.aggregation,
        view_probabilities=[view_value(p) if k in result.counted else None for k, p in enumerate(predictions)],
        study_probability=result.score, boneage_months=result.boneage_months if boneage else None,
        model_decision=result.finding, reviewer_decision=reviewer_decision, note=note, reviewer=reviewer,
        view_familiarities=None if familiarities is None else list(familiarities),
    )
