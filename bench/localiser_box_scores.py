"""Validation-only checks of the localiser's box scores (docs/localisation.md, sixth and seventh stages).

Scores the centre boxes of a run with a centre head by the heatmap (as shipped), by the fracture map's
peak inside the box or at its centre, or by the geometric mean of the two, and prints hit rate, FROC and
the choice criterion (hit rate + FROC at 1 FP) on the split file's validation images. Test images are
never read.

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python bench/localiser_box_scores.py runs/localiser6
"""
import numpy as np, pandas as pd, sys
from boneai import localisation as L, evaluate as ev
from boneai.card import ModelCard
from boneai.data import read_fracatlas, read_split_file, fracture_boxes
from boneai.preprocess import map_boxes
run = sys.argv[1]
data = "../shared/data/fracatlas"
card = ModelCard.from_dir(run)
pred = L.LocaliserPredictor(card, L._load_network(L.Path(run), card), L.Path(run))
df = read_fracatlas(data).merge(read_split_file("weights/splits/fracatlas.csv")[["image_id", "split"]], on="image_id")
val = df[df["split"] == "val"].reset_index(drop=True)
boxes = fracture_boxes(data)
truths = [L.truth_boxes(boxes, r.image_id) if r.label else np.zeros((0, 4)) for r in val.itertuples()]
views = L.localised_views(pred, val["path"].tolist())
y = val["label"].to_numpy()
def decode(v, t, shrink, mode):
    found = L.boxes_from_centres(v.centres[0], v.centres[1:], t, scale=4, shrink=shrink, max_boxes=20)
    out = []
    for b in found:
        x0, y0, x1, y1 = (int(np.floor(b[0] / 4)), int(np.floor(b[1] / 4)), int(np.ceil(b[2] / 4)), int(np.ceil(b[3] / 4)))
        cx, cy = int((b[0] + b[2]) / 8), int((b[1] + b[3]) / 8)
        m = v.prob_map[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
        mp = float(m.max()) if m.size else 0.0
        s = {"heat": b[4], "map": mp, "geo": np.sqrt(b[4] * mp), "mapc": float(v.prob_map[min(cy, 95), min(cx, 95)]),
             "geoc": np.sqrt(b[4] * float(v.prob_map[min(cy, 95), min(cx, 95)]))}[mode]
        out.append(b[:4] + [s])
    if not out:
        return np.zeros((0, 5))
    out.sort(key=lambda b: -b[4]); out = out[:10]
    a = np.array(out)
    mapped = map_boxes(a[:, :4], v.stages, v.original_shape, inverse=True)
    return np.c_[mapped, a[:, 4]]
for mode in ("heat", "map", "geo", "mapc", "geoc"):
    for t in (0.02, 0.05):
        for sh in (1.0,):
            f = ev.localisation_figures([decode(v, t, sh, mode) for v in views], truths, y)
            print(mode, t, sh, f["hit_rate"], f["froc"], f["map50"], round(f["hit_rate"] + f["froc"]["1"], 3), flush=True)
