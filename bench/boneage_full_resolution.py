"""Bone age: the full-resolution upload path against the 100x100 copies of the same cases.

For every case in ``boneage/full_resolution`` this predicts from the full-resolution file (squashed to
100x100 by the card's pipeline, as an upload would be) and from the 100x100 copy of the same id in
``boneage/images``, and reports both MAEs, their agreement, and whether the two csv files give the
case the same label (they disagree for some ids; the radiographs match the main csv's ages).

    python bench/boneage_full_resolution.py [--model boneage]

Prints a summary and writes ``bench/results/boneage_full_resolution.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from boneai.data import read_boneage  # noqa: E402
from boneai.inference import load_model  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402


def main() -> int:
    default = Path(os.environ.get("BONEAI_DATA", ROOT.parent / "shared" / "data")) / "boneage"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(default), help="bone-age folder holding full_resolution/")
    ap.add_argument("--model", default="boneage")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "boneage_full_resolution.json"))
    args = ap.parse_args()

    model = load_model(args.model)
    root = Path(args.data)
    full = read_boneage(root / "full_resolution")
    main_labels = read_boneage(root).set_index("id")
    rows = []
    for _, r in full.iterrows():
        small = root / "images" / f"{r['id']}.png"
        if not small.is_file():
            continue
        male = bool(r["male"])
        rows.append({
            "id": int(r["id"]), "label_full_csv": r["boneage_months"], "male_full_csv": male,
            "label_main_csv": float(main_labels.loc[r["id"], "boneage_months"]),
            "male_main_csv": bool(main_labels.loc[r["id"], "male"]),
            "pred_full": model.predict(read_radiograph(r["path"]), male=male).boneage_months,
            "pred_100": model.predict(read_radiograph(small), male=male).boneage_months,
        })
    df = pd.DataFrame(rows)
    df["labels_agree"] = (df["label_full_csv"] == df["label_main_csv"]) & (df["male_full_csv"] == df["male_main_csv"])
    diff = (df["pred_full"] - df["pred_100"]).abs()
    agree = df[df["labels_agree"]]
    result = {
        "model": model.name, "n": len(df),
        "mae_full_vs_full_csv": float((df["pred_full"] - df["label_full_csv"]).abs().mean()),
        "mae_100_vs_full_csv": float((df["pred_100"] - df["label_full_csv"]).abs().mean()),
        "mean_abs_diff_full_vs_100": float(diff.mean()), "median_abs_diff_full_vs_100": float(diff.median()),
        "n_labels_disagree_with_main_csv": int((~df["labels_agree"]).sum()),
        "mae_full_on_agreeing_labels": float((agree["pred_full"] - agree["label_full_csv"]).abs().mean()),
        "mae_100_on_agreeing_labels": float((agree["pred_100"] - agree["label_full_csv"]).abs().mean()),
        "mae_full_vs_main_csv": float((df["pred_full"] - df["label_main_csv"]).abs().mean()),
        "cases": df.round(2).to_dict(orient="records"),
    }
    for k, v in result.items():
        if k != "cases":
            print(f"{k:36s} {v:.2f}" if isinstance(v, float) else f"{k:36s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
