"""Validation ROC-AUC of a fracture model under test-time variants: input size, mirror, multi-scale.

Runs the model card's pipeline up to the final resize on each image of the model's own validation
split (the ``image`` column of its ``val_predictions.csv``), then letterboxes to each size in
``--sizes``, with and without the mirror image, and scores every variant plus two-scale averages.
It answers "would a higher input size or more test-time views help this model?" without training.

    .venv/bin/python bench/fracture_tta.py [--model fracture] [--data ../shared/data/fracatlas]
                                           [--sizes 224,256,288,320]

Prints a table and writes bench/results/fracture_tta.json. Slow on 2 cores (about 4 min).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]

from boneai.evaluate import roc_auc  # noqa: E402
from boneai.inference import load_model  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402
from boneai.preprocess import apply_pipeline  # noqa: E402
from boneai.transforms import to_tensor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fracture")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fracatlas"))
    ap.add_argument("--sizes", default="224,256,288,320")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fracture_tta.json"))
    args = ap.parse_args()
    predictor = load_model(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    val = pd.read_csv(predictor.directory / "val_predictions.csv")
    y = val["label"].to_numpy().astype(int)
    plain = {s: [] for s in sizes}
    mirrored = {s: [] for s in sizes}
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncated FracAtlas JPEGs are read with a warning
        for rel in val["image"]:
            base = apply_pipeline(read_radiograph(Path(args.data) / rel).pixels, predictor.pipeline[:-1])
            for s in sizes:
                square = apply_pipeline(base, [{"step": "resize_pad", "params": {"size": s}}])
                x = to_tensor(square, predictor.mean, predictor.std).unsqueeze(0)
                with torch.inference_mode():
                    pair = torch.cat([x, torch.flip(x, dims=[3])]).to(memory_format=torch.channels_last)
                    out = predictor.model(pair).reshape(-1).float().numpy()
                plain[s].append(float(out[0]))
                mirrored[s].append(float(out.mean()))
    rows = []
    for s in sizes:
        rows.append({"variant": f"{s} px", "auc": roc_auc(y, np.array(plain[s])), "forward_passes": 1})
        rows.append({"variant": f"{s} px + mirror", "auc": roc_auc(y, np.array(mirrored[s])), "forward_passes": 2})
    for a, b in itertools.combinations(sizes, 2):
        rows.append({"variant": f"{a}+{b} px + mirror", "forward_passes": 4,
                     "auc": roc_auc(y, np.array(mirrored[a]) + np.array(mirrored[b]))})
    for r in rows:
        r["auc"] = round(float(r["auc"]), 4)
        print(f"{r['variant']:26s} AUC {r['auc']:.4f}  ({r['forward_passes']} forward passes)")
    result = {"model": predictor.name, "trained_input_size": predictor.card.get("input_size"), "n": int(len(y)),
              "n_positive": int(y.sum()), "seconds": round(time.time() - t0, 1), "variants": rows,
              "command": "python bench/fracture_tta.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
