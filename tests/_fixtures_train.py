"""Small real datasets for training tests, built from ../shared/data or, failing that, samples/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BONEAI_DATA", REPO.parent / "shared" / "data"))


def fracture_folder(dest: Path, per_class: int = 24, layout: str = "folder") -> Path:
    """An image-folder (fractured/not_fractured) or FracAtlas-layout folder of real radiographs."""
    atlas = SHARED_DATA / "fracatlas"
    if (atlas / "dataset.csv").is_file():
        meta = pd.read_csv(atlas / "dataset.csv")
        pos = sorted((atlas / "images" / "Fractured").glob("*.jpg"))[:per_class]
        neg = sorted((atlas / "images" / "Non_fractured").glob("*.jpg"))[:per_class]
    else:  # CI without the shared data: the attributed samples, repeated under new names
        table = pd.read_csv(REPO / "samples" / "samples.csv")
        fr = table[table["dataset"].str.lower().str.contains("frac")]
        pos = [REPO / "samples" / f for f in fr[fr["label"] == 1]["file"]]
        neg = [REPO / "samples" / f for f in fr[fr["label"] == 0]["file"]]
        pos = (pos * per_class)[:per_class]
        neg = (neg * per_class)[:per_class]
        meta = None
    if layout == "fracatlas":
        rows = []
        for folder, files, label in (("Fractured", pos, 1), ("Non_fractured", neg, 0)):
            (dest / "images" / folder).mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(files):
                name = f"IMG{label}{i:06d}.jpg"
                shutil.copy(f, dest / "images" / folder / name)
                rows.append({"image_id": name, "hand": int(i % 2 == 0), "leg": int(i % 2 == 1), "hip": 0,
                             "shoulder": 0, "mixed": 0, "hardware": 0, "multiscan": 0, "fractured": label,
                             "fracture_count": label, "frontal": 1, "lateral": 0, "oblique": 0})
        pd.DataFrame(rows).to_csv(dest / "dataset.csv", index=False)
        return dest
    for folder, files in (("fractured", pos), ("not_fractured", neg)):
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            shutil.copy(f, dest / folder / f"{folder}_{i:03d}{Path(f).suffix}")
    return dest
