"""Shortcut and domain-shift checks for a fracture model.

1. Shortcuts: how well do trivial image properties (width, height, aspect ratio, file size, mean
   grey level, share of black pixels, the hardware flag) separate fractured from non-fractured
   FracAtlas images on their own? A property with ROC-AUC far from 0.5 is a shortcut a model can
   learn instead of fractures.
2. Domain shift: the RSNA hand radiographs in ``boneage/full_resolution`` come from other hospitals
   and (almost) none show a fracture, so the share the model flags is a false-positive rate under
   domain shift. Compared with the same rate on FracAtlas validation hands without fracture.

Usage:  .venv/bin/python bench/domain_shift.py [--model fracture] [--data ../shared/data] [--skip-shortcuts]
Writes bench/results/domain_shift.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]

from boneai.data import read_fracatlas, split_train_val  # noqa: E402
from boneai.inference import load_model  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402


def shortcut_aucs(root: Path) -> dict[str, float]:
    df = read_fracatlas(root)
    feats: dict[str, list[float]] = {k: [] for k in ("width", "height", "aspect", "file_kb", "mean_grey", "black_share")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in df["path"]:
            px = read_radiograph(p).pixels
            grey = px if px.ndim == 2 else px[..., :3].mean(axis=2)
            h, w = grey.shape
            feats["width"].append(w)
            feats["height"].append(h)
            feats["aspect"].append(w / h)
            feats["file_kb"].append(Path(p).stat().st_size / 1024)
            feats["mean_grey"].append(float(grey.mean()))
            feats["black_share"].append(float((grey < 10).mean()))
    y = df["label"].to_numpy()
    out = {k: round(float(roc_auc_score(y, v)), 3) for k, v in feats.items()}
    out["hardware_flag"] = round(float(roc_auc_score(y, df["hardware"])), 3)
    return out


def flag_rates(predictor, files: list[str]) -> dict[str, float]:
    probs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            probs.append(predictor.predict(read_radiograph(f)).probability)
    probs = np.array(probs)
    rates = {f"flagged_at_{name}": round(float((probs >= t).mean()), 3) for name, t in predictor.operating_points.items()}
    return {"n": len(files), "mean_probability": round(float(probs.mean()), 3), **rates}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fracture")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--skip-shortcuts", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "domain_shift.json"))
    args = ap.parse_args()
    data = Path(args.data)
    result: dict[str, object] = {}
    if not args.skip_shortcuts:
        result["shortcut_auc_fracatlas_all"] = shortcut_aucs(data / "fracatlas")
        print("shortcut ROC-AUC (fractured vs not, all FracAtlas):", result["shortcut_auc_fracatlas_all"])
    predictor = load_model(args.model)
    result["model"] = predictor.name
    hands = sorted(str(p) for p in (data / "boneage" / "full_resolution" / "images").glob("*.png"))
    result["rsna_hands_other_hospitals"] = flag_rates(predictor, hands)
    _, val = split_train_val(read_fracatlas(data / "fracatlas"), 0.2, seed=0)
    normal_hands = val[(val["region"] == "hand") & (val["label"] == 0)]["path"].tolist()
    result["fracatlas_val_normal_hands"] = flag_rates(predictor, normal_hands)
    for k in ("rsna_hands_other_hospitals", "fracatlas_val_normal_hands"):
        print(k, result[k])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
