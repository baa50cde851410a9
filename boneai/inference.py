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

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The model kinds register their loaders in MODEL_LOADERS when imported.
from boneai import anomaly as _anomaly  # noqa: F401
from boneai import ensemble as _ensemble  # noqa: F401
from boneai import localisation as _localisation  # noqa: F401
from boneai import site_model as _site_model  # noqa: F401
from boneai.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from boneai.errors import BoneAIError, ModelNotFoundError
from boneai.predictor import (
    MODEL_LOADERS,
    CardOperatingPoints,
    ModelPredictor,
    Prediction,
    Predictor,
    inference_dtype,
    load_model_dir,
    read_weights,
)

__all__ = [
    "WEIGHTS_DIR",
    "Prediction",
    "Predictor",
    "ModelPredictor",
    "CardOperatingPoints",
    "MODEL_LOADERS",
    "available_models",
    "available_cards",
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


def _weights_dir(weights_dir: str | Path | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def available_models(task: str | None = None, weights_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Cards of the models in the weights folder as plain dicts (each with an added ``dir``),
    optionally of one task: the listing the pages read. :func:`available_cards` gives them typed."""
    root = _weights_dir(weights_dir)
    cards = []
    for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(card, dict):
            continue
        if task is None or card.get("task") == task:
            card["dir"] = str(card_path.parent)
            card.setdefault("name", card_path.parent.name)
            cards.append(card)
    return cards


def available_cards(task: str | None = None, weights_dir: str | Path | None = None) -> list[ModelCard]:
    """The :class:`~boneai.card.ModelCard` of each model in the weights folder, optionally of one task
    (cards that cannot be read are left out)."""
    root = _weights_dir(weights_dir)
    cards = []
    for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
        try:
            card = ModelCard.from_dir(card_path.parent)
        except (OSError, ValueError):
            continue
        if task is None or card.task == task:
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
    if name and (root / name / CARD_FILE).is_file():
        return name
    found = available_cards(task, root)
    if not found:
        raise ModelNotFoundError(f"No {task} model found in {root}; train one with `python -m boneai train`.")
    return str(found[0].name)


def model_dir(name_or_path: str | Path, weights_dir: str | Path | None = None) -> Path:
    """Resolve a model name (``weights/<name>``), a task name (its default) or a folder path."""
    p = Path(name_or_path)
    if (p / CARD_FILE).is_file():
        return p
    root = _weights_dir(weights_dir)
    if (root / str(name_or_path) / CARD_FILE).is_file():
        return root / str(name_or_path)
    if str(name_or_path) in _TASKS:
        return root / default_model_name(str(name_or_path), root)
    known = ", ".join(str(c.name) for c in available_cards(None, root)) or "none"
    raise ModelNotFoundError(f"Model {name_or_path!r} not found (no card.json); available models: {known}.")


def load_model(name_or_path: str | Path = "fracture", weights_dir: str | Path | None = None) -> ModelPredictor:
    """Load a model folder (card + safetensors weights) on the CPU, with the loader of its card's kind
    (:data:`~boneai.predictor.MODEL_LOADERS`): a :class:`Predictor`, an ensemble, an anomaly model or a
    localiser."""
    return load_model_dir(model_dir(name_or_path, weights_dir), resolve=lambda name: model_dir(name, weights_dir))


def register_run(run_dir: str | Path, name: str, weights_dir: str | Path | None = None,
                 make_default: bool = False) -> Path:
    """Copy a finished training run (card, weights, validation predictions, metrics) into the weights folder.

    The folder is created exclusively (of two registrations under one name, one wins) and its
    ``card.json`` is written last and atomically, so the model is listed only once it is complete.
    """
    src = Path(run_dir)
    if not (src / CARD_FILE).is_file() or not (src / WEIGHTS_FILE).is_file():
        raise ModelNotFoundError(f"Training run {src} has not finished (no {CARD_FILE}/{WEIGHTS_FILE}).")
    _check_model_name(name)
    card = dataclasses.replace(ModelCard.from_dir(src), name=name)
    root = _weights_dir(weights_dir)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    try:
        dest.mkdir()
    except FileExistsError:
        raise BoneAIError(f"A model named {name!r} already exists; choose another name.") from None
    try:
        for fname in (WEIGHTS_FILE, "val_predictions.csv", "metrics.jsonl"):
            if (src / fname).is_file():
                shutil.copy2(src / fname, dest / fname)
        _write_json_atomic(dest / CARD_FILE, card.to_dict())
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # a half-copied model must not block the name
        raise
    if make_default:
        set_default_model(str(card.task), name, root)
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
    card_path = root / name / CARD_FILE
    try:
        card_task = ModelCard.from_dir(card_path.parent).task
    except FileNotFoundError:
        raise ModelNotFoundError(f"Model {name!r} not found in {root} (no card.json).") from None
    except (OSError, ValueError) as exc:
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
