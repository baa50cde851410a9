"""Pointing game: does the heatmap's hottest pixel fall inside a fracture box?

On the fractured validation images that have boxes in ``fracture_masks_coco.json`` (validation split =
``split_train_val(read_fracatlas(root), 0.2, seed=0)``, the fracture trainer's split), for each CAM
method, the fraction of images whose heatmap peak (in original pixels) lies inside any fracture box.
A "hit within 15 px" column is the usual tolerant variant. Baselines: the centre of the image and
the expected hit rate of a uniformly random point (box area / image area).

Prints a table and writes ``bench/results/cam_localisation.json``; the best method becomes
``boneai.explain.DEFAULT_CAM_METHOD``.

    python bench/cam_localisation.py                      # weights/fracture (the shipped model)
    python bench/cam_localisation.py --checkpoint runs/fracture_lite0/best_model.pt --architecture efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from boneai.data import fracture_boxes, read_fracatlas, split_train_val  # noqa: E402
from boneai.explain import CAM_METHODS, explain  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402
from boneai.preprocess import standardise  # noqa: E402


def _load_predictor(args: argparse.Namespace):
    from boneai.inference import Predictor, load_model

    if not args.checkpoint:
        return load_model(args.model)
    import torch

    from boneai.models import build_model
    from boneai.train import pipeline_for

    model = build_model(args.architecture, pretrained=False)
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    card = {"name": Path(args.checkpoint).parent.name, "task": "fracture", "architecture": args.architecture,
            "pipeline": pipeline_for("fracture", args.image_size), "mean": [0.5] * 3, "std": [0.5] * 3}
    return Predictor(card, model.eval(), Path(args.checkpoint).parent)


def _inside(x: float, y: float, boxes: list[list[float]], tol: float = 0.0) -> bool:
    return any(bx - tol <= x <= bx + bw + tol and by - tol <= y <= by + bh + tol for bx, by, bw, bh in boxes)


def main() -> int:
    default_data = Path(os.environ.get("BONEAI_DATA", ROOT.parent / "shared" / "data")) / "fracatlas"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(default_data))
    ap.add_argument("--model", default="fracture", help="model name in weights/ or a model folder")
    ap.add_argument("--checkpoint", default=None, help="a trainer best_model.pt instead of a model folder")
    ap.add_argument("--architecture", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--methods", default="gradcam,gradcam++,eigencam,layercam")
    ap.add_argument("--scorecam-limit", type=int, default=0, help="also run ScoreCAM on the first N images (slow)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cam_localisation.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    predictor = _load_predictor(args)
    boxes = fracture_boxes(args.data)
    _, val = split_train_val(read_fracatlas(args.data), 0.2, seed=0)
    val = val[(val["label"] == 1) & val["image_id"].isin(boxes)].reset_index(drop=True)
    if args.limit:
        val = val.iloc[: args.limit]
    methods = [m for m in args.methods.split(",") if m]
    if args.scorecam_limit:
        methods.append("scorecam")
    rows: dict[str, dict[str, list]] = {m: {"hit": [], "hit15": [], "seconds": []} for m in methods + ["centre"]}
    random_rate = []
    per_image = []
    for i, r in val.iterrows():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rg = read_radiograph(r["path"])
        h, w = standardise(rg.pixels).image.shape[:2]
        b = boxes[r["image_id"]]
        random_rate.append(min(1.0, sum(bw * bh for _, _, bw, bh in b) / (h * w)))
        cx, cy = w / 2, h / 2
        rows["centre"]["hit"].append(_inside(cx, cy, b))
        rows["centre"]["hit15"].append(_inside(cx, cy, b, 15))
        entry = {"image": r["image_id"], "region": r["region"], "boxes": b}
        for m in methods:
            if m == "scorecam" and i >= args.scorecam_limit:
                continue
            t0 = time.time()
            heat = explain(predictor, rg, method=m)
            rows[m]["seconds"].append(time.time() - t0)
            x, y = heat.peak
            rows[m]["hit"].append(_inside(x, y, b))
            rows[m]["hit15"].append(_inside(x, y, b, 15))
            entry[m] = [x, y]
        per_image.append(entry)
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{len(val)} images", file=sys.stderr, flush=True)

    def ci(hits: list[bool]) -> list[float]:
        a = np.asarray(hits, dtype=float)
        rng = np.random.default_rng(0)
        boots = [a[rng.integers(0, len(a), len(a))].mean() for _ in range(1000)]
        return [round(float(np.percentile(boots, 2.5)), 3), round(float(np.percentile(boots, 97.5)), 3)]

    table = {}
    for m, v in rows.items():
        if not v["hit"]:
            continue
        table[m] = {"n": len(v["hit"]), "pointing_game": round(float(np.mean(v["hit"])), 3), "ci95": ci(v["hit"]),
                    "pointing_game_15px": round(float(np.mean(v["hit15"])), 3),
                    "seconds_per_image": round(float(np.mean(v["seconds"])), 2) if v["seconds"] else None}
    table["random_point"] = {"n": len(random_rate), "pointing_game": round(float(np.mean(random_rate)), 3)}
    cams = [m for m in table if m in CAM_METHODS and table[m]["n"] == len(val)]
    best = max(cams, key=lambda m: (table[m]["pointing_game"], table[m]["pointing_game_15px"])) if cams else None
    print(f"{'method':12s} {'n':>4s} {'hit':>6s} {'95% CI':>14s} {'hit<=15px':>10s} {'s/img':>6s}")
    for m, v in table.items():
        ci_txt = f"[{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" if "ci95" in v else ""
        print(f"{m:12s} {v['n']:4d} {v['pointing_game']:6.3f} {ci_txt:>14s} "
              f"{v.get('pointing_game_15px', float('nan')):10.3f} {v.get('seconds_per_image') or float('nan'):6.2f}")
    print(f"best method: {best}")
    result = {"model": predictor.name, "architecture": predictor.card["architecture"],
              "checkpoint": args.checkpoint, "data": "FracAtlas validation split (20%, seed 0), fractured with boxes",
              "n_images": len(val), "methods": table, "best": best, "per_image_peaks": per_image}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
