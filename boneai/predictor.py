"""What every loaded model shares: the prediction record, the predictor interface, the loader registry.

This module sits below every model kind. :mod:`boneai.ensemble`, :mod:`boneai.anomaly` and
:mod:`boneai.localisation` import it and register their loaders in :data:`MODEL_LOADERS`;
:mod:`boneai.inference` imports them and picks a loader by the card's kind
(:attr:`boneai.card.ModelCard.model_kind`). Nothing here imports those modules.

* :class:`Prediction`: the result of one view.
* :class:`ModelPredictor`: the interface every loaded model satisfies (a ``typing.Protocol``).
* :class:`CardOperatingPoints`: named thresholds from the card; :class:`CalibratedPredictions`:
  raw network outputs (logits or months) to predictions.
* :class:`Predictor`: one network (a fracture classifier or the bone-age regressor).
* :data:`MODEL_LOADERS`, :func:`register_loader`, :func:`load_model_dir`.
* :func:`read_weights`, :func:`inference_dtype`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from boneai.card import ModelCard
from boneai.errors import BoneAIError, ModelNotFoundError
from boneai.io import Radiograph
from boneai.models import build_model, get_spec
from boneai.models.fuse import inference_copy
from boneai.preprocess import apply_pipeline
from boneai.transforms import to_tensor

__all__ = [
    "Prediction",
    "ModelPredictor",
    "CardOperatingPoints",
    "CalibratedPredictions",
    "Predictor",
    "ModelLoader",
    "ModelResolver",
    "MODEL_LOADERS",
    "register_loader",
    "load_model_dir",
    "load_classifier",
    "read_weights",
    "inference_dtype",
]


def inference_dtype() -> torch.dtype:
    """Number format of the classifiers' forward pass at prediction time.

    ``BONEAI_INFERENCE_DTYPE`` = ``float32`` (default) | ``bfloat16`` | ``auto`` (bfloat16 on CPUs
    with AMX tiles, Intel Sapphire Rapids and later, else float32). bfloat16 runs the forward pass
    about 1.7x faster on AMX, with the same validation AUC, but moves some probabilities across a
    threshold (``bench/inference_precision.py``: 11 of 693 validation decisions at ``balanced``),
    and the card's calibration and operating points were fitted in float32. So float32 is the
    default: the same image gives the same answer on every machine. The weights stay float32 for
    Grad-CAM and training either way.
    """
    choice = os.environ.get("BONEAI_INFERENCE_DTYPE", "float32").strip().lower()
    if choice in ("float32", "fp32"):
        return torch.float32
    if choice in ("bfloat16", "bf16"):
        return torch.bfloat16
    if choice != "auto":
        raise BoneAIError(f"BONEAI_INFERENCE_DTYPE={choice!r}: use float32, bfloat16 or auto.")
    try:
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    except Exception:  # noqa: BLE001 - an unknown CPU is treated as one without AMX
        amx = False
    return torch.bfloat16 if amx else torch.float32


def read_weights(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """A safetensors state dict with floating tensors in float32 (weights ship as float16).

    With ``prefix``, only the keys that start with it, the prefix removed (an ensemble's member).
    """
    from safetensors.torch import load_file  # only where weights are read

    return {k[len(prefix):]: v.float() if v.is_floating_point() else v
            for k, v in load_file(str(path)).items() if k.startswith(prefix)}


@dataclass
class Prediction:
    """The result of one view. Only the fields of the model's task are set."""

    task: str
    model: str
    probability: float | None = None  # calibrated fracture/abnormality probability
    logit: float | None = None
    threshold: float | None = None
    operating_point: str | None = None
    decision: bool | None = None  # probability >= threshold
    boneage_months: float | None = None
    anomaly_score: float | None = None
    input_image: np.ndarray | None = field(default=None, repr=False)  # what the model saw (uint8)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)


Image = Radiograph | np.ndarray


@runtime_checkable
class ModelPredictor(Protocol):
    """What every loaded model offers the app, the command line and :func:`boneai.explain.explain`.

    Satisfied by :class:`Predictor` (one network), :class:`boneai.ensemble.EnsemblePredictor`,
    :class:`boneai.anomaly.AnomalyPredictor` and :class:`boneai.localisation.LocaliserPredictor`.
    """

    name: str
    task: str  # fracture | boneage | anomaly
    card: ModelCard
    directory: Path
    model: nn.Module  # the network (an ensemble's first member): Grad-CAM hooks into it
    pipeline: list[dict[str, Any]]  # the preprocessing of ``input_image``, in boneai.preprocess's format

    @property
    def operating_points(self) -> dict[str, float]: ...

    def threshold(self, operating_point: str | float | None = None) -> float: ...

    def input_image(self, image: Image) -> np.ndarray: ...

    def input_tensor(self, image: Image) -> torch.Tensor: ...

    def predict_many(self, images: Sequence[Image], operating_point: str | float | None = None,
                     male: bool | Sequence[bool] | None = None) -> list[Prediction]: ...

    def predict(self, image: Image, operating_point: str | float | None = None,
                male: bool | None = None) -> Prediction: ...


#: Finds a model folder by name (a model, task or path), for cards that name another model.
ModelResolver = Callable[[str], Path]
#: Builds a predictor from a card and its folder.
ModelLoader = Callable[..., ModelPredictor]
#: Card kind (``ModelCard.model_kind``) -> loader. ``boneai.ensemble``, ``boneai.anomaly`` and
#: ``boneai.localisation`` register theirs when imported (``boneai.inference`` imports them).
MODEL_LOADERS: dict[str, ModelLoader] = {}


def register_loader(kind: str) -> Callable[[ModelLoader], ModelLoader]:
    """Decorator: make ``fn(card, directory, resolve=None)`` the loader of cards of ``kind``."""

    def add(fn: ModelLoader) -> ModelLoader:
        MODEL_LOADERS[kind] = fn
        return fn

    return add


def load_model_dir(directory: str | Path, resolve: ModelResolver | None = None) -> ModelPredictor:
    """Load a model folder (``card.json`` + weights) with the loader of its card's kind.

    ``resolve`` finds models the card names (an anomaly model's heatmap model) beyond its folder's siblings.
    """
    directory = Path(directory)
    card = ModelCard.from_dir(directory)
    loader = MODEL_LOADERS.get(card.model_kind)
    if loader is None:
        raise ModelNotFoundError(f"Model {card.name!r} is of kind {card.model_kind!r}, which no loader handles "
                                 f"(known: {', '.join(sorted(MODEL_LOADERS)) or 'none'}).")
    return loader(card, directory, resolve=resolve)


class CardOperatingPoints:
    """Named decision thresholds read from a model card (``card.operating_points``)."""

    card: ModelCard

    @property
    def operating_points(self) -> dict[str, float]:
        return self.card.thresholds

    def threshold(self, operating_point: str | float | None = None) -> float:
        """Threshold of a named operating point from the card, or a custom number."""
        if operating_point is None:
            operating_point = self.card.default_operating_point
        if isinstance(operating_point, (int, float)):
            return float(operating_point)
        points = self.operating_points
        if operating_point not in points:
            raise BoneAIError(f"Operating point {operating_point!r} is not in the model card; "
                              f"available: {', '.join(points) or 'none'}.")
        return points[operating_point]

    def operating_point_name(self, operating_point: str | float | None) -> str:
        """The name a prediction reports: the point's, ``custom`` for a number, else the card's default."""
        if isinstance(operating_point, str):
            return operating_point
        return "custom" if operating_point is not None else self.card.default_operating_point


class CalibratedPredictions(CardOperatingPoints):
    """Raw network outputs (fracture logits or bone-age months) to :class:`Prediction` s.

    Subclasses set ``card``, ``name``, ``task`` and supply :meth:`_outputs`.
    """

    name: str
    task: str

    def _outputs(self, images: Sequence[Image], sex: torch.Tensor | None
                 ) -> tuple[np.ndarray, list[np.ndarray], list[dict[str, Any]]]:
        """Raw outputs, the model inputs shown to the user, and extras per view."""
        raise NotImplementedError

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """``sigmoid(logit / temperature + logit_offset)`` with the card's calibration."""
        temperature, offset = self.card.temperature, self.card.logit_offset
        return 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=np.float64) / temperature + offset)))

    def predict_many(self, images: Sequence[Image], operating_point: str | float | None = None,
                     male: bool | Sequence[bool] | None = None) -> list[Prediction]:
        """Predict several views in one batch (a study)."""
        if not len(images):
            return []
        raw, inputs, extras = self._outputs(images, self._sex_tensor(male, len(images)))
        return [self._prediction(value, inp, operating_point, ex) for value, inp, ex in zip(raw, inputs, extras)]

    def predict(self, image: Image, operating_point: str | float | None = None,
                male: bool | None = None) -> Prediction:
        """Predict one view."""
        return self.predict_many([image], operating_point, male)[0]

    def _sex_tensor(self, male: bool | Sequence[bool] | None, n: int) -> torch.Tensor | None:
        if self.task != "boneage" or male is None:
            return None
        flags = [bool(male)] * n if isinstance(male, (bool, np.bool_)) else [bool(m) for m in male]
        return torch.tensor(flags, dtype=torch.float32)

    def _prediction(self, value: float, inp: np.ndarray, operating_point: str | float | None,
                    extras: dict[str, Any]) -> Prediction:
        if self.task == "boneage":
            return Prediction(task="boneage", model=self.name, boneage_months=float(value), input_image=inp,
                              extras=extras)
        prob = float(self.calibrate(np.array([value]))[0])
        thr = self.threshold(operating_point)
        return Prediction(task=self.task, model=self.name, probability=prob, logit=float(value), threshold=thr,
                          operating_point=self.operating_point_name(operating_point), decision=prob >= thr,
                          input_image=inp, extras=extras)


class Predictor(CalibratedPredictions):
    """A loaded network with its card: preprocessing, forward pass, calibration and decisions."""

    def __init__(self, card: ModelCard | Mapping[str, Any], model: nn.Module, directory: Path) -> None:
        card = ModelCard.coerce(card, directory)
        self.card, self.model, self.directory = card, model, Path(directory)
        self.name = card.name or self.directory.name
        if not card.task:
            raise ModelNotFoundError(f"The card of {self.name!r} names no task.")
        self.task = card.task
        self.pipeline = card.pipeline_spec()
        self.mean, self.std = _channels(card.mean), _channels(card.std)
        self.model.eval()
        # Classifiers may run their forward pass in bfloat16 (see inference_dtype); bone age keeps
        # float32, as months near 200 would lose half a month to bfloat16's 8-bit mantissa.
        self.dtype = inference_dtype() if self.task != "boneage" else torch.float32
        self._forward_model = self._inference_copy()
        if self.dtype != torch.float32:
            self._forward_model = copy.deepcopy(self._forward_model).to(self.dtype).eval()

    def _inference_copy(self) -> nn.Module:
        """The network the forward pass runs: a copy with batch norms folded into the convolutions
        and TensorFlow "SAME" padding done by the convolutions themselves (same outputs to float32
        rounding, checked on load; about 1.5x faster on the CPU; ``BONEAI_FOLD_BN=0`` turns it
        off). ``self.model`` stays as it was, for Grad-CAM."""
        if os.environ.get("BONEAI_FOLD_BN", "1").strip() == "0":
            self._bn_folded = False
            return self.model
        x = torch.zeros(1, 3, 64, 64)
        fast, self._bn_folded = inference_copy(self.model, (x, torch.zeros(1)) if self.task == "boneage" else x)
        return fast.to(memory_format=torch.channels_last)

    @property
    def batchnorm_folded(self) -> bool:
        """Whether the forward pass runs on the batch-norm-folded copy (see ``_inference_copy``)."""
        return self._bn_folded

    # -- preprocessing ---------------------------------------------------------------------------
    def input_image(self, image: Image) -> np.ndarray:
        """The exact uint8 square the model sees, from a radiograph or raw pixels."""
        pixels = image.pixels if isinstance(image, Radiograph) else image
        return apply_pipeline(pixels, self.pipeline)

    def input_tensor(self, image: Image) -> torch.Tensor:
        """(1, 3, S, S) normalised tensor."""
        return to_tensor(self.input_image(image), self.mean, self.std).unsqueeze(0)

    # -- prediction ------------------------------------------------------------------------------
    def raw_outputs(self, batch: torch.Tensor, male: torch.Tensor | None = None) -> np.ndarray:
        """Model outputs (logits or months) for a batch, with the card's mirror averaging."""
        with torch.inference_mode():
            n = batch.shape[0]
            tta = self.card.tta_hflip
            # The image and its mirror go through the network as one batch: one pass, not two.
            x = torch.cat([batch, torch.flip(batch, dims=[3])]) if tta else batch
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
            if self.task == "boneage":
                if male is None:
                    raise BoneAIError("Bone-age prediction needs the patient's sex (M or F).")
                out = self._forward_model(x, torch.cat([male, male]) if tta else male).reshape(-1)
            else:
                out = self._forward_model(x).reshape(-1).float()
            if tta:
                out = (out[:n] + out[n:]) / 2
        return out.float().numpy()

    def _outputs(self, images: Sequence[Image], sex: torch.Tensor | None
                 ) -> tuple[np.ndarray, list[np.ndarray], list[dict[str, Any]]]:
        inputs = [self.input_image(im) for im in images]
        batch = torch.stack([to_tensor(im, self.mean, self.std) for im in inputs])
        if self.keeps_pooled:  # one pass: the pooled features, then the head on them
            pooled = self.pooled_features(batch, mirror=False)
            with torch.inference_mode():
                logits = self._forward_model.get_classifier()(torch.from_numpy(pooled)).reshape(-1).numpy()
            return logits, inputs, [{"pooled": row} for row in pooled]
        return self.raw_outputs(batch, sex), inputs, [{} for _ in inputs]

    @property
    def keeps_pooled(self) -> bool:
        """Whether each prediction's extras carry ``pooled``: the float32 pooled encoder features of the
        view itself (a fracture classifier without mirror averaging). The scope check reads them
        instead of running the same encoder again (:func:`boneai.scope.check_views`)."""
        model = self._forward_model
        return (self.task == "fracture" and not self.card.tta_hflip and self.dtype == torch.float32
                and all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")))

    def pooled_features(self, batch: torch.Tensor, mirror: bool = True) -> np.ndarray:
        """(N, C) pooled encoder features (the head's input) of a classifier, averaged over the image
        and its mirror when ``mirror``; the head applied to them gives the mirror-averaged logit."""
        model = self._forward_model
        if self.task == "boneage" or not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
            raise BoneAIError(f"Model {self.name!r} has no pooled encoder features (a timm classifier is needed).")
        with torch.inference_mode():
            n = batch.shape[0]
            x = torch.cat([batch, torch.flip(batch, dims=[3])]) if mirror else batch
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
            out = model.forward_head(model.forward_features(x), pre_logits=True).float()
            if mirror:
                out = (out[:n] + out[n:]) / 2
        return out.numpy()


def _channels(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else list(values)


def build_network(architecture: str | None, state: dict[str, torch.Tensor]) -> nn.Module:
    """A registry architecture with ``state`` loaded, in evaluation mode and channels-last."""
    if not architecture:
        raise ModelNotFoundError("The model card names no architecture.")
    get_spec(architecture)  # clear error for an unknown architecture
    model = build_model(architecture, pretrained=False)
    model.load_state_dict(state)
    return model.to(memory_format=torch.channels_last).eval()


@register_loader("classifier")
def load_classifier(card: ModelCard | Mapping[str, Any], directory: str | Path,
                    resolve: ModelResolver | None = None) -> Predictor:
    """One network (a fracture classifier or the bone-age regressor) from its card and weights."""
    directory = Path(directory)
    card = ModelCard.coerce(card, directory)
    weights = directory / card.weights_file
    if not weights.is_file():
        raise ModelNotFoundError(f"Model {card.name!r} has a card but no weights file ({weights.name}).")
    return Predictor(card, build_network(card.architecture, read_weights(weights)), directory)
