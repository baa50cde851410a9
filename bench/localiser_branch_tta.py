"""Validation-only look at mirror averaging for the localiser's image logit (docs/localisation.md).

For the split file's validation images, the ROC-AUC of the classifier branch's logit alone, averaged
with the branch on the mirrored shared features (cheap: the trunk runs once), and averaged with the
whole image-logit path on the mirrored input (the stem and shared blocks run twice). Also the CPU
time of each per view (batch of one, 2 threads, median of the validation images). Test images are
never read.

Usage:
  .venv/bin/python bench/localiser_branch_tta.py [--model weights/fracture_localiser] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boneai import evaluate as ev  # noqa: E402
from boneai.card import ModelCard  # noqa: E402
from boneai.data import read_fracatlas, read_split_file  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402
from boneai.localisation import _load_network  # noqa: E402
from boneai.preprocess import apply_pipeline  # noqa: E402
from boneai.transforms import to_tensor  # noqa: E402


def logits(model, x: torch.Tensor) -> dict[str, float]:
    side = x.shape[-1]
    out = {}
    t0 = time.perf_counter()
    shared = model.shared_features(x)
    single = model._classify(shared, side)
    t1 = time.perf_counter()
    feature_mirror = model._classify(shared.flip(-1), side)
    t2 = time.perf_counter()
    input_mirror = model.image_logit(x.flip(-1))
    t3 = time.perf_counter()
    out["single"] = (float(single), t1 - t0)
    out["feature mirror"] = ((float(single) + float(feature_mirror)) / 2, t2 - t0)
    out["input mirror"] = ((float(single) + float(input_mirror)) / 2, (t1 - t0) + (t3 - t2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "weights/fracture_localiser"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/fracatlas"))
    ap.add_argument("--split", default=str(REPO / "weights/splits/fracatlas.csv"))
    ap.add_argument("--out", default=str(REPO / "bench/results/localiser_branch_tta.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    card = ModelCard.from_dir(args.model)
    model = _load_network(Path(args.model), card).eval()
    df = read_fracatlas(args.data).merge(read_split_file(args.split)[["image_id", "split"]], on="image_id")
    val = df[df["split"] == "val"].reset_index(drop=True)
    pipeline = card.pipeline_spec()
    rows = []
    with torch.inference_mode():
        for r in val.itertuples():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = read_radiograph(r.path).pixels
            x = to_tensor(apply_pipeline(pixels, pipeline), list(card.mean), list(card.std))[None]
            rows.append(logits(model, x))
    y = val["label"].to_numpy()
    result = {"model": args.model, "subset": "val", "n": int(len(y)), "n_positive": int(y.sum()),
              "command": "python bench/localiser_branch_tta.py", "variants": []}
    for name in rows[0]:
        scores = np.array([row[name][0] for row in rows])
        ms = np.median([row[name][1] for row in rows]) * 1000
        result["variants"].append({"variant": name, "val_auc": round(float(ev.roc_auc(y, scores)), 4),
                                   "image_logit_ms_median": round(float(ms), 1)})
        print(json.dumps(result["variants"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
