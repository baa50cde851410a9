"""Compare trained fracture runs on what decides which one ships.

For each run (or ensemble) folder: validation figures from its card (after ``revalidate``, on the
original files; the figures on the training copy too), training time and device, and the share of
40 RSNA hand radiographs from other hospitals (no fractures) flagged at each operating point, next
to the share of FracAtlas validation normal hands flagged (from the saved validation predictions).

    python bench/fracture_candidates.py runs/g_lite0_448 runs/g_lite0_384 ... [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from boneai.inference import load_model  # noqa: E402
from domain_shift import flag_rates  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fracture_candidates.json"))
    args = ap.parse_args()
    hands = sorted(str(p) for p in (Path(args.data) / "boneage" / "full_resolution" / "images").glob("*.png"))
    rows = []
    for run in map(Path, args.runs):
        card = json.loads((run / "card.json").read_text())
        v, ops, training = card["validation"], card["operating_points"], card.get("training", {})
        previous = (card.get("revalidation", {}).get("previous") or {}).get("validation") or {}
        preds = pd.read_csv(run / "val_predictions.csv")
        normal_hands = preds[(preds["region"] == "hand") & (preds["label"] == 0)]["probability"].to_numpy()
        row = {
            "run": str(run), "architecture": card["architecture"], "input_size": card.get("input_size"),
            "auc": round(v["auc"], 4), "auc_ci95": [round(x, 3) for x in v["auc_ci95"]], "ap": round(v["ap"], 3),
            "auc_on_training_copy": round(previous["auc"], 4) if previous else None,
            "sensitive": {k: round(ops["sensitive"][k], 3) for k in ("threshold", "sensitivity", "specificity")},
            "balanced": {k: round(ops["balanced"][k], 3) for k in ("threshold", "sensitivity", "specificity")},
            "epochs_run": training.get("epochs_run"), "train_seconds": training.get("train_seconds"),
            "device": training.get("device"),
            "fracatlas_val_normal_hands_mean_probability": round(float(normal_hands.mean()), 3),
            "fracatlas_val_normal_hands_flagged": {name: round(float((normal_hands >= op["threshold"]).mean()), 3)
                                                   for name, op in ops.items()},
        }
        if hands:
            row["rsna_hands_other_hospitals"] = flag_rates(load_model(run), hands)
        rows.append(row)
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps({"command": "python bench/fracture_candidates.py " + " ".join(sys.argv[1:]),
                                          "candidates": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
