"""Validation-only check of the localiser's image-level combination (docs/localisation.md).

Cross-validated (5 folds, 10 seeds) ROC-AUC on the split file's validation images of logistic
combinations of the head's logit, the fracture map's peak and the centre heatmap's peak, and of the head
with a classifier's validation logit (`weights/NAME/val_predictions.csv`). Test images are never read.

Usage:
  OMP_NUM_THREADS=2 .venv/bin/python bench/localiser_image_score.py runs/localiser7
"""
import numpy as np, sys
from boneai import localisation as L, evaluate as ev
from boneai.card import ModelCard
from boneai.data import read_fracatlas, read_split_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
run = sys.argv[1]; subset = sys.argv[2] if len(sys.argv) > 2 else "val"
card = ModelCard.from_dir(run)
pred = L.LocaliserPredictor(card, L._load_network(L.Path(run), card), L.Path(run))
df = read_fracatlas("../shared/data/fracatlas").merge(read_split_file("weights/splits/fracatlas.csv")[["image_id", "split"]], on="image_id")
val = df[df["split"] == subset].reset_index(drop=True)
views = L.localised_views(pred, val["path"].tolist())
y = val["label"].to_numpy()
head = np.array([v.head_logit for v in views]); peak = np.array([v.map_peak for v in views])
cpeak = np.array([v.centres[0].max() for v in views])
lg = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
print("auc head", ev.roc_auc(y, head), "map peak", ev.roc_auc(y, peak), "centre peak", ev.roc_auc(y, cpeak))
F = {"head+map": np.c_[head, lg(peak)], "head+centre": np.c_[head, lg(cpeak)], "head+map+centre": np.c_[head, lg(peak), lg(cpeak)], "head": head[:, None]}
for name, X in F.items():
    aucs = []
    for seed in range(10):
        p = cross_val_predict(LogisticRegression(C=1.0), X, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed), method="decision_function")
        aucs.append(ev.roc_auc(y, p))
    print(name, "cv auc", round(float(np.mean(aucs)), 4))

import pandas as pd  # noqa: E402

loc = pd.DataFrame({"image": [str(L.Path(p).relative_to("../shared/data/fracatlas")) for p in val["path"]],
                    "label": y, "head_logit": head})
for other in ("fracture_fast", "fracture"):
    o = pd.read_csv(f"weights/{other}/val_predictions.csv")[["image", "logit"]]
    m = loc.merge(o, on="image")
    X, ym = m[["head_logit", "logit"]].to_numpy(), m["label"].to_numpy()
    aucs = [ev.roc_auc(ym, cross_val_predict(LogisticRegression(), X, ym, method="decision_function",
                                             cv=StratifiedKFold(5, shuffle=True, random_state=s))) for s in range(10)]
    print(f"head+{other}", len(m), "cv auc", round(float(np.mean(aucs)), 4))
