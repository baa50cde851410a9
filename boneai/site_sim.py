"""A simulated other site: labelled radiographs re-imaged with another site's look.

No other hospital's fracture labels are available offline, so site validation and adaptation are
developed on a *degraded copy* of FracAtlas images the shipped models never trained on (the split's
validation rows). A site has one consistent look, drawn once from its seed, and each image varies a
little around it:

* **resolution**: the image is reduced to a longer side of ``long_side`` px (a lower-resolution
  export; the model upsamples it again, so fine cortical lines blur);
* **contrast curve**: a gamma and a narrowed output window (another processing LUT);
* **edge enhancement**: unsharp masking (many CR/DR consoles sharpen for display);
* **collimation**: bright, noisy shutters on two to four sides (scatter keeps them from being plain
  borders, so the crop step cannot simply cut them away) and a burnt-in side marker;
* **noise**: Gaussian quantum-like noise, then JPEG at a lower quality;
* optionally **inverted** grey levels (a MONOCHROME1 export displayed without its inversion).

Nothing here looks at labels: positives and negatives are degraded alike.

Example:
    >>> import numpy as np
    >>> from boneai.site_sim import SiteLook, degrade
    >>> img = (np.random.default_rng(0).random((300, 240)) * 255).astype(np.uint8)
    >>> out = degrade(img, SiteLook.draw(0), np.random.default_rng(1))
    >>> out.dtype, max(out.shape) <= SiteLook.draw(0).long_side
    (dtype('uint8'), True)
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

__all__ = ["HARSH", "SiteLook", "degrade", "write_site"]


@dataclass(frozen=True)
class SiteLook:
    """One simulated site's imaging chain (see the module note)."""

    long_side: int = 192
    gamma: float = 0.6
    window: tuple[int, int] = (35, 225)
    sharpen: float = 1.2
    noise_sigma: float = 7.0
    jpeg_quality: int = 55
    collimation: float = 0.12  # mean shutter depth as a share of the side
    invert: bool = False  # a MONOCHROME1 export shown without its inversion (bone dark)

    @classmethod
    def draw(cls, seed: int) -> SiteLook:
        """A site look drawn from the ranges above (same seed, same site)."""
        r = np.random.default_rng(seed)
        lo = int(r.integers(20, 50))
        return cls(long_side=int(r.integers(160, 224)), gamma=float(r.uniform(0.5, 0.75)),
                   window=(lo, int(r.integers(205, 240))), sharpen=float(r.uniform(0.8, 1.6)),
                   noise_sigma=float(r.uniform(5.0, 9.0)), jpeg_quality=int(r.integers(45, 70)),
                   collimation=float(r.uniform(0.08, 0.16)))


#: The simulated site of ``bench/site_adapt.py``, fixed before any adaptation was run (a harsh chain:
#: parent AUC on it ~0.66, where the issue's real other-source set gives 0.57).
HARSH = SiteLook(long_side=136, gamma=0.5, window=(50, 210), sharpen=1.8, noise_sigma=11.0, jpeg_quality=40,
                 collimation=0.15)


def _grey(pixels: np.ndarray) -> np.ndarray:
    img = np.asarray(pixels)
    if img.ndim == 3:
        img = cv2.cvtColor(img[:, :, :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
    return img.astype(np.uint8)


def degrade(pixels: np.ndarray, look: SiteLook, rng: np.random.Generator) -> np.ndarray:
    """The image as ``look``'s site would have exported it (uint8, grey)."""
    img = _grey(pixels).astype(np.float32) / 255.0
    h, w = img.shape
    scale = min(1.0, look.long_side * rng.uniform(0.9, 1.1) / max(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (max(64, round(w * scale)), max(64, round(h * scale))), interpolation=cv2.INTER_AREA)
    h, w = img.shape
    # Contrast curve: gamma, then a narrowed window.
    img = np.clip(img, 0, 1) ** (look.gamma * rng.uniform(0.9, 1.1))
    lo, hi = look.window
    img = (lo + img * (hi - lo)) / 255.0
    # Edge enhancement (unsharp mask).
    blur = cv2.GaussianBlur(img, (0, 0), sigmaX=max(1.0, 2.0 * w / 192))
    img = np.clip(img + look.sharpen * (img - blur), 0, 1)
    # Collimator shutters: bright with scatter, on 2-4 sides.
    sides = rng.permutation(4)[: int(rng.integers(2, 5))]
    level = rng.uniform(0.75, 0.92)
    for s in sides:
        depth = max(2, int(round(look.collimation * rng.uniform(0.5, 1.5) * (h if s < 2 else w))))
        ramp = np.linspace(level, level * 0.85, depth, dtype=np.float32)  # scatter falls off inwards
        if s == 0:
            img[:depth, :] = ramp[:, None]
        elif s == 1:
            img[h - depth:, :] = ramp[::-1][:, None]
        elif s == 2:
            img[:, :depth] = ramp[None, :]
        else:
            img[:, w - depth:] = ramp[::-1][None, :]
    # Burnt-in side marker ("L"/"R" lead letter: a bright block with a dark glyph).
    mh, mw = max(8, h // 14), max(8, w // 16)
    y, x = int(rng.integers(2, max(3, h - mh - 2))), int(rng.integers(2, max(3, w - mw - 2)))
    img[y:y + mh, x:x + mw] = 0.97
    t = max(1, mh // 6)  # an "L": a dark upright and foot
    img[y + t:y + mh - t, x + t:x + 2 * t] = 0.1
    img[y + mh - 2 * t:y + mh - t, x + t:x + mw - t] = 0.1
    img = img + rng.normal(0.0, look.noise_sigma / 255.0, img.shape).astype(np.float32)
    if look.invert:
        img = 1.0 - img
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=look.jpeg_quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def write_site(rows: pd.DataFrame, out: str | Path, look: SiteLook, seed: int = 0) -> pd.DataFrame:
    """Write degraded copies of ``rows`` (``path``, ``label``, ``image_id``) as a class-folder site
    (``fractured/``, ``not_fractured/``); returns the rows with their new ``site_path``.

    The images are read with :func:`boneai.io.read_radiograph` (truncated JPEGs included).
    """
    import warnings

    from boneai.io import read_radiograph

    out = Path(out)
    for sub in ("fractured", "not_fractured"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for r in rows.itertuples():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = read_radiograph(r.path).pixels
        img = degrade(pixels, look, rng)
        dest = out / ("fractured" if int(r.label) else "not_fractured") / (Path(r.image_id).stem + ".png")
        Image.fromarray(img).save(dest)
        paths.append(str(dest))
    (out / "site_look.json").write_text(pd.Series(_jsonable(asdict(look))).to_json(indent=2))
    return rows.assign(site_path=paths)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
