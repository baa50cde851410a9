"""The evaluation protocol: choices on the validation split, figures on a test split nobody chose on.

``weights/splits/fracatlas.csv`` (made by ``python -m boneai split``) assigns each FracAtlas image to
``train``, ``val`` or ``test`` with near-duplicate views kept together. The shipped classifiers were
trained before that split existed, on what is now ``train``, and validated on what is now ``val`` plus
``test``. :func:`refit_on_split` makes their choices again (calibration and operating points) on the
``val`` rows only, from the validation predictions the card already ships, so no test image informs
them; :func:`record_test` stores the test figures in the card.

Example:
    >>> from boneai.protocol import refit_on_split                        # doctest: +SKIP
    >>> refit_on_split("weights/fracture", "weights/splits/fracatlas.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from boneai.card import CARD_FILE, ModelCard
from boneai.data import read_split_file
from boneai.errors import BoneAIError
from boneai.evaluate import classifier_validation

__all__ = ["refit_on_split", "record_test"]


def _card(model_dir: Path) -> ModelCard:
    path = model_dir / CARD_FILE
    if not path.is_file():
        raise BoneAIError(f"No model card in {model_dir}.")
    return ModelCard.from_json(path.read_text(), model_dir)


def refit_on_split(model_dir: str | Path, split: str | Path) -> dict[str, Any]:
    """Refit a classifier's calibration and operating points on the split file's validation rows.

    The earlier validation figures stay in the card under ``validation_before_protocol``. Only the
    shipped validation predictions are read; the model is not run.
    """
    model_dir = Path(model_dir)
    written = _card(model_dir).to_dict()  # the JSON, edited below and written back
    preds_path = model_dir / "val_predictions.csv"
    if not preds_path.is_file():
        raise BoneAIError(f"{model_dir} has no val_predictions.csv to refit from.")
    preds = pd.read_csv(preds_path)
    preds["image_id"] = [Path(p).name for p in preds["image"]]
    assignment = read_split_file(split).set_index("image_id")["split"]
    preds["split"] = preds["image_id"].map(assignment)
    if preds["split"].isna().any():
        raise BoneAIError(f"{int(preds['split'].isna().sum())} validation images of {model_dir.name} are not in {split}.")
    if (preds["split"] == "train").any():
        raise BoneAIError(f"{model_dir.name} was validated on images the split file puts in train; "
                          "its validation predictions cannot be refitted on this split.")
    val = preds[preds["split"] == "val"].reset_index(drop=True)
    fields, prob = classifier_validation(val)
    written.setdefault("validation_before_protocol", written.get("validation"))
    written.update(fields)
    written["validation"]["note"] = ("validation figures: calibration and operating points were chosen on these "
                                  "images; the epoch and architecture were chosen earlier on these plus the test images")
    written["protocol"] = {"split_file": str(split), "refitted_on": "val", "n_val": int(len(val)),
                        "n_test_excluded": int((preds["split"] == "test").sum()),
                        "refitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (model_dir / CARD_FILE).write_text(json.dumps(written, indent=2))
    # The file keeps what its name says: validation rows only, with the refitted probabilities.
    # (The test rows' predictions come from `evaluate --subset test --record` into test_predictions.csv.)
    val.assign(probability=prob).drop(columns=["image_id", "split"]).to_csv(preds_path, index=False)
    return written


def record_test(model_dir: str | Path, report: dict[str, Any], command: str,
                predictions: pd.DataFrame | None = None) -> dict[str, Any]:
    """Store an ``evaluate --subset test`` report's headline figures, with the command, in the card,
    and the per-image predictions as ``test_predictions.csv`` (for the Model performance page)."""
    model_dir = Path(model_dir)
    if predictions is not None:
        predictions.to_csv(model_dir / "test_predictions.csv", index=False)
    if report.get("froc_curve"):
        pd.DataFrame(report["froc_curve"]).to_csv(model_dir / "test_froc.csv", index=False)
    written = _card(model_dir).to_dict()
    keep = ("n", "n_positive", "auc", "auc_ci95", "ap", "ece", "operating_points", "per_region",
            "n_images", "n_fractured_images", "n_boxes", "hit_rate", "froc", "map50",
            "sensitivity_at_specificity_0.90", "box_operating_points", "subset", "split")
    written["test"] = {k: report[k] for k in keep if k in report}
    written["test"]["command"] = command
    written["test"]["note"] = "test figures: no choice was made on these images"
    (model_dir / CARD_FILE).write_text(json.dumps(written, indent=2, default=float))
    return written
