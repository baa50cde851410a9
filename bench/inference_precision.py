"""What bfloat16 inference changes for a fracture model: AUC, probabilities, decisions, speed.

Runs the model's own validation split (the ``image`` column of its ``val_predictions.csv``) through
two predictors, one in float32 and one in bfloat16 (``BONEAI_INFERENCE_DTYPE``), with the card's
pipeline, mirror averaging and calibration, and compares them image by image. The forward passes
of the two are timed interleaved, so a busy machine slows both alike.

    .venv/bin/python bench/inference_precision.py [--model fracture] [--data ../shared/data/fracatlas]

Prints a summary and writes bench/results/inference_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def _load(model: str, dtype: str):
    os.environ["BONEAI_INFERENCE_DTYPE"] = dtype
    try:
        return load_model(model)
    finally:
        os.environ.pop("BONEAI_INFERENCE_DTYPE", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fracture")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fracatlas"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "inference_precision.json"))
    args = ap.parse_args()
    fp32, bf16 = _load(args.model, "float32"), _load(args.model, "bfloat16")
    val = pd.read_csv(fp32.directory / "val_predictions.csv")
    y = val["label"].to_numpy().astype(int)
    logits = {"float32": [], "bfloat16": []}
    times = {"float32": [], "bfloat16": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncated FracAtlas JPEGs are read with a warning
        for rel in val["image"]:
            x = fp32.input_tensor(read_radiograph(Path(args.data) / rel))
            for name, predictor in (("float32", fp32), ("bfloat16", bf16)):
                t = time.perf_counter()
                logits[name].append(float(predictor.raw_outputs(x)[0]))
                times[name].append(time.perf_counter() - t)
    l32, l16 = np.array(logits["float32"]), np.array(logits["bfloat16"])
    p32, p16 = fp32.calibrate(l32), fp32.calibrate(l16)
    flips = {name: int(((p32 >= fp32.threshold(name)) != (p16 >= fp32.threshold(name))).sum())
             for name in fp32.operating_points}
    result = {
        "model": fp32.name, "n": int(len(y)), "n_positive": int(y.sum()),
        "auc_float32": round(roc_auc(y, l32), 4), "auc_bfloat16": round(roc_auc(y, l16), 4),
        "max_abs_logit_diff": round(float(np.abs(l32 - l16).max()), 4),
        "mean_abs_prob_diff": round(float(np.abs(p32 - p16).mean()), 5),
        "max_abs_prob_diff": round(float(np.abs(p32 - p16).max()), 4),
        "decision_flips": flips,
        "forward_ms_median": {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()},
        "torch_threads": torch.get_num_threads(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "command": "python bench/inference_precision.py " + " ".join(sys.argv[1:]),
    }
    for k, v in result.items():
        print(f"{k:22s} {v}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
