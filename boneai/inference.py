"""Loading shipped or registered models and predicting on radiographs.

A model lives in a folder ``weights/<name>/`` with ``card.json`` (the model card: architecture,
pipeline, normalisation, temperature, operating points, validation figures) and
``model.safetensors``. Everything a prediction needs is read from the card; nothing is hard-coded.

Example:
    >>> from boneai.inference import load_model
    >>> from boneai.io import read_radiograph
    >>> predictor = load_model("fracture")                            # doctest: +SKIP
    >>> p = predictor.predict(read_radiograph("samples/fracatlas/IMG0000019.jpg"))  # doctest: +SKIP
    >>> p.probability, p.decision                                     # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from boneai.errors import BoneAIError, ModelNotFoundError
from boneai.io import Radiograph
from boneai.models import build_model, get_spec
from boneai.preprocess import apply_pipeline
from boneai.transforms import to_tensor

__all__ = [
    "WEIGHTS_DIR",
    "Prediction",
    "Predictor",
    "CardOperatingPoints",
    "available_models",
    "default_model_name",
    "set_default_model",
    "load_model",
    "register_run",
    "model_dir",
    "inference_dtype",
    "read_weights",
]

#: Folder of shipped and registered models; ``BONEAI_WEIGHTS_DIR`` overrides it.
WEIGHTS_DIR = Path(os.environ.get("BONEAI_WEIGHTS_DIR", Path(__file__).resolve().parents[1] / "weights"))
_DEFAULTS_FILE = "defaults.json"
_DEFAULTS_LOCK = ".defaults.lock"  # flock-ed by whoever rewrites defaults.json
_TASKS = ("fracture", "boneage", "anomaly")


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


def _weights_dir(weights_dir: str | Path | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def available_models(task: str | None = None, weights_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Cards of the models in the weights folder (each with an added ``dir``), optionally of one task."""
    root = _weights_dir(weights_dir)
    cards = []
    for card_path in sorted(root.glob("*/card.json")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if task is None or card.get("task") == task:
            card["dir"] = str(card_path.parent)
            card.setdefault("name", card_path.parent.name)
            cards.append(card)
    return cards


def default_model_name(task: str, weights_dir: str | Path | None = None) -> str:
    """The default model of a task from ``weights/defaults.json``, else the first one found.

    Raises:
        BoneAIError: ``defaults.json`` is not a JSON object of task -> model name (the message says
            how to fix it).
        ModelNotFoundError: no model of ``task`` at all.
    """
    root = _weights_dir(weights_dir)
    name = _read_defaults(root).get(task)
    if name and (root / name / "card.json").is_file():
        return name
    found = available_models(task, root)
    if not found:
        raise ModelNotFoundError(f"No {task} model found in {root}; train one with `python -m boneai train`.")
    return found[0]["name"]


def model_dir(name_or_path: str | Path, weights_dir: str | Path | None = None) -> Path:
    """Resolve a model name (``weights/<name>``), a task name (its default) or a folder path."""
    p = Path(name_or_path)
    if (p / "card.json").is_file():
        return p
    root = _weights_dir(weights_dir)
    if (root / str(name_or_path) / "card.json").is_file():
        return root / str(name_or_path)
    if str(name_or_path) in ("fracture", "boneage", "anomaly"):
        return root / default_model_name(str(name_or_path), root)
    known = ", ".join(c["name"] for c in available_models(None, root)) or "none"
    raise ModelNotFoundError(f"Model {name_or_path!r} not found (no card.json); available models: {known}.")


class CardOperatingPoints:
    """Named decision thresholds read from a model card (``card["operating_points"]``)."""

    card: dict[str, Any]

    @property
    def operating_points(self) -> dict[str, float]:
        return {k: float(v["threshold"]) for k, v in self.card.get("operating_points", {}).items()}

    def threshold(self, operating_point: str | float | None = None) -> float:
        """Threshold of a named operating point from the card, or a custom number."""
        if operating_point is None:
            operating_point = self.card.get("default_operating_point", "balanced")
        if isinstance(operating_point, (int, float)):
            return float(operating_point)
        points = self.operating_points
        if operating_point not in points:
            raise BoneAIError(f"Operating point {operating_point!r} is not in the model card; "
                              f"available: {', '.join(points) or 'none'}.")
        return points[operating_point]


class Predictor(CardOperatingPoints):
    """A loaded model with its card: preprocessing, forward pass, calibration and decisions."""

    def __init__(self, card: dict[str, Any], model: nn.Module, directory: Path) -> None:
        self.card, self.model, self.directory = card, model, directory
        self.name = card.get("name", directory.name)
        self.task = card["task"]
        self.pipeline = card["pipeline"]
        self.mean, self.std = card["mean"], card["std"]
        self.model.eval()
        # Classifiers may run their forward pass in bfloat16 (see inference_dtype); bone age keeps
        # float32, as months near 200 would lose half a month to bfloat16's 8-bit mantissa.
        self.dtype = inference_dtype() if self.task != "boneage" else torch.float32
        self._forward_model = self._inference_copy()
        if self.dtype != torch.float32:
            import copy

            self._forward_model = copy.deepcopy(self._forward_model).to(self.dtype).eval()

    def _inference_copy(self) -> nn.Module:
        """The network the forward pass runs: a copy with batch norms folded into the convolutions
        and TensorFlow "SAME" padding done by the convolutions themselves (same outputs to float32
        rounding, checked on load; about 1.5x faster on the CPU; ``BONEAI_FOLD_BN=0`` turns it
        off). ``self.model`` stays as it was, for Grad-CAM."""
        if os.environ.get("BONEAI_FOLD_BN", "1").strip() == "0":
            self._bn_folded = False
            return self.model
        from boneai.models.fuse import inference_copy

        x = torch.zeros(1, 3, 64, 64)
        fast, self._bn_folded = inference_copy(self.model, (x, torch.zeros(1)) if self.task == "boneage" else x)
        return fast.to(memory_format=torch.channels_last)

    @property
    def batchnorm_folded(self) -> bool:
        """Whether the forward pass runs on the batch-norm-folded copy (see ``_inference_copy``)."""
        return self._bn_folded

    # -- preprocessing ---------------------------------------------------------------------------
    def input_image(self, image: Radiograph | np.ndarray) -> np.ndarray:
        """The exact uint8 square the model sees, from a radiograph or raw pixels."""
        pixels = image.pixels if isinstance(image, Radiograph) else image
        return apply_pipeline(pixels, self.pipeline)

    def input_tensor(self, image: Radiograph | np.ndarray) -> torch.Tensor:
        """(1, 3, S, S) normalised tensor."""
        return to_tensor(self.input_image(image), self.mean, self.std).unsqueeze(0)

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        temperature = float(self.card.get("temperature", 1.0))
        offset = float(self.card.get("logit_offset", 0.0))
        return 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=np.float64) / temperature + offset)))

    # -- prediction ------------------------------------------------------------------------------
    def raw_outputs(self, batch: torch.Tensor, male: torch.Tensor | None = None) -> np.ndarray:
        """Model outputs (logits or months) for a batch, with the card's mirror averaging."""
        with torch.inference_mode():
            n = batch.shape[0]
            tta = bool(self.card.get("tta_hflip"))
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

    def predict_many(self, images: Sequence[Radiograph | np.ndarray], operating_point: str | float | None = None,
                     male: bool | Sequence[bool] | None = None) -> list[Prediction]:
        """Predict several views in one batch (a study)."""
        if not len(images):
            return []
        raw, inputs, extras = self._outputs(images, self._sex_tensor(male, len(images)))
        return [self._prediction(value, inp, operating_point, ex) for value, inp, ex in zip(raw, inputs, extras)]

    def _sex_tensor(self, male: bool | Sequence[bool] | None, n: int) -> torch.Tensor | None:
        if self.task != "boneage" or male is None:
            return None
        flags = [bool(male)] * n if isinstance(male, (bool, np.bool_)) else [bool(m) for m in male]
        return torch.tensor(flags, dtype=torch.float32)

    def _outputs(self, images: Sequence[Radiograph | np.ndarray], sex: torch.Tensor | None
                 ) -> tuple[np.ndarray, list[np.ndarray], list[dict[str, Any]]]:
        """Raw outputs, the model inputs shown to the user, and extras per view."""
        inputs = [self.input_image(im) for im in images]
        batch = torch.stack([to_tensor(im, self.mean, self.std) for im in inputs])
        return self.raw_outputs(batch, sex), inputs, [{} for _ in inputs]

    def _prediction(self, value: float, inp: np.ndarray, operating_point: str | float | None,
                    extras: dict[str, Any]) -> Prediction:
        if self.task == "boneage":
            return Prediction(task="boneage", model=self.name, boneage_months=float(value), input_image=inp,
                              extras=extras)
        prob = float(self.calibrate(np.array([value]))[0])
        thr = self.threshold(operating_point)
        name = operating_point if isinstance(operating_point, str) else (
            "custom" if operating_point is not None else self.card.get("default_operating_point", "balanced"))
        return Prediction(task=self.task, model=self.name, probability=prob, logit=float(value), threshold=thr,
                          operating_point=name, decision=prob >= thr, input_image=inp, extras=extras)

    def predict(self, image: Radiograph | np.ndarray, operating_point: str | float | None = None,
                male: bool | None = None) -> Prediction:
        """Predict one view."""
        return self.predict_many([image], operating_point, male)[0]


def read_weights(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """A safetensors state dict with floating tensors in float32 (weights ship as float16).

    With ``prefix``, only the keys that start with it, the prefix removed (an ensemble's member).
    """
    from safetensors.torch import load_file

    return {k[len(prefix):]: v.float() if v.is_floating_point() else v
            for k, v in load_file(str(path)).items() if k.startswith(prefix)}


def load_model(name_or_path: str | Path = "fracture", weights_dir: str | Path | None = None) -> Predictor:
    """Load a model folder (card + safetensors weights) into a :class:`Predictor` on the CPU."""
    directory = model_dir(name_or_path, weights_dir)
    card = json.loads((directory / "card.json").read_text())
    card.setdefault("name", directory.name)
    if card.get("task") == "anomaly":
        from boneai.anomaly import load_anomaly_model

        return load_anomaly_model(card, directory)
    if card.get("kind") == "localiser":
        from boneai.localisation import load_localiser

        return load_localiser(card, directory)
    if card.get("members"):
        from boneai.ensemble import load_ensemble

        return load_ensemble(card, directory)
    weights = directory / card.get("weights_file", "model.safetensors")
    if not weights.is_file():
        raise ModelNotFoundError(f"Model {card['name']!r} has a card but no weights file ({weights.name}).")
    get_spec(card["architecture"])  # clear error for an unknown architecture
    model = build_model(card["architecture"], pretrained=False)
    model.load_state_dict(read_weights(weights))
    model = model.to(memory_format=torch.channels_last).eval()
    return Predictor(card, model, directory)


def register_run(run_dir: str | Path, name: str, weights_dir: str | Path | None = None,
                 make_default: bool = False) -> Path:
    """Copy a finished training run (card, weights, validation predictions, metrics) into the weights folder.

    The folder is created exclusively (of two registrations under one name, one wins) and its
    ``card.json`` is written last and atomically, so the model is listed only once it is complete.
    """
    src = Path(run_dir)
    if not (src / "card.json").is_file() or not (src / "model.safetensors").is_file():
        raise ModelNotFoundError(f"Training run {src} has not finished (no card.json/model.safetensors).")
    _check_model_name(name)
    card = json.loads((src / "card.json").read_text())
    card["name"] = name
    root = _weights_dir(weights_dir)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    try:
        dest.mkdir()
    except FileExistsError:
        raise BoneAIError(f"A model named {name!r} already exists; choose another name.") from None
    try:
        for fname in ("model.safetensors", "val_predictions.csv", "metrics.jsonl"):
            if (src / fname).is_file():
                shutil.copy2(src / fname, dest / fname)
        _write_json_atomic(dest / "card.json", card)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # a half-copied model must not block the name
        raise
    if make_default:
        set_default_model(card["task"], name, root)
    return dest


def set_default_model(task: str, name: str, weights_dir: str | Path | None = None) -> None:
    """Make ``weights/<name>`` the default model of ``task`` in ``defaults.json``.

    Read-modify-write under an ``flock`` on ``.defaults.lock`` next to it (two admins changing two
    tasks' defaults at once both count), written atomically (readers see the old or the new file).

    Raises:
        BoneAIError: an unknown task, no such model, a model of another task, or a corrupt
            ``defaults.json``.
    """
    if task not in _TASKS:
        raise BoneAIError(f"Unknown task {task!r}; choose {', '.join(_TASKS)}.")
    _check_model_name(name)
    root = _weights_dir(weights_dir)
    card_path = root / name / "card.json"
    try:
        card_task = json.loads(card_path.read_text()).get("task")
    except FileNotFoundError:
        raise ModelNotFoundError(f"Model {name!r} not found in {root} (no card.json).") from None
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise BoneAIError(f"{card_path} cannot be read ({exc}); register the model again.") from None
    if card_task != task:
        raise BoneAIError(f"{name} is a {card_task} model; it cannot be the default {task} model.")
    with _defaults_locked(root):
        defaults = _read_defaults(root)
        defaults[task] = name
        _write_json_atomic(root / _DEFAULTS_FILE, defaults)


def _check_model_name(name: str) -> None:
    if not name or any(c in name for c in "/\\.") or name.startswith("-"):
        raise BoneAIError(f"Model name {name!r} is not a valid folder name (letters, digits, - and _).")


def _read_defaults(root: Path) -> dict[str, str]:
    """``defaults.json`` as task -> model name; {} when absent. A corrupt file is an error that says
    how to fix it, not a traceback on every page."""
    path = root / _DEFAULTS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    fix = ('It should map each task to a model folder in weights/, e.g. {"fracture": "fracture", '
           '"boneage": "boneage"}. Fix it, or delete it to fall back to the first model of each task.')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BoneAIError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}). {fix}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise BoneAIError(f"{path} is not a JSON object of task names to model names. {fix}")
    return data


@contextmanager
def _defaults_locked(root: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``root/.defaults.lock`` (released when the file closes)."""
    with open(root / _DEFAULTS_LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all: a temporary file in the same folder, flushed, then
    ``os.replace`` (atomic on POSIX), so a crash or a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; whoever serves the app reads cards
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
