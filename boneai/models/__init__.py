"""Model registry: configuration as data.

Each entry names a builder, its input size, normalisation, Grad-CAM target layer, task and where
its initial weights come from. ``build_model(name)`` is the only way the rest of boneai creates
an architecture, so the CLI, trainer, explainer and app agree on every detail.

Example:
    >>> from boneai.models import build_model, get_spec
    >>> spec = get_spec("resnet18")
    >>> model = build_model("resnet18", pretrained=False)
    >>> spec.input_size, spec.task
    (224, 'fracture')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from boneai.errors import ModelNotFoundError

__all__ = ["ModelSpec", "REGISTRY", "register_model", "get_spec", "build_model", "cam_target_layer", "list_models"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the project needs to know about one architecture."""

    name: str
    builder: Callable[..., nn.Module]
    task: str  # "fracture" (binary, one logit), "boneage" (regression, months), "anomaly" (autoencoder)
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cam_layer: str | None  # dotted attribute path of the Grad-CAM target layer
    pretrained: str  # "imagenet" when ImageNet weights ship offline, else "none (trained from scratch)"
    description: str
    extra: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry (names are unique)."""
    if spec.name in REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def list_models(task: str | None = None) -> list[str]:
    """Registered names, optionally only those of one task."""
    return [n for n, s in REGISTRY.items() if task is None or s.task == task]


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; raises :class:`ModelNotFoundError` with the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(f"Unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}.") from None


def build_model(name: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """Build a registered architecture; ``pretrained`` loads ImageNet weights where they ship offline."""
    spec = get_spec(name)
    return spec.builder(pretrained=pretrained, **kwargs)


def cam_target_layer(model: nn.Module, name: str) -> nn.Module:
    """The module Grad-CAM should hook for a model built from registry entry ``name``."""
    path = get_spec(name).cam_layer
    if path is None:
        raise ModelNotFoundError(f"Model {name!r} has no Grad-CAM layer (it is not a classifier).")
    module: Any = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


# Importing the architecture modules registers them.
from boneai.models import classifiers as _classifiers  # noqa: E402,F401
from boneai.models import regressors as _regressors  # noqa: E402,F401
from boneai.models import autoencoders as _autoencoders  # noqa: E402,F401
