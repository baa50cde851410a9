"""Batch evaluation of a model on a labelled folder, and prediction over a list of files.

These are what ``python -m boneai evaluate`` (``evaluate --task localisation`` included) and ``predict``
run; hospital scripts can call them too.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from boneai import evaluate as ev
from boneai.data import (
    fracture_boxes,
    image_files,
    read_boneage,
    read_classification_dir,
    read_fracatlas,
    read_split_file,
)
from boneai.errors import BoneAIError, DatasetError
from boneai.inference import ModelPredictor, default_model_name, load_model
from boneai.io import read_radiograph
from boneai.localisation import LocaliserPredictor, _box_point_figures, truth_boxes
from boneai.scope import check_views

__all__ = ["evaluate_folder", "evaluate_localisation", "predict_files", "predict_dataframe", "expand_inputs",
           "read_files"]


def read_files(paths: Sequence[str], root: str | Path | None = None) -> tuple[list[Any], list[dict[str, str]]]:
    """Each file read (None where it cannot be), and ``{file, error}`` for those: ``file`` is the path
    inside ``root`` when given (exports repeat names like ``IM00001``), else the file name."""
    images, errors = [], []
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images.append(read_radiograph(p))
        except BoneAIError as exc:
            images.append(None)
            name = Path(p).relative_to(root).as_posix() if root and Path(p).is_relative_to(root) else Path(p).name
            errors.append({"file": name, "error": str(exc)})
    return images, errors


def predict_dataframe(predictor: ModelPredictor, df: pd.DataFrame, batch_size: int = 32,
                      male_column: str | None = None,
                      root: str | Path | None = None) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Raw outputs (logits, months or anomaly scores) for every row's ``path``; NaN where unreadable
    (named by their path inside ``root``, see :func:`read_files`)."""
    out = np.full(len(df), np.nan)
    errors: list[dict[str, str]] = []
    paths = df["path"].tolist()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images, errs = read_files(chunk, root)
        errors.extend(errs)
        idx = [i for i, im in enumerate(images) if im is not None]
        if not idx:
            continue
        male = None
        if male_column:
            male = [bool(v) for v in df[male_column].iloc[[start + i for i in idx]]]
        preds = predictor.predict_many([images[i] for i in idx], male=male)
        for i, p in zip(idx, preds):
            out[start + i] = p.boneage_months if p.boneage_months is not None else (
                p.anomaly_score if p.anomaly_score is not None else p.logit)
    return out, errors


def evaluate_folder(task: str, data: str | Path, model: str | None = None, region: str | None = None,
                    batch_size: int = 32, predictions_csv: str | Path | None = None,
                    split: str | Path | None = None, subset: str | None = None) -> dict[str, Any]:
    """Evaluate a model on a labelled folder; the dict is the ``evaluate`` JSON report.

    With ``split`` (a split file: image_id, split) and ``subset``, only that subset's images count:
    ``subset="test"`` gives the figures no choice touched.
    """
    predictor = load_model(model or default_model_name(task))  # the task's default, not a model named like it
    if predictor.task != task:
        raise BoneAIError(f"Model {predictor.name!r} is a {predictor.task} model, not a {task} model.")
    report: dict[str, Any] = {"task": task, "model": predictor.name, "data": str(data)}
    if task == "boneage":
        df = read_boneage(data)
        months, errors = predict_dataframe(predictor, df, batch_size, male_column="male", root=data)
        ok = ~np.isnan(months)
        m = ev.regression_metrics(df["boneage_months"].to_numpy()[ok], months[ok])
        report.update({"n": m["n"], "mae_months": m["mae"], "rmse_months": m["rmse"], "bias_months": m["bias"],
                       "pearson_r": m["pearson_r"], "skipped": errors})
        df["predicted_months"] = months
    else:
        df = read_classification_dir(data)
        if split is not None:
            df = df.merge(read_split_file(split)[["image_id", "split"]], on="image_id")
            df = df[df["split"] == subset].reset_index(drop=True) if subset else df
            if df.empty:
                raise BoneAIError(f"No images of {data} in subset {subset!r} of the split file {split}.")
            report["split"], report["subset"] = str(split), subset
        if region:
            if "region" not in df or not (df["region"] == region).any():
                raise BoneAIError(f"No images of region {region!r} in {data}.")
            df = df[df["region"] == region].reset_index(drop=True)
            report["region"] = region
        raw, errors = predict_dataframe(predictor, df, batch_size, root=data)
        ok = ~np.isnan(raw)
        y = df["label"].to_numpy()[ok].astype(int)
        if task == "anomaly":
            score = raw[ok]
            df["anomaly_score"] = raw
            m = ev.binary_metrics(y, score, threshold=predictor.threshold(None))
            report.update(m)
            score = predictor.card.score
            report["score"] = score.to_dict() if score is not None else "mean reconstruction error under the mask"
        else:
            prob = predictor.calibrate(raw[ok])
            df["logit"], df["probability"] = raw, np.where(ok, predictor.calibrate(np.nan_to_num(raw)), np.nan)
            thr = predictor.threshold(None)
            report.update(ev.binary_metrics(y, prob, threshold=thr))
            report["operating_point"] = predictor.card.default_operating_point
            if 0 < y.sum() < len(y):
                report["sensitivity_at_specificity_0.90"] = ev.sensitivity_at_specificity(y, prob, 0.90)
            report["operating_points"] = {name: ev.threshold_metrics(y, prob, t)
                                          for name, t in predictor.operating_points.items()}
            part = df[ok].copy()
            if "region" in part and (part["region"] != "unknown").any():
                report["per_region"] = ev.per_group_metrics(part, "region", thr).to_dict(orient="records")
        report["skipped"] = errors
    if predictions_csv:
        cols = [c for c in df.columns if c != "path"]
        df.assign(file=[Path(p).name for p in df["path"]])[["file"] + cols].to_csv(predictions_csv, index=False)
    return report


def expand_inputs(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, name)`` for each file argument, and for each image or DICOM file under a folder argument.

    A file keeps its own name; a file found in a folder is named by its path inside that folder
    (``PAT1/IM00001``), since exports repeat file names across subfolders. A folder with nothing to read
    stays as one entry, so that it gets its own error row.
    """
    out: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = image_files(p)
            out.extend((str(f), f.relative_to(p).as_posix()) for f in found)
            if not found:
                out.append((str(p), p.name or str(p)))
        else:
            out.append((str(p), p.name))
    return out


def predict_files(files: Sequence[str], task: str = "fracture", model: str | None = None,
                  operating_point: str | None = None, sex: str | None = None, heatmap_dir: str | None = None,
                  cam_method: str | None = None) -> list[dict[str, Any]]:
    """One result dict per file: ``{file, ok, probability, decision, error, ...}``; errors never raise.

    A folder among ``files`` stands for its image and DICOM files (:func:`expand_inputs`).
    """
    predictor = load_model(model or default_model_name(task))  # the task's default, not a model named like it
    op: str | float | None = operating_point
    if operating_point is not None:
        try:
            op = float(operating_point)
        except ValueError:
            predictor.threshold(operating_point)  # unknown names fail once, before any file
    if predictor.task == "boneage" and sex is None:
        raise BoneAIError("Bone-age prediction needs --sex M or --sex F.")
    male = None if sex is None else sex == "M"
    results = []
    for f, name in expand_inputs(files):
        if Path(f).is_dir():
            results.append({"file": name, "ok": False, "probability": None, "decision": None, "in_scope": None,
                            "error": "no image or DICOM files in this folder", "scope_reason": None,
                            "familiarity": None, "unfamiliar": None})
            continue
        row: dict[str, Any] = {"file": name, "ok": False, "probability": None, "decision": None, "error": None,
                               "in_scope": None, "scope_reason": None, "familiarity": None, "unfamiliar": None}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rg = read_radiograph(f)
            # The prediction first, so the scope check reuses the default model's pooled features (one pass
            # less); no finding is shown before the check, and an out-of-scope view gets its reason, not an
            # error from a model that was never meant to read it.
            try:
                pred, failure = predictor.predict(rg, operating_point=op, male=male), None
            except Exception as exc:  # noqa: BLE001 - raised below once the view is known to be in scope
                pred, failure = None, exc
            row.update(check_views([rg], predictor=predictor, predictions=None if pred is None else [pred])[0]
                       .fields())  # boneai.scope
            if not row["in_scope"]:  # read and checked; a view out of scope gets no finding
                row["ok"] = True
                results.append(row)
                continue
            if failure is not None:
                raise failure
            row["ok"] = True
            if pred.task == "boneage":
                row["boneage_months"] = round(pred.boneage_months, 2)
                row["decision"] = None
            elif pred.task == "anomaly":
                row.update({"anomaly_score": pred.anomaly_score, "threshold": pred.threshold,
                            "decision": "abnormal" if pred.decision else "normal",
                            "probability": pred.probability})
            else:
                row.update({"probability": round(pred.probability, 4), "threshold": round(pred.threshold, 6),
                            "operating_point": pred.operating_point,
                            "decision": "fracture" if pred.decision else "no fracture",
                            # In the file's own pixels; empty when the model gives no boxes or none passes.
                            "boxes": pred.extras.get("boxes", [])})
            if heatmap_dir:
                from boneai.explain import heatmap_png

                out_dir = Path(heatmap_dir)
                out_dir.mkdir(parents=True, exist_ok=True)
                out = out_dir / f"{Path(name.replace('/', '_')).stem}_heatmap.png"
                out.write_bytes(heatmap_png(predictor, rg, method=cam_method, male=male))
                row["heatmap"] = str(out)
        except BoneAIError as exc:
            row["error"] = str(exc)
        except Exception as exc:  # one bad file must not stop the others; no traceback for the user
            row["error"] = f"could not process this file ({type(exc).__name__})"
        results.append(row)
    return results


def evaluate_localisation(data: str | Path, model: str | None = None, method: str = "boxes",
                          split: str | Path | None = None, subset: str | None = None,
                          batch_size: int = 16) -> dict[str, Any]:
    """The ``evaluate --task localisation`` report on a FracAtlas-layout folder.

    ``method="boxes"`` scores the localiser's boxes (all regions, no operating point, so the FROC
    curve is whole); ``method="gradcam"`` the Grad-CAM peak of a fracture classifier, which gives
    a hit rate only. A folder with fractured images only is fine: figures needing normal images are null.
    """
    df = read_fracatlas(data)
    if split is not None:
        df = df.merge(read_split_file(split)[["image_id", "split"]], on="image_id")
        if subset:
            df = df[df["split"] == subset].reset_index(drop=True)
    if df.empty:
        raise DatasetError(f"No images to evaluate in {data}" + (f" (subset {subset!r})" if subset else "") + ".")
    boxes = fracture_boxes(data)
    report: dict[str, Any] = {"task": "localisation", "method": method, "data": str(data)}
    if subset:
        report["subset"] = subset
    predictor: ModelPredictor
    # Each file is read once, a batch at a time; one that cannot be read is left out and named in "skipped".
    read_ok = np.ones(len(df), dtype=bool)
    skipped: list[dict[str, str]] = []

    def readable(start: int, stop: int) -> tuple[list[int], list[Any]]:
        images, errors = read_files(df["path"].iloc[start:stop].tolist(), data)
        skipped.extend(errors)
        rows = [start + i for i, im in enumerate(images) if im is not None]
        read_ok[[start + i for i, im in enumerate(images) if im is None]] = False
        return rows, [im for im in images if im is not None]

    if method == "gradcam":
        from boneai.explain import explain  # pytorch-grad-cam: loaded only for heatmaps

        predictor = load_model(model or "fracture")
        points, probs = [], []
        for start in range(len(df)):
            for i, rg in zip(*readable(start, start + 1), strict=True):
                probs.append(predictor.predict(rg).probability)
                points.append(explain(predictor, rg).peak if df["label"].iloc[i] else None)
        df = _kept(df, read_ok)
        y, truths = _localisation_truths(df, boxes)
        rate = ev.point_hit_rate(points, truths)
        report.update({"model": predictor.name, "n_images": len(df), "n_fractured_images": int(y.sum()),
                       "n_boxes": int(sum(len(t) for t in truths)),
                       "hit_rate": None if rate is None else round(rate, 4),
                       "froc": {"0.5": None, "1": None, "2": None}, "map50": None})
        prob = np.asarray(probs)
    elif method == "boxes":
        predictor = load_model(model or default_model_name("fracture"))
        if model is None and not isinstance(predictor, LocaliserPredictor):  # a default that gives no boxes
            predictor = load_model("fracture_localiser")
        if not isinstance(predictor, LocaliserPredictor):
            raise DatasetError(f"Model {predictor.name!r} gives no boxes; use a localiser or --method gradcam.")
        views = []
        for start in range(0, len(df), batch_size):
            images = readable(start, start + batch_size)[1]
            views.extend(predictor.views(images) if images else [])
        df = _kept(df, read_ok)
        y, truths = _localisation_truths(df, boxes)
        preds = [predictor.candidate_boxes(v) for v in views]
        report.update({"model": predictor.name, **ev.localisation_figures(preds, truths, y)})
        curve = ev.froc_curve(preds, truths)
        report["froc_curve"] = {"fp_per_image": curve["fp_per_image"].round(4).tolist(),
                                "sensitivity": curve["sensitivity"].round(4).tolist()}
        prob = predictor.probability(np.array([v.head_logit for v in views]), np.array([v.map_peak for v in views]))
        report["box_operating_points"] = {name: {"threshold": thr, **_box_point_figures(preds, truths, thr)}
                                          for name, thr in predictor.box_thresholds.items()}
    else:
        raise DatasetError(f"Unknown localisation method {method!r}: use boxes or gradcam.")
    both = 0 < y.sum() < len(y)
    report["auc"] = round(float(ev.roc_auc(y, prob)), 4) if both else None
    if both:
        report["auc_ci95"] = [round(v, 4) for v in ev.bootstrap_auc_ci(y, prob)]
        thr = predictor.threshold(None)
        report["operating_points"] = {name: ev.threshold_metrics(y, prob, t)
                                      for name, t in predictor.operating_points.items()}
        report["sensitivity_at_specificity_0.90"] = round(ev.sensitivity_at_specificity(y, prob, 0.90), 4)
        report["threshold"] = thr
    report["skipped"] = skipped
    return report


def _kept(df: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    """The rows that were read; a folder of which nothing could be read is an error, not empty figures."""
    if not keep.any():
        raise DatasetError(f"None of the {len(df)} image files could be read.")
    return df[keep].reset_index(drop=True)


def _localisation_truths(df: pd.DataFrame, boxes: dict[str, list[list[float]]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image labels, and the annotated boxes of each fractured image (none for a normal one)."""
    y = df["label"].to_numpy().astype(int)
    return y, [truth_boxes(boxes, r.image_id) if r.label else np.zeros((0, 4)) for r in df.itertuples()]
